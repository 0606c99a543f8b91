//! Tests of the watcher: events from each backend, directory watches, and the polling
//! fallback (in `mod.rs`, beside the code, would make it a file of over 800 lines).

use super::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Instant;

const POLL: Duration = Duration::from_millis(50);
/// How long to wait for a notification that should come.
pub(super) const EXPECT: Duration = Duration::from_secs(5);
/// How long to wait to be confident a notification will not come: several poll
/// intervals, and far longer than inotify needs.
const QUIET: Duration = Duration::from_millis(400);

pub(super) fn start(mode: WatchMode) -> Watcher {
    let watcher = Watcher::start(mode, POLL).unwrap();
    match mode {
        WatchMode::Poll => assert_eq!(watcher.backend(), "poll"),
        WatchMode::Auto => {
            if cfg!(target_os = "linux") {
                assert_eq!(watcher.backend(), "inotify");
            }
        }
    }
    watcher
}

/// A callback that sends on a channel, and the receiving end.
pub(super) fn channel() -> (Box<dyn Fn() + Send>, Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    (
        Box::new(move || {
            let _ = tx.send(());
        }),
        rx,
    )
}

fn watch(watcher: &Watcher, db: &Path) -> Receiver<()> {
    let (notify, rx) = channel();
    watcher.watch(db, notify).unwrap();
    rx
}

#[track_caller]
pub(super) fn expect_notified(rx: &Receiver<()>, what: &str) {
    if let Err(err) = rx.recv_timeout(EXPECT) {
        panic!("no notification within {EXPECT:?} after {what}: {err:?}");
    }
    // Let the rest of the same change arrive, so the next step starts from quiet.
    settle(rx);
}

#[track_caller]
pub(super) fn expect_quiet(rx: &Receiver<()>, what: &str) {
    match rx.recv_timeout(QUIET) {
        // Disconnected: the callback (holding the sender) was dropped with the watcher, so
        // it cannot be called any more either.
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        other => panic!("unexpected notification after {what}: {other:?}"),
    }
}

/// Waits until no notification has arrived for a while.
fn settle(rx: &Receiver<()>) {
    while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

pub(super) fn wal_of(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// A directory with `app.db` (and optionally `app.db-wal`) in it.
pub(super) fn setup(with_wal: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    fs::write(&db, vec![0u8; 4096]).unwrap();
    if with_wal {
        fs::write(wal_of(&db), vec![0u8; 4096]).unwrap();
    }
    (dir, db)
}

fn wal_created(mode: WatchMode) {
    let (_dir, db) = setup(false);
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    expect_quiet(&rx, "watching");
    fs::write(wal_of(&db), b"frames").unwrap();
    expect_notified(&rx, "creating the WAL");
}

fn wal_appended(mode: WatchMode) {
    let (_dir, db) = setup(true);
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    expect_quiet(&rx, "watching");
    append(&wal_of(&db), b"more frames");
    expect_notified(&rx, "appending to the WAL");
    append(&wal_of(&db), b"and more");
    expect_notified(&rx, "appending to the WAL again");
}

fn wal_truncated(mode: WatchMode) {
    let (_dir, db) = setup(true);
    let wal = OpenOptions::new().write(true).open(wal_of(&db)).unwrap();
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    expect_quiet(&rx, "watching");
    wal.set_len(0).unwrap();
    expect_notified(&rx, "truncating the WAL");
}

fn wal_deleted(mode: WatchMode) {
    let (_dir, db) = setup(true);
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    expect_quiet(&rx, "watching");
    fs::remove_file(wal_of(&db)).unwrap();
    expect_notified(&rx, "deleting the WAL");
}

fn db_replaced_by_rename(mode: WatchMode) {
    let (dir, db) = setup(true);
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    // Same size as the old database, so only the identity of the file changes.
    let tmp = dir.path().join("app.db.tmp");
    fs::write(&tmp, vec![1u8; 4096]).unwrap();
    expect_quiet(&rx, "writing a temporary file beside the database");
    fs::rename(&tmp, &db).unwrap();
    expect_notified(&rx, "renaming a new database into place");
}

fn unrelated_files_ignored(mode: WatchMode) {
    let (dir, db) = setup(true);
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    append(&dir.path().join("other.db"), b"x");
    append(&dir.path().join("other.db-wal"), b"x");
    append(&dir.path().join("app.db-shm"), b"x");
    append(&dir.path().join("app.db-journal"), b"x");
    let sidecar = dir.path().join(".app.db-walsync");
    fs::create_dir(&sidecar).unwrap();
    append(&sidecar.join("state.json"), b"{}");
    fs::rename(sidecar.join("state.json"), sidecar.join("state2.json")).unwrap();
    fs::remove_file(dir.path().join("app.db-journal")).unwrap();
    expect_quiet(&rx, "writing unrelated files in the same directory");
    // And the watch is alive, so the quiet above meant something.
    append(&wal_of(&db), b"frames");
    expect_notified(&rx, "appending to the WAL");
}

fn two_databases_in_one_directory(mode: WatchMode) {
    let (dir, a) = setup(false);
    let b = dir.path().join("b.db");
    fs::write(&b, b"").unwrap();
    let watcher = start(mode);
    let rxa = watch(&watcher, &a);
    let rxb = watch(&watcher, &b);
    append(&wal_of(&a), b"a");
    expect_notified(&rxa, "writing a's WAL");
    expect_quiet(&rxb, "writing a's WAL");
    append(&wal_of(&b), b"b");
    expect_notified(&rxb, "writing b's WAL");
    expect_quiet(&rxa, "writing b's WAL");
    append(&b, b"b");
    expect_notified(&rxb, "writing b");
    expect_quiet(&rxa, "writing b");
}

fn same_database_watched_twice(mode: WatchMode) {
    let (_dir, db) = setup(true);
    let watcher = start(mode);
    let rx1 = watch(&watcher, &db);
    // A second registration of the same database shares the directory watch.
    let rx2 = watch(&watcher, &db);
    append(&wal_of(&db), b"1");
    expect_notified(&rx1, "appending (both watching)");
    expect_notified(&rx2, "appending (both watching)");
}

fn sqlite_commit(mode: WatchMode) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let journal: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    conn.execute_batch("CREATE TABLE t(x)").unwrap();
    let watcher = start(mode);
    let rx = watch(&watcher, &db);
    expect_quiet(&rx, "watching");
    conn.execute("INSERT INTO t VALUES (randomblob(100))", [])
        .unwrap();
    expect_notified(&rx, "an SQLite commit");
}

fn drop_is_prompt(mode: WatchMode) {
    // An interval far longer than the test tolerates: dropping must not wait for it.
    let watcher = Watcher::start(mode, Duration::from_secs(30)).unwrap();
    let (_dir, db) = setup(true);
    let _rx = watch(&watcher, &db);
    // Dropped on another thread, so a drop that hangs fails the test instead of hanging it.
    let (done_tx, done_rx) = mpsc::channel();
    let started = Instant::now();
    thread::spawn(move || {
        drop(watcher);
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(2)).is_ok(),
        "dropping the watcher took more than 2 s"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

macro_rules! for_both_modes {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[test]
            fn auto() {
                super::$scenario(WatchMode::Auto);
            }

            #[test]
            fn poll() {
                super::$scenario(WatchMode::Poll);
            }
        }
    )*};
}

