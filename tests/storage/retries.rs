//! Retries and faults: a stopped server is a transient error after bounded retries (one
//! warning each, no secrets), a short outage is ridden out, a download cut short resumes
//! where it stopped, and the test server's HTTP faults (500, 503, answers cut short) are
//! all retried.

use std::time::{Duration, Instant};

use super::{get, pseudo_random, temp_file, MIB};
use crate::common::logs::warnings;
use walsync::storage::Storage;
use walsync::ErrorKind;
use walsync_testkit::faults::FaultMix;
use walsync_testkit::s3server::S3Server;

#[test]
fn stopped_server_is_transient_after_bounded_retries() {
    let mut server = S3Server::start();
    let s3 = server.storage("p").with_max_attempts(2);
    warnings(); // capture from now on
    s3.put_bytes("k", b"kept").unwrap();
    server.stop();

    let started = Instant::now();
    let err = get(&s3, "k").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("s3://{}/p: GET k: ", server.bucket())),
        "{message}"
    );
    assert!(message.contains("gave up after 2 attempts"), "{message}");
    assert!(message.contains(&server.endpoint()), "{message}");
    assert!(
        !message.contains("X-Amz-") && !message.contains('?'),
        "{message}"
    );
    let stats = s3.stats();
    assert_eq!((stats.retries, stats.requests - 1), (1, 2), "{stats:?}");
    // One warning per retry, naming the operation, the key and the reason, without secrets.
    let retried: Vec<String> = warnings()
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains(&server.endpoint()))
        .cloned()
        .collect();
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert!(retried[0].contains("GET k: "), "{}", retried[0]);
    assert!(retried[0].contains("attempt 2 of 2"), "{}", retried[0]);
    assert!(
        !retried[0].contains("X-Amz-") && !retried[0].contains('?'),
        "{}",
        retried[0]
    );

    let err = s3.put_bytes("k2", b"x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");

    server.restart();
    assert_eq!(get(&s3, "k").unwrap(), b"kept", "same data after a restart");
}

#[test]
fn retries_ride_out_a_short_outage() {
    let mut server = S3Server::start();
    let s3 = server.storage("p"); // default: 5 attempts, ~3 s of backoff in total
    server.stop();
    let data = pseudo_random(100_000, 4);
    let dir = tempfile::tempdir().unwrap();
    let file = temp_file(&dir, &data);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            server.restart();
        });
        s3.put_file("during/outage", &file).unwrap();
    });
    assert!(s3.stats().retries >= 1, "{:?}", s3.stats());
    assert_eq!(get(&s3, "during/outage").unwrap(), data);
}

#[test]
fn interrupted_download_resumes_where_it_stopped() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let data = pseudo_random(3 * MIB + 5, 6);
    s3.put_bytes("snapshot.db.gz", &data).unwrap();
    server.clear_requests();
    let cut = MIB as u64 + 17;
    server.cut_next_download_after(cut);

    assert_eq!(get(&s3, "snapshot.db.gz").unwrap(), data);

    assert_eq!(s3.stats().retries, 1);
    let ranges: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    // The retry asks only for what is missing (the connection may lose a few in-flight bytes).
    let from: u64 = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or_else(|| panic!("no resuming Range: {ranges:?}"));
    assert!(from > 0 && from <= cut, "resumed from {from}, cut at {cut}");
}

/// The test server's HTTP faults, one kind at a time: the client sees each as transient
/// and retries it (a cut download resumes), with and without `Expect: 100-continue`.
#[test]
fn the_servers_http_faults_are_retried() {
    let server = S3Server::start();
    let s3 = server.storage("faults").with_max_attempts(10);
    let data = pseudo_random(300_000, 8);
    let dir = tempfile::tempdir().unwrap();
    let file = temp_file(&dir, &data);
    let kinds = [
        FaultMix {
            error500: 0.3,
            ..FaultMix::none()
        },
        FaultMix {
            slowdown503: 0.3,
            ..FaultMix::none()
        },
        FaultMix {
            truncate: 0.3,
            ..FaultMix::none()
        },
    ];
    for (kind, mix) in kinds.into_iter().enumerate() {
        server.set_fault_mix(mix);
        for i in 0..4 {
            let (bytes_key, file_key) = (format!("b{kind}-{i}"), format!("f{kind}-{i}"));
            s3.put_bytes(&bytes_key, &data).unwrap();
            s3.put_file(&file_key, &file).unwrap();
            assert_eq!(get(&s3, &bytes_key).unwrap(), data);
            assert_eq!(get(&s3, &file_key).unwrap(), data);
        }
    }
    let counts = server.fault_counts();
    assert!(
        counts.errors500 > 0 && counts.slowdowns503 > 0 && counts.truncations > 0,
        "{counts}"
    );
    assert_eq!(counts.resets + counts.stalls, 0, "{counts}");
    assert!(s3.stats().retries >= counts.injected(), "{:?}", s3.stats());
}
