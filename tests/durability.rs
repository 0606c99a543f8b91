//! Regression tests for lifecycle events that lost data, mixed histories or blocked the
//! application in walsync's first engine. Each one was reproduced by hand first; each test
//! drives the same event through the public surface only (the `walsync` binary, the
//! library's `Replicator`, `walsync::restore` and the bucket listing), then restores and
//! compares the content with what the application really had.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::faultproxy::FaultProxy;
use crate::common::fixtures::{
    dump, dump_of, integrity, replica_sidecar, wait_for, walsync, AppDb, Immutable, WatchProcess,
};
use crate::common::s3server::S3Server;
use rusqlite::{params, Connection};
use walsync::format::{Catalog, ObjectKind, ObjectName};
use walsync::storage::file::FileStorage;
use walsync::storage::s3::{S3Config, S3Storage};
use walsync::storage::Storage;
use walsync::RestoreOptions;
use walsync::UtcTime;
use walsync::{Options, Replicator};
use walsync::{Replica, SyncOutcome};

pub(crate) fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The binary's environment for `server`, but talking to it through `endpoint`.
fn env_via(server: &S3Server, endpoint: &str) -> Vec<(String, String)> {
    let mut env = server.env();
    for (key, value) in &mut env {
        if key == "AWS_ENDPOINT_URL_S3" {
            *value = endpoint.to_string();
        }
    }
    env
}

/// A library client for `server` that goes through `endpoint` (a proxy).
fn storage_via(server: &S3Server, prefix: &str, endpoint: &str) -> S3Storage {
    S3Storage::new(S3Config {
        endpoint: Some(endpoint.to_string()),
        ..server.config(prefix)
    })
    .unwrap()
}

pub(crate) fn start(storage: &Arc<dyn Storage>, db: &Path, options: Options) -> Replicator {
    crate::common::logs::init();
    Replicator::start(
        Arc::clone(storage),
        &[(db.to_path_buf(), "app".into())],
        options,
    )
    .unwrap()
}

/// The stored objects of `name`, grouped by generation.
pub(crate) fn catalog(storage: &dyn Storage, name: &str) -> Catalog {
    Catalog::from_listing(storage.list(&format!("{name}/")).unwrap())
}

/// Generations stored for `name`.
pub(crate) fn generations(storage: &dyn Storage, name: &str) -> usize {
    catalog(storage, name)
        .databases
        .get(name)
        .map_or(0, |g| g.len())
}

/// Objects of one kind stored for `name`, over all generations.
fn count_objects(storage: &dyn Storage, name: &str, kind: ObjectKind) -> usize {
    storage
        .list(&format!("{name}/"))
        .unwrap()
        .iter()
        .filter(|o| ObjectName::parse_key(&o.key).is_some_and(|(_, n)| n.kind == kind))
        .count()
}

/// Restore `name` (latest, or as of `at`) with the library into a fresh file in `dir`: its
/// dump once `PRAGMA integrity_check` says ok, or why not.
pub(crate) fn restore_dump(
    storage: &dyn Storage,
    name: &str,
    dir: &Path,
    at: Option<UtcTime>,
) -> Result<String, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = dir.join(format!("restored-{}.db", N.fetch_add(1, Ordering::Relaxed)));
    let options = RestoreOptions {
        point_in_time: at,
        ..RestoreOptions::default()
    };
    walsync::restore(storage, name, &out, &options).map_err(|e| format!("restore: {e}"))?;
    let check = integrity(&out);
    if check != "ok" {
        return Err(format!("integrity_check: {check}"));
    }
    let text = dump(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(text)
}

