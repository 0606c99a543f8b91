//! Small file-system ideas that several layers share, each written once: a file's identity
//! on disk, a path with a suffix (SQLite's `-wal`, `-shm`, `-journal` siblings), a file
//! created afresh with a given mode, and the durable atomic write.
//!
//! It stands on nothing of the crate but [`crate::error`], so every layer may use it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Context, Error, Result};

/// What identifies a file on disk, to notice it being replaced (device, inode) or written
/// (size, modification time) while nobody was looking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Result<FileIdentity> {
        let m = std::fs::metadata(path).context(|| format!("reading {}", path.display()))?;
        Ok(FileIdentity::from_metadata(&m))
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }

    /// `None` when the file does not exist or cannot be examined, which for noticing
    /// changes is the same thing (the second is logged at debug level).
    pub fn probe(path: &Path) -> Option<FileIdentity> {
        match FileIdentity::of(path) {
            Ok(identity) => Some(identity),
            Err(err) => {
                if err.kind() != crate::error::ErrorKind::NotFound {
                    log::debug!("cannot stat {}: {err}", path.display());
                }
                None
            }
        }
    }

    /// Same file (not replaced by another one).
    pub fn same_file(&self, other: &FileIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// `path` with `suffix` appended to its last component: `app.db` + `-wal` → `app.db-wal`.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Create `path` afresh, read-write, with `mode` (less the umask). A leftover (of a crashed
/// process that had the same pid) is replaced, never reused with whatever mode it had.
pub(crate) fn create_fresh(path: &Path, mode: u32) -> std::io::Result<File> {
    let create = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
    };
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()
        }
        other => other,
    }
}

/// Replace `path` with what `fill` writes, atomically and durably: a temporary sibling
/// (`.<name>.tmp-<pid>-<n>`, created with `mode`), fsync, rename, fsync of the directory.
/// A power cut leaves the old content or the new, never a mix, and never moves a file back
/// after the caller relied on it. On failure the temporary file is removed.
pub fn write_atomically(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let what = || format!("writing {}", path.display());
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name.to_string_lossy()),
        _ => return Err(Error::invalid(format!("{}: not a file path", what()))),
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        // A leftover of a crashed process that had our pid is replaced, never reused with
        // whatever mode it had.
        let mut file = create_fresh(&tmp, mode)?;
        fill(&mut file)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::from(e).with_context(what()));
    }
    sync_dir(dir)
}

/// Whether `name` is a temporary file of [`write_atomically`] (left behind by a crash).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// fsync a directory, making the renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("position.json");
        write_atomically(&path, 0o640, |f| f.write_all(b"one")).unwrap();
        write_atomically(&path, 0o640, |f| f.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let failed = write_atomically(&path, 0o640, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["position.json"]);
        assert!(is_temporary(".position.json.tmp-1-2") && !is_temporary("position.json"));
    }

    #[test]
    fn identity_tells_a_replaced_file_from_a_written_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        std::fs::write(&path, b"a").unwrap();
        let first = FileIdentity::of(&path).unwrap();
        std::fs::write(&path, b"ab").unwrap();
        let written = FileIdentity::of(&path).unwrap();
        assert!(written.same_file(&first) && written != first);
        std::fs::write(dir.path().join("new"), b"ab").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert!(!FileIdentity::of(&path).unwrap().same_file(&first));
        assert_eq!(FileIdentity::probe(&dir.path().join("missing")), None);
        assert_eq!(with_suffix(&path, "-wal"), dir.path().join("app.db-wal"));
    }
}
