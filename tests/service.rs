//! Running walsync as a service: `walsync status` for monitoring, `watch --exec` as a
//! container entrypoint, and the runit and s6 run scripts in contrib/. All through the real
//! binary (and the real scripts).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::fixtures::{dump, files_in, wait_for, walsync, AppDb, WatchProcess};
use crate::common::s3server::S3Server;
use walsync::format::ObjectName;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::Replica;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
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

fn succeeds(args: &[&str], env: &[(String, String)]) -> String {
    let (code, stdout, stderr) = run(args, env);
    assert_eq!(code, 0, "walsync {args:?} failed: {stderr}");
    stdout
}

fn status_json(args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let mut all = vec!["status", "--json"];
    all.extend(args);
    serde_json::from_str(&succeeds(&all, env)).unwrap()
}

/// Wait for a child to exit, at most `timeout`.
fn wait_exit(child: &mut std::process::Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restore_dump(dest: &str, name: &str, out: &Path) -> String {
    succeeds(&["restore", name, "-o", path_str(out), "-b", dest], &[]);
    dump(out)
}

/// Objects of `name` under a file:// root: (key, size) of its newest snapshot, newest
/// segment, and the total size.
fn newest(root: &Path, name: &str, kind: &str) -> Option<(ObjectName, u64)> {
    let dir = root.join(name).join(kind);
    let file = files_in(&dir).pop()?;
    let size = std::fs::metadata(dir.join(&file)).unwrap().len();
    let (_, parsed) = ObjectName::parse_key(&format!("{name}/{kind}/{file}")).unwrap();
    Some((parsed, size))
}

fn bytes_of(root: &Path, name: &str) -> u64 {
    ["snapshots", "wal"]
        .iter()
        .map(|kind| root.join(name).join(kind))
        .filter(|d| d.exists())
        .flat_map(|d| files_in(&d).into_iter().map(move |f| d.join(f)))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn status_reports_the_newest_commit_its_age_and_the_newest_generation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let dest = format!("file://{}", root.display());
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(root.clone()));
    // app: a snapshot and three segments; idle: only its base snapshot.
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.snapshot().unwrap();
    for _ in 0..3 {
        app.insert(2, 500);
        replica.sync().unwrap();
    }
    let mut idle = AppDb::create(dir.path(), "idle.db");
    idle.insert(1, 10);
    Replica::open(&idle.path, storage, "idle")
        .unwrap()
        .snapshot()
        .unwrap();

    let first = status_json(&["-b", &dest], &[]);
    assert_eq!(first["destination"], dest.as_str());
    let dbs = first["databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 2, "{first:#}");

    let (segment, _) = newest(&root, "app", "wal").unwrap();
    let a = &dbs[0];
    assert_eq!(a["name"], "app");
    assert_eq!(a["last_commit"], segment.time.to_rfc3339().as_str());
    assert_eq!(a["generation"], segment.generation.to_string().as_str());
    // When the generation's base snapshot was taken (a clock label; the id's own time is a
    // sequence, see `list::started`).
    let (base, _) = newest(&root, "app", "snapshots").unwrap();
    assert_eq!(base.index, 0);
    assert_eq!(a["generation_started"], base.time.to_rfc3339().as_str());
    assert_eq!(a["snapshots"], 1);
    assert_eq!(a["segments"], 3);
    assert_eq!(a["last_index"], 3);
    assert_eq!(a["generations"], 1);
    assert_eq!(a["bytes"], bytes_of(&root, "app"));
    assert_eq!(a["total_bytes"], bytes_of(&root, "app"));
    assert!(a["age_seconds"].as_u64().unwrap() < 60, "{a}");

    // No segment yet: the snapshot's time is the newest commit stored.
    let (snapshot, _) = newest(&root, "idle", "snapshots").unwrap();
    let i = &dbs[1];
    assert_eq!(i["name"], "idle");
    assert_eq!(i["last_commit"], snapshot.time.to_rfc3339().as_str());
    assert_eq!(i["segments"], 0);
    assert_eq!(i["last_index"], 0);
    assert_eq!(i["bytes"], bytes_of(&root, "idle"));

    // Ages move with the clock, measured at the call.
    std::thread::sleep(Duration::from_millis(1100));
    let second = status_json(&["-b", &dest, "app"], &[]);
    assert_eq!(second["databases"].as_array().unwrap().len(), 1);
    let later = &second["databases"][0];
    assert_eq!(later["last_commit"], a["last_commit"]);
    assert!(
        later["age_seconds"].as_u64().unwrap() > a["age_seconds"].as_u64().unwrap(),
        "{a} then {later}"
    );
    assert_ne!(second["checked_at"], first["checked_at"]);

    // A new commit makes it fresh again.
    app.insert(1, 10);
    replica.sync().unwrap();
    let third = status_json(&["-b", &dest, "app"], &[]);
    assert_eq!(third["databases"][0]["segments"], 4);
    assert_ne!(third["databases"][0]["last_commit"], a["last_commit"]);

    // Text for people: a header and one aligned row per database.
    let text = succeeds(&["status", "-b", &dest], &[]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for column in [
        "NAME",
        "LAST COMMIT",
        "AGE",
        "GENERATION",
        "SEGMENTS",
        "BYTES",
    ] {
        assert!(lines[0].contains(column), "{text}");
    }
    assert!(lines[1].starts_with("app "), "{text}");
    assert!(lines[2].starts_with("idle "), "{text}");
    assert!(lines[2].contains(&snapshot.time.to_rfc3339()), "{text}");
    assert_eq!(
        lines[1].len(),
        lines[2].len(),
        "columns not aligned: {text}"
    );
    // WALSYNC_BUCKET works as for every command.
    let from_env = succeeds(
        &["status", "idle"],
        &[("WALSYNC_BUCKET".to_string(), dest.clone())],
    );
    assert!(from_env.contains("idle "), "{from_env}");

    // A named database without a replica: not found (3), naming it.
    let (code, stdout, stderr) = run(&["status", "-b", &dest, "app", "nope"], &[]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("\"nope\""), "{stderr}");
    // An empty destination is fine unless a name is asked for.
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let empty = format!("file://{}", dir.path().join("empty").display());
    let text = succeeds(&["status", "-b", &empty], &[]);
    assert!(text.contains("no replicas"), "{text}");
    assert_eq!(run(&["status", "-b", &empty, "app"], &[]).0, 3);
}

#[test]
fn status_costs_one_list_and_no_gets() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let storage: Arc<dyn Storage> = Arc::new(server.storage("svc"));
    let mut replica = Replica::open(&app.path, storage, "app").unwrap();
    replica.snapshot().unwrap();
    app.insert(3, 100);
    replica.sync().unwrap();
    server.clear_requests();

    let dest = format!("s3://{}/svc", server.bucket());
    let status = status_json(&["-b", &dest], &server.env());
    assert_eq!(status["databases"][0]["name"], "app");
    assert_eq!(status["databases"][0]["segments"], 1);
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert!(
        requests[0].method == "GET" && requests[0].has_param("list-type"),
        "{requests:#?}"
    );
}

/// The shell words of a command line, for `--exec`.
fn quote(path: &Path) -> String {
    format!("'{}'", path.display())
}

#[test]
fn exec_runs_the_command_and_exits_with_its_status_after_shipping() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let db = path_str(&app.path).to_string();
    // The child commits through the sqlite3 CLI just before it exits with 7.
    let command = format!(
        "sqlite3 -cmd '.timeout 5000' {} \"INSERT INTO items(id, label) VALUES (1000, 'from the child')\" && exit 7",
        quote(&app.path)
    );
    let mut watch = WatchProcess::start(
        &[&db, "-b", &dest, "--min-interval", "0", "--exec", &command],
        &[],
        dir.path(),
    );
    let status = wait_exit(&mut watch.child, Duration::from_secs(30), "walsync");
    assert_eq!(status.code(), Some(7), "{status}: {}", watch.log());
    assert!(
        watch.log().contains("--exec command exited"),
        "{}",
        watch.log()
    );
    let label: String = app
        .conn
        .query_row("SELECT label FROM items WHERE id = 1000", [], |r| r.get(0))
        .unwrap();
    assert_eq!(label, "from the child");
    let expected = app.dump();
    assert_eq!(
        restore_dump(&dest, "app", &dir.path().join("out.db")),
        expected
    );

    // From WALSYNC_EXEC; a child killed by a signal gives 128 + its number.
    app.insert(2, 100);
    let mut watch = WatchProcess::start(
        &[&db, "-b", &dest],
        &[("WALSYNC_EXEC".to_string(), "kill -KILL $$".to_string())],
        dir.path(),
    );
    let status = wait_exit(&mut watch.child, Duration::from_secs(30), "walsync");
    assert_eq!(status.code(), Some(128 + 9), "{status}: {}", watch.log());
    assert_eq!(
        restore_dump(&dest, "app", &dir.path().join("out2.db")),
        app.dump()
    );
}

#[test]
fn sigterm_is_forwarded_to_the_exec_command_and_walsync_exits_0_after_shipping() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let db = path_str(&app.path).to_string();
    let ready = dir.path().join("ready");
    let marker = dir.path().join("got-term");
    let command = format!(
        "trap 'echo term > {}; exit 0' TERM; touch {}; while :; do sleep 0.05; done",
        quote(&marker),
        quote(&ready)
    );
    let watch = WatchProcess::start(&[&db, "-b", &dest, "--exec", &command], &[], dir.path());
    wait_for(Duration::from_secs(20), "the child to start", || {
        ready.exists()
    });
    for _ in 0..5 {
        app.insert(4, 1000);
    }
    let status = watch.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "term\n");
    assert_eq!(
        restore_dump(&dest, "app", &dir.path().join("out.db")),
        app.dump()
    );
}

