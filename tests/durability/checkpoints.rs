//! Checkpoints, the application's and walsync's own: commits made while walsync is
//! stopped and then checkpointed away by the application (1, 1b) are shipped; walsync's own
//! truncating checkpoint (2), two application TRUNCATEs in a row (6a) and a re-pin after a
//! FULL checkpoint (6b) keep one generation; and while storage is slow the application's
//! write lock is never held across an upload (5), and a writer that never pauses sees the
//! WAL restart (7), and a checkpoint that must wait for its interval runs when it is up
//! (8).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    assert_restored, generations, path_str, replicate_until_walsync_checkpointed, restore_dump,
    restore_with_binary, s3_url, start, wait_until_checkpointed,
};
use crate::common::fixtures::{wait_for, AppDb, WatchProcess};
use walsync::storage::s3::{S3Config, S3Storage};
use walsync::storage::Storage;
use walsync::Options;
use walsync_testkit::faultproxy::FaultProxy;
use walsync_testkit::s3server::S3Server;

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

/// A library client for `server` that goes through `endpoint` (a proxy).
fn storage_via(server: &S3Server, prefix: &str, endpoint: &str) -> S3Storage {
    S3Storage::new(S3Config {
        endpoint: Some(endpoint.to_string()),
        ..server.config(prefix)
    })
    .unwrap()
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

/// 7. A writer that never pauses, with SQLite's automatic checkpoints on: walsync reads and
///    checkpoints as soon as the WAL holds `restart_frames` frames it has not read, not only
///    once per `min_interval` (here an hour), so the WAL restarts from its top while the
///    writer goes on, as it does without walsync. (Otherwise it grows until the next
///    interval, and every commit then writes past the end of the file.)
#[test]
fn the_wal_restarts_under_a_writer_that_never_pauses() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("restarts"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.conn
        .execute_batch("PRAGMA wal_autocheckpoint=1000;")
        .unwrap();
    app.conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let options = Options {
        min_interval: Duration::from_secs(3600),
        restart_frames: 200,
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    replicator.sync("app").unwrap();
    let wal = PathBuf::from(format!("{}-wal", app.path.display()));
    let salts = || -> Option<[u8; 8]> {
        use std::os::unix::fs::FileExt;
        let mut salts = [0u8; 8];
        let file = std::fs::File::open(&wal).ok()?;
        file.read_exact_at(&mut salts, 16).ok()?;
        Some(salts)
    };
    let mut last = salts();
    let (mut restarts, mut commits) = (0, 0);
    let started = Instant::now();
    while restarts < 3 && started.elapsed() < Duration::from_secs(60) {
        app.insert(10, 1000);
        commits += 1;
        let now = salts();
        if now != last {
            restarts += 1;
            last = now;
        }
    }
    eprintln!(
        "{restarts} restarts in {commits} commits, {:?}",
        started.elapsed()
    );
    assert!(
        restarts >= 3,
        "the WAL restarted {restarts} times in {commits} commits; walsync waited for its interval"
    );
    replicator.sync("app").unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &app.dump(),
        "the latest restore",
    );
}

/// 8. A checkpoint that comes due less than `min_interval` after the last one runs once the
///    interval is up, with nothing else to wake walsync: it used to wait for the next commit
///    or the safety interval (10 s by default, an hour here), and the WAL could not restart
///    meanwhile.
#[test]
fn a_checkpoint_that_must_wait_runs_when_its_interval_is_up() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("waiting"));
    let mut app = AppDb::create(dir.path(), "app.db");
    let options = Options {
        min_interval: Duration::from_secs(2),
        passive_checkpoint_frames: 1,
        restart_frames: 0,
        safety_interval: Duration::from_secs(3600),
        ..Options::default()
    };
    let replicator = start(&storage, &app.path, options);
    let complete = || -> u64 {
        let text = walsync::metrics::render(&replicator.metrics());
        text.lines()
            .find(|l| {
                l.starts_with("walsync_checkpoints_total") && l.contains("result=\"complete\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    // Large, so that staging it takes a while, and the checkpoint's interval starts that
    // much later than the shipment's.
    app.insert(4000, 1000);
    replicator.sync("app").unwrap();
    wait_for(Duration::from_secs(10), "the first checkpoint", || {
        complete() >= 1
    });
    // Shipped once the interval since the last shipment is up, quickly, which is before
    // the interval since the checkpoint is: due then, but not yet.
    app.insert(1, 100);
    let written = Instant::now();
    wait_for(Duration::from_secs(8), "the checkpoint that waited", || {
        complete() >= 2
    });
    eprintln!("checkpointed {:?} after the commit", written.elapsed());
    replicator.stop(Duration::from_secs(30)).unwrap();
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &app.dump(),
        "the latest restore",
    );
}
