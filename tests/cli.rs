//! The command line as scripts and service managers use it: exit codes by error class,
//! settings from WALSYNC_* variables (a flag always wins), `--version`, and the
//! script-friendly restore flags (`--if-db-not-exists`, `--if-replica-exists`, `--dry-run`,
//! `--generation`). All through the real binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fixtures::{dump, files_in, walsync, AppDb, WatchProcess};
use walsync::format::ObjectName;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::Replica;
use walsync_testkit::s3server::S3Server;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Run walsync; returns (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = walsync(args, env);
    (
        out.status.code().expect("walsync exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run walsync, insisting on exit code `code`; returns stderr.
fn fails_with(code: i32, args: &[&str], env: &[(String, String)]) -> String {
    let (got, stdout, stderr) = run(args, env);
    assert_eq!(
        got, code,
        "walsync {args:?}: expected exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    );
    stderr
}

/// Run walsync, insisting on success; returns (stdout, stderr).
fn succeeds(args: &[&str], env: &[(String, String)]) -> (String, String) {
    let (code, stdout, stderr) = run(args, env);
    assert_eq!(code, 0, "walsync {args:?} failed: {stderr}");
    (stdout, stderr)
}

/// A `file://` replica of `app` (a snapshot and three segments) in a temporary directory.
struct FileReplica {
    dir: tempfile::TempDir,
    app: AppDb,
    root: PathBuf,
    dest: String,
}

impl FileReplica {
    fn new() -> FileReplica {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replica");
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(root.clone()));
        let mut app = AppDb::create(dir.path(), "app.db");
        app.insert(10, 100);
        let mut replica = Replica::open(&app.path, storage, "app").unwrap();
        replica.snapshot().unwrap();
        for _ in 0..3 {
            app.insert(3, 2000);
            replica.sync().unwrap();
        }
        FileReplica {
            dest: format!("file://{}", root.display()),
            dir,
            app,
            root,
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every object under the replica, as keys relative to its root, sorted.
    fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for kind in ["snapshots", "wal"] {
            for file in files_in(&self.root.join("app").join(kind)) {
                keys.push(format!("app/{kind}/{file}"));
            }
        }
        keys
    }

    /// Files in the working directory whose names start with `prefix`.
    fn outputs(&self, prefix: &str) -> Vec<String> {
        files_in(self.dir.path())
            .into_iter()
            .filter(|f| f.starts_with(prefix))
            .collect()
    }
}

#[test]
fn version_and_help_name_the_version_exit_codes_and_variables() {
    let version = format!("walsync {}", env!("CARGO_PKG_VERSION"));
    let (stdout, _) = succeeds(&["--version"], &[]);
    assert_eq!(stdout, format!("{version}\n"));

    let (help, _) = succeeds(&["--help"], &[]);
    assert!(help.contains(&format!("{version}:")), "{help}");
    assert!(!help.contains("VERSION"), "placeholder left in: {help}");
    assert!(help.contains("Error codes:"), "{help}");
    for code in 0..=5 {
        assert!(
            help.contains(&format!("\n  {code} ")),
            "code {code}: {help}"
        );
    }

    let storage_vars = ["WALSYNC_BUCKET", "WALSYNC_ENDPOINT", "WALSYNC_S3_TIMEOUT"];
    let watch_vars = [
        "WALSYNC_MIN_INTERVAL",
        "WALSYNC_SNAPSHOT_INTERVAL",
        "WALSYNC_UPLOAD_WORKERS",
        "WALSYNC_SHUTDOWN_TIMEOUT",
        "WALSYNC_STAGING_LIMIT",
        "WALSYNC_EXEC",
        "WALSYNC_RETENTION",
        "WALSYNC_METRICS_ADDR",
        "WALSYNC_HEARTBEAT_URL",
        "WALSYNC_HEARTBEAT_INTERVAL",
        "WALSYNC_DIR",
        "WALSYNC_PATTERN",
        "WALSYNC_RECURSIVE",
    ];
    let prune_vars = ["WALSYNC_RETENTION"];
    for command in ["watch", "snapshot", "list", "status", "restore", "prune"] {
        let (help, _) = succeeds(&[command, "--help"], &[]);
        // argh wraps descriptions; compare without line breaks and indentation.
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let vars = storage_vars.iter().chain(match command {
            "watch" => &watch_vars[..],
            "prune" => &prune_vars[..],
            _ => &[],
        });
        for var in vars {
            assert!(help.contains(var), "{command} --help lacks {var}: {help}");
        }
        assert!(help.contains("Exit codes"), "{command}: {help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    // argh's own parse errors: an unknown flag, a missing required option, a bad number.
    let err = fails_with(2, &["list", "--bogus"], &[]);
    assert!(err.contains("--bogus"), "{err}");
    fails_with(2, &["restore", "app"], &[]);
    fails_with(2, &["list", "-b", "file:///x", "--s3-timeout", "soon"], &[]);
    fails_with(2, &[], &[]);
    fails_with(2, &["frobnicate"], &[]);
    // Ours: no destination at all, a bad value, contradicting flags.
    let err = fails_with(2, &["list"], &[]);
    assert!(
        err.contains("-b") && err.contains("WALSYNC_BUCKET"),
        "{err}"
    );
    let err = fails_with(2, &["list", "-b", "ftp://example/x"], &[]);
    assert!(err.contains("not supported"), "{err}");
    let err = fails_with(
        2,
        &[
            "restore",
            "app",
            "-o",
            "/nonexistent/x.db",
            "-b",
            "file:///nonexistent",
            "--force",
            "--if-db-not-exists",
        ],
        &[],
    );
    assert!(err.contains("contradict"), "{err}");
}

#[test]
fn not_found_corrupt_and_storage_failures_have_their_own_codes() {
    let r = FileReplica::new();
    let out = r.out("out.db");

    // 3: no such replica, no such database file.
    let err = fails_with(
        3,
        &["restore", "other", "-o", path_str(&out), "-b", &r.dest],
        &[],
    );
    assert!(err.contains("no replica named \"other\""), "{err}");
    let missing = r.out("missing.db");
    let err = fails_with(3, &["snapshot", path_str(&missing), "-b", &r.dest], &[]);
    assert!(err.contains("does not exist"), "{err}");

    // 4: a corrupt object.
    let wal = r.root.join("app/wal");
    let victim = wal.join(&files_in(&wal)[1]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&victim, bytes).unwrap();
    let err = fails_with(
        4,
        &["restore", "app", "-o", path_str(&out), "-b", &r.dest],
        &[],
    );
    assert!(err.contains("corrupt"), "{err}");
    assert!(r.outputs("out.db").is_empty());

    // 5: credentials refused, storage unreachable.
    let mut server = S3Server::start();
    let dest = format!("s3://{}/x", server.bucket());
    let secret = "not-the-secret-Zq81xx";
    let wrong: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "AWS_SECRET_ACCESS_KEY" => (k, secret.to_string()),
            _ => (k, v),
        })
        .collect();
    let err = fails_with(5, &["list", "-b", &dest], &wrong);
    assert!(!err.contains(secret), "{err}");
    let err = fails_with(
        5,
        &["restore", "app", "-o", path_str(&out), "-b", &dest],
        &wrong,
    );
    assert!(!err.contains(secret), "{err}");
    server.stop();
    fails_with(
        5,
        &["list", "-b", &dest, "--s3-timeout", "2"],
        &server.env(),
    );
    assert!(r.outputs("out.db").is_empty());
}

#[test]
fn if_db_not_exists_skips_an_existing_output_only() {
    let r = FileReplica::new();
    let out = r.out("out.db");
    let args = [
        "restore",
        "app",
        "-o",
        path_str(&out),
        "-b",
        &r.dest,
        "--if-db-not-exists",
    ];
    // No output yet: restores.
    succeeds(&args, &[]);
    assert_eq!(dump(&out), r.app.dump());

    // Output there: does nothing, says so in one line, exit 0.
    std::fs::write(&out, b"precious").unwrap();
    let (stdout, stderr) = succeeds(&args, &[]);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // Nothing is needed from storage for that: even an unusable destination is fine.
    let mut args = args.to_vec();
    args[5] = "file:///nonexistent/walsync";
    succeeds(&args, &[]);
    // Without the flag an existing output stays an error.
    fails_with(2, &args[..6], &[]);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    assert!(r.outputs("out.db.tmp").is_empty());
}

#[test]
fn if_replica_exists_skips_a_missing_replica_only() {
    let r = FileReplica::new();
    let out = r.out("out.db");
    // No replica of that name: exit 0, one line, nothing written.
    let (stdout, stderr) = succeeds(
        &[
            "restore",
            "other",
            "-o",
            path_str(&out),
            "-b",
            &r.dest,
            "--if-replica-exists",
        ],
        &[],
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no replica of \"other\""), "{stderr}");
    assert!(r.outputs("out.db").is_empty());
    // Nor under a destination that has nothing at all.
    let empty = format!("file://{}", r.out("empty").display());
    succeeds(
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &empty,
            "--if-replica-exists",
        ],
        &[],
    );
    assert!(r.outputs("out.db").is_empty());
    fails_with(
        3,
        &["restore", "app", "-o", path_str(&out), "-b", &empty],
        &[],
    );

    // A replica: restores as usual.
    succeeds(
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &r.dest,
            "--if-replica-exists",
        ],
        &[],
    );
    assert_eq!(dump(&out), r.app.dump());
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let r = FileReplica::new();
    let out = r.out("out.db");
    let before = files_in(r.dir.path());
    let (stdout, _) = succeeds(
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &r.dest,
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(files_in(r.dir.path()), before, "a dry run wrote something");

    let keys = r.keys();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let mut total = 0;
    for key in &keys {
        let size = std::fs::metadata(r.root.join(key)).unwrap().len();
        total += size;
        assert!(
            stdout.contains(&format!("{key}  {size} bytes")),
            "{key} ({size} bytes) missing: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("total        {total} bytes")),
        "{stdout}"
    );
    let (_, newest) = ObjectName::parse_key(&keys[3]).unwrap();
    assert!(
        stdout.contains(&format!("restores to  {}", newest.time.to_rfc3339())),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("generation   {}", newest.generation)));
    assert!(!stdout.contains("duplicate"), "{stdout}");

    // A dry run refuses what the restore would refuse.
    std::fs::write(&out, b"precious").unwrap();
    let err = fails_with(
        2,
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &r.dest,
            "--dry-run",
        ],
        &[],
    );
    assert!(err.contains("already exists"), "{err}");
    fails_with(
        3,
        &[
            "restore",
            "other",
            "-o",
            path_str(&r.out("x.db")),
            "-b",
            &r.dest,
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn dry_run_says_duplicates_are_resolved_at_download_time() {
    let r = FileReplica::new();
    // A second cut of index 2 (a copy of the first under a later time).
    let wal = r.root.join("app/wal");
    let second = files_in(&wal)[1].clone();
    let (_, mut name) = ObjectName::parse_key(&format!("app/wal/{second}")).unwrap();
    name.time = walsync::UtcTime::from_millis(name.time.millis() + 1);
    let copy = name.key("app");
    std::fs::copy(wal.join(&second), r.root.join(&copy)).unwrap();
    let (stdout, _) = succeeds(
        &[
            "restore",
            "app",
            "-o",
            path_str(&r.out("out.db")),
            "-b",
            &r.dest,
            "--dry-run",
        ],
        &[],
    );
    assert!(stdout.contains(&format!("app/wal/{second}")), "{stdout}");
    assert!(stdout.contains(&copy), "{stdout}");
    assert!(stdout.contains("duplicate"), "{stdout}");
    assert!(stdout.contains("resolved at download time"), "{stdout}");
}

#[test]
fn generation_picks_an_older_generation_and_refuses_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let dest = format!("file://{}", root.display());
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(root.clone()));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    let first_snapshot = replica.snapshot().unwrap();
    let at_first_snapshot = app.dump();
    app.insert(5, 100);
    replica.sync().unwrap();
    let end_of_first = app.dump();
    drop(replica);
    // Commits, and a TRUNCATE checkpoint, while nobody replicates: a new generation.
    app.insert(5, 100);
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    let mut replica = Replica::open(&app.path, storage, "app").unwrap();
    let second_snapshot = replica.snapshot().unwrap();
    app.insert(1, 100);
    replica.sync().unwrap();
    drop(replica);

    let first = ObjectName::parse_key(&first_snapshot).unwrap().1;
    let second = ObjectName::parse_key(&second_snapshot)
        .unwrap()
        .1
        .generation;
    assert_ne!(first.generation, second, "expected a second generation");
    let old = first.generation.to_string();

    let out = dir.path().join("old.db");
    let args = [
        "restore",
        "app",
        "-o",
        path_str(&out),
        "-b",
        &dest,
        "--generation",
        &old,
    ];
    succeeds(&args, &[]);
    assert_eq!(dump(&out), end_of_first);
    // Combined with --point-in-time: that generation's state at the time.
    let at = first.time.to_rfc3339();
    let mut with_time = args.to_vec();
    with_time.extend(["--point-in-time", &at, "--force"]);
    succeeds(&with_time, &[]);
    assert_eq!(dump(&out), at_first_snapshot);
    // The plan names it too.
    let mut dry = args.to_vec();
    dry.extend(["--dry-run", "--force"]);
    let (stdout, _) = succeeds(&dry, &[]);
    assert!(stdout.contains(&format!("generation   {old}")), "{stdout}");
    // Without it, the newest generation.
    let latest = dir.path().join("latest.db");
    succeeds(
        &["restore", "app", "-o", path_str(&latest), "-b", &dest],
        &[],
    );
    assert_eq!(dump(&latest), app.dump());

    // An unknown one is "not found", listing those there are; a malformed one is usage.
    let mut unknown = args.to_vec();
    unknown[7] = "0000000000000000";
    unknown[3] = "/nonexistent/never.db";
    let err = fails_with(3, &unknown, &[]);
    assert!(
        err.contains("0000000000000000") && err.contains(&old) && err.contains(&second.to_string()),
        "{err}"
    );
    unknown[7] = "yesterday";
    let err = fails_with(2, &unknown, &[]);
    assert!(err.contains("--generation"), "{err}");
}

#[test]
fn storage_settings_come_from_the_environment_and_flags_win() {
    let r = FileReplica::new();
    let elsewhere = format!("file://{}", r.out("elsewhere").display());
    // An empty destination (a missing directory is an error: see cli_rules.rs).
    std::fs::create_dir(r.out("elsewhere")).unwrap();
    // WALSYNC_BUCKET instead of -b.
    let (stdout, _) = succeeds(&["list"], &env(&[("WALSYNC_BUCKET", &r.dest)]));
    assert!(stdout.contains("app "), "{stdout}");
    // -b wins over it.
    let (stdout, _) = succeeds(
        &["list", "-b", &elsewhere],
        &env(&[("WALSYNC_BUCKET", &r.dest)]),
    );
    assert!(stdout.contains("no replicas"), "{stdout}");
    let (stdout, _) = succeeds(
        &["list", "-b", &r.dest],
        &env(&[("WALSYNC_BUCKET", &elsewhere)]),
    );
    assert!(stdout.contains("app "), "{stdout}");
    // And restore reads it too.
    let out = r.out("out.db");
    succeeds(
        &["restore", "app", "-o", path_str(&out)],
        &env(&[("WALSYNC_BUCKET", &r.dest)]),
    );
    assert_eq!(dump(&out), r.app.dump());

    // A bad value is an error naming the variable, not quoting the value; a flag wins
    // over it (the variable is then not even read).
    let value = "soon-Zq81";
    let bad = env(&[("WALSYNC_BUCKET", &r.dest), ("WALSYNC_S3_TIMEOUT", value)]);
    let err = fails_with(2, &["list"], &bad);
    assert!(err.contains("WALSYNC_S3_TIMEOUT"), "{err}");
    assert!(!err.contains(value), "{err}");
    succeeds(&["list", "--s3-timeout", "5"], &bad);
    let zero = env(&[("WALSYNC_BUCKET", &r.dest), ("WALSYNC_S3_TIMEOUT", "0")]);
    let err = fails_with(2, &["list"], &zero);
    assert!(
        err.contains("WALSYNC_S3_TIMEOUT must be a positive"),
        "{err}"
    );
}

#[test]
fn the_endpoint_comes_from_the_flag_then_walsync_endpoint_then_aws_endpoint_url_s3() {
    let server = S3Server::start();
    let dest = format!("s3://{}/e", server.bucket());
    let good = server.endpoint();
    // A port nobody listens on.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let with = |pairs: &[(&str, &str)]| {
        let mut env: Vec<(String, String)> = server
            .env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_ENDPOINT_URL_S3")
            .collect();
        env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let list = ["list", "-b", &dest, "--s3-timeout", "2"];
    // WALSYNC_ENDPOINT wins over AWS_ENDPOINT_URL_S3.
    succeeds(
        &list,
        &with(&[("WALSYNC_ENDPOINT", &good), ("AWS_ENDPOINT_URL_S3", &dead)]),
    );
    fails_with(
        5,
        &list,
        &with(&[("WALSYNC_ENDPOINT", &dead), ("AWS_ENDPOINT_URL_S3", &good)]),
    );
    // AWS_ENDPOINT_URL_S3 still works alone.
    succeeds(&list, &with(&[("AWS_ENDPOINT_URL_S3", &good)]));
    // --endpoint wins over both.
    let mut flagged = list.to_vec();
    flagged.extend(["--endpoint", &good]);
    succeeds(
        &flagged,
        &with(&[("WALSYNC_ENDPOINT", &dead), ("AWS_ENDPOINT_URL_S3", &dead)]),
    );
}

#[test]
fn watch_settings_come_from_the_environment_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let dest = format!("file://{}", dir.path().join("replica").display());
    let db = path_str(&app.path).to_string();
    let vars = [
        ("WALSYNC_MIN_INTERVAL", "--min-interval", "0.05"),
        ("WALSYNC_SNAPSHOT_INTERVAL", "--snapshot-interval", "3600"),
        ("WALSYNC_UPLOAD_WORKERS", "--upload-workers", "1"),
        ("WALSYNC_SHUTDOWN_TIMEOUT", "--shutdown-timeout", "10"),
        ("WALSYNC_STAGING_LIMIT", "--staging-limit", "64"),
        ("WALSYNC_RETENTION", "--retention", "7d"),
    ];
    // Each variable is read: a value that does not parse is an error naming it.
    let nonsense = "lots-Zq81";
    for (var, _, _) in vars {
        let err = fails_with(
            2,
            &["watch", &db],
            &env(&[("WALSYNC_BUCKET", &dest), (var, nonsense)]),
        );
        assert!(err.contains(var), "{err}");
        assert!(!err.contains(nonsense), "{err}");
    }
    let err = fails_with(
        2,
        &["watch", &db],
        &env(&[("WALSYNC_BUCKET", &dest), ("WALSYNC_SHUTDOWN_TIMEOUT", "0")]),
    );
    assert!(
        err.contains("WALSYNC_SHUTDOWN_TIMEOUT must be a positive"),
        "{err}"
    );

    // Every flag wins over its (nonsense) variable; the bucket comes from the environment.
    let mut environment = vec![("WALSYNC_BUCKET".to_string(), dest.clone())];
    let mut args = vec![db.clone()];
    for (var, flag, value) in vars {
        environment.push((var.to_string(), nonsense.to_string()));
        args.extend([flag.to_string(), value.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let watch = WatchProcess::start(&args, &environment, dir.path());
    app.insert(3, 100);
    let status = watch.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let out = dir.path().join("out.db");
    succeeds(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert_eq!(dump(&out), app.dump());

    // And valid values from the environment alone start it too.
    let environment: Vec<(String, String)> = std::iter::once(("WALSYNC_BUCKET", dest.as_str()))
        .chain(vars.iter().map(|(var, _, value)| (*var, *value)))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let watch = WatchProcess::start(&[db.as_str()], &environment, dir.path());
    app.insert(3, 100);
    assert!(watch.terminate(Duration::from_secs(20)).success());
}
