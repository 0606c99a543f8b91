//! Storing staged objects: the one upload step ([`store`]), and the small, bounded pool of
//! blocking upload workers that `walsync watch` shares among all databases.
//!
//! Each database thread hands over one object at a time (so a replica's objects land in
//! order) and is told when it is stored. A worker retries a failed upload with exponential
//! backoff for as long as it takes: the object is staged (written and fsynced) in the
//! database's sidecar, whose WAL frames walsync may already have let SQLite checkpoint
//! away, so dropping it would lose a transaction. Each failure is logged once per backoff
//! step, saying what failed and when the next try is. Only a shutdown deadline ends the
//! retrying; the object is then handed back unstored.
//!
//! One-shot use (`walsync snapshot`, or a library calling [`Replica::sync`]) has no pool:
//! [`Replica::flush`] stores each object from the caller's thread through the same
//! [`store`], tried once, and returns the error to the caller, who is there to see it (see
//! [`Attempts`]).
//!
//! [`Replica::sync`]: crate::replica::Replica::sync
//! [`Replica::flush`]: crate::replica::Replica::flush

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::layout::ObjectName;
use crate::metrics::DbMetrics;
use crate::storage::Storage;

/// First wait after a failed upload; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One staged object to store, handed out by [`Replica::next_upload`]: store `file` under
/// `key`, then tell the replica with [`Replica::upload_done`].
///
/// [`Replica::next_upload`]: crate::replica::Replica::next_upload
/// [`Replica::upload_done`]: crate::replica::Replica::upload_done
pub struct Upload {
    /// What is stored: its kind, generation, index and time.
    pub object: ObjectName,
    /// Where: `object`'s key in its replica.
    pub key: String,
    pub file: File,
}

/// How [`store`] meets a failed attempt: the one thing the two ways of uploading do
/// differently.
pub enum Attempts<'a> {
    /// One-shot use ([`crate::replica::Replica::flush`]): one attempt (the storage client
    /// retries a failed request itself), and its error to the caller, who is there to see
    /// it and decides what next (`walsync snapshot` exits non-zero). Each object stored is
    /// said at info level, as the command's progress.
    Once,
    /// An upload worker of `walsync watch`: tried again with backoff for as long as it
    /// takes (see the module docs), until the pool's shutdown deadline; nobody waits on
    /// the error meanwhile, the database goes on staging. Each object stored is said at
    /// debug level only (a busy database stores one a second), unless it took more than one
    /// attempt.
    UntilShutdown(&'a Shutdown),
}

/// Store `upload`, counting it in `metrics` if given, and after a failed attempt do as
/// `attempts` says: the one upload step, for the pool's workers and for one-shot use
/// alike. The error names the replica (`label`) and the key.
pub fn store(
    storage: &dyn Storage,
    label: &str,
    upload: &Upload,
    metrics: Option<&DbMetrics>,
    attempts: Attempts<'_>,
) -> Result<()> {
    let key = &upload.key;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut failures = 0u32;
    loop {
        match storage.put_file(key, &upload.file) {
            Ok(()) => {
                if let Some(metrics) = metrics {
                    let bytes = upload.file.metadata().map_or(0, |m| m.len());
                    metrics.stored(&upload.object, bytes);
                }
                if failures > 0 {
                    log::warn!("{}: stored {key} after {failures} failed attempts", label);
                } else if matches!(attempts, Attempts::Once) {
                    log::info!("{}: stored {key}", label);
                } else {
                    log::debug!("{}: stored {key}", label);
                }
                return Ok(());
            }
            Err(e) => {
                failures += 1;
                let retry = match &attempts {
                    Attempts::Once => None,
                    Attempts::UntilShutdown(shutdown) => shutdown
                        .next_wait(&mut backoff)
                        .map(|wait| (shutdown, wait)),
                };
                if let Some(metrics) = metrics {
                    metrics.upload_failed(retry.is_some());
                }
                let Some((shutdown, wait)) = retry else {
                    return Err(e.with_context(format!("{}: uploading {key}", label)));
                };
                log::warn!(
                    "{}: uploading {key} failed ({e}); it stays staged in the sidecar, \
                     retrying in {}s",
                    label,
                    wait.as_secs()
                );
                shutdown.sleep(wait);
            }
        }
    }
}

/// Called with the outcome of a job: the upload back (stored or not) and the result.
pub type Done = Box<dyn FnOnce(Upload, Result<()>) + Send>;

