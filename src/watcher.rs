//! Waking a database's replication thread when its WAL or database file changes.
//!
//! One background thread watches the *directories* of any number of databases, not just their
//! files: SQLite creates `<db>-wal` on the first write and deletes it when the last connection
//! closes, and tools replace a database by renaming a new file into place. A watch on the file
//! itself would miss the creation and stay attached to the old, unlinked inode after a delete
//! or rename; a directory watch sees every name come and go.
//!
//! Events are coalesced: a burst of writes to a busy WAL produces hundreds of kernel events,
//! but the replication thread only needs to hear "something changed, go and look", so each
//! registration's callback is called at most once per batch of events read together.
//!
//! Notifications only make the common case fast; they are not the source of truth. inotify's
//! queue can overflow (every callback is then called, but the kernel has already dropped the
//! details), network and FUSE filesystems may deliver no events for writes made by other
//! machines or containers, and kqueue cannot see in-place writes to the database file (see
//! below). So the replication loop still re-checks each database on a slow timer.
//!
//! Backends:
//!
//! - **inotify** (Linux): one instance, one watch per distinct directory, events matched to
//!   registrations by file name. Names other than `<db>` and `<db>-wal` (`-shm`, `-journal`,
//!   the `.<db>-walsync` sidecar, unrelated files) are ignored.
//! - **kqueue** (macOS, BSD): kqueue watches open descriptors, so the thread holds one on each
//!   directory (entries added, removed or renamed) and one on each existing WAL file (written,
//!   extended, truncated, deleted, renamed), reopened whenever the directory changes. It does
//!   *not* hold a descriptor on the database file: closing any descriptor of a file drops every
//!   POSIX lock this process holds on it (<https://www.sqlite.org/howtocorrupt.html>, 2.2), which
//!   would silently release the locks of walsync's own SQLite connections. The database file is
//!   compared by `stat` instead, on every directory change and every `poll_interval`.
//! - **poll**: `stat` of `<db>` and `<db>-wal` every `poll_interval`; a change of existence,
//!   inode, size or modification time calls the callback.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, PipeWriter};
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::{Context, Error, Result};

/// How long a backend thread waits after an unexpected error before trying again, so a
/// persistent failure is logged a few times a second instead of spinning a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// How the watcher learns about changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify on Linux, kqueue on macOS/BSD, stat polling elsewhere (and wherever the
    /// kernel facility cannot be set up).
    Auto,
    /// stat polling everywhere (network filesystems, containers where events don't arrive).
    Poll,
}

/// One background thread that watches the directories of any number of databases and calls
/// each database's callback when its WAL (`<db>-wal`) or database file is created, written,
/// truncated, deleted, or replaced by a rename into place.
///
/// Callbacks run on the watcher thread while it holds its registration lock, which is what
/// lets [`Watcher::unwatch`] promise that a callback is never called after it returns. So a
/// callback must be cheap and must not block (an mpsc send is ideal). It may call
/// [`Watcher::unwatch`], which then takes effect after the current batch of callbacks; it
/// cannot call [`Watcher::watch`].
pub struct Watcher {
    shared: Arc<Shared>,
    kind: Kind,
    /// inotify and kqueue: closed by `Drop`, so the thread wakes up at once (end of file on
    /// the pipe). kqueue also gets one byte per registration change.
    wake: Option<PipeWriter>,
    /// poll: dropped by `Drop`, which ends the thread's `recv_timeout` at once.
    stop_poll: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Identifies one `watch` registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchId(u64);

/// The backend, with what callers need to change its registrations.
enum Kind {
    /// Watches are added and removed directly from the calling thread (the kernel makes that
    /// safe), so `watch` has set up the directory watch before it returns.
    #[cfg(target_os = "linux")]
    Inotify(inotify::Watches),
    /// The thread owns the kqueue; callers wake it to re-read the registrations.
    #[cfg(any(
        target_os = "macos",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    ))]
    Kqueue,
    Poll,
}

/// State shared between the `Watcher` handle and its thread.
#[derive(Default)]
struct Shared {
    registry: Mutex<Registry>,
    /// Registrations that a callback asked to remove while the thread held `registry`.
    deferred_unwatch: Mutex<Vec<WatchId>>,
    stop: AtomicBool,
}

impl Shared {
    /// The registrations. A panicking callback is caught before it can poison the lock, but
    /// even a poisoned registry is still consistent (every change is a single map operation),
    /// so keep using it rather than stopping all notifications.
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn defer_unwatch(&self, id: WatchId) {
        self.deferred_unwatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
    }

