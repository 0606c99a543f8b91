//! Retention against a real S3 server (s3s-fs, SigV4 checked) and `file://`: real SQLite
//! databases replicated over several generations, snapshots and segments, then pruned; every
//! point in the window must restore exactly as before, also by hand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fixtures::{
    dump, integrity, wait_for, walsync, walsync_ok, AppDb, WatchProcess,
};
use crate::common::s3server::S3Server;
use walsync::format::{Generation, ObjectKind, ObjectName};
use walsync::prune;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::ErrorKind;
use walsync::RestoreOptions;
use walsync::UtcTime;
use walsync::{Replica, SyncOutcome};

/// One stored object, and the content of the database as of its time.
#[derive(Clone, Debug)]
struct Point {
    key: String,
    name: ObjectName,
    dump: String,
}

fn point(key: String, app: &AppDb) -> Point {
    let name = ObjectName::parse_key(&key).expect("an object key").1;
    Point {
        key,
        name,
        dump: app.dump(),
    }
}

fn shipped(outcome: SyncOutcome) -> String {
    match outcome {
        SyncOutcome::Shipped { key, .. } | SyncOutcome::NewGeneration { key, .. } => key,
        SyncOutcome::Idle => panic!("nothing shipped"),
    }
}

/// Replicate `app` as `name` over two generations: A (base, 2 segments, a snapshot, 2 more
/// segments) and B (base, 2 segments, a snapshot, `pause`, 2 segments, a snapshot, 1
/// segment). Objects are a few milliseconds apart, so each has its own time.
fn build_history(storage: &Arc<dyn Storage>, app: &mut AppDb, pause: Duration) -> Vec<Point> {
    let mut points = Vec::new();
    let step = || std::thread::sleep(Duration::from_millis(15));
    let mut replica = Replica::open(&app.path, Arc::clone(storage), "app").unwrap();
    let segment = |replica: &mut Replica, app: &mut AppDb, points: &mut Vec<Point>| {
        step();
        app.insert(3, 700);
        app.exec("UPDATE items SET label = label || '+' WHERE id % 4 = 0;");
        let key = shipped(replica.sync().unwrap());
        points.push(point(key, app));
    };
    app.insert(20, 500);
    points.push(point(replica.snapshot().unwrap(), app));
    for _ in 0..2 {
        segment(&mut replica, app, &mut points);
    }
    step();
    points.push(point(replica.snapshot().unwrap(), app));
    for _ in 0..2 {
        segment(&mut replica, app, &mut points);
    }
    drop(replica);

    // walsync is stopped; the application checkpoints and restarts the WAL: generation B.
    step();
    app.insert(2, 100);
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(2, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(storage), "app").unwrap();
    let outcome = replica.sync().unwrap();
    assert!(
        matches!(outcome, SyncOutcome::NewGeneration { .. }),
        "{outcome:?}"
    );
    points.push(point(shipped(outcome), app));
    for _ in 0..2 {
        segment(&mut replica, app, &mut points);
    }
    step();
    points.push(point(replica.snapshot().unwrap(), app));
    std::thread::sleep(pause);
    for _ in 0..2 {
        segment(&mut replica, app, &mut points);
    }
    step();
    points.push(point(replica.snapshot().unwrap(), app));
    segment(&mut replica, app, &mut points);
    let generations: std::collections::BTreeSet<&Generation> =
        points.iter().map(|p| &p.name.generation).collect();
    assert_eq!(generations.len(), 2, "{points:#?}");
    points
}

