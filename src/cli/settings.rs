//! Every flag and `WALSYNC_*` variable of the command line, written once: [`SETTINGS`] holds
//! each one's flag, variable, kind, default and help text.
//!
//! - `walsync COMMAND --help` takes its flag descriptions from here: the argh structs in
//!   `args.rs` carry only a placeholder, `setting:ID`, which [`render_help`] replaces with the
//!   help text, the default and the variable.
//! - The values are read through here ([`Setting::read`], [`Setting::switch`] and the
//!   typed helpers), so a flag's name, its variable and what it must be are not written again
//!   where it is read; `watch.rs` and `commands.rs` (with what they share in `args.rs`) lower
//!   them into typed settings before any work starts.
//! - The tests (`settings/tests.rs`) check the manual pages (`src/cli/help.rs`) and
//!   README's table of settings against this table: a flag, variable or default they name
//!   that it lacks, or one it has that they miss, fails them.

use std::str::FromStr;
use std::time::Duration;

use walsync::{Error, Result};

/// The commands a setting belongs to, as a set of bits.
pub type Commands = u8;
pub const WATCH: Commands = 1;
pub const SNAPSHOT: Commands = 2;
pub const LIST: Commands = 4;
pub const STATUS: Commands = 8;
pub const RESTORE: Commands = 16;
pub const PRUNE: Commands = 32;
/// `walsync`'s own flags, before the command.
pub const GLOBAL: Commands = 64;
/// Every command that talks to storage (all six).
pub const STORAGE: Commands = WATCH | SNAPSHOT | LIST | STATUS | RESTORE | PRUNE;

