//! Watching directories for databases (`walsync watch --dir`): which files are databases
//! to replicate, under which names, and a thread per directory that adds and removes them
//! on a running [`crate::Replicator`] as they come and go.
//!
//! Hosts with one database per tenant (`/var/lib/app/<tenant>/app.db`) gain and lose
//! databases while walsync runs; naming each on the command line would mean a restart per
//! tenant. So a directory is watched instead:
//!
//! - **Matching.** A file matches when its name matches the pattern (a glob of `*`, `?`
//!   and `[...]`, default `*.db`) and is not SQLite's (`-wal`, `-shm`, `-journal`),
//!   walsync's or another tool's temporary file (a name starting with `.`, or ending in
//!   `.tmp`, which is where `walsync restore` writes before its rename). With `recursive`,
//!   subdirectories are searched too, except those whose names start with `.` (walsync's
//!   sidecars, `.git`, ...). Symbolic links to directories are not followed, so a link
//!   cannot make a loop or bring a database in twice.
//! - **Naming.** A database is replicated under its path relative to the directory,
//!   without its extension, with `/` written as `.` and a `.` inside a component doubled
//!   (`tenant-a/app.db` → `tenant-a.app`, `example.com/app.db` → `example..com.app`), so
//!   two paths never map to one name. Characters a name may not hold become `_` (the one
//!   place two files can meet: the second is refused with a warning, as is a name already
//!   replicated, say a database also named on the command line).
//! - **When.** A file is looked at when the watcher reports its name (created, written,
//!   renamed into the directory), and the whole tree again every safety interval (every
//!   poll interval when polling, the backend that reports nothing for directories). A
//!   matching file that is not a WAL database (yet) is skipped with one warning, and
//!   picked up once it becomes one; an empty file (being created) is waited for quietly.
//! - **Leaving.** A database whose file is no longer there (deleted, or moved out) is
//!   removed: its thread uploads what it staged and lets go of its files, without holding
//!   up this thread (see [`crate::Replicator::remove`]). The replica stays in storage.
//!
//! A database added here is reconciled with storage by its own thread before anything of it
//! is uploaded ([`crate::replica`]), as one opened at start while storage was down is:
//! this thread never waits for storage, so a slow or absent store delays no pick-up.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use crate::glob::Pattern;

use crate::error::{Error, Result};
use crate::watcher::{WatchId, Watcher};

/// How often, while removed databases are still leaving, to look for those that left: a
/// database waiting for one of them (the same file moved back, a new file at its path), or
/// for a place in the descriptor budget, is tried again then.
const LEAVING_CHECK: Duration = Duration::from_millis(200);

/// A directory to watch for databases.
#[derive(Clone, Debug)]
pub struct DirectorySpec {
    pub dir: PathBuf,
    pub pattern: Pattern,
    pub recursive: bool,
}

impl DirectorySpec {
    /// `dir`, with the default pattern `*.db`, not recursive.
    pub fn new(dir: impl Into<PathBuf>) -> DirectorySpec {
        DirectorySpec {
            dir: dir.into(),
            pattern: Pattern::default(),
            recursive: false,
        }
    }

    /// Match file names against `glob` instead of `*.db`.
    pub fn pattern(mut self, glob: &str) -> Result<DirectorySpec> {
        self.pattern = Pattern::new(glob)?;
        Ok(self)
    }

    /// Search subdirectories too.
    pub fn recursive(mut self, recursive: bool) -> DirectorySpec {
        self.recursive = recursive;
        self
    }
}

