//! `walsync watch` end to end: the real binary against a real S3 server (SigV4 checked),
//! real SQLite databases written while it runs, then restores compared with the source.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::fixtures::{
    digest, digest_connection, dump, integrity, wait_for, walsync, walsync_err, walsync_ok, AppDb,
    WatchProcess,
};
use walsync::format::Catalog;
use walsync::storage::Storage;
use walsync::UtcTime;
use walsync_testkit::s3server::S3Server;

fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Restore `name` (latest, or as of `at`) into a fresh file in `dir`; the dump, or the error.
fn restore(
    server: &S3Server,
    prefix: &str,
    name: &str,
    dir: &Path,
    at: Option<UtcTime>,
) -> Result<String, String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out = dir.join(format!("restore-{}.db", N.fetch_add(1, Ordering::Relaxed)));
    let dest = s3_url(server, prefix);
    let mut args = vec!["restore", name, "-o", path_str(&out), "-b", &dest];
    let time;
    if let Some(at) = at {
        time = at.to_rfc3339();
        args.extend(["--point-in-time", &time]);
    }
    let result = walsync(&args, &server.env());
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned());
    }
    assert_eq!(integrity(&out), "ok");
    let text = dump(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(text)
}

/// Wait until the latest restore of `name` equals `expected`.
fn wait_until_replicated(server: &S3Server, prefix: &str, name: &str, dir: &Path, expected: &str) {
    let mut last = Err(String::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = restore(server, prefix, name, dir, None);
        if last.as_deref() == Ok(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{name} never caught up; last restore: {last:?}");
}

/// Generations stored for `name`.
fn generations(storage: &dyn Storage, name: &str) -> usize {
    let catalog = Catalog::from_listing(storage.list(&format!("{name}/")).unwrap());
    catalog.databases.get(name).map_or(0, |g| g.len())
}

/// A writer committing numbered rows: commit `i` inserts row `i`, so the database after
/// commit `i` holds exactly rows 1..=i, and the time each commit started and ended is kept.
struct CountingWriter {
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<(UtcTime, UtcTime)>>>,
    thread: std::thread::JoinHandle<rusqlite::Connection>,
}

impl CountingWriter {
    fn start(conn: rusqlite::Connection, every: Duration) -> CountingWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&commits));
        let thread = std::thread::spawn(move || {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS counted(i INTEGER PRIMARY KEY, body BLOB)",
            )
            .unwrap();
            let mut i: i64 = c.lock().unwrap().len() as i64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let start = UtcTime::now();
                conn.execute(
                    "INSERT INTO counted(i, body) VALUES (?1, ?2)",
                    rusqlite::params![
                        i,
                        crate::common::fixtures::noise(i as u64, (i % 7) as usize * 700)
                    ],
                )
                .unwrap();
                c.lock().unwrap().push((start, UtcTime::now()));
                std::thread::sleep(every);
            }
            conn
        });
        CountingWriter {
            stop,
            commits,
            thread,
        }
    }

    fn stop(self) -> (rusqlite::Connection, Vec<(UtcTime, UtcTime)>) {
        self.stop.store(true, Ordering::Relaxed);
        let conn = self.thread.join().unwrap();
        let commits = self.commits.lock().unwrap().clone();
        (conn, commits)
    }
}

/// The `i` rows restored from a dump of a database written by [`CountingWriter`].
fn counted_rows(dump: &str) -> usize {
    dump.lines()
        .filter(|l| l.starts_with("Integer(") && l.matches('|').count() == 2)
        .count()
}

