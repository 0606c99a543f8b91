//! The S3 storage client against a real (in-process) S3 server: real HTTP, real SigV4.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::faults::FaultMix;
use crate::common::fixtures::{wait_for, AppDb, WatchProcess};
use crate::common::logs::warnings;
use crate::common::s3server::{Options, PrivateCa, S3Server};
use walsync::storage::s3::{CaRoots, S3Config, S3Storage, STALE_UPLOAD_AGE};
use walsync::storage::{Destination, ObjectInfo, Storage};
use walsync::ErrorKind;

const MIB: usize = 1024 * 1024;

/// Deterministic bytes that do not compress and do not repeat with any short period.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn get(storage: &dyn Storage, key: &str) -> walsync::Result<Vec<u8>> {
    let mut out = Vec::new();
    let n = storage.get(key, &mut out)?;
    assert_eq!(
        n,
        out.len() as u64,
        "get must return the number of bytes written"
    );
    Ok(out)
}

fn temp_file(dir: &tempfile::TempDir, data: &[u8]) -> File {
    let path = dir.path().join("source.bin");
    File::create(&path).unwrap().write_all(data).unwrap();
    File::open(&path).unwrap()
}

/// The ETag the server gives an object, asked for directly (not through our client).
fn server_etag(server: &S3Server, object: &str) -> String {
    use rusty_s3::S3Action;
    let bucket = rusty_s3::Bucket::new(
        server.endpoint().parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        server.bucket().to_string(),
        "us-east-1",
    )
    .unwrap();
    let credentials = rusty_s3::Credentials::new(server.access_key(), server.secret_key());
    let url = bucket
        .head_object(Some(&credentials), object)
        .sign(Duration::from_secs(60));
    let response = ureq::head(url.as_str()).call().expect("HEAD object");
    response.headers()["etag"].to_str().unwrap().to_string()
}

#[test]
fn put_get_bytes_round_trip_under_the_prefix() {
    let server = S3Server::start();
    let s3 = server.storage("db/prefix");
    assert_eq!(s3.describe(), format!("s3://{}/db/prefix", server.bucket()));

    s3.put_bytes("app/state.json", b"{\"generation\":1}")
        .unwrap();
    assert_eq!(get(&s3, "app/state.json").unwrap(), b"{\"generation\":1}");
    // The object key is prefix + "/" + key: that is where s3s-fs stored it.
    let on_disk = server
        .root()
        .join(server.bucket())
        .join("db/prefix/app/state.json");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"{\"generation\":1}");

    s3.put_bytes("app/state.json", b"replaced").unwrap();
    assert_eq!(get(&s3, "app/state.json").unwrap(), b"replaced");
    s3.put_bytes("empty", b"").unwrap();
    assert_eq!(get(&s3, "empty").unwrap(), b"");

    // Without a prefix, keys are object keys.
    let root = server.storage("");
    assert_eq!(root.describe(), format!("s3://{}", server.bucket()));
    assert_eq!(get(&root, "db/prefix/app/state.json").unwrap(), b"replaced");
}

#[test]
fn put_file_small_is_one_put_with_content_length() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(300 * 1024 + 7, 1);
    let file = temp_file(&dir, &data);
    server.clear_requests();

    s3.put_file("snap/0001.db.gz", &file).unwrap();

    let puts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert_eq!(
        puts[0].path,
        format!("/{}/p/snap/0001.db.gz", server.bucket())
    );
    assert_eq!(puts[0].content_length, Some(data.len() as u64));
    assert!(!puts[0].chunked, "S3 refuses chunked uploads");
    assert!(!puts[0].has_param("uploadId"));
    assert_eq!(s3.stats().multipart_uploads, 0);
    assert_eq!(get(&s3, "snap/0001.db.gz").unwrap(), data);
}

#[test]
fn put_file_larger_than_a_part_uses_multipart() {
    let server = S3Server::start();
    let s3 = server.storage("p").with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(12 * MIB + MIB / 2 + 3, 2);
    let file = temp_file(&dir, &data);
    server.clear_requests();

    s3.put_file("big/wal.gz", &file).unwrap();

    let requests = server.requests();
    let parts: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.has_param("partNumber") && r.has_param("uploadId"))
        .collect();
    let lengths: Vec<_> = parts.iter().map(|r| r.content_length).collect();
    let last = (data.len() - 10 * MIB) as u64;
    assert_eq!(
        lengths,
        vec![Some(5 * MIB as u64), Some(5 * MIB as u64), Some(last)],
        "{requests:?}"
    );
    assert!(parts.iter().all(|r| !r.chunked));
    assert!(requests
        .iter()
        .any(|r| r.method == "POST" && r.has_param("uploads")));
    assert!(requests
        .iter()
        .any(|r| r.method == "POST" && r.has_param("uploadId")));
    let stats = s3.stats();
    assert_eq!((stats.multipart_uploads, stats.parts_uploaded), (1, 3));

    // The server assembled a 3-part object (multipart ETags end in -<parts>)...
    let etag = server_etag(&server, "p/big/wal.gz");
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
    // ... with exactly our bytes, downloaded whole (beyond any default body limit).
    assert_eq!(get(&s3, "big/wal.gz").unwrap(), data);
    assert_eq!(
        s3.list("big/").unwrap(),
        vec![ObjectInfo {
            key: "big/wal.gz".into(),
            size: data.len() as u64
        }]
    );
}

