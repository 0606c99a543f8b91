//! Retention, in the background: one thread prunes every database it is asked to (see
//! [`crate::retention`]), so that a slow or failing prune never holds up a database thread
//! or an upload worker. A failed prune is a warning, tried again a prune interval later,
//! and never stops replication. The same thread aborts the multipart uploads a crash left
//! in storage, as it starts and then once a day; it runs with retention off too, for that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::options::PRUNE_INTERVAL;
use crate::error::{Error, Result};
use crate::retention;
use crate::storage::Storage;
use crate::utc::UtcTime;

/// A request to prune one database: after a snapshot was stored (list it afresh), or at
/// start with the listing its replica took when it opened (no LIST needed).
pub(super) struct PruneRequest {
    pub(super) name: String,
    pub(super) listing: Option<Listing>,
}

type Listing =
    std::collections::BTreeMap<crate::layout::Generation, crate::layout::GenerationObjects>;

/// How often a running `watch` aborts the multipart uploads a crash left in storage.
const ABORT_STALE_UPLOADS_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The pruning thread: prunes the databases it is asked to, one at a time, in the
/// background of the database threads and the upload workers. It also prunes a database
/// again, by itself, when the window will have passed its next snapshot (the plan's
/// `next_due`), so that old backups of a database that went idle still go, and a database
/// with nothing left to wait for costs no requests at all.
pub(super) struct Pruner {
    requests: Sender<PruneRequest>,
    thread: JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

impl Pruner {
    pub(super) fn start(storage: Arc<dyn Storage>, retention: Duration) -> Result<Pruner> {
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

    pub(super) fn requests(&self) -> Sender<PruneRequest> {
        self.requests.clone()
    }

    /// Start no new prune, and wait for one in progress until `deadline`. A prune cut short
    /// by the process exiting leaves a restorable replica (see [`crate::retention`]).
    pub(super) fn stop(self, deadline: Instant) {
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
