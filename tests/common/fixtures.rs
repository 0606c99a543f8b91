//! Real SQLite databases to replicate, and the real `walsync` binary to run against them.
//!
//! Every test runs walsync through [`walsync_command`] (or its wrapped forms,
//! [`walsync_after`] and [`walsync_on_a_terminal`]; [`walsync`] and [`WatchProcess`] are
//! built on it): the binary Cargo built with these tests, without the test process's own AWS,
//! walsync and TLS settings. The torture harness gets the same from the test kit, given
//! [`WALSYNC`].

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rusqlite::{params, Connection};
use walsync_testkit::without_callers_settings;

/// The `walsync` binary Cargo built for these tests.
pub const WALSYNC: &str = env!("CARGO_BIN_EXE_walsync");

/// `walsync`, ready for its arguments, with none of the test process's `AWS_*`, `WALSYNC_*`
/// and `SSL_CERT_*` variables (see [`walsync_testkit::walsync_command`]): what it is told is
/// the test's to add (`.envs(server.env())`).
pub fn walsync_command() -> Command {
    walsync_testkit::walsync_command(Path::new(WALSYNC))
}

/// `sh -c 'SETUP && exec walsync ...'`, ready for walsync's arguments, with the environment
/// [`walsync_command`] gives: walsync under a `umask` or a `ulimit` of the test's choosing.
pub fn walsync_after(setup: &str) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{setup} && exec \"$0\" \"$@\""))
        .arg(WALSYNC);
    without_callers_settings(&mut command);
    command
}

/// `walsync ARGS` on a terminal of its own: script(1) (util-linux, an essential package)
/// runs `exec walsync ARGS` (`args` is shell text) with a new pseudo-terminal as its
/// controlling terminal, stdin and stdout, the environment as [`walsync_command`] gives it.
/// `exec` makes walsync the terminal's foreground process group leader, as an interactive
/// shell's job control would: without it a non-interactive /bin/sh (script's default when
/// SHELL is unset, as in CI) sits in the group, and dies of a Ctrl-C meant for walsync.
pub fn walsync_on_a_terminal(args: &str) -> Command {
    let mut command = Command::new("script");
    command.args(["-qec", &format!("exec {WALSYNC} {args}"), "/dev/null"]);
    without_callers_settings(&mut command);
    command
}

/// An application database in WAL mode with one table, written through a connection that
/// stays open (as an application's would), so its WAL survives between writes.
pub struct AppDb {
    pub path: PathBuf,
    pub conn: Connection,
    pub next_id: i64,
}

