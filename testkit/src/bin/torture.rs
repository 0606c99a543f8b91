//! The crash-and-fault torture harness (issue 4); run it with `scripts/torture.sh`.
//!
//! ```text
//! torture --walsync PATH [--rounds N] [--seed S] [--round R] [--round-secs SECS]
//! ```
//!
//! `--round R` starts at round R (with `--rounds 1`, reruns exactly the round a failure
//! names). Exits 1 if any invariant was violated; the failing round's directory (database,
//! walsync's log, a copy of the bucket) is kept and printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use walsync_testkit::torture::{self, Config};

fn main() -> ExitCode {
    match parse(std::env::args().skip(1).collect()) {
        Ok(config) => {
            let totals = torture::run(&config);
            if totals.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("torture: {e}");
            eprintln!(
                "usage: torture --walsync PATH [--rounds N] [--seed S] [--round R] [--round-secs SECS]"
            );
            ExitCode::from(2)
        }
    }
}

fn parse(args: Vec<String>) -> Result<Config, String> {
    let mut walsync = None;
    let mut config = Config::new(PathBuf::new(), 1, 20);
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--walsync" => walsync = Some(PathBuf::from(value()?)),
            "--rounds" => config.rounds = number(value()?)?,
            "--seed" => config.seed = number(value()?)?,
            "--round" => config.first_round = number(value()?)?,
            "--round-secs" => {
                let secs: f64 = value()?.parse().map_err(|e| format!("{flag}: {e}"))?;
                config.round_time =
                    Duration::try_from_secs_f64(secs).map_err(|e| format!("{flag}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    config.walsync = walsync.ok_or("--walsync PATH is required")?;
    Ok(config)
}
