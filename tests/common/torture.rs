//! The crash-and-fault torture harness (issue 4), shared by `examples/torture.rs` (long runs,
//! `scripts/torture.sh`) and `tests/torture.rs` (a short run in the test suite).
//!
//! Each round, against the SigV4 S3 test server behind a [`FaultProxy`], with the real
//! `walsync watch` binary: a writer thread commits random transactions and records, after each
//! commit, its start and end time and a digest of the database's logical content; meanwhile
//! the harness SIGKILLs and restarts walsync, runs application checkpoints of every mode,
//! stops and restarts the S3 server, and switches proxy faults on and off. At the end of the
//! round (faults off, server up) walsync gets SIGTERM and must exit 0; then the latest state
//! and several points in time are restored with the real binary and checked:
//!
//! - (a) the latest restore equals the digest after the final commit;
//! - (b) a point-in-time restore at `T` equals the digest after some commit `j` that started
//!   at or before `T` (never a later transaction, never a partial one), and `j` does not go
//!   back as `T` grows; how far `j` lags the newest commit started by `T` is reported, not
//!   judged (the granularity of point-in-time restore is one segment);
//! - every restore passes `PRAGMA integrity_check`.
//!
//! Rounds are seeded (`seed`, `round`): the same pair makes the same choices, though thread
//! timing still differs from run to run.

#![allow(dead_code)] // each test binary uses its own part of the helper

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use walsync::layout::Catalog;
use walsync::storage::Storage;
use walsync::utc::UtcTime;

use super::faultproxy::{splitmix64, FaultCounts, FaultMix, FaultProxy};
use super::s3server::S3Server;

/// How to run the harness.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `walsync` binary to torture.
    pub walsync: PathBuf,
    pub seed: u64,
    /// Rounds `first_round..first_round + rounds` run (to rerun one failing round alone).
    pub first_round: u64,
    pub rounds: u64,
    /// How long the writer and the chaos run in each round.
    pub round_time: Duration,
    /// `--s3-timeout` for walsync; stalls last longer than this.
    pub s3_timeout: Duration,
    /// Keep the directory of a failed round (database, walsync's log, the bucket).
    pub keep_failed: bool,
    /// Where round directories go (a fresh temporary directory each).
    pub temp_root: Option<PathBuf>,
}

impl Config {
    pub fn new(walsync: PathBuf, seed: u64, rounds: u64) -> Config {
        Config {
            walsync,
            seed,
            first_round: 0,
            rounds,
            round_time: Duration::from_secs(8),
            s3_timeout: Duration::from_secs(2),
            keep_failed: true,
            temp_root: None,
        }
    }
}

/// What the harness did and found, per round and in total.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub rounds: u64,
    pub commits: u64,
    pub blobs: u64,
    pub schema_changes: u64,
    pub vacuums: u64,
    pub busy_commits: u64,
    /// Longest a commit took (walsync's barrier can hold writers).
    pub slowest_commit: Duration,
    pub kills: u64,
    pub starts: u64,
    /// walsync exited at startup because S3 was unreachable, and was started again (as a
    /// supervisor would): expected while the server is paused or faults are on.
    pub startup_exits: u64,
    /// PASSIVE, FULL, RESTART, TRUNCATE.
    pub checkpoints: [u64; 4],
    /// Application checkpoints that returned busy (or SQLITE_BUSY).
    pub checkpoints_busy: u64,
    pub server_pauses: u64,
    pub fault_switches: u64,
    pub faults: FaultCounts,
    pub latest_checks: u64,
    pub pitr_checks: u64,
    /// PITR checks whose restore was the newest commit started at or before the time.
    pub pitr_exact: u64,
    /// Largest lag, in commits, of a PITR restore behind the newest commit started by `T`.
    pub pitr_max_lag: u64,
    pub pitr_lag_sum: u64,
    /// Points in time before the first snapshot (nothing to restore; not counted).
    pub pitr_too_early: u64,
    pub sigterm_exits_ok: u64,
    pub failures: Vec<String>,
}

