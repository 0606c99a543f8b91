//! walsync's own checkpoints, only over frames it has staged (see "Checkpoints" in the
//! [`crate::replica`] docs): the bulk copied outside the barrier while the pin keeps the
//! WAL from restarting, the rest under it, then a fresh pin so the next writer restarts
//! the WAL from the top; and a WAL file left large truncated while the pin is held.

use std::time::Duration;

use super::pin::{open_control, Pin};
use super::staging::{Cut, OUTSIDE_ROUNDS, SMALL_CUT_FRAMES};
use super::Replica;
use crate::database::Checkpoint;
use crate::database::Database;
use crate::error::{Context, Result};
use crate::files::FileIdentity;
use crate::wal::{self, FRAME_HEADER_SIZE, HEADER_SIZE};

impl Replica {
    /// Whether a checkpoint is worth its barrier: at least `frames` frames read since
    /// walsync's last complete checkpoint, or a WAL file of at least the size limit with
    /// frames to copy or (once it has restarted) a dead tail to cut.
    pub(crate) fn checkpoint_due(&self, frames: u64) -> bool {
        let Some((tip, mark)) = self.tip.as_ref().and_then(|t| Some((t, t.wal?))) else {
            return false;
        };
        let frame_size = FRAME_HEADER_SIZE + u64::from(tip.page_size);
        let from = match self.backfilled {
            Some((salt, offset)) if salt == mark.salt => offset,
            _ => HEADER_SIZE,
        };
        let unbackfilled = mark.end.offset.saturating_sub(from) / frame_size;
        let file_size = std::fs::metadata(self.pin.wal_path()).map_or(0, |m| m.len());
        let large = file_size >= self.wal_size_limit;
        unbackfilled >= frames
            || (large && (unbackfilled > 0 || file_size > mark.end.offset + frame_size))
    }

    /// Whether the WAL holds `frames` frames or more that walsync has not read (counted from
    /// the top if the WAL restarted since the tip). A hint read from two frame headers, for
    /// the thread to read and checkpoint at once rather than at its next `--min-interval`:
    /// a WAL that outgrows what SQLite lets it hold between its own checkpoints makes the
    /// application's commits write past the end of the file, which costs each commit's fsync
    /// (measured, see "Checkpoints" in the [`crate::replica`] docs).
    pub(crate) fn wal_outgrew_tip(&self, frames: u64) -> Result<bool> {
        let Some(tip) = self.tip.as_ref() else {
            return Ok(false);
        };
        let Some(file) = self.pin.open_wal()? else {
            return Ok(false);
        };
        let Some(salt) = wal::header_salts(&file)? else {
            return Ok(false);
        };
        let read_to = match tip.wal {
            Some(mark) if mark.salt == salt => mark.end.offset,
            _ => HEADER_SIZE,
        };
        let frame_size = FRAME_HEADER_SIZE + u64::from(tip.page_size);
        let last = read_to + frames.saturating_sub(1) * frame_size;
        Ok(frames > 0 && wal::frame_salts_at(&file, last)? == Some(salt))
    }

