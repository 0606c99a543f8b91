//! Regression tests for lifecycle events that lost data, mixed histories or blocked the
//! application in walsync's first engine. Each one was reproduced by hand first; each test
//! drives the same event through the public surface only (the `walsync` binary, the
//! library's `Replicator`, `walsync::restore` and the bucket listing), then restores and
//! compares the content with what the application really had.
//!
//! The events keep their numbers (1 to 6, then those the torture harness found), in rooms
//! by what causes them (`cargo test --test tests durability::` runs them all):
//! - `checkpoints`: checkpoints, the application's and walsync's own, with walsync stopped
//!   or running (1, 1b, 2, 6a, 6b), and the write lock never held across a slow upload (5);
//! - `replacement`: the database renamed over its path (3, 3b);
//! - `local_errors`: a sidecar that cannot be written for a while (4, and the torture
//!   harness's finds);
//! - `descriptors`: a descriptor limit that left SQLite's wal-index read-only, so that walsync
//!   could never checkpoint (found starting 4,000 databases under a 20,000-descriptor limit).
//!
//! The helpers here (starting the library, the catalog of a replica, restoring and
//! comparing) are shared with `reconcile`, which imports them.

mod checkpoints;
#[cfg(target_os = "linux")]
mod descriptors;
mod local_errors;
mod replacement;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fixtures::{dump, integrity, wait_for, walsync, AppDb};
use walsync::format::{Catalog, ObjectKind, ObjectName};
use walsync::storage::Storage;
use walsync::{Options, Replicator, RestoreOptions, UtcTime};
use walsync_testkit::s3server::S3Server;

pub(crate) fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub(crate) fn start(storage: &Arc<dyn Storage>, db: &Path, options: Options) -> Replicator {
    crate::common::logs::init();
    Replicator::start(
        Arc::clone(storage),
        &[(db.to_path_buf(), "app".into())],
        options,
    )
    .unwrap()
}

/// The stored objects of `name`, grouped by generation.
pub(crate) fn catalog(storage: &dyn Storage, name: &str) -> Catalog {
    Catalog::from_listing(storage.list(&format!("{name}/")).unwrap())
}

/// Generations stored for `name`.
pub(crate) fn generations(storage: &dyn Storage, name: &str) -> usize {
    catalog(storage, name)
        .databases
        .get(name)
        .map_or(0, |g| g.len())
}

/// Objects of one kind stored for `name`, over all generations.
fn count_objects(storage: &dyn Storage, name: &str, kind: ObjectKind) -> usize {
    storage
        .list(&format!("{name}/"))
        .unwrap()
        .iter()
        .filter(|o| ObjectName::parse_key(&o.key).is_some_and(|(_, n)| n.kind == kind))
        .count()
}

/// Restore `name` (latest, or as of `at`) with the library into a fresh file in `dir`: its
/// dump once `PRAGMA integrity_check` says ok, or why not.
pub(crate) fn restore_dump(
    storage: &dyn Storage,
    name: &str,
    dir: &Path,
    at: Option<UtcTime>,
) -> Result<String, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = dir.join(format!("restored-{}.db", N.fetch_add(1, Ordering::Relaxed)));
    let options = RestoreOptions {
        point_in_time: at,
        ..RestoreOptions::default()
    };
    walsync::restore(storage, name, &out, &options).map_err(|e| format!("restore: {e}"))?;
    let check = integrity(&out);
    if check != "ok" {
        return Err(format!("integrity_check: {check}"));
    }
    let text = dump(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(text)
}

/// A short description of a dump (rows per table), for failure messages: whole dumps are
/// too long to read.
fn summary(dump: &str) -> String {
    let mut tables: Vec<(String, usize)> = Vec::new();
    for line in dump.lines() {
        if let Some(rest) = line.strip_prefix("CREATE TABLE ") {
            let name = rest.split(['(', ' ']).next().unwrap_or(rest);
            tables.push((name.to_string(), 0));
        } else if let Some((_, rows)) = tables.last_mut() {
            *rows += 1;
        }
    }
    let parts: Vec<String> = tables
        .iter()
        .map(|(t, n)| format!("{t}: {n} rows"))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Insist that a restore succeeded and equals `expected`, with a readable message.
#[track_caller]
pub(crate) fn assert_restored(restored: Result<String, String>, expected: &str, what: &str) {
    match restored {
        Ok(text) if text == expected => {}
        Ok(text) => {
            let differs = text
                .lines()
                .zip(expected.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(text.lines().count().min(expected.lines().count()));
            panic!(
                "{what}: restored {} but expected {} (dumps differ from line {differs})",
                summary(&text),
                summary(expected)
            );
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Restore the latest state of `name` with `walsync restore`: its dump, or stderr.
pub(crate) fn restore_with_binary(
    server: &S3Server,
    prefix: &str,
    dir: &Path,
) -> Result<String, String> {
    let out = dir.join("restored-by-binary.db");
    let _ = std::fs::remove_file(&out);
    let dest = s3_url(server, prefix);
    let result = walsync(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned());
    }
    let check = integrity(&out);
    if check != "ok" {
        return Err(format!("integrity_check: {check}"));
    }
    Ok(dump(&out))
}

/// Wait until every page of the application's database is in the database file: someone
/// (walsync, in these tests) checkpointed the whole WAL.
fn wait_until_checkpointed(app: &AppDb) {
    let (pages, page_size): (i64, i64) = app
        .conn
        .query_row(
            "SELECT page_count, page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "walsync's checkpoint to fill the database file",
        || std::fs::metadata(&app.path).map_or(0, |m| m.len()) >= (pages * page_size) as u64,
    );
}

/// Run walsync through the library with a small PASSIVE checkpoint threshold until its own
/// checkpoint has copied the whole WAL into the database file, then stop it cleanly.
pub(crate) fn replicate_until_walsync_checkpointed(storage: &Arc<dyn Storage>, app: &mut AppDb) {
    let options = Options {
        min_interval: Duration::from_millis(20),
        passive_checkpoint_frames: 10,
        ..Options::default()
    };
    let replicator = start(storage, &app.path, options);
    for _ in 0..4 {
        app.insert(10, 2000);
    }
    replicator.sync("app").unwrap();
    wait_until_checkpointed(app);
    replicator.stop(Duration::from_secs(30)).unwrap();
}
