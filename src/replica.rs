//! One database replicated to one destination: generations, positions, staging, snapshots
//! and checkpoints.
//!
//! # The tip, staging and uploads
//!
//! A [`Replica`] reads the WAL into *segments* (see [`crate::segment`]) and stages each one
//! in its sidecar ([`crate::sidecar`]) before it counts as read: written, fsynced, then the
//! *tip* (generation, segment index, exact place in the WAL, chain value) saved beside it.
//! Only then may walsync let SQLite overwrite those frames, and only then is the object
//! handed to the upload pool, which ships staged objects strictly in order and removes each
//! once stored, also after a restart. So:
//!
//! - the bucket never holds an object the sidecar does not account for: a restart resumes
//!   from the tip, never from an older place that would cut an index again differently;
//! - checkpoints wait for local disk, never for storage; an outage costs staged bytes (up to
//!   a cap, after which the WAL stays pinned and grows instead), not a WAL that never shrinks;
//! - a tip that cannot be saved (disk full, I/O error) stops this database's progress loudly:
//!   nothing past the saved tip is uploaded, and the error repeats until the disk recovers.
//!
//! # Holding the WAL still
//!
//! The replica keeps a read transaction open on its own connection: the *pin* (see
//! [`crate::database`]). What it guarantees depends on SQLite's read marks:
//!
//! - A pin on a read mark above 0 stops any writer from restarting the WAL, so every frame
//!   stays in the file.
//! - A pin taken when every frame was already copied into the database sits on read mark 0.
//!   It stops every checkpoint from copying frames (they would change pages the pin reads
//!   from the database file), but it does not stop the next writer from restarting the WAL,
//!   once, over frames that are all in the database file already.
//!
//! Either way, once the pin is held, a commit can leave the WAL unread only if it was in the
//! WAL *before* the pin was taken. So when the tip has reached the end of the committed WAL
//! as it was at pin time, the pin *guards* the replica: whatever happens to the WAL headers
//! from then on (restarts after walsync's checkpoints, the application's own TRUNCATE
//! checkpoints, any number of them), every commit is still in the current WAL, and reading
//! it from the top after a restart loses nothing. That is [`Pin::Guarding`].
//!
//! The pin is moved under the *barrier* (`BEGIN IMMEDIATE`, the write lock) after the last
//! commits are cut, so the new pin guards at once; or, for checkpoints, handed off to the
//! present without it ([`Replica::hand_off_pin`]), which keeps it guarding only while the
//! tip has read everything the old pin saw, so a pin handed off is handed off again only
//! after a cut. The barrier covers local work only:
//! reading a few frames into a staged file (written uncompressed, and compressed once the
//! barrier is released, before it counts: see [`crate::gzip::Stored`]), moving the pin, a
//! checkpoint of what slipped in since the last one. It never waits for the network.
//!
//! # Checkpoints
//!
//! walsync checkpoints the WAL itself, only over frames it has staged: first outside the
//! barrier while the pin (at the end of everything staged) keeps the WAL from restarting,
//! then once more under the barrier for what committed meanwhile, after which the pin is
//! moved to a fresh read mark so the next writer can restart the WAL from the top. The
//! replicator does this once 1000 frames are staged, at most once per `min_interval`, or at
//! once when the WAL holds `restart_frames` (2000) unread frames
//! ([`Replica::wal_outgrew_tip`]): a WAL that SQLite may not restart grows past the end of
//! its file, and then every commit's fsync also writes the file's new size. A WAL
//! file left large by a big transaction is truncated with SQLite's own TRUNCATE checkpoint
//! while the pin is still held ([`Replica::truncate_if_large`]). There is no race to detect:
//! nothing commits while the pin is moved, and nothing unread can be copied out of the WAL,
//! or truncated away, while it is held.
//!
//! # Continuity across restarts
//!
//! While walsync is stopped nothing holds the WAL. On the next start the WAL must still be
//! the one the tip describes (same salts, the same frame at the tip), or walsync must be able
//! to prove that nothing committed was lost, by content: before it stops, walsync copies
//! every frame it staged into the database file (a complete checkpoint) and records the
//! SHA-256 of that file, which then holds exactly the state at the tip (the *proof*). While
//! its pin holds the WAL, nobody can change the file meanwhile. On the next start, a
//! database file with the same digest still holds that state, so every later commit is in
//! whatever WAL there is now, read from its top. A different digest (an application that
//! committed, then closed its last connection or truncated the WAL) means a new
//! generation. Timestamps prove nothing here: on a filesystem with whole-second times, a
//! same-size write in the same second leaves size and modification time as they were. A
//! replaced database file or a changed page size is a new generation too.
//!
//! # Storage is the truth
//!
//! The sidecar is a hint: it can be rolled back with the database (a VM snapshot
//! restored), copied with it (`cp -a`), or pointed at a destination that no longer holds
//! what it says (a new endpoint, an emptied prefix). Before anything is uploaded, each run
//! *reconciles* the tip with one listing of the name ([`Replica::reconcile`]):
//!
//! - a position saved for another file (other path, device or inode) is foreign: it and
//!   whatever it staged are dropped, and the name's ownership is checked as for a new
//!   database;
//! - storage holding a newer generation, or objects of the tip's generation past the tip,
//!   means this host's files were rolled back: a new generation, never an index cut again;
//! - storage lacking the base the tip builds on (no snapshot of its generation, stored or
//!   staged, or a segment missing between it and the tip) means the destination is not the
//!   one the sidecar wrote to: a new generation.
//!
//! When storage cannot be reached at start, the replica stages locally and uploads nothing
//! until the listing succeeds; if the reconciliation then finds the tip wrong, the staged
//! objects are dropped and a new generation is snapshotted from the database, which holds
//! every commit they held.
//!
//! Object times are labels for point-in-time restores, read from the clock (held still
//! through a small step back, following a large one: see [`Replica::next_time`]), so a
//! clock step blurs point-in-time near the step, nothing more; the order of objects and of
//! generations comes from indexes and from storage (see [`Generation::after`]).
//!
//! # Rooms
//!
//! This file holds the [`Replica`] itself and the steps a caller drives (`poll`, `sync`,
//! `snapshot`); the mechanisms above live beside it, in `src/replica/`:
//!
//! - `position`: the tip as saved in the sidecar (`position.json`), and whose it is: a
//!   position saved for another file is a copy's, never continued.
//! - `staging`: cutting the WAL into segments and taking snapshots, staged and counted
//!   before they are uploaded; the objects an earlier run left staged.
//! - `upload`: handing staged objects out for upload, one at a time and in order, and
//!   `state.json`.
//! - `pin`: holding the WAL still: the pin, the barrier, the hand-off, following a
//!   restarted WAL or a replaced database file.
//! - `rest`: what an idle database gives back (connections, cached pages, the sidecar
//!   lock), and taking the lock back.
//! - `checkpoint`: walsync's own checkpoints, over what it has staged.
//! - `continuity`: where reading resumes after a restart, the proof that makes that safe,
//!   and a new generation when it cannot.
//! - `reconcile`: storage is the truth: the tip checked against one listing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::database::Database;
use crate::error::{Error, Result};
use crate::files::FileIdentity;
use crate::layout::{self, Generation};
use crate::progress::{Progress, Unwatched};
use crate::sidecar::{Sidecar, Staged};
use crate::storage::Storage;
use crate::utc::UtcTime;

