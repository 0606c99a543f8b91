//! One database replicated to one destination: generations, positions, segments, snapshots
//! and checkpoints.
//!
//! # Positions
//!
//! A [`Replica`] knows two positions, each a generation, a segment index and an exact place
//! in the WAL (salts, byte offset and running checksum just after a commit frame):
//!
//! - the *tip*: how far it has cut the WAL into segments (queued for upload), and
//! - the *durable* position: how far those uploads have succeeded. Only this one is saved,
//!   in a small JSON file in a sidecar directory beside the database (`.app.db-walsync/`),
//!   after each upload, so a restart resumes exactly where storage ends.
//!
//! Uploads happen strictly in order, so the bucket never has a gap a restore would trip on.
//!
//! # Holding the WAL still
//!
//! The replica keeps a read transaction open (the *pin*, see [`crate::database`]). While it
//! is open SQLite cannot restart the WAL, so every frame walsync has not read yet stays in the
//! file. Checkpoints run by anyone may copy frames into the database file meanwhile; that is
//! harmless, the frames stay in the WAL too. The pin is only moved under the *barrier* (the
//! write lock), at moments when everything committed has been cut into segments.
//!
//! walsync checkpoints the WAL itself, only when every committed frame is durable: under the
//! barrier it ships what is left, then releases the pin and checkpoints. After a complete
//! checkpoint the next writer restarts the WAL with salt-1 and the checkpoint sequence both
//! one higher; the replica expects exactly that and carries on in the same generation.
//!
//! # Continuity
//!
//! Before cutting, the WAL must still be the one the tip describes: same salts and the same
//! frame at the tip's offset (or the one restart walsync caused). Anything else (the WAL
//! checkpointed and restarted while walsync was not holding it, the database file replaced,
//! the page size changed) means frames may be missing, so the replica starts a new
//! generation with a full snapshot and logs why.
//!
//! The sidecar also holds a lock file, so two walsync processes cannot replicate the same
//! database to the same destination at once and interleave their segments.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::database::{Database, FileIdentity};
use crate::error::{Context, Error, Result};
use crate::layout::{self, Generation, ObjectKind, ObjectName, ReplicaState};
use crate::segment;
use crate::snapshot;
use crate::storage::Storage;
use crate::utc::UtcTime;
use crate::wal::{WalHeader, WalPosition, WalReader, FRAME_HEADER_SIZE, HEADER_SIZE};

/// How far a replica has shipped: saved in the sidecar after every durable upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Position {
    destination: String,
    name: String,
    generation: String,
    /// Last segment in this generation (0: only the base snapshot).
    index: u64,
    page_size: u32,
    /// The WAL just after the last commit in a segment; `None` when the WAL had no valid
    /// header then (no frames at all).
    wal: Option<WalMark>,
    /// The database file as of that commit.
    db: FileIdentity,
}

/// A place in one particular WAL (identified by its salts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct WalMark {
    salt: [u32; 2],
    checkpoint_seq: u32,
    end: WalPosition,
    /// walsync itself checkpointed the whole WAL up to `end` with everything durable, so the
    /// next writer will restart the WAL: one restart is expected, not a loss of continuity.
    #[serde(default)]
    backfilled: bool,
}

/// An object cut and waiting to be uploaded, with the position it makes durable.
struct Pending {
    key: String,
    kind: ObjectKind,
    /// Taken by whoever uploads it.
    file: Option<File>,
    after: Position,
}

/// An upload for a worker: store `file` under `key`, then call [`Replica::upload_done`].
pub struct Upload {
    pub key: String,
    pub file: File,
}

/// What one call to [`Replica::sync`] or [`Replica::poll`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing new was committed.
    Idle,
    /// A segment was cut (and, for [`Replica::sync`], stored).
    Shipped { key: String, frames: u64 },
    /// A snapshot starting a new generation was taken (first run, or continuity was lost).
    NewGeneration { key: String, reason: String },
}

/// Which kind of checkpoint to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Copy frames into the database without blocking anyone; the WAL file keeps its size.
    Passive,
    /// Copy every frame and truncate the WAL file to zero bytes.
    Truncate,
}

impl CheckpointMode {
    fn sql(self) -> &'static str {
        match self {
            CheckpointMode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
            CheckpointMode::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
        }
    }
}