/// What a setting's value is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A switch. With a variable: the variable's value that means the switch is given
    /// (`true`: 1, true, yes, on; `false`: 0, false, no, off).
    Switch(bool),
    /// A number of seconds, fractions allowed.
    Seconds,
    /// A whole number.
    Count,
    /// A whole number of MiB.
    Mib,
    /// A duration with a unit: 24h, 90m, 7d, 3600s.
    Duration,
    /// Text; what it must be, for the error that names the variable.
    Text(&'static str),
    /// Several values: a repeatable flag or positional arguments, and in the variable
    /// separated by whitespace; what they must be.
    List(&'static str),
}

/// One flag or positional argument, and its variable.
#[derive(Debug)]
pub struct Setting {
    /// Its name in args.rs's argh structs (`setting:ID`); unique.
    pub id: &'static str,
    /// The flag (`--min-interval`); a positional argument's name as the pages write it
    /// (`DB`); empty for a variable without a flag.
    pub flag: &'static str,
    /// The one-letter form (`-b`), if any. (This and `commands` are the table's record of
    /// what argh parses; the tests hold the two, the pages and README to them.)
    #[cfg_attr(not(test), allow(dead_code))]
    pub short: Option<char>,
    pub var: Option<&'static str>,
    pub kind: Kind,
    /// The default as the help says it; None if there is none (or the setting is required).
    pub default: Option<&'static str>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub commands: Commands,
    /// The flag's description in `--help`, without its default and variable.
    pub help: &'static str,
}

/// Shorthand for a row of the table.
const fn row(
    id: &'static str,
    flag: &'static str,
    var: Option<&'static str>,
    kind: Kind,
    default: Option<&'static str>,
    commands: Commands,
    help: &'static str,
) -> Setting {
    Setting {
        id,
        flag,
        short: None,
        var,
        kind,
        default,
        commands,
        help,
    }
}

const SECONDS: Kind = Kind::Seconds;

pub const BUCKET: Setting = Setting {
    short: Some('b'),
    ..row(
        "bucket",
        "--bucket",
        Some("WALSYNC_BUCKET"),
        Kind::Text("a destination URL"),
        None,
        STORAGE,
        "destination: s3://bucket/prefix or file:///dir",
    )
};
pub const ENDPOINT: Setting = row(
    "endpoint",
    "--endpoint",
    Some("WALSYNC_ENDPOINT"),
    Kind::Text("a URL"),
    None,
    STORAGE,
    "S3 endpoint URL (without one: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then AWS)",
);
pub const S3_TIMEOUT: Setting = row(
    "s3-timeout",
    "--s3-timeout",
    Some("WALSYNC_S3_TIMEOUT"),
    SECONDS,
    Some("60"),
    STORAGE,
    "seconds one S3 read or write may wait before the request fails and is retried",
);
/// Read by the storage layer (`S3Config::from_env`), not here: it has no flag.
pub const S3_ADDRESSING: Setting = row(
    "s3-addressing",
    "",
    Some("WALSYNC_S3_ADDRESSING"),
    Kind::Text("virtual or path"),
    Some("virtual for AWS, path for an endpoint"),
    STORAGE,
    "virtual-hosted or path-style bucket URLs",
);
pub const VERBOSE: Setting = Setting {
    short: Some('v'),
    ..row(
        "verbose",
        "--verbose",
        None,
        Kind::Switch(true),
        None,
        STORAGE | GLOBAL,
        "log more (debug level); RUST_LOG overrides",
    )
};
pub const NO_LOG_TIMESTAMPS: Setting = row(
    "no-log-timestamps",
    "--no-log-timestamps",
    Some("WALSYNC_LOG_TIMESTAMPS"),
    Kind::Switch(false),
    None,
    STORAGE | GLOBAL,
    "log lines without their leading UTC time, for loggers that add their own",
);
pub const VERSION: Setting = row(
    "version",
    "--version",
    None,
    Kind::Switch(true),
    None,
    GLOBAL,
    "print the version (walsync VERSION) and exit",
);

pub const DATABASES: Setting = row(
    "databases",
    "DB",
    Some("WALSYNC_DATABASES"),
    Kind::List("a list of databases"),
    None,
    WATCH,
    "databases to replicate, as PATH or PATH:NAME, each in WAL mode",
);
pub const DIR: Setting = row(
    "dir",
    "--dir",
    Some("WALSYNC_DIR"),
    Kind::List("a list of directories"),
    None,
    WATCH,
    "also replicate every WAL database in this directory, as it comes and goes, named by \
     its path relative to DIR; repeatable",
);
pub const PATTERN: Setting = row(
    "pattern",
    "--pattern",
    Some("WALSYNC_PATTERN"),
    Kind::Text("a glob"),
    Some("*.db"),
    WATCH,
    "which files in a --dir are databases: a glob of *, ? and [...] over file names",
);
pub const RECURSIVE: Setting = row(
    "recursive",
    "--recursive",
    Some("WALSYNC_RECURSIVE"),
    Kind::Switch(true),
    None,
    WATCH,
    "search the subdirectories of each --dir too",
);
pub const SNAPSHOT_INTERVAL: Setting = row(
    "snapshot-interval",
    "--snapshot-interval",
    Some("WALSYNC_SNAPSHOT_INTERVAL"),
    SECONDS,
    Some("3600"),
    WATCH,
    "seconds between snapshots of a changing database",
);
pub const MIN_INTERVAL: Setting = row(
    "min-interval",
    "--min-interval",
    Some("WALSYNC_MIN_INTERVAL"),
    SECONDS,
    Some("1"),
    WATCH,
    "under steady writes, ship each database at most this often, in seconds",
);
pub const UPLOAD_WORKERS: Setting = row(
    "upload-workers",
    "--upload-workers",
    Some("WALSYNC_UPLOAD_WORKERS"),
    Kind::Count,
    Some("2"),
    WATCH,
    "upload workers shared by all databases",
);
pub const POLL: Setting = row(
    "poll",
    "--poll",
    None,
    Kind::Switch(true),
    None,
    WATCH,
    "poll files for changes instead of using inotify/kqueue",
);
pub const SHUTDOWN_TIMEOUT: Setting = row(
    "shutdown-timeout",
    "--shutdown-timeout",
    Some("WALSYNC_SHUTDOWN_TIMEOUT"),
    SECONDS,
    Some("30"),
    WATCH,
    "seconds to keep uploading after SIGTERM/SIGINT before giving up",
);
pub const STAGING_LIMIT: Setting = row(
    "staging-limit",
    "--staging-limit",
    Some("WALSYNC_STAGING_LIMIT"),
    Kind::Mib,
    Some("1024"),
    WATCH,
    "local disk each database may fill with staged segments while storage is slow or down, \
     in MiB; past it the WAL stays pinned and grows instead",
);
pub const RETENTION: Setting = row(
    "retention",
    "--retention",
    Some("WALSYNC_RETENTION"),
    Kind::Duration,
    Some("24h"),
    WATCH,
    "keep every point in time this far back restorable and delete older backups while \
     running: 24h, 90m, 7d, 3600s, or 0 to keep everything; pruned at start, after stored \
     snapshots (at most hourly), and when the window passes the next snapshot",
);
pub const EXEC: Setting = row(
    "exec",
    "--exec",
    Some("WALSYNC_EXEC"),
    Kind::Text("a command"),
    None,
    WATCH,
    "once replication has started, run this command (directly, or through /bin/sh -c if it \
     has shell syntax), forward SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1/2 to it, and \
     when it exits, ship what is left and exit with its status",
);
pub const METRICS_ADDR: Setting = row(
    "metrics-addr",
    "--metrics-addr",
    Some("WALSYNC_METRICS_ADDR"),
    Kind::Text("an address such as 127.0.0.1:9091"),
    None,
    WATCH,
    "serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9091",
);
pub const HEARTBEAT_URL: Setting = row(
    "heartbeat-url",
    "--heartbeat-url",
    Some("WALSYNC_HEARTBEAT_URL"),
    Kind::Text("a URL"),
    None,
    WATCH,
    "GET this URL at most once per --heartbeat-interval while every database's lag is \
     under --heartbeat-max-lag, for a dead man's switch monitor",
);
pub const HEARTBEAT_INTERVAL: Setting = row(
    "heartbeat-interval",
    "--heartbeat-interval",
    Some("WALSYNC_HEARTBEAT_INTERVAL"),
    SECONDS,
    Some("60"),
    WATCH,
    "seconds between heartbeats",
);
/// Its default depends on `--min-interval` (see `heartbeat::default_max_lag`).
pub const HEARTBEAT_MAX_LAG: Setting = row(
    "heartbeat-max-lag",
    "--heartbeat-max-lag",
    Some("WALSYNC_HEARTBEAT_MAX_LAG"),
    SECONDS,
    Some("5 --min-intervals, at least 5"),
    WATCH,
    "heartbeats stop while a database's oldest commit not yet stored is this many seconds \
     old",
);

pub const SNAPSHOT_DATABASE: Setting = row(
    "database",
    "DB",
    None,
    Kind::Text("a path"),
    None,
    SNAPSHOT,
    "the database file (must be in WAL mode)",
);
pub const NAME: Setting = row(
    "name",
    "--name",
    None,
    Kind::Text("a replica name"),
    Some("the file name without its extension"),
    SNAPSHOT,
    "replica name",
);
pub const JSON: Setting = row(
    "json",
    "--json",
    None,
    Kind::Switch(true),
    None,
    LIST | STATUS,
    "print JSON (a stable format for scripts)",
);
pub const NAMES: Setting = row(
    "names",
    "NAME...",
    None,
    Kind::List("replica names"),
    Some("every database"),
    STATUS | PRUNE,
    "replica names, as shown by `walsync list`",
);

pub const RESTORE_NAME: Setting = row(
    "restore-name",
    "NAME",
    None,
    Kind::Text("a replica name"),
    None,
    RESTORE,
    "replica name, as shown by `walsync list`",
);
pub const OUTPUT: Setting = Setting {
    short: Some('o'),
    ..row(
        "output",
        "--output",
        None,
        Kind::Text("a path"),
        None,
        RESTORE,
        "output database file",
    )
};
pub const POINT_IN_TIME: Setting = row(
    "point-in-time",
    "--point-in-time",
    None,
    Kind::Text("an RFC 3339 time"),
    None,
    RESTORE,
    "restore the state as of this RFC 3339 time, e.g. 2026-01-10T12:00:00Z",
);
pub const GENERATION: Setting = row(
    "generation",
    "--generation",
    None,
    Kind::Text("a generation"),
    None,
    RESTORE,
    "restore from this generation (as `walsync list` shows it) instead of the newest",
);
pub const FORCE: Setting = row(
    "force",
    "--force",
    None,
    Kind::Switch(true),
    None,
    RESTORE,
    "replace the output file if it exists",
);
pub const IF_DB_NOT_EXISTS: Setting = row(
    "if-db-not-exists",
    "--if-db-not-exists",
    None,
    Kind::Switch(true),
    None,
    RESTORE,
    "do nothing (exit 0) if the output file already exists",
);
pub const IF_REPLICA_EXISTS: Setting = row(
    "if-replica-exists",
    "--if-replica-exists",
    None,
    Kind::Switch(true),
    None,
    RESTORE,
    "do nothing (exit 0) if the destination holds no replica of NAME",
);
pub const RESTORE_DRY_RUN: Setting = row(
    "restore-dry-run",
    "--dry-run",
    None,
    Kind::Switch(true),
    None,
    RESTORE,
    "print what would be downloaded (keys, sizes, the time restored to) and exit without \
     downloading or writing anything",
);
pub const PARALLEL: Setting = row(
    "parallel",
    "--parallel",
    None,
    Kind::Count,
    Some("4"),
    RESTORE,
    "downloads in flight at once",
);
pub const MODE: Setting = row(
    "mode",
    "--mode",
    None,
    Kind::Text("octal permission bits"),
    Some("0600"),
    RESTORE,
    "permission bits of the restored file, in octal, less the umask",
);

pub const PRUNE_RETENTION: Setting = row(
    "prune-retention",
    "--retention",
    Some("WALSYNC_RETENTION"),
    Kind::Duration,
    None,
    PRUNE,
    "how far back every point in time stays restorable: 24h, 90m, 7d, 3600s, or 0 to keep \
     everything; required",
);
pub const PRUNE_DRY_RUN: Setting = row(
    "prune-dry-run",
    "--dry-run",
    None,
    Kind::Switch(true),
    None,
    PRUNE,
    "print what would be deleted (keys, sizes, bytes freed) and delete nothing",
);

/// The table.
pub const SETTINGS: &[&Setting] = &[
    &BUCKET,
    &ENDPOINT,
    &S3_TIMEOUT,
    &S3_ADDRESSING,
    &VERBOSE,
    &NO_LOG_TIMESTAMPS,
    &VERSION,
    &DATABASES,
    &DIR,
    &PATTERN,
    &RECURSIVE,
    &SNAPSHOT_INTERVAL,
    &MIN_INTERVAL,
    &UPLOAD_WORKERS,
    &POLL,
    &SHUTDOWN_TIMEOUT,
    &STAGING_LIMIT,
    &RETENTION,
    &EXEC,
    &METRICS_ADDR,
    &HEARTBEAT_URL,
    &HEARTBEAT_INTERVAL,
    &HEARTBEAT_MAX_LAG,
    &SNAPSHOT_DATABASE,
    &NAME,
    &JSON,
    &NAMES,
    &RESTORE_NAME,
    &OUTPUT,
    &POINT_IN_TIME,
    &GENERATION,
    &FORCE,
    &IF_DB_NOT_EXISTS,
    &IF_REPLICA_EXISTS,
    &RESTORE_DRY_RUN,
    &PARALLEL,
    &MODE,
    &PRUNE_RETENTION,
    &PRUNE_DRY_RUN,
];

impl Kind {
    /// What a value must be, for the error naming a variable that does not parse.
    fn expected(self) -> &'static str {
        match self {
            Kind::Switch(_) => "1 or 0",
            Kind::Seconds => "a number of seconds",
            Kind::Count => "a whole number",
            Kind::Mib => "a whole number of MiB",
            Kind::Duration => "a duration",
            Kind::Text(what) | Kind::List(what) => what,
        }
    }
}

