//! Restore: plan from one listing, download, verify, apply, check, rename.
//!
//! 1. **Plan** (`plan.rs`) from a single (paginated) LIST of `<name>/`: the snapshot to
//!    start from (the newest one, or for a point in time the newest taken at or before it)
//!    and the segments of its generation after it (all of them, or for a point in time those
//!    up to the last one committed at or before it: times are labels from a clock that may
//!    have stepped, indexes are the order), as `docs/FORMAT.md` ("Restoring") specifies
//!    ([`choose`]). Their indexes must be contiguous: a missing segment is an error, never a
//!    silent shorter restore.
//! 2. **Download** (`download.rs`) with bounded parallelism, gunzipping as the bytes arrive
//!    (the gzip CRC is checked at the end of each object). The snapshot goes straight into
//!    `OUT.tmp`; segments go to unlinked spool files beside it, a bounded batch at a time.
//! 3. **Verify** (`verify.rs`) each segment as a WAL: valid header with the snapshot's page
//!    size, every frame's salts and checksum chain, no trailing bytes, and a commit frame at
//!    the end. If the snapshot carries a chain value
//!    ([`ChainValue`](crate::layout::ChainValue)), the segments must continue it, and where
//!    a writer cut one index more than once the chain chooses the cut, by the rules of
//!    `docs/FORMAT.md` ("The chain", "Duplicate cuts"): a restore never mixes two histories.
//! 4. **Apply** (`apply.rs`) each frame's page at its offset in `OUT.tmp`; a commit frame's
//!    database size truncates or extends the file, as a checkpoint would.
//! 5. **Check** (`check.rs`) with `fsync` and `PRAGMA integrity_check`, remove stale
//!    `OUT-wal`/`OUT-shm`, then rename `OUT.tmp` to `OUT`. On any failure `OUT.tmp` is
//!    removed and `OUT` untouched. `OUT.tmp` is created owner-only (or with `--mode`, less
//!    the umask) before any data goes into it.
//!
//! Each step is a file in `src/restore/`; this one holds [`restore()`], which runs them in
//! order, and the tests of the whole.

mod apply;
mod check;
mod download;
mod plan;
mod verify;

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::layout::Generation;
use crate::storage::Storage;
use crate::utc::UtcTime;

pub use check::check_output;
pub use plan::{plan, plan_in, replica_exists, snapshot_times, RestorePlan};
// Outside this module only retention's tests call it, holding prune plans to it.
#[cfg_attr(not(test), allow(unused_imports))]
pub use plan::choose;

use apply::Apply;
use check::{check_integrity, TempOutput};
use download::download_into;
use verify::{read_page_size, snapshot_chain};

/// Mode of the restored file unless [`RestoreOptions::mode`] says otherwise (less the umask):
/// a database is readable by whoever may read the database, not by everyone.
pub const DEFAULT_MODE: u32 = 0o600;

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Restore the state as of this time instead of the latest.
    pub point_in_time: Option<UtcTime>,
    /// Replace an existing output file.
    pub force: bool,
    /// Downloads in flight at once.
    pub parallelism: usize,
    /// Permission bits of the restored file, less the umask as for open(2);
    /// [`DEFAULT_MODE`] (0600) when None.
    pub mode: Option<u32>,
    /// Restore from this generation (its newest snapshot within the point in time) instead
    /// of the newest one.
    pub generation: Option<Generation>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            point_in_time: None,
            force: false,
            parallelism: 4,
            mode: None,
            generation: None,
        }
    }
}

