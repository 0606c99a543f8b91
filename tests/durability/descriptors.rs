//! A descriptor limit that leaves SQLite's wal-index read-only (found starting 4,000
//! databases under a 20,000-descriptor limit). When opening the `-shm` file for writing
//! fails (EMFILE), SQLite's unix VFS opens it read-only instead, and the wal-index it maps
//! then serves every connection of this process to that database until the last one closes:
//! none of them can checkpoint or take the write lock ("attempt to write a readonly
//! database"), so the WAL grew for good and the error repeated forever. walsync must notice
//! at open, say so once, and open the database again; a database that is read-only to walsync
//! (its file, or its `-shm` file) opens as before.
//!
//! The descriptor limit is played by SQLite's own fault injection: the unix VFS's `open` is
//! replaced (`xSetSystemCall`) by one that fails the opens a test arms, for one path each
//! (unique to the test), and passes every other open of the test binary through.

use std::ffi::{c_char, c_int, CStr, CString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::ffi;

use super::{assert_restored, restore_dump};
use crate::common::fixtures::{dump, wait_for, AppDb, Immutable};
use crate::common::logs;
use crate::common::root::needs_root;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::{Options, Replica, Replicator};
use walsync_testkit::s3server::S3Server;

/// `open(2)` as SQLite's unix VFS calls it.
type OpenFn = unsafe extern "C" fn(*const c_char, c_int, c_int) -> c_int;

/// The `open` the unix VFS had before [`failing_open`] replaced it.
static SQLITE_OPEN: OnceLock<OpenFn> = OnceLock::new();

/// The opens tests arm to fail.
static FAILURES: Mutex<Vec<Failure>> = Mutex::new(Vec::new());

/// Fail this many more opens for writing (`O_RDWR`) of `path` with `errno`.
struct Failure {
    path: CString,
    errno: c_int,
    left: usize,
    fired: usize,
}

/// Fails the opens armed in [`FAILURES`]; every other open goes to SQLite's own.
///
/// # Safety
///
/// Called by SQLite as `open(2)`: `path` is a NUL-terminated string.
unsafe extern "C" fn failing_open(path: *const c_char, flags: c_int, mode: c_int) -> c_int {
    if flags & libc::O_ACCMODE == libc::O_RDWR && !path.is_null() {
        let name = CStr::from_ptr(path);
        let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(failure) = failures
            .iter_mut()
            .find(|f| f.left > 0 && f.path.as_c_str() == name)
        {
            failure.left -= 1;
            failure.fired += 1;
            *libc::__errno_location() = failure.errno;
            return -1;
        }
    }
    match SQLITE_OPEN.get() {
        Some(open) => open(path, flags, mode),
        None => -1,
    }
}

/// Opens of one path armed to fail, until dropped.
struct Armed(CString);

impl Armed {
    /// Fail the next `times` opens of `path` for writing with `errno`.
    fn fail(path: &Path, errno: c_int, times: usize) -> Armed {
        install();
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        FAILURES.lock().unwrap().push(Failure {
            path: path.clone(),
            errno,
            left: times,
            fired: 0,
        });
        Armed(path)
    }

    /// How many opens failed so far.
    fn fired(&self) -> usize {
        let failures = FAILURES.lock().unwrap();
        failures
            .iter()
            .find(|f| f.path == self.0)
            .map_or(0, |f| f.fired)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
        failures.retain(|f| f.path != self.0);
    }
}

/// Put [`failing_open`] in place of the unix VFS's `open`, once for the whole test binary:
/// every test's opens go through it from then on, and only the paths a test armed fail.
fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sqlite3_vfs_find returns SQLite's registered unix VFS (or null, refused
        // below), whose xGetSystemCall and xSetSystemCall are its documented fault-injection
        // interface; "open" is one of its system calls, of type `OpenFn` (posixOpen in
        // sqlite3.c), so the casts between it and `sqlite3_syscall_ptr` keep its type.
        // SQLite's own `open` is stored before the replacement is set, so the replacement
        // always has one to call. Other test threads may be opening files meanwhile: they
        // read the pointer that this one word-sized store replaces, before or after it.
        unsafe {
            let vfs = ffi::sqlite3_vfs_find(c"unix".as_ptr());
            assert!(!vfs.is_null(), "no unix VFS");
            let get = (*vfs).xGetSystemCall.expect("xGetSystemCall");
            let set = (*vfs).xSetSystemCall.expect("xSetSystemCall");
            let original = get(vfs, c"open".as_ptr()).expect("the unix VFS's open");
            let _ = SQLITE_OPEN.set(std::mem::transmute::<unsafe extern "C" fn(), OpenFn>(
                original,
            ));
            let replacement = std::mem::transmute::<OpenFn, unsafe extern "C" fn()>(failing_open);
            assert_eq!(
                set(vfs, c"open".as_ptr(), Some(replacement)),
                ffi::SQLITE_OK
            );
        }
    });
}

