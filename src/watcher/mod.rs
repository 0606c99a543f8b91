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
//! registration's callback is called at most once per batch of events read together, and
//! batches are at least [`BATCH_GAP`] apart.
//!
//! Notifications only make the common case fast; they are not the source of truth. inotify's
//! queue can overflow (every callback is then called, but the kernel has already dropped the
//! details), network and FUSE filesystems may deliver no events for writes made by other
//! machines or containers, and kqueue cannot see in-place writes to the database file. So the
//! replication loop still re-checks each database on a slow timer.
//!
//! The same thread also watches whole directories for [`crate::directory`] (`watch --dir`):
//! [`Watcher::watch_dir`] registers a callback that hears which names in a directory came,
//! went or changed (inotify), or only that something did (kqueue). Registrations can be
//! removed ([`Watcher::unwatch`]) when a database leaves, so a host whose databases come
//! and go does not accumulate watches.
//!
//! One backend per file, chosen by operating system in `kernel_backends!` below and nowhere
//! else: `inotify` (Linux), `kqueue` (macOS, BSD), and `poll` (`stat` every poll interval),
//! used everywhere for [`WatchMode::Poll`] and wherever the kernel facility is missing or
//! cannot be set up.
//!
//! Why not the `notify` crate, which is laid out the same way:
//!
//! - Footprint: notify pulls in crates and threads of its own for what walsync does not use
//!   (recursive watches, per-path event kinds, debouncing); this is one thread over the
//!   `inotify` or `kqueue` bindings.
//! - POSIX locks: the kqueue backends of general-purpose watchers, notify's included, hold a
//!   descriptor on each watched file (for a watched directory, on each file in it), and
//!   closing *any* descriptor of a file drops every POSIX lock this process holds on it
//!   (<https://www.sqlite.org/howtocorrupt.html>, 2.2): the locks of walsync's own SQLite
//!   connections would silently go. This watcher never opens the database file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::files::FileIdentity;

/// The one place operating systems are named. Declares each kernel backend's module on the
/// systems listed with it, and `KERNEL`: this system's backend as its name (the module's, as
/// [`Watcher::backend`] reports it) and `start`, or `None` where walsync has none, so
/// [`WatchMode::Auto`] polls. Keep the lists in step with the target dependencies in
/// `Cargo.toml`.
macro_rules! kernel_backends {
    ($($module:ident on $($os:literal)|+;)+) => {
        $(
            #[cfg(any($(target_os = $os),+))]
            mod $module;
            #[cfg(any($(target_os = $os),+))]
            const KERNEL: Option<(&str, Start)> = Some((stringify!($module), $module::start));
        )+
        #[cfg(not(any($($(target_os = $os),+),+)))]
        const KERNEL: Option<(&str, Start)> = None;
    };
}

kernel_backends! {
    inotify on "linux";
    kqueue on "macos" | "freebsd" | "netbsd" | "openbsd" | "dragonfly";
}
mod poll;

/// Starts a backend's thread, given the poll interval; returns what the `Watcher` keeps of
/// the backend, and the thread.
type Start = fn(&Arc<Shared>, Duration) -> io::Result<(Box<dyn Backend>, JoinHandle<()>)>;

/// What the `Watcher` keeps of a backend; the backend's thread does the watching. Dropping
/// it closes the backend's wake pipe or channel, which ends the thread's wait at once.
trait Backend: Send + Sync {
    /// Called by `watch` with the registry locked, before `reg` joins it: sets up what the
    /// kernel needs for it. An error is `watch`'s error.
    fn add(&self, _reg: &mut Registration) -> Result<()> {
        Ok(())
    }

    /// Called by `watch` once `reg` is registered and the lock released.
    fn added(&self) {}

    /// Called by `unwatch` with the registry locked, after `reg` left it (`rest` are the
    /// registrations that remain): releases what the kernel kept for it alone.
    fn removed(&self, _reg: &Registration, _rest: &[Registration]) {}

    /// Whether the backend compares what a database's files look like between looks
    /// ([`Registration::note_seen`]); if not, registrations keep nothing of it.
    fn compares_files(&self) -> bool {
        true
    }
}

