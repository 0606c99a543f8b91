//! Staging: the WAL cut into segments, and snapshots taken, each written to the sidecar
//! and counted by a saved tip before it may be uploaded (see "The tip, staging and
//! uploads" in the [`crate::replica`] docs).
//!
//! Cutting happens in rounds outside the barrier until a round finds little, so that the
//! barrier's own cut, which keeps the application from committing, covers only the
//! commits of a moment. Nothing cut counts until [`Replica::persist`] has fsynced it and
//! saved the tip: that is what lets walsync give the frames back to SQLite, and what keeps
//! the bucket from ever holding an object the sidecar does not account for.

use std::collections::VecDeque;
use std::time::Instant;

use super::continuity::Continuity;
use super::pin::Pin;
use super::position::{mark, Position};
use super::Replica;
use crate::error::{Context, Result};
use crate::files::FileIdentity;
use crate::layout::{ObjectKind, ObjectName};
use crate::segment;
use crate::sidecar::{Sidecar, Staged};
use crate::snapshot;
use crate::wal::WalReader;

/// Cuts (and a checkpoint's copies) outside the barrier go on, up to [`OUTSIDE_ROUNDS`]
/// of them, until one finds at most this many frames, so that what the barrier reads and
/// copies after them is small.
pub(super) const SMALL_CUT_FRAMES: u64 = 256;

/// At most this many rounds of cutting, and of copying, before a barrier.
pub(super) const OUTSIDE_ROUNDS: usize = 4;

/// What cutting the WAL found.
pub(super) enum Cut {
    /// Nothing committed since the tip.
    Idle,
    /// A segment was staged (not yet saved: see [`Replica::persist`]).
    Staged { key: String, frames: u64 },
    /// Staging is full; the WAL is left alone until uploads catch up.
    Held,
    /// Continuity is lost, for this reason: a new generation must start.
    Broken(String),
}

impl Replica {
    /// Under the barrier: cut the last commits and move the pin to the present, so that it
    /// guards. (Nothing commits meanwhile.)
    pub(super) fn cut_rest_and_repin(&mut self) -> Result<Cut> {
        if !FileIdentity::of(self.pin.path())?.same_file(&self.opened) {
            return Ok(Cut::Broken("the database file was replaced".into()));
        }
        let cut = self.cut()?;
        if matches!(cut, Cut::Idle | Cut::Staged { .. }) {
            self.repin()?;
            self.pin_state = Pin::Guarding;
        }
        Ok(cut)
    }

    /// Cut the committed frames after the tip into a staged segment.
    pub(super) fn cut(&mut self) -> Result<Cut> {
        self.cut_as(false)
    }