impl Totals {
    fn add(&mut self, r: &Totals) {
        self.rounds += r.rounds;
        self.commits += r.commits;
        self.blobs += r.blobs;
        self.schema_changes += r.schema_changes;
        self.vacuums += r.vacuums;
        self.busy_commits += r.busy_commits;
        self.slowest_commit = self.slowest_commit.max(r.slowest_commit);
        self.kills += r.kills;
        self.starts += r.starts;
        self.startup_exits += r.startup_exits;
        for i in 0..4 {
            self.checkpoints[i] += r.checkpoints[i];
        }
        self.checkpoints_busy += r.checkpoints_busy;
        self.server_pauses += r.server_pauses;
        self.fault_switches += r.fault_switches;
        self.faults.add(&r.faults);
        self.latest_checks += r.latest_checks;
        self.pitr_checks += r.pitr_checks;
        self.pitr_exact += r.pitr_exact;
        self.pitr_max_lag = self.pitr_max_lag.max(r.pitr_max_lag);
        self.pitr_lag_sum += r.pitr_lag_sum;
        self.pitr_too_early += r.pitr_too_early;
        self.sigterm_exits_ok += r.sigterm_exits_ok;
        self.failures.extend(r.failures.iter().cloned());
    }

    /// The counters of one round on one line.
    pub fn one_line(&self) -> String {
        format!(
            "{} commits, {} kills, {} starts ({} after a startup error), checkpoints P/F/R/T {}/{}/{}/{}, \
             {} server pauses, faults {}/{}/{}/{}/{} (reset/500/503/stall/truncated), \
             PITR {} (exact {}, max lag {}), {} failures",
            self.commits,
            self.kills,
            self.starts,
            self.startup_exits,
            self.checkpoints[0],
            self.checkpoints[1],
            self.checkpoints[2],
            self.checkpoints[3],
            self.server_pauses,
            self.faults.resets,
            self.faults.errors500,
            self.faults.slowdowns503,
            self.faults.stalls,
            self.faults.truncations,
            self.pitr_checks,
            self.pitr_exact,
            self.pitr_max_lag,
            self.failures.len()
        )
    }

    /// A multi-line summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "rounds {}, commits {} (blobs {}, schema changes {}, VACUUM {}, busy {}), slowest commit {} ms",
            self.rounds,
            self.commits,
            self.blobs,
            self.schema_changes,
            self.vacuums,
            self.busy_commits,
            self.slowest_commit.as_millis()
        );
        let _ = writeln!(
            s,
            "walsync SIGKILLs {}, starts {} ({} after exiting on a startup error), clean SIGTERM exits {}",
            self.kills, self.starts, self.startup_exits, self.sigterm_exits_ok
        );
        let _ = writeln!(
            s,
            "checkpoints PASSIVE {} / FULL {} / RESTART {} / TRUNCATE {} (busy {})",
            self.checkpoints[0],
            self.checkpoints[1],
            self.checkpoints[2],
            self.checkpoints[3],
            self.checkpoints_busy
        );
        let _ = writeln!(
            s,
            "S3 server pauses {}, fault switches {}; faults: {} (injected {})",
            self.server_pauses,
            self.fault_switches,
            self.faults,
            self.faults.injected()
        );
        let mean = if self.pitr_checks > 0 {
            self.pitr_lag_sum as f64 / self.pitr_checks as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "restores checked: latest {}, point-in-time {} (exactly the newest commit {}, lag mean {mean:.2} max {} commits; {} times before the first snapshot skipped)",
            self.latest_checks,
            self.pitr_checks,
            self.pitr_exact,
            self.pitr_max_lag,
            self.pitr_too_early
        );
        let _ = write!(s, "failures: {}", self.failures.len());
        for f in &self.failures {
            let _ = write!(s, "\n  FAIL {f}");
        }
        s
    }
}

/// Run every round; prints a line per round and returns the totals.
pub fn run(config: &Config) -> Totals {
    let mut totals = Totals::default();
    let started = Instant::now();
    for round in config.first_round..config.first_round + config.rounds {
        let t0 = Instant::now();
        let result = run_round(config, round);
        println!(
            "round {round} (seed {}, {:.1}s): {}",
            config.seed,
            t0.elapsed().as_secs_f64(),
            result.one_line()
        );
        for f in &result.failures {
            println!("  FAIL {f}");
        }
        totals.add(&result);
    }
    println!(
        "== torture: seed {}, {} rounds in {:.0}s ==\n{}",
        config.seed,
        totals.rounds,
        started.elapsed().as_secs_f64(),
        totals.summary()
    );
    totals
}