mod checkpoint;
mod continuity;
mod pin;
mod position;
mod reconcile;
mod rest;
mod staging;
#[cfg(test)]
mod testing;
mod upload;

/// Handed out by [`Replica::next_upload`]; defined beside the upload step it feeds.
pub use crate::uploader::Upload;
pub use rest::ONE_CONNECTION_AFTER;

use pin::{open_pin, Pin, WalLook};
use position::{absolute_path, hostname, Position};
use staging::{pick_up_staged, Cut};

/// Staged bytes per database after which walsync stops reading the WAL until uploads catch
/// up (the WAL then stays pinned and grows instead).
pub const DEFAULT_STAGING_LIMIT: u64 = 1024 * 1024 * 1024;

/// A WAL file at least this large is truncated after walsync's next complete checkpoint.
pub const DEFAULT_WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// Object times go back with the clock only when it steps back further than this (see
/// [`Replica::next_time`]).
const LABELS_FOLLOW_A_STEP_BACK_OF: Duration = Duration::from_secs(3600);

/// What one call to [`Replica::sync`] or [`Replica::poll`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing new was committed (or staging is full and the WAL waits).
    Idle,
    /// A segment was cut and staged (and, for [`Replica::sync`], stored).
    Shipped { key: String, frames: u64 },
    /// A snapshot starting a new generation was taken (first run, or continuity was lost).
    NewGeneration { key: String, reason: String },
}