    /// Checkpoint the WAL over what is staged (see this module's docs).
    pub(crate) fn checkpoint(&mut self) -> Result<Checkpoint> {
        self.prepare()?;
        if self.tip.is_none() {
            return Ok(Checkpoint::Skipped);
        }
        if self.pin_state != Pin::Guarding {
            // Unread commits may predate the pin: read them, and only the barrier can move
            // it so that it guards.
            if !self.cut_small()? {
                return Ok(Checkpoint::Skipped);
            }
            let cut = self.under_barrier(|r| r.cut_rest_and_repin())?;
            self.persist()?;
            if matches!(cut, Cut::Broken(_) | Cut::Held) {
                return Ok(Checkpoint::Skipped);
            }
        }
        // The bulk of the copy while the application goes on writing, in rounds: move the
        // pin to the present (handed off, no barrier needed: see `hand_off_pin`) and copy
        // up to it, until a round finds little to copy. Then read what committed meanwhile,
        // also in rounds, so that the barrier below covers only the commits of a moment,
        // not of the whole time the bulk took (measured: with one round of each, a writer
        // producing 100 MB of WAL a second left 6,500 frames for the barrier to read, and
        // the write lock was held 107 ms).
        let mut copied_before = None;
        for _ in 0..OUTSIDE_ROUNDS {
            // A pin handed off in the last round (or by `follow_restart`) moves on only once
            // what it sees is read and saved (see `hand_off_pin`).
            if self.pin_ahead {
                if matches!(self.cut()?, Cut::Broken(_) | Cut::Held) {
                    return Ok(Checkpoint::Skipped);
                }
                self.persist()?;
            }
            if !self.hand_off_pin()? {
                return Ok(Checkpoint::Skipped);
            }
            let copied = self.copy_to_pin()?;
            let fresh = copied_before.map_or(copied, |before| copied.saturating_sub(before));
            copied_before = Some(copied);
            if fresh <= SMALL_CUT_FRAMES {
                break;
            }
        }
        // Then, still outside: read what committed meanwhile, copy up to there too, write
        // what all the rounds copied to disk (see `sync_files`), and read once more what
        // committed during that. The barrier below then reads only what commits during
        // the last cut, and copies only what committed since the last copy. (Measured, a
        // writer of 100 MiB in 100-row transactions as fast as it can, whose rounds never
        // catch up: without the last copy the barrier copied every frame the cuts after
        // the rounds had read, 1,814 where its own cut read 457, and without the last cuts
        // it read all that committed during the sync, some 40 ms. The write lock was held
        // 61-90 ms in all per run, the longest hold 35-52 ms; with both, 24-52 ms in all,
        // the longest 14-39 ms: four runs each.)
        if !self.cut_small()? {
            return Ok(Checkpoint::Skipped);
        }
        if self.hand_off_pin()? {
            self.copy_to_pin()?;
        }
        self.pin.sync_files()?;
        // This cut and the barrier's write what they read uncompressed, in a third of the
        // time (see `gzip::Stored`); `persist` compresses them after the barrier. And this
        // one is not saved before the barrier (as the barrier's own cut is not): the time
        // between the two is what the barrier's cut has to read. (Measured, a writer of
        // 100 MiB in 100-row transactions, medians of 8 interleaved runs: the write lock
        // held 35 ms in all per run before, 15.5 ms so; the writer slept 47.5 ms in its busy
        // handler before, 19 ms so.)
        if matches!(self.cut_as(true)?, Cut::Broken(_) | Cut::Held) {
            self.persist()?;
            return Ok(Checkpoint::Skipped);
        }
        // What committed meanwhile, then a fresh pin so the next writer can restart the WAL.
        let barrier = self.under_barrier(|r| {
            let cut = r.cut_as(true)?;
            if matches!(cut, Cut::Broken(_) | Cut::Held) {
                return Ok((cut, false));
            }
            r.pin.release()?;
            let copied = run_checkpoint_under_barrier(&r.name, &r.pin);
            r.pin.pin()?;
            r.pin_state = Pin::Guarding;
            r.pinned_at = Some(r.wal_look()?);
            let (complete, _) = copied?;
            if complete {
                r.note_backfilled()?;
            }
            Ok((cut, complete))
        });
        // Saved even if the barrier failed (the write lock not had, say): the cut before it
        // is not saved yet, and nothing cut may stay unsaved until the next step.
        let saved = self.persist();
        let (cut, complete) = barrier?;
        saved?;
        if complete {
            self.truncate_if_large()?;
        }
        Ok(match cut {
            Cut::Broken(_) | Cut::Held => Checkpoint::Skipped,
            _ if complete => Checkpoint::Complete,
            _ => Checkpoint::Partial,
        })
    }

    /// Copy the WAL into the database file up to the pin, outside the barrier. Returns how
    /// many frames of the WAL are in the database file.
    fn copy_to_pin(&mut self) -> Result<u64> {
        let control = open_control(&mut self.control, &self.pin, &self.opened, &self.name)?;
        Ok(run_checkpoint(&self.name, control)?.1)
    }

    /// [`Replica::cut_until_small`]; false if the WAL could not be cut (broken, or staging
    /// full), when no barrier may follow.
    fn cut_small(&mut self) -> Result<bool> {
        Ok(!matches!(
            self.cut_until_small()?,
            Cut::Broken(_) | Cut::Held
        ))
    }

