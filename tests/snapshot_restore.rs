//! End to end against a real S3 server (s3s-fs, SigV4 checked): snapshots, segments,
//! point-in-time restore, large objects, many objects, and the emergency restore script.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fixtures::{dump, files_in, integrity, walsync_err, walsync_ok, AppDb};
use common::s3server::S3Server;
use walsync::layout::ObjectName;
use walsync::replica::{Replica, SyncOutcome};
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::utc::UtcTime;

fn s3_url(server: &S3Server, prefix: &str) -> String {
    format!("s3://{}/{prefix}", server.bucket())
}

fn time_of(key: &str) -> UtcTime {
    ObjectName::parse_key(key).expect("an object key").1.time
}

fn shipped_key(outcome: SyncOutcome) -> String {
    match outcome {
        SyncOutcome::Shipped { key, .. } => key,
        other => panic!("expected a shipped segment, got {other:?}"),
    }
}

/// Restore the latest state of `name` into `out` with the library, insisting it works.
fn restore_latest(storage: &dyn Storage, name: &str, out: &Path) -> walsync::restore::RestorePlan {
    walsync::restore::restore(
        storage,
        name,
        out,
        &walsync::restore::RestoreOptions::default(),
    )
    .unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn snapshot_and_restore_round_trip_through_the_binary() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(200, 300);
    app.exec("CREATE INDEX items_label ON items(label);");
    let dest = s3_url(&server, "backups/prod");
    let db = app.path.clone();

    let key = walsync_ok(&["snapshot", path_str(&db), "-b", &dest], &server.env());
    assert!(key.trim().starts_with("app/snapshots/"), "{key}");
    let expected = app.dump();
    app.insert(1, 10); // after the snapshot: must not be in the restore

    let out = dir.path().join("restored.db");
    walsync_ok(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert_eq!(dump(&out), expected);
    assert_eq!(integrity(&out), "ok");
    let leftovers: Vec<String> = files_in(dir.path())
        .into_iter()
        .filter(|f| f.starts_with("restored.db") && f != "restored.db")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // An existing output is refused unless --force, and is left untouched.
    std::fs::write(&out, b"precious").unwrap();
    let err = walsync_err(
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    walsync_ok(
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &dest,
            "--force",
        ],
        &server.env(),
    );
    assert_eq!(dump(&out), expected);

    // list shows the database, in both forms.
    let text = walsync_ok(&["list", "-b", &dest], &server.env());
    assert!(text.contains("app"), "{text}");
    let json = walsync_ok(&["list", "-b", &dest, "--json"], &server.env());
    let listing: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(listing["databases"][0]["name"], "app");
    assert_eq!(listing["databases"][0]["generations"][0]["snapshots"], 1);
}

#[test]
fn point_in_time_restore_matches_the_source_at_every_segment_boundary() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "pitr");
    let storage: Arc<dyn Storage> = Arc::new(server.storage("pitr"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 100);
    let mut replica = Replica::open(&app.path, storage, "app").unwrap();
    let base = replica.snapshot().unwrap();
    let mut states = vec![(time_of(&base), app.dump())];

    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(20));
        // Two transactions per segment, including an update and a delete.
        app.insert(5 + round, 500);
        app.exec("UPDATE items SET label = label || '+' WHERE id % 3 = 0; DELETE FROM items WHERE id % 7 = 0;");
        let key = shipped_key(replica.sync().unwrap());
        assert!(key.contains(&format!("-{:010}-", round + 1)), "{key}");
        states.push((time_of(&key), app.dump()));
    }
    assert_eq!(replica.sync().unwrap(), SyncOutcome::Idle);
    // The states really differ, so each comparison below means something.
    for pair in states.windows(2) {
        assert_ne!(pair[0].1, pair[1].1);
    }

    for (i, (time, expected)) in states.iter().enumerate() {
        let out = dir.path().join(format!("at-{i}.db"));
        walsync_ok(
            &[
                "restore",
                "app",
                "-o",
                path_str(&out),
                "-b",
                &dest,
                "--point-in-time",
                &time.to_rfc3339(),
            ],
            &server.env(),
        );
        assert_eq!(&dump(&out), expected, "state at boundary {i} ({time})");
        assert_eq!(integrity(&out), "ok");
    }

    let latest = dir.path().join("latest.db");
    walsync_ok(
        &["restore", "app", "-o", path_str(&latest), "-b", &dest],
        &server.env(),
    );
    assert_eq!(dump(&latest), app.dump());

    let before = UtcTime::from_millis(states[0].0.millis() - 60_000);
    let err = walsync_err(
        &[
            "restore",
            "app",
            "-o",
            path_str(&dir.path().join("too-early.db")),
            "-b",
            &dest,
            "--point-in-time",
            &before.to_rfc3339(),
        ],
        &server.env(),
    );
    assert!(err.contains("no backup of \"app\" at or before"), "{err}");
    assert!(!dir.path().join("too-early.db").exists());
}

#[test]
fn snapshot_ships_pending_commits_first_and_stays_aligned() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage(""));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.snapshot().unwrap();
    app.insert(3, 100);
    shipped_key(replica.sync().unwrap());
    app.insert(4, 100); // committed but not shipped
    let snap = replica.snapshot().unwrap();
    // The pending transaction became segment 2, and the snapshot is as of segment 2.
    let (_, name) = ObjectName::parse_key(&snap).unwrap();
    assert_eq!(name.index, 2);
    let keys: Vec<String> = storage
        .list("app/wal/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[1].contains("-0000000002-"));
    assert_eq!(replica.sync().unwrap(), SyncOutcome::Idle);

    let out = dir.path().join("out.db");
    let plan = restore_latest(storage.as_ref(), "app", &out);
    assert_eq!(plan.snapshot.name.index, 2);
    assert!(plan.segments.is_empty());
    assert_eq!(dump(&out), app.dump());
}

