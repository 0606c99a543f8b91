//! walsync's log lines, on stderr:
//!
//! ```text
//! 2026-12-06T21:14:03.123Z INFO  walsync::replicator: app: stored 1 segment
//! ```
//!
//! Each line starts with its time, UTC, RFC 3339 with milliseconds, so that output kept
//! by docker, nohup or a plain file can be correlated with other logs. Loggers that stamp
//! lines themselves (svlogd -tt, s6-log T, journald) get `WALSYNC_LOG_TIMESTAMPS=0` or
//! `--no-log-timestamps`, as contrib/'s run scripts set. The time comes from
//! [`walsync::utc`], not from env_logger's `humantime` feature, which would add its own
//! calendar code to a binary whose size is counted.
//!
//! Messages go to stderr; what a command prints as its result (list, status, a snapshot's
//! key) goes to stdout.

use std::io::Write as _;

use walsync::error::{Error, Result};
use walsync::progress;
use walsync::utc::UtcTime;

/// The environment variable that turns timestamps off (`0`) or on (`1`).
pub const TIMESTAMPS_VAR: &str = "WALSYNC_LOG_TIMESTAMPS";

/// Whether log lines carry timestamps: not with `--no-log-timestamps`, else as
/// [`TIMESTAMPS_VAR`] says (`0`, `false`, `no`, `off` or `1`, `true`, `yes`, `on`; empty
/// or unset: yes).
pub fn timestamps(no_flag: bool) -> Result<bool> {
    if no_flag {
        return Ok(false);
    }
    let Some(value) = std::env::var_os(TIMESTAMPS_VAR) else {
        return Ok(true);
    };
    match value
        .to_str()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("" | "1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        _ => Err(Error::invalid(format!(
            "{TIMESTAMPS_VAR} must be 0 (no timestamps) or 1"
        ))),
    }
}

/// Install the logger: info level for walsync (debug with `verbose`), warnings from the
/// libraries, `RUST_LOG` overriding both.
pub fn init(verbose: bool, timestamps: bool) {
    let default_level = if verbose {
        "walsync=debug,info"
    } else {
        "walsync=info,warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        // ureq logs each request at debug level and its headers at trace, among them the
        // `Authorization` signature and the session token (X-Amz-Security-Token). Keep the
        // HTTP client at info whatever RUST_LOG says, so `-v` and RUST_LOG=trace stay safe to
        // paste. (These directives come after RUST_LOG's and replace any it gave for them.)
        .filter_module("ureq", log::LevelFilter::Info)
        .filter_module("ureq_proto", log::LevelFilter::Info)
        .format(move |out, record| {
            if timestamps {
                write!(out, "{} ", UtcTime::now().to_rfc3339())?;
            }
            writeln!(
                out,
                "{:<5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            )
        })
        // Log lines wipe a progress line first (see walsync::progress).
        .target(env_logger::Target::Pipe(Box::new(progress::LogWriter)))
        .init();
}
