//! The crash-and-fault torture harness (issue 4), shared by the `torture` program
//! (`src/bin/torture.rs`: long runs, `scripts/torture.sh`) and `tests/torture.rs` (a short
//! run in the test suite).
//!
//! Each round, against the SigV4 S3 test server behind a [`FaultProxy`] (the server plays
//! the HTTP faults, the proxy the TCP ones), with the real
//! `walsync watch` binary: a writer thread commits random transactions and records, after each
//! commit, its start and end time and a digest of the database's logical content; meanwhile
//! the harness SIGKILLs and restarts walsync, runs application checkpoints of every mode,
//! stops and restarts the S3 server, and switches faults on and off. It also plays the
//! lifecycle events of real hosts that hid bugs before, each in its own `chaos_*` function
//! (every round plays each of them; `p = (seed + round) % 2` picks the variants, so any two
//! consecutive rounds play every variant, see [`Plan`]):
//!
//! - walsync stopped (SIGTERM or SIGKILL) while the application commits, then the
//!   application closes every connection (SQLite checkpoints and deletes the WAL) or runs a
//!   TRUNCATE checkpoint, then walsync started again ([`Round::chaos_stop_then_app_rewrites_wal`]);
//! - the database replaced by rename while watched, in rounds with a short
//!   `--snapshot-interval` while a snapshot is due ([`Round::chaos_replace_database`]);
//! - the sidecar unwritable (`chattr +i`) or its filesystem full (a small tmpfs mounted on
//!   it, filled up), with a SIGKILL and restart in between ([`Round::chaos_sidecar_fault`]);
//! - a slow S3: every request delayed by seconds ([`Round::chaos_slow_s3`]), while the
//!   application's commits (busy timeout 5 s) must never fail with SQLITE_BUSY;
//! - the wall clock stepped back (libfaketime) for a walsync started right after a change
//!   that forces a new generation ([`Round::start_next_under_stepped_clock`]);
//! - the host rolled back (a VM snapshot restored): the database, its WAL and the sidecar
//!   put back in place as they were, while storage keeps what was uploaded since, then
//!   walsync started with its clock ahead (`p == 0`) or behind (`p == 1`)
//!   ([`Round::chaos_rollback`]);
//! - the data directory copied with its sidecar (`cp -a`) and the copy watched under the
//!   same name ([`Round::chaos_copy`]);
//! - walsync started while storage is down ([`Round::chaos_storage_down_at_start`]);
//! - in `p == 0` rounds, all of it on a filesystem with whole-second file times (a
//!   loop-mounted ext4 with 128-byte inodes, see [`CoarseFilesystem`]; needs root).
//!
//! At the end of the round (faults off, server up) walsync gets SIGTERM and must exit 0; then
//! every stored object is downloaded and its place in the chain checked
//! ([`Round::check_chain`]), and the latest state and several points in time are restored with
//! the real binary and checked:
//!
//! - (a) the latest restore equals the digest after the final commit;
//! - (b) a point-in-time restore at `T` equals the digest after some commit `j` that started
//!   at or before `T` (never a later transaction, never a partial one), and `j` does not go
//!   back as `T` grows; how far `j` lags the newest commit started by `T` is reported, not
//!   judged (the granularity of point-in-time restore is one segment);
//! - every restore passes `PRAGMA integrity_check`.
//!
//! A replaced database continues the recorded states: the new file's state at the switch is
//! recorded like a commit, so states of both files count. After a walsync ran under the
//! stepped-back clock, object times no longer say when their commits happened (walsync keeps
//! them monotonic, so they lag), so points in time from then on are only checked to equal
//! some recorded state.
//!
//! Rounds are seeded (`seed`, `round`): the same pair makes the same choices, though thread
//! timing still differs from run to run.
//!
//! This file runs the rounds ([`run`], [`Config`]) and fixes what each plays ([`Plan`],
//! [`Rng`]); the rest is in rooms of its own, in the order a round needs them:
//!
//! - `torture/round.rs`: one round ([`Round`]): walsync started, killed and stopped, the
//!   main loop of actions ([`Round::play`]); in `torture/round/` its lifecycle chaos
//!   (`chaos.rs`, the `chaos_*` steps) and its checks at the end (`checks.rs`: the chain,
//!   the restores);
//! - `torture/app.rs`: the application: the database, the writer thread that commits and
//!   records each commit, the digest of the content;
//! - `torture/host.rs`: what the harness does to the host: immutable directories, a tmpfs,
//!   a coarse-time filesystem, a disk image to roll back to, libfaketime;
//! - `torture/totals.rs`: what a round did and found ([`Totals`]), and the report.
//!
//! [`FaultProxy`]: crate::faultproxy::FaultProxy
//! [`CoarseFilesystem`]: host::CoarseFilesystem

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::faults::splitmix64;

