//! Cutting committed WAL frames into a segment: a standalone, gzipped WAL file (its bytes
//! are specified in `docs/FORMAT.md`, "Segments").
//!
//! A segment holds what the frames between two commit boundaries of the live WAL did,
//! rewritten under a fresh WAL header with the checksum chain recomputed (see
//! [`crate::wal::WalWriter`]), so that `gunzip` gives a file SQLite itself accepts as a WAL
//! for the database as of the segment before it. It is written straight into a file in the
//! sidecar; memory stays small (a frame, and up to about 1 MiB of page numbers while cutting,
//! see [`SUPERSEDED_LIMIT`]) however large the transactions are, so a backlog of hundreds of
//! MiB costs disk, not RAM.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};

use crate::error::{Context, Result};
use crate::gzip;
use crate::layout::ChainValue;
use crate::wal::{WalHeader, WalPosition, WalReader, WalWriter, FRAME_HEADER_SIZE};

/// A segment cut into a file.
pub struct Segment {
    /// Frames in the segment.
    pub frames: u64,
    /// Where in the live WAL the segment ends (just after its last commit frame).
    pub end: WalPosition,
    /// The chain value after this segment: its last frame's checksum, which the next
    /// segment's header salts must equal.
    pub chain: ChainValue,
}

/// Most frames one cut remembers the page numbers of: 4 bytes each, plus, to pick the last
/// versions, a set of the distinct pages and a flag per frame, about 1 MiB in all at this
/// limit. A backlog longer than this is cut as it is, every frame kept, so memory stays
/// bounded.
const SUPERSEDED_LIMIT: usize = 64 * 1024;

/// Copy the committed frames of `reader` from its position up to its last commit frame
/// into `out` as a gzipped standalone WAL whose header salts are `chain`, the chain value
/// of the object before it, leaving out page versions a later frame of the same segment
/// supersedes. `Ok(None)` when no commit frame follows (then `out` holds nothing useful and
/// the reader is at the end of the valid frames).
///
/// # The chain
///
/// The salts make each segment name the exact state it applies to (`docs/FORMAT.md`, "The
/// chain"). Since the checksum chain of a WAL starts from a header checksum that covers the
/// salts, the last checksum, which [`Segment::chain`] returns for the next segment's salts,
/// vouches for every segment before it. SQLite ignores salt values when it replays a WAL,
/// so `gunzip` + `sqlite3` still restore by hand.
///
/// # Superseded pages
///
/// An application that commits often rewrites the same pages in commit after commit (the
/// B-tree's rightmost leaf and its parents): in 10-row transactions of 1000-byte rows, half
/// the frames of a second's commits are versions of a page that a later commit of the same
/// second writes again. A segment is restored whole, never to a commit inside it, so only
/// each page's last version matters: that is also what SQLite itself reads, the newest frame
/// of a page up to the last commit. So the cut keeps, of each page, only its last frame, and
/// writes the segment as one transaction: every kept frame but the last has its commit
/// marker cleared, the last keeps the final database size. Fewer frames means less to
/// compress, store and upload. A segment is the same WAL whichever frames it leaves out, so
/// restore (walsync's or by hand) is unchanged.
///
/// # Two passes
///
/// The first pass validates every frame (salts, checksum chain) in order, noting its page
/// number and where the last commit frame ends; frames after that (a transaction still being
/// written) are never written. The second pass reads again only the frames kept, checking
/// their salts (see [`WalReader::reread_frame`]), and compresses them. A frame costs two
/// reads from the page cache, but compression, by far the larger cost, runs once per page.
///
/// With `stored`, the frames are written uncompressed ([`gzip::Stored`]), for
/// [`gzip::recompress`] to compress later: how a cut under the barrier is written.
pub fn cut(
    reader: &mut WalReader,
    chain: ChainValue,
    out: &File,
    stored: bool,
) -> Result<Option<Segment>> {
    let start = reader.position();
    let frame_len = reader.frame_len();
    let mut frame = vec![0; frame_len];
    // Page number of every frame from `start` on, while there are not too many.
    let mut pages = Vec::new();
    let mut remember = true;
    let mut count = 0;
    // The end of the last commit frame, its database size, and the frames up to it.
    let mut committed = None;
    while let Some(header) = reader.read_frame_into(&mut frame)? {
        count += 1;
        if remember && pages.len() < SUPERSEDED_LIMIT {
            pages.push(header.page_number);
        } else if remember {
            remember = false;
            pages = Vec::new();
        }
        if header.is_commit() {
            committed = Some((reader.position(), count));
        }
    }
    let Some((end, count)) = committed else {
        return Ok(None);
    };
    let keep = remember.then(|| last_versions(&pages[..count]));

    let header = *reader.header();
    let fresh = WalHeader::new(header.big_endian, header.page_size, 0, chain.0);
    let kept = Kept {
        start,
        count,
        keep: keep.as_deref(),
    };
    // One writer for both encodings (through `dyn Write`), so its code is not doubled.
    let what = || "writing a segment".to_string();
    let (frames, chain) = if stored {
        let mut gz = gzip::Stored::new(BufWriter::new(out)).context(what)?;
        let written = kept.write(reader, &mut gz, fresh, frame)?;
        gz.finish().context(what)?;
        written
    } else {
        let mut gz = gzip::encoder(out, None);
        let written = kept.write(reader, &mut gz, fresh, frame)?;
        gzip::finish(gz, "segment")?;
        written
    };
    reader.seek(end);
    Ok(Some(Segment { frames, end, chain }))
}

