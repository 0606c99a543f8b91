//! One database's thread: it owns the [`Replica`], sleeps on a channel, and on each wake
//! does whatever its [`Agenda`] says is due, in one fixed order (see [`DbWorker::step`]):
//! ask for a prune, ship, snapshot, checkpoint, settle before a stop, hand out the next
//! upload, answer syncs. Uploads and prunes run on other threads (the upload pool, the
//! pruner) and come back as events, so this thread waits for local work only, and for
//! storage only in the LIST that reconciles its replica.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lag::LagTracker;
use super::mailbox::{mailbox, Inbox, Post};
use super::options::{Options, PRUNE_INTERVAL};
use super::pruner::PruneRequest;
use crate::backoff::Backoff;
use crate::database::Checkpoint;
use crate::error::{Error, Result};
use crate::files::FileIdentity;
use crate::gate::Pass;
use crate::metrics::DbMetrics;
use crate::replica::{Replica, SyncOutcome, Upload};
use crate::storage::Storage;
use crate::uploader::UploadPool;

/// What a [`DbWorker`] may take on x86-64 (see there), checked by a test.
#[cfg(test)]
const WORKER_SIZE_BUDGET: usize = 1340;

/// After a failed checkpoint, wait this long before the next; and at most this long after
/// checkpoints that could not finish (see [`checkpoint_pause`]).
const CHECKPOINT_RETRY: Duration = Duration::from_secs(10);

/// How long to wait before the next checkpoint after one that ended as `result`, the
/// `misses`-th in a row that did not finish.
///
/// After a complete one: `min_interval` (under fast small transactions the threshold is
/// reached several times a second, and each checkpoint takes the write lock). After a
/// partial one: a reader held old frames, for a moment or for as long as its read
/// transaction lasts; walsync cannot tell which, and each try takes the write lock. So
/// `min_interval` after the first, then twice as long each time, up to
/// [`CHECKPOINT_RETRY`]. (A flat 10 s after any partial checkpoint let a writer that never
/// pauses grow the WAL to 40-60 MiB after a reader that was gone a millisecond later.)
/// After a failed or skipped one (staging full, continuity lost): [`CHECKPOINT_RETRY`].
fn checkpoint_pause(result: &Result<Checkpoint>, misses: u8, min_interval: Duration) -> Duration {
    match result {
        Ok(Checkpoint::Complete) => min_interval,
        Ok(Checkpoint::Partial) => min_interval
            .saturating_mul(1 << misses.saturating_sub(1).min(4))
            .min(CHECKPOINT_RETRY),
        _ => CHECKPOINT_RETRY,
    }
}

/// While the WAL changes, look at most this often whether it outgrew the tip (see
/// [`DbWorker::note_outgrown`]).
const OUTGROWN_PROBE: Duration = Duration::from_millis(10);

/// Waits between tries to reach storage for a database that could not be reconciled at
/// start (see [`Replica::reconcile`]).
const RECONCILE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// After a local error (reading the WAL, taking a snapshot), wait this long, then retry.
const ERROR_RETRY: Duration = Duration::from_secs(5);

/// The same while stopping, when the shutdown deadline is near.
const STOP_RETRY: Duration = Duration::from_secs(1);

/// How many replicas list storage to reconcile at once (see [`crate::gate`]): a host of
/// databases starting together would otherwise open a connection (and its 64 KiB of
/// buffers) each. A LIST is mostly waiting for storage, so the gate stays wide: at 16 or
/// 64, a restart of 1,000 databases against the test server took a minute (it lists a
/// prefix in about a second), against 3 s with every one at once.
static RECONCILING: crate::gate::Gate = crate::gate::Gate::new(256);

/// A database at rest (see [`Replica::at_rest`]) re-checks its WAL without an event this
/// many times less often than `Options::safety_interval`: every minute by default. Each
/// such wake takes the sidecar lock back, reads the WAL's header and rests again, about
/// 0.8 ms of CPU; at every 10 s, 2,000 idle databases kept 15% of a core busy (measured),
/// so 10,000 would have kept most of one. Events still wake it at once: the re-check is
/// only for an event lost.
const RESTING_SAFETY_FACTOR: u32 = 6;

/// While descriptors are short, a busy database wakes this often to see whether it can rest
/// (and give back what others wait for): a second more than [`DbWorker::run`] needs to rest.
const SHORT_OF_DESCRIPTORS_WAKE: Duration = Duration::from_secs(2);