    fn take_deferred_unwatch(&self) -> Vec<WatchId> {
        std::mem::take(
            &mut *self
                .deferred_unwatch
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    regs: HashMap<WatchId, Registration>,
}

impl Registry {
    /// Calls each listed registration's callback once (ids no longer registered are skipped).
    fn notify(&self, ids: &HashSet<WatchId>) {
        for id in ids {
            if let Some(reg) = self.regs.get(id) {
                reg.call();
            }
        }
    }
}

/// One database being watched.
struct Registration {
    /// Canonical directory holding the database (symlinks resolved, as SQLite does, so the
    /// WAL is looked for where SQLite will put it).
    dir: PathBuf,
    db_name: OsString,
    wal_name: OsString,
    notify: Box<dyn Fn() + Send>,
    /// What the files looked like at the last check (poll and kqueue backends).
    seen: Seen,
    /// The directory's inotify watch, shared with every registration in the same directory.
    #[cfg(target_os = "linux")]
    wd: Option<inotify::WatchDescriptor>,
}

impl Registration {
    fn db_path(&self) -> PathBuf {
        self.dir.join(&self.db_name)
    }

    fn wal_path(&self) -> PathBuf {
        self.dir.join(&self.wal_name)
    }

    fn stat(&self) -> Seen {
        Seen {
            db: Stamp::of(&self.db_path()),
            wal: Stamp::of(&self.wal_path()),
        }
    }

    /// Calls the callback. A panic is logged rather than allowed to kill the watcher thread,
    /// which would silently stop the notifications of every other database.
    fn call(&self) {
        if catch_unwind(AssertUnwindSafe(|| (self.notify)())).is_err() {
            log::error!(
                "the change callback for {} panicked",
                self.db_path().display()
            );
        }
    }
}

/// What `stat` said about one file: enough to notice it being written (size, mtime) or
/// replaced (dev, inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Stamp {
    /// `None` when the file does not exist (or cannot be examined, which for our purpose of
    /// noticing changes is the same thing).
    fn of(path: &Path) -> Option<Stamp> {
        match std::fs::metadata(path) {
            Ok(m) => Some(Stamp {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            }),
            Err(err) => {
                if err.kind() != io::ErrorKind::NotFound {
                    log::debug!("watcher: cannot stat {}: {err}", path.display());
                }
                None
            }
        }
    }
}

/// The database and WAL as last seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    db: Option<Stamp>,
    wal: Option<Stamp>,
}

