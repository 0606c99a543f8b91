//! Rest: what an idle database gives back while its thread sleeps, so that a thousand of
//! them cost little: the control connection, cached pages, this process's view of the
//! wal-index and, after [`ONE_CONNECTION_AFTER`] without a commit (or
//! [`ONE_CONNECTION_AFTER_WHEN_SHORT`] while descriptors are short), the descriptors of a
//! second connection and, on Linux, the sidecar's lock. The pin stays held throughout (or,
//! for the moment of reopening it, is judged again as any unguarded pin is): resting never
//! costs a commit.
//!
//! The sidecar lock goes only when there is nothing it protects at that moment: nothing
//! staged, unsaved or uploading. [`Replica::hold`] takes it back before anything else runs;
//! if another walsync held it meanwhile (it could only start while this one's stamp named
//! nobody alive to it: another PID namespace, or a lost stamp), what this replica knows
//! may be stale, so it starts over from the sidecar and storage as a restart would.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::pin::Pin;
use super::Replica;
use crate::error::{Context, Result};
use crate::files::FileIdentity;
use crate::sidecar::Relocked;

/// How long a database must have had no commit to read before it rests on one connection
/// (see [`Replica::rest`]).
pub const ONE_CONNECTION_AFTER: Duration = Duration::from_secs(30);

/// The same while descriptors are short ([`crate::limits::descriptors_short`]): a busy
/// database's extra descriptors are what other databases wait for.
pub const ONE_CONNECTION_AFTER_WHEN_SHORT: Duration = UNWRITTEN_FOR;

/// How long before [`Replica::rest`] closes its connections the database file must have been
/// left unwritten: longer than the coarsest file-time granularity (2 s, FAT).
const UNWRITTEN_FOR: Duration = Duration::from_secs(5);

/// The file's identity and its inode change time in nanoseconds (which every write sets to
/// the current time, and no program can set otherwise).
fn written(path: &Path) -> Result<(FileIdentity, i128)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).context(|| format!("reading {}", path.display()))?;
    let ctime = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
    Ok((FileIdentity::from_metadata(&m), ctime))
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

impl Replica {
    /// Free the connections' cached pages: an idle database should cost little memory.
    pub(super) fn release_memory(&self) {
        if let Some(control) = &self.control {
            control.release_memory();
        }
        self.pin.release_memory();
    }

    /// Give back what an idle database need not keep resident: the control connection
    /// (opened again for the next checkpoint), the buffers of staged objects' lists while
    /// they are empty, the pin's cached pages and parsed schema, and this process's
    /// view of the wal-index (see
    /// [`crate::database::Database::forget_wal_index_pages`]). Called when the database's
    /// thread goes to sleep. The pin stays: it is what keeps the WAL in place.
    ///
    /// Closing the control connection frees no descriptor while the pin holds its lock
    /// (see [`crate::database::Database::close_in_place`]), so a database quiet for
    /// [`ONE_CONNECTION_AFTER`] also opens the pin's connection afresh (`rest_alone`):
    /// from then on it holds three descriptors (database, WAL, `-shm`) instead of six.
    /// Resting on one connection with nothing staged, unsaved or uploading, it also lets
    /// the sidecar lock go (on Linux; see the module docs), which [`Replica::hold`] takes
    /// back.
    pub(crate) fn rest(&mut self) {
        self.control = None;
        // What a busy spell grew and left empty: an idle database keeps no buffer for it.
        if self.staged.is_empty() {
            self.staged = VecDeque::new();
        }
        if self.unsynced.is_empty() {
            self.unsynced = Vec::new();
        }
        if !self.alone && self.last_read.elapsed() >= self.quiet_before_one_connection() {
            if let Err(e) = self.rest_alone() {
                log::debug!("{}: resting on one connection: {e}", self.name);
            }
        }
        self.release_memory();
        self.pin.forget_wal_index_pages();
        if self.alone && self.reconciled && self.is_flushed() && self.is_saved() {
            self.sidecar.release_lock();
        }
    }

    /// How long without a commit before [`Replica::rest`] rests on one connection.
    fn quiet_before_one_connection(&self) -> Duration {
        if crate::limits::descriptors_short() {
            self.one_connection_after
                .min(ONE_CONNECTION_AFTER_WHEN_SHORT)
        } else {
            self.one_connection_after
        }
    }

    /// Take the sidecar lock back if resting let it go (see the module docs): called before
    /// anything else a database's thread does after it wakes. If another walsync held it
    /// meanwhile, start over: open this replica afresh from the sidecar and storage, as a
    /// restart would (reconciled again before anything is uploaded).
    pub(crate) fn hold(&mut self) -> Result<()> {
        match self.sidecar.relock()? {
            Relocked::Held => Ok(()),
            Relocked::TakenOver(why) => {
                log::warn!(
                    "{}: {why}: starting over from its sidecar and storage",
                    self.name
                );
                self.start_over()
            }
        }
    }