#[test]
fn writes_while_watching_restore_to_the_latest_and_to_points_in_time() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "live");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.2"],
        &server.env(),
        dir.path(),
    );
    let writer = CountingWriter::start(app.conn, Duration::from_millis(15));
    std::thread::sleep(Duration::from_secs(3));
    let (conn, commits) = writer.stop();
    assert!(commits.len() > 50, "only {} commits", commits.len());
    let expected = crate::common::fixtures::dump_of(&conn);
    wait_until_replicated(&server, "live", "app", dir.path(), &expected);

    // Each segment boundary is a point in time: the restore there holds whole commits only,
    // none that started after it, and every commit that ended well before it.
    let storage = server.storage("live");
    let catalog = Catalog::from_listing(storage.list("app/").unwrap());
    let segments: Vec<UtcTime> = catalog.databases["app"]
        .values()
        .flat_map(|g| g.segments.iter().map(|s| s.name.time))
        .collect();
    assert!(
        segments.len() >= 5,
        "expected several segments, got {}",
        segments.len()
    );
    let step = (segments.len() / 6).max(1);
    for at in segments.iter().step_by(step) {
        let restored = restore(&server, "live", "app", dir.path(), Some(*at)).unwrap();
        let j = counted_rows(&restored);
        if j > 0 {
            assert!(commits[j - 1].0 <= *at, "commit {j} started after {at}");
        }
        let ended_before = commits
            .iter()
            .filter(|(_, end)| end.millis() + 50 <= at.millis())
            .count();
        assert!(
            j >= ended_before,
            "at {at}: {j} rows, but {ended_before} commits had ended"
        );
    }
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn three_databases_in_one_process_keep_their_own_replicas() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let romneys = dir.path().join("romneys");
    let smiths = dir.path().join("smiths");
    std::fs::create_dir_all(&romneys).unwrap();
    std::fs::create_dir_all(&smiths).unwrap();
    let mut a = AppDb::create(&romneys, "app.db");
    let mut b = AppDb::create(&smiths, "app.db");
    let mut c = AppDb::create(dir.path(), "billing.db");
    let dest = s3_url(&server, "tenants");
    let c_spec = format!("{}:ledger", c.path.display());
    let watch = WatchProcess::start(
        &[path_str(&a.path), path_str(&b.path), &c_spec, "-b", &dest],
        &server.env(),
        dir.path(),
    );
    let mapping = watch.log();
    assert!(mapping.contains("as romneys-app"), "{mapping}");
    assert!(mapping.contains("as smiths-app"), "{mapping}");
    assert!(mapping.contains("as ledger"), "{mapping}");
    for round in 0..5 {
        a.insert(1 + round, 100);
        b.insert(2, 3000);
        c.insert(3, 10);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(watch.terminate(Duration::from_secs(30)).success());
    for (name, db) in [("romneys-app", &a), ("smiths-app", &b), ("ledger", &c)] {
        let restored = restore(&server, "tenants", name, dir.path(), None).unwrap();
        assert_eq!(restored, db.dump(), "{name}");
    }
    assert_ne!(a.dump(), b.dump());
}

#[test]
fn application_checkpoints_of_every_mode_lose_nothing() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.exec("PRAGMA busy_timeout=200;");
    let dest = s3_url(&server, "ckpt");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.1"],
        &server.env(),
        dir.path(),
    );
    for mode in [
        "PASSIVE", "FULL", "RESTART", "TRUNCATE", "PASSIVE", "TRUNCATE",
    ] {
        for _ in 0..5 {
            app.insert(3, 2000);
        }
        // With walsync holding the WAL, RESTART and TRUNCATE report "busy" rather than
        // restarting it; either way nothing may be lost.
        let _: (i64, i64, i64) = app
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        app.insert(1, 10);
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_until_replicated(&server, "ckpt", "app", dir.path(), &app.dump());
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        generations(&server.storage("ckpt"), "app"),
        1,
        "the application's checkpoints must not break the generation"
    );
}

#[test]
fn vacuum_that_shrinks_and_growth_between_reads_replay_exactly() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "vac");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.05"],
        &server.env(),
        dir.path(),
    );
    // Growth in quick large transactions: the WAL grows while walsync reads it.
    for _ in 0..20 {
        app.insert(8, 64 * 1024);
    }
    wait_until_replicated(&server, "vac", "app", dir.path(), &app.dump());
    app.exec("DELETE FROM items WHERE id % 4 != 0; VACUUM;");
    let pages: i64 = app
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    wait_until_replicated(&server, "vac", "app", dir.path(), &app.dump());
    // The restored file has exactly the shrunken size.
    let out = dir.path().join("vacuumed.db");
    walsync_ok(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), pages as u64 * 4096);
    assert!(watch.terminate(Duration::from_secs(30)).success());
}

#[test]
fn sigkill_in_the_middle_of_writes_then_restart_resumes_the_generation() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "kill");
    let args = [
        path_str(&app.path),
        "-b",
        dest.as_str(),
        "--min-interval",
        "0.1",
    ];
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    let writer = CountingWriter::start(app.conn, Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(1500));
    watch.kill();
    std::thread::sleep(Duration::from_millis(500));
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    std::thread::sleep(Duration::from_millis(1000));
    let (conn, _) = writer.stop();
    let expected = crate::common::fixtures::dump_of(&conn);
    wait_until_replicated(&server, "kill", "app", dir.path(), &expected);
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        generations(&server.storage("kill"), "app"),
        1,
        "{}",
        watch_log(dir.path())
    );
}

fn watch_log(dir: &Path) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "err") {
            logs.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    logs
}