/// One database replicated to one destination.
pub struct Replica {
    /// Control connection: the barrier and checkpoints.
    db: Database,
    /// Holds the read transaction that pins the WAL.
    pin: Database,
    storage: Arc<dyn Storage>,
    name: String,
    sidecar: PathBuf,
    position_path: PathBuf,
    /// Records the newest generation this replica started, before its snapshot is
    /// uploaded (see [`Replica::claim_generation`]).
    claim_path: PathBuf,
    /// The generation in `claim_path`.
    claimed: Option<Generation>,
    durable: Option<Position>,
    tip: Option<Position>,
    pending: VecDeque<Pending>,
    /// The database file the connections have open.
    opened: FileIdentity,
    /// Held for the replica's lifetime: only one replicator per database and destination.
    _lock: File,
}

impl Replica {
    /// Open `db_path` for replication to `storage` under `name`, and pin its WAL.
    pub fn open(db_path: &Path, storage: Arc<dyn Storage>, name: &str) -> Result<Replica> {
        layout::validate_name(name)?;
        let db = Database::open(db_path)?;
        let sidecar = sidecar_dir(db_path)?;
        std::fs::create_dir_all(&sidecar)
            .context(|| format!("creating walsync's directory {}", sidecar.display()))?;
        let destination = storage.describe();
        let stem = format!("{name}-{:016x}", fnv1a(&format!("{destination}\n{name}")));
        let lock_path = sidecar.join(format!("{stem}.lock"));
        let lock = File::create(&lock_path)
            .context(|| format!("creating lock file {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            return Err(Error::invalid(format!(
                "another walsync is already replicating {} to {destination} as {name:?}",
                db_path.display()
            )));
        }
        let position_path = sidecar.join(format!("{stem}.json"));
        let claim_path = sidecar.join(format!("{stem}.generation"));
        let claimed = load_claim(&claim_path)?;
        let durable = load_position(&position_path)?
            .filter(|p| p.destination == destination && p.name == name);
        let pin = db.reopen()?;
        pin.pin()?;
        let opened = FileIdentity::of(db_path)?;
        // A newer generation was started but its snapshot never confirmed stored: it may be
        // in the bucket anyway, and a restore of the latest state would pick it over any
        // segment added to the older generation. Start yet another generation instead.
        let tip = durable.clone().filter(|p| {
            let newer_claim = claimed
                .as_ref()
                .is_some_and(|c| Generation::parse(&p.generation).is_none_or(|g| g < *c));
            if newer_claim {
                log::warn!(
                    "{name}: generation {} was started but not confirmed stored; a new \
                     generation will start",
                    claimed.as_ref().map_or_else(String::new, |c| c.to_string())
                );
            }
            !newer_claim
        });
        Ok(Replica {
            db,
            pin,
            opened,
            storage,
            name: name.to_string(),
            sidecar,
            position_path,
            claim_path,
            claimed,
            tip,
            durable,
            pending: VecDeque::new(),
            _lock: lock,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// The durable generation and last segment index, if any.
    pub fn generation(&self) -> Option<(Generation, u64)> {
        let p = self.durable.as_ref()?;
        Some((Generation::parse(&p.generation)?, p.index))
    }

    /// True when every object cut so far is durably stored.
    pub fn is_flushed(&self) -> bool {
        self.pending.is_empty()
    }

    /// The key of the last object queued and not yet stored.
    pub fn last_queued_key(&self) -> Option<String> {
        self.pending.back().map(|p| p.key.clone())
    }

    /// Frames in the WAL up to the tip that walsync has not checkpointed yet.
    pub fn wal_frames(&self) -> u64 {
        match self
            .tip
            .as_ref()
            .and_then(|p| p.wal.map(|m| (m, p.page_size)))
        {
            // Checkpointed by walsync; the next writer restarts the WAL.
            Some((mark, _)) if mark.backfilled => 0,
            Some((mark, page_size)) => {
                (mark.end.offset - HEADER_SIZE) / (FRAME_HEADER_SIZE + u64::from(page_size))
            }
            None => 0,
        }
    }

    /// Size of the WAL file on disk (0 if there is none).
    pub fn wal_file_size(&self) -> u64 {
        std::fs::metadata(self.db.wal_path()).map_or(0, |m| m.len())
    }

    /// Ship every transaction committed since the last call as one segment and wait for it
    /// to be stored. Starts a new generation with a snapshot when there is none yet or
    /// continuity is lost.
    pub fn sync(&mut self) -> Result<SyncOutcome> {
        let outcome = self.poll()?;
        self.flush()?;
        Ok(outcome)
    }

    /// Store a snapshot aligned to a segment boundary now and wait for it (and anything
    /// queued before it) to be stored. Returns the snapshot's key.
    pub fn snapshot(&mut self) -> Result<String> {
        let key = self.queue_snapshot()?;
        self.flush()?;
        Ok(key)
    }

    /// Cut what was committed since the tip into a segment queued for upload, or queue a new
    /// generation's snapshot when there is no generation or continuity is lost.
    pub fn poll(&mut self) -> Result<SyncOutcome> {
        self.follow_replacement()?;
        match self.cut_to_end()? {
            Ok(outcome) => Ok(outcome),
            Err(reason) => {
                let key = self.queue_new_generation(&reason)?;
                Ok(SyncOutcome::NewGeneration { key, reason })
            }
        }
    }

    /// The next object to upload, if none is being uploaded now. Uploads go one at a time,
    /// in order; report each with [`Replica::upload_done`].
    pub fn next_upload(&mut self) -> Option<Upload> {
        let front = self.pending.front_mut()?;
        let file = front.file.take()?;
        Some(Upload {
            key: front.key.clone(),
            file,
        })
    }

    /// An upload handed out by [`Replica::next_upload`] succeeded: its position is durable.
    /// Returns true when it was a snapshot, after which `state.json` is worth rewriting
    /// ([`Replica::state_object`]); the caller does that, so that a hundred databases do not
    /// all write at once.
    pub fn upload_done(&mut self, key: &str) -> Result<bool> {
        match self.pending.front() {
            Some(p) if p.key == key && p.file.is_none() => {}
            _ => {
                return Err(Error::invalid(format!(
                    "{}: upload of {key} finished out of order",
                    self.name
                )))
            }
        }
        let Some(done) = self.pending.pop_front() else {
            return Ok(false);
        };
        self.save_position(done.after)?;
        Ok(done.kind == ObjectKind::Snapshot)
    }

    /// An upload handed out by [`Replica::next_upload`] could not be completed (walsync is
    /// stopping): put it back so a later call can retry it.
    pub fn upload_returned(&mut self, upload: Upload) {
        if let Some(front) = self.pending.front_mut() {
            if front.key == upload.key {
                front.file = Some(upload.file);
            }
        }
    }

    /// Upload everything queued, in order, from this thread.
    pub fn flush(&mut self) -> Result<()> {
        while let Some(upload) = self.next_upload() {
            let stored = self
                .storage
                .put_file(&upload.key, &upload.file)
                .context(|| format!("{}: uploading {}", self.name, upload.key));
            if let Err(e) = stored {
                self.upload_returned(upload);
                return Err(e);
            }
            log::info!("{}: stored {}", self.name, upload.key);
            if self.upload_done(&upload.key)? {
                if let Err(e) = self.write_state() {
                    // Only `list` reads state.json; the snapshot itself is stored.
                    log::warn!("{}: {e}", self.name);
                }
            }
        }
        Ok(())
    }

    /// Queue a snapshot aligned to a segment boundary (and the segment before it, if
    /// anything is committed but not yet cut). Returns the snapshot's key.
    pub fn queue_snapshot(&mut self) -> Result<String> {
        // Cut what is there outside the barrier, so the barrier only covers a small rest.
        if let Err(reason) = self.cut_to_end()? {
            return self.queue_new_generation(&reason);
        }
        self.db.lock_writes()?;
        let cut = self.cut_to_end().and_then(|cut| {
            if cut.is_ok() {
                self.repin()?;
            }
            Ok(cut)
        });
        self.db.release()?;
        if let Err(reason) = cut? {
            return self.queue_new_generation(&reason);
        }
        // The pin now sees exactly what the tip's last segment ends with.
        let tip = self
            .tip
            .clone()
            .ok_or_else(|| Error::invalid("no generation"))?;
        let generation = Generation::parse(&tip.generation)
            .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
        self.queue_snapshot_object(generation, tip)
    }

    /// Checkpoint the WAL if every committed frame is durable. Returns `None` if it was not
    /// attempted (uploads are pending, or continuity is lost), else whether it copied every
    /// frame (readers of older snapshots can hold frames back).
    ///
    /// Under the barrier, what was committed since the last segment is cut and uploaded
    /// right away (writers wait for that one small upload), then the pin is released and
    /// the checkpoint runs on its connection. A PASSIVE checkpoint runs inside the barrier; a TRUNCATE
    /// checkpoint needs the write lock itself, so it runs just after, and
    /// `PRAGMA data_version` tells whether another connection committed in between.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> Result<Option<bool>> {
        if !self.pending.is_empty() {
            return Ok(None);
        }
        // Ship what is committed now, outside the barrier, so that what must be shipped while
        // writers wait is only what they commit during this one upload.
        if self.cut_to_end()?.is_err() {
            return Ok(None);
        }
        self.flush()?;
        self.db.lock_writes()?;
        let before = match self.ship_rest_under_barrier() {
            Ok(Some(v)) => v,
            Ok(None) => {
                self.db.release()?;
                return Ok(None);
            }
            Err(e) => {
                self.db.release()?;
                return Err(e);
            }
        };
        self.pin.release()?;
        let result = match mode {
            CheckpointMode::Passive => {
                let r = self.run_checkpoint(mode);
                self.pin.pin()?;
                self.db.release()?;
                r
            }
            CheckpointMode::Truncate => {
                self.db.release()?;
                let r = self.run_checkpoint(mode);
                self.pin.pin()?;
                r
            }
        };
        let (busy, log_frames, checkpointed) = result?;
        let slipped = self.data_version()? != before;
        if slipped {
            // A commit landed between the barrier and the checkpoint and may have been
            // checkpointed out of the WAL before walsync read it.
            log::warn!("{}: a commit raced the checkpoint", self.name);
            self.tip = None;
            return Ok(Some(false));
        }
        let complete = busy == 0 && log_frames == checkpointed;
        log::debug!(
            "{}: {mode:?} checkpoint: busy={busy} log={log_frames} checkpointed={checkpointed}",
            self.name
        );
        if complete {
            if let Some(tip) = self.tip.as_mut() {
                if let Some(mark) = tip.wal.as_mut() {
                    mark.backfilled = true;
                }
            }
            let tip = self.tip.clone();
            if let Some(tip) = tip {
                self.save_position(tip)?;
            }
        }
        Ok(Some(complete))
    }

    /// Under the barrier: cut and upload whatever is left, so the tip is the end of the
    /// committed WAL and durable. Returns the control connection's data version, or None if
    /// continuity is lost (the caller must not checkpoint; the next poll starts over).
    fn ship_rest_under_barrier(&mut self) -> Result<Option<i64>> {
        if self.cut_to_end()?.is_err() {
            return Ok(None);
        }
        self.flush()?;
        Ok(Some(self.data_version()?))
    }

    /// Run on the pin's connection while it is released: the control connection may be
    /// holding the barrier, and SQLite refuses to checkpoint inside a transaction.
    fn run_checkpoint(&self, mode: CheckpointMode) -> Result<(i64, i64, i64)> {
        self.pin
            .connection()
            .query_row(mode.sql(), [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .context(|| format!("{}: {mode:?} checkpoint", self.name))
    }

    fn data_version(&self) -> Result<i64> {
        Ok(self
            .db
            .connection()
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Cut the committed frames after the tip into a queued segment. The inner `Err` says
    /// why continuity is lost (a new generation is needed).
    fn cut_to_end(&mut self) -> Result<Result<SyncOutcome, String>> {
        let Some(tip) = self.tip.clone() else {
            return Ok(Err("no generation yet".into()));
        };
        let wal = self.db.open_wal()?;
        let reader = match &wal {
            Some(file) => WalReader::open(file)?,
            None => None,
        };
        let (Some(file), Some(mut reader)) = (&wal, reader) else {
            return Ok(self.check_without_wal(&tip)?.map(|()| SyncOutcome::Idle));
        };
        let start = match self.check_continuity(&tip, &reader)? {
            Ok(start) => start,
            Err(reason) => return Ok(Err(reason)),
        };
        reader.seek(start);
        let Some(end) = reader.find_last_commit()? else {
            return Ok(Ok(SyncOutcome::Idle));
        };
        // The segment's time: every commit in it happened before this moment, so a
        // point-in-time restore to it never includes a later transaction.
        let time = UtcTime::now();
        let header = *reader.header();
        let cut = match segment::cut(file, &header, start, end, &self.sidecar) {
            Ok(cut) => cut,
            Err(e) if e.kind() == crate::ErrorKind::Corrupt => {
                return Ok(Err(format!("the WAL changed while it was read: {e}")))
            }
            Err(e) => return Err(e.with_context(format!("{}: cutting a segment", self.name))),
        };
        let generation = Generation::parse(&tip.generation)
            .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
        let object = ObjectName {
            kind: ObjectKind::Segment,
            generation,
            index: tip.index + 1,
            time,
        };
        let key = object.key(&self.name);
        let after = Position {
            index: object.index,
            wal: Some(WalMark {
                salt: header.salt,
                checkpoint_seq: header.checkpoint_seq,
                end,
                backfilled: false,
            }),
            db: FileIdentity::of(self.db.path())?,
            ..tip
        };
        log::debug!("{}: cut {key} ({} frames)", self.name, cut.frames);
        self.push(key.clone(), ObjectKind::Segment, cut.file, after);
        Ok(Ok(SyncOutcome::Shipped {
            key,
            frames: cut.frames,
        }))
    }

    /// Where to start reading the WAL after `tip`, or why continuity is lost.
    fn check_continuity(
        &self,
        tip: &Position,
        reader: &WalReader,
    ) -> Result<Result<WalPosition, String>> {
        let identity = FileIdentity::of(self.db.path())?;
        if !identity.same_file(&tip.db) {
            return Ok(Err("the database file was replaced".into()));
        }
        let header = *reader.header();
        if header.page_size != tip.page_size {
            return Ok(Err(format!(
                "page size changed from {} to {}",
                tip.page_size, header.page_size
            )));
        }
        let top = WalPosition {
            offset: HEADER_SIZE,
            checksum: header.checksum,
        };
        let Some(mark) = tip.wal else {
            // The WAL had no header when the tip was taken: every frame in it now is newer,
            // provided nothing was checkpointed into the database file meanwhile.
            if identity != tip.db {
                return Ok(Err(
                    "the database file changed while walsync was not watching".into(),
                ));
            }
            return Ok(Ok(top));
        };
        if header.salt == mark.salt {
            return Ok(if reader.still_holds(mark.end)? {
                Ok(mark.end)
            } else {
                Err("the WAL no longer holds the frames last shipped".into())
            });
        }
        // The one restart walsync's own complete checkpoint leads to.
        let one_restart = header.salt[0] == mark.salt[0].wrapping_add(1)
            && header.checkpoint_seq == mark.checkpoint_seq.wrapping_add(1);
        if mark.backfilled && one_restart {
            return Ok(Ok(top));
        }
        Ok(Err(
            "the WAL was checkpointed and restarted while walsync was not holding it".into(),
        ))
    }

    /// Continuity when there is no WAL file or it has no valid header.
    fn check_without_wal(&self, tip: &Position) -> Result<Result<(), String>> {
        let identity = FileIdentity::of(self.db.path())?;
        if !identity.same_file(&tip.db) {
            return Ok(Err("the database file was replaced".into()));
        }
        let backfilled = tip.wal.is_some_and(|m| m.backfilled);
        log::debug!(
            "{}: no WAL header; database now {identity:?}, at tip {:?}",
            self.name,
            tip.db
        );
        if (tip.wal.is_none() && identity == tip.db) || backfilled {
            Ok(Ok(()))
        } else {
            Ok(Err(
                "the WAL was checkpointed away while walsync was not holding it".into(),
            ))
        }
    }

    /// Start a new generation, because of `reason`: under the barrier, note where the
    /// committed WAL ends and move the pin there; then snapshot through the pin.
    fn queue_new_generation(&mut self, reason: &str) -> Result<String> {
        if self.tip.is_some() {
            log::warn!("{}: starting a new generation: {reason}", self.name);
        } else {
            log::info!("{}: starting the first generation", self.name);
        }
        self.db.lock_writes()?;
        let marked = self.mark_committed_end().and_then(|mark| {
            self.repin()?;
            Ok((mark, FileIdentity::of(self.db.path())?))
        });
        self.db.release()?;
        let (mark, identity) = marked?;
        let generation = Generation::new();
        self.claim_generation(&generation)?;
        let position = Position {
            destination: self.storage.describe(),
            name: self.name.clone(),
            generation: generation.as_str().to_string(),
            index: 0,
            page_size: self.pin.page_size()?,
            wal: mark,
            db: identity,
        };
        let key = self.queue_snapshot_object(generation, position.clone())?;
        self.tip = Some(position);
        Ok(key)
    }

    /// Where the committed part of the WAL ends right now (call under the barrier).
    fn mark_committed_end(&self) -> Result<Option<WalMark>> {
        let Some(file) = self.db.open_wal()? else {
            return Ok(None);
        };
        let Some(mut reader) = WalReader::open(&file)? else {
            return Ok(None);
        };
        let header: WalHeader = *reader.header();
        let end = reader.find_last_commit()?.unwrap_or(WalPosition {
            offset: HEADER_SIZE,
            checksum: header.checksum,
        });
        Ok(Some(WalMark {
            salt: header.salt,
            checkpoint_seq: header.checkpoint_seq,
            end,
            backfilled: false,
        }))
    }

    /// Copy the pinned database into a queued snapshot at `position`'s index.
    fn queue_snapshot_object(
        &mut self,
        generation: Generation,
        position: Position,
    ) -> Result<String> {
        let snap = snapshot::take(&self.pin, &self.sidecar)
            .context(|| format!("{}: taking a snapshot", self.name))?;
        let object = ObjectName {
            kind: ObjectKind::Snapshot,
            generation,
            index: position.index,
            time: UtcTime::now(),
        };
        let key = object.key(&self.name);
        log::debug!(
            "{}: snapshot {key} ({} bytes uncompressed)",
            self.name,
            snap.db_size
        );
        self.push(key.clone(), ObjectKind::Snapshot, snap.file, position);
        Ok(key)
    }

    fn push(&mut self, key: String, kind: ObjectKind, file: File, after: Position) {
        self.tip = Some(after.clone());
        self.pending.push_back(Pending {
            key,
            kind,
            file: Some(file),
            after,
        });
    }

    /// If another file was renamed into the database's place, reopen the connections on it
    /// (they still point at the old file); continuity is then lost and the next cut says so.
    fn follow_replacement(&mut self) -> Result<()> {
        let now = FileIdentity::of(self.db.path())?;
        if now.same_file(&self.opened) {
            return Ok(());
        }
        log::warn!(
            "{}: {} was replaced by another file; reopening it",
            self.name,
            self.db.path().display()
        );
        let db = Database::open(self.db.path())?;
        let pin = db.reopen()?;
        pin.pin()?;
        self.db = db;
        self.pin = pin;
        self.opened = now;
        Ok(())
    }

    /// Move the pin to the present (call under the barrier, so nothing commits meanwhile).
    fn repin(&self) -> Result<()> {
        self.pin.release()?;
        self.pin.pin()
    }

    /// Refuse to write into a replica name that another database is writing to.
    ///
    /// One LIST of the name (and a GET of its `state.json` when this database has no
    /// generation of its own yet). Another writer shows as a generation newer than this
    /// database's own, or, for a database without one, a `state.json` naming another
    /// source (host and path). Removing that `state.json` hands the name over, for example
    /// to a database restored onto a new host.
    pub fn check_ownership(&self) -> Result<()> {
        let listing = self
            .storage
            .list(&format!("{}/", self.name))
            .context(|| format!("{}: listing {}", self.name, self.storage.describe()))?;
        let catalog = layout::Catalog::from_listing(listing);
        let Some(newest) = catalog
            .databases
            .get(&self.name)
            .and_then(|generations| generations.keys().next_back().cloned())
        else {
            return Ok(());
        };
        // A generation this replica started but whose snapshot it never saw stored (walsync
        // was killed after the upload reached the bucket, before the position was saved) is
        // ours too: without the claim, every later start would refuse to run.
        let ours = self
            .durable
            .as_ref()
            .and_then(|p| Generation::parse(&p.generation))
            .max(self.claimed.clone());
        if let Some(ours) = ours {
            if newest > ours {
                return Err(Error::invalid(format!(
                    "{}: {} holds a newer generation {newest} of {:?} than this database's \
                     {ours}: another walsync is writing that name; give this database another \
                     name with PATH:NAME",
                    self.db.path().display(),
                    self.storage.describe(),
                    self.name
                )));
            }
            return Ok(());
        }
        let mut body = Vec::new();
        match self.storage.get(&layout::state_key(&self.name), &mut body) {
            Ok(_) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.with_context(format!("{}: reading state.json", self.name))),
        }
        let state: ReplicaState = match serde_json::from_slice(&body) {
            Ok(state) => state,
            Err(_) => return Ok(()),
        };
        if state.source != self.source() {
            return Err(Error::invalid(format!(
                "{:?} in {} holds backups of {}, not {}: give this database another name with \
                 PATH:NAME, or remove {}/state.json to take the name over",
                self.name,
                self.storage.describe(),
                state.source,
                self.source(),
                self.name
            )));
        }
        Ok(())
    }

    /// `host:/absolute/path` of this database, as recorded in `state.json`.
    fn source(&self) -> String {
        let path = std::path::absolute(self.db.path()).unwrap_or_else(|_| self.db.path().into());
        format!("{}:{}", hostname(), path.display())
    }

    /// Write `state.json` for `list` and for people; restores never need it.
    pub fn write_state(&self) -> Result<()> {
        let Some((key, body)) = self.state_object()? else {
            return Ok(());
        };
        self.storage
            .put_bytes(&key, &body)
            .context(|| format!("writing {key}"))
    }

    /// The key and content of `state.json` as of the durable position (None before any).
    pub fn state_object(&self) -> Result<Option<(String, Vec<u8>)>> {
        let Some(p) = &self.durable else {
            return Ok(None);
        };
        let state = ReplicaState {
            name: self.name.clone(),
            generation: p.generation.clone(),
            index: p.index,
            updated: UtcTime::now().to_rfc3339(),
            page_size: p.page_size,
            source: self.source(),
            walsync_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let body = serde_json::to_vec_pretty(&state)?;
        Ok(Some((layout::state_key(&self.name), body)))
    }

    /// Note in the sidecar, durably, that this replica is starting `generation`, before any
    /// object of it is uploaded, so that [`Replica::check_ownership`] recognises it after a
    /// crash that left the snapshot stored but the position unsaved.
    fn claim_generation(&mut self, generation: &Generation) -> Result<()> {
        let tmp = self.claim_path.with_extension("generation.tmp");
        let what = || format!("saving the generation to {}", self.claim_path.display());
        std::fs::write(&tmp, generation.as_str()).context(what)?;
        File::open(&tmp).and_then(|f| f.sync_all()).context(what)?;
        std::fs::rename(&tmp, &self.claim_path).context(what)?;
        self.claimed = Some(generation.clone());
        Ok(())
    }

    fn save_position(&mut self, position: Position) -> Result<()> {
        let tmp = self.position_path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&position)?;
        let what = || format!("saving position to {}", self.position_path.display());
        std::fs::write(&tmp, body).context(what)?;
        File::open(&tmp).and_then(|f| f.sync_all()).context(what)?;
        std::fs::rename(&tmp, &self.position_path).context(what)?;
        self.durable = Some(position);
        Ok(())
    }
}

/// `.app.db-walsync/` beside `app.db`: positions, locks and spool files.
fn sidecar_dir(db_path: &Path) -> Result<PathBuf> {
    let file_name = db_path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} does not name a file", db_path.display())))?;
    let mut dir_name = std::ffi::OsString::from(".");
    dir_name.push(file_name);
    dir_name.push("-walsync");
    let parent = db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(dir_name))
}

fn load_position(path: &Path) -> Result<Option<Position>> {
    match std::fs::read(path) {
        Ok(body) => match serde_json::from_slice(&body) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                log::warn!(
                    "ignoring unreadable position file {} ({e}); a new generation will start",
                    path.display()
                );
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from(e).with_context(format!("reading {}", path.display()))),
    }
}

/// The generation a replica last started, from its claim file (none if missing or unreadable).
fn load_claim(path: &Path) -> Result<Option<Generation>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Generation::parse(text.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from(e).with_context(format!("reading {}", path.display()))),
    }
}

/// This machine's host name, or "localhost" if it cannot be read.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

/// FNV-1a, 64 bits: a stable short name for a (destination, name) pair.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
