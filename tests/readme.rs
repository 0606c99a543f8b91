//! README.md's operations recipes, run as printed: each test takes its snippet out of
//! README.md (so the two cannot drift), puts the test's directories where the recipe
//! names `/data`, `/etc`, `/srv` or `/run/service`, and runs it with the real walsync on
//! `PATH`. The runit and s6 recipes run under a real `runsvdir` and `s6-svscan` (so
//! `runsv` and `s6-supervise`) where those are installed, as `scripts/test.sh` makes sure.
//! And the links between the documentation's pages (README.md, CONTRIBUTING.md, docs/):
//! each reaches a file, and a heading of it, that exist.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::fixtures::{dump, wait_for, walsync, AppDb, WALSYNC};
use crate::common::root::needs_root;
use walsync_testkit::s3server::S3Server;
use walsync_testkit::without_callers_settings;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first fenced code block after the first line of README.md containing `marker`,
/// without the fences and the block's own indentation.
fn snippet(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.contains(marker));
    assert!(lines.next().is_some(), "README.md has no {marker:?}");
    let fence = lines
        .find(|l| l.trim_start().starts_with("```"))
        .unwrap_or_else(|| panic!("no code block after {marker:?}"));
    let indent = fence.len() - fence.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim() != "```")
        .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
        .collect();
    assert!(!body.is_empty(), "empty code block after {marker:?}");
    body.join("\n") + "\n"
}

