//! Holding the WAL still: the pin, the barrier, and moving the pin (see "Holding the WAL
//! still" in the [`crate::replica`] docs).
//!
//! The pin is a read transaction on the replica's own connection; the barrier is the
//! application's write lock (`BEGIN IMMEDIATE`) taken on a second, *control* connection.
//! The pin moves under the barrier when it must line up with the tip (a snapshot's base, a
//! new generation), and without it, by handing it off between the two connections, when it
//! only has to keep guarding. Here too: following a WAL that restarted under the pin, and
//! a database file replaced by rename.

use std::path::Path;
use std::time::Instant;

use super::position::{mark, WalMark};
use super::Replica;
use crate::database::Database;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::files::FileIdentity;
use crate::wal::{WalHeader, WalPosition, WalReader, HEADER_SIZE};

/// The WAL file at one moment: its header's salts (None without a valid header or file)
/// and its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct WalLook {
    salt: Option<[u32; 2]>,
    size: u64,
}

/// What the pin guarantees (see "Holding the WAL still" in the [`crate::replica`] docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pin {
    /// Every commit since the pin was taken is in the current WAL or already staged.
    Guarding,
    /// Unread commits may have been in the WAL when the pin was taken, up to this offset in
    /// the WAL with these salts (or anywhere, if `None`); guarding once the tip gets there.
    Behind(Option<([u32; 2], u64)>),
}

impl Replica {
    /// Move a guarding pin to the present without the barrier: a read transaction is
    /// opened on the control connection first, then the old one ends, and the two
    /// connections trade roles. One of them holds a read transaction at every moment, so
    /// the pin goes on guarding: on a read mark above 0 the new one keeps any writer from
    /// restarting the WAL; SQLite gives it read mark 0 only when every frame in the WAL is
    /// in the database file already, which the old pin allowed only for frames it saw. So
    /// the tip must have read (and saved) every frame the old pin sees: true of a pin taken
    /// under the barrier or at rest, which is aligned with the tip, but not of a pin handed
    /// off to the present, which sees what committed since the last cut. Such a pin is
    /// handed off again only after a cut has read up to it: until then this refuses
    /// (returns false, having moved nothing). Without that rule, a second hand-off in a row
    /// got read mark 0 once a checkpoint had copied those frames, and the next writer
    /// restarted the WAL over them before they were read (seen in the torture harness: a
    /// generation that skipped the commits made while its base snapshot was taken). What
    /// commits after the new pin was taken stays unread, as after any pin: the next cut
    /// reads it.
    ///
    /// Unlike a repin under the barrier, the new pin is not aligned with the tip, so it is
    /// not a base for a snapshot; it serves checkpoints and [`Replica::follow_restart`].
    pub(super) fn hand_off_pin(&mut self) -> Result<bool> {
        debug_assert_eq!(self.pin_state, Pin::Guarding);
        if self.pin_ahead {
            return Ok(false);
        }
        self.alone = false;
        open_control(&mut self.control, &self.pin, &self.opened, &self.name)?.pin()?;
        let Some(new_pin) = self.control.take() else {
            return Err(Error::new(ErrorKind::Other, "control connection vanished"));
        };
        let old = std::mem::replace(&mut self.pin, new_pin);
        // If ending it fails, closing the connection ends it (and the next step opens a
        // new control connection).
        self.pinned_at = None;
        self.pin_ahead = true;
        old.release()?;
        self.control = Some(old);
        Ok(true)
    }