/// One database replicated to one destination.
pub struct Replica {
    /// Control connection: the barrier and checkpoints. Closed while the database rests
    /// (see [`Replica::rest`]) and opened again by [`pin::open_control`] when next needed.
    /// Closing it frees its heap (about 12 KiB, though the allocator keeps most of it
    /// resident for reuse: 1000 idle databases, 47.3 MiB before, 46.5 MiB after) but no
    /// descriptor while the pin holds its lock; resting on one connection
    /// ([`rest::ONE_CONNECTION_AFTER`]) is what gives those back.
    control: Option<Database>,
    /// Holds the read transaction that pins the WAL.
    pin: Database,
    pin_state: Pin,
    /// When the last commit was read (or the replica opened): a database quiet for
    /// [`ONE_CONNECTION_AFTER`] rests on the pin's connection alone (see [`Replica::rest`]).
    last_read: Instant,
    /// The pin's connection was opened afresh at rest and the control connection has not
    /// been opened since: the database holds one connection's descriptors.
    alone: bool,
    one_connection_after: Duration,
    /// Counts this database in the descriptor budget (see [`crate::limits::BUSY`]).
    _counted: crate::limits::Counted,
    /// Hears how a snapshot is going (nobody, unless [`Replica::set_progress`]).
    progress: Arc<dyn Progress>,
    /// Run between closing the connections and opening the new one (see `rest_alone`).
    #[cfg(test)]
    between_connections: Option<Box<dyn FnMut() + Send>>,
    storage: Arc<dyn Storage>,
    name: String,
    sidecar: Sidecar,
    /// The database file the connections have open.
    opened: FileIdentity,
    tip: Option<Position>,
    /// Staging sequence number of the saved tip: nothing past it is uploaded.
    saved_seq: u64,
    /// Staged objects not yet stored, in order; the front one may be out for upload.
    staged: VecDeque<Staged>,
    /// The highest staging number of any file found in the sidecar at start, counted or
    /// not: new objects are numbered past it, so no two files ever share a number.
    seq_floor: u64,
    /// Uncounted files found at start that could not be removed (see [`staging::pick_up_staged`]),
    /// for a new generation's first position when there was no position to keep them in.
    leftovers: Vec<u64>,
    /// Staged objects whose files are not fsynced yet (staged under the barrier).
    unsynced: Vec<Staged>,
    /// The tip changed in a way worth saving although it counts no new object.
    tip_changed: bool,
    uploading: bool,
    /// The newest object confirmed stored (for `state.json`).
    stored: Option<(Generation, u64)>,
    /// The newest generation of this name in storage when the replica was reconciled: a new
    /// generation must sort after it even if the sidecar was lost and the clock went back.
    newest_stored: Option<Generation>,
    /// The listing of this name taken when the replica was opened, until taken (by the
    /// first prune, which so needs no LIST of its own).
    opening_listing: Option<std::collections::BTreeMap<Generation, layout::GenerationObjects>>,
    /// Where walsync's own checkpoints have copied the WAL up to (salts and offset).
    backfilled: Option<([u32; 2], u64)>,
    /// The WAL as it was when the pin was last taken (see [`Replica::follow_restart`]); None
    /// once the pin was handed off since.
    pinned_at: Option<WalLook>,
    /// The tip was checked against storage ([`Replica::reconcile`]): until then nothing
    /// is uploaded.
    reconciled: bool,
    /// Why the tip cannot be continued, found by [`Replica::reconcile`]: the next cut
    /// starts a new generation.
    lost: Option<String>,
    staging_limit: u64,
    wal_size_limit: u64,
    /// Staging is full and that has been said.
    said_full: bool,
    /// The pin was handed off to the present since the tip last read the WAL (see
    /// [`Replica::hand_off_pin`]): it may see commits the tip has not read.
    pin_ahead: bool,
}

impl Replica {
    /// Open `db_path` for replication to `storage` under `name`, pin its WAL, pick up what a
    /// previous run staged, and reconcile all that with storage (the replica's position against the objects stored),
    /// which refuses a name another database is written under.
    pub fn open(db_path: &Path, storage: Arc<dyn Storage>, name: &str) -> Result<Replica> {
        let mut replica = Replica::open_unreconciled(db_path, storage, name)?;
        replica.reconcile()?;
        Ok(replica)
    }

