//! The inotify backend (Linux).
//!
//! One inotify instance with one watch per distinct directory, added by `watch` itself from
//! the calling thread (the kernel makes that safe), so the watch is in place before `watch`
//! returns. The thread sleeps in poll(2) on the instance and on a wake pipe, reads what is
//! queued as one batch, matches events to registrations by file name, and calls each
//! affected registration once. Names other than `<db>` and `<db>-wal` (`-shm`, `-journal`,
//! the `.<db>-walsync` sidecar, unrelated files) are ignored, except by directory
//! registrations, which are told every name the batch holds for their directory.
//!
//! A watch is removed from the kernel when the last registration using it is removed.
//!
//! Release: the instance's descriptor is shared by the thread and the `Handle`; when both
//! are gone (the `Watcher` is dropped and has joined the thread) it closes, and the kernel
//! removes every watch with it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, PipeReader, PipeWriter};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use super::{Backend, Registration, Shared, BATCH_GAP, ERROR_BACKOFF};
use crate::error::{Context, Result};

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
///
/// ATTRIB (mode, owner, times, links) is watched for directory registrations only: a file
/// skipped as unreadable can become readable. It never wakes a database: SQLite running as
/// root `fchown`s the WAL each time a connection opens it, so every connection opened (an
/// application's per request, walsync's own when a database rests) fired one, and a
/// resting database then woke to read nothing, or, waiting for its turn at the descriptor
/// budget, showed lag with no commit waiting.
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

/// What the `Watcher` keeps: the means to add watches, and the wake pipe's write end.
struct Handle {
    watches: Watches,
    /// Never written to: dropping it (with the `Watcher`) closes the pipe, which wakes the
    /// thread to stop.
    _wake: PipeWriter,
}

pub(super) fn start(
    shared: &Arc<Shared>,
    _poll_interval: Duration,
) -> io::Result<(Box<dyn Backend>, JoinHandle<()>)> {
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
    let handle = Handle {
        watches,
        _wake: wake_tx,
    };
    Ok((Box::new(handle), thread))
}

impl Backend for Handle {
    /// Watches the registration's directory. inotify keeps one watch per inode: for a
    /// directory already watched this returns the same descriptor, which is how databases
    /// sharing a directory share it.
    fn add(&self, reg: &mut Registration) -> Result<()> {
        reg.wd = Some(add_watch(&self.watches, &reg.dir)?);
        Ok(())
    }

    /// inotify names what changed: it never compares the files between looks.
    fn compares_files(&self) -> bool {
        false
    }

    /// Removes the directory's watch once no registration shares it. The kernel may have
    /// removed it already (the directory was deleted): that error means nothing.
    fn removed(&self, reg: &Registration, rest: &[Registration]) {
        let Some(wd) = &reg.wd else { return };
        if rest.iter().any(|r| r.wd.as_ref() == Some(wd)) {
            return;
        }
        let mut watches = self.watches.clone();
        if let Err(err) = watches.remove(wd.clone()) {
            log::debug!("removing the inotify watch of {}: {err}", reg.dir.display());
        }
    }
}

fn add_watch(watches: &Watches, dir: &Path) -> Result<WatchDescriptor> {
    let hint = |err: &io::Error| match err.raw_os_error() {
        Some(libc::ENOSPC) => " (raise fs.inotify.max_user_watches, or use polling)",
        _ => "",
    };
    let mut watches = watches.clone();
    match watches.add(dir, mask()) {
        Ok(wd) => Ok(wd),
        Err(err) => {
            let hint = hint(&err);
            Err(err).context(|| format!("watching directory {} with inotify{hint}", dir.display()))
        }
    }
}

/// What one batch of events amounts to, deduplicated while reading.
#[derive(Default)]
struct Batch {
    /// Events were lost: call everyone.
    overflow: bool,
    /// Names that changed, per watch descriptor.
    names: HashMap<i32, HashSet<OsString>>,
    /// Of those, the names whose only events were ATTRIB: what changed is their metadata,
    /// never their content (see [`mask`]).
    attributes_only: HashMap<i32, HashSet<OsString>>,
    /// Watches whose directory was deleted, moved or unmounted.
    dirs_gone: HashSet<i32>,
}

enum Ready {
    Events,
    Stop,
}

