//! Continuous replication of many databases: the engine behind `walsync watch`, and the
//! library entry point for applications that embed walsync.
//!
//! One OS thread per database owns its [`Replica`] and sleeps on a channel. What wakes it:
//! the [`Watcher`] (its WAL or database file changed), an upload worker (an object is
//! stored), a command from the application (sync now, snapshot now, stop), or a slow safety
//! timer that re-checks the WAL in case an event was lost. Re-checking reads the local WAL
//! only; an idle database makes no storage requests at all.
//!
//! Timing: the first commit after a quiet spell is cut and handed to the upload pool at
//! once; under steady writes a database ships at most once per `min_interval`, batching
//! everything committed meanwhile into one segment. Objects of one database upload one at
//! a time, in order, through a small pool of workers shared by all databases.
//!
//! Retention: with [`Options::retention`] set, each database is pruned (see
//! [`crate::retention`]) when the replicator starts, from the listing its replica took when
//! it opened (so without a request of its own), after each snapshot it stores (at most once
//! per [`PRUNE_INTERVAL`], or per retention if that is shorter), and when the window will
//! have passed its next snapshot, so the old backups of a database that went idle still go;
//! a database with nothing left to wait for costs no requests. Pruning runs on one thread
//! of its own, shared by all databases, so a slow or failing prune never holds up a
//! database thread or an upload worker; a failed prune is a warning, tried again a prune
//! interval later, and never stops replication.
//!
//! Nothing here needs an async runtime. A Tokio application starts a [`Replicator`] from
//! any thread and calls its blocking methods through `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::directory::{DirectorySpec, DirectoryWatch};
use crate::error::{Error, Result};
use crate::files::FileIdentity;
use crate::metrics::DbMetrics;
use crate::replica::{self, Checkpoint, Replica, SyncOutcome, Upload};
use crate::retention;
use crate::storage::Storage;
use crate::uploader::UploadPool;
use crate::utc::UtcTime;
use crate::watcher::{WatchId, WatchMode, Watcher};

/// How a [`Replicator`] behaves. `Default` gives walsync's defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Under steady writes, ship a database at most this often.
    pub min_interval: Duration,
    /// Take a snapshot this often while a database changes.
    pub snapshot_interval: Duration,
    /// Upload workers shared by all databases.
    pub upload_workers: usize,
    /// File events (inotify/kqueue) or stat polling.
    pub watch_mode: WatchMode,
    /// How often the polling watcher looks.
    pub poll_interval: Duration,
    /// How often each database re-checks its WAL even without events.
    pub safety_interval: Duration,
    /// Checkpoint once walsync has staged this many frames since its last checkpoint.
    pub passive_checkpoint_frames: u64,
    /// A WAL file at least this large is truncated (TRUNCATE checkpoint, while walsync's
    /// read transaction keeps it safe) after walsync's next complete checkpoint.
    pub wal_size_limit: u64,
    /// Per database: stop reading the WAL while this many bytes are staged on local disk
    /// and not yet stored (storage is down or slow); the WAL then stays pinned.
    pub staging_limit: u64,
    /// Keep every point in time this far back restorable and delete older objects (see
    /// [`crate::retention`]); zero keeps everything.
    pub retention: Duration,
    /// How long a removed database ([`Replicator::remove`], or its file gone from a
    /// watched directory) keeps uploading what it staged before its thread lets go; what
    /// is left then stays staged in its sidecar.
    pub removal_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(3600),
            upload_workers: 2,
            watch_mode: WatchMode::Auto,
            poll_interval: Duration::from_secs(1),
            safety_interval: Duration::from_secs(10),
            passive_checkpoint_frames: 1000,
            wal_size_limit: replica::DEFAULT_WAL_SIZE_LIMIT,
            staging_limit: replica::DEFAULT_STAGING_LIMIT,
            retention: retention::DEFAULT_RETENTION,
            removal_timeout: Duration::from_secs(30),
        }
    }
}

/// A database is pruned at most this often (or once per retention, if that is shorter):
/// after each snapshot stored, since a snapshot is what lets older objects go.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// After a failed checkpoint or one that could not finish, wait this long before the next.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(10);

/// Waits between tries to reach storage for a database that could not be reconciled at
/// start (see [`Replica::reconcile`]).
const RECONCILE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// After storage was found unreachable when a database was opened, databases opened
/// within this time leave reconciling to their threads instead of trying again at once.
const STORAGE_DOWN_SKIP: Duration = Duration::from_secs(10);