impl Watcher {
    /// Start the watcher thread. `poll_interval` is used by the polling backend, and by the
    /// kqueue backend for its periodic `stat` of database files.
    ///
    /// With [`WatchMode::Auto`], a kernel facility that cannot be set up (too many inotify
    /// instances, say) is logged and replaced by polling rather than failing.
    pub fn start(mode: WatchMode, poll_interval: Duration) -> Result<Watcher> {
        if poll_interval.is_zero() {
            return Err(Error::invalid(
                "starting the file watcher: the poll interval must be greater than zero",
            ));
        }
        let shared = Arc::new(Shared::default());
        if mode == WatchMode::Auto {
            #[cfg(target_os = "linux")]
            match inotify_backend::start(&shared) {
                Ok((watches, wake, thread)) => {
                    return Ok(Watcher {
                        shared,
                        kind: Kind::Inotify(watches),
                        wake: Some(wake),
                        stop_poll: None,
                        thread: Some(thread),
                    })
                }
                Err(err) => log::warn!(
                    "cannot use inotify ({err}); watching databases by polling every {poll_interval:?}"
                ),
            }
            #[cfg(any(
                target_os = "macos",
                target_os = "freebsd",
                target_os = "netbsd",
                target_os = "openbsd",
                target_os = "dragonfly"
            ))]
            match kqueue_backend::start(&shared, poll_interval) {
                Ok((wake, thread)) => {
                    return Ok(Watcher {
                        shared,
                        kind: Kind::Kqueue,
                        wake: Some(wake),
                        stop_poll: None,
                        thread: Some(thread),
                    })
                }
                Err(err) => log::warn!(
                    "cannot use kqueue ({err}); watching databases by polling every {poll_interval:?}"
                ),
            }
        }
        let (stop_tx, stop_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("walsync-watch".into())
            .spawn(move || run_poll(&thread_shared, &stop_rx, poll_interval))
            .context(|| "starting the file watcher thread")?;
        Ok(Watcher {
            shared,
            kind: Kind::Poll,
            wake: None,
            stop_poll: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Call `notify` whenever `db_path`'s WAL or database file changes. Watches the parent
    /// directory so creation, deletion and rename-into-place of either file are seen. The
    /// database need not exist yet, its directory must.
    ///
    /// `notify` must be cheap and non-blocking (it will typically be an mpsc send). Changes
    /// made after `watch` returns are reported; with polling, relative to the state `watch`
    /// saw.
    pub fn watch(&self, db_path: &Path, notify: Box<dyn Fn() + Send>) -> Result<WatchId> {
        if self.on_watcher_thread() {
            return Err(Error::invalid(format!(
                "watching {}: Watcher::watch cannot be called from a change callback",
                db_path.display()
            )));
        }
        let (dir, db_name) = resolve(db_path)?;
        let mut wal_name = db_name.clone();
        wal_name.push("-wal");
        let mut reg = Registration {
            dir,
            db_name,
            wal_name,
            notify,
            seen: Seen::default(),
            #[cfg(target_os = "linux")]
            wd: None,
        };
        reg.seen = reg.stat();

        let mut registry = self.shared.registry();
        match &self.kind {
            // Under the registry lock, so a concurrent unwatch of another database in the
            // same directory cannot remove the shared watch between our add and our insert.
            #[cfg(target_os = "linux")]
            Kind::Inotify(watches) => reg.wd = Some(inotify_backend::add(watches, &reg.dir)?),
            // The thread opens the directory; try it here too so a bad directory is an error
            // for the caller rather than a warning in the log.
            #[cfg(any(
                target_os = "macos",
                target_os = "freebsd",
                target_os = "netbsd",
                target_os = "openbsd",
                target_os = "dragonfly"
            ))]
            Kind::Kqueue => {
                std::fs::File::open(&reg.dir)
                    .context(|| format!("watching directory {}", reg.dir.display()))?;
            }
            Kind::Poll => {}
        }
        let id = WatchId(registry.next_id);
        registry.next_id += 1;
        log::debug!(
            "watching {} for changes ({})",
            reg.db_path().display(),
            self.backend()
        );
        registry.regs.insert(id, reg);
        drop(registry);
        self.wake_thread();
        Ok(id)
    }

    /// Stop calling that registration's callback. Once this returns the callback is never
    /// called again (when called from a callback: once the current batch of callbacks ends).
    /// Unknown or already removed ids are ignored.
    pub fn unwatch(&self, id: WatchId) {
        if self.on_watcher_thread() {
            // The thread holds the registry lock while it runs callbacks.
            self.shared.defer_unwatch(id);
            return;
        }
        let mut registry = self.shared.registry();
        let Some(reg) = registry.regs.remove(&id) else {
            return;
        };
        log::debug!("no longer watching {}", reg.db_path().display());
        match &self.kind {
            #[cfg(target_os = "linux")]
            Kind::Inotify(watches) => inotify_backend::release(&registry, watches, &reg),
            #[cfg(any(
                target_os = "macos",
                target_os = "freebsd",
                target_os = "netbsd",
                target_os = "openbsd",
                target_os = "dragonfly"
            ))]
            Kind::Kqueue => {}
            Kind::Poll => {}
        }
        drop(registry);
        self.wake_thread();
    }

    /// "inotify", "kqueue" or "poll".
    pub fn backend(&self) -> &'static str {
        match self.kind {
            #[cfg(target_os = "linux")]
            Kind::Inotify(_) => "inotify",
            #[cfg(any(
                target_os = "macos",
                target_os = "freebsd",
                target_os = "netbsd",
                target_os = "openbsd",
                target_os = "dragonfly"
            ))]
            Kind::Kqueue => "kqueue",
            Kind::Poll => "poll",
        }
    }

    fn on_watcher_thread(&self) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == thread::current().id())
    }

    /// Tells the kqueue thread that the registrations changed, so it opens or closes the
    /// descriptors it watches. The other backends need no wake-up.
    fn wake_thread(&self) {
        #[cfg(any(
            target_os = "macos",
            target_os = "freebsd",
            target_os = "netbsd",
            target_os = "openbsd",
            target_os = "dragonfly"
        ))]
        if let (Kind::Kqueue, Some(wake)) = (&self.kind, &self.wake) {
            use std::io::Write;
            // The thread drains the pipe whenever it wakes, so the write blocks only if 64 KiB
            // of wake-ups went unread. Should it fail, the thread still re-reads the
            // registrations every poll_interval.
            if let Err(err) = (&*wake).write_all(&[1]) {
                log::warn!("waking the file watcher thread: {err}");
            }
        }
    }
}

impl Drop for Watcher {
    /// Stops and joins the thread. Both wake-ups (pipe closed, channel dropped) end its wait
    /// at once, so this does not wait for a poll interval.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake = None;
        self.stop_poll = None;
        if let Some(thread) = self.thread.take() {
            // Dropped from a callback (the last reference to the watcher was captured by a
            // callback): the thread sees the stop flag when the callback returns; joining
            // itself would deadlock.
            if thread.thread().id() == thread::current().id() {
                return;
            }
            if thread.join().is_err() {
                log::error!("the file watcher thread panicked");
            }
        }
    }
}

