//! `walsync watch --dir` end to end (issue 18): databases that come and go in a watched
//! directory while the real binary runs against the real S3 server, and the library's
//! `Replicator::add` and `remove` underneath. Restores are compared with the sources.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::fixtures::{
    dump, integrity, wait_for, walsync, walsync_after, AppDb, WatchProcess,
};
use walsync::storage::Storage;
use walsync::{Options, Replica, Replicator};
use walsync_testkit::s3server::S3Server;

/// How soon a new WAL database must be picked up (issue 18).
const PICK_UP: Duration = Duration::from_secs(2);

fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `walsync watch ARGS`, once it has started (its logs in `logs`, outside any watched
/// directory).
fn watch(args: &[&str], server: &S3Server, logs: &Path) -> WatchProcess {
    watch_with(args, &server.env(), logs)
}

fn watch_with(args: &[&str], env: &[(String, String)], logs: &Path) -> WatchProcess {
    let process = WatchProcess::start(args, env, logs);
    wait_for(Duration::from_secs(20), "walsync watch to start", || {
        process.log().contains("replicating ")
    });
    process
}

/// Wait until the log has `needle`; how long that took from `since`.
fn wait_log(process: &WatchProcess, needle: &str, since: Instant, timeout: Duration) -> Duration {
    let deadline = since + timeout;
    loop {
        if process.log().contains(needle) {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {timeout:?}:\n{}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The "watching PATH as NAME" line of a database picked up.
fn watching(path: &Path, name: &str) -> String {
    format!("watching {} as {name}", path.display())
}

/// The latest restore of `name`, or the error.
fn restore(server: &S3Server, prefix: &str, name: &str, dir: &Path) -> Result<String, String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("restore-{n}.db"));
    let dest = s3_url(server, prefix);
    let run = walsync(
        &["restore", name, "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    assert_eq!(integrity(&out), "ok");
    let text = dump(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(text)
}

/// Wait until the latest restore of `name` equals `expected`.
fn wait_replicated(server: &S3Server, prefix: &str, name: &str, dir: &Path, expected: &str) {
    let mut last = Err(String::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = restore(server, prefix, name, dir);
        if last.as_deref() == Ok(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{name} never caught up; last restore: {last:?}");
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

/// `data/` (the watched directory, canonical), `logs/` and `elsewhere/` (to move databases
/// in from and out to), created under `root`.
fn data_logs_and_elsewhere(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (data, logs, elsewhere) = (root.join("data"), root.join("logs"), root.join("elsewhere"));
    for d in [&data, &logs, &elsewhere] {
        std::fs::create_dir(d).unwrap();
    }
    (std::fs::canonicalize(&data).unwrap(), logs, elsewhere)
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
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let data = std::fs::canonicalize(&data).unwrap();
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

/// With `--recursive`, databases in nested directories (also in a directory created while
/// watching) are replicated under their relative paths, and every name `walsync list`
/// shows restores to its database. Without it, only the top level is watched.
#[test]
fn nested_directories_with_recursive_restore_under_the_names_listed() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let data = std::fs::canonicalize(&data).unwrap();
    let mut dbs: Vec<(String, AppDb)> = Vec::new();
    for (sub, name) in [
        ("tenant-a", "tenant-a.app"),
        ("tenant-b", "tenant-b.app"),
        ("example.com", "example..com.app"),
        ("deep/er", "deep.er.app"),
    ] {
        let dir = data.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        dbs.push((name.to_string(), AppDb::create(&dir, "app.db")));
    }
    dbs.push(("top".to_string(), AppDb::create(&data, "top.db")));

    // Not recursive: the top level only.
    let dest = s3_url(&server, "flat");
    let process = watch(&["--dir", path_str(&data), "-b", &dest], &server, &logs);
    assert!(process.terminate(Duration::from_secs(30)).success());
    let listed = walsync(&["list", "-b", &dest, "--json"], &server.env());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = json["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["top"], "{json}");

    let dest = s3_url(&server, "tree");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "--recursive",
            "-b",
            &dest,
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    for (name, db) in &dbs {
        assert!(
            process.log().contains(&watching(&db.path, name)),
            "{name}: {}",
            process.log()
        );
    }
    // A tenant arriving while watching: a new directory, then its database.
    let started = Instant::now();
    let tenant_c = data.join("tenant-c");
    std::fs::create_dir(&tenant_c).unwrap();
    let created = AppDb::create(&tenant_c, "app.db");
    wait_log(
        &process,
        &watching(&created.path, "tenant-c.app"),
        started,
        PICK_UP,
    );
    dbs.push(("tenant-c.app".to_string(), created));
    for (i, (_, db)) in dbs.iter_mut().enumerate() {
        db.insert(i + 1, 100);
    }
    for (name, db) in &dbs {
        wait_replicated(&server, "tree", name, &logs, &db.dump());
    }
    assert!(process.terminate(Duration::from_secs(30)).success());

    // Every listed name restores to its database.
    let listed = walsync(&["list", "-b", &dest, "--json"], &server.env());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut names: Vec<String> = json["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = dbs.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for (name, db) in &dbs {
        assert_eq!(
            restore(&server, "tree", name, &logs).unwrap(),
            db.dump(),
            "{name}"
        );
    }
}

/// Named databases and several `--dir`s mix: a file both named and in a directory is
/// replicated once (under its given name), and a directory's file whose name a named
/// database (or an earlier `--dir`) already has is refused with a warning.
#[test]
fn named_databases_and_several_directories_never_share_a_name() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (one, two, logs) = (
        root.path().join("one"),
        root.path().join("two"),
        root.path().join("logs"),
    );
    for d in [&one, &two, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let (one, two) = (
        std::fs::canonicalize(&one).unwrap(),
        std::fs::canonicalize(&two).unwrap(),
    );
    let mut named = AppDb::create(&one, "app.db");
    let mut shared = AppDb::create(&one, "shared.db");
    let clash = AppDb::create(&two, "shared.db");
    let taken = AppDb::create(&two, "given.db");
    let dest = s3_url(&server, "mixed");
    let named_spec = format!("{}:given", named.path.display());
    let process = watch(
        &[
            &named_spec,
            "--dir",
            path_str(&one),
            "--dir",
            path_str(&two),
            "-b",
            &dest,
        ],
        &server,
        &logs,
    );
    let log = process.log();
    assert!(
        log.contains(&format!("watching {} as given", named.path.display())),
        "{log}"
    );
    assert!(log.contains(&watching(&shared.path, "shared")), "{log}");
    let refused = |path: &Path, why: &str| {
        log.lines().any(|l| {
            l.contains(" WARN ")
                && l.contains(&format!("{}: not replicated", path.display()))
                && l.contains(why)
        })
    };
    assert!(
        refused(&named.path, "already replicated as \"given\""),
        "{log}"
    );
    assert!(refused(&clash.path, "already the name of"), "{log}");
    assert!(refused(&taken.path, "already the name of"), "{log}");
    named.insert(2, 10);
    shared.insert(3, 10);
    assert!(process.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        restore(&server, "mixed", "given", &logs).unwrap(),
        named.dump()
    );
    assert_eq!(
        restore(&server, "mixed", "shared", &logs).unwrap(),
        shared.dump()
    );
    assert!(restore(&server, "mixed", "app", &logs).is_err());
}

/// With `--poll` the directory is scanned (no events), and the settings may come from
/// WALSYNC_DIR, WALSYNC_PATTERN and WALSYNC_RECURSIVE: a new database is still picked up
/// within 2 s, and one whose directory is deleted is let go.
#[test]
fn polling_scans_the_directory_with_settings_from_the_environment() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::create_dir(&logs).unwrap();
    let data = std::fs::canonicalize(&data).unwrap();
    let mut existing = AppDb::create(&data.join("sub"), "a.sqlite");
    let ignored = AppDb::create(&data, "x.db");
    let mut env = server.env();
    env.extend([
        ("WALSYNC_DIR".to_string(), path_str(&data).to_string()),
        ("WALSYNC_PATTERN".to_string(), "*.sqlite".to_string()),
        ("WALSYNC_RECURSIVE".to_string(), "1".to_string()),
    ]);
    let dest = s3_url(&server, "poll");
    let process = watch_with(
        &["--poll", "-b", &dest, "--min-interval", "0.1"],
        &env,
        &logs,
    );
    let log = process.log();
    assert!(log.contains("(poll events"), "{log}");
    assert!(log.contains(&watching(&existing.path, "sub.a")), "{log}");
    assert!(
        !log.contains(&format!("{} as", ignored.path.display())),
        "{log}"
    );
    let started = Instant::now();
    let mut new = AppDb::create(&data, "new.sqlite");
    new.insert(2, 100);
    let took = wait_log(&process, &watching(&new.path, "new"), started, PICK_UP);
    eprintln!("new.sqlite picked up by polling after {took:?}");
    existing.insert(2, 100);
    wait_replicated(&server, "poll", "sub.a", &logs, &existing.dump());
    wait_replicated(&server, "poll", "new", &logs, &new.dump());
    // Its whole directory removed (sidecar and all): with polling, only the scan can tell.
    drop(existing.conn);
    std::fs::remove_dir_all(data.join("sub")).unwrap();
    wait_log(
        &process,
        "sub.a: no longer replicated",
        Instant::now(),
        Duration::from_secs(10),
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
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let data = std::fs::canonicalize(&data).unwrap();
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

/// Under a descriptor limit too low for the databases found, walsync says so at start:
/// which limit, how many databases it allows, how to raise it. The databases that do not
/// fit are skipped with a warning (and tried again later), not fatal to the others.
#[test]
fn a_descriptor_limit_too_low_is_said_at_start_and_is_not_fatal() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    for i in 0..40 {
        drop(AppDb::create(&data, &format!("db{i:02}.db")));
    }
    let stderr = logs.join("limited.err");
    let dest = s3_url(&server, "limited");
    let mut command = walsync_after("ulimit -n 150");
    command
        .args(["watch", "--dir", path_str(&data), "-b", &dest])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    command.envs(server.env());
    let mut child = command.spawn().unwrap();
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    wait_for(Duration::from_secs(20), "walsync watch to start", || {
        log().contains("replicating ")
    });
    // Every file considered: watched, or skipped with a warning (on a loaded machine the
    // scan takes a while).
    let considered = |log: &str| {
        log.lines().filter(|l| l.contains(" as db")).count()
            + log
                .lines()
                .filter(|l| l.contains(" WARN ") && l.contains("not replicated"))
                .count()
    };
    wait_for(Duration::from_secs(30), "every file considered", || {
        considered(&log()) >= 40
    });
    std::thread::sleep(Duration::from_millis(500));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let log = log();
    assert!(running, "walsync watch stopped: {log}");
    assert!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains("RLIMIT_NOFILE is 150, which allows about 21 databases")
            && l.contains("ulimit -n")),
        "{log}"
    );
    // Some fit (four descriptors each once idle, more while busy), the rest are skipped, each with a
    // warning naming it.
    let watched = log.lines().filter(|l| l.contains(" as db")).count();
    let skipped = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("not replicated"))
        .count();
    assert!(
        watched >= 1 && skipped >= 1 && watched + skipped == 40,
        "{watched} watched, {skipped} skipped: {log}"
    );
    // A database that could not list storage for the limit tries again; none gives up.
    assert!(
        !log.contains("this database is no longer replicated"),
        "{log}"
    );
}

/// A host of a thousand replicated databases restarted: quiet again at once, one request
/// per database (the LIST that reconciles it) and the destination's one
/// ListMultipartUploads, and no snapshot: nothing changed, so nothing is stored again.
#[test]
fn a_restart_of_a_thousand_replicated_databases_costs_a_request_each_and_no_snapshot() {
    const DATABASES: usize = 1000;
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for i in 0..DATABASES {
        drop(AppDb::create(&data, &format!("db{i:04}.db")));
    }
    let args = ["--dir", path_str(&data), "-b", &s3_url(&server, "host")];
    let storage = server.storage("host");
    let snapshots = || {
        storage
            .list("")
            .unwrap()
            .iter()
            .filter(|o| o.key.contains("/snapshots/"))
            .count()
    };
    let first = watch(&args, &server, root.path());
    wait_for(Duration::from_secs(120), "every database stored", || {
        snapshots() >= DATABASES
    });
    // Stopping settles a thousand databases (a checkpoint, a digest and fsyncs each): on a
    // loaded 2-core machine that took over a minute.
    assert!(first.terminate(Duration::from_secs(180)).success());
    let stored = snapshots();

    server.clear_requests();
    let started = Instant::now();
    let second = watch(&args, &server, root.path());
    // Quiet: no new request for 5 s.
    let (mut seen, mut changed) = (0, Instant::now());
    while changed.elapsed() < Duration::from_secs(5) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not quiet after 60 s"
        );
        let now = server.requests().len();
        if now != seen {
            (seen, changed) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let quiet_after = changed.duration_since(started);
    let requests = server.requests();
    let log = second.log();
    assert!(second.terminate(Duration::from_secs(180)).success());
    assert!(
        quiet_after < Duration::from_secs(30),
        "quiet after {quiet_after:?}"
    );
    let puts: Vec<_> = requests.iter().filter(|r| r.method == "PUT").collect();
    assert!(
        puts.is_empty(),
        "{} uploads: {:?}",
        puts.len(),
        &puts[..puts.len().min(5)]
    );
    assert!(
        requests.len() <= DATABASES + 1,
        "{} requests for {DATABASES} databases",
        requests.len()
    );
    assert_eq!(snapshots(), stored, "{log}");
}

/// A database named on the command line inside a watched directory is refused by the
/// directory without being opened: closing a descriptor of it would drop the locks the
/// named replica's SQLite connection holds, and another process could then take the
/// database exclusively (the application's last connection would checkpoint and delete the
/// WAL under walsync's pin). The shared lock is still there once the directory is scanned.
#[test]
fn scanning_a_directory_keeps_the_locks_of_a_database_already_replicated() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&logs).unwrap();
    let data = std::fs::canonicalize(&data).unwrap();
    let path = {
        let mut db = AppDb::create(&data, "app.db");
        db.insert(1, 10);
        db.path.clone()
    };
    let named = format!("{}:named", path.display());
    let dest = s3_url(&server, "locks");
    let process = watch(
        &[&named, "--dir", path_str(&data), "-b", &dest],
        &server,
        &logs,
    );
    wait_for(Duration::from_secs(10), "the directory's refusal", || {
        process.log().contains("already replicated as \"named\"")
    });
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
    let log = process.log();
    assert!(process.terminate(Duration::from_secs(30)).success());
    assert!(
        !exclusive.status.success(),
        "another process took the database exclusively while walsync replicates it: {log}"
    );
}

/// A new database's first start lists its name once (to reconcile) and no more: the prune
/// after its first snapshot has nothing older to delete, so it costs no LIST of its own.
#[test]
fn a_new_databases_first_start_lists_storage_once() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&logs).unwrap();
    for name in ["a.db", "b.db", "c.db"] {
        AppDb::create(&data, name).insert(1, 10);
    }
    let storage = server.storage("first");
    // A short retention makes a database prunable again 4 s after its start-up prune (which
    // uses the reconciling LIST): a prune after the first snapshot would list by then.
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "-b",
            &s3_url(&server, "first"),
            "--retention",
            "4s",
        ],
        &server,
        &logs,
    );
    wait_for(Duration::from_secs(30), "three state.json stored", || {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "PUT" && r.path.ends_with("/state.json"))
            .count()
            >= 3
    });
    // Time for a prune that should not happen.
    std::thread::sleep(Duration::from_secs(6));
    let requests = server.requests();
    assert!(process.terminate(Duration::from_secs(30)).success());
    let lists = requests
        .iter()
        .filter(|r| r.method == "GET" && r.has_param("list-type"))
        .count();
    assert_eq!(lists, 3, "{requests:#?}");
    assert!(storage.list("").unwrap().len() >= 6);
}
