//! The `walsync` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use argh::FromArgs;

mod commands;
mod heartbeat;
mod help;
mod logging;
mod metrics_server;
mod progress;
mod settings;
mod supervise;
mod watch;

use walsync::storage::{self, Destination, Storage};
use walsync::unstable as internals;
use walsync::{Error, ErrorKind, Result};

/// The placeholder for the version in the top-level help (argh takes only literals there).
const VERSION_PLACEHOLDER: &str = "walsync VERSION";

/// The placeholder for prune's rule in `walsync prune --help`: the text is
/// [`help::PRUNE_RULE`], which `walsync help prune` shows too.
const PRUNE_RULE_PLACEHOLDER: &str = "PRUNE_RULE";

/// Exit status of a command-line usage error (bad flags included).
const USAGE: u8 = 2;

/// The log target of what the commands themselves say (`INFO  walsync: watching ...`): the
/// binary's name, not the module that says it. The lines read as walsync's own, and a
/// `RUST_LOG` filter written for them keeps working whichever file the code is in.
const LOG_TARGET: &str = "walsync";

/// walsync VERSION: back up SQLite databases in WAL mode to S3-compatible storage, and
/// restore them.
#[derive(FromArgs)]
#[argh(
    note = "Each command's settings may also come from WALSYNC_* variables (see its\n\
            --help); a flag always wins. Credentials come from AWS_ACCESS_KEY_ID,\n\
            AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_REGION. walsync help\n\
            COMMAND shows a command's manual page.",
    error_code(
        0,
        "success, also when --if-db-not-exists or --if-replica-exists had nothing to do"
    ),
    error_code(
        1,
        "any other error (local I/O, SQLite, an unexpected storage response)"
    ),
    error_code(
        2,
        "usage: bad flags or values, a missing setting, or input the command refuses"
    ),
    error_code(
        3,
        "not found: no such replica, generation or backup, or a missing database file"
    ),
    error_code(4, "corrupt or unverifiable backup data"),
    error_code(
        5,
        "storage unreachable, credentials refused, or storage errors that outlasted retries"
    )
)]
struct Cli {
    /// setting:verbose
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// setting:no-log-timestamps
    #[argh(switch)]
    no_log_timestamps: bool,
    /// setting:version
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Watch(WatchCmd),
    Snapshot(SnapshotCmd),
    List(ListCmd),
    Status(StatusCmd),
    Restore(RestoreCmd),
    Prune(PruneCmd),
}

impl Command {
    /// `-v` and `--no-log-timestamps` as given after the command.
    fn logging(&self) -> (bool, bool) {
        match self {
            Command::Watch(cmd) => cmd.logging(),
            Command::Snapshot(cmd) => cmd.logging(),
            Command::List(cmd) => cmd.logging(),
            Command::Status(cmd) => cmd.logging(),
            Command::Restore(cmd) => cmd.logging(),
            Command::Prune(cmd) => cmd.logging(),
        }
    }
}

