//! The kqueue backend (macOS, BSD).
//!
//! kqueue watches open descriptors, so the thread owns the queue and holds one descriptor on
//! each registered directory (entries added, removed or renamed) and one on each existing
//! WAL file (written, extended, truncated, deleted, renamed), reopened whenever the WAL is
//! replaced. It re-reads the registrations (opening descriptors to match) when `watch` wakes
//! it through a pipe, when a watched directory changes, and every poll interval, and
//! compares `stat` results to decide whom to notify.
//!
//! It never holds a descriptor on the database file: closing any descriptor of a file drops
//! every POSIX lock this process holds on it (<https://www.sqlite.org/howtocorrupt.html>,
//! 2.2), which would silently release the locks of walsync's own SQLite connections. The
//! database file is compared by `stat` instead, on every directory change and every poll
//! interval, so in-place writes to it are seen at the next of those.
//!
//! Directory registrations share the directory descriptors; kqueue cannot name what
//! changed, so their callbacks hear only that something in the directory did.
//!
//! Release: the queue and every descriptor in it belong to the thread, and close when it
//! ends (the `Watcher`'s drop closes the wake pipe and joins it). A directory no
//! registration needs any more is closed at the next reconcile (`unwatch` wakes the
//! thread for it).

use std::collections::{HashMap, HashSet};
use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kqueue::{EventData, EventFilter, FilterFlag, Ident, Vnode};

use crate::files::FileIdentity;
use super::{Backend, Registration, Seen, Shared, BATCH_GAP, ERROR_BACKOFF};
use crate::error::{Context, Result};

/// Events taken into one batch before callbacks run.
const MAX_EVENTS_PER_BATCH: usize = 4096;

/// A directory: entries added, removed or renamed (NOTE_WRITE), or the directory itself
/// going away.
fn dir_flags() -> FilterFlag {
    FilterFlag::NOTE_WRITE
        | FilterFlag::NOTE_DELETE
        | FilterFlag::NOTE_RENAME
        | FilterFlag::NOTE_REVOKE
}

/// A WAL file: written, grown, truncated (ATTRIB on most systems), deleted or renamed.
fn wal_flags() -> FilterFlag {
    let flags = FilterFlag::NOTE_WRITE
        | FilterFlag::NOTE_EXTEND
        | FilterFlag::NOTE_DELETE
        | FilterFlag::NOTE_RENAME
        | FilterFlag::NOTE_ATTRIB
        | FilterFlag::NOTE_REVOKE;
    #[cfg(target_os = "openbsd")]
    let flags = flags | FilterFlag::NOTE_TRUNCATE;
    flags
}

/// What the `Watcher` keeps: the wake pipe's write end. One byte tells the thread the
/// registrations changed; closing it (dropping the `Watcher`) wakes the thread to stop.
struct Handle {
    wake: PipeWriter,
}

pub(super) fn start(
    shared: &Arc<Shared>,
    interval: Duration,
) -> io::Result<(Box<dyn Backend>, JoinHandle<()>)> {
    let (wake_rx, wake_tx) = io::pipe()?;
    let mut kq = kqueue::Watcher::new()?;
    kq.add_fd(
        wake_rx.as_raw_fd(),
        EventFilter::EVFILT_READ,
        FilterFlag::empty(),
    )?;
    // Also marks the queue started; until then the crate's poll returns at once.
    kq.watch()?;
    let mut state = State {
        kq,
        wake: wake_rx,
        dirs: HashSet::new(),
        wals: HashMap::new(),
        warned: HashSet::new(),
    };
    let shared = Arc::clone(shared);
    let thread = thread::Builder::new()
        .name("walsync-watch".into())
        .spawn(move || state.run(&shared, interval))?;
    Ok((Box::new(Handle { wake: wake_tx }), thread))
}

impl Backend for Handle {
    /// The thread opens the directory; try it here too so a bad directory is an error for
    /// the caller rather than a warning in the log.
    fn add(&self, reg: &mut Registration) -> Result<()> {
        std::fs::File::open(&reg.dir)
            .context(|| format!("watching directory {}", reg.dir.display()))?;
        Ok(())
    }

