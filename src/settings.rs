//! Every flag and `WALSYNC_*` variable of the command line, written once: [`SETTINGS`] holds
//! each one's flag, variable, kind, default and help text.
//!
//! - `walsync COMMAND --help` takes its flag descriptions from here: the argh structs in
//!   `main.rs` carry only a placeholder, `setting:ID`, which [`render_help`] replaces with the
//!   help text, the default and the variable.
//! - The values are read through here ([`Setting::read`], [`Setting::switch`] and the
//!   typed helpers), so a flag's name, its variable and what it must be are not written again
//!   where it is read; `main.rs` lowers them into typed settings before any work starts.
//! - The tests below check the manual pages (`src/help.rs`) and README's table of settings
//!   against this table: a flag, variable or default they name that it lacks, or one it has
//!   that they miss, fails them.

use std::str::FromStr;
use std::time::Duration;

use walsync::error::{Error, Result};

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
    /// Its name in main.rs's argh structs (`setting:ID`); unique.
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

/// What the argh structs in main.rs have for a description: `setting:ID` (argh wants
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
mod tests {
    use super::*;
    use argh::FromArgs;
    use std::collections::BTreeSet;

    /// The commands' names, with their bits.
    const COMMANDS: [(&str, Commands); 6] = [
        ("watch", WATCH),
        ("snapshot", SNAPSHOT),
        ("list", LIST),
        ("status", STATUS),
        ("restore", RESTORE),
        ("prune", PRUNE),
    ];

