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
//! The pin is moved only under the *barrier* (`BEGIN IMMEDIATE`, the write lock) after the
//! last commits are cut, so the new pin guards at once. The barrier covers local work only:
//! reading a few frames into a staged file, moving the pin, a checkpoint of what slipped in
//! since the last one. It never waits for the network.
//!
//! # Checkpoints
//!
//! walsync checkpoints the WAL itself, only over frames it has staged: first outside the
//! barrier while the pin (at the end of everything staged) keeps the WAL from restarting,
//! then once more under the barrier for what committed meanwhile, after which the pin is
//! moved to a fresh read mark so the next writer can restart the WAL from the top. A WAL
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

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::database::Database;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::files::FileIdentity;
use crate::layout::{self, ChainValue, Generation, ObjectKind, ObjectName, ReplicaState};
use crate::segment;
use crate::sidecar::{Sidecar, Staged};
use crate::snapshot;
use crate::storage::Storage;
use crate::utc::UtcTime;
use crate::wal::{WalHeader, WalPosition, WalReader, FRAME_HEADER_SIZE, HEADER_SIZE};

mod reconcile;

/// Staged bytes per database after which walsync stops reading the WAL until uploads catch
/// up (the WAL then stays pinned and grows instead).
pub const DEFAULT_STAGING_LIMIT: u64 = 1024 * 1024 * 1024;

/// Cuts (and a checkpoint's copies) outside the barrier go on, up to [`OUTSIDE_ROUNDS`]
/// of them, until one finds at most this many frames, so that what the barrier reads and
/// copies after them is small.
const SMALL_CUT_FRAMES: u64 = 256;

/// At most this many rounds of cutting, and of copying, before a barrier.
const OUTSIDE_ROUNDS: usize = 4;

/// A WAL file at least this large is truncated after walsync's next complete checkpoint.
pub const DEFAULT_WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// Object times go back with the clock only when it steps back further than this (see
/// [`Replica::next_time`]).
const LABELS_FOLLOW_A_STEP_BACK_OF: Duration = Duration::from_secs(3600);

/// How far the WAL has been read into staged objects: saved in the sidecar, and written
/// before anything it covers is uploaded. Its fields are listed in `docs/FORMAT.md` ("The
/// sidecar", `position.json`): change them there too.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Position {
    destination: String,
    name: String,
    generation: String,
    /// Last segment in this generation (0: only the base snapshot).
    index: u64,
    page_size: u32,
    /// Chain value after `index` (see [`crate::segment`]).
    chain: [u32; 2],
    /// Time of the newest object, in milliseconds (a label: see [`Replica::next_time`]).
    time_ms: i64,
    /// Staging sequence number of the newest object this position counts.
    seq: u64,
    /// The WAL just after the last commit read; `None` when the WAL had no valid header.
    wal: Option<WalMark>,
    /// The database file as of the last read (dev and inode tell a replacement or a copy).
    db: FileIdentity,
    /// The database's absolute path: a position found beside another path was copied there
    /// (None in positions saved before walsync recorded it).
    #[serde(default)]
    path: Option<String>,
    /// The host name when the position was saved: with another inode at the same path, a
    /// position of this host is a database replaced by rename (a new generation), one of
    /// another host a copy (see [`Position::is_foreign`]).
    #[serde(default)]
    host: Option<String>,
    /// The database file's content when it alone held the state at this position, if
    /// known (see the module docs).
    #[serde(default)]
    proof: Option<Proof>,
    /// Staging numbers of uncounted files that could not be removed yet: never uploaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leftovers: Vec<u64>,
}

impl Position {
    /// Whether this position was saved for another database file than `opened` at `path`:
    /// a copy of the database and its sidecar (`cp -a`, another host's volume), whose
    /// position and staged objects belong to the original. A file renamed over the same
    /// path on this host is not foreign: its position's objects are the old file's last
    /// commits, uploaded before the new file starts a new generation.
    fn is_foreign(&self, opened: &FileIdentity, path: &str) -> bool {
        let moved = self.path.as_deref().is_some_and(|p| p != path);
        let other_host = self.host.as_deref().is_some_and(|h| h != hostname());
        moved || (!self.db.same_file(opened) && other_host)
    }
}

/// The digest of a database file that held exactly the state at segment `index` of the
/// position's generation: every frame up to there checkpointed into it, nothing after.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Proof {
    index: u64,
    sha256: String,
}

/// A place in one particular WAL (identified by its salts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct WalMark {
    salt: [u32; 2],
    end: WalPosition,
}

/// How long a database must have had no commit to read before it rests on one connection
/// (see [`Replica::rest`]).
pub const ONE_CONNECTION_AFTER: Duration = Duration::from_secs(30);

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