    /// [`Replica::cut`], writing the segment uncompressed if `stored` (under the barrier:
    /// see [`crate::gzip::Stored`]); [`Replica::persist`] compresses it before counting it.
    pub(super) fn cut_as(&mut self, stored: bool) -> Result<Cut> {
        let Some(tip) = self.tip.clone() else {
            return Ok(Cut::Broken("no generation yet".into()));
        };
        if let Some(reason) = &self.lost {
            return Ok(Cut::Broken(reason.clone()));
        }
        let staged = self.staged_bytes();
        if staged >= self.staging_limit {
            if !self.said_full {
                log::warn!(
                    "{}: {} MiB staged and not yet stored (limit {} MiB): the WAL stays pinned \
                     and grows until uploads catch up",
                    self.name,
                    staged >> 20,
                    self.staging_limit >> 20
                );
                self.said_full = true;
            }
            return Ok(Cut::Held);
        }
        self.said_full = false;
        // Taken before reading: everything committed by now is read below.
        let identity = FileIdentity::of(self.pin.path())?;
        let wal = self.pin.open_wal()?;
        let mut reader = match &wal {
            Some(file) => WalReader::open(file)?,
            None => None,
        };
        let start = match self.continuity(&tip, reader.as_ref(), &identity)? {
            Continuity::Lost(reason) => return Ok(Cut::Broken(reason)),
            Continuity::NoWal => {
                self.pin_ahead = false;
                return Ok(Cut::Idle);
            }
            Continuity::From(start) => start,
        };
        let Some(reader) = reader.as_mut() else {
            self.pin_ahead = false;
            return Ok(Cut::Idle);
        };
        reader.seek(start);
        let header = *reader.header();
        // From here every commit up to this moment is read, so a pin handed off before it
        // no longer sees anything unread (see `Replica::hand_off_pin`).
        if !reader.may_hold_frame()? {
            self.note_reached(&header, start.offset);
            self.pin_ahead = false;
            return Ok(Cut::Idle);
        }
        let draft = self.sidecar.draft()?;
        let segment = match segment::cut(reader, tip.chain, &draft.file, stored) {
            Ok(Some(segment)) => segment,
            Ok(None) => {
                // Frames of a transaction not committed yet; the draft is removed on drop.
                self.note_reached(&header, start.offset);
                self.pin_ahead = false;
                return Ok(Cut::Idle);
            }
            Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => {
                return Ok(Cut::Broken(format!(
                    "the WAL changed while it was read: {e}"
                )))
            }
            Err(e) => return Err(e.with_context(format!("{}: cutting a segment", self.name))),
        };
        let end = segment.end;
        // Taken once the segment's last frame has been read: every commit in it happened
        // before this moment, so a point-in-time restore to it never includes a later
        // transaction. (The cut reads as far as the WAL has commits, so not before.)
        let object = ObjectName {
            kind: ObjectKind::Segment,
            generation: tip.generation.clone(),
            index: tip.index + 1,
            time: self.next_time(&tip),
        };
        let mut staged = self.sidecar.stage(draft, tip.seq + 1, &object, false)?;
        staged.uncompressed = stored;
        let key = object.key(&self.name);
        log::debug!("{}: cut {key} ({} frames)", self.name, segment.frames);
        self.tip = Some(Position {
            index: object.index,
            chain: segment.chain,
            time_ms: object.time.millis(),
            seq: staged.seq,
            wal: Some(mark(&header, end)),
            db: identity,
            proof: None,
            ..tip
        });
        self.note_reached(&header, end.offset);
        self.pin_ahead = false;
        self.last_read = Instant::now();
        self.unsynced.push(staged.clone());
        self.staged.push_back(staged);
        Ok(Cut::Staged {
            key,
            frames: segment.frames,
        })
    }

    /// Cut outside the barrier until a cut finds little (at most [`SMALL_CUT_FRAMES`]) or
    /// after [`OUTSIDE_ROUNDS`] cuts, so that a barrier's own cut that follows covers only
    /// what committed during the last one. Returns the last cut (the first that is broken
    /// or held).
    pub(super) fn cut_until_small(&mut self) -> Result<Cut> {
        let mut last = Cut::Idle;
        for _ in 0..OUTSIDE_ROUNDS {
            let cut = self.cut()?;
            self.persist()?;
            let frames = match &cut {
                Cut::Staged { frames, .. } => *frames,
                Cut::Idle => 0,
                Cut::Held | Cut::Broken(_) => return Ok(cut),
            };
            last = cut;
            if frames <= SMALL_CUT_FRAMES {
                break;
            }
        }
        Ok(last)
    }