fn keys(storage: &dyn Storage) -> Vec<String> {
    storage
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

fn is_snapshot(p: &Point) -> bool {
    p.name.kind == ObjectKind::Snapshot
}

/// What the database looked like at `t`: as of the newest object stored at or before it.
fn state_at(points: &[Point], t: UtcTime) -> &str {
    &points
        .iter()
        .rfind(|p| p.name.time <= t)
        .expect("a point at or before t")
        .dump
}

fn restore_to(
    storage: &dyn Storage,
    out: &Path,
    at: Option<UtcTime>,
    generation: Option<&Generation>,
) -> walsync::Result<String> {
    let options = RestoreOptions {
        point_in_time: at,
        generation: generation.cloned(),
        force: true,
        ..RestoreOptions::default()
    };
    walsync::restore(storage, "app", out, &options)?;
    assert_eq!(integrity(out), "ok");
    Ok(dump(out))
}

/// Restore every point from `window` on (each object time, `window` itself, the latest,
/// and the newest generation at `window` and latest), insisting on the content the
/// database had then.
fn assert_window_restores(storage: &dyn Storage, points: &[Point], window: UtcTime, dir: &Path) {
    let out = dir.join("check.db");
    let latest = &points.last().unwrap().dump;
    let newest_generation = &points.last().unwrap().name.generation;
    assert_eq!(&restore_to(storage, &out, None, None).unwrap(), latest);
    assert_eq!(
        &restore_to(storage, &out, None, Some(newest_generation)).unwrap(),
        latest
    );
    let mut times: Vec<UtcTime> = points
        .iter()
        .map(|p| p.name.time)
        .filter(|t| *t >= window)
        .collect();
    times.push(window);
    for t in times {
        let expected = state_at(points, t);
        let got = restore_to(storage, &out, Some(t), None)
            .unwrap_or_else(|e| panic!("restore to {t} failed: {e}"));
        assert_eq!(got, expected, "content restored to {t}");
    }
    // The newest generation on its own, from the window on: its snapshots at or after it.
    let first_in_newest = points
        .iter()
        .find(|p| &p.name.generation == newest_generation && is_snapshot(p))
        .unwrap()
        .name
        .time;
    let t = window.max(first_in_newest);
    assert_eq!(
        restore_to(storage, &out, Some(t), Some(newest_generation)).unwrap(),
        state_at(points, t)
    );
}

fn run_restore_by_hand(replica_dir: &Path, out: &Path, until: Option<&str>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/restore-by-hand.sh");
    let _ = std::fs::remove_file(out);
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script).arg(replica_dir).arg("app").arg(out);
    cmd.args(until);
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "restore-by-hand failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(integrity(out), "ok");
    dump(out)
}

#[test]
fn pruning_keeps_every_point_in_the_window_restorable_on_s3() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("ret"));
    let mut app = AppDb::create(dir.path(), "app.db");
    let points = build_history(&storage, &mut app, Duration::from_millis(40));
    let before = keys(storage.as_ref());
    assert!(before.contains(&"app/state.json".to_string()));

    // W between generation B's first later snapshot X and the object after it: S* = X.
    let (generation_a, generation_b) = (
        &points[0].name.generation,
        &points.last().unwrap().name.generation,
    );
    let x = points
        .iter()
        .position(|p| is_snapshot(p) && &p.name.generation == generation_b && p.name.index > 0)
        .unwrap();
    let window =
        UtcTime::from_millis((points[x].name.time.millis() + points[x + 1].name.time.millis()) / 2);
    assert!(points[x].name.time < window && window < points[x + 1].name.time);
    let x_index = points[x].name.index;
    // Expected, by the rule: all of A; B's base snapshot; B's segments before X's index.
    // Snapshots first, then segments, oldest first.
    let doomed = |p: &&Point| {
        &p.name.generation == generation_a
            || (p.name.generation == *generation_b && p.name.index < x_index)
    };
    let mut expected: Vec<String> = points
        .iter()
        .filter(doomed)
        .filter(|p| is_snapshot(p))
        .map(|p| p.key.clone())
        .collect();
    expected.extend(
        points
            .iter()
            .filter(doomed)
            .filter(|p| !is_snapshot(p))
            .map(|p| p.key.clone()),
    );
    assert_eq!(expected.len(), 8, "{expected:#?}");

    // Everything restores before pruning (the comparison below means something).
    assert_window_restores(storage.as_ref(), &points, window, dir.path());

    let retention = Duration::from_secs(3600);
    let now = UtcTime::from_millis(window.millis() + 3_600_000);
    let dry = prune(storage.as_ref(), "app", now, retention, true).unwrap();
    assert_eq!(dry.keys(), expected);
    assert_eq!(dry.base.as_ref().unwrap().key, points[x].key);
    assert_eq!(keys(storage.as_ref()), before, "a dry run deletes nothing");
    let sizes: u64 = storage
        .list("")
        .unwrap()
        .iter()
        .filter(|o| expected.contains(&o.key))
        .map(|o| o.size)
        .sum();
    assert_eq!(dry.bytes, sizes);

    // A prune interrupted after its snapshots: generation A is left with segments only.
    // Restores in the window, list and status must not mind.
    let snapshots = dry.snapshots();
    storage.delete_many(&expected[..snapshots]).unwrap();
    assert_window_restores(storage.as_ref(), &points, window, dir.path());
    let listing = walsync::list(storage.as_ref()).unwrap();
    let a = &listing.databases[0].generations[0];
    assert_eq!((a.snapshots, a.segments), (0, 4), "{a:?}");
    assert!(listing.to_text().contains(generation_a.as_str()));
    let status = walsync::status(storage.as_ref(), &[], None).unwrap();
    assert_eq!(status.databases[0].generation, generation_b.to_string());
    let out = dir.path().join("segments-only.db");
    let err = restore_to(storage.as_ref(), &out, None, Some(generation_a)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("no snapshot to restore from"),
        "{err}"
    );

    // The rest of the prune.
    let plan = prune(storage.as_ref(), "app", now, retention, false).unwrap();
    assert_eq!(plan.keys(), expected[snapshots..]);
    let after = keys(storage.as_ref());
    let mut wanted = before.clone();
    wanted.retain(|k| !expected.contains(k));
    assert_eq!(after, wanted);
    assert!(after.contains(&"app/state.json".to_string()));
    assert_window_restores(storage.as_ref(), &points, window, dir.path());
    // Pruning again finds nothing more.
    let again = prune(storage.as_ref(), "app", now, retention, false).unwrap();
    assert!(again.delete.is_empty(), "{:?}", again.keys());

    // Before the window there is no backup any more, and restore says so.
    let early = points[x - 1].name.time;
    let err = restore_to(storage.as_ref(), &out, Some(early), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string()
            .contains("no backup of \"app\" at or before"),
        "{err}"
    );

    // And by hand, from the bucket's files as s3s-fs keeps them: latest and at W.
    let replica_dir = server.root().join(server.bucket()).join("ret");
    let by_hand = dir.path().join("by-hand.db");
    assert_eq!(
        run_restore_by_hand(&replica_dir, &by_hand, None),
        points.last().unwrap().dump
    );
    assert_eq!(
        run_restore_by_hand(&replica_dir, &by_hand, Some(&window.to_compact())),
        state_at(&points, window)
    );
}

