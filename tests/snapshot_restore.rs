//! End to end against a real S3 server (s3s-fs, SigV4 checked): snapshots, segments,
//! point-in-time restore, large objects, many objects, and the emergency restore script.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::fixtures::{dump, files_in, integrity, walsync_err, walsync_ok, AppDb};
use crate::common::s3server::S3Server;
use walsync::format::ObjectName;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::UtcTime;
use walsync::{Replica, SyncOutcome};

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
fn restore_latest(storage: &dyn Storage, name: &str, out: &Path) -> walsync::RestorePlan {
    walsync::restore(storage, name, out, &walsync::RestoreOptions::default()).unwrap()
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

/// Permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Run the walsync binary under umask 022 (the usual one), insisting that it succeeds.
fn walsync_umask_022(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_walsync"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "walsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn file_replicas_and_restores_are_readable_only_by_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 100);
    std::fs::set_permissions(&app.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let replica_dir = dir.path().join("replica");
    let dest = format!("file://{}", replica_dir.display());
    let db = path_str(&app.path).to_string();
    walsync_umask_022(&["snapshot", &db, "-b", &dest]);
    app.insert(5, 100);
    // Ships the new commit as a segment first, then a second snapshot.
    walsync_umask_022(&["snapshot", &db, "-b", &dest]);

    let mut seen = (0, 0);
    let mut pending = vec![replica_dir.clone()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            assert_eq!(mode_of(&path), 0o700, "{}", path.display());
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            seen.0 += 1;
        } else {
            assert_eq!(mode_of(&path), 0o600, "{}", path.display());
            seen.1 += 1;
        }
    }
    // The root, app/, snapshots/, wal/; two snapshots, a segment and state.json.
    assert_eq!(seen, (4, 4), "directories and files checked");

    // The restored file: 0600 by default, or --mode less the umask.
    for (mode, expected) in [(None, 0o600), (Some("0640"), 0o640), (Some("666"), 0o644)] {
        let out = dir.path().join(format!("restored-{mode:?}.db"));
        let mut args = vec!["restore", "app", "-o", path_str(&out), "-b", &dest];
        args.extend(mode.map(|m| ["--mode", m]).into_iter().flatten());
        walsync_umask_022(&args);
        assert_eq!(mode_of(&out), expected, "--mode {mode:?}");
        assert_eq!(dump(&out), app.dump());
    }
    let err = walsync_err(
        &[
            "restore",
            "app",
            "-o",
            "/nonexistent/x.db",
            "-b",
            &dest,
            "--mode",
            "0999",
        ],
        &[],
    );
    assert!(err.contains("--mode"), "{err}");
}

/// Storage that notes the mode of the restore's temporary file at every download.
struct WatchTmp {
    inner: FileStorage,
    tmp: std::path::PathBuf,
    modes: std::sync::Mutex<Vec<u32>>,
}

impl Storage for WatchTmp {
    fn put_bytes(&self, key: &str, data: &[u8]) -> walsync::Result<()> {
        self.inner.put_bytes(key, data)
    }
    fn put_file(&self, key: &str, file: &std::fs::File) -> walsync::Result<()> {
        self.inner.put_file(key, file)
    }
    fn get(&self, key: &str, out: &mut dyn std::io::Write) -> walsync::Result<u64> {
        self.modes.lock().unwrap().push(mode_of(&self.tmp));
        self.inner.get(key, out)
    }
    fn list(&self, prefix: &str) -> walsync::Result<Vec<walsync::storage::ObjectInfo>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> walsync::Result<()> {
        self.inner.delete(key)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn the_restore_temporary_file_is_never_wider_than_the_output() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("replica")));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(10, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.snapshot().unwrap();
    for _ in 0..2 {
        app.insert(3, 100);
        shipped_key(replica.sync().unwrap());
    }
    let out = dir.path().join("out.db");
    let tmp = dir.path().join("out.db.tmp");
    for mode in [None, Some(0o640)] {
        // A leftover of an interrupted restore, readable by all, is not reused.
        std::fs::write(&tmp, b"stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        let watch = WatchTmp {
            inner: FileStorage::new(dir.path().join("replica")),
            tmp: tmp.clone(),
            modes: Default::default(),
        };
        let options = walsync::RestoreOptions {
            mode,
            force: true,
            ..Default::default()
        };
        walsync::restore(&watch, "app", &out, &options).unwrap();
        let allowed = mode.unwrap_or(0o600);
        let modes = watch.modes.into_inner().unwrap();
        assert_eq!(modes.len(), 3, "snapshot and two segments");
        for seen in modes.iter().chain([&mode_of(&out)]) {
            assert_eq!(seen & !allowed, 0, "mode {seen:o} wider than {allowed:o}");
        }
        assert_eq!(dump(&out), app.dump());
        assert!(!tmp.exists());
    }
}

/// walsync's SQLite is built without FTS, R*Tree and the other modules it never calls
/// (`.cargo/config.toml`). A database that uses them, made by the sqlite3 shell, must still
/// be replicated and restored, and the restore's `integrity_check` must pass; an expression
/// index on a JSON function needs the function, which is why JSON stays in.
#[test]
fn a_database_using_sqlite_modules_walsync_leaves_out_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let status = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(
            "PRAGMA journal_mode=WAL;
             CREATE VIRTUAL TABLE notes USING fts5(body);
             INSERT INTO notes VALUES ('hello world');
             CREATE VIRTUAL TABLE boxes USING rtree(id, x0, x1);
             INSERT INTO boxes VALUES (1, 0, 1);
             CREATE TABLE docs(doc);
             CREATE INDEX docs_a ON docs(json_extract(doc, '$.a'));
             INSERT INTO docs VALUES ('{\"a\": 1}');",
        )
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let dest = format!("file://{}", dir.path().join("bucket").display());
    walsync_ok(&["snapshot", path_str(&db), "-b", &dest], &[]);
    let out = dir.path().join("restored.db");
    walsync_ok(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    let check = std::process::Command::new("sqlite3")
        .arg(&out)
        .arg("PRAGMA integrity_check; SELECT body FROM notes; SELECT count(*) FROM boxes;")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&check.stdout),
        "ok\nhello world\n1\n",
        "{check:?}"
    );
}
