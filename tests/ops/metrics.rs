//! `watch --metrics-addr`: the endpoint serves the Prometheus text format, parsed here
//! strictly (every sample typed, every value a float), and its counters move with the
//! application's writes. [`scrape`] and [`value`] are the other rooms' way to read the lag.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{free_addr, path_str};
use crate::common::fixtures::{wait_for, walsync_err, AppDb, WatchProcess};
use walsync_testkit::s3server::S3Server;

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
pub(super) type Sample = (String, BTreeMap<String, String>, f64);

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

pub(super) fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

pub(super) fn value(samples: &[Sample], name: &str, db: &str) -> f64 {
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