/// Whether a file name is never a database to replicate, whatever the pattern: hidden or
/// temporary files (walsync's sidecars and atomic writes, editors' and tools' temporary
/// files, `walsync restore`'s `OUT.tmp`) and SQLite's own files beside a database.
pub fn never_matches(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".tmp")
        || ["-wal", "-shm", "-journal"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// The replica name of the database at `relative` (a path relative to the watched
/// directory): components joined with `.`, a `.` inside a component doubled, the file's
/// extension dropped, characters a name may not hold replaced by `_` (see the module
/// docs). An error when the result is not a valid name (too long, say).
pub fn replica_name(relative: &Path) -> Result<String> {
    let components: Vec<&std::ffi::OsStr> = relative
        .components()
        .map(|c| match c {
            Component::Normal(part) => Ok(part),
            _ => Err(Error::invalid(format!(
                "{}: not a plain relative path",
                relative.display()
            ))),
        })
        .collect::<Result<_>>()?;
    let last = components
        .len()
        .checked_sub(1)
        .ok_or_else(|| Error::invalid(format!("{}: an empty relative path", relative.display())))?;
    let mut name = String::new();
    for (i, part) in components.iter().enumerate() {
        let part = if i == last {
            Path::new(part).file_stem().unwrap_or(part)
        } else {
            part
        };
        if i > 0 {
            name.push('.');
        }
        for c in part.to_string_lossy().chars() {
            match c {
                '.' => name.push_str(".."),
                c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => name.push(c),
                _ => name.push('_'),
            }
        }
    }
    crate::layout::validate_name(&name).map_err(|e| {
        Error::invalid(format!(
            "{}: no replica name can be made from its path ({e})",
            relative.display()
        ))
    })?;
    Ok(name)
}

/// What the first bytes of a matching file say.
#[derive(Debug, PartialEq, Eq)]
enum Content {
    /// An SQLite database in WAL mode.
    Wal,
    /// Nothing yet: a database being created (waited for without a warning).
    Empty,
    /// Not a WAL database, for this reason.
    Not(String),
    /// Not opened for want of descriptors, which says nothing about the file: why.
    OutOfDescriptors(String),
}

/// A matching file that could not be read. Out of descriptors is not about the file: it
/// is said so (the next scan tries again), not taken for a file that is no database.
fn unreadable(e: &std::io::Error) -> Content {
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        return Content::OutOfDescriptors(format!(
            "cannot be opened now ({e}{}); trying again at the next scan",
            crate::limits::open_files_limit()
                .map(|n| format!(", RLIMIT_NOFILE soft limit {n}"))
                .unwrap_or_default()
        ));
    }
    Content::Not(format!("cannot be read ({e})"))
}

/// Looks at the database header (no SQLite connection: opening one would create files
/// beside a database in rollback-journal mode): the magic string, and the read and write
/// versions at bytes 18 and 19, which are 2 in WAL mode.
fn content(path: &Path) -> Content {
    let mut header = [0u8; 100];
    let mut len = 0;
    let read = std::fs::File::open(path).and_then(|mut file| {
        while len < header.len() {
            match file.read(&mut header[len..])? {
                0 => break,
                n => len += n,
            }
        }
        Ok(())
    });
    if let Err(e) = read {
        return unreadable(&e);
    }
    if len == 0 {
        return Content::Empty;
    }
    if len < header.len() || !header.starts_with(b"SQLite format 3\0") {
        return Content::Not("not an SQLite database".into());
    }
    if header[18] == 2 && header[19] == 2 {
        Content::Wal
    } else {
        Content::Not(
            "an SQLite database in rollback-journal mode, not WAL mode (PRAGMA \
             journal_mode=WAL switches it, once)"
                .into(),
        )
    }
}

/// What the watcher callbacks tell the directory thread.
enum Message {
    /// These names in this directory changed.
    Names(PathBuf, Vec<OsString>),
    /// Something in this directory changed, or the directory itself went.
    All(PathBuf),
    Stop,
}

/// What a directory watch asks of the replicator it feeds (the replicator's shared core
/// implements it): this module sits below the replicator and knows it only through these
/// few calls.
pub(crate) trait Host: Send + Sync {
    /// The watcher the replicator's databases share; directories are watched on it too.
    fn watcher(&self) -> &Watcher;
    /// How often a directory is scanned again (`polling`: its watcher reports nothing for
    /// directories, so scans are all there is).
    fn rescan_interval(&self, polling: bool) -> Duration;
    /// An error if `name` or the file at `canonical` is replicated already.
    fn check_free(&self, name: &str, canonical: &Path) -> Result<()>;
    /// Replicate the database at `path` under `name`, found in a watched directory.
    fn add(&self, path: &Path, name: &str) -> Result<()>;
    /// Stop replicating `name` once it has shipped what it staged, without waiting.
    fn remove_later(&self, name: &str) -> Result<()>;
    /// Join the removed databases that are done; how many were.
    fn reap(&self) -> usize;
}