/// After a local error (reading the WAL, taking a snapshot), wait this long, then retry.
const ERROR_RETRY: Duration = Duration::from_secs(5);

/// The same while stopping, when the shutdown deadline is near.
const STOP_RETRY: Duration = Duration::from_secs(1);

/// What wakes a database thread.
enum Event {
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
    /// The database is no longer replicated ([`Replicator::remove`], or its file left a
    /// watched directory): as `Stop`, but if its file is gone, read nothing more and only
    /// upload what is staged.
    Remove(Instant),
}

struct DbThread {
    name: String,
    path: PathBuf,
    /// The path with symlinks resolved, so the same file named two ways is one database.
    canonical: PathBuf,
    /// Order of arrival: [`Replicator::databases`] lists in it.
    seq: u64,
    events: Sender<Event>,
    thread: crate::stack::LeanThread<Result<()>>,
    metrics: Arc<DbMetrics>,
    watch: WatchId,
}

/// Continuous replication of a set of databases to one destination.
///
/// Databases can be added ([`Replicator::add`]) and removed ([`Replicator::remove`]) while
/// it runs, and whole directories watched for databases that come and go
/// ([`Replicator::watch_directory`]).
pub struct Replicator {
    core: Arc<Core>,
    pruner: Option<Pruner>,
    directories: Mutex<Vec<DirectoryWatch>>,
}

/// What the database threads share, and the directory threads reach to add and remove
/// databases.
pub(crate) struct Core {
    storage: Arc<dyn Storage>,
    options: Options,
    pool: Arc<UploadPool>,
    watcher: Watcher,
    /// Where database threads ask for prunes (None: retention is off, or stopping).
    prune: Mutex<Option<Sender<PruneRequest>>>,
    databases: Mutex<Databases>,
    /// When a try to reconcile a newly opened database last found storage unreachable:
    /// for a while the next ones leave it to their threads (with backoff) instead of each
    /// waiting for it (see [`open_replica`]).
    storage_down: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Databases {
    active: HashMap<String, DbThread>,
    /// Removed, still shipping what they staged; joined by [`Core::reap`].
    leaving: Vec<DbThread>,
    next_seq: u64,
}

impl Replicator {
    /// Start replicating `databases` (path and replica name) to `storage`.
    ///
    /// Every database is opened and checked before any thread starts, so a bad path, a
    /// database not in WAL mode or a name another database writes is an error here, not a
    /// log line later. Storage that cannot be reached is not: the databases stage locally
    /// and their threads reconcile with storage (see [`Replica::reconcile`]) once it can be
    /// reached, so that an application started with walsync never waits for the network.
    pub fn start(
        storage: Arc<dyn Storage>,
        databases: &[(PathBuf, String)],
        options: Options,
    ) -> Result<Replicator> {
        let storage_down = Mutex::new(None);
        let mut replicas = Vec::new();
        for (path, name) in databases {
            replicas.push(open_replica(
                &storage,
                Some(&storage_down),
                &options,
                path,
                name,
            )?);
        }
        let watcher = Watcher::start(options.watch_mode, options.poll_interval)?;
        let pruner = if options.retention.is_zero() {
            None
        } else {
            Some(Pruner::start(Arc::clone(&storage), options.retention)?)
        };
        let pool = Arc::new(UploadPool::start(
            Arc::clone(&storage),
            options.upload_workers,
        )?);
        let core = Arc::new(Core {
            storage,
            options,
            pool,
            watcher,
            prune: Mutex::new(pruner.as_ref().map(Pruner::requests)),
            databases: Mutex::new(Databases::default()),
            storage_down,
        });
        let replicator = Replicator {
            core,
            pruner,
            directories: Mutex::new(Vec::new()),
        };
        for replica in replicas {
            replicator.core.spawn(replica, false)?;
        }
        Ok(replicator)
    }

    /// Whether every database's thread has ended on its own, with no directory watched that
    /// could bring more: a thread ends early only on an error retrying cannot mend (storage,
    /// reached late, says another database writes the name). Then nothing is being
    /// replicated and `walsync watch` should say so and exit.
    pub fn all_failed(&self) -> bool {
        if !lock(&self.directories).is_empty() {
            return false;
        }
        let databases = lock(&self.core.databases);
        !databases.active.is_empty() && databases.active.values().all(|d| d.thread.is_finished())
    }

