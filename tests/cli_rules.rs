//! One rule for every command, under the real binary: a `file://` destination whose
//! directory is missing is an error, not an empty replica; `snapshot` names a database as
//! `watch` does; `WALSYNC_DATABASES` is read by walsync itself.

use std::path::Path;
use std::time::Duration;

use crate::common::fixtures::{dump, walsync, AppDb, WatchProcess};

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_missing_file_destination_directory_is_not_found_for_every_reading_command() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let dest = format!("file://{}", missing.display());
    let out = dir.path().join("out.db");
    for args in [
        vec!["list", "-b", &dest],
        vec!["list", "-b", &dest, "--json"],
        vec!["status", "-b", &dest],
        vec!["restore", "app", "-o", path_str(&out), "-b", &dest],
        vec!["prune", "-b", &dest, "--retention", "7d"],
    ] {
        let run = walsync(&args, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains("does not exist") && stderr.contains(path_str(&missing)),
            "{args:?}: {stderr}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
        assert!(!missing.exists(), "{args:?} created the directory");
    }
    // For a script that restores only if there is something to restore: nothing there.
    let run = walsync(
        &[
            "restore",
            "app",
            "-o",
            path_str(&out),
            "-b",
            &dest,
            "--if-replica-exists",
        ],
        &[],
    );
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert!(!out.exists());
    // An existing, empty directory is an empty replica.
    std::fs::create_dir(&missing).unwrap();
    let run = walsync(&["list", "-b", &dest], &[]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stdout).contains("no replicas"));
}

#[test]
fn snapshot_and_watch_name_a_database_by_one_rule() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "my app.db");
    app.insert(3, 100);
    let run = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        String::from_utf8_lossy(&run.stdout).starts_with("my_app/snapshots/"),
        "{run:?}"
    );
    // watch maps it to the same name, and continues that replica.
    let watch = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &[], dir.path());
    assert!(watch.log().contains("as my_app"), "{}", watch.log());
    app.insert(3, 100);
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let out = dir.path().join("out.db");
    let run = walsync(
        &["restore", "my_app", "-o", path_str(&out), "-b", &dest],
        &[],
    );
    assert!(run.status.success(), "{run:?}");
    assert_eq!(dump(&out), app.dump());
}

#[test]
fn watch_reads_walsync_databases_when_given_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut one = AppDb::create(dir.path(), "one.db");
    let mut two = AppDb::create(dir.path(), "two.db");
    one.insert(2, 100);
    two.insert(2, 100);
    let env = [(
        "WALSYNC_DATABASES".to_string(),
        format!(" {}\t{}:second ", one.path.display(), two.path.display()),
    )];
    // No database arguments: WatchProcess waits for as many as there are (none), so wait
    // for both here.
    let watch = WatchProcess::start(&["-b", &dest], &env, dir.path());
    crate::common::fixtures::wait_for(Duration::from_secs(20), "both watched", || {
        let log = watch.log();
        log.contains("as one") && log.contains("as second")
    });
    one.insert(2, 100);
    two.insert(2, 100);
    assert!(watch.terminate(Duration::from_secs(30)).success());
    for (name, db) in [("one", &one), ("second", &two)] {
        let out = dir.path().join(format!("{name}.out"));
        let run = walsync(&["restore", name, "-o", path_str(&out), "-b", &dest], &[]);
        assert!(run.status.success(), "{run:?}");
        assert_eq!(dump(&out), db.dump());
    }
    // Neither arguments nor the variable: a usage error that names the variable.
    let run = walsync(&["watch", "-b", &dest], &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("WALSYNC_DATABASES"));
}
