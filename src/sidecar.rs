//! The sidecar: walsync's own files beside a database, `.app.db-walsync/`, one directory
//! per replica (database, destination, name) inside it. What each file holds is listed in
//! `docs/FORMAT.md` ("The sidecar"); this module creates, locks and reads them:
//!
//! - the directory `<name>-<hash of destination and name>/` (64-bit FNV-1a) and its
//!   `lock`, held (flock) while a walsync works on this database for this destination, so
//!   two of them can never interleave segments under one name. Whoever takes it writes its
//!   *stamp* into it (see `sidecar/holder.rs`). On Linux a resting database lets the lock go
//!   ([`Sidecar::release_lock`]: one descriptor less for each idle database) and takes it
//!   back before it does anything else ([`Sidecar::relock`]): its stamp, still there, says
//!   nobody held it meanwhile, and still keeps a second walsync from starting on it;
//! - `position.json`, whose content `replica/position.rs` defines; an unreadable one is ignored
//!   (a new generation starts);
//! - staged objects, `<seq>-<object file name>`, written here before they count as read,
//!   then uploaded in `seq` order and removed, so a storage outage costs local disk, never
//!   the data; scratch files (`.walsync-*`) left by a killed process are removed;
//! - `restored.json`, written by `walsync restore`, which lets the restored file take the
//!   name over from the host that wrote it (see `Replica::reconcile`).
//!
//! `position.json` and `restored.json` are written with [`crate::files::write_atomically`]: a
//! temporary file, fsync, rename, then an fsync of the directory, so a power cut leaves
//! either the old or the new file and never moves a position back after walsync relied on
//! it. A staged object is a draft renamed into place, fsynced with its directory before the
//! position that counts it is saved (see [`Sidecar::stage`]).
//!
//! Nobody reads through the sidecar what the database does not let them read: the
//! directories and files get the database file's permission bits (never more, and always
//! enough for the owner), whatever the umask says.

mod holder;

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, ErrorKind, Result};
use crate::files::{self, sync_dir, write_atomically};
use crate::layout::{ObjectKind, ObjectName};
use crate::spool;

/// The file `walsync restore` leaves in the sidecar of a database it wrote.
const RESTORED: &str = "restored.json";

/// How long [`Sidecar::relock`] waits for a lock someone else holds: a walsync refused by
/// this one's stamp holds it for a moment only.
const RELOCK_PATIENCE: Duration = Duration::from_secs(2);

/// The sidecar directory of one replica, locked for this process.
pub struct Sidecar {
    dir: PathBuf,
    /// Permission bits for files: the database's, plus read and write for the owner.
    file_mode: u32,
    /// The lock file, held; `None` while released (see the module docs).
    lock: Option<File>,
    /// What this process wrote into the lock file when it took it, and that file's device
    /// and inode (boxed: a database's worker holds a sidecar, see `DbWorker`'s size).
    stamp: Box<holder::Stamp>,
}

/// What [`Sidecar::relock`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Relocked {
    /// The lock is held, and nobody else held it since this sidecar was opened.
    Held,
    /// Somebody else held the lock while it was released (or the lock file is gone): what
    /// this process knows of the replica may be stale. The lock is not held.
    TakenOver(String),
}

/// An object staged for upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Staging order; uploads go in this order.
    pub seq: u64,
    pub object: ObjectName,
    pub path: PathBuf,
    pub bytes: u64,
    /// Written uncompressed (cut under the barrier, see [`crate::gzip::Stored`]): to be
    /// compressed before it counts.
    pub uncompressed: bool,
}

