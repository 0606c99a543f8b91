//! Storage and the database are the truth; the sidecar, file times and the clock are hints.
//!
//! Each test plays one way a real host misleads a backup tool (a filesystem with whole-second
//! times, a VM snapshot restored, a data directory copied, a clock glitch, a destination
//! emptied or moved to a new endpoint, storage down at start, a read-only session while
//! walsync was stopped) and then checks what a user relies on: a restore equal to what the
//! application had, no index cut twice, the name kept by its owner. Each failed on the
//! engine that decided continuity from what it remembered locally.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::common::fixtures::{dump, integrity, wait_for, walsync, AppDb, WatchProcess};
use crate::common::s3server::S3Server;
use crate::durability::{
    assert_restored, catalog, generations, replicate_until_walsync_checkpointed, restore_dump,
    restore_with_binary, s3_url, start,
};
use walsync::storage::Storage;
use walsync::Options;
use walsync::UtcTime;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Replicate what the application committed with the library, then stop cleanly.
fn replicate_once(storage: &Arc<dyn Storage>, db: &Path) {
    let replicator = start(storage, db, Options::default());
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();
}

/// One `walsync watch ARGS` run: started, then stopped with SIGTERM, which must succeed.
fn watch_once(args: &[&str], env: &[(String, String)], log_dir: &Path) {
    let watch = WatchProcess::start(args, env, log_dir);
    let status = watch.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "walsync watch {args:?} exited with {status}"
    );
}

/// Every stored object of `name` as (generation, kind, index): a writer never cuts an index
/// storage already holds, so none may appear twice.
fn assert_no_index_cut_twice(storage: &dyn Storage, name: &str) {
    let catalog = catalog(storage, name);
    let mut seen = std::collections::BTreeSet::new();
    for (generation, objects) in catalog.databases.get(name).into_iter().flatten() {
        for object in objects.snapshots.iter().chain(&objects.segments) {
            let id = (generation.clone(), object.name.kind, object.name.index);
            assert!(
                seen.insert(id),
                "{} was cut again: storage holds two objects for its index",
                object.key
            );
        }
    }
}

/// 1. A filesystem with whole-second times: the application updates a row (same size) and
///    closes its last connection within the second of walsync's last write, so the database
///    file's size and modification time stay as walsync saw them at its stop. (Played here by
///    putting the time back as such a filesystem leaves it.) The restarted walsync must ship
///    the update; it used to take the unchanged identity as proof and lose it.
#[test]
fn a_same_size_update_invisible_to_file_times_is_shipped() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("coarse"));
    let mut app = AppDb::create(dir.path(), "app.db");
    replicate_until_walsync_checkpointed(&storage, &mut app);

    let db = app.path.clone();
    let before = std::fs::metadata(&db).unwrap();
    app.exec("UPDATE items SET label = 'ITEM 1' WHERE id = 1;");
    let expected = app.dump();
    drop(app);
    assert!(!PathBuf::from(format!("{}-wal", db.display())).exists());
    let file = std::fs::File::options().write(true).open(&db).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&db).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (before.len(), before.modified().unwrap()),
        "the update should look like no change to size and modification time"
    );

    replicate_once(&storage, &db);
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "the restore lacks the update the file's times did not show",
    );
}

/// Also: an unchanged database continues its generation across a restart, even after a
/// read-only session opened and closed it while walsync was stopped (SQLite checkpoints and
/// deletes the WAL when the last connection closes). It used to start a new generation, a
/// full snapshot, at every such start.
#[test]
fn an_unchanged_database_keeps_its_generation_after_a_read_only_session() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("readonly"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 500);
    let db = app.path.clone();
    replicate_once(&storage, &db);
    app.insert(5, 500);
    replicate_once(&storage, &db);
    assert_eq!(generations(storage.as_ref(), "app"), 1);
    // The application closes its last connection while walsync is stopped, having
    // committed nothing since: SQLite checkpoints and deletes the WAL.
    let expected = app.dump();
    drop(app);

    // A read-only look while walsync is stopped.
    let reader = rusqlite::Connection::open(&db).unwrap();
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 25);
    drop(reader);
    assert!(!PathBuf::from(format!("{}-wal", db.display())).exists());

    replicate_once(&storage, &db);
    assert_eq!(
        generations(storage.as_ref(), "app"),
        1,
        "a read-only session started a new generation"
    );
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "restore after the read-only session",
    );
}

/// The files of a directory tree, with their bytes and modification times: what a VM or
/// filesystem snapshot keeps.
struct Frozen(Vec<(PathBuf, Vec<u8>, SystemTime)>);