/// How long a backend thread waits after an unexpected error before trying again, so a
/// persistent failure is logged a few times a second instead of spinning a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// How long a backend thread rests after each batch of callbacks before it reads events
/// again. A busy WAL is written thousands of times a second, one kernel event per write;
/// reading them as they come woke this thread about 12,000 times a second under a heavy
/// writer (100 MiB in 2.3 s: 27,000 wake-ups, 0.17 s of CPU, and as many wake-ups of the
/// database thread it calls), though a database thread needs one "go and look" per look it
/// takes, and under steady writes it takes at most one per `--min-interval`. Meanwhile the
/// kernel queues and merges what comes. The first change after a quiet spell is still seen
/// at once: only changes within this time of the previous batch wait, at most this long.
const BATCH_GAP: Duration = Duration::from_millis(5);

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
/// A registration lasts until [`Watcher::unwatch`] or the `Watcher`'s drop. Callbacks run on
/// the watcher thread while it holds its registration lock, so a callback must be cheap and
/// must not block (an mpsc send is ideal), and it cannot call [`Watcher::watch`] or drop
/// the `Watcher`.
pub struct Watcher {
    shared: Arc<Shared>,
    /// "inotify", "kqueue" or "poll".
    name: &'static str,
    /// `None` only once `Drop` has taken it to wake the thread.
    backend: Option<Box<dyn Backend>>,
    thread: Option<JoinHandle<()>>,
}

/// What a registration is, to remove it with [`Watcher::unwatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchId(u64);

/// What a directory callback is told: the names in the directory that were created,
/// deleted, renamed, written or changed attributes, or `None` when the backend cannot say
/// (kqueue, a lost inotify queue, the directory itself gone): then look at all of it.
pub type DirCallback = Box<dyn Fn(Option<&HashSet<OsString>>) + Send>;