/// Declares a subcommand whose options include the destination's, `-b`, `--endpoint` and
/// `--s3-timeout`, and the logging switches `-v` and `--no-log-timestamps` (so they work
/// after the command too, as people type them); argh has no flattening, so they are
/// written once here rather than in every command. Gives the command [`StorageArgs`]
/// through `destination()`.
macro_rules! with_destination {
    (
        $(#[$meta:meta])*
        struct $name:ident {
            $($fields:tt)*
        }
    ) => {
        $(#[$meta])*
        struct $name {
            // As raw tokens: argh reads each field's type by its spelling (`bool` makes a
            // switch), which a `ty` fragment would hide.
            $($fields)*
            /// setting:bucket
            #[argh(option, short = 'b')]
            bucket: Option<String>,
            /// setting:endpoint
            #[argh(option)]
            endpoint: Option<String>,
            /// setting:s3-timeout
            #[argh(option)]
            s3_timeout: Option<f64>,
            /// setting:verbose
            #[argh(switch, short = 'v')]
            verbose: bool,
            /// setting:no-log-timestamps
            #[argh(switch)]
            no_log_timestamps: bool,
        }

        impl $name {
            /// `-v` and `--no-log-timestamps`, given after the command.
            fn logging(&self) -> (bool, bool) {
                (self.verbose, self.no_log_timestamps)
            }

            /// Where this command's replica is and how to reach it, from the flags or the
            /// WALSYNC_* variables.
            fn destination(&self) -> Result<StorageArgs> {
                StorageArgs::lower(self.bucket.clone(), self.endpoint.clone(), self.s3_timeout)
            }
        }
    };
}

with_destination! {
    /// Replicate databases continuously until SIGTERM or SIGINT.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "watch", note = "Exit codes: see walsync --help.")]
    struct WatchCmd {
        /// setting:databases
        #[argh(positional)]
        databases: Vec<String>,
        /// setting:dir
        #[argh(option)]
        dir: Vec<PathBuf>,
        /// setting:pattern
        #[argh(option)]
        pattern: Option<String>,
        /// setting:recursive
        #[argh(switch)]
        recursive: bool,
        /// setting:snapshot-interval
        #[argh(option)]
        snapshot_interval: Option<f64>,
        /// setting:min-interval
        #[argh(option)]
        min_interval: Option<f64>,
        /// setting:upload-workers
        #[argh(option)]
        upload_workers: Option<usize>,
        /// setting:poll
        #[argh(switch)]
        poll: bool,
        /// setting:shutdown-timeout
        #[argh(option)]
        shutdown_timeout: Option<f64>,
        /// setting:staging-limit
        #[argh(option)]
        staging_limit: Option<u64>,
        /// setting:retention
        #[argh(option)]
        retention: Option<String>,
        /// setting:exec
        #[argh(option)]
        exec: Option<String>,
        /// setting:metrics-addr
        #[argh(option)]
        metrics_addr: Option<String>,
        /// setting:heartbeat-url
        #[argh(option)]
        heartbeat_url: Option<String>,
        /// setting:heartbeat-interval
        #[argh(option)]
        heartbeat_interval: Option<f64>,
        /// setting:heartbeat-max-lag
        #[argh(option)]
        heartbeat_max_lag: Option<f64>,
    }
}

with_destination! {
    /// Store a full snapshot of a database now (starting a generation if it has none).
    #[derive(FromArgs)]
    #[argh(
        subcommand,
        name = "snapshot",
        note = "Exit codes: see walsync --help."
    )]
    struct SnapshotCmd {
        /// setting:database
        #[argh(positional)]
        database: PathBuf,
        /// setting:name
        #[argh(option)]
        name: Option<String>,
    }
}

with_destination! {
    /// List the databases backed up under a destination.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "list", note = "Exit codes: see walsync --help.")]
    struct ListCmd {
        /// setting:json
        #[argh(switch)]
        json: bool,
    }
}

with_destination! {
    /// Show how fresh each replica is: its newest stored commit and that commit's age.
    #[derive(FromArgs)]
    #[argh(
        subcommand,
        name = "status",
        note = "One LIST, no GETs. Exit codes: see walsync --help (3 if a NAME has no replica)."
    )]
    struct StatusCmd {
        /// setting:names
        #[argh(positional)]
        names: Vec<String>,
        /// setting:json
        #[argh(switch)]
        json: bool,
    }
}

with_destination! {
    /// Restore a database from its replica.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "restore", note = "Exit codes: see walsync --help.")]
    struct RestoreCmd {
        /// setting:restore-name
        #[argh(positional)]
        name: String,
        /// setting:output
        #[argh(option, short = 'o')]
        output: PathBuf,
        /// setting:point-in-time
        #[argh(option)]
        point_in_time: Option<String>,
        /// setting:generation
        #[argh(option)]
        generation: Option<String>,
        /// setting:force
        #[argh(switch)]
        force: bool,
        /// setting:if-db-not-exists
        #[argh(switch)]
        if_db_not_exists: bool,
        /// setting:if-replica-exists
        #[argh(switch)]
        if_replica_exists: bool,
        /// setting:restore-dry-run
        #[argh(switch)]
        dry_run: bool,
        /// setting:parallel
        #[argh(option, default = "4")]
        parallel: usize,
        /// setting:mode
        #[argh(option)]
        mode: Option<String>,
    }
}