impl Frozen {
    fn take(dir: &Path) -> Frozen {
        let mut files = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    let meta = std::fs::metadata(&path).unwrap();
                    files.push((
                        path.clone(),
                        std::fs::read(&path).unwrap(),
                        meta.modified().unwrap(),
                    ));
                }
            }
        }
        Frozen(files)
    }

    /// Put every file back as it was, in place (same inode where the file still exists, as
    /// a rollback of the volume keeps it), and remove files that did not exist then.
    fn restore(&self, dir: &Path) {
        let kept: std::collections::HashSet<&PathBuf> = self.0.iter().map(|(p, ..)| p).collect();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else if !kept.contains(&path) {
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
        for (path, bytes, modified) in &self.0 {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(*modified).unwrap();
        }
    }
}

/// 2. A VM snapshot restored: the database, its WAL and walsync's sidecar go back to an
///    earlier moment while storage keeps what was uploaded since. walsync must notice that
///    storage is ahead of its position and start a new generation, never cut an index
///    storage already holds; the latest restore is the rolled-back database and what it
///    committed afterwards.
#[test]
fn a_rolled_back_host_starts_a_new_generation_instead_of_cutting_stored_indexes_again() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("rollback"));
    let mut app = AppDb::create(&data, "app.db");
    let db = app.path.clone();
    app.insert(10, 300);
    replicate_once(&storage, &db);
    drop(app);
    let snapshot = Frozen::take(&data);

    // The abandoned future: more commits, replicated.
    let mut app = AppDb {
        conn: rusqlite::Connection::open(&db).unwrap(),
        path: db.clone(),
        next_id: 11,
    };
    for _ in 0..3 {
        app.insert(5, 300);
        replicate_once(&storage, &db);
    }
    drop(app);

    snapshot.restore(&data);
    let mut app = AppDb {
        conn: rusqlite::Connection::open(&db).unwrap(),
        path: db.clone(),
        next_id: 11,
    };
    app.exec("UPDATE items SET label = 'after the rollback' WHERE id = 2;");
    app.insert(4, 300);
    let expected = app.dump();
    replicate_once(&storage, &db);

    assert_no_index_cut_twice(storage.as_ref(), "app");
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "latest restore after a rollback",
    );
    assert_restored(
        restore_with_binary(&server, "rollback", dir.path()),
        &expected,
        "walsync restore after a rollback",
    );
}

/// Run `walsync ARGS` to its end, at most `timeout`: None if it was still running (then it
/// is killed).
fn run_for_at_most(
    args: &[&str],
    env: &[(String, String)],
    timeout: Duration,
) -> Option<std::process::Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walsync"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") || key.starts_with("WALSYNC_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// Production in `dir/prod/app.db`, replicated once to `dest`, then its data directory
/// copied with `cp -a` (sidecar included) to `dir/staging`: the application and the copy.
fn replicated_then_copied(server: &S3Server, dest: &str, dir: &Path) -> (AppDb, PathBuf) {
    let prod = dir.join("prod");
    std::fs::create_dir(&prod).unwrap();
    let mut app = AppDb::create(&prod, "app.db");
    app.insert(10, 300);
    watch_once(&[path_str(&app.path), "-b", dest], &server.env(), dir);
    let staging = dir.join("staging");
    let copied = Command::new("cp")
        .args(["-a", path_str(&prod), path_str(&staging)])
        .status()
        .unwrap();
    assert!(copied.success());
    (app, staging.join("app.db"))
}

/// 3. `cp -a` of the data directory, sidecar included, and the copy watched under the same
///    destination: the copy's saved position belongs to another file, so it must not take
///    the name over (it used to skip the ownership check, start a newer generation, and get
///    production refused at its next start).
#[test]
fn a_copy_of_the_data_directory_does_not_take_the_name_over() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "copied");
    let (mut app, copy) = replicated_then_copied(&server, &dest, dir.path());
    let db = app.path.clone();
    let staged_copy = rusqlite::Connection::open(&copy).unwrap();
    staged_copy
        .execute_batch("INSERT INTO items(id, label) VALUES (1000, 'staging only');")
        .unwrap();
    drop(staged_copy);

    let refused = run_for_at_most(
        &["watch", path_str(&copy), "-b", &dest],
        &server.env(),
        Duration::from_secs(20),
    )
    .expect("watching the copy should have been refused at start, not run on");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the copy was watched: {stderr}");
    assert!(
        stderr.contains("another walsync writes that name"),
        "{stderr}"
    );

    // Production goes on, and owns the name.
    app.insert(5, 300);
    let expected = app.dump();
    watch_once(&[path_str(&db), "-b", &dest], &server.env(), dir.path());
    assert_restored(
        restore_with_binary(&server, "copied", dir.path()),
        &expected,
        "restore after a copy was started",
    );
}

