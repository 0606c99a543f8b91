//! What the binary prints as it works: progress of `restore` and `snapshot` only on a
//! terminal, a UTC timestamp on every log line unless turned off, and `-v` accepted before
//! and after the command.

use std::time::Duration;

use super::path_str;
use crate::common::fixtures::{walsync, walsync_on_a_terminal, AppDb, WatchProcess};

#[test]
fn progress_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let dest = format!("file://{}", root.display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(200, 4000);
    let snapshot = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snapshot.status.success());
    let out = dir.path().join("restored.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success());
    for output in [&snapshot, &restore] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains('\r') && !stderr.contains("MiB"),
            "progress on a non-terminal stderr: {stderr:?}"
        );
    }

    // On a terminal (script(1) gives the command one), the line is there.
    let out2 = dir.path().join("restored2.db");
    let tty = walsync_on_a_terminal(&format!("restore app -o {} -b {dest}", out2.display()))
        .output()
        .expect("script(1) from util-linux gives the command a terminal");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{text}");
    assert!(
        text.contains("walsync restore: downloading") && text.contains("1 objects"),
        "{text:?}"
    );
}

/// True if `line` starts with a UTC RFC 3339 time with milliseconds and a space.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() > 25
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && &b[23..25] == b"Z "
}

#[test]
fn every_log_line_has_a_utc_timestamp_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let watch = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &[], dir.path());
    app.insert(5, 100);
    std::thread::sleep(Duration::from_millis(300));
    let stderr = watch.stderr.clone();
    let stdout = watch.stdout.clone();
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(stderr).unwrap();
    assert!(log.lines().count() >= 4, "{log}");
    for line in log.lines() {
        assert!(starts_with_timestamp(line), "no timestamp: {line:?}");
    }
    let today = walsync::UtcTime::now().to_rfc3339();
    assert!(log.starts_with(&today[..10]), "{log}");
    // "watching X as Y" is a log line; watch prints no data on stdout.
    assert!(log.contains(" watching "), "{log}");
    assert_eq!(std::fs::read_to_string(stdout).unwrap(), "");

    // One-shot commands: their messages timestamped on stderr, their data on stdout.
    let out = dir.path().join("out.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success());
    let text = String::from_utf8_lossy(&restore.stderr);
    assert!(text.contains("restored app"), "{text}");
    assert!(text.lines().all(starts_with_timestamp), "{text}");
    let list = walsync(&["list", "-b", &dest], &[]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("app"));
    assert_eq!(String::from_utf8_lossy(&list.stderr), "");

    // Off, for loggers that stamp lines themselves: by variable, and by flag (also after
    // the command, like -v).
    let env = [("WALSYNC_LOG_TIMESTAMPS".to_string(), "0".to_string())];
    for (args, env) in [
        (
            vec!["restore", "app", "-o", "OUT", "-b", &dest, "--force"],
            &env[..],
        ),
        (
            vec![
                "restore",
                "app",
                "-o",
                "OUT",
                "-b",
                &dest,
                "--force",
                "--no-log-timestamps",
                "-v",
            ],
            &[][..],
        ),
    ] {
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "OUT" { path_str(&out) } else { a })
            .collect();
        let restore = walsync(&args, env);
        let text = String::from_utf8_lossy(&restore.stderr);
        assert!(restore.status.success(), "{args:?}: {text}");
        assert!(text.contains("INFO  walsync: restored app"), "{text}");
        assert!(!text.lines().any(starts_with_timestamp), "{args:?}: {text}");
    }
    let bad = [("WALSYNC_LOG_TIMESTAMPS".to_string(), "maybe".to_string())];
    let out = walsync(&["list", "-b", &dest], &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WALSYNC_LOG_TIMESTAMPS"));
}

#[test]
fn verbose_is_accepted_before_and_after_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let app = AppDb::create(dir.path(), "app.db");
    let snapshot = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snapshot.status.success(), "{snapshot:?}");
    for args in [
        vec!["-v", "list", "-b", &dest],
        vec!["list", "-b", &dest, "-v"],
        vec!["list", "--verbose", "-b", &dest],
    ] {
        let out = walsync(&args, &[]);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("app"));
    }
    // At debug level, debug lines appear.
    let quiet = walsync(&["status", "-b", &dest], &[]);
    let loud = walsync(&["status", "-b", &dest, "-v"], &[]);
    assert!(quiet.status.success() && loud.status.success());
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("DEBUG"));
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("DEBUG"),
        "{loud:?}"
    );
}