/// The application, in a process of its own as in production: it keeps one connection open
/// (its `-shm` mapped and locked by another process than walsync's), with automatic
/// checkpoints off, so that only walsync's checkpoints copy the WAL into the database file.
/// It runs each line it is sent as one statement, to its end (no read transaction is left
/// open), and answers with the first column of the first row.
struct Application {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

const APPLICATION: &str = r#"
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint=0")
while True:
    line = sys.stdin.readline()
    if not line:
        break
    rows = conn.execute(line).fetchall()
    sys.stdout.write((str(rows[0][0]) if rows else "") + "\n")
    sys.stdout.flush()
"#;

impl Application {
    fn start(db: &Path) -> Application {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(APPLICATION)
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running python3");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        let mut app = Application {
            child,
            input,
            output,
        };
        app.run("SELECT count(*) FROM items");
        app
    }

    fn run(&mut self, sql: &str) -> String {
        writeln!(self.input, "{sql}").unwrap();
        self.input.flush().unwrap();
        let mut line = String::new();
        self.output.read_line(&mut line).unwrap();
        assert!(
            line.ends_with('\n'),
            "the application ended on {sql:?} (its error is above)"
        );
        line.trim_end().to_string()
    }

    /// Commit `rows` rows of 2,000 random bytes in one transaction.
    fn insert(&mut self, rows: u32) {
        self.run(&format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}) \
             INSERT INTO items(label, body) SELECT 'row ' || i, randomblob(2000) FROM s"
        ));
    }

    /// Whether the database file holds every page: someone (walsync, the application's
    /// checkpoints being off) copied the whole WAL into it.
    fn checkpointed(&mut self, db: &Path) -> bool {
        let bytes: u64 = self
            .run(
                "SELECT (SELECT page_count FROM pragma_page_count()) \
                      * (SELECT page_size FROM pragma_page_size())",
            )
            .parse()
            .unwrap();
        std::fs::metadata(db).map_or(0, |m| m.len()) >= bytes
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database of its own in a fresh directory (its real path: SQLite names the `-shm` from
/// it), created and closed in this process, so that the wal-index this process maps next is
/// walsync's.
fn database() -> (tempfile::TempDir, PathBuf) {
    // Under the target directory, whose filesystem supports `chattr` (see `Immutable`).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let db = std::fs::canonicalize(dir.path()).unwrap().join("app.db");
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    drop(app);
    (dir, db)
}

fn shm(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", db.display()))
}

/// The log lines (warnings and errors, of every test so far) that contain `text`.
fn logged(text: &str) -> Vec<String> {
    let lines = logs::warnings()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    lines.iter().filter(|l| l.contains(text)).cloned().collect()
}

/// The finding: walsync restarts on a database it replicated before, and the open of its
/// `-shm` for writing fails once (a descriptor limit). walsync must say so once, open the
/// database again, and go on checkpointing: the WAL is copied into the database file, the
/// stop settles, and a restore holds every commit. (Before, every checkpoint failed with
/// "checkpoint: attempt to write a readonly database", every few seconds for as long as
/// walsync ran, and the stop could not settle.)
#[test]
fn a_wal_index_left_read_only_by_a_descriptor_limit_is_opened_again_and_checkpointed() {
    logs::init();
    let name = "wal-index-left-read-only";
    let server = S3Server::start();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("read-only-wal-index"));
    let (dir, db) = database();
    let mut app = Application::start(&db);
    let options = || Options {
        min_interval: Duration::from_millis(20),
        passive_checkpoint_frames: 10,
        ..Options::default()
    };
    let start = || {
        Replicator::start(
            Arc::clone(&storage),
            &[(db.clone(), name.to_string())],
            options(),
        )
        .unwrap()
    };

    // A first run: a generation, settled at stop.
    let replicator = start();
    app.insert(20);
    replicator.sync(name).unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    // The restart, under a descriptor limit that refuses the `-shm` once.
    let armed = Armed::fail(&shm(&db), libc::EMFILE, 1);
    let replicator = start();
    assert_eq!(
        armed.fired(),
        1,
        "walsync's open of the -shm was not refused"
    );
    drop(armed);
    for _ in 0..3 {
        app.insert(20);
        replicator.sync(name).unwrap();
    }
    // Generous: a checkpoint that falls within `min_interval` of the one before it waits
    // for the thread's next wake, at worst its 10 s safety re-check.
    wait_for(
        Duration::from_secs(60),
        "walsync's checkpoint to copy the WAL into the database file",
        || app.checkpointed(&db),
    );
    app.insert(20); // into the WAL walsync's checkpoint let restart
    replicator.sync(name).unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    let expected = dump(&db);
    assert_restored(
        restore_dump(storage.as_ref(), name, dir.path(), None),
        &expected,
        "the restore after the read-only wal-index",
    );
    let said = logged(&db.display().to_string());
    assert_eq!(said.len(), 1, "said once, naming the database: {said:?}");
    assert!(said[0].contains("read-only"), "{said:?}");
    let failed: Vec<String> = logged(name)
        .into_iter()
        .filter(|l| l.contains("readonly"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// A wal-index that opens read-only again at once (the limit still reached) keeps the
/// database out as any open a descriptor limit refuses: an error naming it, and the next
/// try (walsync's threads and directory scans try again) opens it for writing. Here no other
/// process has the database open, the other way SQLite maps a read-only wal-index
/// (SQLITE_READONLY_CANTINIT: heap memory, nothing shared).
#[test]
fn a_wal_index_read_only_again_at_once_is_refused_then_opened_on_the_next_try() {
    logs::init();
    let (dir, db) = database();
    // SQLite deleted the `-shm` when the last connection closed: a read-only open needs one.
    std::fs::write(shm(&db), b"").unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let armed = Armed::fail(&shm(&db), libc::EMFILE, 2);
    let refused = Replica::open(&db, Arc::clone(&storage), "app")
        .err()
        .unwrap();
    assert_eq!(armed.fired(), 2);
    let text = refused.to_string();
    assert!(
        text.contains(&db.display().to_string()) && text.contains("read-only"),
        "{text}"
    );
    drop(armed);

    let mut replica = Replica::open(&db, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap(); // the first generation: takes the write lock
    let app = rusqlite::Connection::open(&db).unwrap();
    app.execute_batch("INSERT INTO items(label) VALUES ('after');")
        .unwrap();
    replica.sync().unwrap();
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &dump(&db),
        "the restore after the refused open",
    );
}

/// A database walsync can only read (the file's permissions: here its opens for writing and
/// its `-shm`'s are refused) is not taken for one a descriptor limit left read-only: it
/// opens and is replicated as before.
#[test]
fn a_database_walsync_can_only_read_opens_and_is_replicated_as_before() {
    logs::init();
    let (dir, db) = database();
    let mut app = Application::start(&db);
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let database = Armed::fail(&db, libc::EACCES, usize::MAX);
    let wal_index = Armed::fail(&shm(&db), libc::EACCES, usize::MAX);
    let mut replica = Replica::open(&db, Arc::clone(&storage), "app").unwrap();
    assert!(database.fired() > 0 && wal_index.fired() > 0);
    replica.sync().unwrap();
    app.insert(3);
    replica.sync().unwrap();
    drop(replica);
    drop((database, wal_index));
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &dump(&db),
        "the restore of a database walsync can only read",
    );
}

/// A `-shm` walsync may not write although the database file is writable (root: `chattr +i`
/// on it) is not a descriptor limit either: trying again would not help, so the database
/// opens as before.
#[test]
fn an_unwritable_wal_index_file_is_not_taken_for_a_descriptor_limit() {
    needs_root!("chattr +i on the -shm file");
    let (dir, db) = database();
    std::fs::write(shm(&db), b"").unwrap();
    let _guard = Immutable::new(&shm(&db));
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    Replica::open(&db, storage, "app").unwrap();
}