    /// [`Replica::open`] without asking storage anything: nothing is uploaded until
    /// [`Replica::reconcile`] succeeds, but the WAL is read and staged meanwhile (for
    /// `walsync watch` when storage cannot be reached at start).
    pub(crate) fn open_unreconciled(
        db_path: &Path,
        storage: Arc<dyn Storage>,
        name: &str,
    ) -> Result<Replica> {
        layout::validate_name(name)?;
        let (pin, opened) = open_pin(db_path)?;
        let destination = storage.describe();
        let sidecar = Sidecar::open(db_path, &destination, name)?;
        let path = absolute_path(db_path);
        let mut tip = sidecar
            .load_position::<Position>()?
            .filter(|p| p.destination == destination && p.name == name);
        if let Some(saved) = tip.as_ref().filter(|t| t.is_foreign(&opened, &path)) {
            log::warn!(
                "{name}: the replication position in {} was saved for another file ({} on {}, \
                 inode {}): this database is a copy; the position and whatever it staged are \
                 dropped, and the name's owner is checked as for a new database",
                sidecar.dir().display(),
                saved.path.as_deref().unwrap_or("?"),
                saved.host.as_deref().unwrap_or("?"),
                saved.db.ino
            );
            tip = None;
        }
        let saved_seq = tip.as_ref().map_or(0, |t| t.seq);
        let (staged, seq_floor, leftovers) = pick_up_staged(&sidecar, name, tip.as_ref())?;
        let mut tip_changed = false;
        if let Some(tip) = tip.as_mut().filter(|t| t.leftovers != leftovers) {
            tip.leftovers = leftovers.clone();
            tip_changed = true;
        }
        if let Some(tip) = tip
            .as_mut()
            .filter(|t| t.path.is_none() || t.host.is_none())
        {
            tip.path = Some(path.clone());
            tip.host = Some(hostname());
            tip_changed = true;
        }
        let mut replica = Replica {
            control: None,
            pin,
            last_read: Instant::now(),
            alone: true, // no control connection yet
            one_connection_after: ONE_CONNECTION_AFTER,
            _counted: crate::limits::Counted::new(),
            progress: Arc::new(Unwatched),
            #[cfg(test)]
            between_connections: None,
            pin_state: Pin::Behind(None),
            storage,
            name: name.to_string(),
            sidecar,
            opened,
            stored: None,
            tip,
            saved_seq,
            staged,
            seq_floor,
            leftovers,
            unsynced: Vec::new(),
            tip_changed,
            uploading: false,
            backfilled: None,
            pinned_at: None,
            newest_stored: None,
            opening_listing: None,
            reconciled: false,
            lost: None,
            staging_limit: DEFAULT_STAGING_LIMIT,
            wal_size_limit: DEFAULT_WAL_SIZE_LIMIT,
            said_full: false,
            pin_ahead: false,
        };
        replica.pin_state = replica.pin_state_now()?;
        replica.pinned_at = Some(replica.wal_look()?);
        replica.release_memory();
        Ok(replica)
    }

    /// Tell `progress` how each snapshot this replica takes is going (its copy and its
    /// compression), for a progress display.
    pub fn set_progress(&mut self, progress: Arc<dyn Progress>) {
        self.progress = progress;
    }

    /// Stop reading the WAL while this many bytes are staged and not yet stored.
    pub(crate) fn set_staging_limit(&mut self, bytes: u64) {
        self.staging_limit = bytes;
    }

    /// How long a database must be quiet before it rests on one connection (default
    /// [`ONE_CONNECTION_AFTER`]; see [`Replica::rest`]). Tests shorten it.
    #[cfg(test)]
    pub(crate) fn set_one_connection_after(&mut self, quiet: Duration) {
        self.one_connection_after = quiet;
    }

    /// Truncate a WAL file at least this large after a complete checkpoint.
    pub(crate) fn set_wal_size_limit(&mut self, bytes: u64) {
        self.wal_size_limit = bytes;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        self.pin.path()
    }

    /// The generation and last segment index read so far, if any.
    pub fn generation(&self) -> Option<(Generation, u64)> {
        let p = self.tip.as_ref()?;
        Some((p.generation.clone(), p.index))
    }

    /// True when the database holds no more descriptors than a resting one (see
    /// [`crate::limits::FILES_PER_DATABASE`]): one connection, and on Linux no sidecar lock.
    pub(crate) fn at_rest(&self) -> bool {
        self.alone && (!cfg!(target_os = "linux") || !self.sidecar.holds_lock())
    }

    /// True when every object cut so far is stored.
    pub(crate) fn is_flushed(&self) -> bool {
        self.staged.is_empty()
    }

    /// True when the tip and every object it counts are saved in the sidecar.
    pub(crate) fn is_saved(&self) -> bool {
        self.tip.as_ref().is_none_or(|t| t.seq == self.saved_seq)
            && self.unsynced.is_empty()
            && !self.tip_changed
    }

    /// Objects staged and not yet stored.
    pub(crate) fn staged_count(&self) -> usize {
        self.staged.len()
    }

