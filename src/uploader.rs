//! A small, bounded pool of blocking upload workers shared by all databases.
//!
//! Each database thread hands over one object at a time (so a replica's objects land in
//! order) and is told when it is stored. A worker retries a failed upload with exponential
//! backoff for as long as it takes: the object is staged (written and fsynced) in the
//! database's sidecar, whose WAL frames walsync may already have let SQLite checkpoint
//! away, so dropping it would lose a transaction. Each failure is logged once per backoff
//! step, saying what failed and when the next try is. Only a shutdown deadline ends the
//! retrying; the object is then handed back unstored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::metrics::DbMetrics;
use crate::replica::Upload;
use crate::storage::Storage;

/// First wait after a failed upload; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
    /// After this instant workers stop retrying and hand failed uploads back.
    deadline: Arc<RwLock<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
}

impl UploadPool {
    /// Start `workers` threads uploading to `storage`.
    pub fn start(storage: Arc<dyn Storage>, workers: usize) -> Result<UploadPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let deadline = Arc::new(RwLock::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let worker = Worker {
                storage: Arc::clone(&storage),
                jobs: Arc::clone(&rx),
                deadline: Arc::clone(&deadline),
                stopping: Arc::clone(&stopping),
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
            deadline,
            stopping,
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
                    crate::ErrorKind::Other,
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
        if let Ok(mut d) = self.deadline.write() {
            *d = Some(deadline);
        }
        self.stopping.store(true, Ordering::Relaxed);
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
    deadline: Arc<RwLock<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
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
                    let result = self.upload(&label, &upload, metrics.as_deref());
                    done(upload, result);
                }
                Ok(Job::Task(task)) => task(self.storage.as_ref()),
                Err(_) => return,
            }
        }
    }

    /// Upload until it works or the shutdown deadline passes.
    fn upload(&self, label: &str, upload: &Upload, metrics: Option<&DbMetrics>) -> Result<()> {
        let key = &upload.key;
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut failures = 0u32;
        loop {
            match self.storage.put_file(key, &upload.file) {
                Ok(()) => {
                    if let Some(metrics) = metrics {
                        let bytes = upload.file.metadata().map_or(0, |m| m.len());
                        metrics.stored(key, bytes);
                    }
                    if failures > 0 {
                        log::warn!("{}: stored {key} after {failures} failed attempts", label);
                    } else {
                        log::debug!("{}: stored {key}", label);
                    }
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    // Once stopping, retry every FIRST_BACKOFF until the deadline: a backoff
                    // grown during an outage (up to a minute) would outlast the shutdown
                    // timeout even though storage may be back already.
                    if self.stopping.load(Ordering::Relaxed) {
                        backoff.restart();
                    }
                    let wait = backoff.next_wait();
                    let giving_up = self.past_deadline(Instant::now() + wait);
                    if let Some(metrics) = metrics {
                        metrics.upload_failed(!giving_up);
                    }
                    if giving_up {
                        return Err(e.with_context(format!("{}: uploading {key}", label)));
                    }
                    log::warn!(
                        "{}: uploading {key} failed ({e}); it stays staged in the sidecar, \
                         retrying in {}s",
                        label,
                        wait.as_secs()
                    );
                    self.sleep(wait);
                }
            }
        }
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