/// The real binary: `prune --dry-run` lists and deletes nothing, `prune` deletes exactly
/// that, and the flag wins over WALSYNC_RETENTION.
fn prune_through_the_binary(
    dest: &str,
    env: &[(String, String)],
    storage: &Arc<dyn Storage>,
    replica_dir: &Path,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let points = build_history(storage, &mut app, Duration::from_millis(0));
    // Let the window (now - 1s) pass the newest object: S* is then the newest snapshot.
    std::thread::sleep(Duration::from_millis(1500));
    let newest = points.iter().rfind(|p| is_snapshot(p)).unwrap().clone();
    let mut expected: Vec<String> = points
        .iter()
        .filter(|p| is_snapshot(p) && p.key != newest.key)
        .map(|p| p.key.clone())
        .collect();
    expected.extend(
        points
            .iter()
            .filter(|p| !is_snapshot(p))
            .filter(|p| {
                p.name.generation != newest.name.generation || p.name.index < newest.name.index
            })
            .map(|p| p.key.clone()),
    );
    let before = storage.list("").unwrap();
    let bytes: u64 = before
        .iter()
        .filter(|o| expected.contains(&o.key))
        .map(|o| o.size)
        .sum();

    let mut with_env = env.to_vec();
    with_env.push(("WALSYNC_RETENTION".into(), "1s".into()));
    let text = walsync_ok(&["prune", "-b", dest, "--dry-run"], &with_env);
    for key in &expected {
        assert!(
            text.contains(&format!("would delete  {key}  ")),
            "{key} in {text}"
        );
    }
    assert_eq!(
        text.matches("would delete  ").count(),
        expected.len(),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "dry run total: would delete {} objects, {bytes} bytes freed",
            expected.len()
        )),
        "{text}"
    );
    assert_eq!(
        storage.list("").unwrap(),
        before,
        "a dry run deletes nothing"
    );

    // The flag wins over the variable: WALSYNC_RETENTION=0 would keep everything.
    let mut keep_all = env.to_vec();
    keep_all.push(("WALSYNC_RETENTION".into(), "0".into()));
    let text = walsync_ok(
        &["prune", "app", "-b", dest, "--retention", "1s"],
        &keep_all,
    );
    assert!(
        text.contains(&format!(
            "app: deleted {} objects ({} snapshots, {} segments), {bytes} bytes freed",
            expected.len(),
            points.iter().filter(|p| is_snapshot(p)).count() - 1,
            expected.len() + 1 - points.iter().filter(|p| is_snapshot(p)).count(),
        )),
        "{text}"
    );
    let after: Vec<String> = storage
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut wanted: Vec<String> = before.into_iter().map(|o| o.key).collect();
    wanted.retain(|k| !expected.contains(k));
    assert_eq!(after, wanted);
    let text = walsync_ok(&["prune", "-b", dest], &keep_all);
    assert!(
        text.contains("app: retention 0: keeping everything"),
        "{text}"
    );

    // The latest and the newest snapshot's time still restore, by walsync and by hand.
    let out = dir.path().join("out.db");
    let out_s = out.to_str().unwrap();
    walsync_ok(&["restore", "app", "-o", out_s, "-b", dest], env);
    assert_eq!(dump(&out), app.dump());
    assert_eq!(integrity(&out), "ok");
    walsync_ok(
        &[
            "restore",
            "app",
            "-o",
            out_s,
            "-b",
            dest,
            "--force",
            "--point-in-time",
            &newest.name.time.to_rfc3339(),
        ],
        env,
    );
    assert_eq!(dump(&out), newest.dump);
    let by_hand = dir.path().join("by-hand.db");
    assert_eq!(run_restore_by_hand(replica_dir, &by_hand, None), app.dump());

    // Before the window: a clear error, exit status 3.
    let first = points[0].name.time.to_rfc3339();
    let early = walsync(
        &[
            "restore",
            "app",
            "-o",
            out_s,
            "-b",
            dest,
            "--force",
            "--point-in-time",
            &first,
        ],
        env,
    );
    assert_eq!(early.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&early.stderr);
    assert!(
        stderr.contains("no backup of \"app\" at or before"),
        "{stderr}"
    );

    // Usage errors.
    let missing = walsync(&["prune", "-b", dest], env);
    assert_eq!(missing.status.code(), Some(2));
    let unknown = walsync(&["prune", "nope", "-b", dest, "--retention", "1h"], env);
    assert_eq!(unknown.status.code(), Some(3));
}