/// The frames the second pass of [`cut`] writes: `count` from `start`, and of those only
/// the ones `keep` marks, if given.
struct Kept<'a> {
    start: WalPosition,
    count: usize,
    keep: Option<&'a [bool]>,
}

impl Kept<'_> {
    /// Write the kept frames, each read again, as one transaction under the header
    /// `fresh`, into `out`; return how many and the last checksum.
    fn write(
        &self,
        reader: &mut WalReader,
        out: &mut dyn Write,
        fresh: WalHeader,
        mut frame: Vec<u8>,
    ) -> Result<(u64, ChainValue)> {
        let mut writer = WalWriter::new(out, fresh)?;
        let (start, count, keep) = (self.start, self.count, self.keep);
        let frame_size = frame.len() as u64;
        for i in 0..count {
            if keep.as_ref().is_some_and(|keep| !keep[i]) {
                continue;
            }
            let offset = start.offset + i as u64 * frame_size;
            let header = reader.reread_frame(offset, &mut frame)?;
            let last = i + 1 == count;
            // One transaction: only the last frame commits, with the final size.
            let commit = if keep.is_none() || last {
                header.commit_size
            } else {
                0
            };
            writer.write_frame(
                header.page_number,
                commit,
                &frame[FRAME_HEADER_SIZE as usize..],
            )?;
        }
        let written = (writer.frames(), ChainValue(writer.checksum()));
        writer.finish()?;
        Ok(written)
    }
}