#[test]
fn failed_multipart_upload_is_aborted() {
    let server = S3Server::start();
    let s3 = server.storage("p").with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source.bin");
    std::fs::write(&path, pseudo_random(11 * MIB, 3)).unwrap();
    // Opened for writing only: its size is known but reading it fails, after the upload was
    // created.
    let unreadable = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    server.clear_requests();

    let err = s3.put_file("big/broken", &unreadable).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("big/broken"), "{err}");
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.has_param("uploadId")),
        "the upload must be aborted: {requests:?}"
    );
    assert_eq!(s3.stats().retries, 0, "a local read error is not retried");
    assert_eq!(s3.stats().multipart_uploads, 0);
    assert_eq!(
        get(&s3, "big/broken").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // s3s-fs keeps parts as `.upload_id-*` files in its root until completed or aborted.
    let leftovers: Vec<_> = std::fs::read_dir(server.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn list_follows_continuation_tokens_past_1000_objects() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let count = 1003;
    let mut expected: Vec<String> = (0..count)
        .map(|i| format!("gen/wal/{i:08x}.wal.gz"))
        .collect();
    // Neighbours that must not show up in a listing of "gen/wal/".
    s3.put_bytes("gen/wal-old", b"x").unwrap(); // (a file "gen/wal" could not coexist in s3s-fs)
    s3.put_bytes("gen/snapshot.gz", b"x").unwrap();
    server
        .storage("")
        .put_bytes("outside-the-prefix", b"x")
        .unwrap();
    std::thread::scope(|scope| {
        for chunk in expected.chunks(count / 4 + 1) {
            let s3 = &s3;
            scope.spawn(move || {
                for key in chunk.iter().rev() {
                    s3.put_bytes(key, key.as_bytes()).unwrap();
                }
            });
        }
    });
    expected.sort();

    // Default page size: S3 (and s3s-fs) return at most 1000 keys per page.
    server.clear_requests();
    let listed = s3.list("gen/wal/").unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys.len(), expected.len(), "first keys: {:?}", &keys[..3]);
    if let Some(i) = (0..keys.len()).find(|&i| keys[i] != expected[i]) {
        panic!("listing differs at {i}: {:?} != {:?}", keys[i], expected[i]);
    }
    assert!(listed.iter().all(|o| o.size == o.key.len() as u64));
    let pages: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.has_param("list-type"))
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(!pages[0].has_param("continuation-token"));
    assert!(pages[1].has_param("continuation-token"));

    // Smaller pages, counted by the client.
    let small = server.storage("p").with_list_page_size(100);
    let all = small.list("").unwrap();
    assert_eq!(all.len(), count + 2);
    assert_eq!(small.stats().list_pages, 11);
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(all, sorted);
    assert!(all.iter().all(|o| o.key != "outside-the-prefix"));
    assert!(s3.list("nothing/here/").unwrap().is_empty());
}

#[test]
fn missing_key_and_missing_bucket_are_not_found() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let err = get(&s3, "app/missing.json").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "s3://{}/p: GET app/missing.json: ",
            server.bucket()
        )),
        "{message}"
    );
    assert!(message.contains("404"), "{message}");
    assert!(!message.contains("X-Amz-"), "{message}");
    // The server's answer is data, not only text.
    assert_eq!(err.http_status(), Some(404), "{err}");
    assert_eq!(err.s3_code(), Some("NoSuchKey"), "{err}");

    let mut config = server.config("p");
    config.bucket = "no-such-bucket".into();
    let missing = S3Storage::new(config).unwrap();
    let errors = [
        missing.list("").unwrap_err(),
        missing.put_bytes("k", b"x").unwrap_err(),
        get(&missing, "k").unwrap_err(),
        missing.delete("k").unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let message = err.to_string();
        assert!(
            message.contains("bucket \"no-such-bucket\" does not exist"),
            "{message}"
        );
        assert_eq!(err.s3_code(), Some("NoSuchBucket"), "{message}");
    }
}

#[test]
fn wrong_credentials_are_auth_errors_without_secrets() {
    let server = S3Server::start();
    server
        .storage("p")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let secret = "definitely-not-the-secret";
    let wrong_secret = S3Storage::new(S3Config {
        secret_key: secret.into(),
        ..server.config("p")
    })
    .unwrap();
    let wrong_key = S3Storage::new(S3Config {
        access_key: "nobody".into(),
        ..server.config("p")
    })
    .unwrap();

    // A big upload is refused before its body is sent (Expect: 100-continue), rather than
    // by a connection closed in the middle, which would look like a network failure.
    let dir = tempfile::tempdir().unwrap();
    let big = temp_file(&dir, &pseudo_random(15 * MIB, 5));
    let errors = [
        get(&wrong_secret, "app/state.json").unwrap_err(),
        wrong_secret.put_bytes("app/state.json", b"x").unwrap_err(),
        wrong_secret.put_file("app/big", &big).unwrap_err(),
        wrong_secret.list("").unwrap_err(),
        get(&wrong_key, "app/state.json").unwrap_err(),
    ];
    for (i, err) in errors.iter().enumerate() {
        let message = err.to_string();
        assert_eq!(err.kind(), ErrorKind::Auth, "{message}");
        // The server's code, and a hint chosen by it.
        let expected = if i < 4 {
            "access denied (HTTP 403 SignatureDoesNotMatch): the secret key does not match the \
             access key: check AWS_SECRET_ACCESS_KEY"
        } else {
            "access denied (HTTP 403 NotSignedUp: Your account is not signed up): check the \
             credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and their permissions"
        };
        assert!(message.ends_with(expected), "{message}");
        assert!(message.contains("403"), "{message}");
        assert!(
            message.starts_with(&format!("s3://{}/p: ", server.bucket())),
            "{message}"
        );
        for leak in [
            secret,
            server.secret_key(),
            "X-Amz-Signature",
            "X-Amz-Credential",
            "?",
        ] {
            assert!(!message.contains(leak), "{leak:?} in {message}");
        }
    }
    assert!(
        errors[0].to_string().contains("GET app/state.json"),
        "{}",
        errors[0]
    );
    // Not retried: a wrong key stays wrong.
    assert_eq!(wrong_secret.stats().retries, 0);
    assert_eq!(get(&server.storage("p"), "app/state.json").unwrap(), b"{}");
}

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