/// The WAL file at one moment: its header's salts (None without a valid header or file)
/// and its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WalLook {
    salt: Option<[u32; 2]>,
    size: u64,
}

/// What the pin guarantees (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pin {
    /// Every commit since the pin was taken is in the current WAL or already staged.
    Guarding,
    /// Unread commits may have been in the WAL when the pin was taken, up to this offset in
    /// the WAL with these salts (or anywhere, if `None`); guarding once the tip gets there.
    Behind(Option<([u32; 2], u64)>),
}

/// An upload for a worker: store `file` under `key`, then call [`Replica::upload_done`].
pub struct Upload {
    pub key: String,
    pub file: File,
}

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

/// What a checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Not attempted: no generation yet, continuity lost, or staging full.
    Skipped,
    /// Some frames are still needed by a reader of an older snapshot; try again later.
    Partial,
    /// Every frame is in the database file; the next writer restarts the WAL.
    Complete,
}

/// What cutting the WAL found.
enum Cut {
    /// Nothing committed since the tip.
    Idle,
    /// A segment was staged (not yet saved: see [`Replica::persist`]).
    Staged { key: String, frames: u64 },
    /// Staging is full; the WAL is left alone until uploads catch up.
    Held,
    /// Continuity is lost, for this reason: a new generation must start.
    Broken(String),
}

/// Where reading the WAL resumes, after checking that nothing was lost.
enum Continuity {
    From(WalPosition),
    /// There is no WAL (or it has no valid header) and nothing was lost.
    NoWal,
    Lost(String),
}

/// One database replicated to one destination.
pub struct Replica {
    /// Control connection: the barrier and checkpoints. Closed while the database rests
    /// (see [`Replica::rest`]) and opened again by [`open_control`] when next needed. An idle
    /// database then holds one descriptor fewer (5, not 6: 1000 fewer at 1000 databases);
    /// the connection's heap (about 12 KiB) is freed, though the allocator keeps most of it
    /// resident for reuse (1000 idle databases: 47.3 MiB before, 46.5 MiB after).
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
    /// Uncounted files found at start that could not be removed (see [`pick_up_staged`]),
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
}

impl Replica {
    /// Open `db_path` for replication to `storage` under `name`, pin its WAL, pick up what a
    /// previous run staged, and reconcile all that with storage ([`Replica::reconcile`]),
    /// which refuses a name another database is written under.
    pub fn open(db_path: &Path, storage: Arc<dyn Storage>, name: &str) -> Result<Replica> {
        let mut replica = Replica::open_unreconciled(db_path, storage, name)?;
        replica.reconcile()?;
        Ok(replica)
    }