/// A small storage task run on a worker (see [`UploadPool::run`]).
pub type Task = Box<dyn FnOnce(&dyn Storage) + Send>;

/// What a worker does: store a replica's object, or run a small storage task (such as
/// writing a `state.json`) that should not add to the number of requests in flight.
enum Job {
    Upload {
        label: String,
        upload: Upload,
        done: Done,
        metrics: Option<Arc<DbMetrics>>,
    },
    Task(Task),
}

/// The pool. Dropping it lets queued jobs finish (see [`UploadPool::shutdown`]).
pub struct UploadPool {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    shutdown: Arc<Shutdown>,
}

/// The pool's stop, as its workers see it while they retry (see [`Attempts::UntilShutdown`]).
#[derive(Default)]
pub struct Shutdown {
    /// After this instant workers stop retrying and hand failed uploads back.
    deadline: RwLock<Option<Instant>>,
    stopping: AtomicBool,
}

impl Shutdown {
    /// The wait before the next attempt after a failed one, or None if it would end past
    /// the shutdown deadline (give up).
    fn next_wait(&self, backoff: &mut Backoff) -> Option<Duration> {
        // Once stopping, retry every FIRST_BACKOFF until the deadline: a backoff grown
        // during an outage (up to a minute) would outlast the shutdown timeout even though
        // storage may be back already.
        if self.stopping.load(Ordering::Relaxed) {
            backoff.restart();
        }
        let wait = backoff.next_wait();
        (!self.past_deadline(Instant::now() + wait)).then_some(wait)
    }

    fn past_deadline(&self, at: Instant) -> bool {
        self.stopping.load(Ordering::Relaxed)
            && self
                .deadline
                .read()
                .map(|d| d.is_some_and(|d| at >= d))
                .unwrap_or(true)
    }

    /// Sleep, waking early if a stop is requested (to retry at once: storage is often back
    /// by then, and a long backoff would outlast the shutdown timeout) or a shutdown deadline
    /// arrives meanwhile.
    fn sleep(&self, total: Duration) {
        let end = Instant::now() + total;
        let was_stopping = self.stopping.load(Ordering::Relaxed);
        while Instant::now() < end {
            let stop_requested = !was_stopping && self.stopping.load(Ordering::Relaxed);
            if stop_requested || self.past_deadline(Instant::now()) {
                return;
            }
            std::thread::sleep(
                Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())),
            );
        }
    }
}

impl UploadPool {
    /// Start `workers` threads uploading to `storage`.
    pub fn start(storage: Arc<dyn Storage>, workers: usize) -> Result<UploadPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let shutdown = Arc::new(Shutdown::default());
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let worker = Worker {
                storage: Arc::clone(&storage),
                jobs: Arc::clone(&rx),
                shutdown: Arc::clone(&shutdown),
            };
            let handle = std::thread::Builder::new()
                .name(format!("walsync-upload-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || worker.run())
                .map_err(|e| Error::from(e).with_context("starting an upload worker"))?;
            handles.push(handle);
        }
        Ok(UploadPool {
            jobs: Some(tx),
            workers: handles,
            shutdown,
        })
    }

    /// Queue `upload`; `done` is called from a worker thread when it is stored (or, after a
    /// shutdown deadline, given up on). Stored bytes and objects, failed attempts and
    /// retries are counted in `metrics`.
    pub fn submit_counted(
        &self,
        label: &str,
        upload: Upload,
        done: Done,
        metrics: Option<Arc<DbMetrics>>,
    ) {
        let job = Job::Upload {
            label: label.to_string(),
            upload,
            done,
            metrics,
        };
        let refused = match &self.jobs {
            Some(jobs) => jobs.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(Job::Upload { upload, done, .. }) = refused {
            done(
                upload,
                Err(Error::new(
                    crate::error::ErrorKind::Other,
                    "upload pool has stopped",
                )),
            );
        }
    }

    /// Run `task` on a worker, with the pool's storage. Dropped if the pool has stopped.
    pub fn run(&self, task: Task) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Task(task));
        }
    }

    /// From `deadline` on, failing uploads are handed back instead of retried.
    pub fn set_deadline(&self, deadline: Instant) {
        if let Ok(mut d) = self.shutdown.deadline.write() {
            *d = Some(deadline);
        }
        self.shutdown.stopping.store(true, Ordering::Relaxed);
    }

    /// Stop accepting jobs, let the queued ones finish (or fail past the deadline), and wait
    /// for the workers.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for UploadPool {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct Worker {
    storage: Arc<dyn Storage>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    shutdown: Arc<Shutdown>,
}