fn run(shared: &Shared, mut inotify: Inotify, wake: &PipeReader) {
    let mut buffer = vec![0u8; EVENT_BUFFER];
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
        thread::sleep(BATCH_GAP);
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
                let new = !names.contains(name);
                if new {
                    names.insert(name.to_os_string());
                }
                let attributes = (event.mask - EventMask::ISDIR) == EventMask::ATTRIB;
                if new && attributes {
                    batch
                        .attributes_only
                        .entry(wd)
                        .or_default()
                        .insert(name.to_os_string());
                } else if !attributes {
                    if let Some(only) = batch.attributes_only.get_mut(&wd) {
                        only.remove(name);
                    }
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
    // The directories the batch names, when they are few (as they are unless many
    // databases are written at once): each registration is looked for among them before
    // any hash is computed. A batch is matched against every registration (two a database
    // found in a directory tree), and two hash lookups each, for a write to one database,
    // showed in a profile of a restart of 4,000 (the watcher thread's hashing).
    let few: Option<Vec<i32>> = (!batch.overflow && batch.names.len() + batch.dirs_gone.len() <= 16)
        .then(|| batch.names.keys().chain(&batch.dirs_gone).copied().collect());
    for reg in registry.iter() {
        let Some(wd) = &reg.wd else { continue };
        let wd = wd.get_watch_descriptor_id();
        if few.as_ref().is_some_and(|few| !few.contains(&wd)) {
            continue;
        }
        let gone = batch.dirs_gone.contains(&wd);
        if reg.is_dir() {
            if batch.overflow || gone {
                reg.call_dir(None);
            } else if let Some(names) = batch.names.get(&wd) {
                reg.call_dir(Some(names));
            }
            continue;
        }
        let only_attributes = batch.attributes_only.get(&wd);
        let changed = |name: &OsString| {
            batch.names.get(&wd).is_some_and(|names| names.contains(name))
                && !only_attributes.is_some_and(|only| only.contains(name))
        };
        let named = changed(&reg.db_name) || changed(&reg.wal_name);
        if gone {
            log::warn!(
                "directory {} is no longer watched (deleted, moved or unmounted)",
                reg.dir.display()
            );
        }
        if batch.overflow || named || gone {
            reg.call();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::super::tests::{
        channel, expect_notified, expect_quiet, setup, start, wal_of, EXPECT,
    };
    use super::super::WatchMode;

    /// A change of mode, owner or times (ATTRIB: SQLite running as root `fchown`s the WAL at
    /// every connection's open) does not wake the database, though its directory hears the
    /// name; a write does, also when the same batch holds an ATTRIB of the file first.
    #[test]
    fn metadata_changes_do_not_wake_a_database() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, db) = setup(true);
        let watcher = start(WatchMode::Auto);
        let (notify, rx) = channel();
        watcher.watch(&db, notify).unwrap();
        let (names_tx, names_rx) = mpsc::channel();
        watcher
            .watch_dir(
                dir.path(),
                Box::new(move |names| {
                    let _ = names_tx.send(names.map(|n| n.iter().cloned().collect::<Vec<_>>()));
                }),
            )
            .unwrap();
        expect_quiet(&rx, "watching");
        let chmod = |path: &std::path::Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        chmod(&wal_of(&db), 0o600);
        chmod(&db, 0o600);
        let names = names_rx.recv_timeout(EXPECT).expect("no directory callback");
        assert!(
            names.is_some_and(|n| n.contains(&wal_of(&db).file_name().unwrap().to_owned())),
            "the directory hears the WAL's name"
        );
        expect_quiet(&rx, "changing the mode of the database and its WAL");

        chmod(&wal_of(&db), 0o644);
        let mut wal = OpenOptions::new().append(true).open(wal_of(&db)).unwrap();
        wal.write_all(b"frame").unwrap();
        expect_notified(&rx, "a write after a change of mode");
    }

    /// A burst of writes produces one callback per batch, not one per kernel event. The first
    /// callback blocks until the burst is written, so the whole burst is queued in the kernel
    /// and read as one batch. The writes alternate between the WAL and the database so the
    /// kernel cannot merge them (it merges only identical consecutive events): without
    /// coalescing this would be about 1000 callbacks.
    #[test]
    fn inotify_coalesces_bursts() {
        let (_dir, db) = setup(true);
        let watcher = start(WatchMode::Auto);
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let counter = Arc::clone(&calls);
        watcher
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
}
