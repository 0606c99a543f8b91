//! What a [`Replicator`](super::Replicator)'s threads share: the storage, the options, the
//! upload pool, the watcher and the table of databases, each with its thread. The handle
//! (`replicator.rs`) and the directory watches (`crate::directory`) add and remove databases
//! through it; it knows neither of them, so the directory watches sit below the handle.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::mailbox::{mailbox, Post};
use super::options::Options;
use super::pruner::PruneRequest;
use super::worker::{DbWorker, Event};
use crate::error::{Error, Result};
use crate::gate::Pass;
use crate::metrics::DbMetrics;
use crate::replica::Replica;
use crate::storage::Storage;
use crate::uploader::UploadPool;
use crate::watcher::{WatchId, Watcher};

/// After storage was found unreachable when a database was opened, databases opened
/// within this time leave reconciling to their threads instead of trying again at once.
const STORAGE_DOWN_SKIP: Duration = Duration::from_secs(10);

pub(super) struct DbThread {
    pub(super) name: String,
    pub(super) path: PathBuf,
    /// The path with symlinks resolved, so the same file named two ways is one database.
    pub(super) canonical: PathBuf,
    /// Order of arrival: [`Replicator::databases`](super::Replicator::databases) lists in it.
    pub(super) seq: u64,
    pub(super) events: Post<Event>,
    pub(super) thread: crate::stack::LeanThread<Result<()>>,
    pub(super) metrics: Arc<DbMetrics>,
    pub(super) watch: WatchId,
}

/// What the database threads share, and the directory threads reach to add and remove
/// databases.
pub(crate) struct Core {
    pub(super) storage: Arc<dyn Storage>,
    /// Shared with every database thread: see [`DbWorker`]'s size.
    pub(super) options: Arc<Options>,
    pub(super) pool: Arc<UploadPool>,
    pub(super) watcher: Watcher,
    /// Where database threads ask for prunes (None: retention is off, or stopping).
    pub(super) prune: Mutex<Option<Sender<PruneRequest>>>,
    pub(super) databases: Mutex<Databases>,
    /// When a try to reconcile a newly opened database last found storage unreachable:
    /// for a while the next ones leave it to their threads (with backoff) instead of each
    /// waiting for it (see [`open_replica`]).
    pub(super) storage_down: Mutex<Option<Instant>>,
}

#[derive(Default)]
pub(super) struct Databases {
    /// By name. Changed only through [`Databases::insert`], [`Databases::remove`] and
    /// [`Databases::take_all`], which keep `files` in step.
    active: HashMap<String, DbThread>,
    /// The canonical paths of the active databases, so that adding one more looks up its
    /// file at once: compared with every database's, the check took 21% of the scanning
    /// thread's samples in a restart of 4,000 (perf), and all of them together grow with
    /// the square of the databases.
    files: HashSet<OsString>,
    /// Removed, still shipping what they staged; joined by [`Core::reap`].
    pub(super) leaving: Vec<DbThread>,
    pub(super) next_seq: u64,
}

impl Databases {
    pub(super) fn active(&self) -> &HashMap<String, DbThread> {
        &self.active
    }

    fn insert(&mut self, db: DbThread) {
        self.files.insert(db.canonical.clone().into_os_string());
        self.active.insert(db.name.clone(), db);
    }

    pub(super) fn remove(&mut self, name: &str) -> Option<DbThread> {
        let db = self.active.remove(name)?;
        self.files.remove(db.canonical.as_os_str());
        Some(db)
    }

    /// Every active database, leaving none.
    pub(super) fn take_all(&mut self) -> Vec<DbThread> {
        self.files.clear();
        self.active.drain().map(|(_, d)| d).collect()
    }
}

/// Open a database for replication, as [`super::Replicator::start`] and [`super::Replicator::add`] do:
/// unreconciled, then reconciled with storage unless a try less than
/// [`STORAGE_DOWN_SKIP`] ago found it unreachable (then the database's thread reconciles
/// it, with backoff, so that a hundred databases do not each wait for a timeout). With no
/// `storage_down` to consult, the thread reconciles it in any case.
pub(super) fn open_replica(
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
pub(super) fn join_thread(db: DbThread) -> Result<()> {
    match db.thread.join() {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            crate::error::ErrorKind::Other,
            format!("{}: replication thread panicked", db.name),
        )),
    }
}