    /// Start replicating one more database, `path` under `name`, as [`Replicator::start`]
    /// would have: opened and checked here (an error if it cannot be, or if the name or
    /// the file is replicated already), reconciled with storage here unless storage could
    /// not be reached (then by its thread, with backoff, as at start).
    pub fn add(&self, path: &Path, name: &str) -> Result<()> {
        self.core.add(path, name, false)
    }

    /// Stop replicating `name`: ship what is committed and staged (if its file is gone,
    /// only what is staged), within [`Options::removal_timeout`], write its `state.json`,
    /// and release everything it holds (connections, descriptors, the sidecar lock).
    /// Returns once its thread is gone. The replica stays in storage; what could not be
    /// stored in time stays staged in the sidecar, for the next time the database is
    /// replicated. (A database found by [`Replicator::watch_directory`] is added again
    /// by it only once its file has gone and come back.)
    pub fn remove(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.core.options.removal_timeout;
        let db = self.core.begin_remove(name, deadline)?;
        join_thread(db)
    }

    /// Watch a directory for databases, and replicate each one that is or becomes a WAL
    /// database until its file goes (see [`crate::directory`]). Scans it once before
    /// returning (so what is there is replicated, or warned about, by then); an error if
    /// the directory cannot be read.
    pub fn watch_directory(&self, spec: DirectorySpec) -> Result<()> {
        let watch = DirectoryWatch::start(Arc::clone(&self.core), spec)?;
        lock(&self.directories).push(watch);
        Ok(())
    }

    /// Names and paths of the replicated databases, in the order they were added.
    pub fn databases(&self) -> Vec<(String, PathBuf)> {
        self.core.in_order(|d| (d.name.clone(), d.path.clone()))
    }

    /// Each database's metrics (see [`crate::metrics`]), in the order of
    /// [`Replicator::databases`].
    pub fn metrics(&self) -> Vec<Arc<DbMetrics>> {
        self.core.in_order(|d| Arc::clone(&d.metrics))
    }

    /// A function giving [`Replicator::metrics`] as they are when called: for the metrics
    /// listener and the heartbeat, which outlive any one set of databases.
    pub fn metrics_source(&self) -> MetricsSource {
        let core = Arc::downgrade(&self.core);
        Arc::new(move || {
            core.upgrade()
                .map_or_else(Vec::new, |core| core.in_order(|d| Arc::clone(&d.metrics)))
        })
    }

    /// How file changes are noticed: "inotify", "kqueue" or "poll".
    pub fn watch_backend(&self) -> &'static str {
        self.core.watcher.backend()
    }

    /// Ship everything committed in `name` now and wait until it is stored.
    pub fn sync(&self, name: &str) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.core.send(name, Event::Sync(tx))?;
        rx.recv().map_err(|_| thread_stopped(name))?
    }

    /// Ship everything committed in every database and wait until it is stored.
    pub fn sync_all(&self) -> Result<()> {
        for (name, _) in self.databases() {
            self.sync(&name)?;
        }
        Ok(())
    }

    /// Take a snapshot of `name` now; returns its key once it is stored.
    pub fn snapshot(&self, name: &str) -> Result<String> {
        let (tx, rx) = mpsc::channel();
        self.core.send(name, Event::Snapshot(tx))?;
        rx.recv().map_err(|_| thread_stopped(name))?
    }

    /// Stop watching, ship what is committed, wait up to `timeout` for uploads, write each
    /// `state.json`, and stop the threads. Returns an error naming the databases whose last
    /// objects could not be stored in time (their data is still in their WAL).
    pub fn stop(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // No database comes or goes from here on.
        for watch in std::mem::take(&mut *lock(&self.directories)) {
            watch.stop();
        }
        self.core.pool.set_deadline(deadline);
        let (active, leaving) = {
            let mut databases = lock(&self.core.databases);
            let active: Vec<DbThread> = databases.active.drain().map(|(_, d)| d).collect();
            (active, std::mem::take(&mut databases.leaving))
        };
        // Those still leaving too: they keep to this deadline, not their own.
        for db in active.iter().chain(&leaving) {
            let _ = db.events.send(Event::Stop(deadline));
        }
        let mut failures = Vec::new();
        // A thread blocked in a storage request (a LIST to a storage that stopped answering)
        // cannot see the deadline; past it, and a grace, it is left to the process's exit,
        // which is a crash as far as its database is concerned: what it staged is safe.
        let give_up = deadline + STOP_GRACE;
        for db in active.into_iter().chain(leaving) {
            while !db.thread.is_finished() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !db.thread.is_finished() {
                failures.push(format!(
                    "{}: still busy {}s after the shutdown deadline (a storage request in \
                     flight?); left behind",
                    db.name,
                    STOP_GRACE.as_secs()
                ));
                continue; // dropping the handle detaches the thread
            }
            if let Err(e) = join_thread(db) {
                failures.push(e.to_string());
            }
        }
        // The pruning thread ends once every sender is gone: the threads' went with them.
        drop(lock(&self.core.prune).take());
        match Arc::try_unwrap(self.core) {
            Ok(core) => {
                drop(core.watcher);
                if let Ok(pool) = Arc::try_unwrap(core.pool) {
                    pool.shutdown();
                }
            }
            Err(_) => log::debug!("the replicator's core is still referenced at stop"),
        }
        if let Some(pruner) = self.pruner {
            pruner.stop(deadline);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::new(crate::ErrorKind::Transient, failures.join("; ")))
        }
    }
}

