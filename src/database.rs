//! The SQLite database walsync replicates: opening it safely and holding its WAL still.
//!
//! walsync reads the `-wal` file itself, so it must make sure nobody rewrites the frames it
//! has not shipped yet. SQLite gives two tools for that, both used through an ordinary
//! connection:
//!
//! - A *pin*: an open read transaction. While it is open no checkpoint can copy frames past
//!   the reader's snapshot into the database file, and no writer can restart the WAL from the
//!   top, so every frame that is in the WAL stays there, byte for byte, up to the last commit.
//! - A *barrier*: `BEGIN IMMEDIATE`, the write lock. While it is held no transaction can
//!   commit, so "everything committed" is a fixed point that a snapshot can be aligned to.
//!
//! walsync's own connections never checkpoint by accident: automatic checkpoints are off and
//! so is the checkpoint SQLite runs when the last connection to a database closes (that one
//! would move unshipped frames into the database file and delete the WAL).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{Context, Error, ErrorKind, Result};

/// How long walsync waits for the application's locks before giving up on an operation.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// An open connection to a replicated database.
pub struct Database {
    path: PathBuf,
    conn: Connection,
}

impl Database {
    /// Open an existing SQLite database in WAL mode, or explain clearly why not.
    pub fn open(path: &Path) -> Result<Database> {
        check_is_file(path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| {
            let limit = crate::files::open_files_limit()
                .filter(|_| crate::files::near_open_files_limit())
                .map(|n| format!(" (too many open files: RLIMIT_NOFILE soft limit {n})"))
                .unwrap_or_default();
            Error::from(e).with_context(format!("opening database {}{limit}", path.display()))
        })?;
        let db = Database {
            path: path.to_path_buf(),
            conn,
        };
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => {
                    Error::invalid(format!("{} is not a SQLite database", path.display()))
                }
                _ => Error::from(e)
                    .with_context(format!("reading journal mode of {}", path.display())),
            })?;
        db.configure()
            .context(|| format!("configuring connection to {}", path.display()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::invalid(format!(
                "{} is in '{mode}' journal mode, walsync needs WAL mode: run \
                 sqlite3 {} 'PRAGMA journal_mode=WAL;' (once; the setting is persistent)",
                path.display(),
                path.display()
            )));
        }
        Ok(db)
    }

    fn configure(&self) -> Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // walsync reads pages once (a snapshot) or not at all (the WAL is read directly), so
        // a large page cache would only hold memory: 64 KiB per connection instead of 2 MiB.
        self.conn.pragma_update(None, "cache_size", -64)?;
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// A second connection to the same database with the same safe settings.
    pub fn reopen(&self) -> Result<Database> {
        Database::open(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `-wal` file beside the database.
    pub fn wal_path(&self) -> PathBuf {
        crate::files::with_suffix(&self.path, "-wal")
    }

    /// Open the WAL file for reading, or `None` if it does not exist (nothing written since
    /// the last connection closed).
    pub fn open_wal(&self) -> Result<Option<File>> {
        let path = self.wal_path();
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::from(e).with_context(format!("opening {}", path.display()))),
        }
    }

    pub fn page_size(&self) -> Result<u32> {
        Ok(self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?)
    }

    /// Give back the page cache's memory that nothing is using right now (pages stay valid
    /// on disk; a later read fetches them again). Kept pages are what a hundred idle
    /// databases would otherwise hold, a few KiB each.
    pub fn release_memory(&self) {
        // Only fails on a closed connection; the memory is then freed anyway.
        let _ = self.conn.release_memory();
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Start a read transaction that pins the WAL (see the module docs).
    pub fn pin(&self) -> Result<()> {
        self.conn
            .execute_batch("BEGIN DEFERRED; SELECT count(*) FROM sqlite_schema;")
            .context(|| format!("starting a read transaction on {}", self.path.display()))
    }

    /// Take the write lock (the barrier), waiting up to the busy timeout for writers.
    pub fn lock_writes(&self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| {
            Error::new(
                ErrorKind::Transient,
                format!(
                    "taking the write lock on {} (is a long transaction running?): {e}",
                    self.path.display()
                ),
            )
        })
    }

    /// Whether a read transaction (the pin) or the barrier is open on this connection.
    pub fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }

    /// Set the busy timeout back to walsync's usual one after changing it for one call.
    pub fn restore_busy_timeout(&self) -> Result<()> {
        Ok(self.conn.busy_timeout(BUSY_TIMEOUT)?)
    }

    /// End the pin or the barrier (nothing was written, so this is a rollback).
    pub fn release(&self) -> Result<()> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }
}

/// Refuse a path that is missing or a directory, with a message a person understands.
///
/// This looks only with `stat`. It must never open and close the database file itself:
/// POSIX drops *all* of a process's locks on a file when *any* descriptor of it is closed,
/// so a stray `File::open` + `close` would silently release the locks of every SQLite
/// connection to it in this process (walsync's pin, or an embedding application's), and
/// another process could then checkpoint and delete the WAL under us. Whether the file is
/// a database is left to SQLite (see [`Database::open`]).
fn check_is_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::invalid(format!(
            "{} is a directory, not a database",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::not_found(format!(
            "database {} does not exist",
            path.display()
        ))),
        Err(e) => Err(Error::from(e).with_context(format!("database {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_non_sqlite_and_rollback_journal_databases() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Database::open(&dir.path().join("nope.db")).err().unwrap();
        assert!(missing.to_string().contains("does not exist"), "{missing}");

        let text = dir.path().join("text.db");
        std::fs::write(&text, "hello, this is not a database at all").unwrap();
        let err = Database::open(&text).err().unwrap();
        assert!(err.to_string().contains("not a SQLite database"), "{err}");

        let rollback = dir.path().join("rollback.db");
        let c = Connection::open(&rollback).unwrap();
        c.execute_batch("CREATE TABLE t(x)").unwrap();
        drop(c);
        let err = Database::open(&rollback).err().unwrap();
        assert!(err.to_string().contains("journal_mode=WAL"), "{err}");
    }

    #[test]
    fn a_pin_survives_another_process_closing_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x);")
            .unwrap();
        drop(app);
        // Two connections, as a replica has: opening the second must not disturb the
        // first one's locks (see `check_is_file`).
        let control = Database::open(&path).unwrap();
        let db = control.reopen().unwrap();
        db.pin().unwrap();
        // sqlite3 in another process: it checkpoints and deletes the WAL on close when it
        // believes it is the last connection. The pin must stop it.
        let status = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg("INSERT INTO t VALUES (1);")
            .status()
            .unwrap();
        assert!(status.success());
        let wal = dir.path().join("app.db-wal");
        assert!(wal.exists(), "the WAL was deleted under a pinned reader");
        assert!(std::fs::metadata(&wal).unwrap().len() > 32);
    }

    #[test]
    fn closing_walsync_connection_keeps_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
            .unwrap();
        let db = Database::open(&path).unwrap();
        drop(app);
        drop(db);
        let wal_len = std::fs::metadata(dir.path().join("app.db-wal"))
            .unwrap()
            .len();
        assert!(wal_len > 32, "the WAL was checkpointed away on close");
    }
}
