//! The WAL reader and writer against SQLite itself: real WAL files (then torn, restarted,
//! or with a checksum, salt or page number patched), and WALs this module wrote, which
//! SQLite must open and read back.

use super::*;
use crate::error::ErrorKind;
use rusqlite::Connection;
use std::fs;
use std::path::{Path, PathBuf};

/// Page size of the test databases, and the resulting frame size.
const PAGE: u64 = 4096;
const FRAME: u64 = FRAME_HEADER_SIZE + PAGE;
/// Pages in the test database: page 1 (schema), table `a` (page 2), table `b` (page 3).
const DB_PAGES: u32 = 3;

/// Offset of frame `i` (0-based) in a WAL of 4096-byte pages.
fn frame_offset(i: u64) -> u64 {
    HEADER_SIZE + i * FRAME
}

/// A WAL-mode database with tables `a` (root page 2) and `b` (root page 3), checkpointed
/// and with an empty WAL, so each test knows exactly which frames its transactions write:
/// a small insert into one table is one commit frame of that table's page, and a
/// transaction inserting into both is a frame of page 2 then a commit frame of page 3.
struct TestDb {
    dir: tempfile::TempDir,
    conn: Connection,
}

impl TestDb {
    fn new() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("test.db")).unwrap();
        conn.execute_batch("PRAGMA page_size=4096").unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint=0;
             CREATE TABLE a(id INTEGER PRIMARY KEY, v TEXT);
             CREATE TABLE b(id INTEGER PRIMARY KEY, v TEXT);",
        )
        .unwrap();
        let db = TestDb { dir, conn };
        assert_eq!(db.checkpoint("TRUNCATE"), (0, 0, 0));
        assert_eq!(fs::metadata(db.wal_path()).unwrap().len(), 0);
        db
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wal_path(&self) -> PathBuf {
        self.path("test.db-wal")
    }

    /// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames checkpointed).
    fn checkpoint(&self, mode: &str) -> (i64, i64, i64) {
        self.conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
    }

    /// One transaction, one frame: the table's root page, as a commit frame.
    fn insert(&self, table: &str, v: &str) {
        self.conn
            .execute(&format!("INSERT INTO {table}(v) VALUES (?1)"), [v])
            .unwrap();
    }

    /// One transaction, two frames: page 2 (not a commit), then page 3 (commit).
    fn insert_both(&self, v: &str) {
        let tx = self.conn.unchecked_transaction().unwrap();
        tx.execute("INSERT INTO a(v) VALUES (?1)", [v]).unwrap();
        tx.execute("INSERT INTO b(v) VALUES (?1)", [v]).unwrap();
        tx.commit().unwrap();
    }

    /// Copy the live WAL (the connection stays open, so SQLite has not deleted it).
    fn copy_wal(&self, name: &str) -> PathBuf {
        let to = self.path(name);
        fs::copy(self.wal_path(), &to).unwrap();
        to
    }

    /// Copy the database file as it is now.
    fn copy_db(&self, name: &str) -> PathBuf {
        let to = self.path(name);
        fs::copy(self.path("test.db"), &to).unwrap();
        to
    }
}

type Frames = Vec<(FrameHeader, Vec<u8>)>;

/// Every valid frame of the WAL at `path`, and the reader's position after them.
fn read_all(path: &Path) -> (WalHeader, Frames, WalPosition) {
    let file = File::open(path).unwrap();
    let mut reader = WalReader::open(&file).unwrap().expect("valid WAL header");
    let mut frames = Vec::new();
    let mut page = Vec::new();
    while let Some(frame) = reader.next_frame(&mut page).unwrap() {
        assert_eq!(page.len(), PAGE as usize);
        frames.push((frame, page.clone()));
    }
    (*reader.header(), frames, reader.position())
}

fn last_commit(path: &Path) -> Option<WalPosition> {
    let file = File::open(path).unwrap();
    let mut reader = WalReader::open(&file).unwrap().unwrap();
    reader.find_last_commit().unwrap()
}

/// (page number, commit size) of each frame.
fn shape(frames: &Frames) -> Vec<(u32, u32)> {
    frames
        .iter()
        .map(|(h, _)| (h.page_number, h.commit_size))
        .collect()
}

