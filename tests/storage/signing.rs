//! Requests and their signatures: every request signed in the `Authorization` header (no
//! presigned URLs), every upload carrying its `Content-MD5` (checked with a base64 written
//! out here), wrong keys reported with the server's code and no secret, and a host clock
//! far off (libfaketime) signing with the store's time, even when that answer is cut short.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use super::{get, pseudo_random, temp_file, MIB};
use crate::common::fixtures::{walsync, walsync_command};
use walsync::storage::s3::{S3Config, S3Storage, STALE_UPLOAD_AGE};
use walsync::storage::Storage;
use walsync::ErrorKind;
use walsync_testkit::faults::FaultMix;
use walsync_testkit::s3server::S3Server;

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
    let lib = walsync_testkit::torture::find_libfaketime()
        .expect("libfaketime (Debian package faketime, installed by scripts/test.sh) not found");
    let mut cmd = walsync_command();
    cmd.env("LD_PRELOAD", lib).env("FAKETIME", offset);
    cmd
}