/// The same copy started while storage is down: the refusal comes once storage answers,
///    and `watch`, with nothing left to replicate, must exit non-zero saying so rather
///    than run on doing nothing.
#[test]
fn a_copy_started_while_storage_is_down_is_refused_once_storage_answers() {
    let mut server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "copied-late");
    let (_app, copy) = replicated_then_copied(&server, &dest, dir.path());

    server.stop();
    let copy = copy.display().to_string();
    let (env, dest2) = (server.env(), dest.clone());
    let run = std::thread::spawn(move || {
        run_for_at_most(
            &["watch", &copy, "-b", &dest2, "--s3-timeout", "1"],
            &env,
            Duration::from_secs(60),
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    let out = run
        .join()
        .unwrap()
        .expect("walsync watch ran on with nothing to replicate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another walsync writes that name"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no database is being replicated"),
        "{stderr}"
    );
}

/// 4. One forward clock glitch: walsync runs a moment with the clock 30 days ahead, then
///    with the right clock again. A point-in-time restore to now must hold every commit
///    (object times used to stay at the glitch forever after), and `status` must not call a
///    replica current for 30 days. (A `file://` destination: an S3 server refuses requests
///    signed 30 days ahead, which only delays their upload.)
#[test]
fn a_forward_clock_glitch_does_not_hold_later_times() {
    let Some(faketime) = crate::common::torture::find_libfaketime() else {
        panic!("libfaketime.so.1 not found: scripts/test.sh installs the faketime package");
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let dest = format!("file://{}", bucket.display());
    let storage = walsync::storage::file::FileStorage::new(bucket.clone());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let db = path_str(&app.path).to_string();

    let glitched: Vec<(String, String)> = [
        ("LD_PRELOAD", path_str(&faketime)),
        ("FAKETIME", "+30d"),
        ("NO_FAKE_STAT", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let replicate = |app: &mut AppDb, env: &[(String, String)]| {
        let watch = WatchProcess::start(
            &[&db, "-b", &dest, "--min-interval", "0.1"],
            env,
            dir.path(),
        );
        app.insert(5, 100);
        let state = app.dump();
        wait_for(
            Duration::from_secs(20),
            "the last commit to be stored",
            || restore_dump(storage.as_ref(), "app", dir.path(), None).is_ok_and(|d| d == state),
        );
        assert!(watch.terminate(Duration::from_secs(30)).success());
    };
    replicate(&mut app, &glitched);
    replicate(&mut app, &[]);
    let expected = app.dump();
    let now = UtcTime::now();
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), Some(now)),
        &expected,
        "point-in-time restore to now after a clock glitch",
    );

    let status = walsync(&["status", "-b", &dest, "--json"], &[]);
    let text = String::from_utf8_lossy(&status.stdout);
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status --json: {e}: {text}"));
    let last = value["databases"][0]["last_commit"].as_str().unwrap();
    let last = UtcTime::parse_rfc3339(last).unwrap();
    assert!(
        last.millis() <= UtcTime::now().millis() + 60_000,
        "status reports the last commit at {last}, in the future"
    );
}

/// 5. A destination emptied while walsync was stopped, and the same bucket and prefix on
///    a new endpoint: walsync must not go on with segments that have no snapshot to apply
///    to (restores failed until the next hourly snapshot), but start a new generation.
#[test]
fn an_emptied_prefix_or_a_new_endpoint_gets_a_new_base_snapshot() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "moved");
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 300);
    let db = path_str(&app.path).to_string();
    watch_once(&[&db, "-b", &dest], &server.env(), dir.path());

    // Emptied while stopped.
    let storage = server.storage("moved");
    for object in storage.list("").unwrap() {
        storage.delete(&object.key).unwrap();
    }
    app.insert(3, 300);
    let expected = app.dump();
    watch_once(&[&db, "-b", &dest], &server.env(), dir.path());
    assert_restored(
        restore_with_binary(&server, "moved", dir.path()),
        &expected,
        "restore from an emptied prefix",
    );

    // A new endpoint with the same bucket and prefix.
    let other = S3Server::start();
    app.insert(3, 300);
    let expected = app.dump();
    watch_once(&[&db, "-b", &dest], &other.env(), dir.path());
    assert_restored(
        restore_with_binary(&other, "moved", dir.path()),
        &expected,
        "restore from a new endpoint",
    );
}

/// 6. Storage down when walsync starts (network not up yet, DNS failing, the store
///    restarting): `watch` must start anyway, stage locally, and upload once storage
///    answers. It used to exit 5 after two seconds, a restart loop under a supervisor.
#[test]
fn watch_starts_while_storage_is_down_and_uploads_once_it_is_back() {
    let mut server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "down");
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 300);
    let db = path_str(&app.path).to_string();
    server.stop();

    let mut watch = WatchProcess::start(
        &[&db, "-b", &dest, "--s3-timeout", "2"],
        &server.env(),
        dir.path(),
    );
    app.insert(5, 300);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        watch.child.try_wait().unwrap().is_none(),
        "walsync watch should keep running: {}",
        watch.log()
    );
    server.restart();
    app.insert(5, 300);
    let expected = app.dump();
    let storage = server.storage("down");
    wait_for(
        Duration::from_secs(90),
        "the staged commits to be uploaded",
        || restore_dump(&storage, "app", dir.path(), None).is_ok_and(|d| d == expected),
    );
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let out = dir.path().join("final.db");
    walsync(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert_eq!(integrity(&out), "ok");
    assert_eq!(dump(&out), expected);
}