    /// Copy the pinned database into a staged snapshot at `tip` (the position the pin sees:
    /// the current tip, or a new generation's base), and count it.
    pub(super) fn stage_snapshot(&mut self, mut tip: Position) -> Result<String> {
        let draft = self.sidecar.draft()?;
        let scratch = self.sidecar.scratch_database();
        let db_size = snapshot::take(&self.pin, scratch, tip.chain, &draft.file, &*self.progress)
            .context(|| format!("{}: taking a snapshot", self.name))?;
        self.release_memory();
        let object = ObjectName {
            kind: ObjectKind::Snapshot,
            generation: tip.generation.clone(),
            index: tip.index,
            time: self.next_time(&tip),
        };
        let staged = self.sidecar.stage(draft, self.next_seq(), &object, true)?;
        let key = object.key(&self.name);
        log::debug!(
            "{}: snapshot {key} ({db_size} bytes uncompressed)",
            self.name
        );
        tip.seq = staged.seq;
        tip.time_ms = object.time.millis();
        self.last_read = Instant::now();
        // Only now: a generation without its base snapshot must never get segments.
        self.tip = Some(tip);
        self.staged.push_back(staged);
        self.persist()?;
        Ok(key)
    }

    /// Make every staged object durable and save the tip. Until this succeeds nothing past
    /// the previously saved tip is uploaded, and each step retries it first.
    pub(super) fn persist(&mut self) -> Result<()> {
        self.compress_stored().map_err(|e| {
            e.with_context(format!(
                "{}: nothing more is uploaded until it can be saved",
                self.name
            ))
        })?;
        let Some(tip) = &self.tip else {
            return Ok(());
        };
        if tip.seq == self.saved_seq && self.unsynced.is_empty() && !self.tip_changed {
            return Ok(());
        }
        let what = || {
            format!(
                "{}: saving the replication position in {} (nothing more is uploaded until \
                 it can be saved)",
                self.name,
                self.sidecar.dir().display()
            )
        };
        for staged in &self.unsynced {
            self.sidecar
                .sync(staged)
                .map_err(|e| e.with_context(what()))?;
        }
        self.unsynced.clear();
        self.sidecar
            .save_position(tip)
            .map_err(|e| e.with_context(what()))?;
        self.saved_seq = tip.seq;
        self.tip_changed = false;
        Ok(())
    }

    /// Compress the segments cut uncompressed under the barrier (see
    /// [`crate::gzip::Stored`]), each into a new file put in its place, before
    /// [`Replica::persist`] counts them (they are all among the unsynced). One that fails
    /// stays uncompressed and uncounted, for the next persist.
    fn compress_stored(&mut self) -> Result<()> {
        for i in 0..self.unsynced.len() {
            if !self.unsynced[i].uncompressed {
                continue;
            }
            let staged = &self.unsynced[i];
            let draft = self.sidecar.draft()?;
            let from = std::fs::File::open(&staged.path)
                .context(|| format!("reading {}", staged.path.display()))?;
            crate::gzip::recompress(&from, &draft.file)
                .map_err(|e| e.with_context(staged.path.display().to_string()))?;
            // Staged again under its own number and name: the same path, the new file.
            let bytes = self
                .sidecar
                .stage(draft, staged.seq, &staged.object, false)?
                .bytes;
            let seq = staged.seq;
            for staged in self.staged.iter_mut().chain(self.unsynced.iter_mut()) {
                if staged.seq == seq {
                    staged.bytes = bytes;
                    staged.uncompressed = false;
                }
            }
        }
        Ok(())
    }
}