/// Modify the file at `path` in place.
fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(path).unwrap();
    f(&mut bytes);
    fs::write(path, bytes).unwrap();
}

fn be_word(bytes: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Open `base` as a database with `wal` as its WAL, in a fresh directory, as SQLite would
/// after a crash: no -shm, so SQLite recovers the WAL by validating its frames itself.
fn open_with_wal(base: &Path, wal: &[u8]) -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(base, dir.path().join("x.db")).unwrap();
    fs::write(dir.path().join("x.db-wal"), wal).unwrap();
    let conn = Connection::open(dir.path().join("x.db")).unwrap();
    (dir, conn)
}

fn rows(conn: &Connection, table: &str) -> Vec<String> {
    let mut stmt = conn
        .prepare(&format!("SELECT v FROM {table} ORDER BY id"))
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

fn integrity_check(conn: &Connection) -> String {
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// Set a header's checksum bytes to match its first 24 bytes (little-endian words).
fn reseal_header(bytes: &mut [u8]) {
    let sum = checksum(false, &bytes[..24], [0, 0]);
    bytes[24..28].copy_from_slice(&sum[0].to_be_bytes());
    bytes[28..32].copy_from_slice(&sum[1].to_be_bytes());
}

/// Writes: txn 1 = frame 0 (page 2, commit); txn 2 = frames 1 (page 2) and 2 (page 3,
/// commit); txn 3 = frame 3 (page 2, commit).
fn three_transactions(db: &TestDb) {
    db.insert("a", "one");
    db.insert_both("two");
    db.insert("a", "three");
}
const THREE_TXN_SHAPE: [(u32, u32); 4] = [(2, DB_PAGES), (2, 0), (3, DB_PAGES), (2, DB_PAGES)];

#[test]
fn checksum_known_values() {
    let data = [0, 0, 0, 1, 0, 0, 0, 2];
    // Big-endian words 1 and 2: s0 = 0 + 1 + 0 = 1, s1 = 0 + 2 + 1 = 3.
    assert_eq!(checksum(true, &data, [0, 0]), [1, 3]);
    // The same bytes as little-endian words are 0x01000000 and 0x02000000.
    assert_eq!(checksum(false, &data, [0, 0]), [0x0100_0000, 0x0300_0000]);
    // Seeded: s0 = 10 + 1 + 20 = 31, s1 = 20 + 2 + 31 = 53.
    assert_eq!(checksum(true, &data, [10, 20]), [31, 53]);
    // Wrapping: s0 = 2 + 0xffffffff + 0 = 1, s1 = 0 + 0 + 1 = 1.
    assert_eq!(
        checksum(true, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], [2, 0]),
        [1, 1]
    );
    // Cumulative: summing in two parts equals summing the whole.
    let whole: Vec<u8> = (0..64u8).collect();
    for big_endian in [false, true] {
        let first = checksum(big_endian, &whole[..24], [7, 9]);
        assert_eq!(
            checksum(big_endian, &whole[24..], first),
            checksum(big_endian, &whole, [7, 9])
        );
    }
}

#[test]
fn parses_header_of_real_wal() {
    let db = TestDb::new();
    db.insert("a", "one");
    let wal = db.copy_wal("copy.wal");
    let bytes = fs::read(&wal).unwrap();
    assert_eq!(bytes.len() as u64, frame_offset(1));

    let header = WalHeader::parse(bytes[..32].try_into().unwrap()).unwrap();
    // SQLite checksums in native byte order.
    assert_eq!(header.big_endian, cfg!(target_endian = "big"));
    let magic = if cfg!(target_endian = "big") {
        0x377f0683
    } else {
        0x377f0682
    };
    assert_eq!(be_word(&bytes, 0), magic);
    assert_eq!(header.page_size, 4096);
    assert_eq!(header.frame_size(), 4120);
    // The TRUNCATE checkpoint in TestDb::new restarted the WAL once.
    assert_eq!(header.checkpoint_seq, 1);
    assert_eq!(header.salt, [be_word(&bytes, 16), be_word(&bytes, 20)]);
    assert_eq!(header.checksum, [be_word(&bytes, 24), be_word(&bytes, 28)]);
    assert_eq!(header.to_bytes()[..], bytes[..32]);
    // new() computes the same checksum SQLite stored.
    assert_eq!(
        WalHeader::new(header.big_endian, 4096, 1, header.salt),
        header
    );

    let file = File::open(&wal).unwrap();
    let reader = WalReader::open(&file).unwrap().unwrap();
    assert_eq!(*reader.header(), header);
    assert_eq!(
        reader.position(),
        WalPosition {
            offset: 32,
            checksum: header.checksum
        }
    );
}

#[test]
fn rejects_bad_headers() {
    let db = TestDb::new();
    db.insert("a", "one");
    let good: [u8; 32] = fs::read(db.wal_path()).unwrap()[..32].try_into().unwrap();
    assert!(WalHeader::parse(&good).is_ok());

    /// What the error message should say, and how to damage the header.
    type Case = (&'static str, fn(&mut [u8; 32]));
    let cases: [Case; 7] = [
        ("magic", |b| b[3] = 0x84),
        ("checksum mismatch", |b| b[17] ^= 1),
        ("checksum mismatch", |b| b[30] ^= 1),
        ("version 3007001", |b| {
            b[4..8].copy_from_slice(&3007001u32.to_be_bytes());
            reseal_header(b);
        }),
        // 65536 is stored as 65536 in a WAL; 1 is only the database header's encoding.
        ("page size 1:", |b| {
            b[8..12].copy_from_slice(&1u32.to_be_bytes());
            reseal_header(b);
        }),
        ("page size 1000:", |b| {
            b[8..12].copy_from_slice(&1000u32.to_be_bytes());
            reseal_header(b);
        }),
        ("page size 131072:", |b| {
            b[8..12].copy_from_slice(&131072u32.to_be_bytes());
            reseal_header(b);
        }),
    ];
    for (expected, corrupt) in cases {
        let mut bytes = good;
        corrupt(&mut bytes);
        let err = WalHeader::parse(&bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{expected}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");

        // A reader treats the same file as an empty WAL.
        let path = db.path("bad.wal");
        let mut file_bytes = fs::read(db.wal_path()).unwrap();
        file_bytes[..32].copy_from_slice(&bytes);
        fs::write(&path, file_bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert!(WalReader::open(&file).unwrap().is_none(), "{expected}");
    }
}

#[test]
fn open_returns_none_for_empty_short_or_zeroed_file() {
    let db = TestDb::new();
    db.insert("a", "one");
    let real = fs::read(db.wal_path()).unwrap();
    let path = db.path("w");
    for contents in [Vec::new(), real[..31].to_vec(), vec![0u8; 32 + 4120]] {
        fs::write(&path, &contents).unwrap();
        let file = File::open(&path).unwrap();
        assert!(
            WalReader::open(&file).unwrap().is_none(),
            "{} bytes",
            contents.len()
        );
    }

    // A header and no frames is a valid, empty WAL.
    fs::write(&path, &real[..32]).unwrap();
    let file = File::open(&path).unwrap();
    let mut reader = WalReader::open(&file).unwrap().unwrap();
    assert_eq!(reader.next_frame(&mut Vec::new()).unwrap(), None);
    assert_eq!(reader.find_last_commit().unwrap(), None);
    assert_eq!(reader.position().offset, 32);
}

#[test]
fn counts_frames_and_commits_of_real_wal() {
    let db = TestDb::new();
    three_transactions(&db);
    let wal = db.copy_wal("copy.wal");
    let bytes = fs::read(&wal).unwrap();

    let (header, frames, end) = read_all(&wal);
    assert_eq!(shape(&frames), THREE_TXN_SHAPE);
    for (frame, _) in &frames {
        assert_eq!(frame.salt, header.salt);
    }
    assert_eq!(
        frames
            .iter()
            .map(|(h, _)| h.is_commit())
            .collect::<Vec<_>>(),
        [true, false, true, true]
    );
    // Page data is the table's b-tree leaf (type 0x0d) holding the row just written.
    let (_, last_page) = &frames[3];
    assert_eq!(last_page[0], 0x0d);
    assert!(last_page.windows(5).any(|w| w == b"three"));
    assert_eq!(last_page[..], bytes[frame_offset(3) as usize + 24..]);

    // The position after the last frame carries that frame's stored checksum.
    assert_eq!(end.offset, frame_offset(4));
    assert_eq!(end.offset, bytes.len() as u64);
    assert_eq!(
        end.checksum,
        [
            be_word(&bytes, frame_offset(3) + 16),
            be_word(&bytes, frame_offset(3) + 20)
        ]
    );
    assert_eq!(frames[3].0.checksum, end.checksum);

    // The last commit is the end of the 3rd transaction, and SQLite agrees: it counts
    // 4 frames in its WAL.
    assert_eq!(last_commit(&wal), Some(end));
    assert_eq!(db.checkpoint("PASSIVE"), (0, 4, 4));
}

#[test]
fn stops_before_torn_last_frame() {
    let db = TestDb::new();
    three_transactions(&db);
    let full = fs::read(db.wal_path()).unwrap();
    let (_, all_frames, _) = read_all(&db.wal_path());

    // Cut inside the page of the last frame, and inside its frame header.
    for cut in [frame_offset(3) + 1000, frame_offset(3) + 10] {
        let wal = db.path("torn.wal");
        fs::write(&wal, &full[..cut as usize]).unwrap();

        let (_, frames, end) = read_all(&wal);
        assert_eq!(shape(&frames), THREE_TXN_SHAPE[..3]);
        assert_eq!(frames, all_frames[..3]);
        assert_eq!(end.offset, frame_offset(3));

        // The last commit is now the end of the 2nd transaction.
        let commit = last_commit(&wal).unwrap();
        assert_eq!(commit, end);
        assert_eq!(commit.checksum, all_frames[2].0.checksum);
    }
}

#[test]
fn stops_at_bad_checksum() {
    let db = TestDb::new();
    three_transactions(&db);

    // A flipped byte in the page data of frame 1 (the first frame of the 2nd transaction).
    let wal = db.copy_wal("bad-page.wal");
    patch(&wal, |b| b[frame_offset(1) as usize + 24 + 2000] ^= 0x40);
    let file = File::open(&wal).unwrap();
    let mut reader = WalReader::open(&file).unwrap().unwrap();
    let mut page = Vec::new();
    assert_eq!(
        reader.next_frame(&mut page).unwrap().map(|h| h.page_number),
        Some(2)
    );
    let after_first = reader.position();
    assert_eq!(after_first.offset, frame_offset(1));
    // Frame 1 is invalid: no frame, and the position does not move, however often asked.
    assert_eq!(reader.next_frame(&mut page).unwrap(), None);
    assert_eq!(reader.next_frame(&mut page).unwrap(), None);
    assert_eq!(reader.position(), after_first);
    assert_eq!(reader.find_last_commit().unwrap(), None);
    assert_eq!(reader.position(), after_first);
    // Frames 2 and 3 are intact on their own, but unreachable: the chain is broken.
    assert_eq!(last_commit(&wal), Some(after_first));

    // The commit-size field is covered by the checksum too: make frame 2 claim not to be
    // a commit frame.
    let wal = db.copy_wal("bad-commit-size.wal");
    patch(&wal, |b| b[frame_offset(2) as usize + 7] = 0);
    let (_, frames, end) = read_all(&wal);
    assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
    assert_eq!(end.offset, frame_offset(2));
    // Only the 1st transaction is committed; frame 1 is an unfinished transaction.
    assert_eq!(last_commit(&wal).unwrap().offset, frame_offset(1));
}

#[test]
fn stops_at_salt_mismatch_or_page_zero() {
    let db = TestDb::new();
    three_transactions(&db);

    // Salts are not in the checksum; they are compared. Change salt-2 of frame 2.
    let wal = db.copy_wal("bad-salt.wal");
    patch(&wal, |b| b[frame_offset(2) as usize + 15] ^= 1);
    let (_, frames, end) = read_all(&wal);
    assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
    assert_eq!(end.offset, frame_offset(2));

    // Page number 0 ends the WAL even with a correct checksum (SQLite's rule).
    let wal = db.copy_wal("page-zero.wal");
    let (header, frames, _) = read_all(&wal);
    patch(&wal, |b| {
        let at = frame_offset(2) as usize;
        b[at..at + 4].fill(0);
        let sum = checksum(header.big_endian, &b[at..at + 8], frames[1].0.checksum);
        let sum = checksum(header.big_endian, &b[at + 24..at + 24 + 4096], sum);
        b[at + 16..at + 20].copy_from_slice(&sum[0].to_be_bytes());
        b[at + 20..at + 24].copy_from_slice(&sum[1].to_be_bytes());
    });
    let (_, frames, end) = read_all(&wal);
    assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
    assert_eq!(end.offset, frame_offset(2));
}

#[test]
fn ignores_stale_frames_after_wal_restart() {
    let db = TestDb::new();
    for v in ["1", "2", "3"] {
        db.insert("a", v);
    }
    db.insert_both("4");
    db.insert("a", "5");
    let old_wal = db.copy_wal("old.wal");
    let (old_header, old_frames, _) = read_all(&old_wal);
    assert_eq!(old_frames.len(), 6);

    // Checkpoint everything with no reader holding the WAL, then write again: the writer
    // restarts the WAL from the top instead of appending.
    assert_eq!(db.checkpoint("PASSIVE"), (0, 6, 6));
    db.insert("b", "after restart");
    let wal = db.copy_wal("new.wal");
    let bytes = fs::read(&wal).unwrap();

    let (header, frames, end) = read_all(&wal);
    assert_eq!(header.checkpoint_seq, old_header.checkpoint_seq + 1);
    assert_eq!(header.salt[0], old_header.salt[0].wrapping_add(1));
    assert_ne!(header.salt[1], old_header.salt[1]);
    // Only the new transaction's frame, and it carries the new salts.
    assert_eq!(shape(&frames), [(3, DB_PAGES)]);
    assert_eq!(frames[0].0.salt, header.salt);
    assert!(frames[0].1.windows(13).any(|w| w == b"after restart"));
    assert_eq!(end.offset, frame_offset(1));
    assert_eq!(last_commit(&wal), Some(end));

    // The file still holds all 6 old frames' worth of bytes; frames 1..6 are the old
    // ones, with the old salts.
    assert_eq!(bytes.len() as u64, frame_offset(6));
    assert!(bytes.len() as u64 > end.offset);
    for i in 1..6 {
        let at = frame_offset(i);
        assert_eq!(
            [be_word(&bytes, at + 8), be_word(&bytes, at + 12)],
            old_header.salt
        );
    }
    // SQLite agrees: one frame in its WAL.
    assert_eq!(db.checkpoint("PASSIVE"), (0, 1, 1));
}

#[test]
fn still_holds_a_position_until_the_wal_restarts() {
    let db = TestDb::new();
    for v in ["1", "2", "3"] {
        db.insert("a", v);
    }
    let (_, _, end) = read_all(&db.copy_wal("before.wal"));
    let live = File::open(db.copy_wal("same.wal")).unwrap();
    let reader = WalReader::open(&live).unwrap().unwrap();
    assert!(reader.still_holds(end).unwrap());
    let header_only = WalPosition {
        offset: HEADER_SIZE,
        checksum: reader.header().checksum,
    };
    assert!(reader.still_holds(header_only).unwrap());
    // A wrong checksum, an offset off the frame grid, or one past the end: not held.
    let wrong = WalPosition {
        checksum: [end.checksum[0] ^ 1, end.checksum[1]],
        ..end
    };
    assert!(!reader.still_holds(wrong).unwrap());
    let off_grid = WalPosition {
        offset: end.offset - 1,
        ..end
    };
    assert!(!reader.still_holds(off_grid).unwrap());
    let beyond = WalPosition {
        offset: end.offset + reader.header().frame_size(),
        ..end
    };
    assert!(!reader.still_holds(beyond).unwrap());

    // After a checkpoint and a restart, the old position is gone even though the file
    // still holds the old frames' bytes past the new end.
    assert_eq!(db.checkpoint("PASSIVE"), (0, 3, 3));
    db.insert("b", "after restart");
    let restarted = File::open(db.copy_wal("after.wal")).unwrap();
    let reader = WalReader::open(&restarted).unwrap().unwrap();
    assert!(!reader.still_holds(end).unwrap());
}

#[test]
fn find_last_commit_excludes_uncommitted_tail() {
    let db = TestDb::new();
    let base = db.copy_db("base.db");
    db.insert("a", "one");
    db.insert_both("two");
    let full = fs::read(db.wal_path()).unwrap();

    // A copy that ends after frame 1: the 2nd transaction's first, non-commit frame.
    let wal = db.path("partial.wal");
    fs::write(&wal, &full[..frame_offset(2) as usize]).unwrap();
    let (_, frames, _) = read_all(&wal);
    assert_eq!(shape(&frames), [(2, DB_PAGES), (2, 0)]);

    let file = File::open(&wal).unwrap();
    let mut reader = WalReader::open(&file).unwrap().unwrap();
    let commit = reader.find_last_commit().unwrap().unwrap();
    assert_eq!(commit.offset, frame_offset(1));
    assert_eq!(commit.checksum, frames[0].0.checksum);
    // The reader itself went on over the valid but uncommitted frame.
    assert_eq!(reader.position().offset, frame_offset(2));
    // From there no further commit is found.
    assert_eq!(reader.find_last_commit().unwrap(), None);

    // SQLite also applies only the 1st transaction from this WAL.
    let (_dir, conn) = open_with_wal(&base, &full[..frame_offset(2) as usize]);
    assert_eq!(rows(&conn, "a"), ["one"]);
    assert!(rows(&conn, "b").is_empty());
}

#[test]
fn seek_resumes_from_saved_position() {
    let db = TestDb::new();
    three_transactions(&db);
    let wal = db.copy_wal("copy.wal");
    let (_, all_frames, end) = read_all(&wal);

    let file = File::open(&wal).unwrap();
    let mut first = WalReader::open(&file).unwrap().unwrap();
    let mut page = Vec::new();
    first.next_frame(&mut page).unwrap().unwrap();
    first.next_frame(&mut page).unwrap().unwrap();
    let saved = first.position();
    assert_eq!(saved.offset, frame_offset(2));

    // Positions are persisted as JSON.
    let json = serde_json::to_string(&saved).unwrap();
    assert_eq!(
        json,
        format!(
            r#"{{"offset":8272,"checksum":[{},{}]}}"#,
            all_frames[1].0.checksum[0], all_frames[1].0.checksum[1]
        )
    );
    let restored: WalPosition = serde_json::from_str(&json).unwrap();

    let mut second = WalReader::open(&file).unwrap().unwrap();
    second.seek(restored);
    let mut rest = Vec::new();
    while let Some(frame) = second.next_frame(&mut page).unwrap() {
        rest.push((frame, page.clone()));
    }
    assert_eq!(rest, all_frames[2..]);
    assert_eq!(second.position(), end);

    // A position whose checksum is not the chain's finds nothing.
    second.seek(WalPosition {
        offset: saved.offset,
        checksum: [0, 0],
    });
    assert_eq!(second.next_frame(&mut page).unwrap(), None);

    // A position off a frame boundary is a caller bug.
    for offset in [0, 31, saved.offset + 1] {
        second.seek(WalPosition { offset, ..saved });
        let err = second.next_frame(&mut page).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
    }
}

/// Copy the frames of a real 3-transaction WAL into a fresh WAL with new salts, then open
/// it with SQLite on top of the database as it was before those transactions.
fn rewrite_and_open(big_endian: bool) {
    let db = TestDb::new();
    let base = db.copy_db("base.db");
    three_transactions(&db);
    let (real_header, frames, _) = read_all(&db.copy_wal("copy.wal"));

    let salt = [0x1234_5678, 0x9abc_def0];
    let header = WalHeader::new(big_endian, 4096, 42, salt);
    let mut writer = WalWriter::new(Vec::new(), header).unwrap();
    for (frame, page) in &frames {
        writer
            .write_frame(frame.page_number, frame.commit_size, page)
            .unwrap();
    }
    assert_eq!(writer.frames(), 4);
    let written = writer.finish().unwrap();
    assert_eq!(written.len() as u64, frame_offset(4));
    let magic = if big_endian {
        MAGIC_BIG_ENDIAN
    } else {
        MAGIC_LITTLE_ENDIAN
    };
    assert_eq!(be_word(&written, 0), magic);

    // Our reader accepts it: same pages, new salts, new checksum chain.
    let path = db.path("written.wal");
    fs::write(&path, &written).unwrap();
    let (read_header, read_frames, end) = read_all(&path);
    assert_eq!(read_header, header);
    assert_eq!(read_header.big_endian, big_endian);
    assert_ne!(read_header.salt, real_header.salt);
    assert_eq!(shape(&read_frames), THREE_TXN_SHAPE);
    for ((read, read_page), (real, real_page)) in read_frames.iter().zip(&frames) {
        assert_eq!(read.salt, salt);
        assert_ne!(read.checksum, real.checksum);
        assert_eq!(read_page, real_page);
    }
    assert_eq!(end.offset, frame_offset(4));
    assert_eq!(last_commit(&path), Some(end));

    // And so does SQLite, which validates every frame before applying it.
    let (_dir, conn) = open_with_wal(&base, &written);
    assert_eq!(rows(&conn, "a"), ["one", "two", "three"]);
    assert_eq!(rows(&conn, "b"), ["two"]);
    assert_eq!(integrity_check(&conn), "ok");
    drop(conn);

    // Negative control: with a flipped bit in the last frame's page, SQLite drops the 3rd
    // transaction, so the check above really depends on our checksums.
    let mut damaged = written.clone();
    damaged[frame_offset(3) as usize + 100] ^= 1;
    let (_dir, conn) = open_with_wal(&base, &damaged);
    assert_eq!(rows(&conn, "a"), ["one", "two"]);
}

#[test]
fn written_wal_is_accepted_by_sqlite() {
    rewrite_and_open(false);
}

/// SQLite on little-endian machines only writes little-endian checksums, but it reads
/// big-endian ones, so the big-endian variant can be checked against SQLite too.
#[test]
fn big_endian_wal_roundtrips_and_is_accepted_by_sqlite() {
    rewrite_and_open(true);

    // The byte order really changes the checksums.
    let le = WalHeader::new(false, 4096, 0, [1, 2]);
    let be = WalHeader::new(true, 4096, 0, [1, 2]);
    assert_ne!(le.checksum, be.checksum);
    assert_eq!(WalHeader::parse(&be.to_bytes()).unwrap(), be);
    // A big-endian checksum under the little-endian magic does not verify.
    let mut bytes = be.to_bytes();
    bytes[3] = 0x82;
    let err = WalHeader::parse(&bytes).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn page_size_65536_is_stored_literally() {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("big.db")).unwrap();
    conn.execute_batch("PRAGMA page_size=65536").unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch("CREATE TABLE t(x)").unwrap();

    let wal = dir.path().join("big.db-wal");
    let bytes = fs::read(&wal).unwrap();
    assert_eq!(be_word(&bytes, 8), 65536);
    let file = File::open(&wal).unwrap();
    let mut reader = WalReader::open(&file).unwrap().unwrap();
    assert_eq!(reader.header().page_size, 65536);
    assert_eq!(reader.header().frame_size(), 65560);
    let mut page = Vec::new();
    let first = reader.next_frame(&mut page).unwrap().unwrap();
    assert_eq!((first.page_number, first.commit_size), (1, 0));
    assert_eq!(page.len(), 65536);
    assert_eq!(&page[..16], b"SQLite format 3\0");
    let commit = reader.find_last_commit().unwrap().unwrap();
    assert_eq!(commit.offset, 32 + 2 * 65560);
}

#[test]
fn writer_rejects_bad_input() {
    for page_size in [0, 1, 1000, 131072] {
        let header = WalHeader::new(false, page_size, 0, [1, 2]);
        let err = WalWriter::new(Vec::new(), header).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Invalid, "page size {page_size}");
    }

    let header = WalHeader::new(false, 512, 0, [1, 2]);
    let mut writer = WalWriter::new(Vec::new(), header).unwrap();
    let err = writer.write_frame(1, 1, &[0; 511]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let err = writer.write_frame(0, 1, &[0; 512]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(writer.frames(), 0);
    writer.write_frame(1, 1, &[7; 512]).unwrap();
    assert_eq!(writer.frames(), 1);
    let out = writer.finish().unwrap();
    // Nothing of the refused frames was written.
    assert_eq!(out.len(), 32 + 24 + 512);
    assert_eq!(&out[..32], &header.to_bytes());
}
