//! The polling backend: everywhere, as the fallback and for `WatchMode::Poll`.
//!
//! The thread `stat`s `<db>` and `<db>-wal` of every registration every poll interval; a
//! change of existence, inode, size or modification time calls the callback. It sleeps on a
//! channel rather than a plain sleep, so dropping the `Watcher` (which drops the sender)
//! ends the wait at once. It holds no descriptors. Directory registrations are left to
//! their owner, which scans the directory on its own timer when the backend polls (see
//! [`crate::directory`]): comparing whole directories here would only do that work twice.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Backend, Seen, Shared, WatchId};
use crate::files::FileIdentity;

/// What the `Watcher` keeps: the sender whose drop ends the thread's wait.
struct Handle {
    _stop: mpsc::Sender<()>,
}

impl Backend for Handle {}

pub(super) fn start(
    shared: &Arc<Shared>,
    poll_interval: Duration,
) -> io::Result<(Box<dyn Backend>, JoinHandle<()>)> {
    let (stop_tx, stop_rx) = mpsc::channel();
    let shared = Arc::clone(shared);
    let thread = thread::Builder::new()
        .name("walsync-watch".into())
        .spawn(move || run(&shared, &stop_rx, poll_interval))?;
    Ok((Box::new(Handle { _stop: stop_tx }), thread))
}

/// Compares `stat` results every `interval` until told to stop.
fn run(shared: &Shared, stop: &mpsc::Receiver<()>, interval: Duration) {
    loop {
        match stop.recv_timeout(interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Disconnected: the Watcher was dropped.
            _ => return,
        }
        if shared.stopping() {
            return;
        }
        // stat outside the lock: on a slow network filesystem it must not hold up watch()
        // callers.
        let targets: Vec<(WatchId, PathBuf, PathBuf)> = shared
            .registry()
            .iter()
            .filter(|reg| !reg.is_dir())
            .map(|reg| (reg.id, reg.db_path(), reg.wal_path()))
            .collect();
        let now: HashMap<WatchId, Seen> = targets
            .iter()
            .map(|(id, db, wal)| {
                let seen = Seen {
                    db: FileIdentity::probe(db),
                    wal: FileIdentity::probe(wal),
                };
                (*id, seen)
            })
            .collect();
        // Registrations added since are compared on the next round; removed ones are gone.
        for reg in shared.registry().iter_mut() {
            let Some(seen) = now.get(&reg.id) else {
                continue;
            };
            if reg.note_seen(*seen) {
                reg.call();
            }
        }
    }
}