    /// Tells the thread, so it closes the descriptors nobody needs.
    fn removed(&self, _reg: &Registration, _rest: &[Registration]) {
        self.added();
    }

    /// Tells the thread the registrations changed, so it opens the descriptors they need.
    fn added(&self) {
        // The thread drains the pipe whenever it wakes, so the write blocks only if 64 KiB
        // of wake-ups went unread. Should it fail, the thread still re-reads the
        // registrations every poll interval.
        if let Err(err) = (&self.wake).write_all(&[1]) {
            log::warn!("waking the file watcher thread: {err}");
        }
    }
}

/// Paths as the kqueue crate names them (it keys file watches by lossy UTF-8 strings). A
/// non-UTF-8 path fails to open under its lossy name; such a database is still checked
/// by `stat` every poll interval.
fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[derive(Default)]
struct Batch {
    /// Check every registration: timer, registrations changed, or a kqueue error.
    full: bool,
    /// Watched directories that changed.
    dirs: HashSet<String>,
    /// Watched WAL files that changed.
    wals: HashSet<String>,
    /// A watched WAL was deleted or renamed: its descriptor must be replaced.
    reopen: bool,
    /// Error events taken, other than interrupted system calls.
    errors: usize,
}

struct State {
    kq: kqueue::Watcher,
    wake: PipeReader,
    /// Directories with an open descriptor in the queue.
    dirs: HashSet<String>,
    /// WAL files with an open descriptor in the queue, and the (dev, inode) it refers to.
    wals: HashMap<String, (u64, u64)>,
    /// Paths whose failure to open was already logged.
    warned: HashSet<String>,
}

impl State {
    fn run(&mut self, shared: &Shared, interval: Duration) {
        // Start with a full pass so registrations made before the first event are set up.
        let start = Batch {
            full: true,
            ..Batch::default()
        };
        self.apply(shared, &start);
        loop {
            // Wait for the first event or the timer, then take what else is queued.
            let mut event = self.kq.poll(Some(interval));
            if shared.stopping() {
                return;
            }
            let mut batch = Batch {
                full: event.is_none(),
                ..Batch::default()
            };
            let mut taken = 0;
            while let Some(ev) = event {
                self.classify(ev, &mut batch);
                taken += 1;
                if taken >= MAX_EVENTS_PER_BATCH {
                    break;
                }
                event = self.kq.poll(None);
            }
            if shared.stopping() {
                return;
            }
            self.apply(shared, &batch);
            // Nothing but errors: kevent itself is failing; do not spin on it.
            if batch.errors > 0 && batch.errors == taken {
                thread::sleep(ERROR_BACKOFF);
            } else if taken > 0 {
                thread::sleep(BATCH_GAP);
            }
        }
    }

    fn classify(&mut self, ev: kqueue::Event, batch: &mut Batch) {
        if let EventData::Error(err) = &ev.data {
            if err.kind() != io::ErrorKind::Interrupted {
                log::warn!("kqueue: {err}");
                batch.errors += 1;
            }
            batch.full = true;
            return;
        }
        match ev.ident {
            Ident::Fd(fd) if fd == self.wake.as_raw_fd() => {
                if let EventData::ReadReady(available) = ev.data {
                    self.drain_wake(available);
                }
                batch.full = true;
            }
            Ident::Filename(_, name) => {
                if self.dirs.contains(&name) {
                    batch.dirs.insert(name);
                } else if self.wals.contains_key(&name) {
                    if matches!(
                        ev.data,
                        EventData::Vnode(Vnode::Delete | Vnode::Rename | Vnode::Revoke)
                    ) {
                        batch.reopen = true;
                    }
                    batch.wals.insert(name);
                }
            }
            _ => {}
        }
    }