impl Worker {
    fn run(self) {
        loop {
            let job = match self.jobs.lock() {
                Ok(jobs) => jobs.recv(),
                Err(_) => return,
            };
            match job {
                Ok(Job::Upload {
                    label,
                    upload,
                    done,
                    metrics,
                }) => {
                    // Until it works or the shutdown deadline passes.
                    let result = store(
                        self.storage.as_ref(),
                        &label,
                        &upload,
                        metrics.as_deref(),
                        Attempts::UntilShutdown(&self.shutdown),
                    );
                    done(upload, result);
                }
                Ok(Job::Task(task)) => task(self.storage.as_ref()),
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::layout::{Generation, ObjectKind};
    use crate::storage::ObjectInfo;
    use crate::utc::UtcTime;

    /// Storage whose first `failures` puts fail.
    struct Flaky {
        failures: u32,
        puts: AtomicU32,
    }

    impl Storage for Flaky {
        fn put_bytes(&self, _: &str, _: &[u8]) -> Result<()> {
            unreachable!()
        }
        fn put_file(&self, _: &str, _: &File) -> Result<()> {
            let n = self.puts.fetch_add(1, Ordering::Relaxed);
            if n < self.failures {
                return Err(Error::new(
                    crate::error::ErrorKind::Transient,
                    "503 slow down",
                ));
            }
            Ok(())
        }
        fn get(&self, _: &str, _: &mut dyn Write) -> Result<u64> {
            unreachable!()
        }
        fn list(&self, _: &str) -> Result<Vec<ObjectInfo>> {
            unreachable!()
        }
        fn delete(&self, _: &str) -> Result<()> {
            unreachable!()
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn upload() -> Upload {
        let object = ObjectName {
            kind: ObjectKind::Segment,
            generation: Generation::parse("019ba7c71200beef").unwrap(),
            index: 1,
            time: UtcTime::from_millis(1_767_225_600_000),
        };
        Upload {
            key: object.key("app"),
            object,
            file: tempfile::tempfile().unwrap(),
        }
    }

    fn counted(metrics: DbMetrics) -> String {
        crate::metrics::render(&[Arc::new(metrics)])
    }

    /// One-shot use tries once and hands the error, named, to the caller; a worker tries
    /// again until it is stored, counting what failed.
    #[test]
    fn one_shot_tries_once_and_a_worker_until_stored() {
        let storage = Flaky {
            failures: 1,
            puts: AtomicU32::new(0),
        };
        let metrics = DbMetrics::new("app");
        let upload = upload();
        let e = store(&storage, "app", &upload, Some(&metrics), Attempts::Once).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("app: uploading {}: 503 slow down", upload.key)
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::Transient);
        assert_eq!(storage.puts.load(Ordering::Relaxed), 1);
        let text = counted(metrics);
        assert!(
            text.contains("walsync_upload_errors_total{db=\"app\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("walsync_upload_retries_total{db=\"app\"} 0"),
            "{text}"
        );

        let storage = Flaky {
            failures: 1,
            puts: AtomicU32::new(0),
        };
        let metrics = DbMetrics::new("app");
        let shutdown = Shutdown::default();
        store(
            &storage,
            "app",
            &upload,
            Some(&metrics),
            Attempts::UntilShutdown(&shutdown),
        )
        .unwrap();
        assert_eq!(storage.puts.load(Ordering::Relaxed), 2);
        let text = counted(metrics);
        assert!(
            text.contains("walsync_upload_retries_total{db=\"app\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("walsync_stored_objects_total{db=\"app\"} 1"),
            "{text}"
        );
    }

    /// Past the shutdown deadline a worker gives up at the first failure, with the same
    /// error one-shot use returns.
    #[test]
    fn a_worker_gives_up_past_the_shutdown_deadline() {
        let storage = Flaky {
            failures: u32::MAX,
            puts: AtomicU32::new(0),
        };
        let shutdown = Shutdown::default();
        *shutdown.deadline.write().unwrap() = Some(Instant::now());
        shutdown.stopping.store(true, Ordering::Relaxed);
        let upload = upload();
        let e = store(
            &storage,
            "app",
            &upload,
            None,
            Attempts::UntilShutdown(&shutdown),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("app: uploading {}: 503 slow down", upload.key)
        );
        assert_eq!(storage.puts.load(Ordering::Relaxed), 1);
    }
}
