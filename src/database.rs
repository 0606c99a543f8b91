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
//!
//! Nor does walsync keep a connection that could never checkpoint on a database it may
//! write: when opening the `-shm` file for writing fails (a descriptor limit), SQLite maps
//! the wal-index read-only instead, for every connection of the process to that database
//! until the last one closes. [`Database::open`] looks, and opens the database again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{Context, Error, ErrorKind, Result};

mod placement;
pub use placement::keep_shared_maps_apart;

/// How long walsync waits for the application's locks before giving up on an operation.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often walsync asks for the write lock while the application holds it. SQLite's own
/// busy handler sleeps 1, 2, 5, 10, then up to 100 ms between tries: against an application
/// that commits back to back the lock is free only for moments between its transactions,
/// and walsync waited 1.6 s for it (measured, 60 MiB in 10-row transactions on disk), while
/// 9,225 frames were committed that it then had to read under the lock (held 266 ms).
const BARRIER_RETRY: Duration = Duration::from_micros(250);

/// The busy handler of [`Database::lock_writes`]: try again after [`BARRIER_RETRY`], for
/// about [`BUSY_TIMEOUT`] in all.
fn barrier_busy(tries: i32) -> bool {
    let most = (BUSY_TIMEOUT.as_micros() / BARRIER_RETRY.as_micros()) as i32;
    if tries >= most {
        return false;
    }
    std::thread::sleep(BARRIER_RETRY);
    true
}

/// What a checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Not attempted: no generation yet, continuity lost, or staging full.
    Skipped,
    /// Some frames are still needed by a reader of an older snapshot; try again later.
    Partial,
    /// Every frame is in the database file; the next writer restarts the WAL.
    Complete,
}

/// An open connection to a replicated database.
pub struct Database {
    path: PathBuf,
    conn: Connection,
    /// Closed by [`Database::close_in_place`] and not opened again: `conn` is then an
    /// empty in-memory connection that nothing may use.
    closed: bool,
}

impl Database {
    /// Open an existing SQLite database in WAL mode, or explain clearly why not.
    ///
    /// A connection whose wal-index SQLite mapped read-only, on a database walsync may
    /// write, is closed and opened once more (see [`Database::wal_index_left_read_only`]):
    /// if that one's is read-only too, the open fails, as one that a descriptor limit
    /// refused does (walsync's database threads and directory scans try again later).
    pub fn open(path: &Path) -> Result<Database> {
        check_is_file(path)?;
        let db = Database::connect(path)?;
        let Some(shm) = db.wal_index_left_read_only() else {
            return Ok(db);
        };
        // Every connection of this process to the file shares one wal-index, which SQLite
        // keeps until the last of them closes: closing this one lets the next open try the
        // `-shm` for writing again, unless another connection of this process holds it.
        drop(db);
        let db = Database::connect(path)?;
        if db.wal_index_left_read_only().is_none() {
            log::warn!(
                "{}: SQLite opened its wal-index {} read-only (as when a descriptor limit \
                 refuses opening it for writing), with which walsync could never checkpoint \
                 the database: closed it and opened it again, for writing",
                path.display(),
                shm.display()
            );
            return Ok(db);
        }
        Err(Error::new(
            ErrorKind::Sqlite,
            format!(
                "opening database {}: SQLite opened its wal-index {} read-only, twice (as \
                 when a descriptor limit refuses opening it for writing{}), with which \
                 walsync could never checkpoint the database",
                path.display(),
                shm.display(),
                open_files_note().unwrap_or_default()
            ),
        ))
    }