    /// Replace this replica with one opened afresh on the same database, storage and name.
    /// Its connections go first, so that a walsync that holds the name now is not kept
    /// from checkpointing by this one's pin; if the new one cannot be opened (another
    /// walsync replicates the database now), this one is left holding nothing, and the
    /// next [`Replica::hold`] tries again.
    fn start_over(&mut self) -> Result<()> {
        self.control = None;
        self.pin_state = Pin::Behind(None);
        self.pin.close_in_place()?;
        let path = self.pin.path().to_path_buf();
        let mut fresh = Replica::open_unreconciled(&path, Arc::clone(&self.storage), &self.name)?;
        fresh.progress = Arc::clone(&self.progress);
        fresh.staging_limit = self.staging_limit;
        fresh.wal_size_limit = self.wal_size_limit;
        fresh.one_connection_after = self.one_connection_after;
        *self = fresh;
        Ok(())
    }

    /// Close every connection and pin the WAL again on one new connection, if everything
    /// committed has been read.
    ///
    /// For the moment between the close and the new pin, nothing of this process holds the
    /// database. A commit that lands then is found by the new pin unless, within that same
    /// moment, it was also checkpointed and then either the WAL restarted over it (new
    /// salts) or the application's last connection closed and deleted the WAL. So the new
    /// pin guards as the old one did only if the WAL ends exactly where it ended before,
    /// with the same salts, and the database file was not written meanwhile (its inode
    /// change time, which no program can set back, is what it was; and it was old enough
    /// beforehand that a coarse clock could not hide a write). Otherwise the moment is
    /// judged as after any unguarded pin ([`Replica::pin_state_now`] and the continuity
    /// check of the next step), which at worst starts a new generation: nothing is lost.
    fn rest_alone(&mut self) -> Result<()> {
        if self.tip.is_none() || self.lost.is_some() {
            return Ok(()); // something to decide first: the next step does it
        }
        // One scan of the WAL serves both (it reads every frame, to check its checksum).
        let end = self.committed_end()?;
        if !self.all_read(end) {
            return Ok(()); // something to read first: the next step does it
        }
        let before = (end, written(self.pin.path())?);
        if before.1 .1 > now_ns() - UNWRITTEN_FOR.as_nanos() as i128 {
            return Ok(()); // written too recently to tell a write in the gap apart
        }
        self.pin.close_in_place()?;
        // From here the old pin guards nothing: should a step below fail, the replica is left
        // unguarded (the continuity check judges it), never `Guarding` across the gap.
        self.pin_state = Pin::Behind(None);
        #[cfg(test)]
        if let Some(gap) = self.between_connections.as_mut() {
            gap();
        }
        self.pin.open_again()?;
        self.pin.pin()?;
        // Everything committed was read (checked above), so the new pin sees nothing unread.
        self.pin_ahead = false;
        self.pinned_at = Some(self.wal_look()?);
        let after = (self.committed_end()?, written(self.pin.path())?);
        self.pin_state = if after == before {
            Pin::Guarding
        } else {
            log::debug!(
                "{}: the database changed while resting on one connection",
                self.name
            );
            self.pin_state_now()?
        };
        self.alone = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use rusqlite::Connection;

    use super::*;
    use crate::replica::testing::{restored_and_source_rows, setup, write_now};

    /// Descriptors this process has open on `path`.
    #[cfg(target_os = "linux")]
    fn descriptors_of(path: &Path) -> usize {
        let path = std::fs::canonicalize(path).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| *target == path)
            .count()
    }

    /// Rest on one connection once the database file is old enough (see `UNWRITTEN_FOR`).
    fn rest_alone_when_allowed(replica: &mut Replica) {
        replica.set_one_connection_after(Duration::ZERO);
        let deadline = Instant::now() + UNWRITTEN_FOR + Duration::from_secs(5);
        while !replica.alone {
            assert!(Instant::now() < deadline, "never rested on one connection");
            replica.rest();
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A quiet database holds one connection's descriptors (closing the control connection
    /// alone frees none: SQLite keeps its descriptor while the pin holds a lock), and the
    /// next commit still ships.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_quiet_database_rests_on_one_connection_and_still_ships() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        drop(app);
        let db = dir.path().join("app.db");
        replica.checkpoint().unwrap(); // opens the control connection
        replica.rest();
        // The control connection's (and the application's, closed above) are kept by SQLite.
        assert!(descriptors_of(&db) >= 2);
        rest_alone_when_allowed(&mut replica);
        assert_eq!(descriptors_of(&db), 1);
        assert_eq!(descriptors_of(&dir.path().join("app.db-wal")), 1);
        // Nothing staged or unsaved: the sidecar lock went too, but not the stamp, which
        // still refuses a second replica.
        let lock = replica.sidecar.dir().join("lock");
        assert_eq!(descriptors_of(&lock), 0);
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(
            crate::storage::file::FileStorage::new(dir.path().join("bucket")),
        );
        let second = Replica::open(&db, storage, "app").err().unwrap();
        assert!(
            second.to_string().contains("already replicating"),
            "{second}"
        );
        let app = Connection::open(&db).unwrap();
        write_now(&app).unwrap();
        replica.sync().unwrap();
        assert_eq!(descriptors_of(&lock), 1);
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (2, 2));
    }