    /// Reads the wake-up bytes kqueue says are there (so reading cannot block).
    fn drain_wake(&mut self, mut available: usize) {
        let mut buf = [0u8; 256];
        while available > 0 {
            let want = available.min(buf.len());
            match (&self.wake).read(&mut buf[..want]) {
                Ok(0) => return,
                Ok(n) => available -= n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    log::warn!("reading the watcher wake-up pipe: {err}");
                    return;
                }
            }
        }
    }

    /// Brings the descriptors up to date if needed, then notifies every registration the
    /// batch concerns whose files changed (or whose WAL reported a change).
    fn apply(&mut self, shared: &Shared, batch: &Batch) {
        let mut registry = shared.registry();
        if batch.full || batch.reopen || !batch.dirs.is_empty() {
            self.reconcile(&registry);
        }
        for reg in registry.iter_mut() {
            if reg.is_dir() {
                if batch.dirs.contains(&key(&reg.dir)) {
                    reg.call_dir(None);
                }
                continue;
            }
            let wal_event = batch.wals.contains(&key(&reg.wal_path()));
            if !(batch.full || wal_event || batch.dirs.contains(&key(&reg.dir))) {
                continue;
            }
            let now: Seen = reg.stat();
            if reg.note_seen(now) || wal_event {
                reg.call();
            }
        }
    }

    /// Opens descriptors for every registered directory and existing WAL, and replaces or
    /// closes those whose WAL was replaced or deleted, or whose directory no registration
    /// needs any more.
    fn reconcile(&mut self, registry: &[Registration]) {
        let mut want_dirs = HashSet::new();
        let mut want_wals: HashMap<String, Option<(u64, u64)>> = HashMap::new();
        for reg in registry {
            want_dirs.insert(key(&reg.dir));
            if reg.is_dir() {
                continue;
            }
            let wal = reg.wal_path();
            let identity = FileIdentity::probe(&wal).map(|s| (s.dev, s.ino));
            want_wals.insert(key(&wal), identity);
        }

        let stale_wals: Vec<String> = self
            .wals
            .iter()
            .filter(|(wal, identity)| want_wals.get(*wal) != Some(&Some(**identity)))
            .map(|(wal, _)| wal.clone())
            .collect();
        for wal in stale_wals {
            self.wals.remove(&wal);
            // Closing our descriptor on a WAL is safe: SQLite keeps no POSIX locks on it.
            if let Err(err) = self.kq.remove_filename(&wal, EventFilter::EVFILT_VNODE) {
                log::debug!("kqueue: no longer watching {wal}: {err}");
            }
        }

        let stale_dirs: Vec<String> = self
            .dirs
            .iter()
            .filter(|dir| !want_dirs.contains(*dir))
            .cloned()
            .collect();
        for dir in stale_dirs {
            self.dirs.remove(&dir);
            if let Err(err) = self.kq.remove_filename(&dir, EventFilter::EVFILT_VNODE) {
                log::debug!("kqueue: no longer watching {dir}: {err}");
            }
        }

        let mut added = false;
        for dir in want_dirs {
            if self.dirs.contains(&dir) {
                continue;
            }
            match self
                .kq
                .add_filename(&dir, EventFilter::EVFILT_VNODE, dir_flags())
            {
                Ok(()) => {
                    self.warned.remove(&dir);
                    self.dirs.insert(dir);
                    added = true;
                }
                Err(err) => {
                    if self.warned.insert(dir.clone()) {
                        log::warn!(
                            "kqueue: cannot watch directory {dir} ({err}); \
                             checking it every poll interval instead"
                        );
                    }
                }
            }
        }
        for (wal, identity) in want_wals {
            let Some(identity) = identity else { continue };
            if self.wals.contains_key(&wal) {
                continue;
            }
            match self
                .kq
                .add_filename(&wal, EventFilter::EVFILT_VNODE, wal_flags())
            {
                Ok(()) => {
                    // If the WAL was replaced between the stat and the open, the identity
                    // is the old one and the next reconcile reopens it.
                    self.warned.remove(&wal);
                    self.wals.insert(wal, identity);
                    added = true;
                }
                // Deleted since the stat: the directory event will follow.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    if self.warned.insert(wal.clone()) {
                        log::warn!(
                            "kqueue: cannot watch {wal} ({err}); \
                             checking it every poll interval instead"
                        );
                    }
                }
            }
        }
        // The crate registers added descriptors with the kernel only in watch().
        if added {
            if let Err(err) = self.kq.watch() {
                log::warn!("kqueue: registering watches: {err}");
            }
        }
    }
}
