//! What a scan of the watched directories finds, and the name each database gets:
//! nested directories with `--recursive` (restored under the names `list` shows), several
//! `--dir`s beside databases named on the command line (never two under one name), polling
//! with the settings from the environment, and a named database inside a watched directory,
//! whose locks the scan must not drop.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    data_and_logs, path_str, restore, s3_url, wait_log, wait_replicated, watch, watch_with,
    watching, PICK_UP,
};
use crate::common::fixtures::{wait_for, walsync, AppDb};
use walsync_testkit::s3server::S3Server;

/// With `--recursive`, databases in nested directories (also in a directory created while
/// watching) are replicated under their relative paths, and every name `walsync list`
/// shows restores to its database. Without it, only the top level is watched.
#[test]
fn nested_directories_with_recursive_restore_under_the_names_listed() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = data_and_logs(root.path());
    let mut dbs: Vec<(String, AppDb)> = Vec::new();
    for (sub, name) in [
        ("tenant-a", "tenant-a.app"),
        ("tenant-b", "tenant-b.app"),
        ("example.com", "example..com.app"),
        ("deep/er", "deep.er.app"),
    ] {
        let dir = data.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        dbs.push((name.to_string(), AppDb::create(&dir, "app.db")));
    }
    dbs.push(("top".to_string(), AppDb::create(&data, "top.db")));

    // Not recursive: the top level only.
    let dest = s3_url(&server, "flat");
    let process = watch(&["--dir", path_str(&data), "-b", &dest], &server, &logs);
    assert!(process.terminate(Duration::from_secs(30)).success());
    let listed = walsync(&["list", "-b", &dest, "--json"], &server.env());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = json["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["top"], "{json}");

    let dest = s3_url(&server, "tree");
    let process = watch(
        &[
            "--dir",
            path_str(&data),
            "--recursive",
            "-b",
            &dest,
            "--min-interval",
            "0.1",
        ],
        &server,
        &logs,
    );
    for (name, db) in &dbs {
        assert!(
            process.log().contains(&watching(&db.path, name)),
            "{name}: {}",
            process.log()
        );
    }
    // A tenant arriving while watching: a new directory, then its database.
    let started = Instant::now();
    let tenant_c = data.join("tenant-c");
    std::fs::create_dir(&tenant_c).unwrap();
    let created = AppDb::create(&tenant_c, "app.db");
    wait_log(
        &process,
        &watching(&created.path, "tenant-c.app"),
        started,
        PICK_UP,
    );
    dbs.push(("tenant-c.app".to_string(), created));
    for (i, (_, db)) in dbs.iter_mut().enumerate() {
        db.insert(i + 1, 100);
    }
    for (name, db) in &dbs {
        wait_replicated(&server, "tree", name, &logs, &db.dump());
    }
    assert!(process.terminate(Duration::from_secs(30)).success());

    // Every listed name restores to its database.
    let listed = walsync(&["list", "-b", &dest, "--json"], &server.env());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut names: Vec<String> = json["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = dbs.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for (name, db) in &dbs {
        assert_eq!(
            restore(&server, "tree", name, &logs).unwrap(),
            db.dump(),
            "{name}"
        );
    }
}

/// Named databases and several `--dir`s mix: a file both named and in a directory is
/// replicated once (under its given name), and a directory's file whose name a named
/// database (or an earlier `--dir`) already has is refused with a warning.
#[test]
fn named_databases_and_several_directories_never_share_a_name() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (one, two, logs) = (
        root.path().join("one"),
        root.path().join("two"),
        root.path().join("logs"),
    );
    for d in [&one, &two, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    let (one, two) = (
        std::fs::canonicalize(&one).unwrap(),
        std::fs::canonicalize(&two).unwrap(),
    );
    let mut named = AppDb::create(&one, "app.db");
    let mut shared = AppDb::create(&one, "shared.db");
    let clash = AppDb::create(&two, "shared.db");
    let taken = AppDb::create(&two, "given.db");
    let dest = s3_url(&server, "mixed");
    let named_spec = format!("{}:given", named.path.display());
    let process = watch(
        &[
            &named_spec,
            "--dir",
            path_str(&one),
            "--dir",
            path_str(&two),
            "-b",
            &dest,
        ],
        &server,
        &logs,
    );
    let log = process.log();
    assert!(
        log.contains(&format!("watching {} as given", named.path.display())),
        "{log}"
    );
    assert!(log.contains(&watching(&shared.path, "shared")), "{log}");
    let refused = |path: &Path, why: &str| {
        log.lines().any(|l| {
            l.contains(" WARN ")
                && l.contains(&format!("{}: not replicated", path.display()))
                && l.contains(why)
        })
    };
    assert!(
        refused(&named.path, "already replicated as \"given\""),
        "{log}"
    );
    assert!(refused(&clash.path, "already the name of"), "{log}");
    assert!(refused(&taken.path, "already the name of"), "{log}");
    named.insert(2, 10);
    shared.insert(3, 10);
    assert!(process.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        restore(&server, "mixed", "given", &logs).unwrap(),
        named.dump()
    );
    assert_eq!(
        restore(&server, "mixed", "shared", &logs).unwrap(),
        shared.dump()
    );
    assert!(restore(&server, "mixed", "app", &logs).is_err());
}