/// An object being written into the sidecar, not staged yet (see [`Sidecar::stage`]).
pub struct Draft {
    pub file: File,
    path: PathBuf,
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Sidecar {
    /// Create (if needed) and lock the sidecar of `db_path` for replica `name` at
    /// `destination`. Fails clearly when another walsync holds it.
    pub fn open(db_path: &Path, destination: &str, name: &str) -> Result<Sidecar> {
        let db_mode = std::fs::metadata(db_path)
            .context(|| format!("reading {}", db_path.display()))?
            .mode()
            & 0o777;
        let file_mode = db_mode | 0o600;
        // Directories: search permission wherever the database is readable.
        let dir_mode = file_mode | ((file_mode & 0o444) >> 2);
        let root = root_dir(db_path)?;
        let stem = format!("{name}-{:016x}", fnv1a(&format!("{destination}\n{name}")));
        let dir = root.join(stem);
        for d in [&root, &dir] {
            create_dir(d, dir_mode)?;
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(file_mode)
            .open(&lock_path)
            .context(|| format!("creating lock file {}", lock_path.display()))?;
        let what = || format!("reading lock file {}", lock_path.display());
        let meta = lock.metadata().context(what)?;
        let lock_identity = (meta.dev(), meta.ino());
        // The holder's stamp, read before the lock is taken so that a refusal by the lock
        // names the holder too (a stamp is written whole before anything else is done).
        let content = read_from_start(&lock).context(what)?;
        let refused = |content: &[u8]| {
            let holder = holder::live_holder(content, lock_identity)
                .map(|pid| format!(" (process {pid})"))
                .unwrap_or_default();
            Error::invalid(format!(
                "another walsync{holder} is already replicating {} to {destination} as {name:?}",
                db_path.display()
            ))
        };
        if lock.try_lock().is_err() {
            return Err(refused(&content));
        }
        // Read again under the lock: the holder may have changed meanwhile.
        let content = read_from_start(&lock).context(what)?;
        // A resting walsync holds no lock, but its stamp is there.
        if holder::live_holder(&content, lock_identity).is_some() {
            return Err(refused(&content));
        }
        let stamp = Box::new(holder::Stamp::new(lock_identity));
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(stamp.text.as_bytes(), 0))
            .context(|| format!("writing lock file {}", lock_path.display()))?;
        Ok(Sidecar {
            dir,
            file_mode,
            lock: Some(lock),
            stamp,
        })
    }

    /// Let go of the lock while the replica rests, on Linux (elsewhere nothing happens):
    /// the caller has nothing staged, nothing unsaved and nothing uploading, and calls
    /// [`Sidecar::relock`] before it does anything with this sidecar or storage again.
    /// Until then the sidecar refuses every write.
    pub(crate) fn release_lock(&mut self) {
        if cfg!(target_os = "linux") {
            self.lock = None;
        }
    }

    /// Whether this sidecar holds its lock now (see [`Sidecar::release_lock`]).
    pub(crate) fn holds_lock(&self) -> bool {
        self.lock.is_some()
    }

    /// Take the lock back after [`Sidecar::release_lock`] (at once if it is held), waiting
    /// [`RELOCK_PATIENCE`] at most for someone who holds it: a walsync that the stamp
    /// refused lets go in a moment. The stamp then says whether anybody else held it
    /// meanwhile. An error only if the lock could not be taken (tried again later).
    pub(crate) fn relock(&mut self) -> Result<Relocked> {
        self.relock_within(RELOCK_PATIENCE)
    }

    fn relock_within(&mut self, patience: Duration) -> Result<Relocked> {
        if self.lock.is_some() {
            return Ok(Relocked::Held);
        }
        let path = self.dir.join("lock");
        let what = || format!("taking lock file {} back", path.display());
        let lock = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Relocked::TakenOver(format!("{} is gone", path.display())))
            }
            Err(e) => return Err(Error::from(e).with_context(what())),
        };
        let deadline = Instant::now() + patience;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::Transient,
                        format!("{}: another process holds it", what()),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::from(e).with_context(what()))
                }
            }
        }
        let meta = lock.metadata().context(what)?;
        let content = read_from_start(&lock).context(what)?;
        if (meta.dev(), meta.ino()) != self.stamp.lock || content != self.stamp.text.as_bytes() {
            let by = match holder::live_holder(&content, (meta.dev(), meta.ino())) {
                Some(pid) => format!("walsync process {pid}"),
                None => "another walsync".to_string(),
            };
            return Ok(Relocked::TakenOver(format!(
                "{by} took {} while it was released",
                path.display()
            )));
        }
        self.lock = Some(lock);
        Ok(Relocked::Held)
    }

    /// An error unless the lock is held: nothing is written into a sidecar whose lock is
    /// released.
    fn check_locked(&self) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "{}: its lock is released (a bug: it is taken back before any write)",
                    self.dir.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read `position.json`; `None` if there is none. An unreadable one is reported and
    /// ignored (the caller starts a new generation), since it may be a torn write from a
    /// filesystem that does not honour rename atomicity.
    pub fn load_position<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        let path = self.dir.join("position.json");
        match std::fs::read(&path) {
            Ok(body) => match serde_json::from_slice(&body) {
                Ok(p) => Ok(Some(p)),
                Err(e) => {
                    log::warn!(
                        "ignoring unreadable position file {} ({e}); a new generation will start",
                        path.display()
                    );
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::from(e).with_context(format!("reading {}", path.display()))),
        }
    }

    /// Replace `position.json` atomically and durably.
    pub fn save_position<T: serde::Serialize>(&self, position: &T) -> Result<()> {
        self.check_locked()?;
        let body = serde_json::to_vec_pretty(position)?;
        write_atomically(&self.dir.join("position.json"), self.file_mode, |f| {
            f.write_all(&body)
        })
    }

    /// Record that the database was just restored from this replica, whose newest generation
    /// was `newest`: `restored.json` (see the module doc), naming the restored file (its
    /// absolute `path` and `identity`), so that a copy of the database and its sidecar is
    /// not taken for it. The position, which described the file the restore replaced, is
    /// removed, and with it whatever that file had staged (returned, to be reported).
    pub fn note_restored(
        &self,
        newest: &str,
        identity: &files::FileIdentity,
        path: &str,
    ) -> Result<usize> {
        let stale = self.staged()?;
        let position = self.dir.join("position.json");
        match std::fs::remove_file(&position) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::from(e).with_context(format!("removing {}", position.display())))
            }
            _ => {}
        }
        for staged in &stale {
            self.remove(staged)?;
        }
        let body = serde_json::to_vec_pretty(&serde_json::json!({
            "newest_generation": newest,
            "path": path,
            "dev": identity.dev,
            "ino": identity.ino,
        }))?;
        write_atomically(&self.dir.join(RESTORED), self.file_mode, |f| {
            f.write_all(&body)
        })?;
        Ok(stale.len())
    }

    /// The newest generation of the replica when `walsync restore` wrote this database, if
    /// it did (see [`Sidecar::note_restored`]): not when `restored.json` names another file
    /// than `identity` (the database and its sidecar were copied; device and inode decide,
    /// since a path can be spelled many ways). One written before walsync recorded the
    /// file is taken as it is.
    pub fn restored_from(&self, identity: &files::FileIdentity) -> Option<String> {
        let body = std::fs::read(self.dir.join(RESTORED)).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let field = |name: &str| value.get(name).and_then(|v| v.as_u64());
        let same_file = match (field("dev"), field("ino")) {
            (Some(dev), Some(ino)) => dev == identity.dev && ino == identity.ino,
            _ => true,
        };
        if !same_file {
            log::debug!(
                "{} names another file; ignored",
                self.dir.join(RESTORED).display()
            );
            return None;
        }
        Some(value.get("newest_generation")?.as_str()?.to_string())
    }

    /// A new, empty scratch file to write an object into; see [`Sidecar::stage`].
    pub fn draft(&self) -> Result<Draft> {
        self.check_locked()?;
        let path = spool::unique_path(&self.dir, "draft");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(self.file_mode)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        Ok(Draft { file, path })
    }

    /// A scratch database for a snapshot's copy (owner-only, see [`spool::NamedSpool`]).
    pub fn scratch_database(&self) -> spool::NamedSpool {
        spool::NamedSpool::new(&self.dir, "snapshot")
    }

    /// Give a finished draft its staged name. With `durable`, the file and the directory
    /// are fsynced first; without it (inside the write-lock barrier, where only local
    /// milliseconds are allowed), the caller makes it durable later with
    /// [`Sidecar::sync`] before relying on it after a power cut.
    pub fn stage(
        &self,
        mut draft: Draft,
        seq: u64,
        object: &ObjectName,
        durable: bool,
    ) -> Result<Staged> {
        self.check_locked()?;
        let path = self.dir.join(format!("{seq:012}-{}", object.file_name()));
        let what = || format!("staging {}", path.display());
        draft.file.flush().context(what)?;
        if durable {
            draft.file.sync_all().context(what)?;
        }
        let bytes = draft.file.metadata().context(what)?.len();
        std::fs::rename(&draft.path, &path).context(what)?;
        draft.path = PathBuf::new();
        if durable {
            sync_dir(&self.dir)?;
        }
        Ok(Staged {
            seq,
            object: object.clone(),
            path,
            bytes,
            uncompressed: false,
        })
    }

    /// fsync a staged object and the directory (see [`Sidecar::stage`]).
    pub fn sync(&self, staged: &Staged) -> Result<()> {
        File::open(&staged.path)
            .and_then(|f| f.sync_all())
            .context(|| format!("syncing {}", staged.path.display()))?;
        sync_dir(&self.dir)
    }

    /// The staged objects, in staging order. Leftover scratch files from a killed process
    /// are removed.
    pub fn staged(&self) -> Result<Vec<Staged>> {
        let mut found = Vec::new();
        let entries =
            std::fs::read_dir(&self.dir).context(|| format!("reading {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.context(|| format!("reading {}", self.dir.display()))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with(".walsync-") || files::is_temporary(file_name) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, object)) = parse_staged_name(file_name) else {
                continue;
            };
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            found.push(Staged {
                seq,
                object,
                path: entry.path(),
                bytes,
                uncompressed: false,
            });
        }
        found.sort_by_key(|s| s.seq);
        Ok(found)
    }

    /// Remove a staged object (uploaded, or never counted). Not fsynced: a removal undone by
    /// a power cut only means the same bytes are uploaded again under the same key.
    pub fn remove(&self, staged: &Staged) -> Result<()> {
        self.check_locked()?;
        match std::fs::remove_file(&staged.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::from(e).with_context(format!("removing {}", staged.path.display())))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Sidecar {
    /// Leave no stamp behind: a stamp of a process still running keeps other walsyncs off.
    fn drop(&mut self) {
        let held = match self.lock.take() {
            Some(lock) => Some(lock),
            None => match self.relock_within(Duration::ZERO) {
                Ok(Relocked::Held) => self.lock.take(),
                _ => None,
            },
        };
        if let Some(lock) = held {
            let _ = lock.set_len(0);
        }
    }
}

/// The whole of `file`, from its first byte (wherever its offset is).
fn read_from_start(file: &File) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::new();
    let mut reader = file;
    reader.seek(std::io::SeekFrom::Start(0))?;
    reader.read_to_end(&mut content)?;
    Ok(content)
}