/// A directory on `PATH` holding a `walsync` that is the binary under test.
fn bin_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(WALSYNC, bin.join("walsync")).unwrap();
    bin
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `sh -c`-style run of `script` with `shell`, in the repository (recipes copy from
/// contrib/), with `env` and none of the caller's settings (as `walsync_command` has it).
fn run_script(shell: &str, script: &str, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(shell);
    cmd.arg("-c").arg(script);
    without_callers_settings(&mut cmd)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A recipe runs with the real tool or fails: scripts/test.sh installs each one.
fn need(tool: &str) {
    let found = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    assert!(
        found,
        "{tool} is not installed: scripts/test.sh installs it"
    );
}

#[test]
fn the_container_entrypoint_works_on_a_first_deployment_and_on_an_empty_volume() {
    need("sqlite3");
    let s3 = S3Server::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let bin = bin_dir(root.path());
    // The application: `myapp --db PATH` creates its table if need be, commits a visit and
    // exits 0.
    write_executable(
        &bin.join("myapp"),
        "#!/bin/sh\nexec sqlite3 -cmd '.timeout 5000' \"$2\" \
         \"CREATE TABLE IF NOT EXISTS visits(n INTEGER PRIMARY KEY, at TEXT); \
         INSERT INTO visits(at) VALUES (datetime('now'));\"\n",
    );
    let dest = format!("s3://{}/entrypoint", s3.bucket());
    let entrypoint = snippet("As a container entrypoint:")
        .replace("s3://bucket/prefix", &dest)
        .replace("/data/", &format!("{}/", data.display()));
    assert!(entrypoint.starts_with("#!/bin/sh\n"), "{entrypoint}");
    let script = root.path().join("entrypoint.sh");
    write_executable(&script, &entrypoint);
    let mut env = s3.env();
    env.push(("PATH".into(), format!("{}:/usr/bin:/bin", bin.display())));
    let visits = |round: &str| {
        let out = root.path().join(format!("restored-{round}.db"));
        let restore = walsync(
            &["restore", "app", "-o", path_str(&out), "-b", &dest],
            &s3.env(),
        );
        assert!(restore.status.success(), "{restore:?}");
        let conn = rusqlite::Connection::open(&out).unwrap();
        conn.query_row("SELECT count(*) FROM visits", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };

    // First deployment: no database, no replica.
    let first = run_script("/bin/sh", path_str(&script), &env);
    assert_eq!(
        first.status.code(),
        Some(0),
        "the entrypoint failed on a first deployment: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(visits("first"), 1);

    // The container again, its volume empty: restored, then the application goes on.
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir(&data).unwrap();
    let second = run_script("/bin/sh", path_str(&script), &env);
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(visits("second"), 2);

    // And with its volume kept.
    let third = run_script("/bin/sh", path_str(&script), &env);
    assert_eq!(third.status.code(), Some(0), "{third:?}");
    assert_eq!(visits("third"), 3);
}

#[test]
fn the_status_snippet_reports_cleanly_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let dest = format!("file://{}", replica.display());
    let app = AppDb::create(dir.path(), "app.db");
    let snap = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snap.status.success(), "{snap:?}");
    let text = snippet("`generations`, `total_bytes`) is stable for scripts");
    assert!(text.contains("export WALSYNC_BUCKET="), "{text}");
    let env = [(
        "PATH".to_string(),
        format!("{}:/usr/bin:/bin", bin_dir(dir.path()).display()),
    )];

    // A fresh replica: nothing to say.
    let fresh = run_script("bash", &text.replace("s3://bucket/prefix", &dest), &env);
    assert!(fresh.status.success(), "{fresh:?}");
    assert_eq!(String::from_utf8_lossy(&fresh.stdout), "", "{fresh:?}");

    // walsync fails (no such replica here): one clear line, not shell noise.
    let elsewhere = format!("file://{}", dir.path().display());
    let failed = run_script(
        "bash",
        &text.replace("s3://bucket/prefix", &elsewhere),
        &env,
    );
    let stdout = String::from_utf8_lossy(&failed.stdout);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(
        stdout, "app: walsync status failed (exit 3; its error is above)\n",
        "{stderr}"
    );
    assert!(stderr.contains("walsync: error:"), "{stderr}");
    assert!(!stderr.contains("expression"), "{stderr}");
}

#[test]
fn the_restore_steps_keep_the_owner_and_mode() {
    needs_root!("chown of the database to another user");
    need("chpst");
    let root = tempfile::tempdir().unwrap();
    let srv = root.path().join("srv/app");
    std::fs::create_dir_all(&srv).unwrap();
    let dest = format!("file://{}", root.path().join("replica").display());
    let envdir = root.path().join("etc/walsync/env");
    std::fs::create_dir_all(&envdir).unwrap();
    std::fs::write(envdir.join("WALSYNC_BUCKET"), format!("{dest}\n")).unwrap();
    let mut app = AppDb::create(&srv, "app.db");
    app.insert(20, 300);
    let snap = walsync(&["snapshot", path_str(&app.path), "-b", &dest], &[]);
    assert!(snap.status.success(), "{snap:?}");
    let expected = app.dump();
    let db = app.path.clone();
    drop(app);
    // The database as the application left it: its user's, 0644; then damaged.
    std::os::unix::fs::chown(&db, Some(4321), Some(4321)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let steps = snippet("whoever runs `walsync restore`):")
        .replace("/etc/", &format!("{}/etc/", root.path().display()))
        .replace("/srv/", &format!("{}/srv/", root.path().display()));
    let env = [(
        "PATH".to_string(),
        format!("{}:/usr/bin:/bin", bin_dir(root.path()).display()),
    )];
    let run = run_script("/bin/sh", &format!("set -e\n{steps}"), &env);
    assert!(run.status.success(), "{steps}\n{run:?}");
    let meta = std::fs::metadata(&db).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((meta.uid(), meta.gid()), (4321, 4321));
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert_eq!(dump(&db), expected);
}

/// A supervisor tree started by a test, torn down (with everything under it) on drop.
struct Supervisor {
    child: Child,
    /// How to tell it to stop its services and exit: a command, or a signal to it.
    stop: Vec<String>,
    stop_signal: Option<i32>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some((program, args)) = self.stop.split_first() {
            let _ = Command::new(program).args(args).status();
        }
        if let Some(signal) = self.stop_signal {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe {
                libc::kill(self.child.id() as i32, signal);
            }
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid of the walsync whose environment names `envdir`, if one runs.
fn walsync_pid(envdir: &Path) -> Option<i32> {
    let exe = std::fs::canonicalize(WALSYNC).unwrap();
    let marker = format!("WALSYNC_ENVDIR={}", envdir.display());
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_string_lossy().parse().ok()?;
            if std::fs::read_link(entry.path().join("exe")).ok()? != exe {
                return None;
            }
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|var| var == marker.as_bytes())
                .then_some(pid)
        })
}

/// What differs between runit and s6 in [`service_recipe`].
struct Flavour {
    /// README's marker for the install line.
    install: &'static str,
    /// Where the recipe puts the service directory and where it links it, under the root.
    service_dir: &'static str,
    /// The scan directory the supervisor watches, under the root.
    scan_dir: &'static str,
    /// The supervisor's program, run on the scan directory.
    supervisor: &'static str,
    /// Start the supervisor before the install line (s6-svscanctl needs it running).
    start_first: bool,
    /// Commands on the service directory: SIGHUP, down; and on the scan directory: stop.
    hup: &'static [&'static str],
    down: &'static [&'static str],
    stop: &'static [&'static str],
    stop_signal: Option<i32>,
}