/// A function returning the current databases' metrics.
pub type MetricsSource = Arc<dyn Fn() -> Vec<Arc<DbMetrics>> + Send + Sync>;

/// Open a database for replication, as [`Replicator::start`] and [`Replicator::add`] do:
/// unreconciled, then reconciled with storage unless a try less than
/// [`STORAGE_DOWN_SKIP`] ago found it unreachable (then the database's thread reconciles
/// it, with backoff, so that a hundred databases do not each wait for a timeout). With no
/// `storage_down` to consult, the thread reconciles it in any case.
fn open_replica(
    storage: &Arc<dyn Storage>,
    storage_down: Option<&Mutex<Option<Instant>>>,
    options: &Options,
    path: &Path,
    name: &str,
) -> Result<Replica> {
    let mut replica = Replica::open_unreconciled(path, Arc::clone(storage), name)?;
    if let Some(storage_down) = storage_down {
        let down_since = *lock(storage_down);
        if down_since.is_none_or(|t| t.elapsed() >= STORAGE_DOWN_SKIP) {
            match replica.reconcile() {
                Ok(()) => *lock(storage_down) = None,
                Err(e) if e.is_transient() => {
                    if down_since.is_none() {
                        log::warn!(
                            "storage cannot be reached ({e}): replicating to local staging \
                             only; nothing is uploaded until {} answers (retried with backoff)",
                            storage.describe()
                        );
                    }
                    *lock(storage_down) = Some(Instant::now());
                }
                Err(e) => return Err(e),
            }
        }
    }
    replica.set_staging_limit(options.staging_limit);
    replica.set_wal_size_limit(options.wal_size_limit);
    Ok(replica)
}

/// Wait for a database thread to end; its error, if it ended on one.
fn join_thread(db: DbThread) -> Result<()> {
    match db.thread.join() {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            crate::ErrorKind::Other,
            format!("{}: replication thread panicked", db.name),
        )),
    }
}