    /// [`Replica::open`] without asking storage anything: nothing is uploaded until
    /// [`Replica::reconcile`] succeeds, but the WAL is read and staged meanwhile (for
    /// `walsync watch` when storage cannot be reached at start).
    pub fn open_unreconciled(
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
        };
        replica.pin_state = replica.pin_state_now()?;
        replica.pinned_at = Some(replica.wal_look()?);
        replica.release_memory();
        Ok(replica)
    }

    /// Stop reading the WAL while this many bytes are staged and not yet stored.
    pub fn set_staging_limit(&mut self, bytes: u64) {
        self.staging_limit = bytes;
    }

    /// Truncate a WAL file at least this large after a complete checkpoint.
    /// How long a database must be quiet before it rests on one connection (default
    /// [`ONE_CONNECTION_AFTER`]; see [`Replica::rest`]).
    pub fn set_one_connection_after(&mut self, quiet: Duration) {
        self.one_connection_after = quiet;
    }

    pub fn set_wal_size_limit(&mut self, bytes: u64) {
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
        Some((Generation::parse(&p.generation)?, p.index))
    }

    /// True when every object cut so far is stored.
    pub fn is_flushed(&self) -> bool {
        self.staged.is_empty()
    }

    /// True when the tip and every object it counts are saved in the sidecar.
    pub fn is_saved(&self) -> bool {
        self.tip.as_ref().is_none_or(|t| t.seq == self.saved_seq)
            && self.unsynced.is_empty()
            && !self.tip_changed
    }

    /// Objects staged and not yet stored.
    pub fn staged_count(&self) -> usize {
        self.staged.len()
    }

    /// Bytes staged and not yet stored.
    pub fn staged_bytes(&self) -> u64 {
        self.staged.iter().map(|s| s.bytes).sum()
    }

    /// The key of the last object staged and not yet stored.
    pub fn last_queued_key(&self) -> Option<String> {
        self.staged.back().map(|s| s.object.key(&self.name))
    }

    /// Whether a checkpoint is worth its barrier: at least `frames` frames read since
    /// walsync's last complete checkpoint, or a WAL file of at least the size limit with
    /// frames to copy or (once it has restarted) a dead tail to cut.
    pub fn checkpoint_due(&self, frames: u64) -> bool {
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
    pub fn queue_snapshot(&mut self) -> Result<String> {
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
            .ok_or_else(|| Error::new(crate::ErrorKind::Other, "no generation"))?;
        self.stage_snapshot(tip)
    }

    /// Prepare for a stop: copy every staged frame into the database file and record its
    /// digest (the proof, see the module docs), so that a restart can prove that nothing was
    /// committed while walsync was stopped, whatever the application does with the WAL
    /// meanwhile. Call before stopping, after the last [`Replica::poll`]. Without a complete
    /// checkpoint (a reader holds old frames) there is no proof, and the next start relies
    /// on the WAL alone.
    pub fn settle(&mut self) -> Result<()> {
        self.prepare()?;
        if self.tip.is_none() {
            // No generation yet (its snapshot failed so far): try once more, so that a stop
            // never reports success with nothing stored.
            self.poll()?;
        }
        if self.checkpoint()? == Checkpoint::Complete {
            self.prove()?;
        }
        Ok(())
    }

    /// Right after a complete checkpoint: the database file holds exactly the state at the
    /// tip, and the pin, taken after the copy, reads the file alone (read mark 0), which
    /// stops every checkpoint from copying later frames into it while it is read. Record
    /// its digest.
    fn prove(&mut self) -> Result<()> {
        let sha256 = self
            .pin
            .content_digest()
            .map_err(|e| e.with_context(self.name.clone()))?;
        if !FileIdentity::of(self.pin.path())?.same_file(&self.opened) {
            return Ok(()); // replaced meanwhile: what was read proves nothing
        }
        if let Some(tip) = self.tip.as_mut() {
            tip.proof = Some(Proof {
                index: tip.index,
                sha256,
            });
            self.tip_changed = true;
        }
        self.persist()
    }

    /// Checkpoint the WAL over what is staged (see the module docs).
    pub fn checkpoint(&mut self) -> Result<Checkpoint> {
        self.prepare()?;
        if self.tip.is_none() {
            return Ok(Checkpoint::Skipped);
        }
        if self.pin_state != Pin::Guarding {
            // Unread commits may predate the pin: read them, and only the barrier can move
            // it so that it guards.
            let outside = self.cut_until_small()?;
            if matches!(outside, Cut::Broken(_) | Cut::Held) {
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
            self.hand_off_pin()?;
            self.alone = false;
            let control = open_control(&mut self.control, &self.pin, &self.opened, &self.name)?;
            let (_, copied) = run_checkpoint(&self.name, control)?;
            let fresh = copied_before.map_or(copied, |before| copied.saturating_sub(before));
            copied_before = Some(copied);
            if fresh <= SMALL_CUT_FRAMES {
                break;
            }
        }
        let outside = self.cut_until_small()?;
        if matches!(outside, Cut::Broken(_) | Cut::Held) {
            return Ok(Checkpoint::Skipped);
        }
        // What committed meanwhile, then a fresh pin so the next writer can restart the WAL.
        let (cut, complete) = self.under_barrier(|r| {
            let cut = r.cut()?;
            if matches!(cut, Cut::Broken(_) | Cut::Held) {
                return Ok((cut, false));
            }
            r.pin.release()?;
            let copied = run_checkpoint(&r.name, &r.pin);
            r.pin.pin()?;
            r.pin_state = Pin::Guarding;
            r.pinned_at = Some(r.wal_look()?);
            let (complete, _) = copied?;
            if complete {
                r.note_backfilled()?;
            }
            Ok((cut, complete))
        })?;
        self.persist()?;
        if complete {
            self.truncate_if_large()?;
        }
        Ok(match cut {
            Cut::Broken(_) | Cut::Held => Checkpoint::Skipped,
            _ if complete => Checkpoint::Complete,
            _ => Checkpoint::Partial,
        })
    }

    /// The next object to upload, if none is out for upload now. Uploads go one at a time,
    /// in order, only up to the saved tip, and only once the tip is reconciled with
    /// storage; report each with [`Replica::upload_done`].
    pub fn next_upload(&mut self) -> Result<Option<Upload>> {
        if self.uploading || !self.reconciled {
            return Ok(None);
        }
        let Some(front) = self.staged.front() else {
            return Ok(None);
        };
        if front.seq > self.saved_seq {
            return Ok(None);
        }
        let file = File::open(&front.path)
            .context(|| format!("{}: opening staged {}", self.name, front.path.display()))?;
        self.uploading = true;
        Ok(Some(Upload {
            key: front.object.key(&self.name),
            file,
        }))
    }

    /// An upload handed out by [`Replica::next_upload`] succeeded. Returns true when it was a
    /// snapshot, after which `state.json` is worth rewriting ([`Replica::state_object`]); the
    /// caller does that, so that a hundred databases do not all write at once.
    pub fn upload_done(&mut self, key: &str) -> Result<bool> {
        let front = match self.staged.front() {
            Some(s) if self.uploading && s.object.key(&self.name) == key => s.clone(),
            _ => {
                return Err(Error::new(
                    crate::ErrorKind::Other,
                    format!("{}: upload of {key} finished out of order", self.name),
                ))
            }
        };
        self.uploading = false;
        self.staged.pop_front();
        if let Err(e) = self.sidecar.remove(&front) {
            // Stored all the same; a later start uploads the same bytes again.
            log::warn!("{}: {e}", self.name);
        }
        let object = front.object;
        self.stored = Some((object.generation.clone(), object.index));
        Ok(object.kind == ObjectKind::Snapshot)
    }

    /// An upload handed out by [`Replica::next_upload`] could not be completed (walsync is
    /// stopping): a later call hands it out again.
    pub fn upload_returned(&mut self, _upload: Upload) {
        self.uploading = false;
    }

    /// Upload everything staged, in order, from this thread (after reconciling with
    /// storage, if that is still to do: then a new generation may start first).
    pub fn flush(&mut self) -> Result<()> {
        if !self.reconciled {
            self.reconcile()?;
            if self.lost.is_some() {
                self.poll()?;
            }
        }
        while let Some(upload) = self.next_upload()? {
            let stored = self
                .storage
                .put_file(&upload.key, &upload.file)
                .context(|| format!("{}: uploading {}", self.name, upload.key));
            let key = upload.key.clone();
            if let Err(e) = stored {
                self.upload_returned(upload);
                return Err(e);
            }
            log::info!("{}: stored {key}", self.name);
            if self.upload_done(&key)? {
                if let Err(e) = self.write_state() {
                    // Only `list` reads state.json; the snapshot itself is stored.
                    log::warn!("{}: {e}", self.name);
                }
            }
        }
        Ok(())
    }

    /// The listing of this name taken when the replica was opened (once; see
    /// [`crate::retention`] on why an older listing is safe to prune from).
    pub fn take_opening_listing(
        &mut self,
    ) -> Option<std::collections::BTreeMap<Generation, layout::GenerationObjects>> {
        self.opening_listing.take()
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

    /// The key and content of `state.json` as of the newest stored object (None before any).
    pub fn state_object(&self) -> Result<Option<(String, Vec<u8>)>> {
        let (Some((generation, index)), Some(tip)) = (&self.stored, &self.tip) else {
            return Ok(None);
        };
        let state = ReplicaState {
            name: self.name.clone(),
            generation: generation.to_string(),
            index: *index,
            updated: UtcTime::now().to_rfc3339(),
            page_size: tip.page_size,
            source: self.source(),
            walsync_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let body = serde_json::to_vec_pretty(&state)?;
        Ok(Some((layout::state_key(&self.name), body)))
    }

    // ----- steps -----

    /// Before any step: save a tip that an earlier step could not save, follow a database
    /// file replaced by rename, and make sure the pin is held.
    fn prepare(&mut self) -> Result<()> {
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

    /// Cut the committed frames after the tip into a staged segment.
    fn cut(&mut self) -> Result<Cut> {
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
            Continuity::NoWal => return Ok(Cut::Idle),
            Continuity::From(start) => start,
        };
        let Some(reader) = reader.as_mut() else {
            return Ok(Cut::Idle);
        };
        reader.seek(start);
        let header = *reader.header();
        if !reader.may_hold_frame()? {
            self.note_reached(&header, start.offset);
            return Ok(Cut::Idle);
        }
        let generation = Generation::parse(&tip.generation)
            .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
        let draft = self.sidecar.draft()?;
        let segment = match segment::cut(reader, tip.chain, &draft.file) {
            Ok(Some(segment)) => segment,
            Ok(None) => {
                // Frames of a transaction not committed yet; the draft is removed on drop.
                self.note_reached(&header, start.offset);
                return Ok(Cut::Idle);
            }
            Err(e) if e.kind() == crate::ErrorKind::Corrupt => {
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
            generation,
            index: tip.index + 1,
            time: self.next_time(&tip),
        };
        let staged = self.sidecar.stage(draft, tip.seq + 1, &object, false)?;
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
    fn cut_until_small(&mut self) -> Result<Cut> {
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

    /// Move a guarding pin to the present without the barrier: a read transaction is
    /// opened on the control connection first, then the old one ends, and the two
    /// connections trade roles. One of them holds a read transaction at every moment, so
    /// the pin goes on guarding: on a read mark above 0 the new one keeps any writer from
    /// restarting the WAL; SQLite gives it read mark 0 only when every frame in the WAL is
    /// in the database file already, which the old pin allowed only for frames that were
    /// in the WAL when it was taken, and those the tip has read (it guards). What commits
    /// after the new pin was taken stays unread, as after any pin: the next cut reads it.
    ///
    /// Unlike a repin under the barrier, the new pin is not aligned with the tip, so it is
    /// not a base for a snapshot; it serves checkpoints and [`Replica::follow_restart`].
    fn hand_off_pin(&mut self) -> Result<()> {
        debug_assert_eq!(self.pin_state, Pin::Guarding);
        self.alone = false;
        open_control(&mut self.control, &self.pin, &self.opened, &self.name)?.pin()?;
        let Some(new_pin) = self.control.take() else {
            return Err(Error::new(ErrorKind::Other, "control connection vanished"));
        };
        let old = std::mem::replace(&mut self.pin, new_pin);
        // If ending it fails, closing the connection ends it (and the next step opens a
        // new control connection).
        self.pinned_at = None;
        old.release()?;
        self.control = Some(old);
        Ok(())
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
    pub fn follow_restart(&mut self) -> Result<bool> {
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
        self.hand_off_pin()?;
        log::debug!(
            "{}: the WAL was written to since the pin was taken: handed off",
            self.name
        );
        Ok(true)
    }

    /// Under the barrier: cut the last commits and move the pin to the present, so that it
    /// guards. (Nothing commits meanwhile.)
    fn cut_rest_and_repin(&mut self) -> Result<Cut> {
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

    /// Where reading the WAL resumes after the tip, or why continuity is lost.
    fn continuity(
        &mut self,
        tip: &Position,
        reader: Option<&WalReader>,
        identity: &FileIdentity,
    ) -> Result<Continuity> {
        if !identity.same_file(&tip.db) {
            return Ok(Continuity::Lost("the database file was replaced".into()));
        }
        // Nothing that was committed can have left the WAL unread: the pin guards, or the
        // database file still holds exactly the state at the tip (checked by content, and
        // only when needed: it reads the whole file).
        let guarded = self.pin_state == Pin::Guarding;
        let header = reader.map(|r| *r.header());
        let same_wal = match (header, tip.wal) {
            (Some(header), Some(mark)) if header.salt == mark.salt => Some(mark),
            _ => None,
        };
        let proven = !guarded && same_wal.is_none() && self.proves_unchanged(tip)?;
        if proven {
            self.pin_state = Pin::Guarding;
        }
        let Some(reader) = reader else {
            if !(guarded || proven) {
                return Ok(Continuity::Lost(
                    "the WAL was checkpointed away while walsync was not holding it, and the \
                     database file no longer holds what was last replicated"
                        .into(),
                ));
            }
            // The pin, taken before this check, guards from now on.
            self.pin_state = Pin::Guarding;
            return Ok(Continuity::NoWal);
        };
        let header = *reader.header();
        if header.page_size != tip.page_size {
            return Ok(Continuity::Lost(format!(
                "page size changed from {} to {}",
                tip.page_size, header.page_size
            )));
        }
        let start = match same_wal {
            Some(mark) => {
                if !reader.still_holds(mark.end)? {
                    return Ok(Continuity::Lost(
                        "the WAL no longer holds the frames last read".into(),
                    ));
                }
                mark.end
            }
            // The WAL restarted (or appeared) since the tip: every frame in it is newer.
            None if guarded || proven => WalPosition {
                offset: HEADER_SIZE,
                checksum: header.checksum,
            },
            None => {
                return Ok(Continuity::Lost(
                    "the WAL was checkpointed and restarted while walsync was not holding it, \
                     and the database file no longer holds what was last replicated"
                        .into(),
                ))
            }
        };
        Ok(Continuity::From(start))
    }

    /// Whether the database file still holds exactly the state at the tip: its digest is
    /// the tip's proof (see the module docs).
    fn proves_unchanged(&self, tip: &Position) -> Result<bool> {
        let Some(proof) = tip.proof.as_ref().filter(|p| p.index == tip.index) else {
            return Ok(false);
        };
        let sha256 = self
            .pin
            .content_digest()
            .map_err(|e| e.with_context(self.name.clone()))?;
        let same = sha256 == proof.sha256;
        log::debug!(
            "{}: the database file {} the state last replicated",
            self.name,
            if same {
                "still holds"
            } else {
                "no longer holds"
            }
        );
        Ok(same)
    }

    /// Start a new generation because of `reason`: under the barrier, note where the
    /// committed WAL ends and move the pin there; then snapshot through the pin.
    fn new_generation(&mut self, reason: &str) -> Result<String> {
        if self.tip.is_some() {
            log::warn!("{}: starting a new generation: {reason}", self.name);
        } else {
            log::info!("{}: starting the first generation", self.name);
        }
        let mut marked = None;
        for _ in 0..3 {
            self.follow_replacement()?;
            let known = self.committed_end()?;
            marked = self.under_barrier(|r| {
                let identity = FileIdentity::of(r.pin.path())?;
                if !identity.same_file(&r.opened) {
                    return Ok(None); // replaced just now: follow it, then try again
                }
                let end = r.committed_end_after(known)?;
                r.repin()?;
                // Guarding only once the new generation's base is in place (below): until
                // then the tip is the old one, whose continuity is lost.
                r.pin_state = Pin::Behind(None);
                Ok(Some((end, identity)))
            })?;
            if marked.is_some() {
                break;
            }
        }
        let (end, identity) = marked.ok_or_else(|| {
            Error::invalid(format!(
                "{}: {} keeps being replaced",
                self.name,
                self.pin.path().display()
            ))
        })?;
        let previous = self.tip.as_ref();
        let newest = previous
            .and_then(|t| Generation::parse(&t.generation))
            .max(self.newest_stored.clone());
        let generation = Generation::after(newest.as_ref());
        let base = Position {
            destination: self.storage.describe(),
            name: self.name.clone(),
            generation: generation.as_str().to_string(),
            index: 0,
            page_size: self.pin.page_size()?,
            chain: ChainValue::of_generation(&generation).0,
            time_ms: previous.map_or(0, |t| t.time_ms),
            seq: self.next_seq() - 1,
            wal: end,
            db: identity,
            path: Some(self.absolute_path()),
            host: Some(hostname()),
            proof: None,
            leftovers: previous.map_or_else(|| self.leftovers.clone(), |t| t.leftovers.clone()),
        };
        self.backfilled = None;
        let key = self.stage_snapshot(base)?;
        // The pin was moved under the barrier to exactly where the new base is.
        self.pin_state = Pin::Guarding;
        self.lost = None;
        Ok(key)
    }

    /// Copy the pinned database into a staged snapshot at `tip` (the position the pin sees:
    /// the current tip, or a new generation's base), and count it.
    fn stage_snapshot(&mut self, mut tip: Position) -> Result<String> {
        let generation = Generation::parse(&tip.generation)
            .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
        let draft = self.sidecar.draft()?;
        let scratch = self.sidecar.scratch_database();
        let db_size = snapshot::take(&self.pin, scratch, tip.chain, &draft.file)
            .context(|| format!("{}: taking a snapshot", self.name))?;
        self.release_memory();
        let object = ObjectName {
            kind: ObjectKind::Snapshot,
            generation,
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
    fn persist(&mut self) -> Result<()> {
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

    /// Under the barrier, after a complete checkpoint: remember it.
    fn note_backfilled(&mut self) -> Result<()> {
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
    fn truncate_if_large(&mut self) -> Result<()> {
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

    /// Hold the barrier (the application's write lock) around `f`, and always release it.
    /// How long it was held is logged at debug level (`scripts/bench.sh` reads it).
    fn under_barrier<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
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
    fn follow_replacement(&mut self) -> Result<()> {
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

    /// Free the connections' cached pages: an idle database should cost little memory.
    fn release_memory(&self) {
        if let Some(control) = &self.control {
            control.release_memory();
        }
        self.pin.release_memory();
    }

    /// Give back what an idle database need not keep resident: the control connection
    /// (opened again for the next checkpoint), the pin's cached pages and this process's
    /// view of the wal-index (see [`Database::forget_wal_index_pages`]). Called when the
    /// database's thread goes to sleep. The pin stays: it is what keeps the WAL in place.
    ///
    /// Closing the control connection frees no descriptor while the pin holds its lock
    /// (see [`Database::close_in_place`]), so a database quiet for
    /// [`ONE_CONNECTION_AFTER`] also opens the pin's connection afresh (`rest_alone`):
    /// from then on it holds three descriptors (database, WAL, `-shm`) and the sidecar lock,
    /// instead of four and the lock.
    pub fn rest(&mut self) {
        self.control = None;
        if !self.alone && self.last_read.elapsed() >= self.one_connection_after {
            if let Err(e) = self.rest_alone() {
                log::debug!("{}: resting on one connection: {e}", self.name);
            }
        }
        self.release_memory();
        self.pin.forget_wal_index_pages();
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
        if self.tip.is_none() || self.lost.is_some() || !self.all_read()? {
            return Ok(()); // something to read or decide first: the next step does it
        }
        let before = (self.committed_end()?, written(self.pin.path())?);
        if before.1 .1 > now_ns() - UNWRITTEN_FOR.as_nanos() as i128 {
            return Ok(()); // written too recently to tell a write in the gap apart
        }
        self.pin.close_in_place()?;
        #[cfg(test)]
        if let Some(gap) = self.between_connections.as_mut() {
            gap();
        }
        self.pin.open_again()?;
        self.pin.pin()?;
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

    /// Move the pin to the present (call under the barrier, so nothing commits meanwhile).
    fn repin(&mut self) -> Result<()> {
        self.pin.release()?;
        self.pin.pin()?;
        self.pinned_at = Some(self.wal_look()?);
        Ok(())
    }

    /// The WAL's salts (None without a valid header) and file size, right now.
    fn wal_look(&self) -> Result<WalLook> {
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
    fn pin_state_now(&self) -> Result<Pin> {
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
    fn note_reached(&mut self, header: &WalHeader, offset: u64) {
        if let Pin::Behind(Some((salt, end))) = self.pin_state {
            if salt == header.salt && offset >= end {
                self.pin_state = Pin::Guarding;
            }
        }
    }

    /// Where the committed part of the WAL ends right now (under the barrier, or after
    /// pinning).
    /// Whether every commit in the WAL has been read: there is no WAL, it holds no commit,
    /// or its last commit is where the tip is.
    fn all_read(&self) -> Result<bool> {
        let tip = self.tip.as_ref().and_then(|t| t.wal);
        Ok(match self.committed_end()? {
            None => true,
            Some(now) if now.end.offset == HEADER_SIZE => true,
            Some(now) => tip.is_some_and(|tip| tip.salt == now.salt && tip.end == now.end),
        })
    }

    fn committed_end(&self) -> Result<Option<WalMark>> {
        self.committed_end_after(None)
    }

    /// [`Replica::committed_end`], scanning only from `known` on if the WAL still holds it
    /// (a place found a moment earlier): under the barrier, reading a large WAL from the
    /// top would keep the application waiting.
    fn committed_end_after(&self, known: Option<WalMark>) -> Result<Option<WalMark>> {
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
            crate::ErrorKind::Transient,
            format!(
                "{}: staging is full ({} MiB not yet stored); try again once uploads catch up",
                self.name,
                self.staged_bytes() >> 20
            ),
        )
    }

    /// `host:/absolute/path` of this database, as recorded in `state.json`.
    fn source(&self) -> String {
        format!("{}:{}", hostname(), self.absolute_path())
    }

    /// The database's absolute path, as recorded in the position and in `state.json`.
    fn absolute_path(&self) -> String {
        absolute_path(self.pin.path())
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
fn pick_up_staged(
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

/// Open the pin's connection (retrying if the path is replaced meanwhile) and pin the WAL.
/// The control connection is opened when first needed ([`open_control`]): a database
/// that needs neither a barrier nor a checkpoint, as on a restart with nothing new, never
/// holds a second connection (whose descriptor SQLite would keep, see
/// [`Database::close_in_place`]).
fn open_pin(path: &Path) -> Result<(Database, FileIdentity)> {
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
fn open_control<'a>(
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

/// Run a PASSIVE checkpoint on `conn` (which must not be in a transaction: SQLite refuses
/// to checkpoint inside one). Returns whether every frame was copied, and how many frames
/// of the WAL are in the database file now.
fn run_checkpoint(name: &str, conn: &Database) -> Result<(bool, u64)> {
    let (busy, log_frames, copied): (i64, i64, i64) = conn
        .connection()?
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .context(|| format!("{name}: checkpoint"))?;
    log::debug!("{name}: checkpoint: busy={busy} log={log_frames} copied={copied}");
    Ok((
        busy == 0 && log_frames == copied,
        u64::try_from(copied).unwrap_or(0),
    ))
}

fn mark(header: &WalHeader, end: WalPosition) -> WalMark {
    WalMark {
        salt: header.salt,
        end,
    }
}

/// `path` made absolute (as it is, if that fails), as text.
fn absolute_path(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.into())
        .display()
        .to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStorage;
    use rusqlite::Connection;

    fn setup(dir: &Path) -> (Connection, Replica) {
        let path = dir.join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.join("bucket")));
        let mut replica = Replica::open(&path, storage, "app").unwrap();
        replica.sync().unwrap();
        (app, replica)
    }

    /// Restore `app` from the test's bucket; the rows of `t` in the restored database and in
    /// the application's.
    fn restored_and_source_rows(dir: &Path) -> (i64, i64) {
        let out = dir.join("restored.db");
        let storage = FileStorage::new(dir.join("bucket"));
        crate::restore::restore(&storage, "app", &out, &Default::default()).unwrap();
        let count = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap()
        };
        (count(&out), count(&dir.join("app.db")))
    }

    /// An application write that must not wait for walsync.
    fn write_now(app: &Connection) -> rusqlite::Result<()> {
        app.busy_timeout(Duration::ZERO)?;
        app.execute_batch("INSERT INTO t VALUES (2);")
    }

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
        let app = Connection::open(&db).unwrap();
        write_now(&app).unwrap();
        replica.sync().unwrap();
        let (restored, source) = restored_and_source_rows(dir.path());
        assert_eq!((restored, source), (2, 2));
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

    /// Transactions larger than a cut holds in memory (1 MiB): one committed, one still
    /// open with its frames already spilled into the WAL. Only the committed one ships;
    /// once the other commits it ships too, and a restore has both.
    #[test]
    fn transactions_larger_than_the_cut_buffer_ship_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        let insert = |conn: &Connection, n: i64| {
            let sql = format!(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) \
                 INSERT INTO t SELECT randomblob(3000) FROM s;"
            );
            conn.execute_batch(&sql).unwrap();
        };
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

    /// The application's PASSIVE checkpoint: (frames in the WAL, frames copied).
    fn app_checkpoint(app: &Connection) -> (i64, i64) {
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .unwrap()
    }

    fn insert_rows(app: &Connection, n: i64) {
        app.execute_batch(&format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) \
             INSERT INTO t SELECT randomblob(1000) FROM s;"
        ))
        .unwrap();
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
        insert_rows(&app, 50);
        replica.poll().unwrap();
        assert_eq!(replica.checkpoint().unwrap(), Checkpoint::Complete);
        assert!(!replica.follow_restart().unwrap(), "nothing written yet");

        insert_rows(&app, 50); // restarts the WAL
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
        insert_rows(&app, 50);
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
        insert_rows(&app, 10);
        assert!(replica.follow_restart().unwrap());
        let (_, copied) = app_checkpoint(&app);
        assert!(copied > 0, "still on read mark 0");
        let mut rows = 10;
        for round in 0..40 {
            insert_rows(&app, 7);
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

    /// A database that rested (control connection closed, wal-index pages given back)
    /// checkpoints as before: the control connection opens again on the same file, the
    /// barrier is released, and a restore has every row.
    #[test]
    fn a_rested_database_checkpoints_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let (app, mut replica) = setup(dir.path());
        replica.rest();
        assert!(replica.control.is_none());
        app.execute_batch(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 300) \
             INSERT INTO t SELECT randomblob(3000) FROM s;",
        )
        .unwrap();
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

    /// Whose position it is: a copy elsewhere (another path) is foreign; another inode at
    /// the same path is foreign only when another host saved the position (a copy put in
    /// place there), not on this host (a file renamed over the database: a replacement,
    /// whose old staged objects are still uploaded); the same file under a new host name
    /// (a container restarted) is ours; positions saved before walsync recorded the path
    /// and host are judged by nothing they lack.
    #[test]
    fn a_position_belongs_to_its_path_and_file_not_to_a_copy() {
        let file = FileIdentity {
            dev: 1,
            ino: 10,
            size: 4096,
            mtime_ns: 0,
        };
        let other_inode = FileIdentity { ino: 11, ..file };
        let position = |path: Option<&str>, host: Option<&str>| Position {
            destination: "file:///b".into(),
            name: "app".into(),
            generation: "0123456789abcdef".into(),
            index: 3,
            page_size: 4096,
            chain: [1, 2],
            time_ms: 0,
            seq: 4,
            wal: None,
            db: file,
            path: path.map(str::to_string),
            host: host.map(str::to_string),
            proof: None,
            leftovers: Vec::new(),
        };
        let here = hostname();
        let ours = position(Some("/data/app.db"), Some(&here));
        assert!(!ours.is_foreign(&file, "/data/app.db"));
        assert!(ours.is_foreign(&file, "/staging/app.db"));
        assert!(!ours.is_foreign(&other_inode, "/data/app.db"));
        let other_host = position(Some("/data/app.db"), Some("another-host"));
        assert!(other_host.is_foreign(&other_inode, "/data/app.db"));
        assert!(!other_host.is_foreign(&file, "/data/app.db"));
        let old = position(None, None);
        assert!(!old.is_foreign(&other_inode, "/anywhere/app.db"));
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
