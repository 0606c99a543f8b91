//! One round of the torture: the S3 test server and the fault proxy in front of it, the
//! application's writer, and the real `walsync watch`, started, SIGKILLed, restarted and
//! stopped; [`Round::play`] is the round from start to end: its loop of random actions
//! (kills, checkpoints, server pauses, fault switches, and every lifecycle chaos at least
//! once), then a clean SIGTERM and the checks.
//!
//! Its steps are in two rooms below: `round/chaos.rs`, the lifecycle chaos (each
//! `chaos_*` step, with what it hunts), and `round/checks.rs`, what is checked once the
//! round is over (the chain of every stored object, the restores). This file holds what
//! they share: the round's state and how walsync is run.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walsync::UtcTime;

use super::app::{create_database, is_busy, open_checkpointer, Writer};
use super::host::{CoarseFilesystem, Frozen, TmpfsMount};
use super::{find_libfaketime, sleep_ms, wait_at_most, Config, Plan, Rng, SidecarFault, Totals};
use crate::faultproxy::FaultProxy;
use crate::faults::FaultMix;
use crate::s3server::{self, S3Server};

mod chaos;
mod checks;

const PREFIX: &str = "torture";
const NAME: &str = "app";

/// One round's state: what it runs, what it has done to the host, and what it must check.
pub(super) struct Round<'a> {
    config: &'a Config,
    round: u64,
    dir: PathBuf,
    db: PathBuf,
    pub(super) server: S3Server,
    pub(super) proxy: FaultProxy,
    watch: Option<Child>,
    log: PathBuf,
    /// Length of the log when the current walsync was started: its output follows.
    log_start: u64,
    rng: Rng,
    min_interval: f64,
    plan: Plan,
    /// The application's own connection for checkpoints (closed when it closes everything).
    checkpointer: Option<Connection>,
    /// libfaketime, if installed.
    faketime: Option<PathBuf>,
    /// The next walsync start runs under this clock offset (see
    /// [`Round::start_next_under_stepped_clock`]).
    next_start_clock: Option<String>,
    /// The current walsync runs under a stepped clock; its part of the log starts at
    /// `log_start`.
    clock_stepped_watch: bool,
    /// Parts of the log written by walsyncs under a stepped clock.
    clock_stepped_logs: Vec<(u64, u64)>,
    /// From this time on, object times may be earlier than their commits: the newest
    /// object time when the first walsync under a stepped clock was started.
    clock_stepped_at: Option<UtcTime>,
    /// Undone when dropped (also on a panic); declared after everything that uses them.
    frozen: Option<Frozen>,
    tmpfs: Option<TmpfsMount>,
    coarse: Option<CoarseFilesystem>,
}

