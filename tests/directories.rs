//! `walsync watch --dir` end to end (issue 18): databases that come and go in a watched
//! directory while the real binary runs against the real S3 server, and the library's
//! `Replicator::add` and `remove` underneath. Restores are compared with the sources.
//!
//! One room a theme (`cargo test --test tests directories::` runs them all):
//! - `lifecycle`: databases that arrive (created, restored into place, moved in, a file
//!   that becomes one, while storage is down) and leave (deleted, moved out), and the
//!   library's `add` and `remove`;
//! - `scanning`: what a scan finds and under which name: `--recursive`, several `--dir`s
//!   beside named databases, `--poll` and the `WALSYNC_DIR` settings, the locks of a named
//!   database kept while its directory is scanned;
//! - `costs`: what many databases cost: descriptors (a limit too low), and the requests of
//!   a start and of a restart of a thousand.
//!
//! What they share is here: starting `watch`, waiting for its log, restoring a database
//! with the binary and waiting until the restore equals the source.

mod costs;
mod lifecycle;
mod scanning;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::fixtures::{dump, integrity, wait_for, walsync, WatchProcess};
use walsync_testkit::s3server::S3Server;

/// How soon a new WAL database must be picked up (issue 18).
const PICK_UP: Duration = Duration::from_secs(2);

fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `data/` (the watched directory, canonical: walsync logs and names databases by their
/// canonical paths) and `logs/` (walsync's output, outside it), created under `root`.
fn data_and_logs(root: &Path) -> (PathBuf, PathBuf) {
    let (data, logs) = (root.join("data"), root.join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    (std::fs::canonicalize(&data).unwrap(), logs)
}

/// `walsync watch ARGS`, once it has started (its logs in `logs`, outside any watched
/// directory).
fn watch(args: &[&str], server: &S3Server, logs: &Path) -> WatchProcess {
    watch_with(args, &server.env(), logs)
}

fn watch_with(args: &[&str], env: &[(String, String)], logs: &Path) -> WatchProcess {
    let process = WatchProcess::start(args, env, logs);
    wait_for(Duration::from_secs(20), "walsync watch to start", || {
        process.log().contains("replicating ")
    });
    process
}

/// Wait until the log has `needle`; how long that took from `since`.
fn wait_log(process: &WatchProcess, needle: &str, since: Instant, timeout: Duration) -> Duration {
    let deadline = since + timeout;
    loop {
        if process.log().contains(needle) {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {timeout:?}:\n{}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The "watching PATH as NAME" line of a database picked up.
fn watching(path: &Path, name: &str) -> String {
    format!("watching {} as {name}", path.display())
}

/// The latest restore of `name`, or the error.
fn restore(server: &S3Server, prefix: &str, name: &str, dir: &Path) -> Result<String, String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("restore-{n}.db"));
    let dest = s3_url(server, prefix);
    let run = walsync(
        &["restore", name, "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    assert_eq!(integrity(&out), "ok");
    let text = dump(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(text)
}

/// Wait until the latest restore of `name` equals `expected`.
fn wait_replicated(server: &S3Server, prefix: &str, name: &str, dir: &Path, expected: &str) {
    let mut last = Err(String::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = restore(server, prefix, name, dir);
        if last.as_deref() == Ok(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{name} never caught up; last restore: {last:?}");
}
