//! Continuous replication of many databases: the engine behind `walsync watch`, and the
//! library entry point for applications that embed walsync.
//!
//! One OS thread per database owns its [`Replica`](crate::Replica) and sleeps on a channel. What wakes it:
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
//! per [`PRUNE_INTERVAL`](options::PRUNE_INTERVAL), or per retention if that is shorter), and when the window will
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
//! - `pruner`: the one thread that prunes every database for retention, and aborts the
//!   multipart uploads a crash left in storage (retention or not).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::directory::{DirectorySpec, DirectoryWatch};
use crate::error::{Error, Result};
use crate::metrics::DbMetrics;
use crate::storage::Storage;
use crate::uploader::UploadPool;
use crate::watcher::Watcher;

mod lag;
mod mailbox;
mod options;
mod pruner;
pub(crate) mod shared;
mod worker;

pub use options::Options;
use pruner::Pruner;
use shared::{join_thread, lock, open_replica, thread_stopped, Core, Databases};
use worker::Event;

/// How long past the shutdown deadline [`Replicator::stop`] waits for a database thread.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Continuous replication of a set of databases to one destination.
///
/// Databases can be added ([`Replicator::add`]) and removed ([`Replicator::remove`]) while
/// it runs, and whole directories watched for databases that come and go
/// ([`Replicator::watch_directory`]).
pub struct Replicator {
    core: Arc<Core>,
    pruner: Pruner,
    directories: Mutex<Vec<DirectoryWatch>>,
}

impl Replicator {
    /// Start replicating `databases` (path and replica name) to `storage`.
    ///
    /// Every database is opened and checked before any thread starts, so a bad path, a
    /// database not in WAL mode or a name another database writes is an error here, not a
    /// log line later. Storage that cannot be reached is not: the databases stage locally
    /// and their threads reconcile with storage (as [`Replica::open`](crate::Replica::open) does) once it can be
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
        // Started with retention off too: the same thread aborts the multipart uploads a
        // crash left in storage, which cost money whether old backups are kept or not.
        let pruner = Pruner::start(Arc::clone(&storage), options.retention)?;
        // Retention off: nothing asks for prunes.
        let prune = (!options.retention.is_zero()).then(|| pruner.requests());
        let pool = Arc::new(UploadPool::start(
            Arc::clone(&storage),
            options.upload_workers,
        )?);
        let core = Arc::new(Core {
            storage,
            options: Arc::new(options),
            pool,
            watcher,
            prune: Mutex::new(prune),
            databases: Mutex::new(Databases::default()),
            storage_down,
        });
        let replicator = Replicator {
            core,
            pruner,
            directories: Mutex::new(Vec::new()),
        };
        for replica in replicas {
            let path = replica.path();
            let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            replicator.core.spawn(replica, canonical, false, None)?;
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
        !databases.active().is_empty()
            && databases.active().values().all(|d| d.thread.is_finished())
    }

    /// Start replicating one more database, `path` under `name`, as [`Replicator::start`]
    /// would have: opened and checked here (an error if it cannot be, or if the name or
    /// the file is replicated already), reconciled with storage here unless storage could
    /// not be reached (then by its thread, with backoff, as at start). While every
    /// descriptor the open files limit leaves is held by busy databases, it waits up to
    /// 10 s for one to rest, then fails with a transient error (try again).
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
    /// the directory cannot be read. Returns how many matching files that scan found,
    /// replicated or not (those a host limit kept out count too: see `walsync watch`'s
    /// limit warnings).
    pub fn watch_directory(&self, spec: DirectorySpec) -> Result<usize> {
        let watch = DirectoryWatch::start(Arc::clone(&self.core), spec)?;
        let found = watch.found;
        lock(&self.directories).push(watch);
        Ok(found)
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
            let active = databases.take_all();
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
        self.pruner.stop(deadline);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                crate::error::ErrorKind::Transient,
                failures.join("; "),
            ))
        }
    }
}

/// A function returning the current databases' metrics.
pub type MetricsSource = Arc<dyn Fn() -> Vec<Arc<DbMetrics>> + Send + Sync>;