/// Where SQLite will really keep `db_path` and its WAL: the canonical directory and the file
/// name. An existing database is resolved through symlinks, as SQLite does; one not created
/// yet is looked for in its (resolved) parent directory.
fn resolve(db_path: &Path) -> Result<(PathBuf, OsString)> {
    let real = match std::fs::canonicalize(db_path) {
        Ok(real) => {
            if real.is_dir() {
                return Err(Error::invalid(format!(
                    "watching {}: it is a directory, not a database file",
                    db_path.display()
                )));
            }
            real
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let name = db_path.file_name().ok_or_else(|| {
                Error::invalid(format!(
                    "watching {}: the path does not name a file",
                    db_path.display()
                ))
            })?;
            let parent = match db_path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let dir = std::fs::canonicalize(parent).context(|| {
                format!(
                    "watching {}: resolving its directory {}",
                    db_path.display(),
                    parent.display()
                )
            })?;
            dir.join(name)
        }
        Err(err) => return Err(err).context(|| format!("watching {}", db_path.display())),
    };
    match (real.parent(), real.file_name()) {
        (Some(dir), Some(name)) => Ok((dir.to_path_buf(), name.to_os_string())),
        _ => Err(Error::invalid(format!(
            "watching {}: not a file in a directory",
            db_path.display()
        ))),
    }
}

/// The polling backend: compare `stat` results every `interval` until told to stop.
fn run_poll(shared: &Shared, stop: &mpsc::Receiver<()>, interval: Duration) {
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
        // and unwatch() callers.
        let targets: Vec<(WatchId, PathBuf, PathBuf)> = shared
            .registry()
            .regs
            .iter()
            .map(|(id, reg)| (*id, reg.db_path(), reg.wal_path()))
            .collect();
        let now: Vec<(WatchId, Seen)> = targets
            .iter()
            .map(|(id, db, wal)| {
                let seen = Seen {
                    db: Stamp::of(db),
                    wal: Stamp::of(wal),
                };
                (*id, seen)
            })
            .collect();
        let mut registry = shared.registry();
        let mut changed = HashSet::new();
        for (id, seen) in now {
            if let Some(reg) = registry.regs.get_mut(&id) {
                if reg.seen != seen {
                    reg.seen = seen;
                    changed.insert(id);
                }
            }
        }
        registry.notify(&changed);
        drop(registry);
        for id in shared.take_deferred_unwatch() {
            shared.registry().regs.remove(&id);
        }
    }
}

#[cfg(target_os = "linux")]
mod inotify_backend {
    //! One inotify instance; the thread sleeps in poll(2) on it and on the wake pipe.

    use std::io::{self, PipeReader, PipeWriter};
    use std::os::fd::AsRawFd;
    use std::path::Path;
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

    use super::{Registration, Registry, Shared, WatchId, ERROR_BACKOFF};
    use crate::error::{Context, Result};
    use std::collections::{HashMap, HashSet};
    use std::ffi::OsString;

    /// Room for about 2000 events per read (16 bytes + name each).
    const EVENT_BUFFER: usize = 64 * 1024;
    /// Reads drained into one batch before callbacks run, so a writer that never pauses still
    /// gets its callbacks.
    const MAX_READS_PER_BATCH: usize = 16;

    /// Everything that can happen to a database or its WAL as an entry of the directory.
    /// Truncation is a MODIFY; a rename into place is MOVED_TO (the replaced file goes with
    /// no DELETE event of its own). The SELF events are the directory itself going away.
    /// CLOSE_WRITE is left out: it fires whenever a connection closes a read-write
    /// descriptor, written or not, and every real write is already a MODIFY.
    fn mask() -> WatchMask {
        WatchMask::MODIFY
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
    }

    pub(super) fn start(shared: &Arc<Shared>) -> io::Result<(Watches, PipeWriter, JoinHandle<()>)> {
        let inotify = Inotify::init().map_err(|err| match err.raw_os_error() {
            // inotify_init1 says EMFILE for its own per-user limit as well as for RLIMIT_NOFILE.
            Some(libc::EMFILE) => io::Error::other(format!(
                "{err}: the fs.inotify.max_user_instances sysctl or RLIMIT_NOFILE was reached"
            )),
            _ => err,
        })?;
        let watches = inotify.watches();
        let (wake_rx, wake_tx) = io::pipe()?;
        let shared = Arc::clone(shared);
        let thread = thread::Builder::new()
            .name("walsync-watch".into())
            .spawn(move || run(&shared, inotify, &wake_rx))?;
        Ok((watches, wake_tx, thread))
    }

    /// Watches `dir`. inotify keeps one watch per inode: for a directory already watched this
    /// returns the same descriptor, which is how databases sharing a directory share it.
    pub(super) fn add(watches: &Watches, dir: &Path) -> Result<WatchDescriptor> {
        let hint = |err: &io::Error| match err.raw_os_error() {
            Some(libc::ENOSPC) => " (raise fs.inotify.max_user_watches, or use polling)",
            _ => "",
        };
        let mut watches = watches.clone();
        match watches.add(dir, mask()) {
            Ok(wd) => Ok(wd),
            Err(err) => {
                let hint = hint(&err);
                Err(err)
                    .context(|| format!("watching directory {} with inotify{hint}", dir.display()))
            }
        }
    }