/// A short description of a dump (rows per table), for failure messages: whole dumps are
/// too long to read.
fn summary(dump: &str) -> String {
    let mut tables: Vec<(String, usize)> = Vec::new();
    for line in dump.lines() {
        if let Some(rest) = line.strip_prefix("CREATE TABLE ") {
            let name = rest.split(['(', ' ']).next().unwrap_or(rest);
            tables.push((name.to_string(), 0));
        } else if let Some((_, rows)) = tables.last_mut() {
            *rows += 1;
        }
    }
    let parts: Vec<String> = tables
        .iter()
        .map(|(t, n)| format!("{t}: {n} rows"))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Insist that a restore succeeded and equals `expected`, with a readable message.
#[track_caller]
pub(crate) fn assert_restored(restored: Result<String, String>, expected: &str, what: &str) {
    match restored {
        Ok(text) if text == expected => {}
        Ok(text) => {
            let differs = text
                .lines()
                .zip(expected.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(text.lines().count().min(expected.lines().count()));
            panic!(
                "{what}: restored {} but expected {} (dumps differ from line {differs})",
                summary(&text),
                summary(expected)
            );
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Restore the latest state of `name` with `walsync restore`: its dump, or stderr.
pub(crate) fn restore_with_binary(
    server: &S3Server,
    prefix: &str,
    dir: &Path,
) -> Result<String, String> {
    let out = dir.join("restored-by-binary.db");
    let _ = std::fs::remove_file(&out);
    let dest = s3_url(server, prefix);
    let result = walsync(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned());
    }
    let check = integrity(&out);
    if check != "ok" {
        return Err(format!("integrity_check: {check}"));
    }
    Ok(dump(&out))
}

/// Wait until every page of the application's database is in the database file: someone
/// (walsync, in these tests) checkpointed the whole WAL.
fn wait_until_checkpointed(app: &AppDb) {
    let (pages, page_size): (i64, i64) = app
        .conn
        .query_row(
            "SELECT page_count, page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "walsync's checkpoint to fill the database file",
        || std::fs::metadata(&app.path).map_or(0, |m| m.len()) >= (pages * page_size) as u64,
    );
}

/// Run walsync through the library with a small PASSIVE checkpoint threshold until its own
/// checkpoint has copied the whole WAL into the database file, then stop it cleanly.
pub(crate) fn replicate_until_walsync_checkpointed(storage: &Arc<dyn Storage>, app: &mut AppDb) {
    let options = Options {
        min_interval: Duration::from_millis(20),
        passive_checkpoint_frames: 10,
        ..Options::default()
    };
    let replicator = start(storage, &app.path, options);
    for _ in 0..4 {
        app.insert(10, 2000);
    }
    replicator.sync("app").unwrap();
    wait_until_checkpointed(app);
    replicator.stop(Duration::from_secs(30)).unwrap();
}

/// 1. A commit made while walsync is stopped, after walsync's own checkpoint, then the
///    application closes its last connection (SQLite checkpoints the WAL into the database
///    and deletes it). The restarted walsync must ship it.
#[test]
fn commits_made_while_walsync_is_stopped_are_shipped_after_the_app_closes() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("closed"));
    let mut app = AppDb::create(dir.path(), "app.db");
    replicate_until_walsync_checkpointed(&storage, &mut app);

    // walsync is stopped: the application commits and closes its last connection.
    app.insert(3, 100);
    let expected = app.dump();
    let db = app.path.clone();
    drop(app);
    assert!(
        !PathBuf::from(format!("{}-wal", db.display())).exists(),
        "closing the last connection should have removed the WAL"
    );

    // The real binary starts on it, then is stopped.
    let dest = s3_url(&server, "closed");
    let watch = WatchProcess::start(&[path_str(&db), "-b", &dest], &server.env(), dir.path());
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "walsync exit status {status}");

    assert_restored(
        restore_with_binary(&server, "closed", dir.path()),
        &expected,
        "the restore lacks the commit made while walsync was stopped",
    );
}

/// 1b. The same, but the application runs `PRAGMA wal_checkpoint(TRUNCATE)` instead of
///     closing: the WAL file is left empty.
#[test]
fn commits_made_while_walsync_is_stopped_are_shipped_after_an_app_truncate() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("truncated"));
    let mut app = AppDb::create(dir.path(), "app.db");
    replicate_until_walsync_checkpointed(&storage, &mut app);

    app.insert(3, 100);
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    let expected = app.dump();

    let replicator = start(&storage, &app.path, Options::default());
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &expected,
        "the restore lacks the commit made while walsync was stopped",
    );
}