/// A lock that a panicking holder poisoned is still consistent here (every change is one
/// insert or remove), so keep using it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Core {
    /// [`Replicator::add`]; `from_directory` marks a database found by a directory watch,
    /// whose file going away is expected rather than an error.
    pub(crate) fn add(&self, path: &Path, name: &str, from_directory: bool) -> Result<()> {
        crate::layout::validate_name(name)?;
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::from(e).with_context(format!("adding {}", path.display())))?;
        self.check_free(name, &canonical)?;
        // A directory's thread must not wait for storage (a LIST retried for seconds, or
        // timing out, while other databases wait to be picked up): its databases are
        // reconciled by their own threads, first thing, as those opened while storage was
        // down are.
        let reconcile_now = (!from_directory).then_some(&self.storage_down);
        let replica = open_replica(&self.storage, reconcile_now, &self.options, path, name)?;
        self.spawn(replica, from_directory)
    }

    /// Refuse a name or a file that is replicated already, or still leaving.
    pub(crate) fn check_free(&self, name: &str, canonical: &Path) -> Result<()> {
        let databases = lock(&self.databases);
        if let Some(db) = databases.active.get(name) {
            return Err(Error::invalid(format!(
                "{name:?} is already the name of {}; two databases never share a replica",
                db.path.display()
            )));
        }
        if let Some(db) = databases.active.values().find(|d| d.canonical == canonical) {
            return Err(Error::invalid(format!(
                "{} is already replicated as {:?}",
                canonical.display(),
                db.name
            )));
        }
        if let Some(db) = databases
            .leaving
            .iter()
            .find(|d| d.name == name || d.canonical == canonical)
        {
            return Err(Error::new(
                crate::ErrorKind::Transient,
                format!(
                    "{} ({:?}) is still being removed; try again once it is gone",
                    db.path.display(),
                    db.name
                ),
            ));
        }
        Ok(())
    }

    /// Start the thread of an opened replica.
    fn spawn(&self, mut replica: Replica, from_directory: bool) -> Result<()> {
        let prune = lock(&self.prune).clone();
        if prune.is_none() {
            // Kept only for the first prune: none will come.
            drop(replica.take_opening_listing());
        }
        let name = replica.name().to_string();
        let path = replica.path().to_path_buf();
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let (tx, rx) = mpsc::channel();
        let notify = tx.clone();
        let watch = self.watcher.watch(
            &path,
            Box::new(move || {
                let _ = notify.send(Event::Changed);
            }),
        )?;
        let metrics = Arc::new(DbMetrics::new(&name));
        // Not caught up until the thread has looked at the WAL.
        let lag = LagTracker::started();
        metrics.set_unstored_since(lag.since());
        let worker = DbWorker {
            metrics: Arc::clone(&metrics),
            replica,
            events: rx,
            own_sender: tx.clone(),
            pool: Arc::clone(&self.pool),
            options: self.options.clone(),
            prune,
            reconcile_backoff: RECONCILE_BACKOFF,
            lag,
            from_directory,
            agenda: Agenda {
                dirty: true,
                last_snapshot: Some(Instant::now()),
                // Once at start: old backups go even if no snapshot is due for a while.
                prune_due: true,
                ..Agenda::default()
            },
        };
        let mut databases = lock(&self.databases);
        if databases.active.contains_key(&name) {
            // Added meanwhile by another caller: this one lost the race.
            drop(databases);
            self.watcher.unwatch(watch);
            return Err(Error::invalid(format!(
                "{name:?} is already the name of another replicated database"
            )));
        }
        // A lean thread (see `stack`): its stack and guard page are two of the three memory
        // maps an idle database costs; the `-shm` mapping is the third.
        let thread =
            crate::stack::spawn(&format!("walsync-{name}"), 512 * 1024, move || worker.run());
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                drop(databases);
                self.watcher.unwatch(watch);
                return Err(Error::from(e).with_context("starting a database thread"));
            }
        };
        let seq = databases.next_seq;
        databases.next_seq += 1;
        databases.active.insert(
            name.clone(),
            DbThread {
                name,
                path,
                canonical,
                seq,
                events: tx,
                thread,
                metrics,
                watch,
            },
        );
        Ok(())
    }

    /// Stop watching `name`'s files and tell its thread to leave by `deadline`; returns
    /// its thread, which the caller joins (or puts among the leaving).
    fn begin_remove(&self, name: &str, deadline: Instant) -> Result<DbThread> {
        let db = lock(&self.databases)
            .active
            .remove(name)
            .ok_or_else(|| Error::not_found(format!("no replicated database named {name:?}")))?;
        self.watcher.unwatch(db.watch);
        // A thread that ended on an error is not there to hear it; joining tells.
        let _ = db.events.send(Event::Remove(deadline));
        Ok(db)
    }

    /// Remove `name` without waiting: its thread finishes among the leaving, joined by
    /// [`Core::reap`].
    pub(crate) fn remove_later(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.removal_timeout;
        let db = self.begin_remove(name, deadline)?;
        lock(&self.databases).leaving.push(db);
        Ok(())
    }

    /// Join the leaving threads that have finished; returns how many are still leaving.
    pub(crate) fn reap(&self) -> usize {
        let done: Vec<DbThread> = {
            let mut databases = lock(&self.databases);
            let (done, still): (Vec<DbThread>, Vec<DbThread>) =
                std::mem::take(&mut databases.leaving)
                    .into_iter()
                    .partition(|d| d.thread.is_finished());
            databases.leaving = still;
            done
        };
        for db in done {
            if let Err(e) = join_thread(db) {
                log::warn!("{e}");
            }
        }
        lock(&self.databases).leaving.len()
    }

    pub(crate) fn watcher(&self) -> &Watcher {
        &self.watcher
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// `f` of each active database, in the order they were added.
    fn in_order<T>(&self, f: impl Fn(&DbThread) -> T) -> Vec<T> {
        let databases = lock(&self.databases);
        let mut all: Vec<&DbThread> = databases.active.values().collect();
        all.sort_by_key(|d| d.seq);
        all.into_iter().map(f).collect()
    }

    fn send(&self, name: &str, event: Event) -> Result<()> {
        let databases = lock(&self.databases);
        let db = databases
            .active
            .get(name)
            .ok_or_else(|| Error::not_found(format!("no replicated database named {name:?}")))?;
        db.events.send(event).map_err(|_| thread_stopped(name))
    }
}