/// State shared between the `Watcher` handle and its thread.
#[derive(Default)]
struct Shared {
    registry: Mutex<Vec<Registration>>,
    next_id: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// The registrations. A panicking callback is caught before it can poison the lock, but
    /// even a poisoned registry is still consistent (every change is a single push or
    /// remove), so keep using it rather than stopping all notifications.
    fn registry(&self) -> MutexGuard<'_, Vec<Registration>> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// One database (or, with `on_dir`, one directory) being watched.
struct Registration {
    id: WatchId,
    /// Canonical directory holding the database (symlinks resolved, as SQLite does, so the
    /// WAL is looked for where SQLite will put it).
    dir: PathBuf,
    db_name: OsString,
    wal_name: OsString,
    notify: Box<dyn Fn() + Send>,
    /// Set for a directory registration ([`Watcher::watch_dir`]): it is told about any name
    /// in `dir`, and has no database of its own (`db_name` and `wal_name` are empty, which
    /// no event names).
    on_dir: Option<DirCallback>,
    /// What the files looked like at the last check (poll and kqueue backends, for a
    /// database): boxed, and `None` where nothing compares it (a directory, inotify), where
    /// it would be 128 bytes of every registration for nothing (two a database found by a
    /// recursive directory watch: its own and its directory's).
    seen: Option<Box<Seen>>,
    /// The directory's inotify watch, shared with every registration in the same directory
    /// (set by the inotify backend; `::inotify` is the crate, not that module).
    #[cfg(target_os = "linux")]
    wd: Option<::inotify::WatchDescriptor>,
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
            db: FileIdentity::probe(&self.db_path()),
            wal: FileIdentity::probe(&self.wal_path()),
        }
    }

    /// Record `now` as what the files look like; whether that differs from the last look
    /// (always, if there was none).
    fn note_seen(&mut self, now: Seen) -> bool {
        match &mut self.seen {
            Some(seen) if **seen == now => false,
            Some(seen) => {
                **seen = now;
                true
            }
            None => {
                self.seen = Some(Box::new(now));
                true
            }
        }
    }

    fn is_dir(&self) -> bool {
        self.on_dir.is_some()
    }

    /// What is watched, for log lines: the directory, or the database.
    fn what(&self) -> PathBuf {
        if self.is_dir() {
            self.dir.clone()
        } else {
            self.db_path()
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

    /// Calls a directory registration's callback with the names that changed (`None`: any).
    fn call_dir(&self, names: Option<&HashSet<OsString>>) {
        let Some(on_dir) = &self.on_dir else { return };
        if catch_unwind(AssertUnwindSafe(|| on_dir(names))).is_err() {
            log::error!(
                "the change callback for directory {} panicked",
                self.dir.display()
            );
        }
    }
}

/// The database and WAL as last seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    db: Option<FileIdentity>,
    wal: Option<FileIdentity>,
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
        if let (WatchMode::Auto, Some((name, start))) = (mode, KERNEL) {
            match start(&shared, poll_interval) {
                Ok((backend, thread)) => return Ok(Watcher::new(shared, name, backend, thread)),
                Err(err) => log::warn!(
                    "cannot use {name} ({err}); watching databases by polling every {poll_interval:?}"
                ),
            }
        }
        let (backend, thread) =
            poll::start(&shared, poll_interval).context(|| "starting the file watcher thread")?;
        Ok(Watcher::new(shared, "poll", backend, thread))
    }

    fn new(
        shared: Arc<Shared>,
        name: &'static str,
        backend: Box<dyn Backend>,
        thread: JoinHandle<()>,
    ) -> Watcher {
        Watcher {
            shared,
            name,
            backend: Some(backend),
            thread: Some(thread),
        }
    }

    /// Call `notify` whenever `db_path`'s WAL or database file changes. Watches the parent
    /// directory so creation, deletion and rename-into-place of either file are seen. The
    /// database need not exist yet, its directory must.
    ///
    /// `notify` must be cheap and non-blocking (it will typically be an mpsc send). Changes
    /// made after `watch` returns are reported; with polling, relative to the state `watch`
    /// saw.
    pub fn watch(&self, db_path: &Path, notify: Box<dyn Fn() + Send>) -> Result<WatchId> {
        self.refuse_on_watcher_thread(db_path)?;
        let (dir, db_name) = resolve(db_path)?;
        let mut wal_name = db_name.clone();
        wal_name.push("-wal");
        let mut reg = Registration {
            id: self.next_id(),
            dir,
            db_name,
            wal_name,
            notify,
            on_dir: None,
            seen: None,
            #[cfg(target_os = "linux")]
            wd: None,
        };
        if self.backend.as_deref().is_some_and(|b| b.compares_files()) {
            reg.seen = Some(Box::new(reg.stat()));
        }
        self.register(reg)
    }

    /// Call `on_dir` whenever a name in directory `dir` is created, deleted, renamed into or
    /// out of it, written, or changes attributes, with the names when the backend knows them
    /// (inotify). The polling backend never calls it: whoever polls scans the directory
    /// itself (see [`crate::directory`]). The directory must exist.
    pub fn watch_dir(&self, dir: &Path, on_dir: DirCallback) -> Result<WatchId> {
        self.refuse_on_watcher_thread(dir)?;
        let dir = std::fs::canonicalize(dir)
            .context(|| format!("watching directory {}", dir.display()))?;
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "watching {}: not a directory",
                dir.display()
            )));
        }
        let reg = Registration {
            id: self.next_id(),
            dir,
            db_name: OsString::new(),
            wal_name: OsString::new(),
            notify: Box::new(|| {}),
            on_dir: Some(on_dir),
            seen: None,
            #[cfg(target_os = "linux")]
            wd: None,
        };
        self.register(reg)
    }

    /// Remove a registration: its callback is not called again once this returns, and
    /// what the kernel kept for it alone (an inotify watch, a kqueue descriptor) goes.
    /// Unknown ids are ignored (removed already).
    pub fn unwatch(&self, id: WatchId) {
        let mut registry = self.shared.registry();
        let Some(at) = registry.iter().position(|r| r.id == id) else {
            return;
        };
        let reg = registry.remove(at);
        if let Some(backend) = self.backend.as_deref() {
            backend.removed(&reg, &registry);
        }
        drop(registry);
        log::debug!(
            "no longer watching {} ({})",
            reg.what().display(),
            self.name
        );
        // The callback (and whatever it holds, such as a channel's sender) drops here,
        // outside the lock.
        drop(reg);
    }

    fn next_id(&self) -> WatchId {
        WatchId(self.shared.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn refuse_on_watcher_thread(&self, path: &Path) -> Result<()> {
        if self.on_watcher_thread() {
            return Err(Error::invalid(format!(
                "watching {}: the watcher cannot be changed from a change callback",
                path.display()
            )));
        }
        Ok(())
    }

    fn register(&self, mut reg: Registration) -> Result<WatchId> {
        let backend = self
            .backend
            .as_deref()
            .expect("only drop takes the backend");
        let id = reg.id;
        let mut registry = self.shared.registry();
        backend.add(&mut reg)?;
        log::debug!(
            "watching {} for changes ({})",
            reg.what().display(),
            self.name
        );
        registry.push(reg);
        drop(registry);
        backend.added();
        Ok(id)
    }

    /// "inotify", "kqueue" or "poll".
    pub fn backend(&self) -> &'static str {
        self.name
    }

    fn on_watcher_thread(&self) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == thread::current().id())
    }
}

impl Drop for Watcher {
    /// Stops and joins the thread. Dropping the backend closes its wake pipe (inotify,
    /// kqueue) or channel (poll), which ends the thread's wait at once, so this does not wait
    /// for a poll interval; the thread then returns, closing what it holds (the inotify
    /// instance with its watches, the kqueue with its descriptors).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.backend = None;
        if let Some(thread) = self.thread.take() {
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

#[cfg(test)]
mod tests;
