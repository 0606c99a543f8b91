//! Consistent, compressed copies of a live database.
//!
//! The copy goes through SQLite's online backup API on a connection that holds a read
//! transaction, so it is exactly the database as of that transaction's start: pages still in
//! the WAL are included and later commits are not. (A raw read of the database file would
//! miss WAL pages; `VACUUM INTO` renumbers pages and could not be a base for WAL replay.)
//! The copy lands in a spool database beside the source and is then gzipped into an
//! unlinked spool file; memory use does not depend on the database size.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use rusqlite::backup::Backup;
use rusqlite::Connection;

use crate::database::Database;
use crate::error::{Context, Error, Result};
use crate::segment::GZIP_LEVEL;
use crate::spool::{self, NamedSpool};

/// Pages copied per backup step; bounds how long each step holds SQLite's mutexes.
const PAGES_PER_STEP: std::os::raw::c_int = 4096;

/// A compressed snapshot ready to upload.
pub struct Snapshot {
    /// The gzipped database file (an unlinked spool file), positioned at its start.
    pub file: File,
    /// Size of the uncompressed database in bytes.
    pub db_size: u64,
}

/// Copy `db` as of its current read transaction (the caller has pinned it) into a gzipped
/// spool file in `spool_dir`.
pub fn take(db: &Database, spool_dir: &Path) -> Result<Snapshot> {
    let copy = NamedSpool::new(spool_dir, "snapshot");
    let context = || format!("copying {} with the backup API", db.path().display());
    {
        let mut target = Connection::open(copy.path()).context(context)?;
        let backup = Backup::new(db.connection(), &mut target).context(context)?;
        backup
            .run_to_completion(PAGES_PER_STEP, std::time::Duration::ZERO, None)
            .context(context)?;
    }
    let plain = File::open(copy.path()).context(context)?;
    let db_size = plain.metadata()?.len();
    if db_size == 0 {
        return Err(Error::corrupt(format!(
            "backup of {} produced an empty file",
            db.path().display()
        )));
    }
    let mut gz_file = spool::anonymous(spool_dir)?;
    {
        let mut gz = GzEncoder::new(BufWriter::new(&gz_file), Compression::new(GZIP_LEVEL));
        std::io::copy(&mut BufReader::new(plain), &mut gz).context(|| "compressing snapshot")?;
        gz.finish()?
            .into_inner()
            .map_err(|e| Error::from(e.into_error()))
            .context(|| "writing snapshot spool")?;
    }
    gz_file.seek(SeekFrom::Start(0))?;
    Ok(Snapshot {
        file: gz_file,
        db_size,
    })
}
