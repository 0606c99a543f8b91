//! Operations features of the real binary: `watch --metrics-addr` (Prometheus text),
//! `watch --heartbeat-url` (only while every database's lag is under a bound), the lag
//! itself whatever holds commits back, progress output of `restore` and `snapshot` (only
//! on a terminal), timestamped log lines, and `walsync help COMMAND` (every flag
//! documented, one rule for prune).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::fixtures::{
    replica_sidecar, wait_for, walsync, walsync_err, AppDb, WatchProcess,
};
use crate::common::s3server::S3Server;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A free port on 127.0.0.1 (bound and released: another process could take it, but
/// nothing else in these tests picks ports this way).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Send `request` raw and return (status code, body).
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the Prometheus text format strictly: every line is a `# HELP`/`# TYPE` comment or
/// `name{label="value",...} value` with a float value; every sample's family has a TYPE.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed = BTreeMap::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("bad comment {line:?}"));
            assert!(is_name(name), "bad metric name in {line:?}");
            match kind {
                Some("HELP") => assert!(rest.is_some_and(|r| !r.is_empty()), "{line:?}"),
                Some("TYPE") => {
                    let kind = rest.unwrap_or("");
                    assert!(["counter", "gauge"].contains(&kind), "{line:?}");
                    typed.insert(name.to_string(), kind.to_string());
                }
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let open = line
            .find('{')
            .unwrap_or_else(|| panic!("no labels in {line:?}"));
        let close = line
            .rfind("} ")
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let name = &line[..open];
        assert!(is_name(name), "bad metric name in {line:?}");
        assert!(
            typed.contains_key(name),
            "{name} has no TYPE line before it"
        );
        let mut labels = BTreeMap::new();
        for pair in line[open + 1..close].split(',') {
            let (key, value) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
            assert!(is_name(key), "bad label name in {line:?}");
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or_else(|| panic!("unquoted label value in {line:?}"));
            labels.insert(key.to_string(), value.to_string());
        }
        let value: f64 = line[close + 2..]
            .parse()
            .unwrap_or_else(|_| panic!("value is not a float in {line:?}"));
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

fn value(samples: &[Sample], name: &str, db: &str) -> f64 {
    samples
        .iter()
        .find(|(n, labels, _)| n == name && labels.get("db").map(String::as_str) == Some(db))
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no {name}{{db=\"{db}\"}} in {samples:?}"))
}

#[test]
fn metrics_are_prometheus_text_and_move_with_writes() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let addr = free_addr();
    let dest = format!("s3://{}/metrics", s3.bucket());
    let watch = WatchProcess::start(
        &[
            path_str(&app.path),
            "-b",
            &dest,
            "--metrics-addr",
            &addr.to_string(),
        ],
        &s3.env(),
        dir.path(),
    );
    wait_for(Duration::from_secs(20), "the base snapshot stored", || {
        value(&scrape(addr), "walsync_stored_objects_total", "app") >= 1.0
    });
    let before = scrape(addr);
    for family in [
        "walsync_replication_lag_seconds",
        "walsync_last_stored_commit_timestamp_seconds",
        "walsync_stored_bytes_total",
        "walsync_upload_errors_total",
        "walsync_upload_retries_total",
        "walsync_staged_bytes",
        "walsync_staged_objects",
    ] {
        value(&before, family, "app");
    }
    assert!(before
        .iter()
        .any(|(n, l, _)| n == "walsync_checkpoints_total" && l.get("result").is_some()));
    let bytes = value(&before, "walsync_stored_bytes_total", "app");
    let objects = value(&before, "walsync_stored_objects_total", "app");
    assert!(bytes > 0.0);

    app.insert(50, 2000);
    wait_for(Duration::from_secs(20), "the new segment counted", || {
        let now = scrape(addr);
        value(&now, "walsync_stored_objects_total", "app") > objects
            && value(&now, "walsync_stored_bytes_total", "app") > bytes
            && value(&now, "walsync_replication_lag_seconds", "app") == 0.0
    });
    let after = scrape(addr);
    let newest = value(
        &after,
        "walsync_last_stored_commit_timestamp_seconds",
        "app",
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - newest).abs() < 60.0,
        "newest commit {newest}, now {now}"
    );
    assert_eq!(value(&after, "walsync_upload_errors_total", "app"), 0.0);
    assert_eq!(value(&after, "walsync_staged_objects", "app"), 0.0);

    // Other paths, other methods and garbage: answers, never a dead listener.
    assert_eq!(http(addr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(addr, b"\x00\xff garbage\r\n\r\n").0, 400);
    // Longer than the 8 KiB the listener reads (sent whole, so no reset cuts the answer).
    assert_eq!(http(addr, &[b'A'; 8192]).0, 400);
    {
        // A client that connects and says nothing is dropped after the read timeout.
        let _silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    scrape(addr);

    // A second walsync cannot listen on the same address: a clear startup error.
    let other = AppDb::create(dir.path(), "other.db");
    let error = walsync_err(
        &[
            "watch",
            path_str(&other.path),
            "-b",
            &dest,
            "--metrics-addr",
            &addr.to_string(),
        ],
        &s3.env(),
    );
    assert!(
        error.contains("metrics address") && error.contains(&addr.to_string()),
        "{error}"
    );
    assert!(watch.terminate(Duration::from_secs(30)).success());
}

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
fn progress_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let dest = format!("file://{}", root.display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(200, 4000);
    let snapshot = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snapshot.status.success());
    let out = dir.path().join("restored.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success());
    for output in [&snapshot, &restore] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains('\r') && !stderr.contains("MiB"),
            "progress on a non-terminal stderr: {stderr:?}"
        );
    }

    // On a terminal (script(1) gives the command one), the line is there.
    let out2 = dir.path().join("restored2.db");
    let command = format!(
        "{} restore app -o {} -b {dest}",
        env!("CARGO_BIN_EXE_walsync"),
        out2.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1) from util-linux gives the command a terminal");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{text}");
    assert!(
        text.contains("walsync restore: downloading") && text.contains("1 objects"),
        "{text:?}"
    );
}

