//! `watch --heartbeat-url`: pings while every database's lag is under its bound, and only
//! then, whether the lag comes from a stopped storage, a busy database, a sidecar that
//! cannot be written or a turn at the descriptor budget (the lag counts then too, and only
//! then); a failing heartbeat is only a warning; bad
//! monitoring settings are usage errors that never quote the URL. [`Monitor`] is the
//! monitoring service, counting the pings.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::{scrape, value};
use super::{free_addr, path_str};
use crate::common::fixtures::{
    replica_sidecar, wait_for, walsync, walsync_after, walsync_ok, AppDb, WatchProcess,
};
use crate::common::root::needs_root;
use walsync_testkit::s3server::S3Server;

/// A loopback HTTP server counting the GETs it receives (with their arrival times).
struct Monitor {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Monitor {
    fn start() -> Monitor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let line = text.lines().next().unwrap_or("").to_string();
                seen.lock().unwrap().push((Instant::now(), line));
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK",
                );
            }
        });
        Monitor { addr, hits }
    }

    fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

#[test]
fn heartbeat_only_while_the_lag_is_under_its_bound() {
    let mut s3 = S3Server::start();
    let monitor = Monitor::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let url = format!(
        "http://{}/ping/secret-token-4711?key=hidden-0815",
        monitor.addr
    );
    let dest = format!("s3://{}/heartbeat", s3.bucket());
    let mut env = s3.env();
    // From the environment, as a service would set it; the interval from its flag.
    env.push(("WALSYNC_HEARTBEAT_URL".into(), url.clone()));
    let watch = WatchProcess::start(
        &[
            path_str(&app.path),
            "-b",
            &dest,
            "--heartbeat-interval",
            "1",
            "--heartbeat-max-lag",
            "1",
            "--s3-timeout",
            "2",
        ],
        &env,
        dir.path(),
    );
    wait_for(
        Duration::from_secs(20),
        "heartbeats while caught up",
        || monitor.count() >= 2,
    );
    assert!(monitor
        .hits
        .lock()
        .unwrap()
        .iter()
        .all(|(_, line)| line == "GET /ping/secret-token-4711?key=hidden-0815 HTTP/1.1"));

    // Storage down and a commit waiting longer than --heartbeat-max-lag: no heartbeat.
    s3.stop();
    app.insert(5, 100);
    wait_for(Duration::from_secs(20), "an upload failure logged", || {
        watch.log().contains("failed (")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let silent_from = monitor.count();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        monitor.count(),
        silent_from,
        "a heartbeat was sent while a commit was not stored"
    );

    // Storage back: the commit is stored and heartbeats resume, at most one per interval.
    s3.restart();
    wait_for(
        Duration::from_secs(60),
        "heartbeats after catching up",
        || monitor.count() >= silent_from + 3,
    );
    let hits = monitor.hits.lock().unwrap().clone();
    for pair in hits[silent_from..].windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(900),
            "heartbeats {gap:?} apart"
        );
    }
    let stderr = watch.stderr.clone();
    let status = watch.terminate(Duration::from_secs(30));
    let log = std::fs::read_to_string(stderr).unwrap_or_default();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(
            "heartbeat to http://127.0.0.1 every 1s while every database's lag is under 1s"
        ),
        "{log}"
    );
    for secret in ["secret-token-4711", "hidden-0815"] {
        assert!(
            !log.contains(secret),
            "the heartbeat URL leaked into the log"
        );
    }
}

#[test]
fn a_failing_heartbeat_is_a_warning_and_replication_goes_on() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    // Nothing listens there.
    let url = format!("http://{}/ping/secret-token-4711", free_addr());
    let dest = format!("s3://{}/heartbeat-fails", s3.bucket());
    let watch = WatchProcess::start(
        &[
            path_str(&app.path),
            "-b",
            &dest,
            "--heartbeat-url",
            &url,
            "--heartbeat-interval",
            "0.5",
        ],
        &s3.env(),
        dir.path(),
    );
    wait_for(Duration::from_secs(20), "a heartbeat warning", || {
        watch.log().contains("heartbeat to http://127.0.0.1 failed")
    });
    app.insert(5, 100);
    let out = dir.path().join("restored.db");
    wait_for(Duration::from_secs(20), "the new commit restorable", || {
        let _ = std::fs::remove_file(&out);
        walsync(
            &["restore", "app", "-o", path_str(&out), "-b", &dest],
            &s3.env(),
        )
        .status
        .success()
            && crate::common::fixtures::dump(&out) == app.dump()
    });
    let log = watch.log();
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert!(!log.contains("secret-token-4711"), "{log}");
}