/// A generator for one purpose in one round.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, round: u64, stream: u64) -> Rng {
        let mut s = seed ^ round.wrapping_mul(0xa076_1d64_78bd_642f) ^ stream << 56;
        splitmix64(&mut s);
        Rng(s)
    }
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn fraction(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.fraction() < p
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// One recorded commit: when it started and ended, and the content right after it.
#[derive(Debug, Clone, Copy)]
struct Commit {
    start: UtcTime,
    end: UtcTime,
    digest: u64,
}

/// Everything in one round; failures are collected, not panicked on, so that processes and
/// directories are always cleaned up.
fn run_round(config: &Config, round: u64) -> Totals {
    let mut totals = Totals {
        rounds: 1,
        ..Totals::default()
    };
    let dir = match &config.temp_root {
        Some(root) => tempfile::Builder::new()
            .prefix("walsync-torture-")
            .tempdir_in(root),
        None => tempfile::Builder::new()
            .prefix("walsync-torture-")
            .tempdir(),
    }
    .expect("temporary directory for a round");
    let mut round_state = Round::new(config, round, dir.path());
    let outcome = round_state.play(&mut totals);
    if let Err(e) = outcome {
        totals
            .failures
            .push(format!("round {round}: harness error: {e}"));
    }
    round_state.shut_down();
    totals.faults = round_state.proxy.counts();
    if !totals.failures.is_empty() {
        let reproduce = format!(
            " [reproduce: scripts/torture.sh --seed {} --round {round} --rounds 1]",
            config.seed
        );
        for f in totals.failures.iter_mut() {
            f.push_str(&reproduce);
        }
        if config.keep_failed {
            let kept = dir.keep();
            // The bucket lives in the server's own temporary directory: copy it beside.
            let _ = copy_tree(round_state.server.root(), &kept.join("bucket"));
            totals
                .failures
                .push(format!("round {round}: kept {}", kept.display()));
        }
    }
    totals
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

const PREFIX: &str = "torture";
const NAME: &str = "app";

struct Round<'a> {
    config: &'a Config,
    round: u64,
    dir: PathBuf,
    db: PathBuf,
    server: S3Server,
    server_up: bool,
    proxy: FaultProxy,
    watch: Option<Child>,
    log: PathBuf,
    /// Length of the log when the current walsync was started: its output follows.
    log_start: u64,
    rng: Rng,
    min_interval: f64,
}

impl<'a> Round<'a> {
    fn new(config: &'a Config, round: u64, dir: &Path) -> Round<'a> {
        let server = S3Server::start();
        let mut rng = Rng::new(config.seed, round, 1);
        let proxy = FaultProxy::start(
            server.addr(),
            rng.next(),
            config.s3_timeout + Duration::from_millis(1500),
        );
        let min_interval = [0.05, 0.1, 0.2][rng.below(3) as usize];
        Round {
            config,
            round,
            dir: dir.to_path_buf(),
            db: dir.join("app.db"),
            server,
            server_up: true,
            proxy,
            watch: None,
            log: dir.join("walsync.log"),
            log_start: 0,
            rng,
            min_interval,
        }
    }

    fn dest(&self) -> String {
        format!("s3://{}/{PREFIX}", self.server.bucket())
    }

    /// The environment for walsync: the test server's keys, the proxy as endpoint.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.server.env();
        for (k, v) in env.iter_mut() {
            if k == "AWS_ENDPOINT_URL_S3" {
                *v = self.proxy.endpoint();
            }
        }
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.config.walsync);
        cmd.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env());
        cmd
    }

    fn start_watch(&mut self, totals: &mut Totals) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("walsync log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        self.log_start = log.metadata().map_or(0, |m| m.len());
        let db = self.db.to_string_lossy().into_owned();
        let dest = self.dest();
        let min_interval = self.min_interval.to_string();
        let timeout = self.config.s3_timeout.as_secs_f64().to_string();
        let child = self
            .command(&[
                "watch",
                &db,
                "-b",
                &dest,
                "--min-interval",
                &min_interval,
                "--s3-timeout",
                &timeout,
                "--shutdown-timeout",
                "30",
            ])
            .env("RUST_LOG", "walsync=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting walsync watch: {e}"))?;
        totals.starts += 1;
        self.watch = Some(child);
        Ok(())
    }

    fn kill_watch(&mut self) {
        if let Some(mut child) = self.watch.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A watch process that exited by itself is a finding (it should run until told to
    /// stop), unless it could not reach S3 at startup: then it is started again, as runit or
    /// s6 would.
    fn check_watch_alive(&mut self, totals: &mut Totals) -> Result<(), String> {
        let Some(child) = self.watch.as_mut() else {
            return Ok(());
        };
        let Ok(Some(status)) = child.try_wait() else {
            return Ok(());
        };
        self.watch = None;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let error = log
            .lines()
            .rev()
            .find(|l| l.starts_with("walsync: error:"))
            .unwrap_or("");
        let unreachable = [
            "gave up after",
            "temporary failure",
            "Connection",
            "timeout",
        ];
        if !status.success() && unreachable.iter().any(|u| error.contains(u)) {
            totals.startup_exits += 1;
            return self.start_watch(totals);
        }
        totals.failures.push(format!(
            "round {}: walsync watch exited on its own ({status}: {error}); see {}",
            self.round,
            self.log.display()
        ));
        Ok(())
    }

    fn set_server(&mut self, up: bool) {
        if up && !self.server_up {
            self.server.restart();
        } else if !up && self.server_up {
            self.server.stop();
        }
        self.server_up = up;
    }

    fn play(&mut self, totals: &mut Totals) -> Result<(), String> {
        create_database(&self.db, self.rng.chance(0.5)).map_err(|e| e.to_string())?;
        let writer = Writer::start(&self.db, Rng::new(self.config.seed, self.round, 2))?;
        // Faults from the very start: walsync's first requests (the ownership check, the
        // first snapshot) must survive them too.
        let mix = self.random_mix();
        self.proxy.set_mix(mix);
        totals.fault_switches += 1;
        self.start_watch(totals)?;
        let checkpointer = Connection::open(&self.db).map_err(|e| e.to_string())?;
        checkpointer
            .busy_timeout(Duration::from_millis(100))
            .map_err(|e| e.to_string())?;

        // Every kind of chaos at least once per round (even if that takes longer than
        // `round_time`), then random ones.
        let mut agenda: Vec<u64> = vec![0, 1, 2, 3, 4, 5, 9];
        for i in (1..agenda.len()).rev() {
            agenda.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        let end = Instant::now() + self.config.round_time;
        while Instant::now() < end || !agenda.is_empty() {
            sleep_ms(self.rng.range(50, 500));
            self.check_watch_alive(totals)?;
            let action = if agenda.is_empty() {
                self.rng.below(10)
            } else {
                agenda.remove(0)
            };
            match action {
                0 | 7 => {
                    // SIGKILL, stay down a moment (the writer keeps committing), restart.
                    self.kill_watch();
                    totals.kills += 1;
                    sleep_ms(self.rng.range(0, 700));
                    self.start_watch(totals)?;
                }
                1..=4 => {
                    let mode = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"][action as usize - 1];
                    totals.checkpoints[action as usize - 1] += 1;
                    let sql = format!("PRAGMA wal_checkpoint({mode})");
                    match checkpointer.query_row(&sql, [], |r| r.get::<_, i64>(0)) {
                        Ok(0) => {}
                        Ok(_) => totals.checkpoints_busy += 1,
                        Err(e) if is_busy(&e) => totals.checkpoints_busy += 1,
                        Err(e) => return Err(format!("{mode} checkpoint: {e}")),
                    }
                }
                5 | 8 => {
                    self.set_server(false);
                    totals.server_pauses += 1;
                    sleep_ms(self.rng.range(200, 2500));
                    self.set_server(true);
                }
                _ => {
                    totals.fault_switches += 1;
                    if action == 9 && self.proxy.mix() != FaultMix::none() {
                        self.proxy.set_mix(FaultMix::none());
                    } else {
                        let mix = self.random_mix();
                        self.proxy.set_mix(mix);
                    }
                }
            }
        }
        let (commits, stats) = writer.stop()?;
        totals.commits += commits.len() as u64 - 1;
        totals.blobs += stats.blobs;
        totals.schema_changes += stats.schema_changes;
        totals.vacuums += stats.vacuums;
        totals.busy_commits += stats.busy;
        totals.slowest_commit = stats.slowest;
        drop(checkpointer);

        // The end of the round: a healthy destination, then a clean stop.
        self.proxy.set_mix(FaultMix::none());
        self.set_server(true);
        self.check_watch_alive(totals)?;
        if self.watch.is_none() {
            self.start_watch(totals)?;
        }
        // SIGTERM before walsync has even blocked the signal would kill it outright, as
        // it would any program; a supervisor does not stop a service in its first instant.
        self.wait_until_watching(totals)?;
        match self.terminate()? {
            Some(status) if status.success() => totals.sigterm_exits_ok += 1,
            outcome => {
                totals.failures.push(format!(
                    "round {}: after SIGTERM with S3 healthy walsync {}; see {}",
                    self.round,
                    match outcome {
                        Some(status) => format!("exited with {status}"),
                        None => "did not exit within 90 s".to_string(),
                    },
                    self.log.display()
                ));
                // Let a fresh walsync ship the rest, so the restore checks still mean
                // something.
                self.start_watch(totals)?;
                self.wait_until_watching(totals)?;
                let _ = self.terminate()?;
            }
        }
        self.check_restores(&commits, totals)
    }

    /// A random fault mix: one kind, or all of them, at a high enough rate to matter.
    fn random_mix(&mut self) -> FaultMix {
        let rate = 0.15 + 0.35 * self.rng.fraction();
        let mut mix = FaultMix::none();
        match self.rng.below(6) {
            0 => mix.reset = rate,
            1 => mix.error500 = rate,
            2 => mix.slowdown503 = rate,
            3 => mix.stall = rate,
            4 => mix.truncate = rate,
            _ => {
                mix.reset = rate / 5.0;
                mix.error500 = rate / 5.0;
                mix.slowdown503 = rate / 5.0;
                mix.stall = rate / 5.0;
                mix.truncate = rate / 5.0;
            }
        }
        mix
    }

    /// Wait (60 s at most) until the current walsync has announced its database, restarting
    /// it if it exits on a startup error.
    fn wait_until_watching(&mut self, totals: &mut Totals) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let ours = log.get(self.log_start as usize..).unwrap_or_default();
            if String::from_utf8_lossy(ours)
                .lines()
                .any(|l| l.starts_with("watching "))
            {
                return Ok(());
            }
            self.check_watch_alive(totals)?;
            if self.watch.is_none() {
                return Err("walsync watch is not running".into());
            }
            sleep_ms(20);
        }
        Err("walsync watch did not start within 60 s".into())
    }

    /// SIGTERM and wait (90 s at most) for the exit status; `None` if it hung (killed).
    fn terminate(&mut self) -> Result<Option<ExitStatus>, String> {
        let Some(mut child) = self.watch.take() else {
            return Ok(None);
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            sleep_ms(20);
        }
    }

    /// Restore with the real binary into a fresh file; its digest, or the error output.
    fn restore(&self, at: Option<UtcTime>, n: usize) -> Result<u64, String> {
        let out = self.dir.join(format!("restore-{n}.db"));
        let out_text = out.to_string_lossy().into_owned();
        let dest = self.dest();
        let timeout = self.config.s3_timeout.as_secs_f64().to_string();
        let mut args = vec![
            "restore",
            NAME,
            "-o",
            &out_text,
            "-b",
            &dest,
            "--s3-timeout",
            &timeout,
        ];
        let time;
        if let Some(at) = at {
            time = at.to_rfc3339();
            args.extend(["--point-in-time", &time]);
        }
        let output = self
            .command(&args)
            .output()
            .map_err(|e| format!("running walsync restore: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        let result = (|| {
            let conn = Connection::open_with_flags(&out, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| e.to_string())?;
            let check: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(|e| e.to_string())?;
            if check != "ok" {
                return Err(format!("integrity_check: {check}"));
            }
            digest(&conn).map_err(|e| e.to_string())
        })();
        // Opening the restored WAL-mode database left -wal and -shm files beside it.
        for suffix in ["", "-wal", "-shm"] {
            let mut path = out.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn check_restores(&mut self, commits: &[Commit], totals: &mut Totals) -> Result<(), String> {
        let round = self.round;
        let last = commits.last().ok_or("no commits recorded")?;
        totals.latest_checks += 1;
        match self.restore(None, 0) {
            Ok(d) if d == last.digest => {}
            Ok(d) => {
                let which = commits.iter().rposition(|c| c.digest == d);
                totals.failures.push(format!(
                    "round {round}: (a) the latest restore is not the final commit {}: it matches {}",
                    commits.len() - 1,
                    which.map_or("no recorded commit".to_string(), |j| format!("commit {j}"))
                ));
            }
            Err(e) => totals
                .failures
                .push(format!("round {round}: (a) the latest restore failed: {e}")),
        }

        // Points in time: some segment boundaries (and just before them), some random moments.
        let storage = self.server.storage(PREFIX);
        let listing = storage
            .list(&format!("{NAME}/"))
            .map_err(|e| format!("listing the bucket: {e}"))?;
        let catalog = Catalog::from_listing(listing);
        let generations = catalog
            .databases
            .get(NAME)
            .ok_or("no replica in the bucket")?;
        let boundaries: Vec<UtcTime> = generations
            .values()
            .flat_map(|g| g.segments.iter().chain(&g.snapshots).map(|o| o.name.time))
            .collect();
        let first = commits[0].start.millis();
        let span = (last.end.millis() - first).max(1) as u64;
        let mut times = Vec::new();
        for _ in 0..4 {
            if !boundaries.is_empty() {
                let b = boundaries[self.rng.below(boundaries.len() as u64) as usize];
                times.push(b);
                times.push(UtcTime::from_millis(b.millis() - 1));
            }
            times.push(UtcTime::from_millis(
                first + self.rng.below(span + 500) as i64,
            ));
        }
        times.sort();
        times.dedup();
        let earliest_snapshot = generations
            .values()
            .flat_map(|g| &g.snapshots)
            .map(|s| s.name.time)
            .min();
        // Commit indices by digest (a VACUUM leaves the digest unchanged, so some repeat).
        let mut by_digest: HashMap<u64, Vec<usize>> = HashMap::new();
        for (j, c) in commits.iter().enumerate() {
            by_digest.entry(c.digest).or_default().push(j);
        }
        let mut previous = 0usize;
        for (n, at) in times.into_iter().enumerate() {
            if earliest_snapshot.is_none_or(|e| at < e) {
                totals.pitr_too_early += 1;
                continue;
            }
            totals.pitr_checks += 1;
            let d = match self.restore(Some(at), n + 1) {
                Ok(d) => d,
                Err(e) => {
                    totals
                        .failures
                        .push(format!("round {round}: (b) restore at {at} failed: {e}"));
                    continue;
                }
            };
            let newest = commits.iter().rposition(|c| c.start <= at).unwrap_or(0);
            let matches = by_digest.get(&d).cloned().unwrap_or_default();
            let allowed: Vec<usize> = matches
                .iter()
                .copied()
                .filter(|&j| commits[j].start <= at)
                .collect();
            let Some(&j) = allowed.iter().find(|&&j| j >= previous) else {
                let why = if matches.is_empty() {
                    "no recorded commit (a partial transaction, or corrupt)".to_string()
                } else if allowed.is_empty() {
                    format!(
                        "commit {} which started at {}, after the time asked for",
                        matches[0], commits[matches[0]].start
                    )
                } else {
                    format!(
                        "commit {}, older than commit {previous} restored for an earlier time",
                        allowed[allowed.len() - 1]
                    )
                };
                totals
                    .failures
                    .push(format!("round {round}: (b) restore at {at} is {why}"));
                continue;
            };
            previous = j;
            // Equal digests (a VACUUM) make the lag ambiguous: count the most favourable.
            let best = allowed.iter().copied().max().unwrap_or(j);
            let lag = (newest - best.min(newest)) as u64;
            if lag == 0 {
                totals.pitr_exact += 1;
            }
            totals.pitr_max_lag = totals.pitr_max_lag.max(lag);
            totals.pitr_lag_sum += lag;
        }
        Ok(())
    }

    /// Stop everything this round started.
    fn shut_down(&mut self) {
        self.kill_watch();
        self.proxy.set_mix(FaultMix::none());
        self.set_server(true);
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        self.kill_watch();
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The application database: WAL mode, a counter bumped by every transaction (so every
/// commit's content is different), small rows and large blobs.
fn create_database(path: &Path, autocheckpoint: bool) -> rusqlite::Result<()> {
    let conn = Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL;
         PRAGMA wal_autocheckpoint={};
         CREATE TABLE meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         INSERT INTO meta VALUES (1, 0);
         CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT, n INTEGER);
         CREATE TABLE blobs(id INTEGER PRIMARY KEY, body BLOB);",
        if autocheckpoint { 1000 } else { 0 }
    ))
}

/// A digest of the logical content: the schema and every table's rows in rowid order.
fn digest(conn: &Connection) -> rusqlite::Result<u64> {
    let mut h = Digest::new();
    let schema: Vec<(String, String, String)> = conn
        .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (kind, name, sql) in &schema {
        h.feed(kind.as_bytes());
        h.feed(name.as_bytes());
        h.feed(sql.as_bytes());
    }
    for (kind, name, _) in &schema {
        if kind != "table" {
            continue;
        }
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{name}\" ORDER BY rowid"))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => h.feed(b"N"),
                    rusqlite::types::ValueRef::Integer(v) => h.feed(&v.to_le_bytes()),
                    rusqlite::types::ValueRef::Real(v) => h.feed(&v.to_le_bytes()),
                    rusqlite::types::ValueRef::Text(t) => h.feed(t),
                    rusqlite::types::ValueRef::Blob(b) => h.feed(b),
                }
            }
            h.feed(b"\n");
        }
    }
    Ok(h.finish())
}