#[test]
fn delete_removes_and_ignores_missing_keys() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    s3.put_bytes("a/1", b"1").unwrap();
    s3.put_bytes("a/2", b"2").unwrap();
    s3.delete("a/1").unwrap();
    assert_eq!(get(&s3, "a/1").unwrap_err().kind(), ErrorKind::NotFound);
    let keys: Vec<String> = s3.list("a/").unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(keys, vec!["a/2"]);
    s3.delete("a/1").unwrap();
    s3.delete("never/existed").unwrap();
}

#[test]
fn invalid_keys_are_refused_before_any_request() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    server.clear_requests();
    for key in ["/abs", "a/../b", "", "a//b"] {
        assert_eq!(
            s3.put_bytes(key, b"x").unwrap_err().kind(),
            ErrorKind::Invalid,
            "{key:?}"
        );
    }
    assert!(server.requests().is_empty());
}

#[test]
fn open_builds_file_storage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let storage = walsync::storage::open(&Destination::parse(&url).unwrap(), None).unwrap();
    assert_eq!(storage.describe(), url);
    storage.put_bytes("x/y", b"z").unwrap();
    assert_eq!(std::fs::read(dir.path().join("x/y")).unwrap(), b"z");
}

/// Standard base64 with padding, written out here to check `Content-MD5` headers
/// independently of walsync's own.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn md5_base64(data: &[u8]) -> String {
    use md5::Digest;
    base64(&md5::Md5::digest(data))
}

/// Start a multipart upload of `object` and leave it incomplete, with an independent client.
fn start_upload(server: &S3Server, object: &str) {
    use rusty_s3::S3Action;
    let bucket = rusty_s3::Bucket::new(
        server.endpoint().parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        server.bucket().to_string(),
        "us-east-1",
    )
    .unwrap();
    let credentials = rusty_s3::Credentials::new(server.access_key(), server.secret_key());
    let url = bucket
        .create_multipart_upload(Some(&credentials), object)
        .sign(Duration::from_secs(60));
    ureq::post(url.as_str())
        .send_empty()
        .expect("CreateMultipartUpload");
}

/// walsync itself, with `env` and none of the test's own AWS or TLS settings.
fn walsync(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walsync"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") || key.starts_with("SSL_CERT") || key.starts_with("WALSYNC_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("running walsync")
}

#[test]
fn every_request_is_signed_in_the_authorization_header() {
    let server = S3Server::start();
    let s3 = server.storage("signed").with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let big = temp_file(&dir, &pseudo_random(11 * MIB, 9));
    server.clear_requests();

    // Every operation walsync has, POST included (multipart, DeleteObjects).
    s3.put_bytes("a/small", b"x").unwrap();
    s3.put_file("a/big", &big).unwrap();
    assert_eq!(get(&s3, "a/small").unwrap(), b"x");
    assert_eq!(s3.list("a/").unwrap().len(), 2);
    s3.delete_many(&["a/small".to_string(), "a/big".to_string()])
        .unwrap();
    s3.delete("a/none").unwrap();
    s3.abort_stale_uploads("a/", STALE_UPLOAD_AGE).unwrap();

    let requests = server.requests();
    let kinds: BTreeSet<String> = requests
        .iter()
        .map(|r| {
            let mut params: Vec<&str> = r.query.iter().map(String::as_str).collect();
            params.sort();
            format!("{} {}", r.method, params.join("&"))
        })
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "DELETE ",
            "GET ",
            "GET encoding-type&list-type&prefix",
            "GET encoding-type&prefix&uploads",
            "POST delete",
            "POST uploadId",
            "POST uploads",
            "PUT ",
            "PUT partNumber&uploadId",
        ]
    );
    let credential = format!("AWS4-HMAC-SHA256 Credential={}/", server.access_key());
    for r in &requests {
        // Nothing of a signature in the query: no presigned URLs.
        assert!(r.query.iter().all(|q| !q.starts_with("X-Amz-")), "{r:?}");
        let auth = r.authorization.as_deref().unwrap_or_default();
        assert!(auth.starts_with(&credential), "{r:?}");
        assert!(
            auth.contains("/us-east-1/s3/aws4_request,SignedHeaders=")
                && auth.contains("x-amz-content-sha256;x-amz-date,Signature="),
            "{auth}"
        );
    }
}

#[test]
fn every_upload_carries_its_content_md5() {
    let server = S3Server::start();
    let s3 = server.storage("md5").with_part_size(5 * MIB as u64);
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let big = pseudo_random(12 * MIB + 3, 10);
    let small = pseudo_random(300 * 1024, 11);
    let (big_file, small_file) = (temp_file(&dir1, &big), temp_file(&dir2, &small));
    server.clear_requests();

    s3.put_bytes("bytes", b"state").unwrap();
    s3.put_file("small", &small_file).unwrap();
    s3.put_file("big", &big_file).unwrap();

    let got: Vec<Option<String>> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.content_md5)
        .collect();
    let five = 5 * MIB;
    let expected: Vec<Option<String>> = [
        &b"state"[..],
        &small,
        &big[..five],
        &big[five..2 * five],
        &big[2 * five..],
    ]
    .iter()
    .map(|body| Some(md5_base64(body)))
    .collect();
    assert_eq!(got, expected);
    // s3s-fs checks a PutObject's Content-MD5 against the body it stored.
    assert_eq!(get(&s3, "small").unwrap(), small);
    assert_eq!(get(&s3, "big").unwrap(), big);
}

