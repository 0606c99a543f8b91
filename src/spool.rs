//! Scratch files on disk, so no buffer grows with database or transaction size.
//!
//! A spool is created in a directory the caller chooses (next to the database, or next to a
//! restore's output: a small VPS often has `/tmp` on tmpfs, which is memory) and is unlinked
//! as soon as it is open, so it disappears even if walsync is killed. Objects are gzipped
//! into a spool ([`crate::gzip`]) and uploaded from it with positional reads.
//!
//! Spools hold the database's data, so they are created owner-only (0600, less the umask),
//! named ones too before SQLite opens them: SQLite would create a missing file 0644 (and
//! gives its journal the database file's mode).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Mode of scratch files (less the umask).
const MODE: u32 = 0o600;

/// A unique path for a scratch file in `dir`, `.walsync-<what>-<pid>-<n>`.
pub fn unique_path(dir: &Path, what: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".walsync-{what}-{}-{n}", std::process::id()))
}

/// Create `path` afresh, read-write and owner-only (0600, less the umask). A leftover (of a
/// crashed process that had the same pid) is replaced, never reused with whatever mode it had.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    crate::files::create_fresh(path, MODE)
}

/// An anonymous read-write scratch file in `dir`: created, then unlinked at once.
pub fn anonymous(dir: &Path) -> Result<File> {
    let path = unique_path(dir, "spool");
    let file = create_private(&path)
        .context(|| format!("creating a scratch file in {}", dir.display()))?;
    std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    Ok(file)
}

/// A named scratch file, removed when dropped (SQLite needs a path for a backup target).
pub struct NamedSpool {
    path: PathBuf,
}

impl NamedSpool {
    /// A fresh, empty, owner-only file in `dir` (an empty file is an empty SQLite database).
    ///
    /// If it cannot be created here, nothing is: whoever opens the path next (SQLite) reports
    /// the failure. A leftover from a crashed process that had the same pid is replaced.
    pub fn new(dir: &Path, what: &str) -> NamedSpool {
        let path = unique_path(dir, what);
        if let Err(e) = create_private(&path) {
            log::debug!("cannot create {}: {e}", path.display());
        }
        NamedSpool { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NamedSpool {
    fn drop(&mut self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let _ = std::fs::remove_file(crate::files::with_suffix(&self.path, suffix));
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
    fn spools_are_owner_only_also_when_sqlite_fills_them() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let spool = NamedSpool::new(dir.path(), "snap");
        assert_eq!(mode(spool.path()) | 0o600, 0o600);
        let conn = rusqlite::Connection::open(spool.path()).unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(conn);
        assert_eq!(mode(spool.path()) | 0o600, 0o600);
        // A leftover at a spool's path is replaced, not reused with its mode and content.
        let stale = dir.path().join(".walsync-stale-1-1");
        std::fs::write(&stale, b"old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = create_private(&stale).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 0);
        assert_eq!(mode(&stale) | 0o600, 0o600);
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