/// A directory being watched: its thread, and how to stop it.
pub(crate) struct DirectoryWatch {
    messages: Sender<Message>,
    thread: JoinHandle<()>,
    /// Matching files the first scan found, replicated or not.
    pub(crate) found: usize,
}

impl DirectoryWatch {
    /// Scan `spec`'s directory (adding what is there), then keep watching it on a thread
    /// of its own.
    pub(crate) fn start<H: Host + 'static>(
        core: Arc<H>,
        spec: DirectorySpec,
    ) -> Result<DirectoryWatch> {
        let root = std::fs::canonicalize(&spec.dir).map_err(|e| {
            Error::from(e).with_context(format!("watching directory {}", spec.dir.display()))
        })?;
        if !root.is_dir() {
            return Err(Error::invalid(format!(
                "watching directory {}: not a directory",
                spec.dir.display()
            )));
        }
        let (messages, inbox) = mpsc::channel();
        let polling = core.watcher().backend() == "poll";
        let rescan = core.rescan_interval(polling);
        let mut scanner = Scanner {
            core,
            root,
            spec,
            polling,
            rescan,
            messages: messages.clone(),
            dirs: HashMap::new(),
            mine: HashMap::new(),
            skipped: HashMap::new(),
            waiting: HashSet::new(),
            said_turns: false,
            sweep: None,
            root_gone: false,
            unwatched: 0,
        };
        log::info!(
            "watching directory {} for {}{}",
            scanner.root.display(),
            scanner.spec.pattern,
            if scanner.spec.recursive {
                ", recursively"
            } else {
                ""
            }
        );
        scanner.scan_all()?;
        let found = scanner.mine.len() + scanner.skipped.len() + scanner.waiting.len();
        let thread = std::thread::Builder::new()
            .name("walsync-dir".into())
            .stack_size(256 * 1024)
            .spawn(move || scanner.run(&inbox))
            .map_err(|e| Error::from(e).with_context("starting a directory thread"))?;
        Ok(DirectoryWatch {
            messages,
            thread,
            found,
        })
    }

    /// Stop adding and removing databases (those added stay, for the replicator to stop).
    pub(crate) fn stop(self) {
        let _ = self.messages.send(Message::Stop);
        if self.thread.join().is_err() {
            log::error!("a directory thread panicked");
        }
    }
}

/// The state of one watched directory tree.
/// Generic over its host: static calls, as if it named the replicator's core.
struct Scanner<H> {
    core: Arc<H>,
    /// The watched directory, canonical.
    root: PathBuf,
    spec: DirectorySpec,
    /// The watcher polls: it reports nothing for directories, so scan every `rescan`.
    polling: bool,
    rescan: Duration,
    /// For the watcher callbacks.
    messages: Sender<Message>,
    /// Directories watched (the root, and subdirectories when recursive).
    dirs: HashMap<PathBuf, Option<WatchId>>,
    /// Databases this watch added: path and name.
    mine: HashMap<PathBuf, String>,
    /// Matching files not replicated, and why (said once, again only if the reason changes).
    skipped: HashMap<PathBuf, String>,
    /// Files to try again once a removed database has left (it may hold their sidecar), or
    /// once the descriptor budget has a place (see [`crate::limits::BUSY`]).
    waiting: HashSet<PathBuf>,
    /// That databases found wait for a place in the descriptor budget was said (again
    /// once none waits).
    said_turns: bool,
    /// During a scan of the whole tree: every path listed so far.
    sweep: Option<HashSet<OsString>>,
    /// The root directory was found gone, and that was said.
    root_gone: bool,
    /// Directories the watcher refused (only the first is a warning).
    unwatched: usize,
}