#[test]
fn wal_truncated_while_stopped_starts_a_new_generation_and_loses_nothing() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "trunc");
    let db = app.path.clone();
    let args = [path_str(&db), "-b", dest.as_str()];
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    app.insert(10, 100);
    assert!(watch.terminate(Duration::from_secs(30)).success());

    app.insert(10, 100);
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(1, 100);
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    wait_until_replicated(&server, "trunc", "app", dir.path(), &app.dump());
    let log = watch.log();
    assert!(log.contains("starting a new generation"), "{log}");
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert_eq!(generations(&server.storage("trunc"), "app"), 2);
}

#[test]
fn sigterm_ships_what_min_interval_was_holding_back() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "term");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "60"],
        &server.env(),
        dir.path(),
    );
    app.insert(1, 10);
    std::thread::sleep(Duration::from_millis(300)); // the first commit ships at once
    app.insert(1, 10); // this one waits for --min-interval...
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = watch.terminate(Duration::from_secs(30)); // ...unless walsync is stopped
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        restore(&server, "term", "app", dir.path(), None).unwrap(),
        app.dump()
    );
    // state.json was written on the way out.
    let mut state = Vec::new();
    server
        .storage("term")
        .get("app/state.json", &mut state)
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(state["name"], "app");
}

#[test]
fn storage_outage_is_ridden_out_and_caught_up() {
    let mut server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "outage");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.1"],
        &server.env(),
        dir.path(),
    );
    app.insert(5, 100);
    wait_until_replicated(&server, "outage", "app", dir.path(), &app.dump());
    server.stop();
    for _ in 0..10 {
        app.insert(2, 500);
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = watch.log();
    assert!(log.contains("retrying"), "no retry was logged: {log}");
    server.restart();
    wait_until_replicated(&server, "outage", "app", dir.path(), &app.dump());
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert_eq!(generations(&server.storage("outage"), "app"), 1);
}