/// A fast 64-bit hash over 8-byte words (MiB of blobs per commit, even in debug builds).
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    fn feed(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail));
    }
    fn finish(&self) -> u64 {
        let mut z = self.0;
        splitmix64(&mut z)
    }
}

#[derive(Debug, Default)]
struct WriterStats {
    blobs: u64,
    schema_changes: u64,
    vacuums: u64,
    busy: u64,
    slowest: Duration,
}

/// The application: commits random transactions on its own thread and records each.
struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<Commit>>>,
    thread: std::thread::JoinHandle<Result<WriterStats, String>>,
}

/// Keep the blobs (and so the database) to a few MiB.
const BLOB_BUDGET: i64 = 5 * 1024 * 1024;

impl Writer {
    fn start(path: &Path, mut rng: Rng) -> Result<Writer, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        // walsync's barrier (and the shipping under it) may hold the write lock for a while
        // when S3 misbehaves; an application would wait too.
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let first = UtcTime::now();
        let d0 = digest(&conn).map_err(|e| e.to_string())?;
        let commits = Arc::new(Mutex::new(vec![Commit {
            start: first,
            end: first,
            digest: d0,
        }]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&commits));
        let thread = std::thread::spawn(move || {
            let mut stats = WriterStats::default();
            let mut next_table = 0u64;
            while !s.load(Ordering::Relaxed) {
                let start = UtcTime::now();
                let t0 = Instant::now();
                match one_transaction(&conn, &mut rng, &mut stats, &mut next_table) {
                    Ok(()) => {}
                    Err(e) if is_busy(&e) => {
                        stats.busy += 1;
                        continue;
                    }
                    Err(e) => return Err(format!("writer: {e}")),
                }
                let end = UtcTime::now();
                stats.slowest = stats.slowest.max(t0.elapsed());
                let d = digest(&conn).map_err(|e| format!("writer digest: {e}"))?;
                if let Ok(mut list) = c.lock() {
                    list.push(Commit {
                        start,
                        end,
                        digest: d,
                    });
                }
                sleep_ms(rng.below(25));
            }
            Ok(stats)
        });
        Ok(Writer {
            stop,
            commits,
            thread,
        })
    }

    fn stop(self) -> Result<(Vec<Commit>, WriterStats), String> {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self
            .thread
            .join()
            .map_err(|_| "the writer thread panicked".to_string())??;
        let commits = self.commits.lock().map_err(|e| e.to_string())?.clone();
        Ok((commits, stats))
    }
}