/// 2. walsync's own checkpoint of a WAL grown past the size limit, and truncating the WAL
///    file after it, are walsync's doing, not a lost history: the generation goes on. (It
///    used to run a TRUNCATE checkpoint after releasing the write lock, and took the
///    wal-index change that causes for a commit racing it.)
#[test]
fn walsyncs_own_truncate_checkpoint_keeps_one_generation() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("own-truncate"));
    let mut app = AppDb::create(dir.path(), "app.db");
    let options = Options {
        min_interval: Duration::from_millis(20),
        wal_size_limit: 256 * 1024,
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    // About 400 KiB in five commits.
    for _ in 0..5 {
        app.insert(20, 4000);
    }
    replicator.sync("app").unwrap();
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    wait_for(
        Duration::from_secs(20),
        "walsync's checkpoint of the large WAL",
        || size(&app.path) > 300 * 1024,
    );
    // walsync truncates the large WAL after its checkpoint; commits go on in a small one.
    app.insert(5, 100);
    replicator.sync("app").unwrap();
    let wal = PathBuf::from(format!("{}-wal", app.path.display()));
    wait_for(
        Duration::from_secs(20),
        "the WAL file cut back below the limit",
        || size(&wal) < 256 * 1024,
    );
    app.insert(5, 100);
    replicator.sync("app").unwrap();
    app.insert(5, 100);
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    let restored = restore_dump(storage.as_ref(), "app", dir.path(), None);
    assert_eq!(
        generations(storage.as_ref(), "app"),
        1,
        "walsync's own TRUNCATE checkpoint started a new generation"
    );
    assert_restored(restored, &app.dump(), "the latest restore");
}

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

/// Commit through `app` and note the time and the content right after.
fn commit_and_record(app: &mut AppDb, states: &mut Vec<(UtcTime, String)>) {
    let id = app.next_id;
    app.next_id += 2;
    app.exec(&format!(
        "BEGIN;
         INSERT INTO items(id, label, body)
             VALUES ({id}, 'item {id}', randomblob(3000)), ({}, 'item', randomblob(3000));
         UPDATE items SET label = label || '+' WHERE id % 2 = 0;
         COMMIT;",
        id + 1
    ));
    states.push((UtcTime::now(), app.dump()));
}