/// The flags `walsync COMMAND --help` lists (None if there is no such command yet).
fn flags_of(command: &str) -> Option<Vec<String>> {
    let out = walsync(&[command, "--help"], &[]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let options = text.split("Options:").nth(1)?;
    let options = options.split("\n\n").next()?;
    let mut flags = Vec::new();
    for line in options.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue; // a continued description
        }
        for token in line.split_whitespace() {
            let token = token.trim_end_matches(',');
            if !token.starts_with('-') {
                break;
            }
            if token != "--help" {
                flags.push(token.to_string());
            }
        }
    }
    Some(flags)
}

/// True if `text` has `word` with no name character right after or before it.
fn mentions(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

#[test]
fn help_pages_document_every_flag_of_every_command() {
    let index = walsync(&["help"], &[]);
    assert!(index.status.success());
    let index = String::from_utf8_lossy(&index.stdout).into_owned();
    let mut checked = 0;
    for command in ["watch", "snapshot", "list", "status", "restore", "prune"] {
        assert!(
            mentions(&index, command),
            "walsync help does not list {command}"
        );
        let page = walsync(&["help", command], &[]);
        assert!(page.status.success(), "walsync help {command} failed");
        let page = String::from_utf8_lossy(&page.stdout).into_owned();
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "ENVIRONMENT",
            "EXIT STATUS",
            "EXAMPLES",
        ] {
            assert!(
                page.lines().any(|l| l == section),
                "walsync help {command} has no {section} section"
            );
        }
        let Some(flags) = flags_of(command) else {
            eprintln!("walsync {command} does not exist in this build yet: not checked");
            continue;
        };
        assert!(!flags.is_empty(), "no flags parsed for {command}");
        for flag in &flags {
            assert!(
                mentions(&page, flag),
                "walsync help {command} does not mention {flag}"
            );
        }
        // And every WALSYNC_* variable the flag summary names.
        let summary =
            String::from_utf8_lossy(&walsync(&[command, "--help"], &[]).stdout).into_owned();
        for word in summary.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("WALSYNC_") {
                assert!(mentions(&page, word), "walsync help {command}: no {word}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} commands checked");
    let unknown = walsync(&["help", "nosuch"], &[]);
    assert_eq!(unknown.status.code(), Some(2));
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

/// True if `line` starts with a UTC RFC 3339 time with milliseconds and a space.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() > 25
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && &b[23..25] == b"Z "
}

#[test]
fn every_log_line_has_a_utc_timestamp_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let watch = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &[], dir.path());
    app.insert(5, 100);
    std::thread::sleep(Duration::from_millis(300));
    let stderr = watch.stderr.clone();
    let stdout = watch.stdout.clone();
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(stderr).unwrap();
    assert!(log.lines().count() >= 4, "{log}");
    for line in log.lines() {
        assert!(starts_with_timestamp(line), "no timestamp: {line:?}");
    }
    let today = walsync::UtcTime::now().to_rfc3339();
    assert!(log.starts_with(&today[..10]), "{log}");
    // "watching X as Y" is a log line; watch prints no data on stdout.
    assert!(log.contains(" watching "), "{log}");
    assert_eq!(std::fs::read_to_string(stdout).unwrap(), "");

    // One-shot commands: their messages timestamped on stderr, their data on stdout.
    let out = dir.path().join("out.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success());
    let text = String::from_utf8_lossy(&restore.stderr);
    assert!(text.contains("restored app"), "{text}");
    assert!(text.lines().all(starts_with_timestamp), "{text}");
    let list = walsync(&["list", "-b", &dest], &[]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("app"));
    assert_eq!(String::from_utf8_lossy(&list.stderr), "");

    // Off, for loggers that stamp lines themselves: by variable, and by flag (also after
    // the command, like -v).
    let env = [("WALSYNC_LOG_TIMESTAMPS".to_string(), "0".to_string())];
    for (args, env) in [
        (
            vec!["restore", "app", "-o", "OUT", "-b", &dest, "--force"],
            &env[..],
        ),
        (
            vec![
                "restore",
                "app",
                "-o",
                "OUT",
                "-b",
                &dest,
                "--force",
                "--no-log-timestamps",
                "-v",
            ],
            &[][..],
        ),
    ] {
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "OUT" { path_str(&out) } else { a })
            .collect();
        let restore = walsync(&args, env);
        let text = String::from_utf8_lossy(&restore.stderr);
        assert!(restore.status.success(), "{args:?}: {text}");
        assert!(text.contains("INFO  walsync: restored app"), "{text}");
        assert!(!text.lines().any(starts_with_timestamp), "{args:?}: {text}");
    }
    let bad = [("WALSYNC_LOG_TIMESTAMPS".to_string(), "maybe".to_string())];
    let out = walsync(&["list", "-b", &dest], &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WALSYNC_LOG_TIMESTAMPS"));
}

#[test]
fn verbose_is_accepted_before_and_after_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let app = AppDb::create(dir.path(), "app.db");
    let snapshot = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snapshot.status.success(), "{snapshot:?}");
    for args in [
        vec!["-v", "list", "-b", &dest],
        vec!["list", "-b", &dest, "-v"],
        vec!["list", "--verbose", "-b", &dest],
    ] {
        let out = walsync(&args, &[]);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("app"));
    }
    // At debug level, debug lines appear.
    let quiet = walsync(&["status", "-b", &dest], &[]);
    let loud = walsync(&["status", "-b", &dest, "-v"], &[]);
    assert!(quiet.status.success() && loud.status.success());
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("DEBUG"));
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("DEBUG"),
        "{loud:?}"
    );
}

