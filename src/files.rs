//! Small file-system ideas that several layers share, each written once: a file's identity
//! on disk, a path with a suffix (SQLite's `-wal`, `-shm`, `-journal` siblings), and the
//! durable atomic write; a digest of a file's content; and the limit on open files every
//! watched database counts against.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
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
                if err.kind() != crate::ErrorKind::NotFound {
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
        let mut file = crate::spool::create_fresh(&tmp, mode)?;
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

/// This process's soft limit on open files (RLIMIT_NOFILE), if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(rlim(limit.rlim_cur))
}

/// Raise this process's soft limit on open files to its hard limit (each watched database
/// keeps about six files open). Returns the soft and hard limits as they are afterwards.
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some((rlim(limit.rlim_cur), rlim(limit.rlim_max)))
}

/// `rlim_t` is u64 on Linux and i64 on the BSDs (where infinity is -1, read as u64::MAX).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn rlim(value: libc::rlim_t) -> u64 {
    value as u64
}

/// Whether this process has (nearly) all the files open that RLIMIT_NOFILE allows: SQLite
/// reports only "unable to open database file" then, so the caller can say which limit.
pub fn near_open_files_limit() -> bool {
    let (Some(limit), Ok(open)) = (open_files_limit(), std::fs::read_dir("/proc/self/fd")) else {
        return false;
    };
    open.count() as u64 + 8 >= limit
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