/// With `--poll` the directory is scanned (no events), and the settings may come from
/// WALSYNC_DIR, WALSYNC_PATTERN and WALSYNC_RECURSIVE: a new database is still picked up
/// within 2 s, and one whose directory is deleted is let go.
#[test]
fn polling_scans_the_directory_with_settings_from_the_environment() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = data_and_logs(root.path());
    std::fs::create_dir(data.join("sub")).unwrap();
    let mut existing = AppDb::create(&data.join("sub"), "a.sqlite");
    let ignored = AppDb::create(&data, "x.db");
    let mut env = server.env();
    env.extend([
        ("WALSYNC_DIR".to_string(), path_str(&data).to_string()),
        ("WALSYNC_PATTERN".to_string(), "*.sqlite".to_string()),
        ("WALSYNC_RECURSIVE".to_string(), "1".to_string()),
    ]);
    let dest = s3_url(&server, "poll");
    let process = watch_with(
        &["--poll", "-b", &dest, "--min-interval", "0.1"],
        &env,
        &logs,
    );
    let log = process.log();
    assert!(log.contains("(poll events"), "{log}");
    assert!(log.contains(&watching(&existing.path, "sub.a")), "{log}");
    assert!(
        !log.contains(&format!("{} as", ignored.path.display())),
        "{log}"
    );
    let started = Instant::now();
    let mut new = AppDb::create(&data, "new.sqlite");
    new.insert(2, 100);
    let took = wait_log(&process, &watching(&new.path, "new"), started, PICK_UP);
    eprintln!("new.sqlite picked up by polling after {took:?}");
    existing.insert(2, 100);
    wait_replicated(&server, "poll", "sub.a", &logs, &existing.dump());
    wait_replicated(&server, "poll", "new", &logs, &new.dump());
    // Its whole directory removed (sidecar and all): with polling, only the scan can tell.
    drop(existing.conn);
    std::fs::remove_dir_all(data.join("sub")).unwrap();
    wait_log(
        &process,
        "sub.a: no longer replicated",
        Instant::now(),
        Duration::from_secs(10),
    );
    assert!(process.terminate(Duration::from_secs(30)).success());
}

/// A database named on the command line inside a watched directory is refused by the
/// directory without being opened: closing a descriptor of it would drop the locks the
/// named replica's SQLite connection holds, and another process could then take the
/// database exclusively (the application's last connection would checkpoint and delete the
/// WAL under walsync's pin). The shared lock is still there once the directory is scanned.
#[test]
fn scanning_a_directory_keeps_the_locks_of_a_database_already_replicated() {
    let server = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let (data, logs) = data_and_logs(root.path());
    let path = {
        let mut db = AppDb::create(&data, "app.db");
        db.insert(1, 10);
        db.path.clone()
    };
    let named = format!("{}:named", path.display());
    let dest = s3_url(&server, "locks");
    let process = watch(
        &[&named, "--dir", path_str(&data), "-b", &dest],
        &server,
        &logs,
    );
    wait_for(Duration::from_secs(10), "the directory's refusal", || {
        process.log().contains("already replicated as \"named\"")
    });
    // SQLite's shared lock: a read lock on 510 bytes after the pending and reserved bytes.
    let exclusive = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl, os, sys\n\
             fd = os.open(sys.argv[1], os.O_RDWR)\n\
             fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002, 0)",
        )
        .arg(&path)
        .output()
        .unwrap();
    let log = process.log();
    assert!(process.terminate(Duration::from_secs(30)).success());
    assert!(
        !exclusive.status.success(),
        "another process took the database exclusively while walsync replicates it: {log}"
    );
}