/// Restore `name` from `storage` into `output`. Returns the plan that was applied.
pub fn restore(
    storage: &dyn Storage,
    name: &str,
    output: &Path,
    options: &RestoreOptions,
) -> Result<RestorePlan> {
    check_output(output, options.force)?;
    let mut plan = plan_in(
        storage,
        name,
        options.point_in_time,
        options.generation.as_ref(),
    )?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = TempOutput::create(output, options.mode.unwrap_or(DEFAULT_MODE))?;
    let comment = download_into(storage, &plan.snapshot, tmp.file())?;
    plan.chain = snapshot_chain(&plan, comment.as_deref())?;
    let page_size = read_page_size(tmp.file()).context(|| plan.snapshot.key.clone())?;
    let apply = Apply {
        storage,
        dir: &dir,
        db: tmp.file(),
        page_size,
        parallelism: options.parallelism,
    };
    match plan.chain {
        Some(chain) => apply.chained(&mut plan, chain)?,
        None => {
            if !plan.segments.is_empty() {
                log::info!(
                    "{} has no chain value (written before walsync chained segments): \
                     segments are not checked against it",
                    plan.snapshot.key
                );
            }
            apply.unchained(&plan.segments)?
        }
    }
    tmp.file()
        .sync_all()
        .context(|| format!("syncing {}", tmp.path.display()))?;
    check_integrity(&tmp.path)?;
    tmp.commit(output)?;
    note_restored(output, storage, &plan);
    Ok(plan)
}

/// Tell a later `walsync watch` of `output` that it was restored from this replica, so it
/// may take the name over from the host that wrote it (see
/// [`Sidecar::note_restored`](crate::sidecar::Sidecar::note_restored)). The restore itself
/// is complete either way: a failure here is a warning, and `watch` then explains how to
/// hand the name over by hand.
fn note_restored(output: &Path, storage: &dyn Storage, plan: &RestorePlan) {
    let noted = crate::sidecar::Sidecar::open(output, &storage.describe(), &plan.name).and_then(
        |sidecar| {
            let identity = crate::files::FileIdentity::of(output)?;
            let path = std::path::absolute(output).unwrap_or_else(|_| output.to_path_buf());
            sidecar.note_restored(
                plan.newest_generation.as_str(),
                &identity,
                &path.display().to_string(),
            )
        },
    );
    match noted {
        Ok(0) => {}
        Ok(n) => log::warn!(
            "{}: discarded {n} object(s) the replaced database had staged but not stored",
            output.display()
        ),
        Err(e) => log::warn!(
            "{}: could not note in its sidecar that it was restored from {:?} ({e}); \
             walsync watch may refuse the name until its state.json is removed",
            output.display(),
            plan.name
        ),
    }
}

#[cfg(test)]
mod tests {
    //! Synthetic replicas in `file://` storage: real SQLite pages, written as segments with
    //! chosen salts, and snapshots with or without a chain value.

    use std::fs::File;
    use std::io::Write as _;
    use std::sync::Arc;

    use flate2::write::GzEncoder;
    use flate2::{Compression, GzBuilder};
    use rusqlite::Connection;

    use super::*;
    use crate::error::ErrorKind;
    use crate::files::with_suffix;
    use crate::layout::{ChainValue, ObjectKind, ObjectName, StoredObject};
    use crate::storage::file::FileStorage;
    use crate::wal::{WalHeader, WalReader, WalWriter};

    const GENERATION: &str = "019ba7c71200beef";
    const T0: i64 = 1_768_046_400_000;

    /// A WAL-mode database whose commits are read back as frames.
    struct Source {
        conn: Connection,
        path: PathBuf,
    }

    impl Source {
        fn create(path: PathBuf) -> Source {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "PRAGMA page_size=4096; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE t(x TEXT); PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
            Source { conn, path }
        }

        /// A second history: a copy of this database as it is now.
        fn fork(&self, path: PathBuf) -> Source {
            std::fs::copy(&self.path, &path).unwrap();
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA wal_autocheckpoint=0;").unwrap();
            Source { conn, path }
        }

        /// Commit `rows` and return the frames they wrote (then checkpoint them away).
        fn commit(&self, rows: &[&str]) -> Vec<(u32, u32, Vec<u8>)> {
            for row in rows {
                self.conn
                    .execute("INSERT INTO t VALUES (?1)", [row])
                    .unwrap();
            }
            let wal = File::open(with_suffix(&self.path, "-wal")).unwrap();
            let mut reader = WalReader::open(&wal).unwrap().unwrap();
            let mut frames = Vec::new();
            let mut page = Vec::new();
            while let Some(frame) = reader.next_frame(&mut page).unwrap() {
                frames.push((frame.page_number, frame.commit_size, page.clone()));
            }
            assert_ne!(frames.last().unwrap().1, 0);
            self.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
            frames
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }

        fn rows(&self) -> Vec<String> {
            rows(&self.conn)
        }
    }

    fn rows(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT x FROM t ORDER BY rowid").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<std::result::Result<_, _>>().unwrap()
    }

    struct Replica {
        _dir: tempfile::TempDir,
        root: PathBuf,
        storage: Arc<FileStorage>,
        generation: Generation,
    }

    impl Replica {
        fn new() -> Replica {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            Replica {
                storage: Arc::new(FileStorage::new(root.join("replica"))),
                root,
                _dir: dir,
                generation: Generation::parse(GENERATION).unwrap(),
            }
        }

        fn key(&self, kind: ObjectKind, index: u64, at: i64) -> String {
            ObjectName {
                kind,
                generation: self.generation.clone(),
                index,
                time: UtcTime::from_millis(T0 + at * 1000),
            }
            .key("app")
        }

        /// Store `db` as the snapshot at `index`, with `chain` in its gzip comment (none:
        /// a legacy snapshot).
        fn snapshot(&self, index: u64, at: i64, db: &[u8], chain: Option<ChainValue>) -> String {
            let builder = match chain {
                Some(chain) => GzBuilder::new().comment(chain.comment()),
                None => GzBuilder::new(),
            };
            let mut gz = builder.write(Vec::new(), Compression::fast());
            gz.write_all(db).unwrap();
            let key = self.key(ObjectKind::Snapshot, index, at);
            self.storage.put_bytes(&key, &gz.finish().unwrap()).unwrap();
            key
        }

        /// Store `frames` as segment `index` with WAL salts `salts`; returns its key and the
        /// chain value after it.
        fn segment(
            &self,
            index: u64,
            at: i64,
            salts: ChainValue,
            frames: &[(u32, u32, Vec<u8>)],
        ) -> (String, ChainValue) {
            let header = WalHeader::new(false, 4096, 0, salts.0);
            let mut writer = WalWriter::new(Vec::new(), header).unwrap();
            for (page_number, commit_size, page) in frames {
                writer
                    .write_frame(*page_number, *commit_size, page)
                    .unwrap();
            }
            let wal = writer.finish().unwrap();
            let word = |at: usize| u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
            let last = wal.len() - 4096 - 24;
            let end = ChainValue([word(last + 16), word(last + 20)]);
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&wal).unwrap();
            let key = self.key(ObjectKind::Segment, index, at);
            self.storage.put_bytes(&key, &gz.finish().unwrap()).unwrap();
            (key, end)
        }