#[test]
fn continuity_lost_while_not_watching_starts_a_new_generation_and_loses_nothing() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("gen"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let first_generation = {
        let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
        replica.snapshot().unwrap();
        app.insert(2, 100);
        shipped_key(replica.sync().unwrap());
        replica.generation().unwrap().0
    };

    // walsync is stopped. The application commits, checkpoints and truncates the WAL, then
    // writes more: the frames written in between never reach walsync as WAL frames.
    app.insert(5, 100);
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(1, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    match replica.sync().unwrap() {
        SyncOutcome::NewGeneration { reason, .. } => {
            assert!(reason.contains("restarted"), "{reason}")
        }
        other => panic!("expected a new generation, got {other:?}"),
    }
    let (second_generation, index) = replica.generation().unwrap();
    assert!(second_generation > first_generation);
    assert_eq!(index, 0);
    app.insert(1, 100);
    shipped_key(replica.sync().unwrap());

    let out = dir.path().join("out.db");
    restore_latest(storage.as_ref(), "app", &out);
    assert_eq!(dump(&out), app.dump());
}

#[test]
fn restart_of_walsync_resumes_the_same_generation() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("resume"));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let generation = {
        let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
        replica.snapshot().unwrap();
        app.insert(1, 100);
        shipped_key(replica.sync().unwrap());
        replica.generation().unwrap()
    };
    app.insert(1, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    let key = shipped_key(replica.sync().unwrap());
    assert!(
        key.contains(&format!("{}-0000000002-", generation.0)),
        "{key}"
    );
}

#[test]
fn a_large_snapshot_goes_up_in_parts_and_restores() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_url(&server, "big");
    let mut app = AppDb::create(dir.path(), "big.db");
    // About 24 MiB of incompressible rows: above the 16 MiB multipart threshold even gzipped.
    for _ in 0..24 {
        app.insert(16, 64 * 1024);
    }
    server.clear_requests();
    walsync_ok(
        &["snapshot", path_str(&app.path), "-b", &dest],
        &server.env(),
    );
    let parts = server
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.has_param("partNumber"))
        .count();
    assert!(parts >= 2, "expected a multipart upload, saw {parts} parts");

    let out = dir.path().join("big-restored.db");
    walsync_ok(
        &["restore", "big", "-o", path_str(&out), "-b", &dest],
        &server.env(),
    );
    assert_eq!(dump(&out), app.dump());
    assert_eq!(integrity(&out), "ok");
}

#[test]
fn restore_plans_across_more_than_a_thousand_objects() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(server.storage("many"));
    let mut app = AppDb::create(dir.path(), "many.db");
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "many").unwrap();
    replica.snapshot().unwrap();
    for _ in 0..1005 {
        app.insert(1, 16);
        shipped_key(replica.sync().unwrap());
    }
    assert_eq!(storage.list("many/wal/").unwrap().len(), 1005);
    let out = dir.path().join("many-restored.db");
    walsync_ok(
        &[
            "restore",
            "many",
            "-o",
            path_str(&out),
            "-b",
            &s3_url(&server, "many"),
        ],
        &server.env(),
    );
    assert_eq!(dump(&out), app.dump());
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.has_param("list-type"))
        .count();
    assert!(
        lists >= 3,
        "two LIST pages for restore plus the check above: {lists}"
    );
}

#[test]
fn restore_by_hand_script_matches_walsync_restore() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(replica_dir.clone()));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(50, 200);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.snapshot().unwrap();
    let mut times = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(5));
        app.insert(10 + round, 1000);
        app.exec("DELETE FROM items WHERE id % 5 = 0;");
        times.push((time_of(&shipped_key(replica.sync().unwrap())), app.dump()));
    }
    // Shrink the database so replay must also truncate the file.
    app.exec("DELETE FROM items WHERE id > 20; VACUUM;");
    shipped_key(replica.sync().unwrap());

    let by_walsync = dir.path().join("by-walsync.db");
    let file_url = format!("file://{}", replica_dir.display());
    walsync_ok(
        &[
            "restore",
            "app",
            "-o",
            path_str(&by_walsync),
            "-b",
            &file_url,
        ],
        &[],
    );
    let by_hand = dir.path().join("by-hand.db");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/restore-by-hand.sh");
    let run = |out: &Path, until: Option<&str>| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(&script).arg(&replica_dir).arg("app").arg(out);
        cmd.args(until);
        let output = cmd.output().unwrap();
        assert!(
            output.status.success(),
            "restore-by-hand failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&by_hand, None);
    assert_eq!(dump(&by_hand), dump(&by_walsync));
    assert_eq!(dump(&by_hand), app.dump());
    assert_eq!(
        std::fs::read(&by_hand).unwrap(),
        std::fs::read(&by_walsync).unwrap(),
        "the two restores should be byte-identical"
    );
    // And to a point in time, in the object names' time spelling.
    let (time, expected) = &times[1];
    let at = dir.path().join("by-hand-at.db");
    run(&at, Some(&time.to_compact()));
    assert_eq!(&dump(&at), expected);
}
