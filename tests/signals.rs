//! Signals under the real binary: `watch --exec` delivers SIGTERM and SIGINT to the
//! application itself (a handler runs, its last commit is stored; nothing is left behind),
//! and SIGHUP, which supervisors send routinely, neither kills walsync nor loses a commit.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::fixtures::{
    dump, wait_for, walsync, walsync_on_a_terminal, AppDb, WatchProcess,
};

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Wait (at most 30 s) for walsync to exit; its exit code.
fn exit_code(watch: &mut WatchProcess) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = watch.child.try_wait().unwrap() {
            return status
                .code()
                .unwrap_or_else(|| panic!("walsync killed ({status}): {}", watch.log()));
        }
        assert!(
            Instant::now() < deadline,
            "walsync did not exit: {}",
            watch.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (pid, parent pid, process group) of every process, from /proc.
fn processes() -> Vec<(i32, i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 3 && fields[0] != "Z" {
            out.push((pid, fields[1].parse().unwrap(), fields[2].parse().unwrap()));
        }
    }
    out
}

/// The one child process of `pid`, once it has one.
fn child_of(pid: i32) -> i32 {
    let mut child = 0;
    wait_for(
        Duration::from_secs(20),
        "the --exec child",
        || match processes().iter().find(|(_, parent, _)| *parent == pid) {
            Some((p, _, _)) => {
                child = *p;
                true
            }
            None => false,
        },
    );
    child
}

/// `pid` and every process below it (children, their children, ...).
fn tree(pid: i32) -> Vec<i32> {
    let all = processes();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            all.iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    found
}

/// None of `pids` is alive any more, nor any process in the group the first would lead.
fn assert_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<(i32, i32, i32)> = processes()
            .into_iter()
            .filter(|(p, _, group)| pids.contains(p) || pids.first() == Some(group))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The application: commits a row every 50 ms; its SIGTERM handler commits a last row
/// (id 1000000) and exits 0. It writes its pid to `ready` once its handler is in place.
const PYTHON_APP: &str = r#"
import os, signal, sqlite3, sys, time
db, ready = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, timeout=5, isolation_level=None)
def stop(signum, frame):
    conn.execute("INSERT INTO items(id, label) VALUES (1000000, 'from the SIGTERM handler')")
    conn.close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(ready + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
i = 1000
while True:
    i += 1
    conn.execute("INSERT INTO items(id, label) VALUES (?, 'app')", (i,))
    time.sleep(0.05)
"#;

#[test]
fn exec_delivers_sigterm_to_the_applications_handler_and_its_last_commit_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let script = dir.path().join("app.py");
    std::fs::write(&script, PYTHON_APP).unwrap();
    let ready = dir.path().join("ready");
    // No shell syntax: executed directly.
    let command = format!(
        "python3 {} {} {}",
        script.display(),
        app.path.display(),
        ready.display()
    );
    let mut watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--exec", &command],
        &[],
        dir.path(),
    );
    // Generous: the whole suite shares two cores, and python3 with sqlite3 starts slowly
    // then. (It failed once at 20 s in a full run, never alone.)
    watch.wait_for(Duration::from_secs(60), "the application to start", || {
        ready.exists()
    });
    let pid: i32 = std::fs::read_to_string(&ready).unwrap().parse().unwrap();
    // It starts with nothing blocked.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    assert!(
        blocked.ends_with("0000000000000000"),
        "the application starts with signals blocked: {blocked}"
    );
    std::thread::sleep(Duration::from_millis(500));
    watch.signal(libc::SIGTERM);
    let code = exit_code(&mut watch);
    assert_eq!(code, 0, "{}", watch.log());
    assert_gone(&[pid]);
    let label: String = app
        .conn
        .query_row("SELECT label FROM items WHERE id = 1000000", [], |r| {
            r.get(0)
        })
        .expect("the handler's row in the database");
    assert_eq!(label, "from the SIGTERM handler");
    let out = dir.path().join("out.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success(), "{restore:?}");
    assert_eq!(dump(&out), app.dump(), "the restore lacks the last commits");
}

/// `--exec COMMAND`, then `signal` to walsync: walsync exits with the status of a child
/// killed by it, and no process of the child's is left.
fn stop_exec_with(command: &str, signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let mut watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--exec", command],
        &[],
        dir.path(),
    );
    let child = child_of(watch.pid());
    // A shell's own children too, once it has started them (a fixed pause lost that race
    // on a loaded machine); then every process of the command's.
    let mut command_tree = vec![child];
    wait_for(Duration::from_secs(20), "the command's processes", || {
        command_tree = tree(child);
        command_tree.len() >= 2 || !command.contains(';')
    });
    app.insert(2, 100);
    let started = Instant::now();
    watch.signal(signal);
    let code = exit_code(&mut watch);
    assert_eq!(code, 128 + signal, "{command:?}: {}", watch.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{command:?} took {:?} to stop",
        started.elapsed()
    );
    assert_gone(&command_tree);
    let out = dir.path().join("out.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success(), "{restore:?}");
    assert_eq!(dump(&out), app.dump());
}