/// 4. walsync cannot note its position (its sidecar directory is unwritable) while segments
///    it cut earlier are still being stored, and is then killed: the restarted walsync must
///    not produce a bucket where a restore, latest or at any point in time, mixes the
///    segments of the two runs.
#[test]
fn a_position_that_falls_behind_never_mixes_two_histories_in_a_restore() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr(), 1, Duration::from_secs(1));
    // Under the target directory: the same filesystem as the checkout, which supports chattr.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = base.path();
    let storage = server.storage("behind");
    let dest = s3_url(&server, "behind");
    let env = env_via(&server, &proxy.endpoint());
    let mut app = AppDb::create(dir, "app.db");
    let mut states = vec![(UtcTime::now(), app.dump())];
    commit_and_record(&mut app, &mut states);

    let db = app.path.clone();
    let args = [path_str(&db), "-b", &dest, "--min-interval", "0.05"];
    let watch = WatchProcess::start(&args, &env, dir);
    commit_and_record(&mut app, &mut states);
    wait_for(Duration::from_secs(20), "the first commits stored", || {
        restore_dump(&storage, "app", dir, None).as_ref() == Ok(&states.last().unwrap().1)
    });

    // Storage pauses; each commit becomes a segment queued behind it.
    let before = count_objects(&storage, "app", ObjectKind::Segment);
    proxy.set_delay(Duration::from_secs(3600));
    for _ in 0..5 {
        commit_and_record(&mut app, &mut states);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The sidecar becomes unwritable, then storage comes back: the queued segments are
    // stored, but walsync cannot note it.
    let sidecar = dir.join(".app.db-walsync");
    assert!(sidecar.is_dir(), "no sidecar at {}", sidecar.display());
    let guard = Immutable::new(&sidecar);
    proxy.set_delay(Duration::ZERO);
    // Whatever walsync had cut before the sidecar froze is stored within a moment; wait
    // until the count of segments has settled (unchanged for 2 s).
    let mut stored = (before, Instant::now());
    wait_for(
        Duration::from_secs(30),
        "the queued segments stored",
        || {
            let now = count_objects(&storage, "app", ObjectKind::Segment);
            if now != stored.0 {
                stored = (now, Instant::now());
            }
            now > before && stored.1.elapsed() > Duration::from_secs(2)
        },
    );
    eprintln!(
        "{} segments stored while the sidecar was unwritable",
        stored.0 - before
    );
    watch.kill();
    drop(guard);

    // walsync starts again on a writable sidecar; the application goes on.
    let watch = WatchProcess::start(&args, &env, dir);
    commit_and_record(&mut app, &mut states);
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "walsync exit status {status}");

    // For the failure message: the objects both runs stored.
    let keys: Vec<String> = storage
        .list("app/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    eprintln!("stored objects:\n{}", keys.join("\n"));
    let (_, last) = states.last().unwrap();
    let mut problems = Vec::new();
    match restore_dump(&storage, "app", dir, None) {
        Ok(text) if text == *last => {}
        Ok(text) => problems.push(format!(
            "the latest restore is {} but the application ended with {}",
            summary(&text),
            summary(last)
        )),
        Err(e) => problems.push(format!("the latest restore: {e}")),
    }
    for (i, (time, _)) in states.iter().enumerate() {
        match restore_dump(&storage, "app", dir, Some(*time)) {
            Ok(text) if states.iter().any(|(_, s)| *s == text) => {}
            Ok(text) => problems.push(format!(
                "the restore at commit {i} ({}) is a state the application never had: {}",
                time.to_rfc3339(),
                summary(&text)
            )),
            // Before the first snapshot there is nothing to restore.
            Err(e) if e.contains("no backup") => {}
            Err(e) => problems.push(format!("the restore at commit {i}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// 5. Storage is slow (8 s per request) while the application commits steadily and walsync
///    checkpoints often: no commit may wait out the application's 5 s busy timeout, because
///    walsync never holds the write lock across an upload.
#[test]
fn the_application_write_lock_is_never_held_across_a_slow_upload() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr(), 1, Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(storage_via(&server, "slow", &proxy.endpoint()));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let options = Options {
        // Longer than one upload, so that the queue drains and checkpoints are due.
        min_interval: Duration::from_secs(9),
        passive_checkpoint_frames: 10,
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    replicator.sync("app").unwrap();

    proxy.set_delay(Duration::from_secs(8));
    app.insert(20, 4000); // enough frames for a checkpoint once it is stored
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    let mut commits = 0;
    std::thread::scope(|scope| {
        // Ship that first commit now (it takes one slow upload).
        let shipping = scope.spawn(|| replicator.sync("app"));
        let loop_start = Instant::now();
        while loop_start.elapsed() < Duration::from_secs(30) {
            let t = Instant::now();
            let result = app.conn.execute(
                "INSERT INTO items(label, body) VALUES ('loop', zeroblob(200))",
                [],
            );
            slowest = slowest.max(t.elapsed());
            commits += 1;
            if let Err(e) = result {
                failures.push(format!("after {:?}: {e}", loop_start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy.set_delay(Duration::ZERO);
        shipping.join().unwrap().unwrap();
    });
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();
    eprintln!("{commits} commits, slowest {slowest:?}");
    assert!(
        failures.is_empty(),
        "{} of {commits} commits failed (slowest took {slowest:?}): {failures:?}",
        failures.len()
    );
    assert!(
        slowest < Duration::from_secs(5),
        "a commit waited {slowest:?}"
    );
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &app.dump(),
        "the latest restore",
    );
}

/// 6a. After walsync's own complete checkpoint, the application runs
///     `PRAGMA wal_checkpoint(TRUNCATE)` twice in a row (the WAL restarts twice), then
///     commits: nothing was lost, so there is no reason for a new generation.
#[test]
fn two_application_truncate_checkpoints_in_a_row_keep_one_generation() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("app-truncate"));
    let mut app = AppDb::create(dir.path(), "app.db");
    let options = Options {
        min_interval: Duration::from_millis(20),
        passive_checkpoint_frames: 10,
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    for _ in 0..4 {
        app.insert(10, 2000);
    }
    replicator.sync("app").unwrap();
    wait_until_checkpointed(&app);
    // walsync may answer busy while it holds the WAL: do not wait long for it.
    app.conn.busy_timeout(Duration::from_millis(200)).unwrap();
    for _ in 0..2 {
        let _: (i64, i64, i64) = app
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
    }
    app.conn.busy_timeout(Duration::from_secs(5)).unwrap();
    app.insert(5, 500);
    replicator.sync("app").unwrap();
    app.insert(5, 500);
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    let restored = restore_dump(storage.as_ref(), "app", dir.path(), None);
    assert_eq!(
        generations(storage.as_ref(), "app"),
        1,
        "the application's checkpoints started a new generation"
    );
    assert_restored(restored, &app.dump(), "the latest restore");
}

/// 6b. The application runs a FULL checkpoint (the WAL is then wholly in the database
///     file), walsync moves its pin (a snapshot does), and the application commits, so its
///     writer restarts the WAL: still one generation.
#[test]
fn a_repin_after_a_full_application_checkpoint_keeps_one_generation() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("app-full"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 500);
    let options = Options {
        min_interval: Duration::from_millis(20),
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    app.insert(20, 500);
    replicator.sync("app").unwrap();
    app.exec("PRAGMA wal_checkpoint(FULL);");
    replicator.snapshot("app").unwrap();
    app.insert(5, 500);
    replicator.sync("app").unwrap();
    app.insert(5, 500);
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    let restored = restore_dump(storage.as_ref(), "app", dir.path(), None);
    assert_eq!(
        generations(storage.as_ref(), "app"),
        1,
        "the application's checkpoint and walsync's repin started a new generation"
    );
    assert_restored(restored, &app.dump(), "the latest restore");
}

/// Found by the torture harness: a SIGTERM that arrives while walsync waits to retry a
/// local error (here: its sidecar was unwritable, and is writable again) must still read
/// the last commits before it stops. It used to skip them, report "everything committed is
/// stored" and exit 0 with the last commits missing from the replica.
#[test]
fn a_sigterm_during_a_local_error_still_ships_the_last_commits() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let dest = s3_url(&server, "retrying");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.05"],
        &server.env(),
        dir.path(),
    );
    let storage = server.storage("retrying");
    wait_for(Duration::from_secs(20), "the first generation", || {
        count_objects(&storage, "app", ObjectKind::Snapshot) == 1
    });
    let frozen = Immutable::new(&replica_sidecar(&app.path));
    app.insert(3, 100);
    wait_for(Duration::from_secs(20), "walsync to hit the error", || {
        watch.log().contains("Operation not permitted")
    });
    drop(frozen);
    app.insert(3, 100);
    // Well inside the 5 s retry delay.
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert_restored(
        restore_dump(&storage, "app", dir.path(), None),
        &app.dump(),
        "the restore after the stop",
    );
}

/// Found by the torture harness: an uncounted staged file (left by a run killed before it
/// saved its position) that cannot be removed at start, because the sidecar is read-only
/// for now, must neither stop walsync from starting nor ever be uploaded.
#[test]
fn an_uncounted_file_that_cannot_be_removed_is_never_uploaded() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let dest = s3_url(&server, "leftover");
    let storage = server.storage("leftover");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    wait_for(Duration::from_secs(20), "the first generation", || {
        count_objects(&storage, "app", ObjectKind::Snapshot) == 1
    });
    assert!(watch.terminate(Duration::from_secs(30)).success());

    // As if a killed run had staged segment 1 of some generation with a number past the
    // saved position.
    let sidecar = replica_sidecar(&app.path);
    let stray = "999999999999-01a2000000000000-0000000001-20260101T000000.000Z.wal.gz";
    std::fs::write(sidecar.join(stray), b"not a segment").unwrap();
    let frozen = Immutable::new(&sidecar);
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    wait_for(
        Duration::from_secs(20),
        "the warning about the stray",
        || watch.log().contains("never uploaded"),
    );
    drop(frozen);
    for _ in 0..3 {
        app.insert(3, 100);
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let keys: Vec<String> = storage
        .list("app/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        !keys.iter().any(|k| k.contains("01a2000000000000")),
        "the stray was uploaded: {keys:?}"
    );
    // A later start removes it.
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert!(!sidecar.join(stray).exists());
    assert_restored(
        restore_dump(&storage, "app", dir.path(), None),
        &app.dump(),
        "the restore after the stray",
    );
}

/// Found by the torture harness: when continuity is lost and the new generation's snapshot
/// cannot be staged (here: the sidecar is read-only for a moment), the next attempt must
/// start that new generation again. It used to append the WAL's new frames to the old
/// generation instead, as segments on top of a state they do not follow: the restore
/// failed `PRAGMA integrity_check`.
#[test]
fn a_new_generation_that_could_not_be_staged_is_started_again_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 500);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap();
    drop(replica);

    // While walsync is away the application writes, copies it all into the database file
    // and restarts the WAL: continuity is lost.
    app.exec("UPDATE items SET label = label || ' changed';");
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(20, 500);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    {
        let _frozen = Immutable::new(&replica_sidecar(&app.path));
        assert!(replica.poll().is_err(), "the snapshot cannot be staged");
    }
    app.insert(20, 500);
    assert!(
        matches!(replica.poll().unwrap(), SyncOutcome::NewGeneration { .. }),
        "continuity was lost: the next poll must start the new generation"
    );
    app.insert(5, 500);
    replica.sync().unwrap();
    drop(replica);
    assert_eq!(generations(storage.as_ref(), "app"), 2);
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &app.dump(),
        "the restore after the retried generation",
    );
}