    /// [`Database::open`] without looking at the wal-index.
    fn connect(path: &Path) -> Result<Database> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| {
            let limit = open_files_note().unwrap_or_default();
            Error::from(e).with_context(format!("opening database {}{limit}", path.display()))
        })?;
        let db = Database {
            path: path.to_path_buf(),
            conn,
            closed: false,
        };
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => {
                    Error::invalid(format!("{} is not a SQLite database", path.display()))
                }
                // SQLite opens the `-wal` and `-shm` files at the first read: a descriptor
                // limit shows here first, as "unable to open database file".
                _ => Error::from(e).with_context(format!(
                    "reading journal mode of {}{}",
                    path.display(),
                    open_files_note().unwrap_or_default()
                )),
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

    /// The `-shm` file of this connection's wal-index if SQLite mapped it read-only although
    /// the database file is open for writing and the `-shm` file is writable: then opening
    /// the `-shm` for writing failed for a moment, as under a descriptor limit (EMFILE),
    /// and SQLite's unix VFS opened it read-only instead (`unixOpenSharedMemory`).
    ///
    /// Why walsync cannot keep such a connection: no connection that shares that wal-index
    /// can checkpoint, or take the write lock ("attempt to write a readonly database"), and
    /// every connection of this process to the file shares it until the last one closes.
    /// The WAL would grow for good behind the pin. A database walsync can only read (its
    /// file, or its `-shm` file, not writable) is not this: it opens as it always did, and
    /// its checkpoints fail, for a reason that trying again would not mend.
    fn wal_index_left_read_only(&self) -> Option<PathBuf> {
        if self.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            return None;
        }
        // SAFETY: see shm_read_only.
        let shm = unsafe { shm_read_only(&self.conn) }?;
        let writable = {
            use std::os::unix::ffi::OsStrExt;
            std::ffi::CString::new(shm.as_os_str().as_bytes())
                // SAFETY: access(2) reads the NUL-terminated path we own, nothing else.
                .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
        };
        writable.then_some(shm)
    }

    /// A second connection to the same database with the same safe settings.
    pub fn reopen(&self) -> Result<Database> {
        Database::open(&self.path)
    }

    /// Close this connection; [`Database::open_again`] opens a new one on the same path
    /// with the same settings. Until then every use fails.
    ///
    /// What this is for: SQLite's unix VFS cannot close a descriptor of a file on which
    /// another connection of this process holds a lock (closing it would drop that
    /// connection's POSIX locks), so it keeps the descriptor open, unused, until the last
    /// connection to the file lets go. Closing a second connection while the pin holds its
    /// read lock therefore frees nothing; closing every connection and opening one again
    /// does. Between the two this process holds no lock on the database: see
    /// `Replica::rest` for why that is safe there.
    pub fn close_in_place(&mut self) -> Result<()> {
        let placeholder = Connection::open_in_memory()?;
        drop(std::mem::replace(&mut self.conn, placeholder));
        self.closed = true;
        Ok(())
    }

    /// Open the connection [`Database::close_in_place`] closed (nothing if it is open). If
    /// that fails it stays closed, and this can be called again.
    pub fn open_again(&mut self) -> Result<()> {
        if self.closed {
            self.conn = Database::open(&self.path)?.conn;
            self.closed = false;
        }
        Ok(())
    }

    fn refuse_if_closed(&self) -> Result<()> {
        if self.closed {
            return Err(Error::new(
                ErrorKind::Transient,
                format!(
                    "the connection to {} is closed: opening it again failed",
                    self.path.display()
                ),
            ));
        }
        Ok(())
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
        self.refuse_if_closed()?;
        Ok(self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?)
    }

    /// Give back the page cache's memory that nothing is using right now (pages stay valid
    /// on disk; a later read fetches them again), and the connection's parsed schema. Kept
    /// pages are what a hundred idle databases would otherwise hold, a few KiB each.
    ///
    /// The schema is what SQLite parsed from `sqlite_schema` when `PRAGMA journal_mode` or
    /// the pin's `SELECT` first needed it: every table, index, trigger and view of the
    /// application's database, kept for as long as the connection lives although walsync
    /// compiles no statement that uses it. Its size follows the application's schema (about
    /// 1.5 KiB for one table, tens of KiB for a few dozen tables with their indexes).
    /// `PRAGMA writable_schema = RESET` frees it (and leaves `writable_schema` off, as
    /// walsync always has it); the next statement that needs it parses it again, within the
    /// pin's read transaction if one is open, so it sees the schema of the pinned snapshot.
    /// Neither the read transaction nor its locks are touched.
    pub fn release_memory(&self) {
        if self.closed {
            return;
        }
        // Neither fails but on a connection unable to run anything, whose memory is then
        // no concern of an idle database's.
        let _ = self.conn.release_memory();
        let _ = self.conn.execute_batch("PRAGMA writable_schema = RESET");
    }

    /// Drop this process's page-table entries for the database's wal-index (`-shm`), so an
    /// idle database stops counting 32 KiB towards walsync's resident memory.
    ///
    /// SQLite's unix VFS maps the `-shm` file `MAP_SHARED` in regions of 32 KiB, and the
    /// kernel answers a read fault on a file mapping by also mapping the pages around it that
    /// are already in the page cache ("fault-around"): a pinned database that read just the
    /// wal-index header shows its whole first region as resident. With a thousand idle
    /// databases that was 31 MiB of walsync's RSS. The pages belong to the page cache, shared
    /// with the application; `MADV_DONTNEED` on a shared file mapping only unmaps them from
    /// this process, and the next access maps the same up-to-date pages again (madvise(2)),
    /// so nothing SQLite keeps there is lost. The pin holds regardless: its locks are `fcntl`
    /// locks on the file and its read mark lives in the file's pages.
    ///
    /// Done only for the `unix` VFS, whose wal-index is always such a mapping (`unix-excl`
    /// and exclusive locking mode keep it in heap memory, where `MADV_DONTNEED` would zero
    /// it), and where the system page size divides a region.
    pub fn forget_wal_index_pages(&self) {
        if self.closed {
            return;
        }
        #[cfg(target_os = "linux")]
        // SAFETY: see forget_wal_index_pages_linux.
        unsafe {
            forget_wal_index_pages_linux(&self.conn);
        }
    }

    /// Write the database file and the WAL to disk now, through SQLite's own descriptors
    /// (their `sqlite3_file`'s `xSync`; see [`Database::content_digest`] for why never one
    /// of walsync's). SQLite syncs the database file only when a checkpoint has copied every
    /// frame, so all that walsync's checkpoints copied outside the barrier was written by the
    /// complete one under it, while the application waited for its write lock: with a
    /// writer producing 100 MB of WAL a second, 13-63 ms a time. Done first, that fsync
    /// has only the last moment's pages left to write.
    pub fn sync_files(&self) -> Result<()> {
        self.refuse_if_closed()?;
        let what = || format!("syncing {} and its WAL", self.path.display());
        for file in [
            rusqlite::ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            rusqlite::ffi::SQLITE_FCNTL_FILE_POINTER,
        ] {
            // SAFETY: see sync_file.
            unsafe { sync_file(&self.conn, file) }.map_err(|e| e.with_context(what()))?;
        }
        Ok(())
    }

    /// The SQLite connection; an error if it is closed (see [`Database::close_in_place`]).
    pub fn connection(&self) -> Result<&Connection> {
        self.refuse_if_closed()?;
        Ok(&self.conn)
    }

    /// The SHA-256 of the database file's content, in lowercase hex: what proves that it did
    /// not change while walsync was stopped (see `Replica::settle`), where its size and
    /// modification time cannot: on a filesystem whose timestamps are whole seconds (ext4
    /// with 128-byte inodes, ext3, HFS+, FAT, NFS on those) a write in the same second
    /// leaves both as they were.
    ///
    /// Read through SQLite's own descriptor of the file (its `sqlite3_file`'s `xRead`), never
    /// a descriptor of walsync's: closing one would drop this process's POSIX locks on the
    /// file (see [`check_is_file`]), and the pin's shared lock with them.
    pub fn content_digest(&self) -> Result<String> {
        self.refuse_if_closed()?;
        let what = || format!("reading {} to prove it unchanged", self.path.display());
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: see read_main_file.
        unsafe { read_main_file(&self.conn, &mut buf, |chunk| context.update(chunk)) }
            .map_err(|e| e.with_context(what()))?;
        Ok(context
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Start a read transaction that pins the WAL (see the module docs).
    pub fn pin(&self) -> Result<()> {
        self.refuse_if_closed()?;
        self.conn
            .execute_batch("BEGIN DEFERRED; SELECT count(*) FROM sqlite_schema;")
            .context(|| format!("starting a read transaction on {}", self.path.display()))
    }

    /// Take the write lock (the barrier), waiting about the busy timeout for writers,
    /// asking every [`BARRIER_RETRY`] (see there).
    pub fn lock_writes(&mut self) -> Result<()> {
        self.refuse_if_closed()?;
        self.conn.busy_handler(Some(barrier_busy))?;
        let locked = self.conn.execute_batch("BEGIN IMMEDIATE");
        self.restore_busy_timeout()?;
        locked.map_err(|e| {
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

/// " (too many open files: RLIMIT_NOFILE soft limit N)" when this process is near its limit
/// on open files: SQLite reports only that it could not open a file.
fn open_files_note() -> Option<String> {
    crate::limits::open_files_limit()
        .filter(|_| crate::limits::near_open_files_limit())
        .map(|n| format!(" (too many open files: RLIMIT_NOFILE soft limit {n})"))
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

/// The `sqlite3_file` SQLite has open for `conn`, that `pointer` names
/// (`SQLITE_FCNTL_FILE_POINTER`: the main database; `SQLITE_FCNTL_JOURNAL_POINTER`: the
/// WAL), with its methods; or the SQLite result code when there is none (a file the
/// connection has not opened yet).
///
/// # Safety
///
/// `conn` must be used by the calling thread only (walsync's connections are). Both file
/// controls hand out an `sqlite3_file` of the connection's, valid while it is open and
/// until the next call into SQLite on this connection that may close it.
unsafe fn open_file(
    conn: &Connection,
    pointer: std::ffi::c_int,
) -> std::result::Result<
    (
        *mut rusqlite::ffi::sqlite3_file,
        &rusqlite::ffi::sqlite3_io_methods,
    ),
    std::ffi::c_int,
> {
    use rusqlite::ffi;

    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    let rc = ffi::sqlite3_file_control(
        conn.handle(),
        c"main".as_ptr(),
        pointer,
        (&raw mut file).cast::<std::ffi::c_void>(),
    );
    if rc != ffi::SQLITE_OK || file.is_null() || (*file).pMethods.is_null() {
        return Err(rc);
    }
    Ok((file, &*(*file).pMethods))
}

/// Hand the whole main database file of `conn` to `each`, a buffer at a time, read with
/// the `xRead` of the `sqlite3_file` SQLite has open for it.
///
/// # Safety
///
/// `conn` must be used by the calling thread only (walsync's connections are).
/// `SQLITE_FCNTL_FILE_POINTER` hands out the open `sqlite3_file` of the main database,
/// valid while the connection is open; `xFileSize` and `xRead` are its public methods,
/// given a buffer we own and a length that fits it.
unsafe fn read_main_file(
    conn: &Connection,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> Result<()> {
    use rusqlite::ffi;
    use std::ffi::c_int;

    let (file, methods) = open_file(conn, ffi::SQLITE_FCNTL_FILE_POINTER).map_err(|rc| {
        Error::new(
            ErrorKind::Other,
            format!("no open file (SQLite error {rc})"),
        )
    })?;
    let (Some(file_size), Some(read)) = (methods.xFileSize, methods.xRead) else {
        return Err(Error::new(ErrorKind::Other, "the VFS cannot read the file"));
    };
    let mut size: ffi::sqlite3_int64 = 0;
    let rc = file_size(file, &raw mut size);
    if rc != ffi::SQLITE_OK {
        return Err(Error::new(
            ErrorKind::Other,
            format!("file size: SQLite error {rc}"),
        ));
    }
    let mut offset: i64 = 0;
    while offset < size {
        let n = usize::try_from(size - offset).map_or(buf.len(), |left| left.min(buf.len()));
        let rc = read(file, buf.as_mut_ptr().cast(), n as c_int, offset);
        if rc != ffi::SQLITE_OK {
            // Including SQLITE_IOERR_SHORT_READ: the file shrank while it was read.
            return Err(Error::new(
                ErrorKind::Other,
                format!("read: SQLite error {rc}"),
            ));
        }
        each(&buf[..n]);
        offset += n as i64;
    }
    Ok(())
}

/// Sync the file that `pointer` (`SQLITE_FCNTL_FILE_POINTER`: the main database;
/// `SQLITE_FCNTL_JOURNAL_POINTER`: the WAL) names, with its `sqlite3_file`'s `xSync`. A file
/// the connection has not opened (no WAL read yet) is skipped.
///
/// # Safety
///
/// `conn` must be used by the calling thread only (walsync's connections are). Both file
/// controls hand out an `sqlite3_file` of the connection's, valid while it is open, and
/// `xSync` is its public method.
unsafe fn sync_file(conn: &Connection, pointer: std::ffi::c_int) -> Result<()> {
    use rusqlite::ffi;

    let Ok((file, methods)) = open_file(conn, pointer) else {
        return Ok(());
    };
    let Some(sync) = methods.xSync else {
        return Ok(());
    };
    match sync(file, ffi::SQLITE_SYNC_NORMAL) {
        ffi::SQLITE_OK => Ok(()),
        rc => Err(Error::new(
            ErrorKind::Other,
            format!("fsync: SQLite error {rc}"),
        )),
    }
}

/// Size of a wal-index region as SQLite maps it (`WALINDEX_PGSZ` in SQLite's wal.c).
const WAL_INDEX_REGION: usize = 32 * 1024;

/// The path of the `-shm` file behind `conn`'s wal-index (named from the database's path as
/// SQLite resolved it), if SQLite maps that read-only: its `xShmMap` then answers
/// SQLITE_READONLY, or SQLITE_READONLY_CANTINIT when no connection anywhere holds the
/// `-shm` open for writing (SQLite then reads the WAL into heap memory instead). It
/// answers so for every connection of the process to the file, for as long as that
/// wal-index lives (see `unixShmMap` in sqlite3.c). None also when it cannot be asked.
///
/// # Safety
///
/// `conn` must be used by the calling thread only (walsync's connections are). The calls are
/// SQLite's public file-control and VFS interfaces: `SQLITE_FCNTL_FILE_POINTER` hands out
/// the open `sqlite3_file` of the main database, valid while the connection is open, and
/// its `xShmMap` with `bExtend` = 0 returns the first region of the wal-index, mapping it
/// if the connection has not yet (as SQLite itself would on its next read), never
/// extending the file. `sqlite3_db_filename` returns a string the connection owns, copied
/// at once.
unsafe fn shm_read_only(conn: &Connection) -> Option<PathBuf> {
    use rusqlite::ffi;
    use std::ffi::{c_int, c_void, CStr};
    use std::os::unix::ffi::OsStrExt;

    let db = conn.handle();
    let (file, methods) = open_file(conn, ffi::SQLITE_FCNTL_FILE_POINTER).ok()?;
    let shm_map = methods.xShmMap.filter(|_| methods.iVersion >= 2)?;
    let mut mapped: *mut c_void = std::ptr::null_mut();
    let rc = shm_map(
        file,
        0,
        WAL_INDEX_REGION as c_int,
        0,
        (&raw mut mapped).cast(),
    );
    if rc & 0xff != ffi::SQLITE_READONLY {
        return None;
    }
    let name = ffi::sqlite3_db_filename(db, c"main".as_ptr());
    if name.is_null() {
        return None;
    }
    let mut shm = CStr::from_ptr(name).to_bytes().to_vec();
    shm.extend_from_slice(b"-shm");
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&shm)))
}

/// Regions looked at: 2 MiB of wal-index, enough for a WAL of 260,000 frames.
#[cfg(target_os = "linux")]
const WAL_INDEX_MAX_REGIONS: i32 = 64;

/// # Safety
///
/// `conn` must be used by the calling thread only (walsync's connections are). The calls are
/// SQLite's public file-control and VFS interfaces: `SQLITE_FCNTL_FILE_POINTER` hands out
/// the open `sqlite3_file` of the main database, and its `xShmMap` with `bExtend` = 0
/// returns a region that is already mapped (or maps one that exists in the file, as SQLite
/// itself would on its next read), never extending the file. `madvise` is given whole
/// pages inside such a region.
#[cfg(target_os = "linux")]
unsafe fn forget_wal_index_pages_linux(conn: &Connection) {
    use rusqlite::ffi;
    use std::ffi::{c_int, c_void, CStr};

    let page = libc::sysconf(libc::_SC_PAGESIZE);
    if page <= 0 || !WAL_INDEX_REGION.is_multiple_of(page as usize) {
        return;
    }
    let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
    if vfs.is_null() || (*vfs).zName.is_null() || CStr::from_ptr((*vfs).zName) != c"unix" {
        return;
    }
    let Ok((file, methods)) = open_file(conn, ffi::SQLITE_FCNTL_FILE_POINTER) else {
        return;
    };
    let Some(shm_map) = methods.xShmMap.filter(|_| methods.iVersion >= 2) else {
        return;
    };
    for region in 0..WAL_INDEX_MAX_REGIONS {
        let mut mapped: *mut c_void = std::ptr::null_mut();
        let rc = shm_map(
            file,
            region,
            WAL_INDEX_REGION as c_int,
            0,
            (&raw mut mapped).cast(),
        );
        if (rc != ffi::SQLITE_OK && rc != ffi::SQLITE_READONLY) || mapped.is_null() {
            return;
        }
        libc::madvise(mapped, WAL_INDEX_REGION, libc::MADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is SHA-256 of the file, sees a same-size rewrite, and is read without a
    /// descriptor of walsync's own: the pin's shared lock on the database file holds
    /// afterwards, as another process trying to lock that range finds.
    #[test]
    fn the_content_digest_is_the_files_and_keeps_the_pins_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(app);
        // Read before the pin: a read of our own after it would drop its lock.
        let bytes = std::fs::read(&path).unwrap();
        let db = Database::open(&path).unwrap();
        db.pin().unwrap();
        let expected: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(db.content_digest().unwrap(), expected);
        // SQLite's shared lock: a read lock on 510 bytes after the pending and reserved bytes.
        let exclusive = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import fcntl, os, sys\n\
                 fd = os.open(sys.argv[1], os.O_RDWR)\n\
                 fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002, 0)",
            )
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            !exclusive.status.success(),
            "another process took the shared range exclusively: the pin's lock was dropped"
        );
    }

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

    /// Bytes of parsed schema `db` keeps (`SQLITE_DBSTATUS_SCHEMA_USED`).
    fn schema_bytes(db: &Database) -> i32 {
        let (mut current, mut highest) = (0, 0);
        // SAFETY: a live connection used by this thread only, and two out-parameters.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_db_status(
                db.conn.handle(),
                rusqlite::ffi::SQLITE_DBSTATUS_SCHEMA_USED,
                &mut current,
                &mut highest,
                0,
            )
        };
        assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
        current
    }

    /// The application commits a row to `t` and runs a TRUNCATE checkpoint while `db` holds
    /// its pin: the WAL must grow (the pin kept it from restarting). Returns the rows `db`'s
    /// pinned snapshot still reads (the caller knows how many it held).
    fn commit_and_truncate_under_the_pin(app: &Connection, db: &Database) -> i64 {
        let wal_size = std::fs::metadata(db.wal_path()).unwrap().len();
        app.execute_batch("INSERT INTO t VALUES (2); PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        assert!(std::fs::metadata(db.wal_path()).unwrap().len() > wal_size);
        db.conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// Releasing memory frees the parsed schema, also under the pin, and the pin holds: a
    /// commit and a TRUNCATE checkpoint of the application's cannot restart the WAL, the
    /// pinned snapshot still reads as before (parsing the schema again), and once released
    /// the connection sees the new commit.
    #[test]
    fn releasing_memory_frees_the_schema_and_keeps_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); CREATE INDEX tx ON t(x);
             CREATE TABLE u(a PRIMARY KEY, b, c) WITHOUT ROWID; INSERT INTO t VALUES (1);",
        )
        .unwrap();
        let db = Database::open(&path).unwrap();
        db.pin().unwrap();
        assert!(schema_bytes(&db) > 0, "the pin parsed the schema");
        db.release_memory();
        assert_eq!(schema_bytes(&db), 0);
        assert!(db.in_transaction(), "still pinned");

        assert_eq!(commit_and_truncate_under_the_pin(&app, &db), 1);
        db.release().unwrap();
        let now: i64 = db
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(now, 2);
    }

    /// Resident KiB of this process's mappings of `path` (from /proc/self/smaps).
    #[cfg(target_os = "linux")]
    fn resident_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_str().unwrap();
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                inside = line.ends_with(name);
            } else if inside && first == "Rss:" {
                kib += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib
    }

    /// The wal-index stops counting as resident, and nothing SQLite keeps there is lost:
    /// the pin still holds the WAL, the application keeps committing through it, and every
    /// connection reads what was committed.
    #[cfg(target_os = "linux")]
    #[test]
    fn forgetting_the_wal_index_pages_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let shm = crate::files::with_suffix(&path, "-shm");
        let app = Connection::open(&path).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x);
             WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 100)
             INSERT INTO t SELECT randomblob(500) FROM c;",
        )
        .unwrap();
        let db = Database::open(&path).unwrap();
        db.pin().unwrap();
        assert!(
            resident_kib(&shm) > 0,
            "the wal-index is mapped and resident"
        );
        db.forget_wal_index_pages();
        assert_eq!(resident_kib(&shm), 0);

        // The pin still holds: a checkpoint cannot restart the WAL past it.
        assert_eq!(commit_and_truncate_under_the_pin(&app, &db), 100);

        db.forget_wal_index_pages();
        db.release().unwrap();
        let now: i64 = db
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(now, 101);
        let other = Connection::open(&path).unwrap();
        let seen: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 101);
        let ok: String = other
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}
