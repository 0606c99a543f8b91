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

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use walsync::format::{Catalog, ChainValue, Generation, GenerationObjects};
use walsync::storage::Storage;
use walsync::UtcTime;

use crate::faultproxy::FaultProxy;
use crate::faults::{splitmix64, FaultCounts, FaultMix};
use crate::s3server::{self, S3Server};

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
    /// Commits that failed with SQLITE_BUSY despite the writer's 5 s busy timeout: each is
    /// also a failure (walsync held the write lock for seconds).
    pub busy_commits: u64,
    /// Longest a commit took (walsync's barrier can hold writers).
    pub slowest_commit: Duration,
    /// The chaos under way when the slowest commit started.
    pub slowest_commit_during: String,
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
    /// [`Round::chaos_stop_then_app_rewrites_wal`]: stops by SIGTERM and by SIGKILL.
    pub stops_sigterm: u64,
    pub stops_sigkill: u64,
    /// Stops followed by the application closing every connection, and how many of those
    /// left no WAL file behind (SQLite checkpointed and deleted it).
    pub app_closes: u64,
    pub wal_deleted: u64,
    /// Stops followed by an application TRUNCATE checkpoint that completed.
    pub app_truncates: u64,
    /// [`Round::chaos_replace_database`]: replacements, how many by a fresh database (the
    /// others are a changed copy), and how many in rounds with a short snapshot interval.
    pub replacements: u64,
    pub fresh_replacements: u64,
    pub replacements_snapshot_due: u64,
    /// [`Round::chaos_sidecar_fault`]: sidecar made immutable, sidecar filesystem full.
    pub sidecar_frozen: u64,
    pub sidecar_full: u64,
    /// walsync log lines reporting ENOSPC or EPERM: the sidecar faults really bit.
    pub sidecar_errors_logged: u64,
    /// [`Round::chaos_slow_s3`]: periods of delayed requests.
    pub slow_s3: u64,
    /// walsync starts under a stepped-back clock, and generations such a walsync started.
    pub clock_steps: u64,
    pub clock_step_generations: u64,
    /// Points in time after a clock step (checked only to be some recorded state).
    pub pitr_clock_relaxed: u64,
    /// [`Round::check_chain`]: generations and links checked, duplicate indexes seen.
    pub chain_generations: u64,
    pub chain_links: u64,
    pub chain_duplicates: u64,
    /// Rounds played on a filesystem with whole-second file times.
    pub coarse_rounds: u64,
    /// walsync starts with the clock ahead (after a rollback, in `p == 0` rounds).
    pub clock_ahead: u64,
    /// [`Round::chaos_rollback`]: the database, its WAL and the sidecar put back as they were.
    pub rollbacks: u64,
    /// [`Round::chaos_copy`]: copies of the data directory watched under the same name and
    /// refused; copies not tried because no `state.json` named the original yet.
    pub copies_refused: u64,
    pub copies_skipped: u64,
    /// [`Round::chaos_storage_down_at_start`]: walsync started while storage was down.
    pub starts_storage_down: u64,
    /// Chaos this machine cannot play (no root, no libfaketime, ...), said once each.
    pub skipped: Vec<String>,
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
        if r.slowest_commit > self.slowest_commit {
            self.slowest_commit = r.slowest_commit;
            self.slowest_commit_during = r.slowest_commit_during.clone();
        }
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
        self.stops_sigterm += r.stops_sigterm;
        self.stops_sigkill += r.stops_sigkill;
        self.app_closes += r.app_closes;
        self.wal_deleted += r.wal_deleted;
        self.app_truncates += r.app_truncates;
        self.replacements += r.replacements;
        self.fresh_replacements += r.fresh_replacements;
        self.replacements_snapshot_due += r.replacements_snapshot_due;
        self.sidecar_frozen += r.sidecar_frozen;
        self.sidecar_full += r.sidecar_full;
        self.sidecar_errors_logged += r.sidecar_errors_logged;
        self.slow_s3 += r.slow_s3;
        self.clock_steps += r.clock_steps;
        self.clock_step_generations += r.clock_step_generations;
        self.pitr_clock_relaxed += r.pitr_clock_relaxed;
        self.chain_generations += r.chain_generations;
        self.chain_links += r.chain_links;
        self.chain_duplicates += r.chain_duplicates;
        self.coarse_rounds += r.coarse_rounds;
        self.clock_ahead += r.clock_ahead;
        self.rollbacks += r.rollbacks;
        self.copies_refused += r.copies_refused;
        self.copies_skipped += r.copies_skipped;
        self.starts_storage_down += r.starts_storage_down;
        for note in &r.skipped {
            self.skip(note);
        }
        self.failures.extend(r.failures.iter().cloned());
    }

    /// Note chaos that could not be played here (once per distinct note).
    pub fn skip(&mut self, note: &str) {
        if !self.skipped.iter().any(|n| n == note) {
            self.skipped.push(note.to_string());
        }
    }

    /// The counters of one round on one line.
    pub fn one_line(&self) -> String {
        format!(
            "{} commits (slowest {} ms, during {}), {} kills, {} starts ({} after a startup error), checkpoints P/F/R/T {}/{}/{}/{}, \
             {} server pauses, faults {}/{}/{}/{}/{} (reset/500/503/stall/truncated), \
             stops TERM/KILL {}/{} then close/TRUNCATE {}/{}, replacements {} (fresh {}, snapshot due {}), \
             sidecar frozen/full {}/{}, slow S3 {}, clock steps {} ({} generations), \
             rollbacks {}, copies refused {} (skipped {}), starts with storage down {}, \
             chain links {} in {} generations, PITR {} (exact {}, max lag {}), {} failures",
            self.commits,
            self.slowest_commit.as_millis(),
            self.slowest_commit_during,
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
            self.stops_sigterm,
            self.stops_sigkill,
            self.app_closes,
            self.app_truncates,
            self.replacements,
            self.fresh_replacements,
            self.replacements_snapshot_due,
            self.sidecar_frozen,
            self.sidecar_full,
            self.slow_s3,
            self.clock_steps,
            self.clock_step_generations,
            self.rollbacks,
            self.copies_refused,
            self.copies_skipped,
            self.starts_storage_down,
            self.chain_links,
            self.chain_generations,
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
            "rounds {}, commits {} (blobs {}, schema changes {}, VACUUM {}, failed busy {}), slowest commit {} ms (during {})",
            self.rounds,
            self.commits,
            self.blobs,
            self.schema_changes,
            self.vacuums,
            self.busy_commits,
            self.slowest_commit.as_millis(),
            self.slowest_commit_during
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
        let _ = writeln!(
            s,
            "walsync stopped while the application commits: SIGTERM {} / SIGKILL {}, then the \
             application closed every connection {} (WAL deleted {}) / ran TRUNCATE {}",
            self.stops_sigterm,
            self.stops_sigkill,
            self.app_closes,
            self.wal_deleted,
            self.app_truncates
        );
        let _ = writeln!(
            s,
            "database replaced by rename {} (fresh {}, with a snapshot interval {}); sidecar \
             immutable {} / full {} (walsync logged {} ENOSPC/EPERM errors); slow S3 periods {}; \
             clock stepped back {} (generations started under it {})",
            self.replacements,
            self.fresh_replacements,
            self.replacements_snapshot_due,
            self.sidecar_frozen,
            self.sidecar_full,
            self.sidecar_errors_logged,
            self.slow_s3,
            self.clock_steps,
            self.clock_step_generations
        );
        let _ = writeln!(
            s,
            "host rolled back with its sidecar {}; data directory copied and the copy refused {} \
             (not tried {}: no state.json yet); walsync started with storage down {}; rounds on \
             a filesystem with whole-second times {}; walsync started with the clock ahead {}",
            self.rollbacks,
            self.copies_refused,
            self.copies_skipped,
            self.starts_storage_down,
            self.coarse_rounds,
            self.clock_ahead
        );
        let _ = writeln!(
            s,
            "chain: {} links checked in {} generations, {} duplicate indexes",
            self.chain_links, self.chain_generations, self.chain_duplicates
        );
        let mean = if self.pitr_checks > 0 {
            self.pitr_lag_sum as f64 / self.pitr_checks as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "restores checked: latest {}, point-in-time {} (exactly the newest commit {}, lag mean {mean:.2} max {} commits; {} after a clock step checked as a recorded state only; {} times before the first snapshot skipped)",
            self.latest_checks,
            self.pitr_checks,
            self.pitr_exact,
            self.pitr_max_lag,
            self.pitr_clock_relaxed,
            self.pitr_too_early
        );
        for note in &self.skipped {
            let _ = writeln!(s, "SKIPPED {note}");
        }
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

/// `chattr +i` on some directories until dropped (also on a panic or an early return).
struct Frozen {
    dirs: Vec<PathBuf>,
}

impl Frozen {
    /// Freeze `dirs` in order; on failure, unfreezes what was frozen and says why.
    fn freeze(dirs: Vec<PathBuf>) -> Result<Frozen, String> {
        let mut frozen = Frozen { dirs: Vec::new() };
        for dir in dirs {
            chattr("+i", &dir)?;
            frozen.dirs.push(dir);
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            let _ = chattr("-i", dir);
        }
    }
}

fn chattr(flag: &str, dir: &Path) -> Result<(), String> {
    let output = Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .output()
        .map_err(|e| format!("running chattr: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chattr {flag} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// An ext4 filesystem with 128-byte inodes (file times in whole seconds, as on ext3, HFS+,
/// FAT or NFS on those), loop-mounted on a directory until dropped: then its content is
/// copied to `<dir>.kept` (a kept round shows the database as it was) and the image removed.
struct CoarseFilesystem {
    dir: PathBuf,
    image: PathBuf,
}

impl CoarseFilesystem {
    fn mount(image: &Path, dir: &Path) -> Result<CoarseFilesystem, String> {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        File::create(image)
            .and_then(|f| f.set_len(512 << 20))
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let mounted = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-I", "128"])
            .arg(image))
        .and_then(|()| {
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(dir))
        });
        if let Err(e) = mounted {
            let _ = std::fs::remove_file(image);
            return Err(e);
        }
        Ok(CoarseFilesystem {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
        })
    }
}

impl Drop for CoarseFilesystem {
    fn drop(&mut self) {
        let _ = copy_tree(&self.dir, &self.dir.with_extension("kept"));
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A tmpfs mounted on a directory until dropped: then its content is copied to a plain
/// directory of the same name (a kept round shows the sidecar as it was).
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn mount(dir: &Path, bytes: u64) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let options = CString::new(format!("size={bytes},mode=0755")).map_err(|e| e.to_string())?;
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(TmpfsMount {
            dir: dir.to_path_buf(),
        })
    }

    /// Fill the filesystem with `file` until writes fail with ENOSPC.
    fn fill(&self, file: &Path) -> Result<u64, String> {
        use std::io::Write as _;
        let mut out =
            File::create(file).map_err(|e| format!("creating {}: {e}", file.display()))?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match out.write(&chunk) {
                Ok(0) => return Err("filling the tmpfs: wrote nothing".into()),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(written),
                Err(e) => return Err(format!("filling the tmpfs: {e}")),
            }
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let copy = self.dir.with_extension("tmpfs-copy");
        let _ = copy_tree(&self.dir, &copy);
        let target = CString::new(self.dir.as_os_str().as_encoded_bytes());
        if let Ok(target) = target {
            // SAFETY: umount2(2) on a path we mounted; a lazy unmount if something (a
            // walsync we failed to reap) still uses it.
            unsafe {
                if libc::umount2(target.as_ptr(), 0) != 0 {
                    libc::umount2(target.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        if std::fs::remove_dir(&self.dir).is_ok() {
            let _ = std::fs::rename(&copy, &self.dir);
        }
    }
}

/// Where libfaketime is, if installed (Debian: package `faketime`).
pub fn find_libfaketime() -> Option<PathBuf> {
    let listed = Command::new("dpkg")
        .args(["-L", "libfaketime"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .map(PathBuf::from)
        .chain(
            [
                "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                "/usr/lib/faketime/libfaketime.so.1",
                "/usr/local/lib/faketime/libfaketime.so.1",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.file_name().is_some_and(|n| n == "libfaketime.so.1") && p.exists())
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

/// Files as a VM or filesystem snapshot keeps them: bytes and modification times, put back
/// in place (the same inode where the file still exists).
struct DiskImage {
    /// Each file's bytes and modification time, or None if it did not exist.
    files: Vec<(PathBuf, Option<FileContent>)>,
    /// Directories whose whole content is put back (files they hold now and did not then
    /// are removed).
    trees: Vec<PathBuf>,
}

impl DiskImage {
    fn take(files: &[PathBuf], tree: &Path) -> Result<DiskImage, String> {
        let mut image = DiskImage {
            files: Vec::new(),
            trees: vec![tree.to_path_buf()],
        };
        let mut all: Vec<PathBuf> = files.to_vec();
        all.extend(files_under(tree)?);
        for path in all {
            let read = || -> std::io::Result<FileContent> {
                let bytes = std::fs::read(&path)?;
                Ok((bytes, std::fs::metadata(&path)?.modified()?))
            };
            match read() {
                Ok(content) => image.files.push((path, Some(content))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    image.files.push((path, None))
                }
                Err(e) => return Err(format!("imaging {}: {e}", path.display())),
            }
        }
        Ok(image)
    }

    fn put_back(&self) -> Result<(), String> {
        let kept: std::collections::HashSet<&PathBuf> = self
            .files
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| p)
            .collect();
        let fail = |p: &Path, e: std::io::Error| format!("rolling back {}: {e}", p.display());
        for tree in &self.trees {
            for path in files_under(tree)? {
                if !kept.contains(&path) {
                    std::fs::remove_file(&path).map_err(|e| fail(&path, e))?;
                }
            }
        }
        for (path, content) in &self.files {
            match content {
                Some((bytes, modified)) => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
                    }
                    std::fs::write(path, bytes).map_err(|e| fail(path, e))?;
                    File::options()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_modified(*modified))
                        .map_err(|e| fail(path, e))?;
                }
                None => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(fail(path, e))
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }
}

type FileContent = (Vec<u8>, std::time::SystemTime);

/// Every file under `dir` (recursively); none if it does not exist.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading {}: {e}", d.display())),
        };
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
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
    fn new(config: &'a Config, round: u64, dir: &Path) -> Round<'a> {
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
            server_up: true,
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
        self.server_up = up;
    }

    fn play(&mut self, totals: &mut Totals) -> Result<(), String> {
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

    /// Stop walsync (SIGTERM or SIGKILL) while the application commits; then the
    /// application closes every connection (the last close checkpoints the WAL into the
    /// database file and deletes it: the writer thread really closes its connection and
    /// reopens it afterwards) or runs `PRAGMA wal_checkpoint(TRUNCATE)`; it commits a little
    /// more, and walsync starts again (after a TRUNCATE, in `p == 1` rounds, under a
    /// stepped-back clock).
    ///
    /// Hunts restarts that trust a saved tip the WAL no longer backs: commits that went
    /// into the database file while nobody watched must start a new generation (or be
    /// proven absent), never be skipped, and no index may be cut again from a WAL that was
    /// rewritten (a fork in the chain).
    fn chaos_stop_then_app_rewrites_wal(
        &mut self,
        stop: Stop,
        app: AppAction,
        writer: &Writer,
        totals: &mut Totals,
    ) -> Result<(), String> {
        sleep_ms(self.rng.range(50, 300));
        match stop {
            Stop::Term => {
                totals.stops_sigterm += 1;
                if self.watch.is_some() {
                    self.wait_until_watching(totals)?;
                    match self.terminate()? {
                        Some(status) if status.success() => {}
                        outcome => totals.failures.push(format!(
                            "round {}: SIGTERM while the application commits: walsync {}; see {}",
                            self.round,
                            match outcome {
                                Some(status) => format!("exited with {status}"),
                                None => "did not exit within 90 s".to_string(),
                            },
                            self.log.display()
                        )),
                    }
                }
            }
            Stop::Kill => {
                totals.stops_sigkill += 1;
                totals.kills += 1;
                self.kill_watch();
            }
        }
        // The writer keeps committing while nobody watches.
        sleep_ms(self.rng.range(20, 200));
        match app {
            AppAction::CloseAll => {
                totals.app_closes += 1;
                let paused = writer.pause()?;
                self.checkpointer = None;
                if !with_suffix(&self.db, "-wal").exists() {
                    totals.wal_deleted += 1;
                }
                drop(paused);
                self.checkpointer = Some(open_checkpointer(&self.db)?);
            }
            AppAction::Truncate => {
                // The writer holds the write lock for a moment now and then: try again.
                for _ in 0..50 {
                    if self.app_checkpoint("TRUNCATE")? {
                        totals.app_truncates += 1;
                        break;
                    }
                    sleep_ms(10);
                }
            }
        }
        // More commits into the rewritten (or new) WAL before walsync looks again.
        sleep_ms(self.rng.range(50, 300));
        if app == AppAction::Truncate && !self.plan.clock_step_after_replacement {
            self.start_next_under_stepped_clock(totals);
        }
        self.start_watch(totals)?;
        self.let_stepped_clock_start_generation(totals)
    }

    /// Replace the database by rename while walsync watches it: a changed copy of it
    /// (`VACUUM INTO`, then more changes) or a fresh database, prepared aside. The
    /// application closes its connections, removes the old `-wal` and `-shm` (as an
    /// application swapping files does) and renames the new file into place, then reopens
    /// it; the recorded states continue from the new file's. In rounds with a short
    /// `--snapshot-interval` the application stays quiet past the interval first, so that a
    /// snapshot is due at the swap. In `p == 0` rounds walsync is SIGKILLed right after the
    /// rename and started under a stepped-back clock.
    ///
    /// Hunts: the new file's pages filed under the old generation (a restore mixing two
    /// databases), a due snapshot taken through the old file's pinned connection, the old
    /// WAL's frames shipped against the new file, and (with the clock step) a new generation
    /// sorting before the old one.
    fn chaos_replace_database(
        &mut self,
        writer: &Writer,
        totals: &mut Totals,
    ) -> Result<(), String> {
        // Beside the database: a rename does not cross filesystems.
        let replacement = self
            .db
            .with_file_name(format!("replacement-{}.db", totals.replacements));
        let fresh = self.plan.fresh_replacement;
        prepare_replacement(&self.db, &replacement, fresh, &mut self.rng)?;
        let paused = writer.pause()?;
        self.checkpointer = None;
        if let Some(interval) = self.plan.snapshot_interval {
            let ms = (interval * 1000.0) as u64;
            sleep_ms(self.rng.range(ms, ms + 300));
            totals.replacements_snapshot_due += 1;
        }
        for suffix in ["-wal", "-shm"] {
            match std::fs::remove_file(with_suffix(&self.db, suffix)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing the old {suffix}: {e}")),
            }
        }
        std::fs::rename(&replacement, &self.db)
            .map_err(|e| format!("renaming the replacement: {e}"))?;
        totals.replacements += 1;
        if fresh {
            totals.fresh_replacements += 1;
        }
        if self.plan.clock_step_after_replacement {
            self.kill_watch();
            totals.kills += 1;
            self.start_next_under_stepped_clock(totals);
            self.start_watch(totals)?;
            self.let_stepped_clock_start_generation(totals)?;
        }
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        Ok(())
    }

    /// Roll the host back, as restoring a VM or filesystem snapshot does: walsync and the
    /// application stopped as by a power cut, an image of the database, its WAL, its
    /// `-shm` and the sidecar taken; then more commits, replicated for a second or two; then
    /// everything stopped again and the image put back in place (same inodes, the old
    /// modification times), while storage keeps what was uploaded meanwhile. The
    /// application reopens the rolled-back database (its state is recorded as a switch) and
    /// walsync starts on it with its clock ahead (`p == 0`) or behind (`p == 1`).
    ///
    /// Hunts: indexes cut again over the abandoned history (two histories in one
    /// generation, caught by the chain check), a new generation sorting before the
    /// abandoned one (the latest restore would be the abandoned future), and the name
    /// refused to its own host.
    fn chaos_rollback(&mut self, writer: &Writer, totals: &mut Totals) -> Result<(), String> {
        let paused = writer.pause()?;
        self.checkpointer = None;
        self.kill_watch();
        totals.kills += 1;
        let files = [
            self.db.clone(),
            with_suffix(&self.db, "-wal"),
            with_suffix(&self.db, "-shm"),
        ];
        let image = DiskImage::take(&files, &self.sidecar_root())?;
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        self.start_watch(totals)?;
        // The future that is undone.
        sleep_ms(self.rng.range(800, 2000));
        let paused = writer.pause()?;
        self.checkpointer = None;
        self.kill_watch();
        totals.kills += 1;
        image.put_back()?;
        totals.rollbacks += 1;
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        if self.plan.clock_step_after_replacement {
            self.start_next_with_clock_ahead(totals);
        } else {
            self.start_next_under_stepped_clock(totals);
        }
        self.start_watch(totals)?;
        self.let_stepped_clock_start_generation(totals)
    }

    /// Make the next walsync start run with its wall clock ahead (libfaketime), as a host
    /// whose clock runs fast. Its object times are later than its commits, which a
    /// point-in-time restore tolerates (it lags), and the labels must come back to the
    /// clock afterwards. The S3 server refuses requests signed more than 15 minutes off,
    /// so walsync must sign with the server's time.
    fn start_next_with_clock_ahead(&mut self, totals: &mut Totals) {
        if self.faketime.is_none() {
            totals.skip("clock ahead: libfaketime.so.1 not found (apt-get install faketime)");
            return;
        }
        self.next_start_clock = Some(format!("+{}m", self.rng.range(20, 50)));
        totals.clock_ahead += 1;
    }

    /// Copy the data directory as an operator would (`cp -a` of the database, its WAL and
    /// `-shm`, and the sidecar, while everything runs) and watch the copy with the same
    /// destination and name: walsync must refuse it at start (its saved position belongs
    /// to the original; `state.json` names the original) before uploading anything, while
    /// the original goes on (the final restores check that it still owns the name).
    ///
    /// Hunts: a copy that takes the name over (a newer generation of staging data, the
    /// original refused at its next start).
    fn chaos_copy(&mut self, totals: &mut Totals) -> Result<(), String> {
        // Only a state.json naming the original tells the copy apart (walsync writes it
        // after each stored snapshot); under heavy faults there may be none yet.
        // Storage must answer the copy's walsync (below) for a refusal to be possible.
        self.set_server(true);
        let storage = self.server.storage(PREFIX);
        let deadline = Instant::now() + Duration::from_secs(15);
        while storage
            .get(&format!("{NAME}/state.json"), &mut Vec::new())
            .is_err()
        {
            if Instant::now() > deadline {
                totals.copies_skipped += 1;
                return Ok(());
            }
            sleep_ms(200);
        }
        let copy_dir = self.dir.join(format!("copy-{}", totals.copies_refused));
        std::fs::create_dir(&copy_dir)
            .map_err(|e| format!("creating the copy's directory: {e}"))?;
        let mut sources: Vec<PathBuf> = vec![self.db.clone(), self.sidecar_root()];
        sources.extend(
            ["-wal", "-shm"]
                .map(|s| with_suffix(&self.db, s))
                .into_iter()
                .filter(|p| p.exists()),
        );
        let copied = Command::new("cp")
            .arg("-a")
            .args(&sources)
            .arg(&copy_dir)
            .status()
            .map_err(|e| format!("cp -a: {e}"))?;
        if !copied.success() {
            // A file vanished under cp (the WAL deleted by a close): try again next time.
            totals.copies_skipped += 1;
            let _ = std::fs::remove_dir_all(&copy_dir);
            return Ok(());
        }
        let copy = copy_dir.join(NAME).with_extension("db");
        let dest = self.dest();
        // Straight to the server, not through the fault proxy: the refusal needs an answer.
        let mut cmd = self.command(&["watch", &copy.to_string_lossy(), "-b", &dest]);
        let mut child = cmd
            .envs(self.server.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting walsync on the copy: {e}"))?;
        let status = wait_at_most(&mut child, Duration::from_secs(30))?;
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let _ = std::fs::remove_dir_all(&copy_dir);
        match status {
            Some(status) if !status.success() && stderr.contains("another walsync writes") => {
                totals.copies_refused += 1;
            }
            outcome => totals.failures.push(format!(
                "round {}: a copy of the data directory watched under the same name was not \
                 refused ({}): {}",
                self.round,
                outcome.map_or("still running after 30 s".to_string(), |s| s.to_string()),
                stderr.lines().last().unwrap_or("")
            )),
        }
        Ok(())
    }

    /// Start walsync while storage is down (the network not up yet, the store restarting):
    /// it must start, stage locally and upload once storage is back, not exit (a restart
    /// loop under a supervisor).
    fn chaos_storage_down_at_start(&mut self, totals: &mut Totals) -> Result<(), String> {
        self.kill_watch();
        totals.kills += 1;
        self.set_server(false);
        self.start_watch(totals)?;
        totals.starts_storage_down += 1;
        sleep_ms(self.rng.range(2500, 4000));
        if let Some(child) = self.watch.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.watch = None;
                self.watch_gone();
                totals.failures.push(format!(
                    "round {}: walsync exited ({status}) when started with storage down; see {}",
                    self.round,
                    self.log.display()
                ));
                self.start_watch(totals)?;
            }
        }
        self.set_server(true);
        Ok(())
    }

    /// Make the sidecar unwritable for a while, with a SIGKILL and a restart in between:
    /// immutable (`chattr +i` on `.app.db-walsync/` and the replica's directory: nothing can
    /// be created, renamed or removed there) in `p == 0` rounds, full (the round's tmpfs
    /// under it filled up: ENOSPC) in `p == 1` rounds. Always undone, also on a panic.
    ///
    /// Hunts: a tip saved past what is really staged, an object uploaded whose staging
    /// failed (or a staged object dropped before it is stored), a checkpoint over frames
    /// that are not staged, and a walsync that exits, spins or blocks the application
    /// instead of waiting loudly and resuming when the disk recovers, also across a restart.
    fn chaos_sidecar_fault(&mut self, totals: &mut Totals) -> Result<(), String> {
        let root = self.sidecar_root();
        let filler = root.join("filler");
        match self.plan.sidecar {
            SidecarFault::Immutable => {
                let mut dirs = vec![root.clone()];
                if let Ok(entries) = std::fs::read_dir(&root) {
                    dirs.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
                match Frozen::freeze(dirs) {
                    Ok(frozen) => self.frozen = Some(frozen),
                    Err(e) => {
                        totals.skip(&format!("sidecar made immutable: {e}"));
                        return Ok(());
                    }
                }
                totals.sidecar_frozen += 1;
            }
            SidecarFault::Full => {
                let Some(tmpfs) = &self.tmpfs else {
                    return Ok(()); // skipped, said when the mount failed
                };
                tmpfs.fill(&filler)?;
                totals.sidecar_full += 1;
            }
        }
        sleep_ms(self.rng.range(200, 700));
        self.kill_watch();
        totals.kills += 1;
        sleep_ms(self.rng.range(0, 300));
        self.start_watch(totals)?;
        sleep_ms(self.rng.range(200, 700));
        self.frozen = None;
        match std::fs::remove_file(&filler) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", filler.display())),
        }
        Ok(())
    }

    /// A slow S3: every request held by the proxy for 0.5-1.8 s (or 3 s, past
    /// `--s3-timeout`, so that requests time out and are retried) for 1.5-2.5 s, while the
    /// application commits.
    ///
    /// Hunts the write lock held across network I/O (Litestream #724, #1332): the
    /// application's commits would wait on S3, and with its 5 s busy timeout fail with
    /// SQLITE_BUSY, which fails the round (the slowest commit is reported too); and
    /// uploads that time out and are then lost or stored twice.
    fn chaos_slow_s3(&mut self, totals: &mut Totals) {
        let delay = if self.rng.chance(0.3) {
            3000
        } else {
            self.rng.range(500, 1800)
        };
        self.proxy.set_delay(Duration::from_millis(delay));
        totals.slow_s3 += 1;
        sleep_ms(self.rng.range(1500, 2500));
        self.proxy.set_delay(Duration::ZERO);
    }

    /// Make the next walsync start run under a wall clock stepped back by the plan's offset
    /// (libfaketime), right after a change that forces a new generation (a replacement, or
    /// a stop followed by the application's TRUNCATE). Points in time from then on are only
    /// checked to be some recorded state (object times cannot say when their commits
    /// happened while the clock is wrong); the latest restore must still be the newest state.
    ///
    /// Hunts generations and objects named by a clock that went back: a generation that
    /// sorts before older ones would make the latest restore silently pick an old history.
    fn start_next_under_stepped_clock(&mut self, totals: &mut Totals) {
        if self.faketime.is_none() {
            totals
                .skip("clock stepped back: libfaketime.so.1 not found (apt-get install faketime)");
            return;
        }
        // Objects of a walsync under the stepped clock are named just after the newest
        // object staged so far (walsync holds object times through a step back of up to an
        // hour), or by the stepped clock itself after a larger step back (a clock that ran
        // ahead before, see `Replica::next_time`): from then on, object times no longer
        // bound commit times.
        let staged_until = self.staged_until().unwrap_or(UtcTime::from_millis(0));
        let minutes: i64 = self
            .plan
            .clock_step
            .trim_start_matches('-')
            .trim_end_matches('m')
            .parse()
            .unwrap_or(0);
        let stepped_now = UtcTime::from_millis(UtcTime::now().millis() - minutes * 60_000);
        let labels_follow_the_clock = staged_until.millis() - stepped_now.millis() > 3_600_000;
        let from = if labels_follow_the_clock {
            stepped_now
        } else {
            staged_until
        };
        if self.clock_stepped_at.is_none_or(|t| from < t) {
            self.clock_stepped_at = Some(from);
        }
        self.next_start_clock = Some(self.plan.clock_step.clone());
    }

    /// If the current walsync runs under a stepped clock, give it (10 s at most) the time
    /// to start its generation, so that the next chaos does not kill it first.
    fn let_stepped_clock_start_generation(&mut self, totals: &mut Totals) -> Result<(), String> {
        if !self.clock_stepped_watch {
            return Ok(());
        }
        self.wait_until_watching(totals)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.watch.is_some() {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let ours = log.get(self.log_start as usize..).unwrap_or_default();
            if String::from_utf8_lossy(ours).contains(" generation") {
                break;
            }
            sleep_ms(20);
        }
        Ok(())
    }

    /// The time of the newest object staged so far (`time_ms` in the sidecar's
    /// `position.json`; see `src/replica/position.rs`).
    fn staged_until(&self) -> Option<UtcTime> {
        for entry in std::fs::read_dir(self.sidecar_root()).ok()?.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("position.json")) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text).ok()?;
            return value["time_ms"].as_i64().map(UtcTime::from_millis);
        }
        None
    }

    /// From walsync's log: the errors the sidecar faults caused, and the generations
    /// started by walsyncs under a stepped clock (in their parts of the log).
    fn scan_log(&mut self, totals: &mut Totals) {
        let log = std::fs::read(&self.log).unwrap_or_default();
        totals.sidecar_errors_logged += String::from_utf8_lossy(&log)
            .lines()
            .filter(|l| {
                l.contains("No space left on device") || l.contains("Operation not permitted")
            })
            .count() as u64;
        for &(from, to) in &self.clock_stepped_logs {
            let part = log
                .get(from as usize..(to as usize).min(log.len()))
                .unwrap_or_default();
            totals.clock_step_generations += String::from_utf8_lossy(part)
                .lines()
                .filter(|l| {
                    l.contains("starting a new generation")
                        || l.contains("starting the first generation")
                })
                .count() as u64;
        }
    }

    /// Download every stored object of every generation and check the chain (see
    /// `src/segment.rs`): each segment's WAL header salts must equal the chain value after
    /// the index before it (the generation id read as two hex words for index 1), and each
    /// snapshot's gzip comment must be the chain value at its index. A duplicate index
    /// passes only if exactly one of the duplicates chains onward (at the end of a
    /// generation: only if they all end at the same value).
    ///
    /// Hunts two histories in one generation (an index cut again after a restart, a
    /// replaced file's frames shipped under the old generation, a gap), which a restore
    /// must refuse and a restore by hand would apply.
    fn check_chain(&self, totals: &mut Totals) -> Result<(), String> {
        let storage = self.server.storage(PREFIX);
        let listing = storage
            .list(&format!("{NAME}/"))
            .map_err(|e| format!("listing the bucket: {e}"))?;
        let catalog = Catalog::from_listing(listing);
        let generations = catalog
            .databases
            .get(NAME)
            .ok_or("no replica in the bucket")?;
        for (generation, objects) in generations {
            totals.chain_generations += 1;
            if let Err(e) = check_generation_chain(&storage, generation, objects, totals) {
                totals.failures.push(format!(
                    "round {}: chain of generation {generation}: {e}",
                    self.round
                ));
            }
        }
        Ok(())
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
            if self.clock_stepped_at.is_some_and(|s| at >= s) {
                // Object times after the clock step do not bound commit times.
                totals.pitr_clock_relaxed += 1;
                if !by_digest.contains_key(&d) {
                    totals.failures.push(format!(
                        "round {round}: (b) restore at {at} (after the clock step) is no recorded state (a partial transaction, or corrupt)"
                    ));
                }
                continue;
            }
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
    /// Commits that failed with SQLITE_BUSY, and what each said (the first few).
    busy: u64,
    busy_failures: Vec<String>,
    slowest: Duration,
    slowest_at: Option<UtcTime>,
    /// States recorded at a reopen because the file changed under the closed connection
    /// (a replacement), not by a commit.
    switches: u64,
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

/// The application: commits random transactions on its own thread and records each.
struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<Commit>>>,
    control: mpsc::Sender<PauseRequest>,
    thread: Option<std::thread::JoinHandle<Result<WriterStats, String>>>,
}

/// Asks the writer to close its connection (see [`Writer::pause`]).
struct PauseRequest {
    closed: mpsc::SyncSender<()>,
    resume: mpsc::Receiver<()>,
}

/// The writer's connection is closed until this is dropped.
struct Paused {
    _resume: mpsc::Sender<()>,
}

/// The application's connection: a 5 s busy timeout, as an application sharing its
/// database with walsync should set (see DESIGN.md); a commit that still fails with
/// SQLITE_BUSY means walsync held the write lock for seconds.
fn open_app(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("opening the database: {e}"))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The application's second connection, for checkpoints: a short busy timeout, so that a
/// checkpoint never holds the write lock long against the writer.
fn open_checkpointer(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("opening the database: {e}"))?;
    conn.busy_timeout(Duration::from_millis(100))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// `path` with `suffix` appended (`app.db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Keep the blobs (and so the database) to a few MiB.
const BLOB_BUDGET: i64 = 5 * 1024 * 1024;

impl Writer {
    fn start(path: &Path, mut rng: Rng) -> Result<Writer, String> {
        let conn = open_app(path)?;
        let path = path.to_path_buf();
        let first = UtcTime::now();
        let d0 = digest(&conn).map_err(|e| e.to_string())?;
        let commits = Arc::new(Mutex::new(vec![Commit {
            start: first,
            end: first,
            digest: d0,
        }]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&commits));
        let (control, requests) = mpsc::channel::<PauseRequest>();
        let thread = std::thread::spawn(move || {
            let mut stats = WriterStats::default();
            let mut next_table = 0u64;
            let mut conn = conn;
            while !s.load(Ordering::Relaxed) {
                if let Ok(request) = requests.try_recv() {
                    // Really close the connection (the last close checkpoints and deletes
                    // the WAL), wait, and reopen whatever file is at the path now.
                    let paused_at = UtcTime::now();
                    drop(conn);
                    let _ = request.closed.send(());
                    let _ = request.resume.recv();
                    conn = open_app(&path)?;
                    let d = digest(&conn).map_err(|e| format!("writer digest: {e}"))?;
                    if let Ok(mut list) = c.lock() {
                        if list.last().is_some_and(|l| l.digest != d) {
                            stats.switches += 1;
                            list.push(Commit {
                                start: paused_at,
                                end: UtcTime::now(),
                                digest: d,
                            });
                        }
                    }
                    continue;
                }
                let start = UtcTime::now();
                let t0 = Instant::now();
                match one_transaction(&conn, &mut rng, &mut stats, &mut next_table) {
                    Ok(()) => {}
                    Err(e) if is_busy(&e) => {
                        // Not retried silently: the round fails (see `play`).
                        stats.busy += 1;
                        if stats.busy_failures.len() < 3 {
                            stats
                                .busy_failures
                                .push(format!("after {} ms: {e}", t0.elapsed().as_millis()));
                        }
                        continue;
                    }
                    Err(e) => return Err(format!("writer: {e}")),
                }
                let end = UtcTime::now();
                if t0.elapsed() > stats.slowest {
                    stats.slowest = t0.elapsed();
                    stats.slowest_at = Some(start);
                }
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
            control,
            thread: Some(thread),
        })
    }

    /// Close the writer's connection (after its current transaction) until the returned
    /// guard is dropped; then it reopens the path and, if the content changed meanwhile (a
    /// replacement), records the new state.
    fn pause(&self) -> Result<Paused, String> {
        let (closed, closed_rx) = mpsc::sync_channel(1);
        let (resume_tx, resume) = mpsc::channel();
        self.control
            .send(PauseRequest { closed, resume })
            .map_err(|_| "the writer has stopped".to_string())?;
        closed_rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the writer did not close its connection (has it failed?)".to_string())?;
        Ok(Paused { _resume: resume_tx })
    }

    fn stop(mut self) -> Result<(Vec<Commit>, WriterStats), String> {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self
            .thread
            .take()
            .ok_or("the writer was already stopped")?
            .join()
            .map_err(|_| "the writer thread panicked".to_string())??;
        let commits = self.commits.lock().map_err(|e| e.to_string())?.clone();
        Ok((commits, stats))
    }
}

impl Drop for Writer {
    /// On an early return, the writer stops too (its thread is not waited for).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A replacement for the database at `db`, written at `out` with no WAL beside it (WAL
/// mode): a copy of its current content (`VACUUM INTO`) or a fresh database, either way
/// with a marker row and the counter moved on, so its state differs from every recorded
/// one.
fn prepare_replacement(db: &Path, out: &Path, fresh: bool, rng: &mut Rng) -> Result<(), String> {
    let fail = |e: rusqlite::Error| format!("preparing the replacement: {e}");
    if fresh {
        create_database(out, true).map_err(fail)?;
    } else {
        let source = open_app(db)?;
        source
            .execute("VACUUM INTO ?1", [out.to_string_lossy()])
            .map_err(fail)?;
    }
    let conn = Connection::open(out).map_err(fail)?;
    conn.execute_batch("PRAGMA journal_mode=WAL")
        .map_err(fail)?;
    conn.execute(
        "INSERT INTO items(label, n) VALUES (?1, ?2)",
        params![
            format!("replacement {}", rng.next()),
            rng.below(1000) as i64
        ],
    )
    .map_err(fail)?;
    conn.execute("UPDATE meta SET n = n + 1000 WHERE k = 1", [])
        .map_err(fail)?;
    // The last close checkpoints and removes the replacement's own WAL.
    drop(conn);
    Ok(())
}

/// Size of the tmpfs under the sidecar in rounds that fill it: room for the staged
/// objects of an outage and a snapshot's scratch copy.
const SIDECAR_TMPFS_BYTES: u64 = 256 << 20;

fn download(storage: &dyn Storage, key: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    storage
        .get(key, &mut body)
        .map_err(|e| format!("downloading {key}: {e}"))?;
    Ok(body)
}

/// A segment's WAL header salts and the chain value after it (its last frame's cumulative
/// checksum), from the gunzipped segment.
fn segment_chain(wal: &[u8]) -> Option<(ChainValue, ChainValue)> {
    let word = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = wal.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    };
    let frame = 24 + word(8)? as usize;
    let body = wal.len().checked_sub(32)?;
    if body == 0 || !body.is_multiple_of(frame) {
        return None;
    }
    let last = 32 + body - frame;
    Some((
        ChainValue([word(16)?, word(20)?]),
        ChainValue([word(last + 16)?, word(last + 20)?]),
    ))
}

/// The chain of one generation (see [`Round::check_chain`]).
fn check_generation_chain(
    storage: &dyn Storage,
    generation: &Generation,
    objects: &GenerationObjects,
    totals: &mut Totals,
) -> Result<(), String> {
    // Segments by index: key, salts, chain value after it (four downloads at a time).
    let links: Vec<Result<(ChainValue, ChainValue), String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                scope.spawn(move || {
                    objects
                        .segments
                        .iter()
                        .skip(w)
                        .step_by(4)
                        .map(|segment| {
                            let mut wal = Vec::new();
                            flate2::read::GzDecoder::new(
                                download(storage, &segment.key)?.as_slice(),
                            )
                            .read_to_end(&mut wal)
                            .map_err(|e| format!("gunzipping {}: {e}", segment.key))?;
                            segment_chain(&wal).ok_or_else(|| {
                                format!("{} is not a WAL file with whole frames", segment.key)
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut results: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default().into_iter())
            .collect();
        (0..objects.segments.len())
            .map(|i| {
                results[i % 4]
                    .next()
                    .unwrap_or_else(|| Err("a download thread panicked".into()))
            })
            .collect()
    });
    let mut by_index: BTreeMap<u64, Vec<(String, ChainValue, ChainValue)>> = BTreeMap::new();
    for (segment, link) in objects.segments.iter().zip(links) {
        let (salts, after) = link?;
        by_index
            .entry(segment.name.index)
            .or_default()
            .push((segment.key.clone(), salts, after));
    }
    let last = by_index.keys().next_back().copied().unwrap_or(0);
    let mut value = ChainValue::of_generation(generation);
    let mut after_index = BTreeMap::from([(0u64, value)]);
    for index in 1..=last {
        let candidates = by_index
            .get(&index)
            .ok_or_else(|| format!("index {index} is missing (segments go up to {last})"))?;
        if let Some((key, salts, _)) = candidates.iter().find(|c| c.1 != value) {
            return Err(format!(
                "{key} does not continue the chain: its salts are {salts}, the value after index {} is {value}",
                index - 1
            ));
        }
        totals.chain_links += 1;
        value = if let [(_, _, after)] = candidates.as_slice() {
            *after
        } else {
            totals.chain_duplicates += candidates.len() as u64 - 1;
            let keys: Vec<&str> = candidates.iter().map(|c| c.0.as_str()).collect();
            let next: Vec<ChainValue> = by_index
                .get(&(index + 1))
                .map(|n| n.iter().map(|c| c.1).collect())
                .unwrap_or_default();
            let onward: Vec<ChainValue> = candidates
                .iter()
                .map(|c| c.2)
                .filter(|after| next.contains(after))
                .collect();
            if index == last {
                if candidates.iter().any(|c| c.2 != candidates[0].2) {
                    return Err(format!(
                        "the last index {index} is stored {} times, ending at different values: {keys:?}",
                        candidates.len()
                    ));
                }
                candidates[0].2
            } else if let [after] = onward.as_slice() {
                *after
            } else {
                return Err(format!(
                    "index {index} is stored {} times and {} of them chain onward: {keys:?}",
                    candidates.len(),
                    onward.len()
                ));
            }
        };
        after_index.insert(index, value);
    }
    if !objects.segments.is_empty() && !objects.snapshots.iter().any(|s| s.name.index == 0) {
        return Err("segments but no base snapshot (index 0)".into());
    }
    for snapshot in &objects.snapshots {
        let body = download(storage, &snapshot.key)?;
        let mut decoder = flate2::read::GzDecoder::new(body.as_slice());
        // The header is parsed on the first read.
        let _ = decoder.read(&mut [0u8; 1]);
        let comment = decoder
            .header()
            .and_then(|h| h.comment())
            .unwrap_or_default();
        let chain = ChainValue::parse_comment(comment).ok_or_else(|| {
            format!(
                "{} has no walsync-chain comment ({:?})",
                snapshot.key,
                String::from_utf8_lossy(comment)
            )
        })?;
        let expected = after_index.get(&snapshot.name.index).ok_or_else(|| {
            format!(
                "{} is at index {} but segment {} is not stored",
                snapshot.key, snapshot.name.index, snapshot.name.index
            )
        })?;
        if chain != *expected {
            return Err(format!(
                "{} carries chain value {chain}, the value at its index is {expected}",
                snapshot.key
            ));
        }
        totals.chain_links += 1;
    }
    Ok(())
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