/// A lock that a panicking holder poisoned is still consistent here (every change is one
/// insert or remove), so keep using it.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Core {
    /// [`super::Replicator::add`]; `from_directory` marks a database found by a directory watch,
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
        // A place in the descriptor budget before anything is opened (see
        // `limits::BUSY`); a directory's thread does not wait long for one, it tries again.
        let wait = if from_directory {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(10)
        };
        let busy = crate::limits::BUSY.enter_within(wait).ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::Transient,
                format!(
                    "adding {}: the open files RLIMIT_NOFILE leaves are all held by the {} \
                     databases busy now; try again once one rests",
                    path.display(),
                    crate::limits::busy_allowed()
                ),
            )
        })?;
        let replica = open_replica(&self.storage, reconcile_now, &self.options, path, name)?;
        self.spawn(replica, canonical, from_directory, Some(busy))
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
        if databases.files.contains(canonical.as_os_str()) {
            let name = databases
                .active
                .values()
                .find(|d| d.canonical == canonical)
                .map_or("", |d| &d.name);
            return Err(Error::invalid(format!(
                "{} is already replicated as {name:?}",
                canonical.display(),
            )));
        }
        if let Some(db) = databases
            .leaving
            .iter()
            .find(|d| d.name == name || d.canonical == canonical)
        {
            return Err(Error::new(
                crate::error::ErrorKind::Transient,
                format!(
                    "{} ({:?}) is still being removed; try again once it is gone",
                    db.path.display(),
                    db.name
                ),
            ));
        }
        Ok(())
    }

    /// Start the thread of an opened replica, whose file's canonical path is `canonical`.
    /// `busy`: its place in the descriptor budget, if it has one already (else its thread
    /// waits for one).
    pub(super) fn spawn(
        &self,
        mut replica: Replica,
        canonical: PathBuf,
        from_directory: bool,
        busy: Option<Pass<'static>>,
    ) -> Result<()> {
        let prune = lock(&self.prune).clone();
        if prune.is_none() {
            // Kept only for the first prune: none will come.
            drop(replica.take_opening_listing());
        }
        let name = replica.name().to_string();
        let path = replica.path().to_path_buf();
        let (tx, rx) = mailbox();
        let notify = tx.clone();
        let watch = self.watcher.watch(
            &path,
            Box::new(move || {
                let _ = notify.send(Event::Changed);
            }),
        )?;
        let metrics = Arc::new(DbMetrics::new(&name));
        // Boxed: see `DbWorker::run`.
        let mut worker = Box::new(DbWorker::new(
            Arc::clone(&self.pool),
            Arc::clone(&self.options),
            replica,
            prune,
            (tx.clone(), rx),
            Arc::clone(&metrics),
            from_directory,
        ));
        worker.keep_pass(busy);
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
        databases.insert(DbThread {
            name,
            path,
            canonical,
            seq,
            events: tx,
            thread,
            metrics,
            watch,
        });
        Ok(())
    }

    /// Stop watching `name`'s files and tell its thread to leave by `deadline`; returns
    /// its thread, which the caller joins (or puts among the leaving).
    pub(super) fn begin_remove(&self, name: &str, deadline: Instant) -> Result<DbThread> {
        let db = lock(&self.databases)
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

    /// `f` of each active database, in the order they were added.
    pub(super) fn in_order<T>(&self, f: impl Fn(&DbThread) -> T) -> Vec<T> {
        let databases = lock(&self.databases);
        let mut all: Vec<&DbThread> = databases.active.values().collect();
        all.sort_by_key(|d| d.seq);
        all.into_iter().map(f).collect()
    }

    pub(super) fn send(&self, name: &str, event: Event) -> Result<()> {
        let databases = lock(&self.databases);
        let db = databases
            .active
            .get(name)
            .ok_or_else(|| Error::not_found(format!("no replicated database named {name:?}")))?;
        db.events.send(event).map_err(|_| thread_stopped(name))
    }
}

/// A database's thread is gone (it stopped on an error, or `stop` was called).
pub(super) fn thread_stopped(name: &str) -> Error {
    Error::new(
        crate::error::ErrorKind::Other,
        format!("{name}: replication thread stopped"),
    )
}

/// A directory watch adds and removes databases through the core, as the handle does.
impl crate::directory::Host for Core {
    fn watcher(&self) -> &Watcher {
        &self.watcher
    }

    fn rescan_interval(&self, polling: bool) -> Duration {
        if polling {
            self.options.poll_interval
        } else {
            self.options.safety_interval
        }
    }

    fn check_free(&self, name: &str, canonical: &Path) -> Result<()> {
        Core::check_free(self, name, canonical)
    }

    fn add(&self, path: &Path, name: &str) -> Result<()> {
        Core::add(self, path, name, true)
    }

    fn remove_later(&self, name: &str) -> Result<()> {
        Core::remove_later(self, name)
    }

    fn reap(&self) -> usize {
        Core::reap(self)
    }
}