/// What wakes a database thread.
pub(super) enum Event {
    /// The WAL or database file changed.
    Changed,
    /// An upload finished (stored, or handed back at shutdown). Boxed: a channel keeps a
    /// block of 31 slots of the largest event per database, 3 KiB unboxed.
    Uploaded(Box<(Upload, Result<()>)>),
    /// Ship now, ignoring `min_interval`, and answer once everything is stored.
    Sync(Sender<Result<()>>),
    /// Snapshot now, and answer with its key once it is stored.
    Snapshot(Sender<Result<String>>),
    /// Ship what is left, wait for uploads until the deadline, write state.json, exit.
    Stop(Instant),
    /// The database is no longer replicated ([`super::Replicator::remove`], or its file left a
    /// watched directory): as `Stop`, but if its file is gone, read nothing more and only
    /// upload what is staged.
    Remove(Instant),
}

/// The state of one database thread, boxed (see [`DbWorker::run`]): one allocation a
/// database for as long as it is replicated, so its size counts. musl's malloc, in the
/// static build, serves 1,341 to 1,628 bytes from 1,632-byte slots and up to 1,340 bytes from
/// 1,344-byte ones: this stays at or under [`WORKER_SIZE_BUDGET`] (the options are shared
/// rather than copied into each worker, and waiters kept in a map without a hasher's keys).
pub(super) struct DbWorker {
    replica: Replica,
    events: Inbox<Event>,
    own_sender: Post<Event>,
    pool: Arc<UploadPool>,
    options: Arc<Options>,
    /// Where to ask for this database to be pruned (None: retention is off).
    prune: Option<Sender<PruneRequest>>,
    agenda: Agenda,
    metrics: Arc<DbMetrics>,
    reconcile_backoff: Backoff,
    lag: LagTracker,
    /// Found by a directory watch: a file that goes away is expected (the directory watch
    /// removes the database), not an error worth a line every few seconds.
    from_directory: bool,
    /// Its place in the descriptor budget ([`crate::limits::BUSY`]): held from before
    /// anything is done until the replica rests with a resting database's descriptors.
    busy: Option<Pass<'static>>,
}

/// Someone waiting for an object to be stored.
enum Waiter {
    Sync(Sender<Result<()>>),
    Snapshot(Sender<Result<String>>),
}

impl Waiter {
    fn answer(self, result: Result<&str>) {
        match (self, result) {
            (Waiter::Sync(tx), Ok(_)) => drop(tx.send(Ok(()))),
            (Waiter::Snapshot(tx), Ok(key)) => drop(tx.send(Ok(key.to_string()))),
            (Waiter::Sync(tx), Err(e)) => drop(tx.send(Err(e))),
            (Waiter::Snapshot(tx), Err(e)) => drop(tx.send(Err(e))),
        }
    }
}

/// What a database thread is waiting to do: the one schedule every step reads.
#[derive(Default)]
struct Agenda {
    /// The WAL may hold new commits.
    dirty: bool,
    /// Ship now regardless of `min_interval`.
    force: bool,
    last_ship: Option<Instant>,
    last_snapshot: Option<Instant>,
    changed_since_snapshot: bool,
    next_checkpoint: Option<Instant>,
    /// Checkpoints in a row that did not finish (0 after a complete one). After none or one
    /// partial one, a WAL that outgrows the tip may have the next before `next_checkpoint`.
    checkpoint_misses: u8,
    /// The last look for a checkpoint was before `next_checkpoint`: the thread wakes then
    /// to look again.
    checkpoint_waiting: bool,
    /// The WAL holds `restart_frames` frames or more past the tip: read and checkpoint now.
    outgrown: bool,
    /// When [`DbWorker::note_outgrown`] last looked.
    probed: Option<Instant>,
    /// After a local error, nothing runs before this.
    retry_at: Option<Instant>,
    /// Sync requests not yet tied to an object.
    sync_requests: Vec<Sender<Result<()>>>,
    snapshot_requests: Vec<Sender<Result<String>>>,
    /// Requests answered when the object with this key is stored.
    waiters: BTreeMap<String, Vec<Waiter>>,
    /// A prune is wanted (at start, and after a snapshot is stored).
    prune_due: bool,
    /// Snapshots stored since this thread started.
    snapshots_stored: u32,
    last_prune: Option<Instant>,
    /// Stopping: walsync must be gone by then.
    stop: Option<Instant>,
    /// Stopping, and everything committed is staged and the tip settled (see
    /// [`Replica::settle`]).
    settled: bool,
    /// Storage could not be reached to reconcile the replica: try again then.
    reconcile_at: Option<Instant>,
    /// The reconciling gate was full: try again at once (see [`RECONCILING`]).
    gate_full: bool,
    /// The descriptor budget had no place: try again at once (see [`DbWorker::enter_budget`]).
    budget_full: bool,
    /// Removed (see [`Event::Remove`]): stopping, and not to be replicated again.
    removing: bool,
    /// Removed, and its file is gone: nothing more can be read, only staged objects go.
    gone: bool,
}