    /// Under the barrier, after a complete checkpoint: remember it.
    pub(super) fn note_backfilled(&mut self) -> Result<()> {
        let identity = FileIdentity::of(self.pin.path())?;
        if let Some(tip) = self.tip.as_mut() {
            self.backfilled = tip.wal.map(|m| (m.salt, m.end.offset));
            tip.db = identity;
            self.tip_changed = true;
        }
        Ok(())
    }

    /// After a complete checkpoint, outside the barrier: give a WAL file grown past the size
    /// limit back to the filesystem with SQLite's own TRUNCATE checkpoint. The pin stays
    /// held, which makes this safe: SQLite truncates only a WAL whose every frame is in the
    /// database file and that no reader uses, and a commit that slipped in since the barrier
    /// is one it cannot copy past the pin, so it reports busy and leaves the WAL alone. It
    /// does not wait (busy timeout 0): it must not hold the application's write lock while
    /// waiting for the application's readers.
    pub(super) fn truncate_if_large(&mut self) -> Result<()> {
        let size = std::fs::metadata(self.pin.wal_path()).map_or(0, |m| m.len());
        if size < self.wal_size_limit {
            return Ok(());
        }
        self.alone = false;
        let control = open_control(&mut self.control, &self.pin, &self.opened, &self.name)?;
        let conn = control.connection()?;
        conn.busy_timeout(Duration::ZERO)?;
        let result: rusqlite::Result<i64> =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
        control.restore_busy_timeout()?;
        let busy = result.context(|| format!("{}: truncating the WAL", self.name))?;
        if busy == 0 {
            log::info!("{}: truncated the {} MiB WAL file", self.name, size >> 20);
        } else {
            log::debug!("{}: the WAL is in use; not truncated this time", self.name);
        }
        Ok(())
    }
}

/// How many times [`run_checkpoint_under_barrier`] tries, [`BARRIER_CHECKPOINT_GAP`] apart.
const BARRIER_CHECKPOINT_TRIES: u32 = 4;

/// See [`BARRIER_CHECKPOINT_TRIES`].
const BARRIER_CHECKPOINT_GAP: Duration = Duration::from_micros(250);

/// [`run_checkpoint`] under the barrier, tried again for a moment while it stops short.
///
/// Nothing commits under the barrier, so a checkpoint that stops short was held back by a
/// reader on an older read mark. Seen: 2 runs in 9 of 60 MiB in 10-row transactions had
/// one checkpoint short by the last commit's 5 frames, and, counted as partial, it was not
/// tried again for 10 s while the writer grew the WAL to 39-62 MiB. The likely reader (not
/// proven) is a moment's: an application waiting for the write lock takes a read lock each
/// time it tries for it, and lets it go when the try fails. A reader that stays (a long
/// read transaction) costs this at most a millisecond. (Unlike [`run_checkpoint`]'s own
/// tries, which are for a checkpoint that did nothing because another one was running.)
fn run_checkpoint_under_barrier(name: &str, conn: &Database) -> Result<(bool, u64)> {
    let mut tries = 1;
    loop {
        let (complete, copied) = run_checkpoint(name, conn)?;
        if complete || tries >= BARRIER_CHECKPOINT_TRIES {
            if tries > 1 {
                log::debug!(
                    "{name}: checkpoint under the barrier: try {tries}, complete: {complete}"
                );
            }
            return Ok((complete, copied));
        }
        tries += 1;
        std::thread::sleep(BARRIER_CHECKPOINT_GAP);
    }
}

/// How many times [`run_checkpoint`] tries when another connection's checkpoint is running,
/// 1 ms apart.
const CHECKPOINT_LOCK_TRIES: u32 = 20;