/// Run a contrib run script as its supervisor would, with walsync on PATH and settings from
/// an envdir; SIGTERM it (it is walsync by then) and check that both databases replicated.
fn run_script_replicates_and_stops_on_sigterm(script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let dest = format!("file://{}", root.display());
    let mut one = AppDb::create(dir.path(), "one.db");
    let mut two = AppDb::create(dir.path(), "two.db");
    one.insert(3, 100);
    two.insert(3, 100);

    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_walsync"), bin.join("walsync")).unwrap();
    let envdir = dir.path().join("env");
    std::fs::create_dir(&envdir).unwrap();
    let files = [
        ("AWS_ACCESS_KEY_ID", "unused-for-file".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "unused-for-file".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        // Trailing blanks and later lines are not part of the value.
        ("WALSYNC_BUCKET", format!("{dest}  \nignored line\n")),
        (
            "WALSYNC_DATABASES",
            format!("{} {}:second\n", one.path.display(), two.path.display()),
        ),
        ("WALSYNC_MIN_INTERVAL", "0.05\n".to_string()),
        // An empty file unsets the variable (the nonsense below would fail the start).
        ("WALSYNC_S3_TIMEOUT", String::new()),
    ];
    for (name, value) in &files {
        std::fs::write(envdir.join(name), value).unwrap();
    }

    let log = dir.path().join("service.log");
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut cmd = Command::new(&script_path);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") || key.starts_with("WALSYNC_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .current_dir(script_path.parent().unwrap())
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("WALSYNC_ENVDIR", &envdir)
        .env("WALSYNC_S3_TIMEOUT", "nonsense")
        .env("RUST_LOG", "walsync=debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while log_text()
        .lines()
        .filter(|l| l.contains(" watching "))
        .count()
        < 2
    {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{script} exited early ({status}): {}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{script} did not start: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = log_text();
    assert!(
        text.contains("as one\n") && text.contains("as second\n"),
        "{text}"
    );
    // stderr goes to the log too (exec 2>&1), without walsync's timestamps: the
    // supervisor's logger adds its own.
    assert!(text.contains("replicating 2 database(s)"), "{text}");
    assert!(
        text.lines().all(|l| !l.starts_with("20")),
        "timestamps under a run script: {text}"
    );

    for _ in 0..3 {
        one.insert(5, 500);
        two.insert(5, 500);
    }
    // The run script's process is walsync now: SIGTERM it, as `sv down` would.
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
    assert_eq!(
        exe,
        std::fs::canonicalize(env!("CARGO_BIN_EXE_walsync")).unwrap()
    );
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = wait_exit(&mut child, Duration::from_secs(30), script);
    assert_eq!(status.code(), Some(0), "{status}: {}", log_text());
    assert_eq!(
        restore_dump(&dest, "one", &dir.path().join("one-out.db")),
        one.dump()
    );
    assert_eq!(
        restore_dump(&dest, "second", &dir.path().join("two-out.db")),
        two.dump()
    );
}

/// Whether `tool` is on the PATH the scripts get in the tests.
fn have(tool: &str) -> bool {
    ["/usr/bin", "/bin"]
        .iter()
        .any(|d| PathBuf::from(d).join(tool).exists())
}

#[test]
fn runit_run_script_replicates_and_stops_cleanly_on_sigterm() {
    // With runit installed this goes through `chpst -e`, without it through the script's
    // own envdir loop.
    eprintln!("chpst installed: {}", have("chpst"));
    run_script_replicates_and_stops_on_sigterm("contrib/runit/walsync/run");
}

#[test]
fn s6_run_script_replicates_and_stops_cleanly_on_sigterm() {
    eprintln!("s6-envdir installed: {}", have("s6-envdir"));
    run_script_replicates_and_stops_on_sigterm("contrib/s6/walsync/run");
}