    /// Bytes staged and not yet stored.
    pub(crate) fn staged_bytes(&self) -> u64 {
        self.staged.iter().map(|s| s.bytes).sum()
    }

    /// The key of the last object staged and not yet stored.
    pub(crate) fn last_queued_key(&self) -> Option<String> {
        self.staged.back().map(|s| s.object.key(&self.name))
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
    /// staged before it) to be stored. Returns the snapshot's key.
    pub fn snapshot(&mut self) -> Result<String> {
        let key = self.queue_snapshot()?;
        self.flush()?;
        Ok(key)
    }

    /// Stage what was committed since the tip as a segment, or a new generation's snapshot
    /// when there is no generation or continuity is lost.
    #[doc(hidden)] // for tests that stage without uploading (not API)
    pub fn poll(&mut self) -> Result<SyncOutcome> {
        self.prepare()?;
        let outcome = match self.cut()? {
            Cut::Idle | Cut::Held => SyncOutcome::Idle,
            Cut::Staged { key, frames } => SyncOutcome::Shipped { key, frames },
            Cut::Broken(reason) => {
                let key = self.new_generation(&reason)?;
                SyncOutcome::NewGeneration { key, reason }
            }
        };
        self.persist()?;
        Ok(outcome)
    }

    /// Stage a snapshot aligned to a segment boundary (after the segment of whatever was
    /// committed but not yet cut). Returns the snapshot's key.
    pub(crate) fn queue_snapshot(&mut self) -> Result<String> {
        self.prepare()?;
        // Cut what is there outside the barrier, so the barrier only covers a small rest.
        let outside = self.cut_until_small()?;
        let cut = match outside {
            Cut::Broken(reason) => return self.new_generation(&reason),
            Cut::Held => return Err(self.staging_full_error()),
            Cut::Idle | Cut::Staged { .. } => self.under_barrier(|r| r.cut_rest_and_repin())?,
        };
        self.persist()?;
        match cut {
            Cut::Broken(reason) => return self.new_generation(&reason),
            Cut::Held => return Err(self.staging_full_error()),
            Cut::Idle | Cut::Staged { .. } => {}
        }
        // The pin now sees exactly what the tip's last segment ends with.
        let tip = self
            .tip
            .clone()
            .ok_or_else(|| Error::new(crate::error::ErrorKind::Other, "no generation"))?;
        self.stage_snapshot(tip)
    }

    // ----- what every step shares -----

    /// Before any step: take the sidecar lock back if a rest let it go, save a tip that an
    /// earlier step could not save, follow a database file replaced by rename, and make
    /// sure the pin is held.
    fn prepare(&mut self) -> Result<()> {
        self.hold()?;
        // Opening it again at rest may have failed (see `rest_alone`).
        self.pin.open_again()?;
        self.persist()?;
        self.follow_replacement()?;
        if !self.pin.in_transaction() {
            // Lost on an error path: whatever it guarded is no longer guarded.
            self.pin.pin()?;
            self.pin_state = self.pin_state_now()?;
            self.pinned_at = Some(self.wal_look()?);
        }
        Ok(())
    }

    /// The time for the next object (a label for point-in-time restores, see the module
    /// docs): now, but not before the previous object unless the clock went back further
    /// than [`LABELS_FOLLOW_A_STEP_BACK_OF`]. A small step back is a clock that was a
    /// little ahead and was corrected: labels hold still until it catches up, so a
    /// point-in-time restore never includes a commit made after the time asked for. A large
    /// one ends a glitch (a clock that ran days ahead): labels follow the clock again rather
    /// than stay at the glitch for as long as it lasted.
    fn next_time(&self, tip: &Position) -> UtcTime {
        let now = UtcTime::now();
        let back = tip.time_ms.saturating_sub(now.millis());
        let limit = LABELS_FOLLOW_A_STEP_BACK_OF.as_millis() as i64;
        if back < 0 || back > limit {
            now
        } else {
            UtcTime::from_millis(tip.time_ms + 1)
        }
    }

    fn next_seq(&self) -> u64 {
        let last_staged = self.staged.back().map_or(0, |s| s.seq);
        let tip = self.tip.as_ref().map_or(0, |t| t.seq);
        tip.max(last_staged).max(self.seq_floor) + 1
    }

    fn staging_full_error(&self) -> Error {
        Error::new(
            crate::error::ErrorKind::Transient,
            format!(
                "{}: staging is full ({} MiB not yet stored); try again once uploads catch up",
                self.name,
                self.staged_bytes() >> 20
            ),
        )
    }
}
