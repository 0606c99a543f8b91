//! A short run of the crash-and-fault torture harness (`scripts/torture.sh` runs long ones):
//! two rounds of random transactions while walsync is SIGKILLed and restarted, the
//! application checkpoints in every mode, the S3 server stops and restarts and a proxy
//! injects faults, each round ending with a clean SIGTERM and checked restores.

mod common;

use std::time::Duration;

use common::torture::{self, Config};

#[test]
fn two_short_torture_rounds_lose_nothing() {
    let mut config = Config::new(env!("CARGO_BIN_EXE_walsync").into(), 20_240_601, 2);
    config.round_time = Duration::from_secs(5);
    let totals = torture::run(&config);
    assert!(
        totals.failures.is_empty(),
        "torture found problems:\n{}",
        totals.summary()
    );
    // Every round plays every kind of chaos at least once; make sure it really happened, so
    // that this test cannot pass by doing nothing.
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
}