#[test]
fn stale_multipart_uploads_of_this_replica_are_aborted() {
    let server = S3Server::start();
    // A prefix that s3s-fs lists unencoded although it says it encoded it.
    let s3 = server.storage("p+q");
    start_upload(&server, "p+q/app/old"); // this replica's, left by a crash
    start_upload(&server, "p+q/other/old"); // another database's
    start_upload(&server, "elsewhere/old"); // outside the destination
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(3600));
    start_upload(&server, "p+q/app/new"); // may still be running somewhere
    assert_eq!(server.uploads().len(), 4);

    let aborted = s3.abort_stale_uploads("app/", STALE_UPLOAD_AGE).unwrap();
    assert_eq!(aborted, ["app/old"]);
    assert_eq!(
        server.uploads(),
        ["elsewhere/old", "p+q/app/new", "p+q/other/old"]
    );
    // Through the trait (as prune calls it), with the default age.
    let storage: &dyn Storage = &s3;
    assert_eq!(storage.abort_stale_uploads("other/").unwrap(), 1);
    assert_eq!(server.uploads(), ["elsewhere/old", "p+q/app/new"]);
    assert_eq!(storage.abort_stale_uploads("app/").unwrap(), 0);
    // file:// has no uploads to abort.
    let dir = tempfile::tempdir().unwrap();
    let file = walsync::storage::file::FileStorage::new(dir.path().to_path_buf());
    assert_eq!(file.abort_stale_uploads("app/").unwrap(), 0);
}

#[test]
fn keys_under_a_prefix_with_plus_or_percent_are_listed_and_found() {
    let server = S3Server::start();
    // s3s-fs lists keys unencoded while saying `encoding-type=url`: decoded, these prefixes
    // would not match and every backup under them would be invisible.
    for prefix in ["a+b", "c%41d/e+f", "sp ace+/%2F"] {
        let s3 = server.storage(prefix);
        s3.put_bytes("app/state.json", b"1").unwrap();
        s3.put_bytes("app/wal/0001.wal.gz", b"22").unwrap();
        let on_disk = server.root().join(server.bucket()).join(prefix);
        assert!(on_disk.join("app/state.json").is_file(), "{prefix}");
        let listed = s3.list("app/").unwrap();
        assert_eq!(
            listed,
            [
                ObjectInfo {
                    key: "app/state.json".into(),
                    size: 1
                },
                ObjectInfo {
                    key: "app/wal/0001.wal.gz".into(),
                    size: 2
                }
            ],
            "{prefix}"
        );
        assert_eq!(get(&s3, "app/wal/0001.wal.gz").unwrap(), b"22");
        s3.delete_many(&listed.into_iter().map(|o| o.key).collect::<Vec<_>>())
            .unwrap();
        assert!(s3.list("").unwrap().is_empty(), "{prefix}");
    }
}

#[test]
fn prefixes_with_dot_or_empty_segments_are_refused_in_one_line() {
    let server = S3Server::start();
    for prefix in ["a/../b", "./a", "a/.", "a//b"] {
        let dest = format!("s3://{}/{prefix}", server.bucket());
        let out = walsync(&["list", "-b", &dest], &server.env());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{prefix}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("the prefix must not contain empty, '.' or '..' segments"),
            "{stderr}"
        );
    }
    assert!(server.requests().is_empty());
}