    /// Removes the directory watch of `removed` (already taken out of `registry`) unless
    /// another registration still uses it.
    pub(super) fn release(registry: &Registry, watches: &Watches, removed: &Registration) {
        let Some(wd) = &removed.wd else { return };
        if registry.regs.values().any(|r| r.wd.as_ref() == Some(wd)) {
            return;
        }
        // Fails harmlessly if the directory was deleted (the kernel dropped the watch).
        if let Err(err) = watches.clone().remove(wd.clone()) {
            log::debug!(
                "removing the inotify watch on {}: {err}",
                removed.dir.display()
            );
        }
    }

    /// What one batch of events amounts to, deduplicated while reading.
    #[derive(Default)]
    struct Batch {
        /// Events were lost: call everyone.
        overflow: bool,
        /// Names that changed, per watch descriptor.
        names: HashMap<i32, HashSet<OsString>>,
        /// Watches whose directory was deleted, moved or unmounted.
        dirs_gone: HashSet<i32>,
    }

    enum Ready {
        Events,
        Stop,
    }

    fn run(shared: &Shared, mut inotify: Inotify, wake: &PipeReader) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        let watches = inotify.watches();
        loop {
            match wait(&inotify, wake) {
                Ok(Ready::Events) => {}
                Ok(Ready::Stop) => return,
                Err(err) => {
                    log::error!("waiting for inotify events: {err}");
                    thread::sleep(ERROR_BACKOFF);
                }
            }
            if shared.stopping() {
                return;
            }
            let batch = read_batch(&mut inotify, &mut buffer);
            dispatch(shared, &batch);
            for id in shared.take_deferred_unwatch() {
                let mut registry = shared.registry();
                if let Some(reg) = registry.regs.remove(&id) {
                    release(&registry, &watches, &reg);
                }
            }
        }
    }

    /// Sleeps until inotify has events or the wake pipe is closed (the Watcher was dropped).
    fn wait(inotify: &Inotify, wake: &PipeReader) -> io::Result<Ready> {
        let mut fds = [
            libc::pollfd {
                fd: inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfd structures for
            // the whole call, and both descriptors belong to objects borrowed for this call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            // Nobody writes to the pipe: any readiness is its writer closing.
            if fds[1].revents != 0 {
                return Ok(Ready::Stop);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(Ready::Events);
            }
            if fds[0].revents != 0 {
                return Err(io::Error::other(format!(
                    "poll reported {:#x} on the inotify descriptor",
                    fds[0].revents
                )));
            }
        }
    }

    /// Reads everything queued (up to a limit) into one deduplicated batch.
    fn read_batch(inotify: &mut Inotify, buffer: &mut [u8]) -> Batch {
        let mut batch = Batch::default();
        for _ in 0..MAX_READS_PER_BATCH {
            let events = match inotify.read_events(buffer) {
                Ok(events) => events,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::error!("reading inotify events: {err}");
                    thread::sleep(ERROR_BACKOFF);
                    break;
                }
            };
            for event in events {
                let wd = event.wd.get_watch_descriptor_id();
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    batch.overflow = true;
                } else if let Some(name) = event.name {
                    // Allocates only for names not yet in the batch.
                    let names = batch.names.entry(wd).or_default();
                    if !names.contains(name) {
                        names.insert(name.to_os_string());
                    }
                } else if event.mask.intersects(
                    EventMask::DELETE_SELF
                        | EventMask::MOVE_SELF
                        | EventMask::IGNORED
                        | EventMask::UNMOUNT,
                ) {
                    batch.dirs_gone.insert(wd);
                }
            }
        }
        batch
    }

    /// Calls, once each, the callbacks of the registrations the batch concerns.
    fn dispatch(shared: &Shared, batch: &Batch) {
        let registry = shared.registry();
        if batch.overflow {
            log::warn!("the inotify queue overflowed; notifying every watched database");
        }
        let mut hit: HashSet<WatchId> = HashSet::new();
        for (id, reg) in &registry.regs {
            let Some(wd) = &reg.wd else { continue };
            let wd = wd.get_watch_descriptor_id();
            let named = batch
                .names
                .get(&wd)
                .is_some_and(|names| names.contains(&reg.db_name) || names.contains(&reg.wal_name));
            let gone = batch.dirs_gone.contains(&wd);
            if gone {
                // IGNORED for a watch we removed ourselves matches no registration.
                log::warn!(
                    "directory {} is no longer watched (deleted, moved or unmounted)",
                    reg.dir.display()
                );
            }
            if batch.overflow || named || gone {
                hit.insert(*id);
            }
        }
        registry.notify(&hit);
    }
}

#[cfg(any(
    target_os = "macos",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
))]
mod kqueue_backend {
    //! The thread owns the kqueue and every descriptor in it. It re-reads the registrations
    //! (opening and closing descriptors to match) when woken through the pipe, when a watched
    //! directory changes, and every poll interval; and it compares `stat` results to decide
    //! whom to notify.