        fn restore(&self, until: Option<i64>) -> Result<(RestorePlan, Vec<String>)> {
            let out = self.root.join(format!("out-{until:?}.db"));
            let options = RestoreOptions {
                point_in_time: until.map(|at| UtcTime::from_millis(T0 + at * 1000)),
                force: true,
                ..RestoreOptions::default()
            };
            let plan = restore(self.storage.as_ref(), "app", &out, &options)?;
            let conn = Connection::open(&out).unwrap();
            Ok((plan, rows(&conn)))
        }
    }

    fn keys(objects: &[StoredObject]) -> Vec<&str> {
        objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn a_proper_chain_restores_and_a_second_cut_of_an_index_wins() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        // Index 2 cut twice from the same place: the later cut holds more.
        let first_cut = src.commit(&["b"]);
        let mut frames = first_cut.clone();
        frames.extend(src.commit(&["c"]));
        let (early, _) = r.segment(2, 2, c1, &first_cut);
        let at_early = src_rows_after(&src, 1);
        let (s2, c2) = r.segment(2, 3, c1, &frames);
        let (s3, _) = r.segment(3, 4, c2, &src.commit(&["d"]));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, src.rows());
        assert_eq!(rows, ["a", "b", "c", "d"]);
        assert_eq!(keys(&plan.segments), [&s1, &s2, &s3]);
        assert_eq!(keys(&plan.alternatives), [&early]);
        assert!(plan.abandoned.is_empty());
        assert_eq!(plan.chain, Some(base));

        // A point in time between the two cuts takes the first.
        let (plan, rows) = r.restore(Some(2)).unwrap();
        assert_eq!(keys(&plan.segments), [&s1, &early]);
        assert_eq!(rows, at_early);
    }

    /// The rows of `src` without its last `drop` rows: what it held a few commits ago.
    fn src_rows_after(src: &Source, drop: usize) -> Vec<String> {
        let rows = src.rows();
        rows[..rows.len() - drop].to_vec()
    }

    #[test]
    fn a_segment_from_another_history_is_refused_naming_it() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        let foreign = ChainValue([c1.0[0], c1.0[1] ^ 1]);
        let (s2, _) = r.segment(2, 2, foreign, &src.commit(&["b"]));

        let err = r.restore(None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let text = err.to_string();
        assert!(text.contains(&s2) && text.contains(&s1), "{text}");
        assert!(text.contains(&foreign.to_string()), "{text}");
        assert!(text.contains(&c1.to_string()), "{text}");
        assert!(!r.root.join("out-None.db").exists());
        assert!(!r.root.join("out-None.db.tmp").exists());

        // The first segment's salts must be the snapshot's chain value too.
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let snap = r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, _) = r.segment(1, 1, ChainValue([1, 2]), &src.commit(&["a"]));
        let text = r.restore(None).unwrap_err().to_string();
        assert!(text.contains(&s1) && text.contains(&snap), "{text}");

        // And a base snapshot must carry its generation's value.
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let snap = r.snapshot(0, 0, &src.file(), Some(ChainValue([1, 2])));
        let text = r.restore(None).unwrap_err().to_string();
        assert!(
            text.contains(&snap) && text.contains("generation"),
            "{text}"
        );
    }

    #[test]
    fn an_abandoned_branch_is_not_mixed_into_the_newer_one() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        // The writer's local position is rolled back to after segment 1 (K): the old branch
        // K+1, K+2, K+3 is in the bucket, and the writer cuts a new K+1' from K.
        let new = old.fork(r.root.join("new.db"));
        let (old2, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, c3) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (old4, _) = r.segment(4, 4, c3, &old.commit(&["old 4"]));
        let (new2, new_c2) = r.segment(2, 5, c1, &new.commit(&["new 2"]));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        assert_eq!(keys(&plan.segments), [&s1, &new2]);
        assert_eq!(keys(&plan.abandoned), [&old3, &old4]);
        assert_eq!(plan.restored_to().millis(), T0 + 5000);
        // Before the new branch existed, the old one is the history.
        let (plan, rows) = r.restore(Some(4)).unwrap();
        assert_eq!(rows, ["k", "old 2", "old 3", "old 4"]);
        assert_eq!(keys(&plan.segments), [&s1, &old2, &old3, &old4]);

        // Once the new branch goes on, its K+2' is chosen over the old K+2.
        let (new3, new_c3) = r.segment(3, 6, new_c2, &new.commit(&["new 3"]));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2", "new 3"]);
        assert_eq!(keys(&plan.segments), [&s1, &new2, &new3]);
        assert_eq!(keys(&plan.abandoned), [&old4]);

        // A snapshot of the new branch at index 3: the old K+3 continues the old K+2, a cut
        // of the snapshot's index, so it is an abandoned branch too.
        let snap = r.snapshot(3, 7, &new.file(), Some(new_c3));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2", "new 3"]);
        assert_eq!(plan.snapshot.key, snap);
        assert_eq!(keys(&plan.abandoned), [&old4]);
        // But one that continues nothing known is refused.
        let (stray, _) = r.segment(4, 8, ChainValue([5, 6]), &new.commit(&["stray"]));
        let err = r.restore(None).unwrap_err().to_string();
        assert!(err.contains(&stray) && err.contains(&snap), "{err}");
    }

    /// Object times are the writer's clock: one segment labelled 30 days ahead (the clock
    /// glitched, then came back) is applied by a point-in-time restore to a moment after
    /// the glitch, not taken as the end of the history. The blur stays at the step: a
    /// point before it restores as before.
    #[test]
    fn a_clock_stepped_forward_blurs_point_in_time_only_at_the_step() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        let (_, c2) = r.segment(2, 30 * 86400, c1, &src.commit(&["b"]));
        let (_, c3) = r.segment(3, 3, c2, &src.commit(&["c"]));
        r.segment(4, 4, c3, &src.commit(&["d"]));
        assert_eq!(r.restore(Some(3)).unwrap().1, ["a", "b", "c"]);
        assert_eq!(r.restore(Some(5)).unwrap().1, ["a", "b", "c", "d"]);
        assert_eq!(r.restore(Some(1)).unwrap().1, ["a"]);
        assert_eq!(r.restore(None).unwrap().1, ["a", "b", "c", "d"]);
    }

    #[test]
    fn an_abandoned_branch_after_a_later_snapshot_ends_the_restore_there() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        let new = old.fork(r.root.join("new.db"));
        let (_, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, _) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (_, new_c2) = r.segment(2, 5, c1, &new.commit(&["new 2"]));
        let snap = r.snapshot(2, 6, &new.file(), Some(new_c2));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        assert_eq!(plan.snapshot.key, snap);
        assert!(plan.segments.is_empty());
        assert_eq!(keys(&plan.abandoned), [&old3]);
    }

    /// Run `scripts/restore-by-hand.sh` on the replica: Ok(rows) or Err(stderr).
    fn by_hand(r: &Replica, out: &str) -> std::result::Result<(Vec<String>, String), String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/restore-by-hand.sh");
        let out = r.root.join(out);
        let done = std::process::Command::new("bash")
            .arg(script)
            .arg(r.root.join("replica"))
            .arg("app")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
        if !done.status.success() {
            assert!(!out.exists());
            return Err(stderr);
        }
        Ok((rows(&Connection::open(&out).unwrap()), stderr))
    }

    #[test]
    fn the_script_follows_and_checks_the_chain_too() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        let new = old.fork(r.root.join("new.db"));
        let (_, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, _) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (new2, _) = r.segment(2, 5, c1, &new.commit(&["new 2"]));

        let (rows, stderr) = by_hand(&r, "by-hand.db").unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        let file = |key: &str| key.rsplit('/').next().unwrap().to_string();
        assert!(
            stderr.contains("abandoned") && stderr.contains(&file(&old3)),
            "{stderr}"
        );
        let (plan, _) = r.restore(None).unwrap();
        assert_eq!(keys(&plan.abandoned), [&old3]);
        assert_eq!(
            std::fs::read(r.root.join("by-hand.db")).unwrap(),
            std::fs::read(r.root.join("out-None.db")).unwrap(),
            "the script and walsync restore the same bytes"
        );

        // A segment from another history stops it, naming the segment and what it follows.
        let (stray, _) = r.segment(3, 6, ChainValue([5, 6]), &new.commit(&["stray"]));
        let stderr = by_hand(&r, "by-hand-2.db").unwrap_err();
        assert!(stderr.contains(&file(&stray)), "{stderr}");
        assert!(stderr.contains(&file(&new2)), "{stderr}");
        assert!(stderr.contains("another history"), "{stderr}");
    }

    #[test]
    fn a_legacy_snapshot_without_a_chain_value_still_restores() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        r.snapshot(0, 0, &src.file(), None);
        // Old writers kept the live WAL's salts: nothing to check them against.
        r.segment(1, 1, ChainValue([7, 8]), &src.commit(&["a"]));
        let (_, _) = r.segment(2, 2, ChainValue([7, 8]), &src.commit(&["b"]));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["a", "b"]);
        assert_eq!(plan.chain, None);
        assert_eq!(plan.segments.len(), 2);
    }
}