/// Which of the frames writing `pages` (in WAL order) hold the last version of their page.
fn last_versions(pages: &[u32]) -> Vec<bool> {
    let mut seen = HashSet::with_capacity(pages.len());
    let mut keep: Vec<bool> = pages.iter().rev().map(|&p| seen.insert(p)).collect();
    keep.reverse();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::io::Read;
    use std::path::Path;

    #[test]
    fn last_versions_keeps_each_pages_last_frame() {
        assert_eq!(
            last_versions(&[2, 3, 2, 4, 3, 2]),
            [false, false, false, true, true, true]
        );
        assert_eq!(last_versions(&[7]), [true]);
        assert!(last_versions(&[]).is_empty());
    }

    fn rows(path: &Path) -> Vec<(i64, String)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        rows
    }

    /// Commits that rewrite the same pages: the segment holds each page once, commits once
    /// (with the final size), and SQLite, given it as the WAL of the database as it was
    /// before them, reads exactly what the application committed.
    #[test]
    fn a_segment_keeps_each_pages_last_version_and_replays_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        let base = dir.path().join("base.db");
        std::fs::copy(&path, &base).unwrap();
        let mut commits = 0;
        for i in 0..200 {
            app.execute(
                "INSERT INTO t(v) VALUES (?1)",
                [format!("row {i} {}", "x".repeat(300))],
            )
            .unwrap();
            commits += 1;
        }
        app.execute("UPDATE t SET v = 'changed' WHERE id % 7 = 0", [])
            .unwrap();
        app.execute("DELETE FROM t WHERE id > 150", []).unwrap();
        commits += 2;
        // A transaction still open past the last commit is not shipped.
        // A small cache spills it into the WAL.
        app.execute_batch(
            "PRAGMA cache_size=2; BEGIN;
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500)
             INSERT INTO t(v) SELECT 'uncommitted ' || x || printf('%.300c', 'y') FROM c;",
        )
        .unwrap();

        let wal = File::open(dir.path().join("app.db-wal")).unwrap();
        let mut reader = WalReader::open(&wal).unwrap().unwrap();
        let (live_frames, live_end, last_commit_size) = {
            let mut probe = WalReader::open(&wal).unwrap().unwrap();
            let mut n = 0;
            let mut last_commit_size = 0;
            let mut page = Vec::new();
            while let Some(frame) = probe.next_frame(&mut page).unwrap() {
                n += 1;
                if frame.is_commit() {
                    last_commit_size = frame.commit_size;
                }
            }
            (n, probe.position().offset, last_commit_size)
        };
        let out = tempfile::tempfile().unwrap();
        let from = reader.position();
        let segment = cut(&mut reader, ChainValue([1, 2]), &out, false)
            .unwrap()
            .unwrap();
        assert!(
            segment.end.offset < live_end,
            "the open transaction spilled"
        );
        assert!(
            segment.frames * 2 < live_frames,
            "{} frames kept of {live_frames} over {commits} commits",
            segment.frames
        );

        let mut gz = Vec::new();
        let mut out = out;
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut gz).unwrap();
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();

        // The same cut written stored (as under the barrier) holds the same WAL.
        reader.seek(from);
        let mut stored = tempfile::tempfile().unwrap();
        let again = cut(&mut reader, ChainValue([1, 2]), &stored, true)
            .unwrap()
            .unwrap();
        assert_eq!(
            (again.frames, again.end, again.chain),
            (segment.frames, segment.end, segment.chain)
        );
        std::io::Seek::seek(&mut stored, std::io::SeekFrom::Start(0)).unwrap();
        let mut same = Vec::new();
        flate2::read::GzDecoder::new(&stored)
            .read_to_end(&mut same)
            .unwrap();
        assert!(same == plain, "the stored cut holds the same WAL");
        let replayed = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&replayed, &plain, 0).unwrap();
        let mut check = WalReader::open(&replayed).unwrap().unwrap();
        let mut page = Vec::new();
        let mut seen = HashSet::new();
        let mut commit_frames = Vec::new();
        while let Some(frame) = check.next_frame(&mut page).unwrap() {
            assert!(
                seen.insert(frame.page_number),
                "page {} twice",
                frame.page_number
            );
            if frame.is_commit() {
                commit_frames.push(frame.commit_size);
            }
        }
        assert_eq!(seen.len() as u64, segment.frames);
        assert_eq!(commit_frames, [last_commit_size]);

        std::fs::write(dir.path().join("base.db-wal"), &plain).unwrap();
        app.execute_batch("ROLLBACK;").unwrap();
        assert_eq!(rows(&base), rows(&path));
        let conn = Connection::open(&base).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}