#[test]
fn a_wrong_secret_is_reported_with_the_servers_code_by_the_cli() {
    let server = S3Server::start();
    let mut env = server.env();
    for (key, value) in env.iter_mut() {
        if key == "AWS_SECRET_ACCESS_KEY" {
            *value = "wrong-secret-for-this-test".to_string();
        }
    }
    let dest = format!("s3://{}/cli", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(
            "access denied (HTTP 403 SignatureDoesNotMatch): the secret key does not match the \
             access key: check AWS_SECRET_ACCESS_KEY"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-secret-for-this-test"), "{stderr}");
}

#[test]
fn an_https_store_with_a_private_ca_is_trusted_through_each_variable() {
    let ca = PrivateCa::new();
    let server = S3Server::start_with(Options {
        tls: Some(ca.clone()),
        ..Options::default()
    });
    assert!(server.endpoint().starts_with("https://127.0.0.1:"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("private-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let ca_dir = dir.path().join("certs");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("README"), "not a certificate").unwrap();
    std::fs::write(ca_dir.join("private-ca.pem"), &ca.ca_pem).unwrap();

    // Not trusted by the built-in roots: fails at once (no retries), naming the variable.
    let untrusted = server.storage("tls");
    let started = Instant::now();
    let err = untrusted.put_bytes("k", b"x").unwrap_err();
    let message = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Auth, "{message}");
    assert!(
        message.starts_with(&format!(
            "s3://{}/tls: PUT k: TLS failure with 127.0.0.1: invalid peer certificate: ",
            server.bucket()
        )),
        "{message}"
    );
    assert!(
        message.ends_with(
            "it was checked against walsync's built-in roots; if the store's certificate comes \
             from a private CA, set AWS_CA_BUNDLE (or SSL_CERT_FILE or SSL_CERT_DIR) to the CA's \
             PEM file"
        ),
        "{message}"
    );
    assert_eq!(untrusted.stats().requests, 1);
    assert_eq!(untrusted.stats().retries, 0);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Trusted: the CA as the system's store, then through each variable, as the CLI reads them.
    let trusted = S3Storage::new(S3Config {
        ca_roots: CaRoots::System(ca_file.clone()),
        ..server.config("tls")
    })
    .unwrap();
    trusted.put_bytes("k", b"over TLS").unwrap();
    assert_eq!(get(&trusted, "k").unwrap(), b"over TLS");
    let dest = format!("s3://{}/tls", server.bucket());
    let file = ca_file.to_str().unwrap().to_string();
    let dir_list = format!("/nonexistent:{}", ca_dir.display());
    for (var, value) in [
        ("AWS_CA_BUNDLE", file.clone()),
        ("SSL_CERT_FILE", file),
        ("SSL_CERT_DIR", dir_list),
    ] {
        let mut env = server.env();
        env.push((var.to_string(), value));
        let out = walsync(&["list", "-b", &dest], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{var}: {stderr}");
    }
    // Without them, the CLI fails with exit 5 and says what to set.
    let out = walsync(&["list", "-b", &dest], &server.env());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("set AWS_CA_BUNDLE"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn prune_aborts_the_stale_uploads_of_the_database_it_prunes() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let s3 = server.storage("prune");
    start_upload(&server, "prune/app/snapshots/crashed.db.gz");
    start_upload(&server, "prune/other/snapshots/crashed.db.gz");
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(60));
    let now = walsync::UtcTime::now();
    let hour = Duration::from_secs(3600);

    // `walsync prune app` (one replica): a dry run changes nothing.
    let mut db = AppDb::create(dir.path(), "app.db");
    db.insert(1, 10);
    let storage: std::sync::Arc<dyn walsync::storage::Storage> =
        std::sync::Arc::new(server.storage("prune"));
    walsync::Replica::open(&db.path, storage, "app")
        .unwrap()
        .snapshot()
        .unwrap();
    let catalog = walsync::format::Catalog::from_listing(s3.list("").unwrap());
    let names = ["app".to_string()];
    let prune = |dry_run| {
        walsync::unstable::prune_catalog(&s3, &catalog, &names, now, hour, dry_run, |_, _| {})
            .unwrap()
    };
    prune(true);
    assert_eq!(server.uploads().len(), 2);
    prune(false);
    assert_eq!(server.uploads(), ["prune/other/snapshots/crashed.db.gz"]);
}

/// `watch` aborts the stale uploads of its whole destination once as it starts (one request,
/// not one a database), leaving the ones of other prefixes alone.
#[test]
fn watch_aborts_the_stale_uploads_of_its_destination_once_at_start() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    start_upload(&server, "w/app/snapshots/crashed.db.gz");
    start_upload(&server, "w/other/snapshots/crashed.db.gz");
    start_upload(&server, "elsewhere/app/snapshots/crashed.db.gz");
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(60));
    let dbs: Vec<AppDb> = ["a.db", "b.db", "c.db"]
        .iter()
        .map(|name| {
            let mut db = AppDb::create(dir.path(), name);
            db.insert(1, 10);
            db
        })
        .collect();
    let dest = format!("s3://{}/w", server.bucket());
    let mut args: Vec<&str> = Vec::new();
    args.extend(dbs.iter().map(|db| db.path.to_str().unwrap()));
    args.extend(["-b", dest.as_str()]);
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    wait_for(Duration::from_secs(30), "the stale uploads aborted", || {
        server.uploads() == ["elsewhere/app/snapshots/crashed.db.gz"]
    });
    // Every database stored: each has had its start-up prune by then, or soon after.
    wait_for(Duration::from_secs(30), "three snapshots stored", || {
        server.storage("w").list("").unwrap().len() >= 3
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let listings = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.has_param("uploads"))
        .count();
    assert_eq!(listings, 1, "ListMultipartUploads requests");
}

/// One request a [`Responder`] received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP server on 127.0.0.1 standing in for a credentials endpoint (ECS, IMDS, STS):
/// `answer` gives the status and body of each request, and every request is recorded.
struct Responder {
    addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl Responder {
    fn start(answer: impl Fn(&Received) -> (u16, String) + Send + 'static) -> Responder {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_string();
                let path = parts.next().unwrap_or_default().to_string();
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                    }
                }
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let request = Received {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).to_string(),
                };
                let (status, body) = answer(&request);
                log.lock().unwrap().push(request);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Responder { addr, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The test server's keys as a credentials endpoint answers them (JSON), expiring `in_secs`
/// from now.
fn keys_json(server: &S3Server, token_name: &str, in_secs: i64) -> String {
    let expires = walsync::UtcTime::from_millis(walsync::UtcTime::now().millis() + in_secs * 1000);
    format!(
        "{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"{}\", \
         \"{token_name}\": \"session-token-from-the-source\", \"Expiration\": \"{}\"}}",
        server.access_key(),
        server.secret_key(),
        expires.to_rfc3339()
    )
}

/// The environment of a walsync child that must find its keys elsewhere than in
/// AWS_ACCESS_KEY_ID: the server's endpoint and region, a HOME without `.aws`.
fn env_without_keys(server: &S3Server, home: &std::path::Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .collect();
    env.push(("HOME".into(), home.display().to_string()));
    env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    env
}

#[test]
fn keys_from_a_profile_of_the_shared_files() {
    let server = S3Server::start();
    server
        .storage("profile")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n\
             [backup]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            server.access_key(),
            server.secret_key()
        ),
    )
    .unwrap();
    let dest = format!("s3://{}/profile", server.bucket());
    let mut env = env_without_keys(&server, &home);
    env.push(("AWS_PROFILE".into(), "backup".into()));
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // One line says where the keys came from, never what they are.
    let from: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("S3 credentials from"))
        .collect();
    assert_eq!(from.len(), 1, "{stderr}");
    assert!(
        from[0].ends_with(&format!(
            "S3 credentials from profile \"backup\" in {}",
            home.join(".aws/credentials").display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(server.secret_key()), "{stderr}");
    // The default profile's keys are refused, by the store.
    let env = env_without_keys(&server, &home);
    let out = walsync(&["list", "-b", &dest], &env);
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn keys_from_credential_process_are_renewed_before_they_expire() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let answer = dir.path().join("answer.json");
    let command = format!(
        "echo run >> '{}'; cat '{}'",
        runs.display(),
        answer.display()
    );
    let runs_count = || {
        std::fs::read_to_string(&runs)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let storage = |valid_secs: i64| {
        std::fs::write(&answer, keys_json(&server, "SessionToken", valid_secs)).unwrap();
        S3Storage::new(S3Config {
            access_key: String::new(),
            secret_key: String::new(),
            credential_source: Some(walsync::storage::credentials::Source::Process {
                profile: "test".into(),
                command: command.clone(),
            }),
            credential_origin: "the credential_process of profile \"test\"".into(),
            ..server.config("process")
        })
        .unwrap()
    };
    // Valid for an hour: asked once, at the first request (not when the storage is made).
    let s3 = storage(3600);
    assert_eq!(runs_count(), 0);
    s3.put_bytes("a", b"1").unwrap();
    s3.put_bytes("b", b"2").unwrap();
    assert_eq!(get(&s3, "a").unwrap(), b"1");
    assert_eq!(runs_count(), 1);
    // The session token is sent, as a signed header.
    let last = server.requests().pop().unwrap();
    assert!(
        last.authorization.unwrap().contains("x-amz-security-token"),
        "no token signed"
    );
    // Expiring within five minutes: asked again before each request.
    std::fs::remove_file(&runs).unwrap();
    let s3 = storage(120);
    for key in ["c", "d", "e"] {
        s3.put_bytes(key, b"x").unwrap();
    }
    assert_eq!(runs_count(), 3);
    // Keys the store says have expired before their time are fetched again, at once.
    std::fs::remove_file(&runs).unwrap();
    let s3 = storage(3600);
    s3.put_bytes("f", b"x").unwrap();
    server.fail_next_request(400, "ExpiredToken", "The provided token has expired.");
    s3.put_bytes("g", b"x").unwrap();
    assert_eq!(runs_count(), 2);
    assert_eq!(get(&s3, "g").unwrap(), b"x");
    // A process that fails at the first request: an auth error naming the source.
    let s3 = storage(3600);
    std::fs::write(&answer, "not json").unwrap();
    let err = s3.put_bytes("f", b"x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "s3://{}/process: PUT f: no S3 credentials from the credential_process of profile \
             \"test\": its output is not JSON",
            server.bucket()
        )),
        "{err}"
    );
}

#[test]
fn keys_from_a_container_endpoint_with_its_authorization_token() {
    let server = S3Server::start();
    server
        .storage("ecs")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let json = keys_json(&server, "Token", 6 * 3600);
    let endpoint = Responder::start(
        move |r| match (r.path.as_str(), r.header("authorization")) {
            ("/v2/credentials", Some("pod-identity-token")) => (200, json.clone()),
            _ => (403, String::new()),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "pod-identity-token\n").unwrap();
    let mut env = env_without_keys(&server, dir.path());
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
        endpoint.url("/v2/credentials"),
    ));
    env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    let dest = format!("s3://{}/ecs", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "S3 credentials from the container credentials endpoint {}",
            endpoint.url("/v2/credentials")
        )),
        "{stderr}"
    );
    assert_eq!(endpoint.received().len(), 1);
}