/// A database's thread is gone (it stopped on an error, or `stop` was called).
fn thread_stopped(name: &str) -> Error {
    Error::new(
        crate::ErrorKind::Other,
        format!("{name}: replication thread stopped"),
    )
}

/// The state of one database thread.
struct DbWorker {
    replica: Replica,
    events: Receiver<Event>,
    own_sender: Sender<Event>,
    pool: Arc<UploadPool>,
    options: Options,
    /// Where to ask for this database to be pruned (None: retention is off).
    prune: Option<Sender<PruneRequest>>,
    agenda: Agenda,
    metrics: Arc<DbMetrics>,
    reconcile_backoff: Backoff,
    lag: LagTracker,
    /// Found by a directory watch: a file that goes away is expected (the directory watch
    /// removes the database), not an error worth a line every few seconds.
    from_directory: bool,
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
    /// After a local error, nothing runs before this.
    retry_at: Option<Instant>,
    /// Sync requests not yet tied to an object.
    sync_requests: Vec<Sender<Result<()>>>,
    snapshot_requests: Vec<Sender<Result<String>>>,
    /// Requests answered when the object with this key is stored.
    waiters: HashMap<String, Vec<Waiter>>,
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
    /// Removed (see [`Event::Remove`]): stopping, and not to be replicated again.
    removing: bool,
    /// Removed, and its file is gone: nothing more can be read, only staged objects go.
    gone: bool,
}