/// The objects an earlier run staged and counted, in order, the highest staging number of
/// any file found, and the numbers of uncounted files that could not be removed.
///
/// A file numbered past the saved tip was written by a run killed before it saved the tip
/// that would count it: the WAL still holds those frames (or continuity is lost), so they
/// are cut again and the file is removed. If it cannot be removed (the sidecar is read-only
/// for now), its number is kept in the tip's `leftovers`, so that it is never taken for a
/// counted object, and removal is tried again at the next start.
pub(super) fn pick_up_staged(
    sidecar: &Sidecar,
    name: &str,
    tip: Option<&Position>,
) -> Result<(VecDeque<Staged>, u64, Vec<u64>)> {
    let found = sidecar.staged()?;
    let seq_floor = found.iter().map(|s| s.seq).max().unwrap_or(0);
    let saved_seq = tip.as_ref().map_or(0, |t| t.seq);
    let mut leftovers: Vec<u64> = Vec::new();
    let mut staged = VecDeque::new();
    for object in found {
        let leftover = tip
            .as_ref()
            .is_some_and(|t| t.leftovers.contains(&object.seq));
        if tip.is_some() && object.seq <= saved_seq && !leftover {
            staged.push_back(object);
            continue;
        }
        log::debug!("{name}: removing uncounted {}", object.path.display());
        if let Err(e) = sidecar.remove(&object) {
            log::warn!("{name}: {e}; it is left alone and never uploaded");
            leftovers.push(object.seq);
        }
    }
    if !staged.is_empty() {
        log::info!(
            "{name}: {} objects staged by an earlier run will be uploaded first",
            staged.len()
        );
    }
    Ok((staged, seq_floor, leftovers))
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::replica::testing::{insert_rows, restored_and_source_rows, setup};
    use crate::replica::SyncOutcome;

    /// A cut written uncompressed (as under the barrier) is compressed before it counts:
    /// once saved, the staged file holds deflated blocks, not stored ones, and is smaller;
    /// and what it holds restores.
    #[test]
    fn a_cut_written_uncompressed_is_compressed_before_it_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        insert_rows(&app, 200, "printf('%.2000c', 'x') || i");
        assert!(matches!(
            replica.cut_as(true).unwrap(),
            super::Cut::Staged { .. }
        ));
        let staged = replica.unsynced.last().unwrap().clone();
        assert!(staged.uncompressed);
        // The first deflate block's type, bits 1-2 of the byte after the 10-byte header:
        // 0 is a stored block.
        let block_type = |path: &std::path::Path| (std::fs::read(path).unwrap()[10] >> 1) & 3;
        assert_eq!(block_type(&staged.path), 0);
        let uncompressed = std::fs::metadata(&staged.path).unwrap().len();

        replica.persist().unwrap();
        let saved = replica.staged.iter().find(|s| s.seq == staged.seq).unwrap();
        assert!(!saved.uncompressed);
        assert_ne!(block_type(&saved.path), 0, "still stored blocks once saved");
        let compressed = std::fs::metadata(&saved.path).unwrap().len();
        assert_eq!(saved.bytes, compressed);
        assert!(
            compressed * 4 < uncompressed,
            "{compressed} of {uncompressed} bytes"
        );

        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. } | SyncOutcome::Idle
        ));
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!(restored, source);
    }

    /// Transactions larger than a cut holds in memory (1 MiB): one committed, one still
    /// open with its frames already spilled into the WAL. Only the committed one ships;
    /// once the other commits it ships too, and a restore has both.
    #[test]
    fn transactions_larger_than_the_cut_buffer_ship_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        let insert = |conn: &Connection, n: u32| insert_rows(conn, n, "randomblob(3000)");
        insert(&app, 800); // about 3 MiB, committed
        let writer = Connection::open(dir.path().join("app.db")).unwrap();
        writer
            .execute_batch("PRAGMA cache_size=10; BEGIN;")
            .unwrap();
        insert(&writer, 800); // spills to the WAL, not committed
        let wal_len = std::fs::metadata(dir.path().join("app.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal_len > 5 * 1024 * 1024,
            "the open transaction did not spill: {wal_len}"
        );
        let SyncOutcome::Shipped { frames, .. } = replica.sync().unwrap() else {
            panic!("nothing shipped")
        };
        assert!(frames > 700 && frames < 1000, "{frames} frames");
        assert_eq!(replica.sync().unwrap(), SyncOutcome::Idle);
        writer.execute_batch("COMMIT").unwrap();
        assert!(matches!(
            replica.sync().unwrap(),
            SyncOutcome::Shipped { .. }
        ));
        assert_eq!(restored_and_source_rows(dir.path()), (1601, 1601));
    }
}