    /// A pin taken when every frame in the WAL was in the database file already (after a
    /// complete checkpoint, or with no WAL at all, as when walsync starts on a quiet
    /// database) sits on read mark 0: that lets the next writer restart the WAL, but it
    /// also keeps every checkpoint from copying anything, and SQLite's checkpoint sorts
    /// every frame of the WAL before it finds that out. An application with automatic
    /// checkpoints on (SQLite's default, every 1000 frames) then sorted the whole WAL after
    /// each of its commits only to give up, until walsync's next checkpoint: measured on
    /// tmpfs, 60 MiB in 10-row transactions cost the writer 0.91-0.95 s of CPU instead of
    /// 0.37 s, 60% of it in SQLite's checkpoint. So once the WAL has been written to since
    /// the pin was taken (restarted with new salts, or grown), the pin is handed off to the
    /// present (see [`Replica::hand_off_pin`]), where it gets a read mark above 0: the
    /// application's checkpoints copy up to it and then have nothing to do, and the WAL
    /// still cannot restart before walsync has read it. Call on every wake-up: it reads the
    /// WAL header only until the first hand-off after a pin. Returns whether it handed off.
    pub(crate) fn follow_restart(&mut self) -> Result<bool> {
        let Some(then) = self.pinned_at else {
            return Ok(false);
        };
        if self.pin_state != Pin::Guarding || !self.pin.in_transaction() {
            return Ok(false);
        }
        let now = self.wal_look()?;
        if now.salt.is_none() || (now.salt == then.salt && now.size <= then.size) {
            return Ok(false);
        }
        if !self.hand_off_pin()? {
            return Ok(false);
        }
        log::debug!(
            "{}: the WAL was written to since the pin was taken: handed off",
            self.name
        );
        Ok(true)
    }

    /// Hold the barrier (the application's write lock) around `f`, and always release it.
    /// How long it was held is logged at debug level (`scripts/bench.sh` reads it).
    pub(super) fn under_barrier<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.alone = false;
        open_control(&mut self.control, &self.pin, &self.opened, &self.name)?.lock_writes()?;
        let started = Instant::now();
        let result = f(self);
        let released = self.control.as_ref().map_or(Ok(()), Database::release);
        log::debug!(
            "{}: write lock held for {} us",
            self.name,
            started.elapsed().as_micros()
        );
        let value = result?;
        released?;
        Ok(value)
    }

    /// If another file was renamed into the database's place, reopen the connections on it
    /// (they still point at the old file); continuity is then lost and the next cut says so.
    pub(super) fn follow_replacement(&mut self) -> Result<()> {
        let now = FileIdentity::of(self.pin.path())?;
        if now.same_file(&self.opened) {
            return Ok(());
        }
        log::warn!(
            "{}: {} was replaced by another file; reopening it",
            self.name,
            self.pin.path().display()
        );
        let (pin, opened) = open_pin(self.pin.path())?;
        self.control = None;
        self.pin = pin;
        self.opened = opened;
        self.pin_state = Pin::Behind(None);
        self.backfilled = None;
        self.pinned_at = Some(self.wal_look()?);
        Ok(())
    }

    /// Move the pin to the present (call under the barrier, so nothing commits meanwhile).
    pub(super) fn repin(&mut self) -> Result<()> {
        self.pin.release()?;
        self.pin.pin()?;
        self.pinned_at = Some(self.wal_look()?);
        Ok(())
    }

    /// The WAL's salts (None without a valid header) and file size, right now.
    pub(super) fn wal_look(&self) -> Result<WalLook> {
        let Some(file) = self.pin.open_wal()? else {
            return Ok(WalLook::default());
        };
        let size = file
            .metadata()
            .context(|| format!("{}: reading the WAL's size", self.name))?
            .len();
        let salt = WalReader::open(&file)?.map(|r| r.header().salt);
        Ok(WalLook { salt, size })
    }

    /// What the pin guarantees, judged right after it was taken.
    pub(super) fn pin_state_now(&self) -> Result<Pin> {
        let end = self.committed_end()?;
        let tip_end = self.tip.as_ref().and_then(|t| t.wal);
        Ok(match (end, tip_end) {
            (Some(now), Some(tip)) if now.salt == tip.salt && now.end == tip.end => Pin::Guarding,
            (Some(now), _) => Pin::Behind(Some((now.salt, now.end.offset))),
            (None, _) => Pin::Behind(None),
        })
    }

    /// The tip reached `offset` in the WAL with `header`: a pin that was behind may now
    /// guard.
    pub(super) fn note_reached(&mut self, header: &WalHeader, offset: u64) {
        if let Pin::Behind(Some((salt, end))) = self.pin_state {
            if salt == header.salt && offset >= end {
                self.pin_state = Pin::Guarding;
            }
        }
    }

    /// Whether every commit in the WAL, which ends at `end` ([`Replica::committed_end`]),
    /// has been read: there is no WAL, it holds no commit, or its last commit is where the
    /// tip is.
    pub(super) fn all_read(&self, end: Option<WalMark>) -> bool {
        let tip = self.tip.as_ref().and_then(|t| t.wal);
        match end {
            None => true,
            Some(now) if now.end.offset == HEADER_SIZE => true,
            Some(now) => tip.is_some_and(|tip| tip.salt == now.salt && tip.end == now.end),
        }
    }

    /// Where the committed part of the WAL ends right now (under the barrier, or after
    /// pinning).
    pub(super) fn committed_end(&self) -> Result<Option<WalMark>> {
        self.committed_end_after(None)
    }

    /// [`Replica::committed_end`], scanning only from `known` on if the WAL still holds it
    /// (a place found a moment earlier): under the barrier, reading a large WAL from the
    /// top would keep the application waiting.
    pub(super) fn committed_end_after(&self, known: Option<WalMark>) -> Result<Option<WalMark>> {
        let Some(file) = self.pin.open_wal()? else {
            return Ok(None);
        };
        let Some(mut reader) = WalReader::open(&file)? else {
            return Ok(None);
        };
        let header: WalHeader = *reader.header();
        let mut end = WalPosition {
            offset: HEADER_SIZE,
            checksum: header.checksum,
        };
        if let Some(known) = known {
            if known.salt == header.salt && reader.still_holds(known.end)? {
                reader.seek(known.end);
                end = known.end;
            }
        }
        let end = reader.find_last_commit()?.unwrap_or(end);
        Ok(Some(mark(&header, end)))
    }
}