#[test]
fn keys_from_the_instance_role_through_imdsv2() {
    let server = S3Server::start();
    server
        .storage("imds")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let json = keys_json(&server, "Token", 6 * 3600);
    let imds = Responder::start(move |r| {
        let token = r.header("x-aws-ec2-metadata-token");
        match (r.method.as_str(), r.path.as_str(), token) {
            ("PUT", "/latest/api/token", None)
                if r.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                (200, "imds-session".into())
            }
            ("GET", "/latest/meta-data/iam/security-credentials/", Some("imds-session")) => {
                (200, "backup-role\n".into())
            }
            (
                "GET",
                "/latest/meta-data/iam/security-credentials/backup-role",
                Some("imds-session"),
            ) => (200, json.clone()),
            // IMDSv1 (no session token) is refused, as on instances that require v2.
            _ => (401, String::new()),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = env_without_keys(&server, dir.path())
        .into_iter()
        .filter(|(k, _)| k != "AWS_EC2_METADATA_DISABLED")
        .collect();
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), imds.url("")));
    let dest = format!("s3://{}/imds", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let paths: Vec<String> = imds
        .received()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        paths,
        [
            "PUT /latest/api/token",
            "GET /latest/meta-data/iam/security-credentials/",
            "GET /latest/meta-data/iam/security-credentials/backup-role"
        ]
    );
}

