//! Databases that come and go while `watch --dir` runs: created by the application,
//! restored into place, moved in, a file that becomes a WAL database, one that arrives
//! while storage is down (each picked up within [`PICK_UP`](super::PICK_UP)), and databases
//! deleted or moved out (let go of, their replicas kept). The library's `Replicator::add`
//! and `remove` do the same underneath.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    data_and_logs, path_str, restore, s3_url, wait_log, wait_replicated, watch, watching, PICK_UP,
};
use crate::common::fixtures::{wait_for, walsync, AppDb, WatchProcess};
use walsync::storage::Storage;
use walsync::{Options, Replica, Replicator};
use walsync_testkit::s3server::S3Server;

/// `data/` (the watched directory, canonical), `logs/` and `elsewhere/` (to move databases
/// in from and out to), created under `root`.
fn data_logs_and_elsewhere(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (data, logs) = data_and_logs(root);
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    (data, logs, elsewhere)
}

/// Files under `dir` that process `pid` holds open.
fn open_under(pid: i32, dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if target.starts_with(path_str(dir)) {
                open.push(target);
            }
        }
    }
    open
}

/// A database created by the application, one restored into place by `walsync restore`,
/// and one moved in from elsewhere, each while watching: picked up within 2 s, replicated
/// under its name, restored equal.
#[test]
fn databases_created_restored_into_place_or_moved_in_are_picked_up() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs, elsewhere) = data_logs_and_elsewhere(root.path());
    let mut first = AppDb::create(&data, "first.db");
    first.insert(3, 100);
    let dest = s3_url(&server, "dirs");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "-b",
            &dest,
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    assert!(process
        .log()
        .contains(&watching(&data.join("first.db"), "first")));

    // Created by the application.
    let started = Instant::now();
    let mut created = AppDb::create(&data, "created.db");
    created.insert(2, 100);
    let took = wait_log(
        &process,
        &watching(&created.path, "created"),
        started,
        PICK_UP,
    );
    eprintln!("created.db picked up after {took:?}");
    created.insert(2, 100);
    wait_replicated(&server, "dirs", "created", &logs, &created.dump());

    // Restored into place from another replica.
    wait_replicated(&server, "dirs", "first", &logs, &first.dump());
    let restored = data.join("restored.db");
    let started = Instant::now();
    let run = walsync(
        &["restore", "first", "-o", path_str(&restored), "-b", &dest],
        &server.env(),
    );
    assert!(run.status.success(), "{run:?}");
    wait_log(&process, &watching(&restored, "restored"), started, PICK_UP);
    let mut conn = rusqlite::Connection::open(&restored).unwrap();
    conn.execute(
        "INSERT INTO items(id, label) VALUES (1000, 'after restore')",
        [],
    )
    .unwrap();
    wait_replicated(
        &server,
        "dirs",
        "restored",
        &logs,
        &crate::common::fixtures::dump_of(&conn),
    );

    // Moved in: written elsewhere, closed (its WAL checkpointed away), renamed in.
    let mut outside = AppDb::create(&elsewhere, "moved.db");
    outside.insert(4, 300);
    drop(outside.conn);
    let moved = data.join("moved.db");
    let started = Instant::now();
    std::fs::rename(elsewhere.join("moved.db"), &moved).unwrap();
    wait_log(&process, &watching(&moved, "moved"), started, PICK_UP);
    conn = rusqlite::Connection::open(&moved).unwrap();
    conn.execute("INSERT INTO items(id, label) VALUES (1000, 'moved in')", [])
        .unwrap();
    wait_replicated(
        &server,
        "dirs",
        "moved",
        &logs,
        &crate::common::fixtures::dump_of(&conn),
    );

    let stderr = process.stderr.clone();
    assert!(process.terminate(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(stderr).unwrap();
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A database deleted, and one moved out, while watching: each thread ships what it can
/// and lets go of every file (its descriptors and sidecar lock), the replicas stay
/// restorable, and a new database at a freed path is picked up again.
#[test]
fn deleted_or_moved_out_databases_are_let_go_and_their_replicas_stay() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs, elsewhere) = data_logs_and_elsewhere(root.path());
    let mut doomed = AppDb::create(&data, "doomed.db");
    let mut leaving = AppDb::create(&data, "leaving.db");
    let mut staying = AppDb::create(&data, "staying.db");
    let dest = s3_url(&server, "gone");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "-b",
            &dest,
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    for db in [&mut doomed, &mut leaving, &mut staying] {
        db.insert(3, 200);
    }
    wait_replicated(&server, "gone", "doomed", &logs, &doomed.dump());
    wait_replicated(&server, "gone", "leaving", &logs, &leaving.dump());
    let doomed_dump = doomed.dump();
    let leaving_dump = leaving.dump();
    let pid = process.pid();
    assert!(
        open_under(pid, &data)
            .iter()
            .any(|f| f.ends_with("doomed.db")),
        "walsync should hold doomed.db: {:?}",
        open_under(pid, &data)
    );

    // Deleted by the application: closed, then its files removed.
    drop(doomed.conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", doomed.path.display()));
    }
    // Moved out, closed first.
    drop(leaving.conn);
    std::fs::rename(&leaving.path, elsewhere.join("leaving.db")).unwrap();
    let now = Instant::now();
    for name in ["doomed", "leaving"] {
        wait_log(
            &process,
            &format!("{name}: no longer replicated"),
            now,
            Duration::from_secs(10),
        );
    }
    wait_for(Duration::from_secs(5), "the files to be let go", || {
        let open = open_under(pid, &data);
        !open
            .iter()
            .any(|f| f.contains("doomed.db") || f.contains("leaving.db"))
    });
    // Moved back in: picked up again at once, which takes the sidecar lock the thread that
    // let it go held.
    let moved_back = data.join("leaving.db");
    let started = Instant::now();
    std::fs::rename(elsewhere.join("leaving.db"), &moved_back).unwrap();
    wait_log(
        &process,
        &watching(&moved_back, "leaving"),
        started,
        PICK_UP,
    );
    // The replicas stay in storage, restorable as they were.
    assert_eq!(
        restore(&server, "gone", "doomed", &logs).unwrap(),
        doomed_dump
    );
    assert_eq!(
        restore(&server, "gone", "leaving", &logs).unwrap(),
        leaving_dump
    );
    // A new database where the deleted one was is picked up again.
    let started = Instant::now();
    let mut again = AppDb::create(&data, "doomed.db");
    again.insert(1, 10);
    wait_log(&process, &watching(&again.path, "doomed"), started, PICK_UP);
    wait_replicated(&server, "gone", "doomed", &logs, &again.dump());
    // The other database never noticed.
    staying.insert(1, 10);
    wait_replicated(&server, "gone", "staying", &logs, &staying.dump());
    let stderr = process.stderr.clone();
    assert!(process.terminate(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(stderr).unwrap();
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A matching file that is not a WAL database is skipped with one warning, however often
/// it changes, and picked up once it becomes one; SQLite's files, hidden files and other
/// names never match; two files that map to one name: the second is refused.
#[test]
fn a_file_is_replicated_once_it_becomes_a_wal_database() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = data_and_logs(root.path());
    let later = data.join("later.db");
    let conn = rusqlite::Connection::open(&later).unwrap();
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let hidden = AppDb::create(&data, ".hidden.db");
    let other = AppDb::create(&data, "other.sqlite");
    let mut spaced = AppDb::create(&data, "my app.db");
    let underscored = AppDb::create(&data, "my_app.db");
    let dest = s3_url(&server, "later");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "-b",
            &dest,
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    let warned = |p: &WatchProcess| {
        p.log()
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains("later.db"))
            .count()
    };
    wait_for(Duration::from_secs(5), "the warning about later.db", || {
        warned(&process) == 1
    });
    assert!(
        process.log().contains("rollback-journal mode"),
        "{}",
        process.log()
    );
    // Changes in rollback mode: looked at again, not warned about again.
    for i in 2..6 {
        conn.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    conn.execute_batch("PRAGMA journal_mode=WAL; INSERT INTO t VALUES (6);")
        .unwrap();
    wait_log(&process, &watching(&later, "later"), started, PICK_UP);
    assert_eq!(warned(&process), 1, "{}", process.log());
    wait_replicated(
        &server,
        "later",
        "later",
        &logs,
        &crate::common::fixtures::dump_of(&conn),
    );

    // "my app.db" sorts first and takes my_app; "my_app.db" is refused, with a warning.
    spaced.insert(1, 10);
    wait_replicated(&server, "later", "my_app", &logs, &spaced.dump());
    let log = process.log();
    assert!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains(path_str(&underscored.path))
            && l.contains("already the name of")),
        "{log}"
    );
    for path in [&hidden.path, &other.path, &underscored.path] {
        assert!(
            !log.contains(&format!("watching {} as", path.display())),
            "{log}"
        );
    }
    assert!(
        !log.contains("-wal as") && !log.contains("-shm as"),
        "{log}"
    );
    assert!(process.terminate(Duration::from_secs(30)).success());
}