/// Open the pin's connection (retrying if the path is replaced meanwhile) and pin the WAL.
/// The control connection is opened when first needed ([`open_control`]): a database
/// that needs neither a barrier nor a checkpoint, as on a restart with nothing new, never
/// holds a second connection (whose descriptor SQLite would keep, see
/// [`Database::close_in_place`]).
pub(super) fn open_pin(path: &Path) -> Result<(Database, FileIdentity)> {
    for _ in 0..3 {
        let before = FileIdentity::of(path);
        // Says clearly why a path is unusable (missing, not a database, not in WAL mode).
        let pin = Database::open(path)?;
        let before = before?;
        pin.pin()?;
        let after = FileIdentity::of(path)?;
        if before.same_file(&after) {
            return Ok((pin, after));
        }
    }
    Err(Error::invalid(format!(
        "{} keeps being replaced while walsync opens it",
        path.display()
    )))
}

/// The control connection in `slot`, opened first if the database rested since. It must be
/// on the file the pin holds: if another file was renamed into the database's place
/// meanwhile this fails, and the next step follows the new file (a new generation).
pub(super) fn open_control<'a>(
    slot: &'a mut Option<Database>,
    pin: &Database,
    opened: &FileIdentity,
    name: &str,
) -> Result<&'a mut Database> {
    let control = match slot.take() {
        Some(control) => control,
        None => {
            let control = pin.reopen()?;
            if !FileIdentity::of(pin.path())?.same_file(opened) {
                return Err(Error::new(
                    ErrorKind::Transient,
                    format!(
                        "{name}: {} was replaced by another file; following it on the next step",
                        pin.path().display()
                    ),
                ));
            }
            control
        }
    };
    Ok(slot.insert(control))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;

    use super::*;
    use crate::database::Checkpoint;
    use crate::replica::testing::{insert_rows, restored_and_source_rows, setup, write_now};
    use crate::replica::SyncOutcome;
    use crate::storage::file::FileStorage;
    use crate::storage::Storage;
    use std::sync::Arc;

    /// The application's PASSIVE checkpoint: (frames in the WAL, frames copied).
    fn app_checkpoint(app: &Connection) -> (i64, i64) {
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .unwrap()
    }

    /// After a complete checkpoint the pin sits on read mark 0, where no checkpoint can copy
    /// anything (the application's automatic ones then sort the whole WAL for nothing after
    /// every commit). Once the WAL restarted, the pin moves to a read mark above 0: the
    /// application's checkpoint copies again, up to the pin and no further, so the WAL
    /// cannot restart over what walsync has not read, and a restore has every row.
    #[test]
    fn the_pin_leaves_read_mark_zero_once_the_wal_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        insert_rows(&app, 50, "randomblob(1000)");
        replica.poll().unwrap();
        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Complete);
        assert!(!replica.follow_restart().unwrap(), "nothing written yet");

        insert_rows(&app, 50, "randomblob(1000)"); // restarts the WAL
        let (frames, copied) = app_checkpoint(&app);
        assert!(frames > 0);
        assert_eq!(copied, 0, "the pin on read mark 0 lets nothing be copied");

        assert!(replica.follow_restart().unwrap());
        assert!(!replica.follow_restart().unwrap(), "handed off once");
        assert!(replica.pin.in_transaction());
        let (frames, copied) = app_checkpoint(&app);
        assert!(
            copied > 0 && copied == frames,
            "the application's checkpoint copies up to the pin: {copied} of {frames}"
        );
        // Past the pin nothing is copied, so the WAL cannot restart over unread commits.
        insert_rows(&app, 50, "randomblob(1000)");
        let (frames_after, copied_after) = app_checkpoint(&app);
        assert_eq!(copied_after, copied);
        assert!(frames_after > frames);
        let wal = std::fs::read(dir.path().join("app.db-wal")).unwrap();
        assert!(app.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").is_ok());
        assert_eq!(
            std::fs::read(dir.path().join("app.db-wal")).unwrap()[..32],
            wal[..32],
            "the WAL restarted under the pin"
        );
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (151, 151));
    }

    /// The hand-off also covers the pin walsync takes on a database with no WAL (where
    /// it starts on read mark 0 too), and many hand-offs and checkpoints against an
    /// application that checkpoints (TRUNCATE) after every commit lose nothing.
    #[test]
    fn handing_the_pin_off_loses_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x);")
            .unwrap();
        drop(app); // the last connection: the WAL is checkpointed and deleted
        assert!(!dir.path().join("app.db-wal").exists());
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
        let mut replica = Replica::open(&path, storage, "app").unwrap();
        replica.sync().unwrap();
        let app = Connection::open(&path).unwrap();
        app.busy_timeout(Duration::ZERO).unwrap();
        insert_rows(&app, 10, "randomblob(1000)");
        assert!(replica.follow_restart().unwrap());
        let (_, copied) = app_checkpoint(&app);
        assert!(copied > 0, "still on read mark 0");
        let mut rows = 10;
        for round in 0..40 {
            insert_rows(&app, 7, "randomblob(1000)");
            rows += 7;
            // Busy while walsync holds the WAL; never an error that loses anything.
            let _ = app.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            replica.follow_restart().unwrap();
            if round % 3 == 0 {
                replica.poll().unwrap();
            }
            if round % 7 == 0 {
                replica.checkpoint().unwrap();
            }
        }
        replica.sync().unwrap();
        assert_eq!(restored_and_source_rows(dir.path()), (rows, rows));
    }

    #[test]
    fn the_barrier_is_released_when_the_work_under_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        let failed: Result<()> = replica.under_barrier(|r| {
            // What checkpoint() does under the barrier, failing half-way.
            r.pin.release()?;
            Err(Error::invalid("injected failure"))
        });
        assert!(failed.is_err());
        write_now(&app).expect("the write lock was left held");
        // The pin was lost on that path; the next step takes it again before anything else.
        assert!(!replica.pin.in_transaction());
        assert!(matches!(
            replica.poll().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        assert!(replica.pin.in_transaction());
    }

    /// The control connection opens again only on the file the pin holds: with another file
    /// renamed into place it refuses, and the next step follows the new file (and closes
    /// nothing it should not: the application's write lock stays free).
    #[test]
    fn a_rested_database_reopens_its_control_connection_only_on_the_pinned_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_app, mut replica) = setup(dir.path());
        replica.rest();
        let other = dir.path().join("other.db");
        let conn = Connection::open(&other).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (9);")
            .unwrap();
        drop(conn);
        std::fs::rename(&other, dir.path().join("app.db")).unwrap();

        let refused = open_control(
            &mut replica.control,
            &replica.pin,
            &replica.opened,
            &replica.name,
        );
        assert!(
            refused.is_err(),
            "opened the replacing file as the control connection"
        );
        assert!(replica.control.is_none());

        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Skipped);
        let replaced = FileIdentity::of(&dir.path().join("app.db")).unwrap();
        assert!(replica.opened.same_file(&replaced));
        let app = Connection::open(dir.path().join("app.db")).unwrap();
        write_now(&app).expect("the write lock was left held");
    }
}
