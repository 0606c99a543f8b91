//! Endpoints other than the plain-HTTP test server: HTTPS with a private CA (trusted through
//! each variable that names one), a custom endpoint addressed virtual-hosted style, a second
//! and independent S3 implementation (s3rver) over HTTPS, and AWS's own endpoint with the
//! bucket in another region, followed there.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{get, MIB};
use crate::common::fixtures::walsync;
use walsync::storage::s3::{CaRoots, S3Config, S3Storage};
use walsync::storage::Storage;
use walsync::ErrorKind;
use walsync_testkit::s3server::{Options, PrivateCa, S3Server};

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