#[test]
fn the_prune_command_on_s3() {
    let server = S3Server::start();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("cli"));
    let dest = format!("s3://{}/cli", server.bucket());
    let replica_dir = server.root().join(server.bucket()).join("cli");
    prune_through_the_binary(&dest, &server.env(), &storage, &replica_dir);
}

#[test]
fn the_prune_command_on_a_file_destination() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir: PathBuf = dir.path().join("replica");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(replica_dir.clone()));
    let dest = format!("file://{}", replica_dir.display());
    prune_through_the_binary(&dest, &[], &storage, &replica_dir);
}

#[test]
fn watch_prunes_while_it_runs_and_the_replica_stays_restorable() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 200);
    let dest = format!("s3://{}/watch", server.bucket());
    let storage = server.storage("watch");
    let mut env = server.env();
    env.push(("WALSYNC_RETENTION".into(), "2s".into()));
    let db = app.path.to_str().unwrap().to_string();
    let watch = WatchProcess::start(
        &[
            &db,
            "-b",
            &dest,
            "--snapshot-interval",
            "0.5",
            "--min-interval",
            "0.05",
        ],
        &env,
        dir.path(),
    );
    let snapshots = |storage: &dyn Storage| -> Vec<String> {
        storage
            .list("app/snapshots/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    };
    wait_for(Duration::from_secs(20), "the first snapshot", || {
        !snapshots(&storage).is_empty()
    });
    let first = snapshots(&storage)[0].clone();
    // Keep writing: snapshots every half second, pruning at most every 2 s.
    let start = std::time::Instant::now();
    let mut pruned = false;
    while start.elapsed() < Duration::from_secs(30) {
        app.insert(2, 300);
        std::thread::sleep(Duration::from_millis(100));
        if !snapshots(&storage).contains(&first) && watch.log().contains("app: deleted ") {
            pruned = true;
            break;
        }
    }
    assert!(pruned, "nothing pruned: {}", watch.log());
    assert!(watch.log().contains("retention 2s"), "{}", watch.log());
    // Still replicating after pruning.
    for _ in 0..5 {
        app.insert(2, 300);
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected = app.dump();
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let out = dir.path().join("out.db");
    walsync_ok(
        &["restore", "app", "-o", out.to_str().unwrap(), "-b", &dest],
        &server.env(),
    );
    assert_eq!(dump(&out), expected);
    assert_eq!(integrity(&out), "ok");
    // What pruning left is whole: a restore to the oldest snapshot left works.
    let oldest = ObjectName::parse_key(&snapshots(&storage)[0]).unwrap().1;
    walsync_ok(
        &[
            "restore",
            "app",
            "-o",
            out.to_str().unwrap(),
            "-b",
            &dest,
            "--force",
            "--point-in-time",
            &oldest.time.to_rfc3339(),
        ],
        &server.env(),
    );
    assert_eq!(integrity(&out), "ok");
}

/// A database that went idle still loses its old backups: watch prunes it again, by itself,
/// when the window passes its next snapshot, with no new snapshot to set it off. (Before,
/// an idle database was pruned once at start and then never.)
#[test]
fn watch_prunes_an_idle_database_as_its_window_moves() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = format!("s3://{}/idle", server.bucket());
    let storage = server.storage("idle");
    let db = app.path.to_str().unwrap().to_string();
    let snapshots = |storage: &dyn Storage| -> Vec<String> {
        storage
            .list("app/snapshots/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    };
    // Three snapshots about a second apart, then nothing more is written.
    for _ in 0..3 {
        app.insert(3, 200);
        walsync_ok(&["snapshot", &db, "-b", &dest], &server.env());
        std::thread::sleep(Duration::from_millis(1100));
    }
    let before = snapshots(&storage);
    assert_eq!(before.len(), 3, "{before:?}");
    let expected = app.dump();
    let mut env = server.env();
    env.push(("WALSYNC_RETENTION".into(), "3s".into()));
    let watch = WatchProcess::start(&[&db, "-b", &dest], &env, dir.path());
    // The window (3 s) passes the second snapshot, then the third: the first two go.
    wait_for(
        Duration::from_secs(30),
        "the first two snapshots pruned",
        || {
            let now = snapshots(&storage);
            !now.contains(&before[0]) && !now.contains(&before[1])
        },
    );
    // The newest is kept, unless watch has stored a newer one since (a new generation).
    let left = snapshots(&storage);
    assert!(
        left.contains(&before[2]) || left.iter().any(|k| k > &before[2]),
        "{left:?}"
    );
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let out = dir.path().join("out.db");
    walsync_ok(
        &["restore", "app", "-o", out.to_str().unwrap(), "-b", &dest],
        &server.env(),
    );
    assert_eq!(dump(&out), expected);
    assert_eq!(integrity(&out), "ok");
}

#[test]
fn delete_many_batches_a_thousand_keys_and_falls_back_without_delete_objects() {
    let server = S3Server::start();
    let storage = server.storage("many");
    let keys: Vec<String> = (0..1003).map(|i| format!("app/wal/k{i:05}")).collect();
    for key in &keys {
        storage.put_bytes(key, b"x").unwrap();
    }
    server.clear_requests();
    storage.delete_many(&keys).unwrap();
    let requests = server.requests();
    let posts: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.has_param("delete"))
        .collect();
    assert_eq!(posts.len(), 2, "{requests:#?}");
    assert_eq!(requests.len(), 2, "one request per 1000 keys");
    assert!(storage.list("app/").unwrap().is_empty());
    assert_eq!(storage.stats().batch_deletes, 2);
    // Deleting keys that are gone is not an error.
    storage.delete_many(&keys[..3]).unwrap();

    // A server without DeleteObjects: one DeleteObject per key, and it is remembered.
    for key in &keys[..3] {
        storage.put_bytes(key, b"x").unwrap();
    }
    server.refuse_delete_objects(true);
    server.clear_requests();
    storage.delete_many(&keys[..2]).unwrap();
    let methods: Vec<String> = server.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["POST", "DELETE", "DELETE"]);
    server.clear_requests();
    storage.delete_many(&keys[2..3]).unwrap();
    let methods: Vec<String> = server.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["DELETE"]);
    assert!(storage.list("app/").unwrap().is_empty());
}

