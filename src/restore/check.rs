//! Step 5, **check**, and the output file every step writes into.
//!
//! `OUT.tmp` is created afresh, owner-only (or with `--mode`, less the umask), before any
//! data goes into it. Once every segment is applied it is fsynced and must pass
//! `PRAGMA integrity_check`; then stale `OUT-wal`/`OUT-shm` are removed and `OUT.tmp` is
//! renamed to `OUT`, durably. On any failure `OUT.tmp` is removed and `OUT` is untouched.
//! Also here, run before anything is downloaded: the refusal to replace an existing `OUT`
//! without `--force`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::files::with_suffix;

/// Refuse to plan a restore over an existing `output` unless `force`.
pub fn check_output(output: &Path, force: bool) -> Result<()> {
    if !force && output.exists() {
        return Err(Error::invalid(format!(
            "{} already exists; choose another output or pass --force to replace it",
            output.display()
        )));
    }
    Ok(())
}

/// `OUT.tmp`, removed (with any `-wal`/`-shm` beside it) unless committed.
pub(super) struct TempOutput {
    pub(super) path: PathBuf,
    file: File,
}

impl TempOutput {
    /// Create `OUT.tmp` afresh with `mode` (less the umask): a leftover from an interrupted
    /// restore is removed first, so its mode and any `-wal` beside it cannot carry over.
    pub(super) fn create(output: &Path, mode: u32) -> Result<TempOutput> {
        let path = with_suffix(output, ".tmp");
        let what = || format!("cannot write restore output {}", path.display());
        for suffix in ["", "-wal", "-shm", "-journal"] {
            remove_if_exists(&with_suffix(&path, suffix)).context(what)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .context(what)?;
        Ok(TempOutput { path, file })
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Remove stale `-wal`/`-shm` beside `output` and move the restored file into place.
    pub(super) fn commit(mut self, output: &Path) -> Result<()> {
        for suffix in ["-wal", "-shm"] {
            remove_if_exists(&with_suffix(output, suffix))?;
        }
        std::fs::rename(&self.path, output)
            .context(|| format!("renaming {} to {}", self.path.display(), output.display()))?;
        if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .context(|| format!("syncing directory {}", dir.display()))?;
        }
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(with_suffix(&self.path, suffix));
            }
        }
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::from(e).with_context(format!("removing stale {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Open the restored file with SQLite and insist on `PRAGMA integrity_check` = ok.
pub(super) fn check_integrity(path: &Path) -> Result<()> {
    let what = || format!("checking restored database {}", path.display());
    let conn = rusqlite::Connection::open(path).context(what)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check").context(what)?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .context(what)?
        .collect::<std::result::Result<_, _>>()
        .context(what)?;
    drop(stmt);
    conn.close().map_err(|(_, e)| e).context(what)?;
    if rows != ["ok"] {
        return Err(Error::corrupt(format!(
            "restored database fails PRAGMA integrity_check: {}",
            rows.into_iter().take(3).collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(())
}
