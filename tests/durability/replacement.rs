//! A database replaced by a rename over its path, then snapshotted on request (3) or
//! because a snapshot was due (3b): the restore is the new database, never a mix of the
//! two.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{assert_restored, count_objects, restore_dump, start};
use crate::common::fixtures::{dump_of, wait_for, AppDb};
use rusqlite::{params, Connection};
use walsync::format::ObjectKind;
use walsync::storage::Storage;
use walsync::Options;
use walsync_testkit::s3server::S3Server;

/// A WAL-mode database built aside, with other tables than the application's, closed (so
/// it is one file): what is renamed over the watched path.
fn build_replacement(dir: &Path) -> PathBuf {
    let staging = dir.join("staging");
    std::fs::create_dir(&staging).unwrap();
    let path = staging.join("new.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER);
         CREATE TABLE audit(at INTEGER, note TEXT);",
    )
    .unwrap();
    for i in 0..200 {
        conn.execute(
            "INSERT INTO accounts(owner, balance) VALUES (?1, ?2)",
            params![format!("owner {i} {}", "x".repeat(100)), i * 7],
        )
        .unwrap();
    }
    drop(conn);
    path
}

/// Close the application, remove its `-wal` and `-shm` (they belong to the old file; a
/// connection to the new one must not read them) and rename `replacement` over it.
fn replace_database(app: AppDb, replacement: &Path) -> PathBuf {
    let path = app.path.clone();
    drop(app);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::rename(replacement, &path).unwrap();
    path
}

/// Write to the replacement through a new connection, left open (as an application's
/// would be; closing the last connection would checkpoint and remove the WAL, which walsync
/// notices differently); returns the connection and the content.
fn write_to_replacement(path: &Path) -> (Connection, String) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "INSERT INTO audit VALUES (1, 'after the swap');
         UPDATE accounts SET balance = balance + 1 WHERE id % 3 = 0;",
    )
    .unwrap();
    let content = dump_of(&conn);
    (conn, content)
}

/// 3. The database is replaced by a rename and a snapshot is asked for before walsync has
///    looked at the file again: the restore must be the new database, not a mix.
#[test]
fn a_database_renamed_over_the_path_then_snapshotted_restores_as_the_new_database() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("swap-snapshot"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(50, 500);
    let options = Options {
        // Nothing is shipped unless asked: the snapshot is the first to see the new file.
        min_interval: Duration::from_secs(60),
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    app.insert(20, 500);
    replicator.sync("app").unwrap();

    let replacement = build_replacement(dir.path());
    let path = replace_database(app, &replacement);
    replicator.snapshot("app").unwrap();
    let (_conn, expected) = write_to_replacement(&path);
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "the restore is not the database renamed into place",
    );
}

/// 3b. The same with the snapshot coming from `snapshot_interval` instead of a request.
///
/// Timing: the rename must come after the interval is due but before anything else makes
/// walsync look at the WAL; the test sleeps past the interval (8 s, far more than the
/// setup needs even on a loaded machine) to get there.
#[test]
fn a_database_renamed_over_the_path_when_a_snapshot_is_due_restores_as_the_new_database() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("swap-interval"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(50, 500);
    let interval = Duration::from_secs(8);
    let options = Options {
        min_interval: Duration::from_secs(60),
        snapshot_interval: interval,
        ..Options::default()
    };
    let started = Instant::now();
    let replicator = start(&storage, &app.path, options);
    replicator.sync("app").unwrap();
    // A segment: the database changed since the generation's snapshot, so the interval's
    // snapshot becomes due.
    app.insert(20, 500);
    replicator.sync("app").unwrap();
    let replacement = build_replacement(dir.path());
    let path = app.path.clone();
    drop(app);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let snapshots_before = count_objects(storage.as_ref(), "app", ObjectKind::Snapshot);
    assert!(
        started.elapsed() < interval,
        "too slow to reach the rename before the snapshot interval; rerun"
    );
    std::thread::sleep(interval + Duration::from_millis(500) - started.elapsed());
    std::fs::rename(&replacement, &path).unwrap();
    wait_for(Duration::from_secs(20), "the interval's snapshot", || {
        count_objects(storage.as_ref(), "app", ObjectKind::Snapshot) > snapshots_before
    });
    let (_conn, expected) = write_to_replacement(&path);
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "the restore is not the database renamed into place",
    );
}
