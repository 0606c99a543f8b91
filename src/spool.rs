//! Scratch files on disk, so no buffer grows with database or transaction size.
//!
//! A spool is created in a directory the caller chooses (next to the database, or next to a
//! restore's output: a small VPS often has `/tmp` on tmpfs, which is memory) and is unlinked
//! as soon as it is open, so it disappears even if walsync is killed. Objects are gzipped
//! into a spool and uploaded from it with positional reads.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique path for a scratch file in `dir`, `.walsync-<what>-<pid>-<n>`.
pub fn unique_path(dir: &Path, what: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".walsync-{what}-{}-{n}", std::process::id()))
}

/// An anonymous read-write scratch file in `dir`: created, then unlinked at once.
pub fn anonymous(dir: &Path) -> Result<File> {
    let path = unique_path(dir, "spool");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .context(|| format!("creating a scratch file in {}", dir.display()))?;
    std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    Ok(file)
}

/// A named scratch file, removed when dropped (SQLite needs a path for a backup target).
pub struct NamedSpool {
    path: PathBuf,
}

impl NamedSpool {
    /// Reserve a fresh path in `dir`; nothing is created until someone writes to it.
    pub fn new(dir: &Path, what: &str) -> NamedSpool {
        NamedSpool {
            path: unique_path(dir, what),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NamedSpool {
    fn drop(&mut self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn anonymous_spool_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = anonymous(dir.path()).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn named_spool_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let spool = NamedSpool::new(dir.path(), "snap");
            std::fs::write(spool.path(), b"x").unwrap();
            assert!(spool.path().exists());
            spool.path().to_path_buf()
        };
        assert!(!path.exists());
    }
}