#[test]
fn a_300_mib_transaction_streams_through_with_flat_memory() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "big.db");
    let dest = s3_url(&server, "huge");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    // One transaction of 300 MiB of incompressible rows.
    {
        let tx = app.conn.unchecked_transaction().unwrap();
        for i in 0..300 {
            tx.execute(
                "INSERT INTO items(id, label, body) VALUES (?1, 'big', ?2)",
                rusqlite::params![i + 1, crate::common::fixtures::noise(i as u64, 1024 * 1024)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let expected = digest_connection(&app.conn);
    let storage = server.storage("huge");
    wait_for(
        Duration::from_secs(300),
        "the big segment to be stored",
        || {
            storage
                .list("big/wal/")
                .unwrap()
                .iter()
                .any(|o| o.size > 300 * 1024 * 1024)
        },
    );
    let peak_kib = watch.peak_rss_kib();
    eprintln!("walsync peak RSS while shipping a 300 MiB transaction: {peak_kib} KiB");
    assert!(
        peak_kib < 64 * 1024,
        "walsync peaked at {} MiB for a 300 MiB transaction",
        peak_kib / 1024
    );
    // Once everything is stored, walsync truncates the WAL it had to let grow.
    let wal = dir.path().join("big.db-wal");
    wait_for(
        Duration::from_secs(60),
        "walsync to truncate the WAL",
        || std::fs::metadata(&wal).map_or(0, |m| m.len()) < 64 * 1024 * 1024,
    );
    assert!(watch.terminate(Duration::from_secs(60)).success());
    let out = dir.path().join("big-restored.db");
    walsync_ok(
        &["restore", "big", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert_eq!(digest(&out), expected);
}

#[test]
fn library_replicator_checkpoints_keep_the_wal_small_without_breaking_the_generation() {
    use walsync::{Options, Replicator};
    crate::common::logs::init();
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let storage: Arc<dyn Storage> = Arc::new(server.storage("lib"));
    let options = Options {
        min_interval: Duration::from_millis(20),
        passive_checkpoint_frames: 50,
        ..Options::default()
    };
    let replicator = Replicator::start(
        Arc::clone(&storage),
        &[(app.path.clone(), "app".into())],
        options,
    )
    .unwrap();
    for _ in 0..400 {
        app.insert(1, 100);
        std::thread::sleep(Duration::from_millis(3));
    }
    replicator.sync("app").unwrap();
    let key = replicator.snapshot("app").unwrap();
    assert!(key.starts_with("app/snapshots/"), "{key}");
    app.insert(1, 100);
    replicator.sync_all().unwrap();
    replicator.stop(Duration::from_secs(30)).unwrap();

    // Without walsync's checkpoints the WAL would hold all 400+ frames and never restart.
    let frame = 24 + 4096;
    let wal = std::fs::read(dir.path().join("app.db-wal")).unwrap();
    assert!(wal.len() < 400 * frame, "WAL grew to {} bytes", wal.len());
    let restarts = u32::from_be_bytes([wal[12], wal[13], wal[14], wal[15]]);
    assert!(restarts >= 2, "the WAL restarted {restarts} times");
    assert_eq!(generations(storage.as_ref(), "app"), 1);
    assert_eq!(
        restore(&server, "lib", "app", dir.path(), None).unwrap(),
        app.dump()
    );
}

#[test]
fn a_database_replaced_by_rename_starts_a_new_generation_of_the_new_file() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let path = app.path.clone();
    let dest = s3_url(&server, "replaced");
    let watch = WatchProcess::start(
        &[path_str(&path), "-b", &dest, "--min-interval", "0.1"],
        &server.env(),
        dir.path(),
    );
    app.insert(5, 100);
    wait_until_replicated(&server, "replaced", "app", dir.path(), &app.dump());
    drop(app);

    // Another database, built aside, is moved into place (as a restore-and-swap would).
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let mut other = AppDb::create(&staging, "new.db");
    other.insert(7, 300);
    other.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    let expected = other.dump();
    drop(other);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::rename(staging.join("new.db"), &path).unwrap();
    let mut reopened = AppDb {
        conn: rusqlite::Connection::open(&path).unwrap(),
        path: path.clone(),
        next_id: 100,
    };
    reopened.insert(1, 10);
    let expected_after = reopened.dump();
    assert_ne!(expected, expected_after);
    wait_until_replicated(&server, "replaced", "app", dir.path(), &expected_after);
    assert!(watch.log().contains("was replaced"), "{}", watch.log());
    assert!(watch.terminate(Duration::from_secs(30)).success());
    // Deleting the old -wal before the rename may itself be seen first, as a WAL
    // checkpointed away, and start a generation of its own.
    assert!(generations(&server.storage("replaced"), "app") >= 2);
}

#[test]
fn a_second_watcher_on_the_same_name_is_refused() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = s3_url(&server, "twice");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    app.insert(1, 10);
    // The same database again: the lock file refuses it.
    let second = walsync(&["watch", path_str(&app.path), "-b", &dest], &server.env());
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already replicating"), "{err}");
    // Another database under the same name: state.json names the first one.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = AppDb::create(&other_dir, "app.db");
    wait_for(Duration::from_secs(10), "state.json", || {
        let mut body = Vec::new();
        server
            .storage("twice")
            .get("app/state.json", &mut body)
            .is_ok()
    });
    let third = walsync(
        &["watch", path_str(&other.path), "-b", &dest],
        &server.env(),
    );
    assert!(!third.status.success());
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(err.contains("holds backups of"), "{err}");
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert_eq!(generations(&server.storage("twice"), "app"), 1);
}

/// A database quiet for half a minute rests on three descriptors (SQLite's database, WAL and
/// `-shm`), its sidecar lock let go. A second watcher is still refused, and so is a one-shot
/// snapshot: the stamp in the lock file names the first walsync, which runs. The next commit
/// takes the lock back and restores. Killed while resting, the first leaves its stamp, which
/// names a dead process and refuses nobody: a new watcher goes on.
#[cfg(target_os = "linux")]
#[test]
fn a_resting_database_lets_its_lock_go_and_a_second_walsync_is_still_refused() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = (root.path().join("data"), root.path().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let mut app = AppDb::create(&data, "app.db");
    app.insert(1, 10);
    let dest = s3_url(&server, "resting");
    let watch = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &server.env(), &logs);
    let sidecar = std::fs::read_dir(data.join(".app.db-walsync"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let lock = sidecar.join("lock");
    let open_under_data = || {
        let mut open = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/fd", watch.pid()))
            .unwrap()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                if target.starts_with(&data) {
                    open.push(target);
                }
            }
        }
        open.sort();
        open
    };
    // 30 s without a commit, and the database file unwritten for 5 s.
    wait_for(Duration::from_secs(90), "the database to rest", || {
        open_under_data().len() == 3
    });
    let open = open_under_data();
    let expected: Vec<PathBuf> = ["app.db", "app.db-shm", "app.db-wal"]
        .iter()
        .map(|f| data.join(f))
        .collect();
    assert_eq!(open, expected);
    let stamp = std::fs::read_to_string(&lock).unwrap();
    assert!(
        stamp.starts_with(&format!("walsync-holder pid={} ", watch.pid())),
        "{stamp}"
    );

    // Refused by the stamp while the lock is let go, or by the lock if the first walsync has
    // just woken (the second one's own look at the database can wake it); either way the
    // error names the first. (The stamp alone: `sidecar::tests`.)
    let refused = format!("(process {})", watch.pid());
    for command in ["watch", "snapshot"] {
        let out = walsync(&[command, path_str(&app.path), "-b", &dest], &server.env());
        assert!(!out.status.success(), "{command} was not refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("already replicating") && err.contains(&refused),
            "{command}: {err}"
        );
    }
    // Refusing left the stamp as it was.
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), stamp);

    // Stored: the lock was taken back (nothing is written into a sidecar without it). It
    // may already be let go again by the time the restore matches, so that is not checked.
    app.insert(2, 10);
    wait_until_replicated(&server, "resting", "app", root.path(), &app.dump());
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        stamp,
        "not taken over"
    );
    let log = std::fs::read_to_string(&watch.stderr).unwrap();
    assert!(!log.contains("starting over"), "{log}");
    wait_for(
        Duration::from_secs(90),
        "the database to rest again",
        || open_under_data().len() == 3,
    );
    let stamp = std::fs::read_to_string(&lock).unwrap();
    watch.kill();
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), stamp);

    let again = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &server.env(), &logs);
    app.insert(3, 10);
    wait_until_replicated(&server, "resting", "app", root.path(), &app.dump());
    assert!(again.terminate(Duration::from_secs(30)).success());
    // Stopped: no stamp left to refuse anybody.
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "");
}

