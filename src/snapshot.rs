//! Consistent, compressed copies of a live database.
//!
//! The copy goes through SQLite's online backup API on a connection that holds a read
//! transaction, so it is exactly the database as of that transaction's start: pages still in
//! the WAL are included and later commits are not. (A raw read of the database file would
//! miss WAL pages; `VACUUM INTO` renumbers pages and could not be a base for WAL replay.)
//! The copy lands in a scratch database in the sidecar and is then gzipped into the staged
//! object, its chain value in the gzip header (the bytes are in `docs/FORMAT.md`,
//! "Snapshots"); memory use does not depend on the database size.

use std::fs::File;
use std::io::BufReader;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::Connection;

use crate::database::Database;
use crate::error::{Context, Error, Result};
use crate::gzip;
use crate::layout::ChainValue;
use crate::progress::{self, Progress};
use crate::spool::NamedSpool;

/// How many snapshots are taken at once in this process (see [`crate::gate`]).
static SNAPSHOTTING: crate::gate::Gate = crate::gate::Gate::new(4);

/// Pages copied per backup step; bounds how long each step holds SQLite's mutexes.
const PAGES_PER_STEP: std::os::raw::c_int = 4096;

/// Copy `db` as of its current read transaction (the caller has pinned it) into `out`,
/// gzipped, with `chain` (the chain value of the segment it is aligned to) in the gzip
/// header. `scratch` is where the uncompressed copy is made; `progress` hears how far the copy
/// and the compression are. Returns the database size.
pub fn take(
    db: &Database,
    scratch: NamedSpool,
    chain: ChainValue,
    out: &File,
    progress: &dyn Progress,
) -> Result<u64> {
    // A host of databases starting for the first time snapshots them all at once: a few at
    // a time, each with its compressor's few hundred KiB, is as fast and holds far less.
    let _pass = SNAPSHOTTING.enter();
    let context = || format!("copying {} with the backup API", db.path().display());
    {
        let mut target = Connection::open(scratch.path()).context(context)?;
        let backup = Backup::new(db.connection()?, &mut target).context(context)?;
        let page_size: i64 = db
            .connection()?
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .context(context)?;
        progress.phase("copying");
        // Busy or Locked: the step is simply tried again.
        while backup.step(PAGES_PER_STEP).context(context)? != StepResult::Done {
            let done = backup.progress();
            let pages = done.pagecount.saturating_sub(done.remaining).max(0) as u64;
            progress.set_bytes(pages * page_size.max(0) as u64);
        }
    }
    let plain = File::open(scratch.path()).context(context)?;
    let db_size = plain.metadata()?.len();
    if db_size == 0 {
        return Err(Error::corrupt(format!(
            "backup of {} produced an empty file",
            db.path().display()
        )));
    }
    // The chain value is the only optional gzip header field walsync writes, so the
    // comment starts at byte 10 of the object, where a shell script can read it
    // (docs/FORMAT.md, "Snapshots").
    let mut gz = gzip::encoder(out, Some(chain.comment()));
    progress.phase("compressing");
    let mut plain = progress::Reader {
        inner: BufReader::new(plain),
        progress,
        done: 0,
    };
    std::io::copy(&mut plain, &mut gz).context(|| "compressing snapshot")?;
    gzip::finish(gz, "snapshot")?;
    Ok(db_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_comment_sits_at_byte_ten() {
        let comment = ChainValue([0x0123_abcd, 0xffff_0000]).comment();
        let file = tempfile::tempfile().unwrap();
        let mut gz = gzip::encoder(&file, Some(comment.clone()));
        std::io::Write::write_all(&mut gz, b"data").unwrap();
        gzip::finish(gz, "test").unwrap();
        let mut bytes = Vec::new();
        use std::io::{Read, Seek};
        (&file).rewind().unwrap();
        (&file).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes[3], 0x10, "FLG: only FCOMMENT");
        assert_eq!(&bytes[10..10 + comment.len()], comment.as_bytes());
        assert_eq!(bytes[10 + comment.len()], 0);
    }
}
