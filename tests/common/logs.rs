//! One logger for the whole test binary. A process has one `log` logger, and all the test
//! modules share the process, so they share this one: it keeps every warning (a test checks
//! what the storage client warned about by filtering on its own server's endpoint) and
//! prints records up to the level `RUST_LOG` names (`error`, `warn`, `info`, `debug` or
//! `trace`; `warn` when unset), which the test harness shows for failing tests only.

use std::sync::{Mutex, Once};

struct Capture {
    warnings: Mutex<Vec<String>>,
    print: log::LevelFilter,
}

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.print.max(log::LevelFilter::Warn)
    }

    fn log(&self, record: &log::Record) {
        if record.level() <= log::Level::Warn {
            let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
            warnings.push(record.args().to_string());
        }
        if record.level() <= self.print {
            eprintln!("[{} {}] {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Install the logger (once) and return every warning logged so far, by any test.
pub fn warnings() -> &'static Mutex<Vec<String>> {
    static LOGGER: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    static INSTALL: Once = Once::new();
    let logger = LOGGER.get_or_init(|| Capture {
        warnings: Mutex::new(Vec::new()),
        print: std::env::var("RUST_LOG")
            .ok()
            .and_then(|level| level.parse().ok())
            .unwrap_or(log::LevelFilter::Warn),
    });
    INSTALL.call_once(|| {
        if log::set_logger(logger).is_ok() {
            log::set_max_level(logger.print.max(log::LevelFilter::Warn));
        }
    });
    &logger.warnings
}

/// Install the logger, for a test that only wants to see the library's log when it fails.
pub fn init() {
    warnings();
}