impl DbWorker {
    /// The state of a database's thread about to start: the WAL to be looked at, a
    /// snapshot counted as just taken, and a prune due at once (old backups go even if no
    /// snapshot is due for a while). `pool` is the upload pool all databases share; `prune`
    /// is where to ask for prunes, if retention is on.
    pub(super) fn new(
        pool: Arc<UploadPool>,
        options: Arc<Options>,
        replica: Replica,
        prune: Option<Sender<PruneRequest>>,
        (own_sender, events): (Post<Event>, Inbox<Event>),
        metrics: Arc<DbMetrics>,
        from_directory: bool,
    ) -> DbWorker {
        // Not caught up until the thread has looked at the WAL.
        let lag = LagTracker::started();
        metrics.set_unstored_since(lag.since());
        DbWorker {
            metrics,
            replica,
            events,
            own_sender,
            pool,
            options,
            prune,
            reconcile_backoff: RECONCILE_BACKOFF,
            lag,
            from_directory,
            busy: None,
            agenda: Agenda {
                dirty: true,
                last_snapshot: Some(Instant::now()),
                // Once at start: old backups go even if no snapshot is due for a while.
                prune_due: true,
                ..Agenda::default()
            },
        }
    }

    /// Hand this database the place in the descriptor budget taken for it before it was
    /// opened (see [`crate::limits::BUSY`]).
    pub(super) fn keep_pass(&mut self, busy: Option<Pass<'static>>) {
        self.busy = busy;
    }

    /// The thread's loop. It sleeps in this frame, so the work of each wake-up is in
    /// [`DbWorker::wake`], never inlined here: an idle thread's stack then holds this small
    /// frame and those below it, and [`crate::stack::trim`] gives back what the work touched.
    /// The worker itself is boxed for the same reason: a [`DbWorker`] moved by value (into
    /// the thread's closure, then into `run`) was copied onto the stack twice, 3 KiB of
    /// frames that stayed resident while the thread slept.
    pub(super) fn run(mut self: Box<Self>) -> Result<()> {
        loop {
            let mut wait = self.next_wake();
            if wait >= Duration::from_secs(1) {
                self.rest();
                crate::stack::trim();
                // At rest now, it may re-check less often (see `RESTING_SAFETY_FACTOR`).
                wait = self.next_wake();
            }
            let received = self.events.recv_timeout(wait);
            if let Some(deadline) = self.wake(received)? {
                return self.finish(deadline);
            }
        }
    }

    /// Going idle: the memory this database touched while busy goes back, and so do the
    /// buffers its lists grew meanwhile, each while it is empty (the next use allocates
    /// again).
    #[inline(never)]
    fn rest(&mut self) {
        self.replica.rest();
        if self.replica.at_rest() {
            self.busy = None;
        }
        self.events.shrink();
        self.lag.shrink();
        let agenda = &mut self.agenda;
        if agenda.sync_requests.is_empty() {
            agenda.sync_requests = Vec::new();
        }
        if agenda.snapshot_requests.is_empty() {
            agenda.snapshot_requests = Vec::new();
        }
        if agenda.waiters.is_empty() {
            agenda.waiters = BTreeMap::new();
        }
    }