/// A database that arrives while storage is down is picked up all the same (staged
/// locally, nothing uploaded), and checked against storage and uploaded once it is back,
/// as a database named at start would be.
#[test]
fn a_database_arriving_while_storage_is_down_is_replicated_once_it_is_back() {
    let mut server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = data_and_logs(root.path());
    let dest = s3_url(&server, "down");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "-b",
            &dest,
            "--s3-timeout",
            "2",
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    server.stop();
    let started = Instant::now();
    let mut late = AppDb::create(&data, "late.db");
    late.insert(5, 300);
    wait_log(&process, &watching(&late.path, "late"), started, PICK_UP);
    late.insert(5, 300);
    std::thread::sleep(Duration::from_secs(1));
    server.restart();
    late.insert(1, 10);
    wait_replicated(&server, "down", "late", &logs, &late.dump());
    assert!(process.terminate(Duration::from_secs(30)).success());
}

/// The library: `Replicator::add` replicates one more database while running, and
/// `remove` ships it and releases it (the sidecar lock with it), leaving the replica.
#[test]
fn the_library_adds_and_removes_databases_while_running() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("lib"));
    let mut first = AppDb::create(dir.path(), "first.db");
    let mut second = AppDb::create(dir.path(), "second.db");
    let options = Options {
        min_interval: Duration::from_millis(20),
        ..Options::default()
    };
    let replicator = Replicator::start(
        Arc::clone(&storage),
        &[(first.path.clone(), "first".into())],
        options,
    )
    .unwrap();
    replicator.add(&second.path, "second").unwrap();
    let names: Vec<String> = replicator.databases().into_iter().map(|d| d.0).collect();
    assert_eq!(names, ["first", "second"]);
    // Neither the name nor the file twice.
    assert!(replicator.add(&first.path, "again").is_err());
    assert!(replicator.add(&second.path, "first").is_err());
    second.insert(5, 100);
    replicator.sync("second").unwrap();
    // Held: nobody else may replicate it to the same destination.
    assert!(Replica::open(&second.path, Arc::clone(&storage), "second").is_err());
    second.insert(1, 100);
    replicator.remove("second").unwrap();
    assert!(replicator.sync("second").is_err());
    assert_eq!(replicator.metrics().len(), 1);
    // Released: the sidecar lock can be taken, and everything committed was stored.
    drop(Replica::open(&second.path, Arc::clone(&storage), "second").unwrap());
    assert_eq!(
        restore(&server, "lib", "second", dir.path()).unwrap(),
        second.dump()
    );
    // The other database goes on.
    first.insert(2, 100);
    replicator.sync("first").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();
    assert_eq!(
        restore(&server, "lib", "first", dir.path()).unwrap(),
        first.dump()
    );
}