    use std::collections::{HashMap, HashSet};
    use std::io::{self, PipeReader, PipeWriter, Read};
    use std::os::fd::AsRawFd;
    use std::path::Path;
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use kqueue::{EventData, EventFilter, FilterFlag, Ident, Vnode};

    use super::{Registry, Seen, Shared, Stamp, WatchId, ERROR_BACKOFF};

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

    pub(super) fn start(
        shared: &Arc<Shared>,
        interval: Duration,
    ) -> io::Result<(PipeWriter, JoinHandle<()>)> {
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
        Ok((wake_tx, thread))
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
            let mut hit: HashSet<WatchId> = HashSet::new();
            for (id, reg) in registry.regs.iter_mut() {
                let wal_event = batch.wals.contains(&key(&reg.wal_path()));
                if !(batch.full || wal_event || batch.dirs.contains(&key(&reg.dir))) {
                    continue;
                }
                let now: Seen = reg.stat();
                if wal_event || now != reg.seen {
                    reg.seen = now;
                    hit.insert(*id);
                }
            }
            registry.notify(&hit);
            drop(registry);
            let deferred = shared.take_deferred_unwatch();
            if !deferred.is_empty() {
                let mut registry = shared.registry();
                for id in deferred {
                    registry.regs.remove(&id);
                }
                self.reconcile(&registry);
            }
        }