#[test]
fn keys_from_web_identity_through_sts() {
    let server = S3Server::start();
    server
        .storage("irsa")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let expires = walsync::UtcTime::from_millis(walsync::UtcTime::now().millis() + 3_600_000);
    let xml = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{}</AccessKeyId>\
         <SecretAccessKey>{}</SecretAccessKey><SessionToken>sts-token</SessionToken>\
         <Expiration>{}</Expiration></Credentials></AssumeRoleWithWebIdentityResult>\
         </AssumeRoleWithWebIdentityResponse>",
        server.access_key(),
        server.secret_key(),
        expires.to_rfc3339()
    );
    let sts = Responder::start(move |r| {
        let form_ok = r.body.contains("Action=AssumeRoleWithWebIdentity")
            && r.body
                .contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fbackup")
            && r.body.contains("WebIdentityToken=eyJ.jwt.token");
        if r.method == "POST" && form_ok {
            (200, xml.clone())
        } else {
            (
                400,
                "<ErrorResponse><Error><Code>InvalidIdentityToken</Code></Error></ErrorResponse>"
                    .into(),
            )
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJ.jwt.token\n").unwrap();
    let mut env = env_without_keys(&server, dir.path());
    env.extend([
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE".to_string(),
            token_file.display().to_string(),
        ),
        (
            "AWS_ROLE_ARN".to_string(),
            "arn:aws:iam::123456789012:role/backup".to_string(),
        ),
        ("AWS_ENDPOINT_URL_STS".to_string(), sts.url("/")),
    ]);
    let dest = format!("s3://{}/irsa", server.bucket());
    let out = walsync(&["list", "-b", &dest], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(sts.received().len(), 1);
    assert!(!stderr.contains("eyJ.jwt.token"), "{stderr}");
}

#[test]
fn a_custom_endpoint_addressed_virtual_hosted_style() {
    let server = S3Server::start_with(Options {
        virtual_host: true,
        ..Options::default()
    });
    let (proxy, asked) = server.connect_proxy();
    let dest = format!("s3://{}/vhost", server.bucket());
    let mut env = server.env();
    for (key, value) in env.iter_mut() {
        if key == "AWS_ENDPOINT_URL_S3" {
            *value = server.virtual_host_endpoint();
        }
    }
    env.push(("HTTP_PROXY".into(), proxy));
    env.push(("WALSYNC_S3_ADDRESSING".into(), "virtual".into()));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let sqlite = rusqlite::Connection::open(&db).unwrap();
    sqlite
        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
        .unwrap();
    let out = walsync(&["snapshot", db.to_str().unwrap(), "-b", &dest], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = walsync(&["list", "-b", &dest], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("app"), "{stdout}");
    // Every request named the bucket in the host, and its path has no bucket in it.
    let port = server.addr().port();
    let hosts: BTreeSet<String> = asked.lock().unwrap().iter().cloned().collect();
    assert_eq!(
        hosts.into_iter().collect::<Vec<_>>(),
        [format!("{}.s3.test:{port}", server.bucket())]
    );
    let requests = server.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert!(
            !r.path.starts_with(&format!("/{}", server.bucket())),
            "{r:?}"
        );
    }
    // Path style, the default for a custom endpoint, names the bucket in the path: this
    // server (which takes it from the host) does not find it.
    env.retain(|(k, _)| k != "WALSYNC_S3_ADDRESSING");
    let out = walsync(&["list", "-b", &dest], &env);
    assert!(!out.status.success());
}

#[test]
fn a_host_clock_far_off_signs_with_the_stores_time() {
    let server = S3Server::start();
    server
        .storage("skew")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let dest = format!("s3://{}/skew", server.bucket());
    // 40 minutes either way: far past the 15 minutes a signature may be off.
    for (step, said) in [("-40m", "behind"), ("+40m", "ahead of")] {
        let mut cmd = with_clock_off(step);
        cmd.args(["list", "-b", &dest]);
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                cmd.env_remove(key);
            }
        }
        let out = cmd.envs(server.env()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{step}: {stderr}");
        let warned: Vec<&str> = stderr.lines().filter(|l| l.contains("clock is")).collect();
        assert_eq!(warned.len(), 1, "{stderr}");
        assert!(
            warned[0].contains(&format!(
                "s {said} the store's: signing requests with the store's time"
            )),
            "{stderr}"
        );
    }
}

/// Found by the torture harness: the store's answer that the clock is off, cut short on
/// the way (the test server truncates answers), was taken for its bare status, a 403, and
/// walsync exited at start calling the credentials wrong. An error document cut short is
/// a lost answer, asked for again; the whole one then lets the client sign with the
/// store's time.
#[test]
fn a_clock_skew_answer_cut_short_is_asked_for_again() {
    let server = S3Server::start();
    server
        .storage("cut")
        .put_bytes("app/state.json", b"{}")
        .unwrap();
    let dest = format!("s3://{}/cut", server.bucket());
    server.set_fault_mix(FaultMix {
        truncate: 1.0,
        ..FaultMix::none()
    });
    let mut cmd = with_clock_off("-40m");
    cmd.args(["list", "-b", &dest]);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .envs(server.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Every answer is cut for the first second: the client's retries outlast it.
    std::thread::sleep(Duration::from_secs(1));
    server.set_fault_mix(FaultMix::none());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(server.fault_counts().truncations > 0);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the answer cut short"), "{stderr}");
    assert!(
        stderr.contains("signing requests with the store's time"),
        "{stderr}"
    );
}

/// walsync with its wall clock `offset` off (libfaketime, preloaded: the `faketime`
/// wrapper names a semaphore after its pid, and a stale one left in /dev/shm by a killed
/// run makes it fail with "sem_open: File exists").
fn with_clock_off(offset: &str) -> Command {
    let lib = crate::common::torture::find_libfaketime()
        .expect("libfaketime (Debian package faketime, installed by scripts/test.sh) not found");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walsync"));
    cmd.env("LD_PRELOAD", lib).env("FAKETIME", offset);
    cmd
}

/// s3rver (npm), installed under the test target directory on first use; `None` where npm
/// or the registry is not reachable.
fn s3rver() -> Option<std::path::PathBuf> {
    let prefix = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("s3rver-3.7.1");
    let bin = prefix.join("node_modules/.bin/s3rver");
    if !bin.exists() {
        let installed = Command::new("npm")
            .args(["install", "--silent", "--prefix"])
            .arg(&prefix)
            .arg("s3rver@3.7.1")
            .status();
        if !installed.is_ok_and(|s| s.success()) {
            return None;
        }
    }
    bin.exists().then_some(bin)
}

/// A second, independent S3 implementation (s3rver: Node.js, its own routing, multipart and
/// TLS) over HTTPS with a private CA: snapshots (one of them multipart), list, restore. It
/// reads the access key from the Authorization header but checks neither SigV4 signatures
/// nor Content-MD5 (s3s-fs does, in every other test).
#[test]
fn a_second_server_over_https_s3rver() {
    // npm and its registry are on every machine this project runs on (scripts/test.sh):
    // a missing s3rver is a failure, not a skip.
    let s3rver = s3rver().expect("s3rver@3.7.1 could not be installed with npm");
    let ca = PrivateCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (key, cert, ca_file) = (
        dir.path().join("key.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&key, &ca.key_pem).unwrap();
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let data = dir.path().join("s3rver-data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(&s3rver)
        .args([
            "-d",
            data.to_str().unwrap(),
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-s",
        ])
        .args([
            "--key",
            key.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
        ])
        .args(["--configure-bucket", "walsync-s3rver"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting s3rver");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3rver did not start");
        assert!(child.try_wait().unwrap().is_none(), "s3rver exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _s3rver = Kill(child);
    let env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "S3RVER".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "S3RVER".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL_S3", format!("https://127.0.0.1:{port}")),
        ("AWS_CA_BUNDLE", ca_file.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dest = "s3://walsync-s3rver/with+plus";
    let mut app = crate::common::fixtures::AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let db = app.path.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = walsync(args, &env);
        assert!(
            out.status.success(),
            "walsync {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&["snapshot", &db, "-b", dest]);
    // Over 16 MiB of incompressible rows: the next snapshot is a multipart upload.
    for _ in 0..18 {
        app.insert(1, MIB);
    }
    run(&["snapshot", &db, "-b", dest]);
    let listed = String::from_utf8_lossy(&run(&["list", "-b", dest, "--json"]).stdout).to_string();
    assert!(listed.contains("\"app\""), "{listed}");
    let restored = dir.path().join("restored.db");
    run(&[
        "restore",
        "app",
        "-o",
        restored.to_str().unwrap(),
        "-b",
        dest,
    ]);
    assert_eq!(crate::common::fixtures::dump(&restored), app.dump());
    // Prune (DeleteObjects, and the listing of incomplete uploads) keeps what restores.
    let pruned = run(&["prune", "-b", dest, "--retention", "1s"]);
    let said = String::from_utf8_lossy(&pruned.stdout).to_string();
    assert!(said.contains("app"), "{said}");
    let again = dir.path().join("again.db");
    run(&["restore", "app", "-o", again.to_str().unwrap(), "-b", dest]);
    assert_eq!(crate::common::fixtures::dump(&again), app.dump());
    // An unknown access key: s3rver's own code and message, and the hint.
    let mut wrong = env.clone();
    wrong[0].1 = "NOBODY".to_string();
    let out = walsync(&["list", "-b", dest], &wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(
            "access denied (HTTP 403 InvalidAccessKeyId: The AWS Access Key Id you provided \
             does not exist in our records.): the store knows no such access key: check \
             AWS_ACCESS_KEY_ID"
        ),
        "{stderr}"
    );
}

/// AWS's own endpoint, with the bucket in another region than AWS_REGION: the test server
/// poses as `s3.eu-west-1.amazonaws.com` (TLS with a private CA, reached through a CONNECT
/// proxy) and answers requests to `s3.us-east-1.amazonaws.com` with AWS's `301
/// PermanentRedirect` and `x-amz-bucket-region`.
#[test]
fn a_bucket_in_another_aws_region_is_followed_there() {
    let ca = PrivateCa::for_names(&[
        "*.s3.us-east-1.amazonaws.com",
        "*.s3.eu-west-1.amazonaws.com",
    ]);
    let server = S3Server::start_with(Options {
        tls: Some(ca.clone()),
        aws_region: Some("eu-west-1".into()),
        ..Options::default()
    });
    let (proxy, asked) = server.connect_proxy();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let env_for = |region: &str| {
        let mut env: Vec<(String, String)> = server
            .env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_ENDPOINT_URL_S3" && k != "AWS_REGION")
            .collect();
        env.push(("AWS_REGION".into(), region.into()));
        env.push(("HTTPS_PROXY".into(), proxy.clone()));
        env.push(("AWS_CA_BUNDLE".into(), ca_file.display().to_string()));
        env
    };
    let mut app = crate::common::fixtures::AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let db = app.path.to_str().unwrap().to_string();
    let dest = format!("s3://{}/region", server.bucket());

    let out = walsync(&["snapshot", &db, "-b", &dest], &env_for("us-east-1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warned: Vec<&str> = stderr.lines().filter(|l| l.contains("region")).collect();
    assert_eq!(warned.len(), 1, "{stderr}");
    assert!(
        warned[0].ends_with(&format!(
            "s3://{}/region: the bucket is in region eu-west-1, not us-east-1: using eu-west-1 \
             (set AWS_REGION=eu-west-1 to go there directly)",
            server.bucket()
        )),
        "{stderr}"
    );
    let hosts: Vec<String> = asked.lock().unwrap().drain(..).collect();
    let first = format!("{}.s3.us-east-1.amazonaws.com:443", server.bucket());
    let moved = format!("{}.s3.eu-west-1.amazonaws.com:443", server.bucket());
    assert_eq!(hosts.first(), Some(&first), "{hosts:?}");
    assert!(hosts[1..].iter().all(|h| *h == moved), "{hosts:?}");

    // With the region the warning named: straight there, no warning.
    let out = walsync(&["list", "-b", &dest], &env_for("eu-west-1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("app"));
    assert!(!stderr.contains("region"), "{stderr}");
    let hosts: Vec<String> = asked.lock().unwrap().drain(..).collect();
    assert!(hosts.iter().all(|h| *h == moved), "{hosts:?}");
}