/// Install contrib's service as README says, under a real supervisor; check that SIGHUP
/// changes nothing, that a stop exits 0 with everything stored, and that log lines carry
/// one timestamp (the logger's).
fn service_recipe(flavour: &Flavour) {
    need(flavour.supervisor);
    need(flavour.hup[0]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let replica = r.join("replica");
    let dest = format!("file://{}", replica.display());
    let srv = r.join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    let mut one = AppDb::create(&srv, "one.db");
    let mut two = AppDb::create(&srv, "two.db");
    one.insert(3, 100);
    two.insert(3, 100);
    let envdir = r.join("etc/walsync/env");
    std::fs::create_dir_all(&envdir).unwrap();
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", "unused-for-file".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "unused-for-file".to_string()),
        ("WALSYNC_BUCKET", dest.clone()),
        (
            "WALSYNC_DATABASES",
            format!("{} {}:second", one.path.display(), two.path.display()),
        ),
        ("WALSYNC_MIN_INTERVAL", "0.05".to_string()),
    ] {
        std::fs::write(envdir.join(name), format!("{value}\n")).unwrap();
    }
    let logdir = r.join("log");
    let env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            format!("{}:/usr/bin:/bin:/usr/sbin:/sbin", bin_dir(r).display()),
        ),
        ("WALSYNC_ENVDIR".into(), path_str(&envdir).into()),
        ("WALSYNC_LOGDIR".into(), path_str(&logdir).into()),
    ];
    let scan = r.join(flavour.scan_dir);
    std::fs::create_dir_all(&scan).unwrap();
    let under_root = |text: &str| {
        text.replace("/etc/", &format!("{}/etc/", r.display()))
            .replace("/run/service", &format!("{}/run/service", r.display()))
    };
    let start = || {
        let child = without_callers_settings(&mut Command::new(flavour.supervisor))
            .arg(&scan)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stop: Vec<String> = flavour
            .stop
            .iter()
            .map(|a| a.replace("SCAN", path_str(&scan)))
            .collect();
        Supervisor {
            child,
            stop,
            stop_signal: flavour.stop_signal,
        }
    };
    let mut supervisor = None;
    if flavour.start_first {
        supervisor = Some(start());
        std::thread::sleep(Duration::from_millis(500));
    }
    let install = under_root(&snippet(flavour.install));
    let installed = run_script("/bin/sh", &install, &env);
    assert!(installed.status.success(), "{install}\n{installed:?}");
    let service = r.join(flavour.service_dir);
    // The test's own addition: record the run script's exit code when it stops.
    let exit_file = r.join("exit-code");
    write_executable(
        &service.join("finish"),
        &format!("#!/bin/sh\necho \"$1\" > {}\n", exit_file.display()),
    );
    if supervisor.is_none() {
        supervisor = Some(start());
    }
    let current = logdir.join("current");
    let log = || std::fs::read_to_string(&current).unwrap_or_default();
    wait_for(
        Duration::from_secs(30),
        "walsync started by the supervisor",
        || log().contains(" as one") && log().contains(" as second"),
    );
    let pid = walsync_pid(&envdir).expect("walsync running");
    let control = |args: &[&str]| {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("SERVICE", path_str(&service)))
            .collect();
        let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };

    // SIGHUP, as `sv hup` / `s6-svc -h` send it: logged, nothing else.
    one.insert(5, 500);
    control(flavour.hup);
    wait_for(Duration::from_secs(10), "SIGHUP logged", || {
        log().contains("SIGHUP")
    });
    two.insert(5, 500);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(walsync_pid(&envdir), Some(pid), "SIGHUP restarted walsync");

    // Down: walsync ships what is committed and exits 0.
    one.insert(5, 500);
    two.insert(5, 500);
    control(flavour.down);
    wait_for(Duration::from_secs(30), "walsync stopped", || {
        walsync_pid(&envdir).is_none()
    });
    wait_for(Duration::from_secs(10), "the finish script", || {
        exit_file.exists()
    });
    assert_eq!(
        std::fs::read_to_string(&exit_file).unwrap().trim(),
        "0",
        "{}",
        log()
    );
    drop(supervisor);
    let text = log();
    assert_eq!(
        text.matches("stopped; everything committed is stored")
            .count(),
        2,
        "{text}"
    );
    // One timestamp per line, the logger's: walsync's own are off under these scripts.
    assert!(text.contains("INFO  walsync: watching"), "{text}");
    assert!(!text.contains("Z INFO"), "two timestamps on a line: {text}");
    for (name, db) in [("one", &one), ("second", &two)] {
        let out = r.join(format!("{name}.out"));
        let restore = walsync(&["restore", name, "-o", path_str(&out), "-b", &dest], &[]);
        assert!(restore.status.success(), "{restore:?}");
        assert_eq!(dump(&out), db.dump(), "{name}");
    }
}