with_destination! {
    /// Delete the backups no restore inside the retention window needs.
    #[derive(FromArgs)]
    #[argh(
        subcommand,
        name = "prune",
        note = "PRUNE_RULE\n\
                Exit codes: see walsync --help (3 if a NAME has no replica)."
    )]
    struct PruneCmd {
        /// setting:names
        #[argh(positional)]
        names: Vec<String>,
        /// setting:prune-retention
        #[argh(option)]
        retention: Option<String>,
        /// setting:prune-dry-run
        #[argh(switch)]
        dry_run: bool,
    }
}

/// Process-wide memory settings, made before anything else runs. walsync keeps two SQLite
/// connections and one thread per database, so per-connection and per-thread overheads,
/// small for one database, add up for a hundred: SQLite's lookaside (about 120 KiB per
/// connection) and its initial bulk page-cache allocation buy nothing for walsync's few
/// reads, and glibc's one malloc arena per thread keeps freed memory resident.
fn tune_memory() {
    // SAFETY: sqlite3_config must run before SQLite is initialised, which nothing has done
    // yet at the top of main; the arguments are the documented ones for these options.
    unsafe {
        use rusqlite::ffi;
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_LOOKASIDE,
            0 as libc::c_int,
            0 as libc::c_int,
        );
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PAGECACHE,
            std::ptr::null_mut::<libc::c_void>(),
            0 as libc::c_int,
            0 as libc::c_int,
        );
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    tune_memory();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.version {
        println!("walsync {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        eprintln!("walsync: error: a command is required (watch, snapshot, list, status, restore or prune); see walsync --help");
        return ExitCode::from(USAGE);
    };
    let (verbose, no_timestamps) = command.logging();
    let timestamps = match logging::timestamps(no_timestamps || cli.no_log_timestamps) {
        Ok(timestamps) => timestamps,
        Err(e) => {
            eprintln!("walsync: error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    logging::init(cli.verbose || verbose, timestamps);
    log::debug!("walsync {}", env!("CARGO_PKG_VERSION"));
    match run(command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("walsync: error: {e}");
            ExitCode::from(exit_code(e.kind()))
        }
    }
}

/// The exit status for an error, the same for every command (listed in `--help` and the
/// README). Bad flags, which argh reports before any of this runs, exit with [`USAGE`] too.
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Invalid => USAGE,
        ErrorKind::NotFound => 3,
        ErrorKind::Corrupt => 4,
        ErrorKind::Auth | ErrorKind::Transient => 5,
        ErrorKind::Io | ErrorKind::Sqlite | ErrorKind::Other => 1,
    }
}

/// Parse the command line, or the exit status after printing help (0) or a usage error
/// ([`USAGE`]; `argh::from_env` would exit 1, the status of any other error).
fn parse_args() -> std::result::Result<Cli, ExitCode> {
    let Some(args) = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string().ok())
        .collect::<Option<Vec<String>>>()
    else {
        eprintln!("walsync: error: arguments must be valid UTF-8");
        return Err(ExitCode::from(USAGE));
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if args.first() == Some(&"help") {
        return Err(help_command(&args[1..]));
    }
    Cli::from_args(&["walsync"], &args).map_err(|exit| match exit.status {
        Ok(()) => {
            let version = format!("walsync {}", env!("CARGO_PKG_VERSION"));
            println!(
                "{}",
                settings::render_help(&exit.output)
                    .replace(VERSION_PLACEHOLDER, &version)
                    .replace(PRUNE_RULE_PLACEHOLDER, help::PRUNE_RULE)
            );
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!(
                "walsync: error: {}\nRun walsync --help for more information.",
                exit.output.trim_end()
            );
            ExitCode::from(USAGE)
        }
    })
}