/// One random transaction (or a VACUUM), committed.
fn one_transaction(
    conn: &Connection,
    rng: &mut Rng,
    stats: &mut WriterStats,
    next_table: &mut u64,
) -> rusqlite::Result<()> {
    let kind = rng.below(100);
    if kind < 3 {
        stats.vacuums += 1;
        return conn.execute_batch("VACUUM");
    }
    let mut tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.set_drop_behavior(rusqlite::DropBehavior::Rollback);
    let tables: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' AND name LIKE 'extra%'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    match kind {
        3..=35 => {
            let table = if !tables.is_empty() && rng.chance(0.3) {
                tables[rng.below(tables.len() as u64) as usize].clone()
            } else {
                "items".to_string()
            };
            for _ in 0..rng.range(1, 20) {
                let label = format!("row {}", rng.next());
                if table == "items" {
                    tx.execute(
                        "INSERT INTO items(label, n) VALUES (?1, ?2)",
                        params![label, rng.below(1000) as i64],
                    )?;
                } else {
                    tx.execute(
                        &format!("INSERT INTO \"{table}\"(v) VALUES (?1)"),
                        params![label],
                    )?;
                }
            }
        }
        36..=55 => {
            let m = rng.range(2, 9) as i64;
            tx.execute(
                "UPDATE items SET n = n + ?1, label = label || 'u' WHERE id % ?2 = ?3",
                params![rng.range(1, 50) as i64, m, rng.below(m as u64) as i64],
            )?;
        }
        56..=67 => {
            let m = rng.range(2, 9) as i64;
            tx.execute(
                "DELETE FROM items WHERE id % ?1 = ?2",
                params![m, rng.below(m as u64) as i64],
            )?;
        }
        68..=81 => {
            // A large blob (page growth); past the budget, old blobs go first (shrink).
            stats.blobs += 1;
            let len = rng.range(100 * 1024, 2 * 1024 * 1024) as i64;
            let total: i64 = tx.query_row(
                "SELECT coalesce(sum(length(body)), 0) FROM blobs",
                [],
                |r| r.get(0),
            )?;
            if total + len > BLOB_BUDGET {
                tx.execute(
                    "DELETE FROM blobs WHERE id IN (SELECT id FROM blobs ORDER BY id LIMIT ?1)",
                    params![rng.range(1, 4) as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO blobs(body) VALUES (?1)",
                params![rng.bytes(len as usize)],
            )?;
        }
        82..=87 => {
            if rng.chance(0.5) {
                tx.execute("DELETE FROM blobs", [])?;
            } else {
                tx.execute("DELETE FROM blobs WHERE id % 2 = 0", [])?;
            }
        }
        _ => {
            stats.schema_changes += 1;
            let columns: i64 =
                tx.query_row("SELECT count(*) FROM pragma_table_info('items')", [], |r| {
                    r.get(0)
                })?;
            match rng.below(3) {
                0 if tables.len() < 6 => {
                    *next_table += 1;
                    tx.execute_batch(&format!(
                        "CREATE TABLE extra{}_{}(id INTEGER PRIMARY KEY, v TEXT)",
                        *next_table,
                        rng.below(1000)
                    ))?;
                }
                1 if !tables.is_empty() => {
                    let t = &tables[rng.below(tables.len() as u64) as usize];
                    tx.execute_batch(&format!("DROP TABLE \"{t}\""))?;
                }
                _ if columns < 16 => {
                    tx.execute_batch(&format!(
                        "ALTER TABLE items ADD COLUMN c{columns} INTEGER DEFAULT {}",
                        rng.below(100)
                    ))?;
                }
                _ => {
                    tx.execute_batch("CREATE INDEX IF NOT EXISTS items_n ON items(n)")?;
                }
            }
        }
    }
    tx.execute("UPDATE meta SET n = n + 1 WHERE k = 1", [])?;
    tx.commit()
}
