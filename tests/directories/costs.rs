//! What a directory of many databases costs: file descriptors (a limit too low is said at
//! start and is not fatal), and requests: a thousand replicated databases restarted cost
//! one LIST each and no snapshot, and a new database's first start lists storage once.

use std::time::{Duration, Instant};

use super::{path_str, s3_url, watch};
use crate::common::fixtures::{wait_for, walsync_after, AppDb, WatchProcess};
use walsync::storage::Storage;
use walsync_testkit::s3server::S3Server;

/// Snapshots stored under `storage`.
fn snapshots_in(storage: &dyn Storage) -> usize {
    storage
        .list("")
        .unwrap()
        .iter()
        .filter(|o| o.key.contains("/snapshots/"))
        .count()
}

/// Wait until `server` has had no new request for 5 s (at most `limit` from `started`);
/// how long after `started` the last one came.
fn quiet_after(server: &S3Server, started: Instant, limit: Duration) -> Duration {
    let (mut seen, mut changed) = (0, Instant::now());
    while changed.elapsed() < Duration::from_secs(5) {
        assert!(started.elapsed() < limit, "not quiet after {limit:?}");
        let now = server.requests().len();
        if now != seen {
            (seen, changed) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    changed.duration_since(started)
}

/// Under a descriptor limit too low for the databases found, walsync says so at start:
/// which limit, how many databases it allows, how to raise it. The databases found take
/// turns for the descriptors left (see `databases_that_fit_..._take_turns`); those that do
/// not fit are skipped with a warning (and tried again later), not fatal to the others.
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
    // One at a time once the limit is reached, each after the one before rested: slow.
    let started = Instant::now();
    wait_for(Duration::from_secs(240), "every file considered", || {
        considered(&log()) >= 40
    });
    eprintln!("every file considered in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let log = log();
    assert!(running, "walsync watch stopped: {log}");
    assert!(log.contains("databases found wait their turn"), "{log}");
    assert!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains(&format!(
                "RLIMIT_NOFILE is 150, which allows about {} databases",
                // Three descriptors an idle database on Linux, four elsewhere.
                (150 - 64) / if cfg!(target_os = "linux") { 3 } else { 4 }
            ))
            && l.contains("ulimit -n")),
        "{log}"
    );
    // Some fit (three or four descriptors each once idle, more while busy), the rest are skipped, each with a
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

/// More databases than could all be busy at once under the descriptor limit, though all fit
/// at rest: they take turns (the descriptor budget), so none runs out of descriptors. Every
/// one is stored, the stop stores everything, and a restart takes no snapshot. (Without the
/// turns, 4,000 databases under a limit of 20,000 failed for minutes on "too many open
/// files", and the next start took a thousand new snapshots.)
#[test]
fn databases_that_fit_the_descriptor_limit_only_at_rest_take_turns() {
    // At rest: 3 each (4 elsewhere) and 64 for the process, 244 (304) of 360. Busy, six or
    // seven each: 60 at once would need over 400.
    const DATABASES: usize = 60;
    const LIMIT: usize = 360;
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for i in 0..DATABASES {
        let mut db = AppDb::create(&data, &format!("db{i:02}.db"));
        db.insert(3, 100);
    }
    let dest = s3_url(&server, "turns");
    let storage = server.storage("turns");
    let snapshots = || snapshots_in(&storage);
    let start = |run: &str| {
        let (stdout, stderr) = (
            root.path().join(format!("{run}.out")),
            root.path().join(format!("{run}.err")),
        );
        let mut command = walsync_after(&format!("ulimit -n {LIMIT}"));
        command
            .args(["watch", "--dir", path_str(&data), "-b", &dest])
            .envs(server.env())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        WatchProcess {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    };
    let out_of_descriptors = |log: &str| {
        log.lines()
            .filter(|l| l.to_lowercase().contains("too many open files"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    };

    let first = start("first");
    wait_for(Duration::from_secs(180), "every database stored", || {
        snapshots() >= DATABASES
    });
    let log = first.log();
    assert!(first.terminate(Duration::from_secs(120)).success(), "{log}");
    let log = std::fs::read_to_string(root.path().join("first.err")).unwrap();
    assert_eq!(out_of_descriptors(&log), "");
    assert_eq!(
        log.matches("everything committed is stored").count(),
        DATABASES,
        "{log}"
    );
    let stored = snapshots();
    assert_eq!(stored, DATABASES);

    server.clear_requests();
    let second = start("second");
    let started = Instant::now();
    wait_for(Duration::from_secs(60), "every database watched", || {
        second.log().matches(" as db").count() >= DATABASES
    });
    quiet_after(&server, started, Duration::from_secs(120));
    assert!(second.terminate(Duration::from_secs(120)).success());
    let log = std::fs::read_to_string(root.path().join("second.err")).unwrap();
    assert_eq!(out_of_descriptors(&log), "");
    assert!(!log.contains("new generation"), "{log}");
    assert_eq!(snapshots(), stored, "{log}");
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
    let snapshots = || snapshots_in(&storage);
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
    let quiet_after = quiet_after(&server, started, Duration::from_secs(60));
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
    // Each database's own (not one database's three).
    wait_for(Duration::from_secs(30), "three state.json stored", || {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "PUT" && r.path.ends_with("/state.json"))
            .map(|r| r.path.clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
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