impl<H: Host> Scanner<H> {
    fn run(mut self, inbox: &Receiver<Message>) {
        let mut next_scan = std::time::Instant::now() + self.rescan;
        loop {
            let wait = if self.waiting.is_empty() {
                next_scan.saturating_duration_since(std::time::Instant::now())
            } else {
                LEAVING_CHECK
            };
            let mut names: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
            let mut whole: HashSet<PathBuf> = HashSet::new();
            let mut take = |message: Message| -> bool {
                match message {
                    Message::Names(dir, list) => names.entry(dir).or_default().extend(list),
                    Message::All(dir) => {
                        whole.insert(dir);
                    }
                    Message::Stop => return false,
                }
                true
            };
            match inbox.recv_timeout(wait) {
                Ok(message) => {
                    if !take(message) {
                        return;
                    }
                    // What else came meanwhile, at once.
                    while let Ok(message) = inbox.try_recv() {
                        if !take(message) {
                            return;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            for dir in &whole {
                self.scan_dir(dir);
            }
            for (dir, names) in names {
                if whole.contains(&dir) {
                    continue;
                }
                for name in names {
                    self.check(&dir.join(name));
                }
            }
            if !self.waiting.is_empty() && self.core.reap() == 0 {
                let mut waiting = std::mem::take(&mut self.waiting).into_iter();
                for path in waiting.by_ref() {
                    self.check(&path);
                    if crate::limits::BUSY.is_full() {
                        break; // the rest wait for a database to rest
                    }
                }
                self.waiting.extend(waiting);
                self.said_turns &= !self.waiting.is_empty();
            }
            if std::time::Instant::now() >= next_scan {
                match self.scan_all() {
                    Ok(()) => self.root_gone = false,
                    Err(e) if !self.root_gone => {
                        log::warn!("{e}; looking for it every {}s", self.rescan.as_secs_f64());
                        self.root_gone = true;
                    }
                    Err(_) => {}
                }
                self.core.reap();
                next_scan = std::time::Instant::now() + self.rescan;
            }
        }
    }

    /// Look at the whole tree: every directory (watching those not watched yet), every
    /// file, and every database added that is no longer there.
    fn scan_all(&mut self) -> Result<()> {
        if !self.root.is_dir() {
            let root = self.root.clone();
            self.forget_under(&root);
            return Err(Error::not_found(format!(
                "watched directory {} is gone: its databases are no longer replicated",
                root.display()
            )));
        }
        let root = self.root.clone();
        // Every path listed, to find what is gone once at the end: a look at every database
        // for each directory scanned made a scan of ten thousand tenants' directories
        // quadratic (a tenth of a restart of 4,000 went there, and again at every rescan).
        self.sweep = Some(HashSet::new());
        self.scan_dir(&root);
        let seen = self.sweep.take().unwrap_or_default();
        let gone: Vec<PathBuf> = self
            .mine
            .keys()
            .chain(self.dirs.keys())
            .filter(|p| **p != root && !seen.contains(p.as_os_str()))
            .cloned()
            .collect();
        for path in gone {
            self.check(&path);
        }
        Ok(())
    }

    /// Look at every entry of `dir` (and, recursively, of its subdirectories), and at every
    /// database added from it.
    fn scan_dir(&mut self, dir: &Path) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                log::debug!("scanning {}: {e}", dir.display());
                self.forget_under(dir);
                return;
            }
        };
        self.watch_dir(dir);
        // With the file type from the directory itself: no stat per entry.
        let mut listed: Vec<(OsString, bool)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                Some((entry.file_name(), is_dir))
            })
            .collect();
        // Sorted, so that of two files that would share a name the same one wins each time.
        listed.sort();
        for (name, is_dir) in &listed {
            let path = dir.join(name);
            let hidden = name.to_string_lossy().starts_with('.');
            if *is_dir && self.spec.recursive && !hidden {
                // Known or not: a scan looks at the whole tree.
                self.scan_dir(&path);
            } else if !is_dir {
                self.check(&path);
            }
        }
        if let Some(seen) = self.sweep.as_mut() {
            // A scan of the whole tree: what is gone is found once at its end.
            seen.extend(
                listed
                    .into_iter()
                    .map(|(name, _)| dir.join(name).into_os_string()),
            );
            return;
        }
        let names: HashSet<OsString> = listed.into_iter().map(|(name, _)| name).collect();
        // Databases added from here, and directories watched under it, no longer listed
        // (deleted or moved away: with polling, nothing else tells).
        let gone: Vec<PathBuf> = self
            .mine
            .keys()
            .chain(self.dirs.keys())
            .filter(|p| {
                p.parent() == Some(dir) && p.file_name().is_some_and(|n| !names.contains(n))
            })
            .cloned()
            .collect();
        for path in gone {
            self.check(&path);
        }
    }

    /// Look at one path in the tree: a database that came, changed or went, or a
    /// subdirectory.
    fn check(&mut self, path: &Path) {
        let Some(file_name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return;
        };
        // Most events are writes to SQLite's files beside a database: no stat for those.
        if never_matches(&file_name)
            || (!self.spec.recursive
                && !self.spec.pattern.matches(&file_name)
                && !self.mine.contains_key(path))
        {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            self.forget_under(path);
            return;
        };
        if meta.is_dir() {
            if self.spec.recursive && !self.dirs.contains_key(path) {
                self.scan_dir(path);
            }
            return;
        }
        if !self.spec.pattern.matches(&file_name) {
            return;
        }
        // A symbolic link to a database counts as the database (SQLite follows it).
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            self.forget_under(path);
            return;
        }
        if self.mine.contains_key(path) {
            return;
        }
        self.consider(path);
    }

    /// A matching file not replicated yet: add it if it is a WAL database.
    fn consider(&mut self, path: &Path) {
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        let name = match replica_name(relative) {
            Ok(name) => name,
            Err(e) => return self.skip(path, e.to_string()),
        };
        // A file this process already replicates (named on the command line, or the same
        // file by another path) must not be opened here: closing any descriptor of it would
        // drop the POSIX locks its SQLite connections hold (see `database::check_is_file`).
        let free = std::fs::canonicalize(path)
            .map_err(Error::from)
            .and_then(|canonical| self.core.check_free(&name, &canonical));
        if let Err(e) = free {
            return self.not_added(path, e);
        }
        if let Some(why) = crate::limits::no_room_for_another() {
            return self.skip(
                path,
                format!("not replicated: {why}; tried again at the next scan"),
            );
        }
        if crate::limits::BUSY.is_full() {
            // Every descriptor the limit leaves is held by busy databases: try again soon,
            // without opening anything now.
            if !self.said_turns {
                log::info!(
                    "open files are short (RLIMIT_NOFILE leaves room for {} busy databases \
                     beside the others at rest): databases found wait their turn",
                    crate::limits::busy_allowed()
                );
                self.said_turns = true;
            }
            self.waiting.insert(path.to_path_buf());
            return;
        }
        match content(path) {
            Content::Wal => {}
            Content::Empty => {
                log::debug!(
                    "{}: empty; waiting for it to become a database",
                    path.display()
                );
                return;
            }
            Content::OutOfDescriptors(reason) => return self.skip(path, reason),
            Content::Not(reason) => {
                return self.skip(
                    path,
                    format!("{reason}: not replicated until it is a WAL database"),
                )
            }
        }
        match self.core.add(path, &name) {
            Ok(()) => {
                log::info!("watching {} as {name}", path.display());
                if self.skipped.remove(path).is_some() {
                    log::info!("{}: now a WAL database, replicated", path.display());
                }
                self.mine.insert(path.to_path_buf(), name);
            }
            Err(e) => self.not_added(path, e),
        }
    }

    fn not_added(&mut self, path: &Path, e: Error) {
        // A database still leaving may hold what this one needs (its sidecar, when the
        // same file came back or moved within the tree): try again once it left.
        if e.is_transient() || self.core.reap() > 0 {
            log::debug!(
                "{}: {e}; trying again once removed databases left",
                path.display()
            );
            self.waiting.insert(path.to_path_buf());
        } else {
            self.skip(path, format!("not replicated: {e}"));
        }
    }

    /// Say once why `path` is not replicated (again only if the reason changes).
    fn skip(&mut self, path: &Path, reason: String) {
        if self.skipped.get(path) != Some(&reason) {
            log::warn!("{}: {reason}", path.display());
            self.skipped.insert(path.to_path_buf(), reason);
        }
    }

    /// `path` (a file or a directory) is no longer in the tree: remove the databases added
    /// from it or under it, and stop watching directories under it.
    fn forget_under(&mut self, path: &Path) {
        let leaving: Vec<(PathBuf, String)> = self
            .mine
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        for (db, name) in leaving {
            self.mine.remove(&db);
            log::info!(
                "{} is gone (deleted or moved out of {}): no longer replicating it as {name}; \
                 its replica stays in storage",
                db.display(),
                self.root.display()
            );
            if let Err(e) = self.core.remove_later(&name) {
                log::debug!("{name}: {e}");
            }
            // Whatever comes next at this path waits for the old thread to let go.
            self.waiting.insert(db);
        }
        self.skipped.retain(|p, _| !p.starts_with(path));
        let dirs: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|d| d.starts_with(path))
            .cloned()
            .collect();
        for dir in dirs {
            if let Some(Some(id)) = self.dirs.remove(&dir) {
                self.core.watcher().unwatch(id);
            }
        }
    }

    /// Watch `dir` for changes, once (with the polling backend, only remember it: it is
    /// scanned every poll interval instead).
    fn watch_dir(&mut self, dir: &Path) {
        if self.dirs.contains_key(dir) {
            return;
        }
        if self.polling {
            self.dirs.insert(dir.to_path_buf(), None);
            return;
        }
        let tx = self.messages.clone();
        let at = dir.to_path_buf();
        let watched = self.core.watcher().watch_dir(
            dir,
            Box::new(move |names| {
                let message = match names {
                    Some(names) => Message::Names(at.clone(), names.iter().cloned().collect()),
                    None => Message::All(at.clone()),
                };
                let _ = tx.send(message);
            }),
        );
        match watched {
            Ok(id) => {
                self.dirs.insert(dir.to_path_buf(), Some(id));
            }
            Err(e) => {
                // Scanned every safety interval all the same. Said once: a limit (inotify
                // watches) refuses every directory after the first.
                if self.unwatched == 0 {
                    log::warn!(
                        "{e}: new databases in {} (and any other directory that cannot be \
                         watched) are found only every {}s",
                        dir.display(),
                        self.rescan.as_secs_f64()
                    );
                } else {
                    log::debug!("{e}");
                }
                self.unwatched += 1;
                self.dirs.insert(dir.to_path_buf(), None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file unread for want of descriptors is not called "no WAL database".
    #[test]
    fn out_of_descriptors_is_not_taken_for_the_files_content() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(&unreadable(&e), Content::OutOfDescriptors(why) if why.contains("next scan")),
                "errno {errno}"
            );
        }
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(unreadable(&denied), Content::Not(_)));
    }

    #[test]
    fn sqlite_and_temporary_files_never_match() {
        for name in [
            "app.db-wal",
            "app.db-shm",
            "app.db-journal",
            ".app.db-walsync",
            ".hidden.db",
            "restored.db.tmp",
        ] {
            assert!(never_matches(name), "{name}");
        }
        assert!(!never_matches("app.db"));
    }

    #[test]
    fn names_are_the_relative_path_and_never_collide() {
        let cases = [
            ("app.db", "app"),
            ("tenant-a/app.db", "tenant-a.app"),
            ("a/b/c.sqlite", "a.b.c"),
            ("example.com/app.db", "example..com.app"),
            ("app.v2.db", "app..v2"),
            ("my app.db", "my_app"),
            ("data", "data"),
        ];
        for (path, name) in cases {
            assert_eq!(replica_name(Path::new(path)).unwrap(), name, "{path}");
            crate::layout::validate_name(name).unwrap();
        }
        // Paths that a plain "/ becomes ." would confuse.
        let a = replica_name(Path::new("a.b/c.db")).unwrap();
        let b = replica_name(Path::new("a/b.c.db")).unwrap();
        let c = replica_name(Path::new("a/b/c.db")).unwrap();
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        assert!(replica_name(Path::new(&"x/".repeat(70))).is_err());
        assert!(replica_name(Path::new("../app.db")).is_err());
    }

    #[test]
    fn content_tells_wal_databases_from_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(content(&empty), Content::Empty);
        let text = dir.path().join("text.db");
        std::fs::write(&text, vec![b'x'; 200]).unwrap();
        assert!(matches!(content(&text), Content::Not(_)));
        let db = dir.path().join("rollback.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        assert!(matches!(content(&db), Content::Not(r) if r.contains("rollback")));
        conn.execute_batch("PRAGMA journal_mode=WAL").unwrap();
        assert_eq!(content(&db), Content::Wal);
        assert!(matches!(
            content(&dir.path().join("missing.db")),
            Content::Not(_)
        ));
    }
}