/// A database restored on another host takes the name over, as a container restarted with a
/// new host name must (state.json records `host:path`; here the path differs, which it tells
/// apart the same way). A database that was not restored from the replica is still refused,
/// and once the restored one has written, the original is refused in turn.
#[test]
fn a_restored_database_takes_the_name_over_from_the_host_it_came_from() {
    let server = S3Server::start();
    let env = server.env();
    let dir = tempfile::tempdir().unwrap();
    let mut first = AppDb::create(dir.path(), "app.db");
    first.insert(5, 100);
    let dest = s3_url(&server, "handover");
    walsync_ok(&["snapshot", path_str(&first.path), "-b", &dest], &env);

    // Not restored from the replica: refused, with the way to hand the name over.
    let stranger_dir = dir.path().join("stranger");
    std::fs::create_dir(&stranger_dir).unwrap();
    let stranger = AppDb::create(&stranger_dir, "app.db");
    let err = walsync_err(&["snapshot", path_str(&stranger.path), "-b", &dest], &env);
    assert!(err.contains("holds backups of"), "{err}");

    // Restored on the "new host": it writes under the name, and its writes restore.
    let new_dir = dir.path().join("new-host");
    std::fs::create_dir(&new_dir).unwrap();
    let restored = new_dir.join("app.db");
    walsync_ok(
        &["restore", "app", "-o", path_str(&restored), "-b", &dest],
        &env,
    );
    assert_eq!(dump(&restored), first.dump());
    {
        let conn = rusqlite::Connection::open(&restored).unwrap();
        conn.execute_batch("INSERT INTO items(id, label) VALUES (1000, 'written on the new host')")
            .unwrap();
    }
    let out = walsync(&["snapshot", path_str(&restored), "-b", &dest], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = dir.path().join("check.db");
    walsync_ok(
        &["restore", "app", "-o", path_str(&check), "-b", &dest],
        &env,
    );
    assert_eq!(dump(&check), dump(&restored));
    assert_eq!(integrity(&check), "ok");

    // The original host, come back: the new host has written since, so it is refused.
    first.insert(1, 10);
    let err = walsync_err(&["snapshot", path_str(&first.path), "-b", &dest], &env);
    assert!(err.contains("newer generation"), "{err}");
}

#[test]
fn an_idle_database_makes_no_storage_requests() {
    use walsync::{Options, Replicator};
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let storage: Arc<dyn Storage> = Arc::new(server.storage("idle"));
    let options = Options {
        min_interval: Duration::from_millis(10),
        // Re-check the WAL often, and checkpoint during the writes, so both are exercised
        // while idle.
        safety_interval: Duration::from_millis(50),
        passive_checkpoint_frames: 20,
        ..Options::default()
    };
    let replicator =
        Replicator::start(storage, &[(app.path.clone(), "app".into())], options).unwrap();
    for _ in 0..50 {
        app.insert(1, 100);
    }
    replicator.sync("app").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    server.clear_requests();
    std::thread::sleep(Duration::from_secs(3));
    let requests = server.requests();
    assert!(requests.is_empty(), "idle requests: {requests:?}");
    // And it still notices the next commit.
    app.insert(1, 100);
    replicator.sync("app").unwrap();
    assert!(!server.requests().is_empty());
    replicator.stop(Duration::from_secs(10)).unwrap();
}