/// `walsync help [COMMAND]` (argh would take `help` for `--help`): a command's manual page,
/// or the list of commands.
fn help_command(args: &[&str]) -> ExitCode {
    match args {
        [] => {
            print!("{}", help::index());
            ExitCode::SUCCESS
        }
        [command] => match help::page(command) {
            Some(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "walsync: error: no command {command:?}; walsync help lists the commands"
                );
                ExitCode::from(USAGE)
            }
        },
        _ => {
            eprintln!("walsync: error: walsync help takes at most one command");
            ExitCode::from(USAGE)
        }
    }
}

/// Where a replica is and how to reach it: the settings every command shares, from flags
/// or from WALSYNC_BUCKET, WALSYNC_ENDPOINT and WALSYNC_S3_TIMEOUT.
struct StorageArgs {
    bucket: String,
    endpoint: Option<String>,
    s3_timeout: Duration,
    /// A `file://` directory must exist (see [`StorageArgs::existing`]).
    must_exist: bool,
}

impl StorageArgs {
    /// The settings from the flags given, else from their variables.
    fn lower(
        bucket: Option<String>,
        endpoint: Option<String>,
        s3_timeout: Option<f64>,
    ) -> Result<StorageArgs> {
        let bucket = settings::BUCKET
            .read(bucket)?
            .map(|(bucket, _)| bucket)
            .ok_or_else(|| {
                Error::invalid(
                    "no destination: pass -b s3://bucket/prefix (or file:///dir), \
                     or set WALSYNC_BUCKET",
                )
            })?;
        let endpoint = settings::ENDPOINT
            .read(endpoint)?
            .map(|(endpoint, _)| endpoint);
        let s3_timeout =
            settings::S3_TIMEOUT.seconds(s3_timeout, storage::s3::DEFAULT_TIMEOUT, false)?;
        Ok(StorageArgs {
            bucket,
            endpoint,
            s3_timeout,
            must_exist: false,
        })
    }

    /// The destination (as given) and its storage.
    fn open(self) -> Result<(String, Arc<dyn Storage>)> {
        let bucket = self.bucket;
        let dest = Destination::parse(&bucket)?;
        if let (Destination::File { root }, true) = (&dest, self.must_exist) {
            if !root.is_dir() {
                return Err(Error::not_found(format!(
                    "{bucket}: the directory {} does not exist (walsync watch and snapshot \
                     create it; check the path)",
                    root.display()
                )));
            }
        }
        let storage = storage::open_with_timeout(&dest, self.endpoint.as_deref(), self.s3_timeout)?;
        Ok((bucket, Arc::from(storage)))
    }

    /// For commands that only read or delete: a `file://` destination whose directory is
    /// missing is an error (not found), not an empty replica, so a mistyped path is not
    /// reported as "no replicas".
    fn existing(mut self) -> Self {
        self.must_exist = true;
        self
    }
}

/// The retention from `--retention` or WALSYNC_RETENTION (None if neither is given). A
/// variable that does not parse is named, never quoted.
fn retention_setting(
    setting: &settings::Setting,
    flag: Option<String>,
) -> Result<Option<Duration>> {
    let Some((text, from)) = setting.read(flag)? else {
        return Ok(None);
    };
    match internals::parse_duration(&text) {
        Ok(duration) => Ok(Some(duration)),
        Err(e) if Some(from) != setting.var => Err(e.with_context(from)),
        Err(_) => Err(Error::invalid(format!(
            "{from} must be a duration such as 24h, 90m, 7d or 3600s (0 keeps everything)"
        ))),
    }
}

/// Run a command; returns the exit status on success (0 except for `watch --exec`).
fn run(command: Command) -> Result<u8> {
    match command {
        Command::Watch(cmd) => return watch::watch(cmd),
        Command::Snapshot(cmd) => commands::snapshot_command(cmd)?,
        Command::List(cmd) => commands::list_command(cmd)?,
        Command::Status(cmd) => commands::status_command(cmd)?,
        Command::Restore(cmd) => commands::restore_command(cmd)?,
        Command::Prune(cmd) => commands::prune_command(cmd)?,
    }
    Ok(0)
}
