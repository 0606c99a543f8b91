//! What the harness did and found, per round and in total: the counters a round fills in
//! as it plays, and the report (a line per round, a summary at the end) that `run` prints.
//! Apart because the report is long and read on its own, when a run's numbers look wrong.

use std::fmt::Write as _;
use std::time::Duration;

use crate::faults::FaultCounts;

#[cfg(doc)]
use super::round::Round;

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
    pub(super) fn add(&mut self, r: &Totals) {
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