impl Setting {
    /// The name a value is reported under: the flag (or the variable, for one without).
    pub fn flag_name(&self) -> &'static str {
        if self.flag.is_empty() {
            self.var.unwrap_or(self.id)
        } else {
            self.flag
        }
    }

    /// The description `--help` shows: the help text, then the default and the variable.
    pub fn description(&self) -> String {
        let mut notes = Vec::new();
        if let Some(default) = self.default {
            let colon = if default.starts_with(|c: char| c.is_ascii_alphabetic()) {
                ":"
            } else {
                ""
            };
            notes.push(format!("default{colon} {default}"));
        }
        if let Some(var) = self.var {
            notes.push(match self.kind {
                Kind::Switch(on) => format!("or {var}={}", u8::from(on)),
                Kind::List(_) => format!("or {var}, separated by whitespace"),
                _ => format!("or {var}"),
            });
        }
        if notes.is_empty() {
            self.help.to_string()
        } else {
            format!("{} ({})", self.help, notes.join("; "))
        }
    }

    /// The value from the flag, else from the variable (empty counts as unset), with where it
    /// came from (the flag's or the variable's name) for messages. A flag always wins; a
    /// variable that does not parse is an error naming it (never quoting its value).
    pub fn read<T: FromStr>(&self, flag: Option<T>) -> Result<Option<(T, &'static str)>> {
        if let Some(value) = flag {
            return Ok(Some((value, self.flag_name())));
        }
        let Some(var) = self.var else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(text) if text.trim().is_empty() => Ok(None),
            Ok(text) => text
                .trim()
                .parse()
                .map(|value| Some((value, var)))
                .map_err(|_| Error::invalid(format!("{var} must be {}", self.kind.expected()))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::invalid(format!("{var} is not valid UTF-8")))
            }
        }
    }

    /// A [`Kind::Switch`]: given, or as its variable says (1, true, yes, on or 0, false, no,
    /// off, in any case; empty or unset: not given).
    pub fn switch(&self, given: bool) -> Result<bool> {
        let Kind::Switch(on) = self.kind else {
            unreachable!("{} is not a switch", self.id)
        };
        if given {
            return Ok(true);
        }
        let Some((text, var)) = self.read::<String>(None)? else {
            return Ok(false);
        };
        match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(on),
            "0" | "false" | "no" | "off" => Ok(!on),
            _ => Err(Error::invalid(format!("{var} must be 1 or 0"))),
        }
    }

    /// A [`Kind::List`] from its values given, else from its variable split on whitespace.
    pub fn list(&self, given: &[String]) -> Result<Vec<String>> {
        if !given.is_empty() {
            return Ok(given.to_vec());
        }
        Ok(self
            .read::<String>(None)?
            .map(|(list, _)| list.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default())
    }

    /// A number of seconds from the flag or the variable, else the default; `zero_ok` lets
    /// 0 through.
    pub fn seconds(&self, flag: Option<f64>, default: Duration, zero_ok: bool) -> Result<Duration> {
        let Some((value, from)) = self.read(flag)? else {
            return Ok(default);
        };
        Duration::try_from_secs_f64(value)
            .ok()
            .filter(|d| zero_ok || !d.is_zero())
            .ok_or_else(|| Error::invalid(format!("{from} must be a positive number of seconds")))
    }
}