    /// Handle what woke the thread (an event, the timeout, or the last sender gone) and
    /// whatever else arrived meanwhile, then do what is due. Returns the shutdown deadline
    /// once the thread should finish, and an error once this database can no longer be
    /// replicated.
    #[inline(never)]
    fn wake(&mut self, received: Result<Event, RecvTimeoutError>) -> Result<Option<Instant>> {
        match received {
            Ok(event) => self.handle(event),
            Err(RecvTimeoutError::Timeout) => self.agenda.dirty = true,
            Err(RecvTimeoutError::Disconnected) => {
                self.agenda.stop.get_or_insert_with(Instant::now);
            }
        }
        // Coalesce whatever else arrived meanwhile.
        while let Some(event) = self.events.try_recv() {
            self.handle(event);
        }
        if !self.enter_budget() {
            // Nothing can be done without descriptors; past the deadline, give up. The lag
            // still counts what waits meanwhile (a commit noticed above is not stored).
            self.metrics.set_unstored_since(self.lag.since());
            return Ok(self.agenda.stop.filter(|&d| Instant::now() >= d));
        }
        if let Err(e) = self.reconcile_if_due() {
            log::error!(
                "{}: {e}; this database is no longer replicated",
                self.replica.name()
            );
            return Err(e);
        }
        let stepped = self.step();
        if let Err(e) = stepped.as_ref() {
            // While stopping, try again sooner: the deadline is near.
            let retry = if self.agenda.stop.is_some() {
                STOP_RETRY
            } else {
                ERROR_RETRY
            };
            let name = self.replica.name();
            if self.from_directory && self.file_gone() {
                // Its directory watch removes it in a moment.
                log::debug!("{name}: {e} (the file is gone)");
            } else {
                log::error!("{name}: {e}; retrying in {}s", retry.as_secs());
            }
            self.agenda.retry_at = Some(Instant::now() + retry);
            for waiter in self.agenda.sync_requests.drain(..) {
                let _ = waiter.send(Err(e.clone()));
            }
        }
        // All read, if the step ran a read (`dirty` cleared) that did not fail.
        let all_read = stepped.is_ok() && !self.agenda.dirty;
        self.lag.after_step(&self.replica, all_read);
        self.metrics
            .staged(self.replica.staged_count(), self.replica.staged_bytes());
        self.metrics.set_unstored_since(self.lag.since());
        if let Some(deadline) = self.agenda.stop {
            let done = self.agenda.settled && self.replica.is_flushed();
            if done || Instant::now() >= deadline {
                return Ok(Some(deadline));
            }
        }
        Ok(None)
    }

