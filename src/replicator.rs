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
//!
//! # Rooms
//!
//! This file is the handle: [`Options`], the [`Replicator`] an application holds, and the
//! core its database threads and directory watches share (which databases there are,
//! adding and removing them). Beside it, in `src/replicator/`:
//!
//! - `worker`: one database's thread, its agenda, and the order of its steps.
//! - `lag`: where a database's lag counts from, for the metrics and the heartbeat.
//! - `pruner`: the one thread that prunes every database for retention.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::directory::{DirectorySpec, DirectoryWatch};
use crate::error::{Error, Result};
use crate::metrics::DbMetrics;
use crate::replica::{self, Replica};
use crate::retention;
use crate::storage::Storage;
use crate::uploader::UploadPool;
use crate::watcher::{WatchId, WatchMode, Watcher};

mod lag;
mod pruner;
mod worker;

use pruner::{PruneRequest, Pruner};
use worker::{DbWorker, Event};

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
    /// Keep every point in time this far back restorable and delete older objects (as
    /// [`crate::prune`] does); zero keeps everything.
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

/// After storage was found unreachable when a database was opened, databases opened
/// within this time leave reconciling to their threads instead of trying again at once.
const STORAGE_DOWN_SKIP: Duration = Duration::from_secs(10);

/// How long past the shutdown deadline [`Replicator::stop`] waits for a database thread.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    /// and their threads reconcile with storage (as [`Replica::open`] does) once it can be
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
    /// database until its file goes (which files count is [`DirectorySpec`]'s). Scans it once before
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
        let worker = DbWorker::new(
            self,
            replica,
            prune,
            (tx.clone(), rx),
            Arc::clone(&metrics),
            from_directory,
        );
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