impl DbWorker {
    fn run(mut self) -> Result<()> {
        let name = self.replica.name().to_string();
        loop {
            let wait = self.next_wake();
            if wait >= Duration::from_secs(1) {
                // Going idle: the memory this database touched while busy goes back.
                self.replica.rest();
                crate::stack::trim();
            }
            match self.events.recv_timeout(wait) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => self.agenda.dirty = true,
                Err(RecvTimeoutError::Disconnected) => {
                    self.agenda.stop.get_or_insert_with(Instant::now);
                }
            }
            // Coalesce whatever else arrived meanwhile.
            while let Ok(event) = self.events.try_recv() {
                self.handle(event);
            }
            if let Err(e) = self.reconcile_if_due() {
                log::error!("{name}: {e}; this database is no longer replicated");
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
                    return self.finish(deadline);
                }
            }
        }
    }

    /// How long to sleep before looking at the WAL again without being told to.
    fn next_wake(&self) -> Duration {
        let agenda = &self.agenda;
        let now = Instant::now();
        let mut wake = now + self.options.safety_interval;
        if agenda.dirty {
            let allowed = agenda
                .last_ship
                .map_or(now, |t| t + self.options.min_interval);
            wake = wake.min(allowed.max(now));
        }
        if let Some(retry) = agenda.retry_at {
            wake = wake.min(retry);
        }
        if let Some(reconcile) = agenda.reconcile_at {
            wake = wake.min(reconcile);
        }
        if agenda.gate_full {
            wake = now;
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
        let key = upload.key.clone();
        self.lag.stored(&key);
        match self.replica.upload_done(&key) {
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

    /// Do whatever is due, in this order: ask for a prune, ship, snapshot, checkpoint,
    /// settle before a stop, hand out the next upload, answer syncs.
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
        if self.agenda.stop.is_none() {
            // Not once stopping: settling leaves the pin on read mark 0 on purpose.
            self.replica.follow_restart()?;
        }
        self.ship()?;
        self.snapshot_if_due()?;
        self.checkpoint_if_due()?;
        self.settle_if_stopping()?;
        self.upload_next()?;
        self.answer_syncs();
        Ok(())
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
            Err(e) if e.kind() != crate::ErrorKind::Invalid => {
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
        if self.agenda.stop.is_some()
            || self.agenda.next_checkpoint.is_some_and(|t| now < t)
            || !self
                .replica
                .checkpoint_due(self.options.passive_checkpoint_frames)
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
        // Unless it copied everything, do not try again for a while: a reader may hold old
        // frames, and every attempt briefly takes the write lock. After a complete one,
        // not before `min_interval` either: under fast small transactions the threshold is
        // reached several times a second, and each checkpoint's write lock and fsyncs of
        // the database file would then slow every commit of the application.
        if let Ok(done) = result {
            self.metrics.checkpointed(done);
        }
        self.agenda.next_checkpoint = match result {
            Ok(Checkpoint::Complete) => Some(now + self.options.min_interval),
            _ => Some(now + CHECKPOINT_RETRY),
        };
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
            Ok(Some((key, body))) => self.pool.run(Box::new(move |storage: &dyn Storage| {
                if let Err(e) = storage.put_bytes(&key, &body) {
                    // Only `list` reads state.json; the objects themselves are stored.
                    log::warn!("{name}: writing {key}: {e}");
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
    fn finish(mut self, deadline: Instant) -> Result<()> {
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
            drop(std::mem::replace(&mut self.own_sender, mpsc::channel().0));
            Ok(())
        } else {
            // Drop the pool's reference to this thread's sender so late results go nowhere.
            drop(std::mem::replace(&mut self.own_sender, mpsc::channel().0));
            Err(Error::new(
                crate::ErrorKind::Transient,
                format!(
                    "{name}: stopped before the last commits could be staged (see the errors \
                     above); they are still in the WAL and read on the next start"
                ),
            ))
        }
    }
}

/// Where a database's lag counts from: the oldest commit not yet stored, whatever holds it
/// back (storage down or slow, the sidecar's disk full or read-only, the staging limit).
///
/// Commits are noticed when the WAL changes (a file event), read into a staged object by a
/// later step, and stored when that object's upload succeeds. So the tracker keeps when the
/// first change not yet read was noticed, and for each staged object the time of the first
/// change it holds. A step that fails to read keeps the unread time, so a sidecar that
/// cannot be written shows as growing lag instead of 0.
struct LagTracker {
    /// Unix milliseconds of the first change not yet read into a staged object.
    unread: Option<u64>,
    /// Staged objects in upload order: key, and the time of the first change each holds
    /// (None: it holds no commit that was waiting, such as a snapshot of a quiet database).
    staged: std::collections::VecDeque<(String, Option<u64>)>,
}

impl LagTracker {
    /// At start nothing is known to be stored until the first read.
    fn started() -> LagTracker {
        LagTracker {
            unread: Some(unix_millis()),
            staged: std::collections::VecDeque::new(),
        }
    }

    /// The WAL or database file changed: a commit may wait to be read.
    fn changed(&mut self) {
        self.unread.get_or_insert_with(unix_millis);
    }

    /// The object `key` was stored; uploads go in order, so those before it were too.
    fn stored(&mut self, key: &str) {
        if let Some(at) = self.staged.iter().position(|(k, _)| k == key) {
            self.staged.drain(..=at);
        }
    }

    /// After a step: a newly staged object takes the unread changes with it; with
    /// `all_read` (a read ran and did not fail) and nothing staged, nothing waits at all.
    fn after_step(&mut self, replica: &Replica, all_read: bool) {
        if replica.is_flushed() {
            self.staged.clear();
            if all_read {
                self.unread = None;
            }
            return;
        }
        if let Some(key) = replica.last_queued_key() {
            if self.staged.back().is_none_or(|(k, _)| *k != key) {
                let since = self.unread.take();
                self.staged.push_back((key, since));
            }
        }
    }

    /// Unix milliseconds of the oldest commit not yet stored, if any.
    fn since(&self) -> Option<u64> {
        let staged = self.staged.iter().find_map(|(_, since)| *since);
        match (staged, self.unread) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A request to prune one database: after a snapshot was stored (list it afresh), or at
/// start with the listing its replica took when it opened (no LIST needed).
struct PruneRequest {
    name: String,
    listing: Option<Listing>,
}

type Listing =
    std::collections::BTreeMap<crate::layout::Generation, crate::layout::GenerationObjects>;

/// The pruning thread: prunes the databases it is asked to, one at a time, in the
/// background of the database threads and the upload workers. It also prunes a database
/// again, by itself, when the window will have passed its next snapshot (the plan's
/// `next_due`), so that old backups of a database that went idle still go, and a database
/// with nothing left to wait for costs no requests at all.
/// How many replicas list storage to reconcile at once (see [`crate::gate`]): a host of
/// databases starting together would otherwise open a connection (and its 64 KiB of
/// buffers) each. A LIST is mostly waiting for storage, so the gate stays wide: at 16 or
/// 64, a restart of 1,000 databases against the test server took a minute (it lists a
/// prefix in about a second), against 3 s with every one at once.
static RECONCILING: crate::gate::Gate = crate::gate::Gate::new(256);

/// How long past the shutdown deadline [`Replicator::stop`] waits for a database thread.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often a running `watch` aborts the multipart uploads a crash left in storage.
const ABORT_STALE_UPLOADS_EVERY: Duration = Duration::from_secs(24 * 3600);

struct Pruner {
    requests: Sender<PruneRequest>,
    thread: JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

impl Pruner {
    fn start(storage: Arc<dyn Storage>, retention: Duration) -> Result<Pruner> {
        let (requests, queue) = mpsc::channel::<PruneRequest>();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name("walsync-prune".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut due: HashMap<String, Instant> = HashMap::new();
                // The whole destination's stale multipart uploads: one request now, then
                // one a day, rather than one with every prune of every database.
                let mut abort_uploads_at = Instant::now();
                loop {
                    if Instant::now() >= abort_uploads_at {
                        retention::abort_stale_uploads(storage.as_ref(), "");
                        abort_uploads_at = Instant::now() + ABORT_STALE_UPLOADS_EVERY;
                    }
                    let wait = due
                        .values()
                        .copied()
                        .chain([abort_uploads_at])
                        .min()
                        .map(|at| at.saturating_duration_since(Instant::now()));
                    let mut work: Vec<PruneRequest> = match wait {
                        None => match queue.recv() {
                            Ok(request) => vec![request],
                            Err(_) => return,
                        },
                        Some(wait) => match queue.recv_timeout(wait) {
                            Ok(request) => vec![request],
                            Err(RecvTimeoutError::Timeout) => Vec::new(),
                            Err(RecvTimeoutError::Disconnected) => return,
                        },
                    };
                    // Requests that piled up meanwhile, then what fell due: each database once.
                    work.extend(queue.try_iter());
                    let now = Instant::now();
                    for (name, _) in due.iter().filter(|(_, at)| **at <= now) {
                        work.push(PruneRequest {
                            name: name.clone(),
                            listing: None,
                        });
                    }
                    let mut seen = std::collections::HashSet::new();
                    work.retain(|r| seen.insert(r.name.clone()));
                    for request in work {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        due.remove(&request.name);
                        if let Some(next) =
                            prune_in_background(storage.as_ref(), request, retention)
                        {
                            due.insert(next.0, next.1);
                        }
                    }
                }
            })
            .map_err(|e| Error::from(e).with_context("starting the pruning thread"))?;
        Ok(Pruner {
            requests,
            thread,
            stopping,
        })
    }

    fn requests(&self) -> Sender<PruneRequest> {
        self.requests.clone()
    }

    /// Start no new prune, and wait for one in progress until `deadline`. A prune cut short
    /// by the process exiting leaves a restorable replica (see [`crate::retention`]).
    fn stop(self, deadline: Instant) {
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.requests);
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                log::warn!("a prune was still running at the shutdown deadline; left unfinished");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.thread.join();
    }
}

/// Prune one database as of now; log what went, and failures as warnings (replication goes
/// on regardless). Returns when to prune it again by itself, if ever: when the window will
/// have passed its next snapshot, or after a failure, one prune interval later.
fn prune_in_background(
    storage: &dyn Storage,
    request: PruneRequest,
    retention: Duration,
) -> Option<(String, Instant)> {
    let name = request.name;
    let started = Instant::now();
    let now = UtcTime::now();
    let pruned = match &request.listing {
        Some(listing) => retention::prune_listed(storage, &name, listing, now, retention, false),
        None => retention::prune(storage, &name, now, retention, false),
    };
    match pruned {
        Ok(plan) => {
            if plan.delete.is_empty() {
                log::debug!(
                    "{} (retention {})",
                    plan.summary(true),
                    retention::format_duration(retention)
                );
            } else {
                log::info!(
                    "{} (retention {}, {} ms)",
                    plan.summary(true),
                    retention::format_duration(retention),
                    started.elapsed().as_millis()
                );
                log::debug!("{name}: pruned {}", plan.keys().join(" "));
            }
            let next = plan.next_due?;
            let wait_ms = u64::try_from(next.millis().saturating_sub(now.millis())).unwrap_or(0);
            // Not sooner than a minute (or a retention, if shorter), so that snapshots close
            // together cannot make it list storage over and over.
            let floor = Duration::from_secs(60).min(retention);
            let wait = Duration::from_millis(wait_ms).max(floor);
            Some((name, Instant::now() + wait))
        }
        Err(e) => {
            log::warn!(
                "{name}: pruning for retention {} failed: {e}; replication goes on, and the \
                 prune is tried again later",
                retention::format_duration(retention)
            );
            Some((name, Instant::now() + PRUNE_INTERVAL.min(retention)))
        }
    }
}
