//! A short run of the crash-and-fault torture harness (`scripts/torture.sh` runs long ones):
//! two rounds of random transactions while walsync is SIGKILLed and restarted, the
//! application checkpoints in every mode, the S3 server stops and restarts, and it and a
//! proxy inject faults; walsync is stopped (SIGTERM and SIGKILL) while the application then
//! closes every connection or truncates the WAL, the database is replaced by rename (also
//! with a snapshot due), the sidecar is made immutable or its disk full, S3 is slow, the
//! clock steps back, the host is rolled back with its sidecar, the data directory is copied
//! and the copy watched under the same name, and walsync starts with storage down; each round
//! ends with a clean SIGTERM, a check of the whole chain and checked restores.

use std::time::Duration;

use crate::common::fixtures::WALSYNC;
use crate::common::root::say_skipped;
use walsync_testkit::torture::{self, Config};

#[test]
fn two_short_torture_rounds_lose_nothing() {
    let mut config = Config::new(WALSYNC.into(), 20_240_601, 2);
    config.round_time = Duration::from_secs(5);
    let totals = torture::run(&config);
    // Chaos this machine cannot play (without root: chattr, mount; without libfaketime:
    // the clock) is left out of the rounds, and said here, where a passing run shows it.
    for note in &totals.skipped {
        say_skipped(note);
    }
    assert!(
        totals.failures.is_empty(),
        "torture found problems:\n{}",
        totals.summary()
    );
    // Every round plays every kind of chaos at least once, and two consecutive rounds play
    // every variant; make sure it really happened, so that this test cannot pass by doing
    // nothing.
    assert_eq!(totals.rounds, 2);
    assert!(totals.kills >= 2, "{}", totals.summary());
    assert!(
        totals.checkpoints.iter().all(|&n| n >= 2),
        "{}",
        totals.summary()
    );
    assert!(totals.server_pauses >= 2, "{}", totals.summary());
    assert!(totals.fault_switches >= 2, "{}", totals.summary());
    assert_eq!(totals.sigterm_exits_ok, 2, "{}", totals.summary());
    assert_eq!(totals.latest_checks, 2, "{}", totals.summary());
    assert!(totals.pitr_checks >= 6, "{}", totals.summary());
    assert!(totals.commits >= 50, "{}", totals.summary());
    assert!(totals.faults.injected() > 0, "{}", totals.summary());

    // The lifecycle chaos.
    let at_least = |n: u64, what: &str| assert!(n >= 1, "no {what}:\n{}", totals.summary());
    at_least(
        totals.stops_sigterm,
        "SIGTERM stop while the application commits",
    );
    at_least(
        totals.stops_sigkill,
        "SIGKILL stop while the application commits",
    );
    at_least(totals.app_closes, "application closing every connection");
    at_least(totals.wal_deleted, "WAL deleted by the last close");
    at_least(
        totals.app_truncates,
        "application TRUNCATE while walsync was stopped",
    );
    at_least(totals.replacements, "replacement by rename");
    at_least(
        totals.replacements_snapshot_due,
        "replacement with a short snapshot interval",
    );
    at_least(totals.slow_s3, "slow S3 period");
    at_least(totals.rollbacks, "rollback of the host with its sidecar");
    at_least(
        totals.copies_refused,
        "copy of the data directory refused the name",
    );
    at_least(totals.starts_storage_down, "start with storage down");
    at_least(totals.chain_links, "chain link checked");
    assert!(
        totals.chain_generations >= 2,
        "the replacements started no generation:\n{}",
        totals.summary()
    );
    // These need root (chattr, mount) or libfaketime: skipped with a note, said above.
    let skipped = |what: &str| totals.skipped.iter().any(|n| n.starts_with(what));
    let unless_skipped = |n: u64, what: &str, note: &str| {
        if !skipped(note) {
            at_least(n, what);
        }
    };
    unless_skipped(
        totals.sidecar_frozen,
        "immutable sidecar",
        "sidecar made immutable",
    );
    unless_skipped(
        totals.sidecar_full,
        "full sidecar",
        "sidecar filesystem full",
    );
    unless_skipped(totals.clock_steps, "clock step", "clock stepped back");
    unless_skipped(
        totals.clock_ahead,
        "start with the clock ahead",
        "clock ahead",
    );
    unless_skipped(
        totals.coarse_rounds,
        "round on a filesystem with whole-second times",
        "filesystem with whole-second times",
    );
    unless_skipped(
        totals.clock_step_generations,
        "generation started under a stepped clock",
        "clock stepped back",
    );
}