/// `text` with every run of whitespace made one space.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn help_and_dash_dash_help_say_the_same_rule_and_summary() {
    // prune's rule: the note of `prune --help` is a paragraph of `help prune`.
    let short = walsync(&["prune", "--help"], &[]);
    assert!(short.status.success());
    let short = String::from_utf8_lossy(&short.stdout).into_owned();
    let page = walsync(&["help", "prune"], &[]);
    let page = words(&String::from_utf8_lossy(&page.stdout));
    let notes = short
        .split("Notes:")
        .nth(1)
        .unwrap_or_else(|| panic!("no notes in {short}"));
    let rule = words(notes.split("Exit codes:").next().unwrap());
    assert!(rule.len() > 200, "{rule}");
    assert!(
        page.contains(&rule),
        "prune --help says {rule:?}; help prune: {page}"
    );
    assert!(rule.contains("newest snapshot"), "{rule}");
    // Every command's one-line summary in `walsync help` is the one its page gives.
    let index = String::from_utf8_lossy(&walsync(&["help"], &[]).stdout).into_owned();
    for command in ["watch", "snapshot", "list", "status", "restore", "prune"] {
        let summary = index
            .lines()
            .find_map(|l| l.trim().strip_prefix(command))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{command} not in {index}"));
        let page = String::from_utf8_lossy(&walsync(&["help", command], &[]).stdout).into_owned();
        let name = format!("walsync {command} - {summary}");
        assert!(
            page.lines().any(|l| l.trim() == name),
            "walsync help says {summary:?}, its page: {page}"
        );
    }
}