#[test]
fn exec_sleep_stops_on_sigterm_and_leaves_nothing_behind() {
    stop_exec_with("sleep 30", libc::SIGTERM);
}

#[test]
fn exec_sleep_stops_on_sigint_and_leaves_nothing_behind() {
    stop_exec_with("sleep 30", libc::SIGINT);
}

#[test]
fn exec_through_a_shell_signals_its_whole_process_group() {
    // Shell syntax: /bin/sh -c, whose children must get the signal too.
    stop_exec_with("sleep 30; sleep 31", libc::SIGTERM);
}

#[test]
fn sighup_and_sigusr_are_logged_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let watch = WatchProcess::start(&[path_str(&app.path), "-b", &dest], &[], dir.path());
    // And the other signals supervisors send (sv 1, sv 2), whose default is to kill.
    for signal in [libc::SIGHUP, libc::SIGUSR1, libc::SIGHUP, libc::SIGUSR2] {
        app.insert(2, 100);
        watch.signal(signal);
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(Duration::from_secs(10), "the signals logged", || {
        let log = watch.log();
        ["SIGHUP", "SIGUSR1", "SIGUSR2"]
            .iter()
            .all(|name| log.contains(&format!("{name}: nothing to do")))
    });
    app.insert(2, 100);
    let log = watch.stderr.clone();
    let status = watch.terminate(Duration::from_secs(30));
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(status.code(), Some(0), "{status}: {log}");
    let out = dir.path().join("out.db");
    let restore = walsync(&["restore", "app", "-o", path_str(&out), "-b", &dest], &[]);
    assert!(restore.status.success(), "{restore:?}");
    assert_eq!(dump(&out), app.dump());
}

#[test]
fn sighup_and_sigusr1_are_forwarded_to_the_exec_command() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let app = AppDb::create(dir.path(), "app.db");
    let marker = dir.path().join("got-hup");
    let ready = dir.path().join("ready");
    let command = format!(
        "trap 'echo usr1 >> {m}' USR1; trap 'echo hup >> {m}; exit 3' HUP; touch {}; \
         while :; do sleep 0.05; done",
        ready.display(),
        m = marker.display(),
    );
    let mut watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--exec", &command],
        &[],
        dir.path(),
    );
    watch.wait_for(Duration::from_secs(20), "the child to start", || {
        ready.exists()
    });
    watch.signal(libc::SIGUSR1);
    wait_for(Duration::from_secs(10), "SIGUSR1 handled", || {
        marker.exists()
    });
    watch.signal(libc::SIGHUP);
    assert_eq!(exit_code(&mut watch), 3, "{}", watch.log());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "usr1\nhup\n");
}

/// Counts the SIGINTs it gets (in `count`), exits 0 a second after the first.
const COUNT_SIGINTS: &str = r#"
import signal, sys, time
count, ready = sys.argv[1], sys.argv[2]
n = 0
def interrupted(signum, frame):
    global n
    n += 1
    with open(count, "w") as f:
        f.write(str(n))
signal.signal(signal.SIGINT, interrupted)
open(ready, "w").close()
while n == 0:
    time.sleep(0.05)
time.sleep(1)
sys.exit(0)
"#;

#[test]
fn ctrl_c_at_a_terminal_reaches_the_exec_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let app = AppDb::create(dir.path(), "app.db");
    let script = dir.path().join("count.py");
    std::fs::write(&script, COUNT_SIGINTS).unwrap();
    let (count, ready) = (dir.path().join("count"), dir.path().join("ready"));
    let args = format!(
        "watch {} -b {dest} --exec 'python3 {} {} {}'",
        app.path.display(),
        script.display(),
        count.display(),
        ready.display()
    );
    // walsync on a terminal of its own, as the group leader there: Ctrl-C typed there goes
    // to the terminal's foreground process group, walsync and the application it executed.
    let mut terminal = walsync_on_a_terminal(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux runs walsync on a terminal");
    // Generous, as above; on a time-out, or once walsync (or script) has exited without it,
    // what the terminal showed says why.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        let exited = terminal.try_wait().unwrap();
        if exited.is_some() || std::time::Instant::now() >= deadline {
            let _ = terminal.kill();
            let shown = terminal.wait_with_output().map(|o| o.stdout);
            panic!(
                "no application started (exited: {exited:?}); the terminal showed:\n{}",
                String::from_utf8_lossy(&shown.unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    use std::io::Write as _;
    let mut keyboard = terminal.stdin.take().unwrap();
    keyboard.write_all(b"\x03").unwrap();
    keyboard.flush().unwrap();
    let output = {
        let deadline = Instant::now() + Duration::from_secs(30);
        while terminal.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "walsync did not stop on Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(keyboard);
        terminal.wait_with_output().unwrap()
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {text}", output.status);
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "1",
        "the application got Ctrl-C more than once: {text}"
    );
}