#[test]
fn bad_monitoring_settings_are_usage_errors_that_quote_no_url() {
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let dest = format!("file://{}", dir.path().join("replica").display());
    let db = path_str(&app.path);
    let usage = |args: &[&str], env: &[(String, String)]| {
        let mut all = vec!["watch", db, "-b", &dest];
        all.extend(args);
        let out = walsync(&all, env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = usage(&["--heartbeat-url", "ftp://host/secret-token-4711"], &[]);
    assert!(
        err.contains("--heartbeat-url") && !err.contains("secret"),
        "{err}"
    );
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let err = usage(
        &[],
        &env("WALSYNC_HEARTBEAT_URL", "no url secret-token-4711"),
    );
    assert!(
        err.contains("WALSYNC_HEARTBEAT_URL") && !err.contains("secret"),
        "{err}"
    );
    let mut both = env("WALSYNC_HEARTBEAT_URL", "http://127.0.0.1:9/x");
    both.extend(env("WALSYNC_HEARTBEAT_INTERVAL", "soon"));
    assert!(usage(&[], &both).contains("WALSYNC_HEARTBEAT_INTERVAL"));
    assert!(usage(&["--heartbeat-interval", "0"], &both).contains("--heartbeat-interval"));
    // An address that cannot be bound is a startup error (not usage: exit 1).
    let out = walsync(
        &[
            "watch",
            db,
            "-b",
            &dest,
            "--metrics-addr",
            "no-such-host.invalid:1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics address"));
    assert!(
        !dir.path().join("replica").exists(),
        "nothing is replicated when monitoring cannot start"
    );
}

#[test]
fn heartbeat_keeps_pinging_a_busy_database_that_keeps_up() {
    let s3 = S3Server::start();
    let monitor = Monitor::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let url = format!("http://{}/ping", monitor.addr);
    let dest = format!("s3://{}/busy", s3.bucket());
    // The default --heartbeat-max-lag (5 --min-intervals, at least 5 s).
    let watch = WatchProcess::start(
        &[
            path_str(&app.path),
            "-b",
            &dest,
            "--heartbeat-url",
            &url,
            "--heartbeat-interval",
            "1",
        ],
        &s3.env(),
        dir.path(),
    );
    wait_for(Duration::from_secs(20), "a first heartbeat", || {
        monitor.count() >= 1
    });
    // 10 commits a second for 8 seconds: walsync keeps up, so the pings go on.
    let from = monitor.count();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        app.insert(1, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let pings = monitor.count() - from;
    assert!(
        pings >= 5,
        "{pings} heartbeats in 8 s of 10 commits/s: {}",
        watch.log()
    );
    assert!(watch.terminate(Duration::from_secs(30)).success());
}

#[test]
fn lag_counts_while_the_sidecar_cannot_be_written_and_the_heartbeat_stops() {
    needs_root!("chattr +i on the sidecar");
    let s3 = S3Server::start();
    let monitor = Monitor::start();
    // Under the target directory: the same filesystem as the checkout, which supports chattr.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = base.path();
    let mut app = AppDb::create(dir, "app.db");
    app.insert(5, 100);
    let addr = free_addr();
    let url = format!("http://{}/ping", monitor.addr);
    let dest = format!("s3://{}/frozen", s3.bucket());
    let watch = WatchProcess::start(
        &[
            path_str(&app.path),
            "-b",
            &dest,
            "--min-interval",
            "0.2",
            "--metrics-addr",
            &addr.to_string(),
            "--heartbeat-url",
            &url,
            "--heartbeat-interval",
            "0.5",
            "--heartbeat-max-lag",
            "2",
        ],
        &s3.env(),
        dir,
    );
    let lag = || value(&scrape(addr), "walsync_replication_lag_seconds", "app");
    wait_for(Duration::from_secs(20), "caught up and pinging", || {
        lag() == 0.0 && monitor.count() >= 1
    });

    // The sidecar cannot be written while the application commits: nothing can be
    // staged, so nothing is stored, and the lag must say so.
    let frozen = crate::common::fixtures::Immutable::new(&replica_sidecar(&app.path));
    let started = Instant::now();
    let mut highest: f64 = 0.0;
    let mut pings_at_3s = None;
    while started.elapsed() < Duration::from_secs(6) {
        app.insert(1, 200);
        highest = highest.max(lag());
        if started.elapsed() >= Duration::from_secs(3) && pings_at_3s.is_none() {
            pings_at_3s = Some(monitor.count());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        highest > 4.0,
        "lag at most {highest}s while the sidecar was unwritable for 6 s: {}",
        watch.log()
    );
    assert_eq!(
        Some(monitor.count()),
        pings_at_3s,
        "heartbeats went on while commits waited 3-6 s"
    );

    // Writable again: everything is stored, lag drops, the pings resume.
    drop(frozen);
    let resumed_from = monitor.count();
    wait_for(Duration::from_secs(30), "the lag back near 0", || {
        lag() < 1.0
    });
    wait_for(Duration::from_secs(20), "heartbeats again", || {
        monitor.count() > resumed_from
    });
    let stderr = watch.stderr.clone();
    let status = watch.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    let out = dir.join("restored.db");
    let restore = walsync(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &s3.env(),
    );
    assert!(restore.status.success(), "{restore:?}");
    assert_eq!(crate::common::fixtures::dump(&out), app.dump());
}

/// A database that waits for its turn at the descriptor budget (issue 18) shows the wait as
/// lag: two databases under a descriptor limit that lets only one be busy at a time, one
/// kept busy by a writer, the other written to once. Its lag must grow while it waits and
/// go back to 0 once the busy one rests and lets it take its turn, with its commit stored.
/// (Its thread returned before publishing the lag, so it read 0 while the commit waited:
/// the heartbeat went on for a database that stored nothing.)
#[test]
fn lag_counts_while_a_database_waits_for_its_turn_at_the_descriptor_budget() {
    // 64 for the process and 3 for each database at rest leave 10: one busy database's 7.
    const LIMIT: usize = 80;
    let s3 = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut busy = AppDb::create(&data, "busy.db");
    busy.insert(3, 100);
    let mut waiting = AppDb::create(&data, "waiting.db");
    waiting.insert(3, 100);
    let addr = free_addr();
    let dest = format!("s3://{}/turns", s3.bucket());
    let (stdout, stderr) = (root.path().join("watch.out"), root.path().join("watch.err"));
    let mut command = walsync_after(&format!("ulimit -n {LIMIT}"));
    command
        .args(["watch", "--dir", path_str(&data), "-b", &dest])
        .args(["--metrics-addr", &addr.to_string()])
        .env("RUST_LOG", "walsync=debug")
        .envs(s3.env())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let watch = WatchProcess {
        child: command.spawn().unwrap(),
        stdout,
        stderr,
    };
    // None until the database is listed (the listener is up and its thread has started).
    let stored = |db: &str| {
        std::net::TcpStream::connect(addr).ok()?;
        scrape(addr)
            .into_iter()
            .find(|(n, labels, _)| {
                n == "walsync_stored_objects_total"
                    && labels.get("db").map(String::as_str) == Some(db)
            })
            .map(|(_, _, v)| v)
    };
    wait_for(Duration::from_secs(60), "both databases stored", || {
        stored("busy").is_some_and(|n| n >= 1.0) && stored("waiting").is_some_and(|n| n >= 1.0)
    });

    // A commit to the other one first, so that it holds the place when the writer below
    // starts, and rests (reopening its connection alone) only once the writer waits for it.
    let objects = stored("waiting").unwrap_or(0.0);
    waiting.insert(1, 100);
    wait_for(Duration::from_secs(30), "the first commit stored", || {
        stored("waiting").is_some_and(|n| n > objects)
    });

    // The busy one commits every 200 ms until told to stop, so it keeps the one place.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                busy.insert(1, 200);
                std::thread::sleep(Duration::from_millis(200));
            }
            busy
        })
    };
    // Its commits are stored: it holds the place (the other one, resting, does not).
    let before = stored("busy").unwrap_or(0.0);
    wait_for(
        Duration::from_secs(60),
        "the busy database's commits stored",
        || stored("busy").is_some_and(|n| n >= before + 3.0),
    );

    // Nothing waits in the other one: its lag stays 0. (It has just rested, reopening its
    // connection alone, which as root makes SQLite `fchown` the WAL: that woke it, and, with
    // no turn to take, it showed lag with no commit waiting.)
    let lag_of = |db: &str| value(&scrape(addr), "walsync_replication_lag_seconds", db);
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(5) {
        assert_eq!(lag_of("waiting"), 0.0, "no commit waits: {}", watch.log());
        std::thread::sleep(Duration::from_millis(250));
    }

    waiting.insert(2, 100);
    let committed = Instant::now();
    let objects = stored("waiting").unwrap_or(0.0);
    let mut lag = 0.0;
    wait_for(
        Duration::from_secs(30),
        "the waiting database's lag",
        || {
            lag = lag_of("waiting");
            lag >= 3.0
        },
    );
    // It waited for its turn, and stored nothing meanwhile.
    assert!(committed.elapsed() >= Duration::from_secs(3), "lag {lag}");
    assert_eq!(stored("waiting"), Some(objects), "{}", watch.log());

    // The writer stops; the busy database rests, and the waiting one takes its turn.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let busy = writer.join().unwrap();
    wait_for(
        Duration::from_secs(60),
        "the waiting database caught up",
        || {
            let now = scrape(addr);
            value(&now, "walsync_stored_objects_total", "waiting") > objects
                && value(&now, "walsync_replication_lag_seconds", "waiting") == 0.0
        },
    );
    let log = watch.log();
    assert!(watch.terminate(Duration::from_secs(60)).success(), "{log}");
    assert!(!log.to_lowercase().contains("too many open files"), "{log}");
    for (name, app) in [("waiting", &waiting), ("busy", &busy)] {
        let out = root.path().join(format!("{name}-restored.db"));
        walsync_ok(
            &["restore", name, "-o", path_str(&out), "-b", &dest],
            &s3.env(),
        );
        assert_eq!(crate::common::fixtures::dump(&out), app.dump(), "{name}");
        assert_eq!(crate::common::fixtures::integrity(&out), "ok", "{name}");
    }
}
