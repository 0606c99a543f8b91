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
//! walsync's own UTC formatting, not from env_logger's `humantime` feature, which would add its own
//! calendar code to a binary whose size is counted.
//!
//! Messages go to stderr; what a command prints as its result (list, status, a snapshot's
//! key) goes to stdout.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Mutex, PoisonError};

use crate::progress;
use walsync::Result;
use walsync::UtcTime;

/// Whether log lines carry timestamps: not with `--no-log-timestamps`, else as
/// WALSYNC_LOG_TIMESTAMPS says (read as every switch's variable is: see
/// [`crate::settings::Setting::switch`]).
pub fn timestamps(no_flag: bool) -> Result<bool> {
    Ok(!crate::settings::NO_LOG_TIMESTAMPS.switch(no_flag)?)
}

/// Install the logger: info level for walsync (debug with `verbose`), warnings from the
/// libraries, `RUST_LOG` overriding both.
pub fn init(verbose: bool, timestamps: bool) {
    let default_level = if verbose {
        "walsync=debug,info"
    } else {
        "walsync=info,warn"
    };
    let filter =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
            // ureq logs each request at debug level and its headers at trace, among them the
            // `Authorization` signature and the session token (X-Amz-Security-Token). Keep
            // the HTTP client at info whatever RUST_LOG says, so `-v` and RUST_LOG=trace stay
            // safe to paste. (These directives come after RUST_LOG's and replace any it gave
            // for them.)
            .filter_module("ureq", log::LevelFilter::Info)
            .filter_module("ureq_proto", log::LevelFilter::Info)
            .build();
    let max_level = filter.filter();
    let logger = Logger {
        filter,
        timestamps,
        // Log lines wipe a progress line first (see crate::progress).
        out: Mutex::new(progress::LogWriter),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max_level);
    }
}

/// env_logger's filter (`RUST_LOG` and the defaults above) with lines formatted here.
///
/// env_logger's own logger formats each line into a buffer it keeps per thread for as long
/// as the thread lives, sized for the longest line that thread logged: every database
/// thread that logged a line kept about 280 bytes (massif, 100 idle databases). Here a
/// line is formatted into a buffer of its own, freed once written.
struct Logger {
    filter: env_logger::Logger,
    timestamps: bool,
    /// One line at a time: a line is written whole before the next one starts.
    out: Mutex<progress::LogWriter>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let mut line = String::new();
        if self.timestamps {
            let _ = write!(line, "{} ", UtcTime::now().to_rfc3339());
        }
        let _ = writeln!(
            line,
            "{:<5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self
            .out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
    }
}