#[test]
fn delete_many_reports_the_keys_the_server_could_not_delete() {
    let server = S3Server::start();
    let storage = server.storage("errs").with_max_attempts(2);
    let keys: Vec<String> = (0..3).map(|i| format!("app/wal/k{i}")).collect();
    let answer = |code: &str| {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Error><Key>errs/app/wal/k1</Key><Code>{code}</Code><Message>No.</Message></Error>\
             <Error><Key>errs/app/wal/k2</Key><Code>NoSuchKey</Code><Message>Gone.</Message></Error>\
             </DeleteResult>"
        )
    };
    // Refused: an error naming the key (relative, as the caller knows it) and the code.
    server.answer_delete_objects_with(Some(&answer("AccessDenied")));
    let err = storage.delete_many(&keys).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let text = err.to_string();
    assert!(text.contains("DeleteObjects"), "{text}");
    assert!(
        text.contains("1 of 3 keys not deleted: app/wal/k1 (AccessDenied: No.)"),
        "{text}"
    );
    assert!(
        !text.contains("k2 ("),
        "a missing key counts as deleted: {text}"
    );

    // A temporary per-key failure is sent again (only that key), then reported.
    server.answer_delete_objects_with(Some(&answer("InternalError")));
    server.clear_requests();
    let err = storage.delete_many(&keys).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(
        err.to_string().contains("gave up after 2 attempts"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 2);
    assert!(err.to_string().contains("1 of 1 keys not deleted"), "{err}");
}