mod app;
mod host;
mod round;
mod totals;

pub use host::find_libfaketime;
pub use totals::Totals;

use host::copy_tree;
use round::Round;

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

/// How walsync is stopped in [`Round::chaos_stop_then_app_rewrites_wal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Term,
    Kill,
}

/// What the application does to the WAL while walsync is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppAction {
    /// Close every connection: the last close checkpoints and deletes the WAL.
    CloseAll,
    /// `PRAGMA wal_checkpoint(TRUNCATE)`.
    Truncate,
}

/// How the sidecar fails in [`Round::chaos_sidecar_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SidecarFault {
    /// `chattr +i` on the sidecar directory and the replica's directory.
    Immutable,
    /// A small tmpfs mounted on the sidecar directory for the round, filled up.
    Full,
}

/// The lifecycle chaos of one round, fixed by the seed and the round number. Every round
/// plays every kind; the variants follow `p = (seed + round) % 2`, so any two consecutive
/// rounds (and so `cargo test`'s two rounds) play every variant.
#[derive(Debug, Clone)]
struct Plan {
    /// `--snapshot-interval` (seconds) in rounds with `p == 0`, so that the replacement
    /// happens while a snapshot is due.
    snapshot_interval: Option<f64>,
    /// The round's two stops: both signals, each with one application action; `p` swaps
    /// the pairs.
    stops: [(Stop, AppAction); 2],
    /// The replacement is a fresh database rather than a changed copy.
    fresh_replacement: bool,
    sidecar: SidecarFault,
    /// The walsync started right after the replacement (`p == 0`) or right after the stop
    /// followed by a TRUNCATE (`p == 1`) runs under a clock this far back (a libfaketime
    /// offset: within an hour, since S3 rejects requests signed further from its clock).
    clock_step: String,
    clock_step_after_replacement: bool,
    /// The database and its sidecar live on a filesystem with whole-second file times (a
    /// loop-mounted ext4 with 128-byte inodes), in `p == 0` rounds.
    coarse_times: bool,
}

impl Plan {
    fn new(seed: u64, round: u64) -> Plan {
        let even = seed.wrapping_add(round).is_multiple_of(2);
        let mut rng = Rng::new(seed, round, 3);
        let stops = if even {
            [
                (Stop::Term, AppAction::CloseAll),
                (Stop::Kill, AppAction::Truncate),
            ]
        } else {
            [
                (Stop::Term, AppAction::Truncate),
                (Stop::Kill, AppAction::CloseAll),
            ]
        };
        Plan {
            snapshot_interval: even.then(|| [1.0, 1.5][rng.below(2) as usize]),
            stops,
            fresh_replacement: rng.chance(0.4),
            sidecar: if even {
                SidecarFault::Immutable
            } else {
                SidecarFault::Full
            },
            clock_step: format!("-{}m", rng.range(5, 40)),
            clock_step_after_replacement: even,
            coarse_times: even,
        }
    }
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
    totals.faults.add(&round_state.server.fault_counts());
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

/// Wait for `child` to exit, at most `timeout`: its status, or None if it had to be killed.
fn wait_at_most(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, String> {
    let deadline = Instant::now() + timeout;
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

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