/// What the argh structs in args.rs have for a description: `setting:ID` (argh wants
/// descriptions to start with a lowercase letter).
const PLACEHOLDER: &str = "setting:";

/// Width of argh's flag column and of its lines.
const FLAG_COLUMN: usize = 20;
const WIDTH: usize = 80;

/// `--help` output from argh with each `setting:ID` placeholder replaced by that setting's
/// [`Setting::description`], wrapped as argh wraps (80 columns, the flag column 20 wide).
pub fn render_help(argh_output: &str) -> String {
    let mut out = String::with_capacity(argh_output.len() * 2);
    for line in argh_output.lines() {
        let found = line
            .rsplit_once(PLACEHOLDER)
            .and_then(|(prefix, id)| Some((prefix, SETTINGS.iter().find(|s| s.id == id)?)));
        let Some((prefix, setting)) = found else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        out.push_str(prefix);
        let mut column = prefix.chars().count();
        let mut first = true;
        for word in setting.description().split(' ') {
            if !first && column + 1 + word.len() > WIDTH {
                out.push('\n');
                out.push_str(&" ".repeat(FLAG_COLUMN));
                column = FLAG_COLUMN;
                first = true;
            }
            if !first {
                out.push(' ');
                column += 1;
            }
            out.push_str(word);
            column += word.len();
            first = false;
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