    /// `text` with every run of whitespace made one space.
    fn words(text: &str) -> String {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// True if `text` has `word` with no name character right before or after it.
    fn mentions(text: &str, word: &str) -> bool {
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        text.match_indices(word).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + word.len()..].chars().next();
            !before.is_some_and(is_name) && !after.is_some_and(is_name)
        })
    }

    /// The `WALSYNC_*` names in `text`.
    fn variables(text: &str) -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("WALSYNC_"))
            .map(str::to_string)
            .collect()
    }

    fn rows(command: Commands) -> impl Iterator<Item = &'static Setting> {
        SETTINGS
            .iter()
            .copied()
            .filter(move |s| s.commands & command != 0)
    }

    /// argh's `--help` output for `args`, before rendering.
    fn argh_help(args: &[&str]) -> String {
        match crate::Cli::from_args(&["walsync"], args) {
            Err(exit) if exit.status.is_ok() => exit.output,
            _ => panic!("{args:?} gave no help"),
        }
    }

    #[test]
    fn ids_are_unique_and_every_row_says_something() {
        let ids: BTreeSet<&str> = SETTINGS.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), SETTINGS.len());
        for s in SETTINGS {
            assert!(s.commands != 0 && !s.help.is_empty(), "{s:?}");
            assert!(
                !s.help.ends_with('.'),
                "{}: argh's style has no period",
                s.id
            );
            if let Some(var) = s.var {
                assert!(var.starts_with("WALSYNC_"), "{var}");
            }
            // One flag, one meaning per command.
            for other in SETTINGS {
                if other.id != s.id && !s.flag.is_empty() && other.flag == s.flag {
                    assert_eq!(other.commands & s.commands, 0, "{} and {}", s.id, other.id);
                }
            }
        }
    }

    #[test]
    fn the_defaults_are_the_ones_the_code_uses() {
        let seconds = |s: &Setting| Duration::from_secs_f64(s.default.unwrap().parse().unwrap());
        let number = |s: &Setting| s.default.unwrap().parse::<u64>().unwrap();
        let options = walsync::replicator::Options::default();
        assert_eq!(seconds(&S3_TIMEOUT), walsync::storage::s3::DEFAULT_TIMEOUT);
        assert_eq!(seconds(&MIN_INTERVAL), options.min_interval);
        assert_eq!(seconds(&SNAPSHOT_INTERVAL), options.snapshot_interval);
        assert_eq!(number(&UPLOAD_WORKERS), options.upload_workers as u64);
        assert_eq!(number(&STAGING_LIMIT) * 1024 * 1024, options.staging_limit);
        assert_eq!(
            walsync::retention::parse_duration(RETENTION.default.unwrap()).unwrap(),
            options.retention
        );
        assert_eq!(seconds(&SHUTDOWN_TIMEOUT), crate::SHUTDOWN_TIMEOUT);
        assert_eq!(seconds(&HEARTBEAT_INTERVAL), crate::HEARTBEAT_INTERVAL);
        assert_eq!(
            HEARTBEAT_MAX_LAG.default.unwrap(),
            format!(
                "{} --min-intervals, at least {}",
                walsync::heartbeat::MAX_LAG_INTERVALS,
                walsync::heartbeat::MIN_MAX_LAG.as_secs()
            )
        );
        assert_eq!(
            crate::parse_mode(MODE.default.unwrap()).unwrap(),
            walsync::restore::DEFAULT_MODE
        );
        let restore = ["restore", "app", "-o", "out.db"];
        let Some(crate::Command::Restore(cmd)) = crate::Cli::from_args(&["walsync"], &restore)
            .unwrap()
            .command
        else {
            panic!("not a restore");
        };
        assert_eq!(cmd.parallel as u64, number(&PARALLEL));
        assert_eq!(
            walsync::layout::default_name(std::path::Path::new("/srv/app.db")).unwrap(),
            "app",
            "{:?}",
            NAME.default
        );
        let dir = std::path::Path::new("/srv");
        assert_eq!(
            format!("{:?}", walsync::DirectorySpec::new(dir)),
            format!(
                "{:?}",
                walsync::DirectorySpec::new(dir)
                    .pattern(PATTERN.default.unwrap())
                    .unwrap()
            )
        );
    }

    #[test]
    fn switch_variables_read_as_one_rule() {
        assert_eq!(RECURSIVE.kind, Kind::Switch(true));
        assert_eq!(NO_LOG_TIMESTAMPS.kind, Kind::Switch(false));
        // Given, a switch is on whatever the variable says (it is not read).
        assert!(RECURSIVE.switch(true).unwrap());
    }

    /// Every flag argh parses has a row (its description is the row's), and every row of a
    /// command is a flag of it.
    #[test]
    fn every_flag_is_in_the_table_and_back() {
        let mut commands = vec![("walsync", GLOBAL, argh_help(&["--help"]))];
        for (name, bit) in COMMANDS {
            commands.push((name, bit, argh_help(&[name, "--help"])));
        }
        for (name, bit, raw) in commands {
            let mut ids = BTreeSet::new();
            let lines: Vec<&str> = raw.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let Some((before, id)) = line.rsplit_once(PLACEHOLDER) else {
                    continue;
                };
                let row = SETTINGS
                    .iter()
                    .find(|s| s.id == id)
                    .unwrap_or_else(|| panic!("{name}: no row {id}"));
                assert!(row.commands & bit != 0, "{name} has {id}, its row does not");
                // The flag is on this line, or on the one before when it is long.
                let flag_line = if before.trim().is_empty() {
                    lines[i - 1]
                } else {
                    before
                };
                let flags: Vec<&str> = flag_line
                    .split_whitespace()
                    .map(|t| t.trim_end_matches(','))
                    .collect();
                if row.flag.starts_with('-') {
                    assert!(
                        flags.contains(&row.flag),
                        "{name}: {flag_line:?} is not {row:?}"
                    );
                    let short = row.short.map(|c| format!("-{c}"));
                    assert_eq!(
                        flags.iter().any(|f| !f.starts_with("--")),
                        short.is_some(),
                        "{name}: {flag_line:?} and {row:?}"
                    );
                    if let Some(short) = short {
                        assert!(flags.contains(&short.as_str()), "{flag_line:?}");
                    }
                } else {
                    assert!(flags.iter().all(|f| !f.starts_with('-')), "{flag_line:?}");
                }
                ids.insert(id);
            }
            let want: BTreeSet<&str> = rows(bit)
                .filter(|s| !s.flag.is_empty())
                .map(|s| s.id)
                .collect();
            assert_eq!(ids, want, "{name}");
            // Rendered, each description is there in full and no placeholder is left.
            let shown = render_help(&raw);
            assert!(!shown.contains(PLACEHOLDER), "{shown}");
            for line in shown.lines().filter(|l| l.len() > WIDTH) {
                assert!(raw.lines().any(|l| l == line), "too long: {line:?}");
            }
            for row in rows(bit).filter(|s| !s.flag.is_empty()) {
                assert!(
                    words(&shown).contains(&row.description()),
                    "{name}: {}",
                    row.description()
                );
            }
        }
    }

    /// The entries of a section of a manual page: each header (4 spaces in) with the text
    /// under it (deeper), whitespace made single spaces.
    fn entries<'a>(page: &'a str, section: &str) -> Vec<(&'a str, String)> {
        let mut lines = page
            .lines()
            .skip_while(|l| *l != section)
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with(' '));
        let mut out: Vec<(&str, String)> = Vec::new();
        for line in lines.by_ref() {
            if line.starts_with("        ") {
                if let Some((_, text)) = out.last_mut() {
                    text.push(' ');
                    text.push_str(line.trim());
                }
            } else if !line.trim().is_empty() {
                out.push((line.trim(), String::new()));
            }
        }
        out
    }

    /// Which default `text` names: what follows "(default" up to the closing
    /// parenthesis or semicolon, or None.
    fn named_default(text: &str) -> Option<String> {
        let words = words(text);
        let (_, rest) = words.split_once("(default")?;
        let rest = rest.trim_start_matches(':').trim();
        Some(rest.split([')', ';']).next().unwrap().trim().to_string())
    }

    /// A header's flags: its words starting with `-`.
    fn header_flags(header: &str) -> Vec<&str> {
        header
            .split_whitespace()
            .map(|w| w.trim_end_matches(','))
            .filter(|w| w.starts_with('-'))
            .collect()
    }

    #[test]
    fn the_manual_pages_agree_with_the_table() {
        let all_vars: BTreeSet<&str> = SETTINGS.iter().filter_map(|s| s.var).collect();
        for (name, bit) in COMMANDS {
            let page = crate::help::page(name).unwrap();
            let options = entries(page, "OPTIONS");
            let environment = entries(page, "ENVIRONMENT");
            assert!(!options.is_empty() && !environment.is_empty(), "{name}");
            let env_text: String = environment
                .iter()
                .map(|(h, t)| format!("{h} {t} "))
                .collect();
            for row in rows(bit) {
                // The entry that documents it: its flag's under OPTIONS, else its
                // variable's under ENVIRONMENT; positional arguments may have none.
                let entry = if row.flag.is_empty() {
                    let var = row.var.unwrap();
                    environment.iter().find(|(h, _)| mentions(h, var))
                } else if row.flag.starts_with('-') {
                    options
                        .iter()
                        .find(|(h, _)| header_flags(h).contains(&row.flag))
                } else {
                    options.iter().find(|(h, _)| *h == row.flag)
                };
                let Some((header, text)) = entry else {
                    assert!(
                        !row.flag.starts_with('-') && !row.flag.is_empty(),
                        "walsync help {name} does not document {}",
                        row.flag_name()
                    );
                    continue;
                };
                if let Some(short) = row.short {
                    assert!(header.starts_with(&format!("-{short}, ")), "{header}");
                }
                assert_eq!(
                    named_default(text).map(|d| d.starts_with(row.default.unwrap_or("\0"))),
                    row.default.map(|_| true),
                    "walsync help {name}, {header}: the default is {:?}, the table's {:?}",
                    named_default(text),
                    row.default
                );
                if let Some(var) = row.var {
                    assert!(mentions(&env_text, var), "walsync help {name}: no {var}");
                }
            }
            // And nothing the table does not have.
            for (header, _) in &options {
                for flag in header_flags(header) {
                    assert!(
                        rows(bit)
                            .any(|s| s.flag == flag
                                || s.short.is_some_and(|c| flag == format!("-{c}"))),
                        "walsync help {name} documents {flag}, which {name} does not have"
                    );
                }
            }
            for var in variables(&env_text) {
                assert!(
                    rows(bit).any(|s| s.var == Some(var.as_str())),
                    "walsync help {name} lists {var}, which {name} does not read"
                );
            }
            for var in variables(page) {
                assert!(
                    all_vars.contains(var.as_str()),
                    "walsync help {name}: {var}?"
                );
            }
        }
    }

    /// The rows of README's table of settings (`| variable | flag | default | commands |`).
    fn readme_table(readme: &str) -> Vec<Vec<String>> {
        let mut lines = readme
            .lines()
            .skip_while(|l| !l.starts_with("| variable | flag | default | commands |"))
            .skip(2);
        let mut rows = Vec::new();
        for line in lines.by_ref().take_while(|l| l.starts_with('|')) {
            let cells: Vec<String> = line
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect();
            assert_eq!(cells.len(), 4, "{line}");
            rows.push(cells);
        }
        rows
    }

    #[test]
    fn the_readme_table_agrees_with_the_table() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let table = readme_table(&readme);
        assert!(!table.is_empty(), "README has no table of settings");
        let mut seen = BTreeSet::new();
        for cells in &table {
            let var = cells[0].trim_matches('`');
            assert!(seen.insert(var.to_string()), "README lists {var} twice");
            let rows: Vec<&Setting> = SETTINGS
                .iter()
                .copied()
                .filter(|s| s.var == Some(var))
                .collect();
            assert!(
                !rows.is_empty(),
                "README lists {var}, which walsync does not read"
            );
            // Its flag, by name (or as "(none" if it has none).
            for row in &rows {
                let named = if row.flag.is_empty() {
                    cells[1].starts_with("(none")
                } else {
                    mentions(&cells[1], row.flag)
                        || row
                            .short
                            .is_some_and(|c| mentions(&cells[1], &format!("-{c}")))
                };
                assert!(named, "README: {var} is {:?}, not {:?}", row.flag, cells[1]);
            }
            // Its default, exactly.
            let defaults: Vec<&str> = rows.iter().filter_map(|s| s.default).collect();
            let cell = cells[2].replace('`', "");
            let cell = cell.split(" (").next().unwrap();
            assert_eq!(cell, defaults.join("; "), "README: the default of {var}");
            // Its commands.
            let bits = rows.iter().fold(0, |bits, s| bits | s.commands) & STORAGE;
            let expected = if bits == STORAGE {
                "all".to_string()
            } else {
                COMMANDS
                    .iter()
                    .filter(|(_, bit)| bits & bit != 0)
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            assert_eq!(cells[3], expected, "README: the commands of {var}");
        }
        let vars: BTreeSet<String> = SETTINGS
            .iter()
            .filter_map(|s| s.var)
            .map(str::to_string)
            .collect();
        assert_eq!(seen, vars, "README's table of settings");
        // Elsewhere README may name only these, and the service scripts' own variables.
        let mut contrib = String::new();
        let mut dirs = vec![root.join("contrib")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(text) = std::fs::read_to_string(&path) {
                    contrib.push_str(&text);
                }
            }
        }
        for var in variables(&readme) {
            assert!(
                vars.contains(&var) || mentions(&contrib, &var),
                "README names {var}, which neither walsync nor contrib/ reads"
            );
        }
    }
}