impl AppDb {
    /// Create `dir/name` in WAL mode with automatic checkpoints off, so tests decide when
    /// the WAL is checkpointed.
    pub fn create(dir: &Path, name: &str) -> AppDb {
        let path = dir.join(name);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA wal_autocheckpoint=0;
             CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT NOT NULL, body BLOB);",
        )
        .unwrap();
        AppDb {
            path,
            conn,
            next_id: 1,
        }
    }

    /// Commit one transaction inserting `rows` rows with `blob_len` pseudo-random bytes each.
    pub fn insert(&mut self, rows: usize, blob_len: usize) {
        let tx = self.conn.transaction().unwrap();
        for _ in 0..rows {
            let id = self.next_id;
            self.next_id += 1;
            tx.execute(
                "INSERT INTO items(id, label, body) VALUES (?1, ?2, ?3)",
                params![id, format!("item {id}"), noise(id as u64, blob_len)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    pub fn exec(&self, sql: &str) {
        self.conn.execute_batch(sql).unwrap();
    }

    /// The logical content of the database as it is now.
    pub fn dump(&self) -> String {
        dump_connection(&self.conn)
    }
}

/// Incompressible but repeatable bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every table's rows, in rowid order, as text: equal dumps mean equal content.
pub fn dump(path: &Path) -> String {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    dump_connection(&conn)
}

/// Every table's rows of an open connection, as [`dump`] gives them.
pub fn dump_of(conn: &Connection) -> String {
    dump_connection(conn)
}

fn dump_connection(conn: &Connection) -> String {
    let mut out = String::new();
    visit(conn, |item| match item {
        Visit::Table(_, sql) => {
            out.push_str(sql);
            out.push('\n');
        }
        Visit::Value(value) => out.push_str(&format!("{value:?}|")),
        Visit::RowEnd => out.push('\n'),
    });
    out
}

/// One step of walking a database's content in a fixed order.
enum Visit<'a> {
    /// A table's name and schema, before its rows.
    Table(&'a str, &'a str),
    Value(rusqlite::types::ValueRef<'a>),
    RowEnd,
}

/// Walk every table (by name) and its rows (by rowid), value by value.
fn visit(conn: &Connection, mut f: impl FnMut(Visit)) {
    let tables: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_schema WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (table, sql) in &tables {
        f(Visit::Table(table, sql));
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                f(Visit::Value(row.get_ref(i).unwrap()));
            }
            f(Visit::RowEnd);
        }
    }
}

/// `PRAGMA integrity_check` of a database file.
pub fn integrity(path: &Path) -> String {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// Run the real `walsync` binary with `env` (and no other AWS_*, WALSYNC_* or SSL_CERT_*
/// variables) to its end.
pub fn walsync(args: &[&str], env: &[(String, String)]) -> Output {
    walsync_command()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running walsync")
}

/// Run walsync and insist that it succeeded; returns stdout.
pub fn walsync_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = walsync(args, env);
    assert!(
        out.status.success(),
        "walsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run walsync and insist that it failed with a one-line error; returns that line.
pub fn walsync_err(args: &[&str], env: &[(String, String)]) -> String {
    let out = walsync(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "walsync {args:?} should have failed; stderr: {stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walsync: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// Files in `dir` (names only), sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A content digest of every table (FNV-1a over the dump, streamed), for databases too large
/// to compare as text.
pub fn digest(path: &Path) -> u64 {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    digest_connection(&conn)
}

pub fn digest_connection(conn: &Connection) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    visit(conn, |item| match item {
        Visit::Table(name, _) => feed(name.as_bytes()),
        Visit::Value(value) => {
            match value {
                rusqlite::types::ValueRef::Null => feed(b"N"),
                rusqlite::types::ValueRef::Integer(v) => feed(&v.to_le_bytes()),
                rusqlite::types::ValueRef::Real(v) => feed(&v.to_le_bytes()),
                rusqlite::types::ValueRef::Text(t) => feed(t),
                rusqlite::types::ValueRef::Blob(b) => feed(b),
            }
            feed(b"|");
        }
        Visit::RowEnd => {}
    });
    hash
}

/// `walsync watch` running as a child process, its output captured in files.
pub struct WatchProcess {
    pub child: std::process::Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl WatchProcess {
    /// Start `walsync watch ARGS` and wait until it has announced every database.
    pub fn start(args: &[&str], env: &[(String, String)], log_dir: &Path) -> WatchProcess {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdout = log_dir.join(format!("watch-{n}.out"));
        let stderr = log_dir.join(format!("watch-{n}.err"));
        let mut cmd = walsync_command();
        cmd.arg("watch").args(args);
        // Debug logging unless `env` says otherwise.
        cmd.env("RUST_LOG", "walsync=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd.spawn().expect("starting walsync watch");
        let process = WatchProcess {
            child,
            stdout,
            stderr,
        };
        let databases = args.iter().take_while(|a| !a.starts_with('-')).count();
        wait_for(Duration::from_secs(20), "walsync watch to start", || {
            // "watching PATH as NAME" is a log line (on stderr, after its timestamp; older
            // builds printed it alone on stdout).
            let out = std::fs::read_to_string(&process.stderr).unwrap_or_default()
                + &std::fs::read_to_string(&process.stdout).unwrap_or_default();
            out.lines()
                .filter(|l| l.starts_with("watching ") || l.contains(" watching "))
                .count()
                >= databases
        });
        process
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGTERM, then wait (at most `timeout`) for the exit status.
    pub fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                panic!("walsync did not exit after SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Everything walsync printed to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// [`wait_for`] something walsync (or its `--exec` application) must do, with walsync's
    /// log (and whether it is still running) in the panic message: what the application
    /// under `--exec` said, or why it never started. Gives up at once if walsync has exited:
    /// an application that died at its start is not mistaken for a slow one.
    pub fn wait_for(&mut self, timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        while !check() {
            let status = self.child.try_wait();
            let exited = !matches!(status, Ok(None));
            // Checked once more after an exit: it may have come just before.
            if exited && check() {
                return;
            }
            if exited || std::time::Instant::now() >= deadline {
                panic!("no {what} (walsync: {status:?}); its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

use std::time::Duration;

/// Poll `check` until it is true, or panic naming `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes a directory immutable (`chattr +i`: not even root may create or remove files in
/// it) for the life of the guard; undone on drop, also when the test panics. Only root may
/// (CAP_LINUX_IMMUTABLE): a test using it starts with `needs_root!`.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn new(dir: &Path) -> Immutable {
        let status = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .expect("running chattr");
        assert!(status.success(), "chattr +i {} failed", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// The sidecar directory of the only replica of `db` (`.app.db-walsync/<name>-<hash>/`).
pub fn replica_sidecar(db: &Path) -> PathBuf {
    let root = db.with_file_name(format!(
        ".{}-walsync",
        db.file_name().unwrap().to_string_lossy()
    ));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}
