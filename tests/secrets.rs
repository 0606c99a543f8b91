//! Credentials never leak: every command runs with a recognisable access key, secret key and
//! session token, logging at trace level, and neither the secret nor the token may appear in
//! anything walsync printed or wrote (its output, the sidecar directory and spool leftovers,
//! the restore's directory, the objects in the bucket).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::common::fixtures::{walsync_command, AppDb, WatchProcess};
use walsync_testkit::s3server::{Options, S3Server};

const ACCESS_KEY: &str = "AKIDLEAKCHECK0000001";
const SECRET: &str = "SeCrEt-walsync-must-never-print-this-7f3a9c";
const TOKEN: &str = "ToKeN-walsync-session-must-never-print-this-51e2";
const WRONG_SECRET: &str = "WrOnG-SeCrEt-walsync-must-never-print-this-c0de";

/// Run walsync with trace logging and the given secret; its output.
fn run(args: &[&str], server: &S3Server, secret: &str) -> Output {
    walsync_command()
        .arg("-v")
        .args(args)
        .envs(env(server, secret))
        .env("RUST_LOG", "trace")
        .output()
        .expect("running walsync")
}

fn env(server: &S3Server, secret: &str) -> Vec<(String, String)> {
    let mut env = server.env();
    for (key, value) in env.iter_mut() {
        match key.as_str() {
            "AWS_SECRET_ACCESS_KEY" => *value = secret.to_string(),
            "AWS_SESSION_TOKEN" => *value = TOKEN.to_string(),
            _ => {}
        }
    }
    env
}

/// Fail if any secret appears in `text`, naming where it was found.
fn assert_clean(what: &str, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for secret in [SECRET, TOKEN, WRONG_SECRET] {
        assert!(
            !text.contains(secret),
            "{what} contains a secret ({}...): {text}",
            &secret[..10]
        );
    }
}

fn assert_output_clean(what: &str, out: &Output) {
    assert_clean(&format!("{what}: stdout"), &out.stdout);
    assert_clean(&format!("{what}: stderr"), &out.stderr);
}

/// Every file under `dir`: its path and its content.
fn assert_tree_clean(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        assert_clean("a file name", path.to_string_lossy().as_bytes());
        if entry.file_type().unwrap().is_dir() {
            assert_tree_clean(&path);
        } else {
            assert_clean(&path.display().to_string(), &std::fs::read(&path).unwrap());
        }
    }
}

#[test]
fn no_command_prints_or_writes_the_secret_or_the_session_token() {
    let server = S3Server::start_with(Options {
        credentials: Some((ACCESS_KEY.to_string(), SECRET.to_string())),
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let db = app.path.to_str().unwrap().to_string();
    let dest = format!("s3://{}/secrets", server.bucket());

    // watch, writes, SIGTERM.
    let mut watch_env = env(&server, SECRET);
    watch_env.push(("RUST_LOG".into(), "trace".into()));
    let watch = WatchProcess::start(
        &[&db, "-b", &dest, "--min-interval", "0.1"],
        &watch_env,
        dir.path(),
    );
    for _ in 0..5 {
        app.insert(3, 20_000);
        std::thread::sleep(Duration::from_millis(150));
    }
    let (stdout, stderr) = (watch.stdout.clone(), watch.stderr.clone());
    let status = watch.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "no verbose log: {log}"
    );
    assert_clean("watch stdout", &std::fs::read(&stdout).unwrap());
    assert_clean("watch stderr", log.as_bytes());

    let out = run(&["snapshot", &db, "-b", &dest], &server, SECRET);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_output_clean("snapshot", &out);
    for list in [
        &["list", "-b", &dest][..],
        &["list", "-b", &dest, "--json"][..],
    ] {
        let out = run(list, &server, SECRET);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_output_clean("list", &out);
    }
    let restored_dir = dir.path().join("restored");
    std::fs::create_dir(&restored_dir).unwrap();
    let restored = restored_dir.join("app.db");
    let restored = restored.to_str().unwrap();
    let out = run(
        &["restore", "app", "-o", restored, "-b", &dest],
        &server,
        SECRET,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_output_clean("restore", &out);

    // Failing commands: a wrong secret, a missing replica, and an unreachable endpoint.
    let out = run(&["list", "-b", &dest], &server, WRONG_SECRET);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("access denied"));
    assert_output_clean("list with a wrong secret", &out);
    let out = run(
        &["restore", "nope", "-o", restored, "-b", &dest],
        &server,
        SECRET,
    );
    assert!(!out.status.success());
    assert_output_clean("restore of a missing replica", &out);
    let out = run(
        &[
            "snapshot",
            &db,
            "-b",
            &dest,
            "--endpoint",
            "http://127.0.0.1:1",
        ],
        &server,
        SECRET,
    );
    assert!(!out.status.success());
    assert_output_clean("snapshot to an endpoint that is down", &out);

    // Nothing walsync wrote holds them either: sidecar, spool leftovers, the restore, the
    // bucket (state.json and the data objects).
    assert_tree_clean(dir.path());
    assert_tree_clean(server.root());
}