/// `<seq>-<object file name>` back into its parts.
fn parse_staged_name(file_name: &str) -> Option<(u64, ObjectName)> {
    let (seq, rest) = file_name.split_once('-')?;
    if seq.len() != 12 || !seq.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let object = ObjectName::parse_file_name(rest)?;
    matches!(object.kind, ObjectKind::Snapshot | ObjectKind::Segment)
        .then_some((seq.parse().ok()?, object))
}

/// `.app.db-walsync/` beside `app.db`.
fn root_dir(db_path: &Path) -> Result<PathBuf> {
    let file_name = db_path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} does not name a file", db_path.display())))?;
    let mut dir_name = std::ffi::OsString::from(".");
    dir_name.push(file_name);
    dir_name.push("-walsync");
    let parent = db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(dir_name))
}

/// Create `dir` with `mode` (exactly, whatever the umask), or tighten an existing one that
/// is more open than `mode`.
fn create_dir(dir: &Path, mode: u32) -> Result<()> {
    let what = || format!("creating walsync's directory {}", dir.display());
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::from(e).with_context(what())),
    }
    let current = std::fs::metadata(dir).context(what)?.mode() & 0o777;
    if current != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).context(what)?;
    }
    Ok(())
}

/// FNV-1a, 64 bits: a stable short name for a (destination, name) pair.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Generation;
    use crate::utc::UtcTime;

    fn database(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join("app.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_no_more_open_than_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(dir.path(), 0o600);
        let sidecar = Sidecar::open(&db, "file:///b", "app").unwrap();
        sidecar.save_position(&serde_json::json!({"x": 1})).unwrap();
        let draft = sidecar.draft().unwrap();
        let object = ObjectName {
            kind: ObjectKind::Segment,
            generation: Generation::new(),
            index: 1,
            time: UtcTime::now(),
        };
        let staged = sidecar.stage(draft, 1, &object, true).unwrap();
        let scratch = sidecar.scratch_database();
        assert_eq!(mode_of(sidecar.dir().parent().unwrap()), 0o700);
        assert_eq!(mode_of(sidecar.dir()), 0o700);
        for file in [
            sidecar.dir().join("position.json"),
            sidecar.dir().join("lock"),
            staged.path.clone(),
            scratch.path().to_path_buf(),
        ] {
            assert_eq!(mode_of(&file), 0o600, "{}", file.display());
        }

        // A group-readable database gives a group-readable sidecar, and a directory made
        // more open by hand is tightened again.
        let other = tempfile::tempdir().unwrap();
        let db = database(other.path(), 0o640);
        let root = root_dir(&db).unwrap();
        DirBuilder::new().mode(0o777).create(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sidecar = Sidecar::open(&db, "file:///b", "app").unwrap();
        assert_eq!(mode_of(&root), 0o750);
        assert_eq!(mode_of(&sidecar.dir().join("lock")), 0o640);
    }

    #[test]
    fn staged_objects_come_back_in_order_and_scratch_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(dir.path(), 0o600);
        let sidecar = Sidecar::open(&db, "file:///b", "app").unwrap();
        let generation = Generation::new();
        let mut expected = Vec::new();
        for (seq, kind, index) in [
            (9, ObjectKind::Snapshot, 0),
            (10, ObjectKind::Segment, 1),
            (11, ObjectKind::Segment, 2),
        ] {
            let mut draft = sidecar.draft().unwrap();
            draft.file.write_all(b"data").unwrap();
            let object = ObjectName {
                kind,
                generation: generation.clone(),
                index,
                time: UtcTime::now(),
            };
            expected.push(sidecar.stage(draft, seq, &object, false).unwrap());
        }
        let abandoned = sidecar.draft().unwrap();
        std::mem::forget(abandoned); // as if killed while writing
        assert_eq!(sidecar.staged().unwrap(), expected);
        let names: Vec<String> = std::fs::read_dir(sidecar.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".walsync-")),
            "{names:?}"
        );
        sidecar.remove(&expected[0]).unwrap();
        assert_eq!(sidecar.staged().unwrap(), expected[1..]);
    }

    /// The directory name is the one docs/FORMAT.md gives as its example.
    #[test]
    fn the_directory_is_named_as_the_format_says() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(dir.path(), 0o600);
        let sidecar = Sidecar::open(&db, "s3://backups/prefix", "app").unwrap();
        let name = sidecar.dir().file_name().unwrap().to_str().unwrap();
        assert_eq!(
            sidecar.dir().parent().unwrap(),
            dir.path().join(".app.db-walsync")
        );
        let format = include_str!("../docs/FORMAT.md");
        let example = format!("`app` replicated to `s3://backups/prefix` lives in `{name}/`");
        assert!(format.contains(&example), "{example}");
    }

    #[test]
    fn a_second_sidecar_for_the_same_replica_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(dir.path(), 0o600);
        let _first = Sidecar::open(&db, "file:///b", "app").unwrap();
        let err = Sidecar::open(&db, "file:///b", "app").err().unwrap();
        assert!(err.to_string().contains("already replicating"), "{err}");
        // Refused by the lock, and the holder's stamp names it.
        #[cfg(target_os = "linux")]
        assert!(
            err.to_string()
                .contains(&format!("(process {})", std::process::id())),
            "{err}"
        );
        Sidecar::open(&db, "file:///other", "app").unwrap();
    }

    /// A database in `dir` and its sidecar, opened and its lock released, as at rest.
    #[cfg(target_os = "linux")]
    fn released(dir: &Path) -> (PathBuf, Sidecar) {
        let db = database(dir, 0o600);
        let mut sidecar = Sidecar::open(&db, "file:///b", "app").unwrap();
        sidecar.release_lock();
        (db, sidecar)
    }

    /// A resting database's sidecar: its lock released, its stamp still there, so a second
    /// opener is still refused, and nothing is written until the lock is taken back.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_released_sidecar_still_refuses_a_second_opener_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut first) = released(dir.path());
        assert!(first.lock.is_none());
        let err = Sidecar::open(&db, "file:///b", "app").err().unwrap();
        let me = format!("(process {})", std::process::id());
        assert!(err.to_string().contains("already replicating"), "{err}");
        assert!(err.to_string().contains(&me), "{err}");
        assert!(first.draft().is_err());
        assert!(first.save_position(&1).is_err());
        assert_eq!(first.relock().unwrap(), Relocked::Held);
        first.save_position(&1).unwrap();
        assert_eq!(first.load_position::<u32>().unwrap(), Some(1));
    }

    /// Whoever took the lock while it was released left another stamp (or none, when it
    /// let go cleanly): taking it back says so, and leaves it free for the caller to open
    /// the sidecar afresh.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_sidecar_taken_while_released_is_known_when_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut first) = released(dir.path());
        let lock_path = first.dir().join("lock");
        std::fs::write(&lock_path, b"").unwrap();
        assert!(matches!(first.relock().unwrap(), Relocked::TakenOver(_)));
        assert!(first.lock.is_none());
        drop(Sidecar::open(&db, "file:///b", "app").unwrap());
        // A lock file removed (the sidecar deleted) is taken over too.
        let mut second = Sidecar::open(&db, "file:///b", "app").unwrap();
        second.release_lock();
        std::fs::remove_file(&lock_path).unwrap();
        assert!(matches!(second.relock().unwrap(), Relocked::TakenOver(_)));
    }

    /// Taking the lock back waits a moment for someone who holds it (a walsync the stamp
    /// refused), then reports an error that may pass.
    #[cfg(target_os = "linux")]
    #[test]
    fn taking_the_lock_back_waits_for_a_brief_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut first) = released(dir.path());
        let other = File::open(first.dir().join("lock")).unwrap();
        other.lock().unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(other);
        });
        assert_eq!(first.relock().unwrap(), Relocked::Held);
        holder.join().unwrap();
        first.release_lock();
        let other = File::open(first.dir().join("lock")).unwrap();
        other.lock().unwrap();
        let err = first.relock().err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    }

    /// A copy of the database and its sidecar (`cp -a`) is not held by the walsync that
    /// holds the original: the stamp names the original lock file.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_copied_sidecar_is_not_held_by_the_original_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (_, first) = released(dir.path());
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        let copy_db = database(&copy, 0o600);
        let copy_dir = copy
            .join(".app.db-walsync")
            .join(first.dir().file_name().unwrap());
        std::fs::create_dir_all(&copy_dir).unwrap();
        std::fs::copy(first.dir().join("lock"), copy_dir.join("lock")).unwrap();
        Sidecar::open(&copy_db, "file:///b", "app").unwrap();
    }

    /// A sidecar closed leaves no stamp: held or released when dropped.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_closed_sidecar_leaves_no_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(dir.path(), 0o600);
        let first = Sidecar::open(&db, "file:///b", "app").unwrap();
        let lock_path = first.dir().join("lock");
        assert!(std::fs::read_to_string(&lock_path)
            .unwrap()
            .starts_with("walsync-holder pid="));
        drop(first);
        assert_eq!(std::fs::read(&lock_path).unwrap(), b"");
        let mut second = Sidecar::open(&db, "file:///b", "app").unwrap();
        second.release_lock();
        drop(second);
        assert_eq!(std::fs::read(&lock_path).unwrap(), b"");
    }
}