    /// Another walsync replicated the database while this one rested without its lock (it
    /// could start because the stamp named nobody alive to it, as from another PID
    /// namespace, emulated here by clearing the stamp). Taking the lock back finds that;
    /// the replica starts over from the sidecar and storage, and every commit, the other's
    /// and the later ones, restores.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_database_replicated_by_another_walsync_while_resting_starts_over_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        let db = dir.path().join("app.db");
        rest_alone_when_allowed(&mut replica);
        let lock = replica.sidecar.dir().join("lock");
        assert_eq!(descriptors_of(&lock), 0);
        std::fs::write(&lock, b"").unwrap();
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(
            crate::storage::file::FileStorage::new(dir.path().join("bucket")),
        );
        let mut other = Replica::open(&db, storage, "app").unwrap();
        app.execute_batch("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4);")
            .unwrap();
        other.sync().unwrap();
        drop(other);
        app.execute_batch("INSERT INTO t VALUES (5);").unwrap();
        replica.sync().unwrap();
        assert_eq!(descriptors_of(&lock), 1);
        app.execute_batch("INSERT INTO t VALUES (6);").unwrap();
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (5, 5));
        // One object per index: a replica that went on from what it knew before the other
        // walsync ran would cut the other's segments again under the same indexes.
        let mut indexes: Vec<String> = std::fs::read_dir(dir.path().join("bucket/app/wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .map(|name| name.rsplit_once('-').unwrap().0.to_string())
            .collect();
        let stored = indexes.len();
        indexes.sort();
        indexes.dedup();
        assert_eq!(indexes.len(), stored, "{indexes:?}");
    }

    /// Resting gives back the buffer of the staged list once its objects are stored.
    #[test]
    fn rest_frees_the_empty_staged_list() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        write_now(&app).unwrap();
        replica.sync().unwrap();
        assert!(replica.staged.is_empty() && replica.staged.capacity() > 0);
        replica.rest();
        assert_eq!(replica.staged.capacity(), 0);
        write_now(&app).unwrap();
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (3, 3));
    }

    /// A rest whose new connection cannot be opened leaves the replica unguarded, not
    /// guarding as before the gap: the next step judges what may have happened in it.
    #[test]
    fn a_failed_reopen_at_rest_leaves_the_pin_unguarded() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        drop(app);
        replica.settle().unwrap();
        assert_eq!(replica.pin_state, Pin::Guarding);
        replica.set_one_connection_after(Duration::ZERO);
        let (db, away) = (dir.path().join("app.db"), dir.path().join("away.db"));
        let (from, to) = (db.clone(), away.clone());
        replica.between_connections = Some(Box::new(move || {
            std::fs::rename(&from, &to).unwrap();
        }));
        std::thread::sleep(UNWRITTEN_FOR + Duration::from_millis(500));
        assert!(replica.rest_alone().is_err());
        assert!(!replica.alone);
        assert_eq!(replica.pin_state, Pin::Behind(None));
        replica.between_connections = None;
        std::fs::rename(&away, &db).unwrap();
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (1, 1));
    }

    /// The worst moment to commit: while a resting database has no connection, the
    /// application commits, checkpoints everything and closes, so the WAL is deleted and
    /// looks as it did before (no commits). The change time of the database file tells,
    /// and the commit reaches storage.
    #[test]
    fn a_commit_checkpointed_away_while_walsync_has_no_connection_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        drop(app);
        let db = dir.path().join("app.db");
        let wal = dir.path().join("app.db-wal");
        // Nothing in the WAL to begin with, as after the application's last close: the
        // WAL looks the same before and after the gap.
        replica.settle().unwrap();
        Connection::open(&db)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        replica.set_one_connection_after(Duration::ZERO);
        let gap_db = db.clone();
        replica.between_connections = Some(Box::new(move || {
            let app = Connection::open(&gap_db).unwrap();
            app.execute_batch("INSERT INTO t VALUES (2); PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
            drop(app);
        }));
        std::thread::sleep(UNWRITTEN_FOR + Duration::from_millis(500));
        replica.rest();
        assert!(replica.alone);
        assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
        replica.between_connections = None;
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!(
            (restored, source),
            (2, 2),
            "the commit made in the gap is stored"
        );
    }
}