impl<'a> Round<'a> {
    pub(super) fn new(config: &'a Config, round: u64, dir: &Path) -> Round<'a> {
        let mut rng = Rng::new(config.seed, round, 1);
        let fault_seed = rng.next();
        let server = S3Server::start_with(s3server::Options {
            fault_seed: fault_seed ^ 0x5eed_5e7e,
            ..s3server::Options::default()
        });
        let proxy = FaultProxy::start(
            server.addr(),
            fault_seed,
            config.s3_timeout + Duration::from_millis(1500),
        );
        let min_interval = [0.05, 0.1, 0.2][rng.below(3) as usize];
        let plan = Plan::new(config.seed, round);
        Round {
            config,
            round,
            dir: dir.to_path_buf(),
            db: dir.join("data").join("app.db"),
            server,
            proxy,
            watch: None,
            log: dir.join("walsync.log"),
            log_start: 0,
            rng,
            min_interval,
            plan,
            checkpointer: None,
            faketime: find_libfaketime(),
            next_start_clock: None,
            clock_stepped_watch: false,
            clock_stepped_logs: Vec::new(),
            clock_stepped_at: None,
            frozen: None,
            tmpfs: None,
            coarse: None,
        }
    }

    /// Set one fault mix: the proxy plays its TCP faults, the server its HTTP ones.
    fn set_mix(&self, mix: FaultMix) {
        self.proxy.set_mix(mix);
        self.server.set_fault_mix(mix);
    }

    fn mix(&self) -> FaultMix {
        self.proxy.mix()
    }

    /// The sidecar directory beside the database.
    fn sidecar_root(&self) -> PathBuf {
        self.db.with_file_name(".app.db-walsync")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// The current walsync is gone: remember its part of the log if its clock was stepped.
    fn watch_gone(&mut self) {
        if std::mem::take(&mut self.clock_stepped_watch) {
            let end = self.log_len();
            self.clock_stepped_logs.push((self.log_start, end));
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
        let mut cmd = crate::walsync_command(&self.config.walsync);
        cmd.args(args).envs(self.env());
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
        let mut args = vec![
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
        ];
        let interval = self.plan.snapshot_interval.map(|s| s.to_string());
        if let Some(interval) = &interval {
            args.extend(["--snapshot-interval", interval]);
        }
        let mut command = self.command(&args);
        if let Some(offset) = self.next_start_clock.take() {
            if let Some(lib) = &self.faketime {
                // Only the wall clock steps: file times stay the kernel's, and monotonic
                // clocks (timeouts, intervals) keep running as on a host whose NTP stepped.
                command
                    .env("LD_PRELOAD", lib)
                    .env("FAKETIME", offset)
                    .env("NO_FAKE_STAT", "1")
                    .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
                self.clock_stepped_watch = true;
                totals.clock_steps += 1;
            }
        }
        let child = command
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
            self.watch_gone();
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
        self.watch_gone();
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

    /// Storage up or down for walsync: the proxy resets every connection while down. (The
    /// server itself keeps running: stopped, its port could be taken by another process,
    /// such as a parallel torture run, which would then answer walsync in its place.)
    fn set_server(&mut self, up: bool) {
        self.proxy.set_down(!up);
    }

    pub(super) fn play(&mut self, totals: &mut Totals) -> Result<(), String> {
        let data = self
            .db
            .parent()
            .ok_or("the database has no directory")?
            .to_path_buf();
        std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
        if self.plan.coarse_times {
            match CoarseFilesystem::mount(&self.dir.join("data.img"), &data) {
                Ok(mount) => {
                    self.coarse = Some(mount);
                    totals.coarse_rounds += 1;
                }
                Err(e) => totals.skip(&format!(
                    "filesystem with whole-second times: cannot mount a loop ext4 here ({e})"
                )),
            }
        }
        create_database(&self.db, self.rng.chance(0.5)).map_err(|e| e.to_string())?;
        if self.plan.sidecar == SidecarFault::Full {
            // Before walsync creates its sidecar, so that all of it lives on the tmpfs.
            match TmpfsMount::mount(&self.sidecar_root(), SIDECAR_TMPFS_BYTES) {
                Ok(mount) => self.tmpfs = Some(mount),
                Err(e) => totals.skip(&format!(
                    "sidecar filesystem full (ENOSPC): cannot mount a tmpfs here ({e})"
                )),
            }
        }
        let writer = Writer::start(&self.db, Rng::new(self.config.seed, self.round, 2))?;
        // Faults from the very start: walsync's first requests (the ownership check, the
        // first snapshot) must survive them too.
        let mix = self.random_mix();
        self.set_mix(mix);
        totals.fault_switches += 1;
        self.start_watch(totals)?;
        self.checkpointer = Some(open_checkpointer(&self.db)?);

        // Every kind of chaos at least once per round (even if that takes longer than
        // `round_time`), then random ones of the first ten kinds.
        let mut agenda: Vec<u64> = vec![0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17];
        for i in (1..agenda.len()).rev() {
            agenda.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        // When each action started, to say what was going on at the slowest commit.
        let mut events: Vec<(UtcTime, &str)> = Vec::new();
        let end = Instant::now() + self.config.round_time;
        while Instant::now() < end || !agenda.is_empty() {
            let pause = if agenda.is_empty() { 500 } else { 300 };
            sleep_ms(self.rng.range(50, pause));
            self.check_watch_alive(totals)?;
            let action = if agenda.is_empty() {
                self.rng.below(10)
            } else {
                agenda.remove(0)
            };
            events.push((UtcTime::now(), ACTIONS[action as usize]));
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
                    if !self.app_checkpoint(mode)? {
                        totals.checkpoints_busy += 1;
                    }
                }
                5 | 8 => {
                    self.set_server(false);
                    totals.server_pauses += 1;
                    sleep_ms(self.rng.range(200, 2500));
                    self.set_server(true);
                }
                10 | 11 => {
                    let (stop, app) = self.plan.stops[action as usize - 10];
                    self.chaos_stop_then_app_rewrites_wal(stop, app, &writer, totals)?;
                }
                12 => self.chaos_replace_database(&writer, totals)?,
                13 => self.chaos_sidecar_fault(totals)?,
                14 => self.chaos_slow_s3(totals),
                15 => self.chaos_rollback(&writer, totals)?,
                16 => self.chaos_copy(totals)?,
                17 => self.chaos_storage_down_at_start(totals)?,
                _ => {
                    totals.fault_switches += 1;
                    if action == 9 && self.mix() != FaultMix::none() {
                        self.set_mix(FaultMix::none());
                    } else {
                        let mix = self.random_mix();
                        self.set_mix(mix);
                    }
                }
            }
        }
        let (commits, stats) = writer.stop()?;
        totals.commits += commits.len() as u64 - 1 - stats.switches;
        totals.blobs += stats.blobs;
        totals.schema_changes += stats.schema_changes;
        totals.vacuums += stats.vacuums;
        totals.busy_commits += stats.busy;
        totals.slowest_commit = stats.slowest;
        totals.slowest_commit_during = events
            .iter()
            .rev()
            .find(|(t, _)| stats.slowest_at.is_some_and(|at| *t <= at))
            .map_or("the start", |(_, what)| what)
            .to_string();
        for busy in &stats.busy_failures {
            totals.failures.push(format!(
                "round {}: the application's commit failed with SQLITE_BUSY (busy timeout 5 s): {busy}",
                self.round
            ));
        }
        self.checkpointer = None;

        // The end of the round: a healthy destination, then a clean stop.
        self.set_mix(FaultMix::none());
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
        self.scan_log(totals);
        self.check_chain(totals)?;
        self.check_restores(&commits, totals)
    }

    /// `PRAGMA wal_checkpoint(mode)` on the application's checkpoint connection; false if
    /// it could not complete (busy).
    fn app_checkpoint(&mut self, mode: &str) -> Result<bool, String> {
        if self.checkpointer.is_none() {
            self.checkpointer = Some(open_checkpointer(&self.db)?);
        }
        let Some(conn) = &self.checkpointer else {
            return Err("no checkpoint connection".into());
        };
        let sql = format!("PRAGMA wal_checkpoint({mode})");
        match conn.query_row(&sql, [], |r| r.get::<_, i64>(0)) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if is_busy(&e) => Ok(false),
            Err(e) => Err(format!("{mode} checkpoint: {e}")),
        }
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
                .any(|l| l.contains(" watching "))
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
        let outcome = wait_at_most(&mut child, Duration::from_secs(90))?;
        self.watch_gone();
        Ok(outcome)
    }

    /// Stop everything this round started.
    pub(super) fn shut_down(&mut self) {
        self.kill_watch();
        self.set_mix(FaultMix::none());
        self.proxy.set_delay(Duration::ZERO);
        self.set_server(true);
        self.checkpointer = None;
        self.frozen = None;
        self.tmpfs = None;
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        self.kill_watch();
    }
}

/// What [`Round::play`]'s actions are, by number.
const ACTIONS: [&str; 18] = [
    "a SIGKILL",
    "a PASSIVE checkpoint",
    "a FULL checkpoint",
    "a RESTART checkpoint",
    "a TRUNCATE checkpoint",
    "a server pause",
    "a fault switch",
    "a SIGKILL",
    "a server pause",
    "a fault switch",
    "a stop then close/TRUNCATE",
    "a stop then close/TRUNCATE",
    "a replacement",
    "a sidecar fault",
    "a slow S3",
    "a rollback of the host",
    "a copy of the data directory",
    "a start with storage down",
];

/// Size of the tmpfs under the sidecar in rounds that fill it: room for the staged
/// objects of an outage and a snapshot's scratch copy.
const SIDECAR_TMPFS_BYTES: u64 = 256 << 20;