for_both_modes!(
    wal_created,
    wal_appended,
    wal_truncated,
    wal_deleted,
    db_replaced_by_rename,
    unrelated_files_ignored,
    two_databases_in_one_directory,
    same_database_watched_twice,
    sqlite_commit,
    drop_is_prompt,
);

/// After `unwatch` the callback is gone (dropped: its channel disconnects) and another
/// database in the same directory, sharing the inotify watch, still hears its changes.
#[test]
fn unwatch_stops_one_registration_only() {
    for mode in [WatchMode::Auto, WatchMode::Poll] {
        let (dir, a) = setup(true);
        let b = dir.path().join("b.db");
        fs::write(&b, b"").unwrap();
        let watcher = start(mode);
        let (notify, rxa) = channel();
        let id = watcher.watch(&a, notify).unwrap();
        let rxb = watch(&watcher, &b);
        watcher.unwatch(id);
        assert_eq!(
            rxa.recv_timeout(QUIET),
            Err(RecvTimeoutError::Disconnected),
            "{mode:?}: the callback was not dropped"
        );
        append(&wal_of(&b), b"b");
        expect_notified(&rxb, "writing b's WAL after a's unwatch");
        watcher.unwatch(id); // twice: nothing
    }
}

/// A directory registration hears which names changed (inotify) or that something did.
#[test]
fn directory_callbacks_name_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let watcher = start(WatchMode::Auto);
    let (tx, rx) = mpsc::channel();
    let id = watcher
        .watch_dir(
            dir.path(),
            Box::new(move |names| {
                let _ = tx.send(names.map(|n| n.iter().cloned().collect::<Vec<_>>()));
            }),
        )
        .unwrap();
    fs::write(dir.path().join("new.db"), b"x").unwrap();
    let names = rx.recv_timeout(EXPECT).expect("no directory callback");
    if cfg!(target_os = "linux") {
        assert_eq!(names, Some(vec![OsString::from("new.db")]));
    }
    while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
    watcher.unwatch(id);
    fs::write(dir.path().join("later.db"), b"x").unwrap();
    assert!(rx.recv_timeout(QUIET).is_err());
    assert!(watcher
        .watch_dir(&dir.path().join("missing"), Box::new(|_| {}))
        .is_err());
}

#[test]
fn watch_errors_name_the_path() {
    let watcher = start(WatchMode::Auto);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("app.db");
    let (notify, _rx) = channel();
    let err = watcher.watch(&missing, notify).unwrap_err();
    assert_eq!(err.kind(), crate::error::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");

    let (notify, _rx) = channel();
    let err = watcher.watch(dir.path(), notify).unwrap_err();
    assert_eq!(err.kind(), crate::error::ErrorKind::Invalid, "{err}");

    assert!(Watcher::start(WatchMode::Poll, Duration::ZERO).is_err());
}

/// The watched directory is canonical (so it does not depend on the current directory or
/// on symlinks in the path), and a database not created yet is looked for in it.
#[test]
fn resolve_canonicalizes_directory_and_follows_db_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let real_dir = fs::canonicalize(dir.path()).unwrap();
    fs::create_dir(real_dir.join("sub")).unwrap();
    let (d, n) = resolve(&dir.path().join("sub/../app.db")).unwrap();
    assert_eq!((d, n), (real_dir.clone(), OsString::from("app.db")));

    // An existing database reached through a symlink lives (with its WAL) at the target.
    let target_dir = real_dir.join("data");
    fs::create_dir(&target_dir).unwrap();
    fs::write(target_dir.join("real.db"), b"").unwrap();
    std::os::unix::fs::symlink(target_dir.join("real.db"), real_dir.join("link.db")).unwrap();
    let (d, n) = resolve(&real_dir.join("link.db")).unwrap();
    assert_eq!((d, n), (target_dir, OsString::from("real.db")));
}