/// Run a PASSIVE checkpoint on `conn` (which must not be in a transaction: SQLite refuses
/// to checkpoint inside one). Returns whether every frame was copied, and how many frames
/// of the WAL are in the database file now.
///
/// Only one checkpoint runs at a time. An application with automatic checkpoints on runs
/// one after each of its commits once the WAL holds 1000 frames, and a PASSIVE checkpoint
/// that finds one running does nothing at all (SQLite reports -1 frames): so it is tried
/// again for a moment. (Counted as partial, it waited 10 s for the next try, and a writer
/// that never pauses grew the WAL to 90 MiB meanwhile.) Under the barrier the application
/// can start no new one.
pub(super) fn run_checkpoint(name: &str, conn: &Database) -> Result<(bool, u64)> {
    let mut tries = 0;
    let (busy, log_frames, copied) = loop {
        let (busy, log_frames, copied): (i64, i64, i64) = conn
            .connection()?
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .context(|| format!("{name}: checkpoint"))?;
        tries += 1;
        if log_frames >= 0 || tries >= CHECKPOINT_LOCK_TRIES {
            break (busy, log_frames, copied);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    log::debug!("{name}: checkpoint: busy={busy} log={log_frames} copied={copied}");
    Ok((
        busy == 0 && log_frames == copied,
        u64::try_from(copied).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::testing::{insert_rows, restored_and_source_rows, setup, write_now};
    use crate::replica::SyncOutcome;

    #[test]
    fn a_checkpoint_that_fails_leaves_neither_the_barrier_nor_an_unpinned_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        app.execute_batch("INSERT INTO t VALUES (3);").unwrap();
        // Staging into an unusable sidecar fails in the first cut of the checkpoint.
        let sidecar = replica.sidecar.dir().to_path_buf();
        let moved = dir.path().join("moved-away");
        std::fs::rename(&sidecar, &moved).unwrap();
        assert!(replica.checkpoint().is_err());
        write_now(&app).expect("the write lock was left held");
        assert!(replica.pin.in_transaction(), "the WAL was left unpinned");
        std::fs::rename(&moved, &sidecar).unwrap();
        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Complete);
        write_now(&app).unwrap();
        assert!(matches!(
            replica.poll().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
    }

    /// How far the WAL outgrew the tip is read from frame headers: by nothing after a sync,
    /// by what a transaction wrote since, and after a complete checkpoint, from the top of
    /// the restarted WAL, whose old frames further on (other salts) do not count.
    #[test]
    fn the_wal_outgrows_the_tip_by_what_was_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        let insert = |rows: u32| insert_rows(&app, rows, "randomblob(3000)");
        assert!(!replica.wal_outgrew_tip(1).unwrap());
        insert(80); // a page a row, and a few more
        assert!(replica.wal_outgrew_tip(80).unwrap());
        assert!(!replica.wal_outgrew_tip(200).unwrap());
        assert!(!replica.wal_outgrew_tip(0).unwrap());
        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        assert!(!replica.wal_outgrew_tip(1).unwrap());
        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Complete);
        insert(20); // restarts the WAL: its first frames are new, those after are old
        assert!(replica.wal_outgrew_tip(20).unwrap());
        assert!(!replica.wal_outgrew_tip(60).unwrap());
    }

    /// A pin handed off to the present sees what the tip has not read. Once a checkpoint
    /// has copied that into the database file, a new pin would get read mark 0, which lets
    /// the next writer restart the WAL over those frames: so the pin is not handed off
    /// again before a cut reads them, and nothing is lost.
    #[test]
    fn a_pin_handed_off_moves_again_only_after_a_cut_reads_what_it_sees() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        insert_rows(&app, 80, "randomblob(3000)");
        assert!(replica.hand_off_pin().unwrap());
        let control = replica.control.as_ref().unwrap();
        let (complete, _) = run_checkpoint("app", control).unwrap();
        assert!(complete, "the 80 rows are in the database file");
        assert!(
            !replica.hand_off_pin().unwrap(),
            "handed off over unread frames"
        );
        // The writer cannot restart the WAL: the pin still holds a read mark above 0.
        app.execute_batch("INSERT INTO t VALUES (3);").unwrap();
        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        assert!(
            replica.hand_off_pin().unwrap(),
            "a cut read what the pin saw"
        );
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!(restored, source);
    }

    /// A database that rested (control connection closed, wal-index pages given back)
    /// checkpoints as before: the control connection opens again on the same file, the
    /// barrier is released, and a restore has every row.
    #[test]
    fn a_rested_database_checkpoints_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        replica.rest();
        assert!(replica.control.is_none());
        insert_rows(&app, 300, "randomblob(3000)");
        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        replica.rest();
        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Complete);
        assert!(replica.control.is_some());
        write_now(&app).expect("the write lock was left held");
        assert!(replica.pin.in_transaction(), "the WAL was left unpinned");
        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!(restored, source);
    }
}