#[test]
fn the_runit_recipe_runs_under_runsvdir() {
    service_recipe(&Flavour {
        install: "(`runsvdir` starts it within 5 s",
        service_dir: "etc/sv/walsync",
        scan_dir: "etc/service",
        supervisor: "runsvdir",
        start_first: false,
        hup: &["sv", "hup", "SERVICE"],
        down: &["sv", "down", "SERVICE"],
        // runsvdir, on SIGHUP, stops every runsv (and so its service) and exits.
        stop: &[],
        stop_signal: Some(libc::SIGHUP),
    });
}

#[test]
fn the_s6_recipe_runs_under_s6_svscan() {
    service_recipe(&Flavour {
        install: "s6-svscan, scanning `/run/service`:",
        service_dir: "etc/s6/sv/walsync",
        scan_dir: "run/service",
        supervisor: "s6-svscan",
        start_first: true,
        hup: &["s6-svc", "-h", "SERVICE"],
        down: &["s6-svc", "-d", "SERVICE"],
        stop: &["s6-svscanctl", "-t", "SCAN"],
        stop_signal: None,
    });
}

/// The Markdown pages of the repository: README.md, CONTRIBUTING.md, CHANGELOG.md and
/// docs/*.md, as paths relative to the repository.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut pages = Vec::new();
    for dir in [PathBuf::new(), PathBuf::from("docs")] {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let name = PathBuf::from(entry.unwrap().file_name());
            if name.extension().is_some_and(|e| e == "md") {
                pages.push(dir.join(name));
            }
        }
    }
    pages.sort();
    pages
}

/// The lines of `page` outside fenced code blocks.
fn prose(page: &str) -> Vec<&str> {
    let mut fenced = false;
    page.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// The anchors GitHub gives `page`'s headings: the heading's text without its inline code
/// marks, lower-cased, every character but letters, digits, `-`, `_` and spaces dropped,
/// spaces made `-`; a repeated anchor gets `-1`, `-2`, ... .
fn anchors(page: &str) -> std::collections::BTreeSet<String> {
    let mut anchors = std::collections::BTreeSet::new();
    for line in prose(page) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !anchors.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    anchors
}

/// Every inline link target (`[text](target)`) in `page`'s prose.
fn link_targets(page: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose(page) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    targets
}

/// The pages moved out of README.md (the benchmarks, contributing, the format) link to one
/// another: every relative link must reach a file that exists and, with `#anchor`, a
/// heading of that page.
#[test]
fn the_pages_link_to_files_and_headings_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pages = pages(root);
    for name in [
        "README.md",
        "CONTRIBUTING.md",
        "docs/FORMAT.md",
        "docs/BENCHMARKS.md",
    ] {
        assert!(pages.contains(&PathBuf::from(name)), "{name} is missing");
    }
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(root.join(page)).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let linked = if file.is_empty() {
                root.join(page)
            } else {
                root.join(page.parent().unwrap()).join(file)
            };
            assert!(
                linked.exists(),
                "{}: the link {target:?} reaches no file",
                page.display()
            );
            if let Some(anchor) = anchor {
                let linked_text = std::fs::read_to_string(&linked).unwrap();
                assert!(
                    anchors(&linked_text).contains(anchor),
                    "{}: the link {target:?} reaches no heading of {}",
                    page.display(),
                    linked.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} links found");
}