        /// Opens descriptors for every registered directory and existing WAL, replaces those
        /// whose WAL was replaced, and closes those no longer needed.
        fn reconcile(&mut self, registry: &Registry) {
            let mut want_dirs = HashSet::new();
            let mut want_wals: HashMap<String, Option<(u64, u64)>> = HashMap::new();
            for reg in registry.regs.values() {
                want_dirs.insert(key(&reg.dir));
                let wal = reg.wal_path();
                let identity = Stamp::of(&wal).map(|s| (s.dev, s.ino));
                want_wals.insert(key(&wal), identity);
            }

            let stale_dirs: Vec<String> = self.dirs.difference(&want_dirs).cloned().collect();
            for dir in stale_dirs {
                self.dirs.remove(&dir);
                if let Err(err) = self.kq.remove_filename(&dir, EventFilter::EVFILT_VNODE) {
                    log::debug!("kqueue: no longer watching {dir}: {err}");
                }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};
    use std::io::Write;
    use std::sync::mpsc::{Receiver, RecvTimeoutError};
    use std::time::Instant;

    const POLL: Duration = Duration::from_millis(50);
    /// How long to wait for a notification that should come.
    const EXPECT: Duration = Duration::from_secs(5);
    /// How long to wait to be confident a notification will not come: several poll
    /// intervals, and far longer than inotify needs.
    const QUIET: Duration = Duration::from_millis(400);

    fn start(mode: WatchMode) -> Watcher {
        let watcher = Watcher::start(mode, POLL).unwrap();
        match mode {
            WatchMode::Poll => assert_eq!(watcher.backend(), "poll"),
            WatchMode::Auto => {
                if cfg!(target_os = "linux") {
                    assert_eq!(watcher.backend(), "inotify");
                }
            }
        }
        watcher
    }

    /// A callback that sends on a channel, and the receiving end.
    fn channel() -> (Box<dyn Fn() + Send>, Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move || {
                let _ = tx.send(());
            }),
            rx,
        )
    }

    fn watch(watcher: &Watcher, db: &Path) -> (WatchId, Receiver<()>) {
        let (notify, rx) = channel();
        let id = watcher.watch(db, notify).unwrap();
        (id, rx)
    }

    #[track_caller]
    fn expect_notified(rx: &Receiver<()>, what: &str) {
        if let Err(err) = rx.recv_timeout(EXPECT) {
            panic!("no notification within {EXPECT:?} after {what}: {err:?}");
        }
        // Let the rest of the same change arrive, so the next step starts from quiet.
        settle(rx);
    }

    #[track_caller]
    fn expect_quiet(rx: &Receiver<()>, what: &str) {
        match rx.recv_timeout(QUIET) {
            // Disconnected: the callback (holding the sender) was dropped by unwatch, so it
            // cannot be called any more either.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            other => panic!("unexpected notification after {what}: {other:?}"),
        }
    }

    /// Waits until no notification has arrived for a while.
    fn settle(rx: &Receiver<()>) {
        while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    fn wal_of(db: &Path) -> PathBuf {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        PathBuf::from(wal)
    }

    /// A directory with `app.db` (and optionally `app.db-wal`) in it.
    fn setup(with_wal: bool) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        fs::write(&db, vec![0u8; 4096]).unwrap();
        if with_wal {
            fs::write(wal_of(&db), vec![0u8; 4096]).unwrap();
        }
        (dir, db)
    }

    fn wal_created(mode: WatchMode) {
        let (_dir, db) = setup(false);
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        expect_quiet(&rx, "watching");
        fs::write(wal_of(&db), b"frames").unwrap();
        expect_notified(&rx, "creating the WAL");
    }

    fn wal_appended(mode: WatchMode) {
        let (_dir, db) = setup(true);
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        expect_quiet(&rx, "watching");
        append(&wal_of(&db), b"more frames");
        expect_notified(&rx, "appending to the WAL");
        append(&wal_of(&db), b"and more");
        expect_notified(&rx, "appending to the WAL again");
    }

    fn wal_truncated(mode: WatchMode) {
        let (_dir, db) = setup(true);
        let wal = OpenOptions::new().write(true).open(wal_of(&db)).unwrap();
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        expect_quiet(&rx, "watching");
        wal.set_len(0).unwrap();
        expect_notified(&rx, "truncating the WAL");
    }

    fn wal_deleted(mode: WatchMode) {
        let (_dir, db) = setup(true);
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        expect_quiet(&rx, "watching");
        fs::remove_file(wal_of(&db)).unwrap();
        expect_notified(&rx, "deleting the WAL");
    }

    fn db_replaced_by_rename(mode: WatchMode) {
        let (dir, db) = setup(true);
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        // Same size as the old database, so only the identity of the file changes.
        let tmp = dir.path().join("app.db.tmp");
        fs::write(&tmp, vec![1u8; 4096]).unwrap();
        expect_quiet(&rx, "writing a temporary file beside the database");
        fs::rename(&tmp, &db).unwrap();
        expect_notified(&rx, "renaming a new database into place");
    }

    fn unrelated_files_ignored(mode: WatchMode) {
        let (dir, db) = setup(true);
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        append(&dir.path().join("other.db"), b"x");
        append(&dir.path().join("other.db-wal"), b"x");
        append(&dir.path().join("app.db-shm"), b"x");
        append(&dir.path().join("app.db-journal"), b"x");
        let sidecar = dir.path().join(".app.db-walsync");
        fs::create_dir(&sidecar).unwrap();
        append(&sidecar.join("state.json"), b"{}");
        fs::rename(sidecar.join("state.json"), sidecar.join("state2.json")).unwrap();
        fs::remove_file(dir.path().join("app.db-journal")).unwrap();
        expect_quiet(&rx, "writing unrelated files in the same directory");
        // And the watch is alive, so the quiet above meant something.
        append(&wal_of(&db), b"frames");
        expect_notified(&rx, "appending to the WAL");
    }

    fn two_databases_in_one_directory(mode: WatchMode) {
        let (dir, a) = setup(false);
        let b = dir.path().join("b.db");
        fs::write(&b, b"").unwrap();
        let watcher = start(mode);
        let (_ida, rxa) = watch(&watcher, &a);
        let (_idb, rxb) = watch(&watcher, &b);
        append(&wal_of(&a), b"a");
        expect_notified(&rxa, "writing a's WAL");
        expect_quiet(&rxb, "writing a's WAL");
        append(&wal_of(&b), b"b");
        expect_notified(&rxb, "writing b's WAL");
        expect_quiet(&rxa, "writing b's WAL");
        append(&b, b"b");
        expect_notified(&rxb, "writing b");
        expect_quiet(&rxa, "writing b");
    }

    fn unwatch_stops_notifications(mode: WatchMode) {
        let (_dir, db) = setup(true);
        let watcher = start(mode);
        let (first, rx1) = watch(&watcher, &db);
        // A second registration of the same database shares the directory watch.
        let (second, rx2) = watch(&watcher, &db);
        append(&wal_of(&db), b"1");
        expect_notified(&rx1, "appending (both watching)");
        expect_notified(&rx2, "appending (both watching)");

        watcher.unwatch(first);
        expect_quiet(&rx2, "unwatching the other registration");
        append(&wal_of(&db), b"2");
        expect_notified(&rx2, "appending after unwatching the other registration");
        expect_quiet(&rx1, "appending after unwatch");

        watcher.unwatch(second);
        watcher.unwatch(second); // Unknown ids are ignored.
        append(&wal_of(&db), b"3");
        expect_quiet(&rx2, "appending after unwatch");

        // Watching again after the directory watch was removed works.
        let (_third, rx3) = watch(&watcher, &db);
        append(&wal_of(&db), b"4");
        expect_notified(&rx3, "appending after watching again");
    }

    fn sqlite_commit(mode: WatchMode) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let journal: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        let watcher = start(mode);
        let (_id, rx) = watch(&watcher, &db);
        expect_quiet(&rx, "watching");
        conn.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        expect_notified(&rx, "an SQLite commit");
    }

    fn drop_is_prompt(mode: WatchMode) {
        // An interval far longer than the test tolerates: dropping must not wait for it.
        let watcher = Watcher::start(mode, Duration::from_secs(30)).unwrap();
        let (_dir, db) = setup(true);
        let (_id, _rx) = watch(&watcher, &db);
        // Dropped on another thread, so a drop that hangs fails the test instead of hanging it.
        let (done_tx, done_rx) = mpsc::channel();
        let started = Instant::now();
        thread::spawn(move || {
            drop(watcher);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(2)).is_ok(),
            "dropping the watcher took more than 2 s"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// A callback may unwatch (even itself) without deadlocking the watcher thread.
    fn unwatch_from_callback(mode: WatchMode) {
        let (_dir, db) = setup(true);
        let watcher = Arc::new(start(mode));
        let own_id: Arc<Mutex<Option<WatchId>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(&watcher);
        let id_slot = Arc::clone(&own_id);
        let id = watcher
            .watch(
                &db,
                Box::new(move || {
                    let id = *id_slot.lock().unwrap();
                    if let (Some(watcher), Some(id)) = (weak.upgrade(), id) {
                        watcher.unwatch(id);
                    }
                    // Sent only once unwatch returned: a deadlock means no message.
                    let _ = tx.send(());
                }),
            )
            .unwrap();
        *own_id.lock().unwrap() = Some(id);
        append(&wal_of(&db), b"1");
        expect_notified(&rx, "the first append");
        append(&wal_of(&db), b"2");
        expect_quiet(&rx, "an append after the callback unwatched itself");
        // The watcher thread is still alive for others.
        let (_id2, rx2) = watch(&watcher, &db);
        append(&wal_of(&db), b"3");
        expect_notified(&rx2, "an append for another registration");
    }

    macro_rules! for_both_modes {
        ($($scenario:ident),* $(,)?) => {$(
            mod $scenario {
                use super::*;

                #[test]
                fn auto() {
                    super::$scenario(WatchMode::Auto);
                }

                #[test]
                fn poll() {
                    super::$scenario(WatchMode::Poll);
                }
            }
        )*};
    }

    for_both_modes!(
        wal_created,
        wal_appended,
        wal_truncated,
        wal_deleted,
        db_replaced_by_rename,
        unrelated_files_ignored,
        two_databases_in_one_directory,
        unwatch_stops_notifications,
        sqlite_commit,
        drop_is_prompt,
        unwatch_from_callback,
    );

    /// A burst of writes produces one callback per batch, not one per kernel event. The first
    /// callback blocks until the burst is written, so the whole burst is queued in the kernel
    /// and read as one batch. The writes alternate between the WAL and the database so the
    /// kernel cannot merge them (it merges only identical consecutive events): without
    /// coalescing this would be about 1000 callbacks.
    #[cfg(target_os = "linux")]
    #[test]
    fn inotify_coalesces_bursts() {
        use std::sync::atomic::AtomicUsize;

        let (_dir, db) = setup(true);
        let watcher = start(WatchMode::Auto);
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let counter = Arc::clone(&calls);
        let _id = watcher
            .watch(
                &db,
                Box::new(move || {
                    if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                        let _ = entered_tx.send(());
                        let _ = release_rx.recv_timeout(Duration::from_secs(10));
                    }
                    let _ = done_tx.send(());
                }),
            )
            .unwrap();
        let mut wal = OpenOptions::new().append(true).open(wal_of(&db)).unwrap();
        let mut dbf = OpenOptions::new().append(true).open(&db).unwrap();
        wal.write_all(b"w").unwrap();
        entered_rx
            .recv_timeout(EXPECT)
            .expect("first callback not called");
        for i in 0..1000 {
            let f = if i % 2 == 0 { &mut wal } else { &mut dbf };
            f.write_all(b"x").unwrap();
        }
        release_tx.send(()).unwrap();
        expect_notified(&done_rx, "the burst");
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            (2..=10).contains(&calls),
            "1000 writes produced {calls} callbacks (expected the first plus about one)"
        );
    }

    #[test]
    fn watch_errors_name_the_path() {
        let watcher = start(WatchMode::Auto);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("app.db");
        let (notify, _rx) = channel();
        let err = watcher.watch(&missing, notify).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");

        let (notify, _rx) = channel();
        let err = watcher.watch(dir.path(), notify).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid, "{err}");

        assert!(Watcher::start(WatchMode::Poll, Duration::ZERO).is_err());
    }

    /// The watched directory is canonical (so it does not depend on the current directory or
    /// on symlinks in the path), and a database not created yet is looked for in it.
    #[test]
    fn resolve_canonicalizes_directory_and_follows_db_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(real_dir.join("sub")).unwrap();
        let (d, n) = resolve(&dir.path().join("sub/../app.db")).unwrap();
        assert_eq!((d, n), (real_dir.clone(), OsString::from("app.db")));

        // An existing database reached through a symlink lives (with its WAL) at the target.
        let target_dir = real_dir.join("data");
        fs::create_dir(&target_dir).unwrap();
        fs::write(target_dir.join("real.db"), b"").unwrap();
        std::os::unix::fs::symlink(target_dir.join("real.db"), real_dir.join("link.db")).unwrap();
        let (d, n) = resolve(&real_dir.join("link.db")).unwrap();
        assert_eq!((d, n), (target_dir, OsString::from("real.db")));
    }
}