    /// How long to sleep before looking at the WAL again without being told to.
    fn next_wake(&self) -> Duration {
        let agenda = &self.agenda;
        let now = Instant::now();
        let safety = if self.replica.at_rest() {
            self.options.safety_interval * RESTING_SAFETY_FACTOR
        } else {
            self.options.safety_interval
        };
        let mut wake = now + safety;
        if agenda.dirty {
            let allowed = agenda
                .last_ship
                .map_or(now, |t| t + self.options.min_interval);
            wake = wake.min(allowed.max(now));
        }
        if let Some(retry) = agenda.retry_at {
            wake = wake.min(retry);
        }
        if let Some(checkpoint) = agenda.next_checkpoint.filter(|_| agenda.checkpoint_waiting) {
            wake = wake.min(checkpoint);
        }
        if let Some(reconcile) = agenda.reconcile_at {
            wake = wake.min(reconcile);
        }
        if agenda.gate_full || agenda.budget_full {
            wake = now;
        }
        // Short of descriptors: look again soon whether this one can rest and give its
        // extra ones back (see `Replica::rest`), rather than at the safety interval.
        if self.busy.is_some() && !self.replica.at_rest() && crate::limits::descriptors_short() {
            wake = wake.min(now + SHORT_OF_DESCRIPTORS_WAKE);
        }
        if let Some(prune) = self.next_prune() {
            wake = wake.min(prune);
        }
        if let Some(stop) = agenda.stop {
            wake = wake.min(stop);
        }
        wake.saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    /// An object is stored: count it, and answer whoever waited for it.
    fn uploaded(&mut self, upload: Upload) {
        let key = upload.key;
        self.lag.stored(&key);
        match self.replica.upload_done(&upload.object) {
            Ok(true) => {
                drop(self.write_state());
                // A snapshot can make older objects prunable, unless it is the first this
                // name ever had: a new database's first start costs no LIST for a prune.
                self.agenda.snapshots_stored += 1;
                if self.replica.had_history() || self.agenda.snapshots_stored > 1 {
                    self.agenda.prune_due = true;
                }
            }
            Ok(false) => {}
            Err(e) => log::error!("{}: {e}", self.replica.name()),
        }
        for waiter in self.agenda.waiters.remove(&key).unwrap_or_default() {
            waiter.answer(Ok(&key));
        }
    }

    fn handle(&mut self, event: Event) {
        let agenda = &mut self.agenda;
        match event {
            Event::Changed => {
                agenda.dirty = true;
                self.lag.changed();
            }
            Event::Uploaded(done) => match *done {
                (upload, Ok(())) => self.uploaded(upload),
                (upload, Err(e)) => {
                    log::error!("{}: {e}", self.replica.name());
                    self.replica.upload_returned(upload);
                }
            },
            Event::Sync(reply) => {
                agenda.dirty = true;
                agenda.force = true;
                agenda.sync_requests.push(reply);
            }
            Event::Snapshot(reply) => agenda.snapshot_requests.push(reply),
            Event::Stop(deadline) => {
                // A removed database already leaving keeps the sooner of the two deadlines.
                agenda.stop = Some(agenda.stop.map_or(deadline, |d| d.min(deadline)));
                // A local error's retry delay must not skip the last read of the WAL.
                agenda.retry_at = None;
                agenda.dirty = true;
                agenda.force = true;
            }
            Event::Remove(deadline) => {
                agenda.stop = Some(deadline);
                agenda.removing = true;
                agenda.retry_at = None;
                agenda.dirty = true;
                agenda.force = true;
            }
        }
    }

    /// Whether the database file is no longer at its path (deleted or moved away). Only a
    /// removed database asks: while replicated, a missing file is an error to report.
    fn file_gone(&self) -> bool {
        FileIdentity::probe(self.replica.path()).is_none()
    }

    /// Do whatever is due, in this order: ask for a prune, take the sidecar lock back, ship,
    /// snapshot, checkpoint, settle before a stop, hand out the next upload, answer syncs.
    fn step(&mut self) -> Result<()> {
        // Only a request to another thread: due even while a local error waits for a retry.
        self.prune_if_due();
        if self.agenda.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        self.agenda.retry_at = None;
        if self.agenda.removing && !self.agenda.gone && self.file_gone() {
            // Nothing more can be read from a path that is gone: what is staged (and saved)
            // is all there is to ship.
            log::info!(
                "{}: {} is gone (deleted or moved away): uploading what is staged, then letting go of it",
                self.replica.name(),
                self.replica.path().display()
            );
            self.agenda.gone = true;
            self.agenda.settled = true;
        }
        if self.agenda.gone {
            self.upload_next()?;
            self.answer_syncs();
            return Ok(());
        }
        // A rest may have let the sidecar lock go: nothing below runs without it.
        self.replica.hold()?;
        if self.agenda.stop.is_none() {
            // Not once stopping: settling leaves the pin on read mark 0 on purpose.
            self.replica.follow_restart()?;
            self.note_outgrown();
        }
        self.ship()?;
        self.snapshot_if_due()?;
        self.checkpoint_if_due()?;
        self.settle_if_stopping()?;
        self.upload_next()?;
        self.answer_syncs();
        Ok(())
    }

    /// Take a place in the descriptor budget ([`crate::limits::BUSY`]) unless this database
    /// holds one: false if none came within a second (the thread tries again at once, after
    /// handling what arrived meanwhile).
    fn enter_budget(&mut self) -> bool {
        if self.busy.is_none() {
            self.busy = crate::limits::BUSY.enter_within(Duration::from_secs(1));
        }
        self.agenda.budget_full = self.busy.is_none();
        self.busy.is_some()
    }

    /// Reconcile the replica with storage if that could not be done at start (nothing is
    /// uploaded until it is; see [`Replica::reconcile`]) and the backoff allows. An error
    /// only when storage answered and refused this database the name.
    fn reconcile_if_due(&mut self) -> Result<()> {
        let now = Instant::now();
        if self.replica.is_reconciled() || self.agenda.reconcile_at.is_some_and(|t| now < t) {
            return Ok(());
        }
        let name = self.replica.name().to_string();
        // A place at the gate, or try again right after handling what arrived meanwhile
        // (a stop must not wait for a thousand other databases' LISTs).
        let Some(pass) = RECONCILING.enter_within(Duration::from_secs(1)) else {
            self.agenda.gate_full = true;
            return Ok(());
        };
        self.agenda.gate_full = false;
        let listing = self.replica.list_own();
        drop(pass);
        match listing.and_then(|listing| self.replica.reconcile_listed(listing)) {
            Ok(()) => {
                if self.agenda.reconcile_at.take().is_some() {
                    log::info!("{name}: storage answers again: uploading what was staged");
                }
                self.reconcile_backoff.restart();
                self.agenda.dirty = true;
                Ok(())
            }
            // Only a refused name ends this database's replication. Anything else (storage
            // down, credentials refused, a local limit such as RLIMIT_NOFILE while listing a
            // file:// destination) may pass: stage locally and try again.
            Err(e) if e.kind() != crate::error::ErrorKind::Invalid => {
                let wait = self.reconcile_backoff.next_jittered();
                // The error names the database already.
                log::warn!(
                    "{e}; staging locally, trying storage again in {}s",
                    wait.as_secs().max(1)
                );
                self.agenda.reconcile_at = Some(now + wait);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// When the next prune may be asked for, if one is wanted.
    fn next_prune(&self) -> Option<Instant> {
        let agenda = &self.agenda;
        // Not before the replica is reconciled: its listing is what the first prune uses.
        if self.prune.is_none()
            || !agenda.prune_due
            || agenda.stop.is_some()
            || !self.replica.is_reconciled()
        {
            return None;
        }
        let interval = PRUNE_INTERVAL.min(self.options.retention);
        Some(
            agenda
                .last_prune
                .map_or_else(Instant::now, |t| t + interval),
        )
    }

    /// Ask the pruning thread to prune this database, if one is wanted and the last was
    /// long enough ago. Never waits: the prune runs on its own thread.
    fn prune_if_due(&mut self) {
        let (Some(due), Some(prune)) = (self.next_prune(), &self.prune) else {
            return;
        };
        // After `due`: when no prune ran yet, `due` is the moment it was computed.
        let now = Instant::now();
        if now < due {
            return;
        }
        self.agenda.prune_due = false;
        self.agenda.last_prune = Some(now);
        let request = PruneRequest {
            name: self.replica.name().to_string(),
            // The first prune uses the listing taken at open; later ones list afresh.
            listing: self.replica.take_opening_listing(),
        };
        if prune.send(request).is_err() {
            log::warn!(
                "{}: the pruning thread is gone; not pruning",
                self.replica.name()
            );
            self.prune = None;
        }
    }

    /// Stage what was committed, if the WAL changed and `min_interval` allows (or forced).
    /// Once stopping and settled, nothing more is read: later commits stay in the WAL for
    /// the next start, and the stop waits only for uploads.
    fn ship(&mut self) -> Result<()> {
        let now = Instant::now();
        let agenda = &mut self.agenda;
        if agenda.settled {
            return Ok(());
        }
        let due = agenda
            .last_ship
            .is_none_or(|t| now >= t + self.options.min_interval);
        if !(agenda.dirty && (agenda.force || due)) {
            return Ok(());
        }
        agenda.dirty = false;
        agenda.force = false;
        match self.replica.poll()? {
            SyncOutcome::Idle => {}
            SyncOutcome::Shipped { .. } => {
                self.agenda.last_ship = Some(now);
                self.agenda.changed_since_snapshot = true;
            }
            SyncOutcome::NewGeneration { .. } => {
                self.agenda.last_ship = Some(now);
                self.agenda.last_snapshot = Some(now);
            }
        }
        Ok(())
    }

    /// Under heavy writes, ship and checkpoint as soon as the WAL holds `restart_frames`
    /// frames past the tip instead of at the next `min_interval`. Between two of walsync's
    /// checkpoints SQLite cannot restart the WAL, so it grows, and a WAL that grows past the
    /// end of its file costs every commit: its fsync must then also write the file's new
    /// size and blocks. Measured (60 MiB in 10-row transactions, `synchronous = FULL`, ext4):
    /// with a checkpoint once a second the WAL grew to 60-80 MiB and the writer took 1.6-1.8
    /// times as long as with no replication, where SQLite restarts a 4 MiB WAL every 1000
    /// frames; the same writer with no checkpoints at all took 1.4 times as long into a
    /// fresh WAL file and 0.8 times into one already that large.
    fn note_outgrown(&mut self) {
        let now = Instant::now();
        if self.options.restart_frames == 0
            || !self.agenda.dirty
            || self.agenda.probed.is_some_and(|t| now < t + OUTGROWN_PROBE)
        {
            return;
        }
        self.agenda.probed = Some(now);
        match self.replica.wal_outgrew_tip(self.options.restart_frames) {
            Ok(true) => {
                self.agenda.force = true;
                self.agenda.outgrown = true;
            }
            Ok(false) => {}
            // Only a hint: the read that follows reports what is wrong.
            Err(e) => log::debug!("{}: looking at the WAL: {e}", self.replica.name()),
        }
    }

    /// Snapshot when asked to, or every `snapshot_interval` while the database changes.
    fn snapshot_if_due(&mut self) -> Result<()> {
        let now = Instant::now();
        let agenda = &mut self.agenda;
        let interval_due = agenda.changed_since_snapshot
            && agenda
                .last_snapshot
                .is_none_or(|t| now >= t + self.options.snapshot_interval);
        if agenda.stop.is_some() || (agenda.snapshot_requests.is_empty() && !interval_due) {
            return Ok(());
        }
        let requests = std::mem::take(&mut agenda.snapshot_requests);
        match self.replica.queue_snapshot() {
            Ok(key) => {
                self.agenda.last_snapshot = Some(now);
                self.agenda.changed_since_snapshot = false;
                let waiters = self.agenda.waiters.entry(key).or_default();
                waiters.extend(requests.into_iter().map(Waiter::Snapshot));
                Ok(())
            }
            Err(e) => {
                for r in requests {
                    let _ = r.send(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// Checkpoint once enough is staged (see [`Replica::checkpoint_due`]). Checkpoints wait
    /// for local disk only, never for uploads.
    fn checkpoint_if_due(&mut self) -> Result<()> {
        let now = Instant::now();
        let outgrown =
            std::mem::take(&mut self.agenda.outgrown) && self.agenda.checkpoint_misses <= 1;
        let early = self.agenda.next_checkpoint.is_some_and(|t| now < t) && !outgrown;
        // Not yet: look again then. (Without a wake-up of its own, a checkpoint that came
        // due meanwhile waited for the next commit or the safety interval, up to 10 s after
        // the writer stopped.) Not looked at now: this runs on every wake, and the look
        // reads the WAL file's size.
        self.agenda.checkpoint_waiting = early && self.agenda.stop.is_none();
        if early
            || self.agenda.stop.is_some()
            || !self.replica.checkpoint_due(if outgrown {
                // Read because the WAL outgrew the tip: that is enough to checkpoint.
                (self.options.passive_checkpoint_frames).min(self.options.restart_frames)
            } else {
                self.options.passive_checkpoint_frames
            })
        {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.replica.checkpoint();
        log::debug!(
            "{}: checkpoint took {} ms: {result:?}",
            self.replica.name(),
            started.elapsed().as_millis()
        );
        // The next one waits (see `checkpoint_pause`), unless the WAL outgrows the tip
        // meanwhile after a complete one or a first partial one (see `note_outgrown`).
        if let Ok(done) = result {
            self.metrics.checkpointed(done);
        }
        let misses = &mut self.agenda.checkpoint_misses;
        *misses = match result {
            Ok(Checkpoint::Complete) => 0,
            Ok(Checkpoint::Partial) => misses.saturating_add(1),
            _ => misses.saturating_add(1).max(2),
        };
        let pause = checkpoint_pause(&result, *misses, self.options.min_interval);
        self.agenda.next_checkpoint = Some(now + pause);
        self.agenda.dirty = true;
        result.map(|_| ())
    }

    /// Once stopping and everything committed is staged: note under the barrier that the
    /// tip is the end of the WAL, so the next start can prove nothing was lost meanwhile.
    fn settle_if_stopping(&mut self) -> Result<()> {
        if self.agenda.stop.is_none() || self.agenda.settled {
            return Ok(());
        }
        self.replica.settle()?;
        self.agenda.settled = true;
        Ok(())
    }

    /// Hand the next staged object to the upload pool, if none of this database's is out.
    fn upload_next(&mut self) -> Result<()> {
        if let Some(upload) = self.replica.next_upload()? {
            let events = self.own_sender.clone();
            self.pool.submit_counted(
                self.replica.name(),
                upload,
                Box::new(move |upload, result| {
                    let _ = events.send(Event::Uploaded(Box::new((upload, result))));
                }),
                Some(Arc::clone(&self.metrics)),
            );
        }
        Ok(())
    }

    /// Sync requests wait for the last object staged after their forced poll.
    fn answer_syncs(&mut self) {
        let agenda = &mut self.agenda;
        if agenda.sync_requests.is_empty() || agenda.force {
            return;
        }
        let requests = agenda.sync_requests.drain(..).map(Waiter::Sync);
        match self.replica.last_queued_key() {
            Some(key) => agenda.waiters.entry(key).or_default().extend(requests),
            None => requests.for_each(|w| w.answer(Ok(""))),
        }
    }

    /// Write `state.json` through the upload pool, so that many databases stopping (or
    /// snapshotting) at once make at most `upload_workers` requests at a time. The returned
    /// channel says when it is done.
    fn write_state(&self) -> Receiver<()> {
        let (done, finished) = mpsc::channel();
        let name = self.replica.name().to_string();
        match self.replica.state_object() {
            Ok(Some(state)) => self.pool.run(Box::new(move |storage: &dyn Storage| {
                if let Err(e) = state.write(storage) {
                    // Only `list` reads state.json; the objects themselves are stored.
                    log::warn!("{name}: {e}");
                }
                let _ = done.send(());
            })),
            Ok(None) => drop(done.send(())),
            Err(e) => {
                log::warn!("{name}: {e}");
                let _ = done.send(());
            }
        }
        finished
    }

    /// Leave: write state.json (best effort) and report whether everything committed is
    /// safe. Objects still staged when the deadline passes are safe on local disk (uploaded
    /// on the next start), so that is a warning; commits that could not be staged (the
    /// sidecar was unwritable until the deadline) are an error.
    fn finish(mut self: Box<Self>, deadline: Instant) -> Result<()> {
        let name = self.replica.name().to_string();
        let settled = self.agenda.settled && self.replica.is_saved();
        if settled && self.replica.is_flushed() {
            // Wait for state.json, but not past the shutdown deadline.
            let written = self.write_state();
            let wait = deadline.saturating_duration_since(Instant::now());
            if written.recv_timeout(wait).is_err() {
                log::warn!("{name}: state.json was not written before the shutdown deadline");
            }
            match (self.agenda.removing, self.agenda.gone) {
                (false, _) => log::info!("{name}: stopped; everything committed is stored"),
                (true, false) => log::info!(
                    "{name}: no longer replicated; everything committed is stored, and the \
                     replica stays in storage"
                ),
                (true, true) => log::info!(
                    "{name}: no longer replicated; everything staged is stored, and the \
                     replica stays in storage"
                ),
            }
            Ok(())
        } else if settled {
            let when = if self.agenda.removing {
                "the next time this database is replicated"
            } else {
                "the next start"
            };
            log::warn!(
                "{name}: stopped with {} objects ({} KiB) staged but not yet stored; they are \
                 safe in the sidecar and uploaded {when}",
                self.replica.staged_count(),
                self.replica.staged_bytes() >> 10
            );
            drop(std::mem::replace(&mut self.own_sender, mailbox().0));
            Ok(())
        } else {
            // Drop the pool's reference to this thread's sender so late results go nowhere.
            drop(std::mem::replace(&mut self.own_sender, mailbox().0));
            Err(Error::new(
                crate::error::ErrorKind::Transient,
                format!(
                    "{name}: stopped before the last commits could be staged (see the errors \
                     above); they are still in the WAL and read on the next start"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a complete checkpoint, and after a first partial one, the next waits
    /// `min_interval`; partial ones in a row wait twice as long each time, up to the retry
    /// of a failed one.
    #[test]
    fn partial_checkpoints_in_a_row_back_off_to_the_retry() {
        let second = Duration::from_secs(1);
        let partial = Ok(Checkpoint::Partial);
        let waits: Vec<u64> = (1..=6)
            .map(|misses| checkpoint_pause(&partial, misses, second).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(
            checkpoint_pause(&Ok(Checkpoint::Complete), 0, second),
            second
        );
        let failed = Err(Error::invalid("no"));
        assert_eq!(checkpoint_pause(&failed, 2, second), CHECKPOINT_RETRY);
        assert_eq!(
            checkpoint_pause(&Ok(Checkpoint::Skipped), 2, second),
            CHECKPOINT_RETRY
        );
    }

    /// A field more can cost a database 288 bytes instead of its own size: see [`DbWorker`].
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_worker_fits_the_allocators_slot() {
        let size = std::mem::size_of::<super::DbWorker>();
        assert!(
            size <= super::WORKER_SIZE_BUDGET,
            "DbWorker is {size} bytes, over {} (see its doc comment)",
            super::WORKER_SIZE_BUDGET
        );
    }
}
