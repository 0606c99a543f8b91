//! What the command line accepts: argh's structs for `walsync` and its six commands, and the
//! settings more than one command lowers (the destination, [`StorageArgs`], and the
//! retention). argh reads the flags; what each one means, its default and its variable are
//! in `settings.rs`, which `--help` takes them from, so a field's doc here is only its
//! `setting:ID`. The rest of a command's values are lowered beside the command that uses
//! them, in `watch.rs` and `commands.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use argh::FromArgs;
use walsync::storage::{self, Destination, Storage};
use walsync::unstable as internals;
use walsync::{Error, Result};

use crate::settings;

/// The placeholder for the version in the top-level help (argh takes only literals there).
pub const VERSION_PLACEHOLDER: &str = "walsync VERSION";

/// The placeholder for prune's rule in `walsync prune --help`: the text is
/// [`crate::help::PRUNE_RULE`], which `walsync help prune` shows too.
pub const PRUNE_RULE_PLACEHOLDER: &str = "PRUNE_RULE";

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
pub struct Cli {
    /// setting:verbose
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// setting:no-log-timestamps
    #[argh(switch)]
    pub no_log_timestamps: bool,
    /// setting:version
    #[argh(switch)]
    pub version: bool,
    #[argh(subcommand)]
    pub command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum Command {
    Watch(WatchCmd),
    Snapshot(SnapshotCmd),
    List(ListCmd),
    Status(StatusCmd),
    Restore(RestoreCmd),
    Prune(PruneCmd),
}

impl Command {
    /// `-v` and `--no-log-timestamps` as given after the command.
    pub fn logging(&self) -> (bool, bool) {
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
        $vis:vis struct $name:ident {
            $($fields:tt)*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
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
            pub fn destination(&self) -> Result<StorageArgs> {
                StorageArgs::lower(self.bucket.clone(), self.endpoint.clone(), self.s3_timeout)
            }
        }
    };
}

with_destination! {
    /// Replicate databases continuously until SIGTERM or SIGINT.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "watch", note = "Exit codes: see walsync --help.")]
    pub struct WatchCmd {
        /// setting:databases
        #[argh(positional)]
        pub databases: Vec<String>,
        /// setting:dir
        #[argh(option)]
        pub dir: Vec<PathBuf>,
        /// setting:pattern
        #[argh(option)]
        pub pattern: Option<String>,
        /// setting:recursive
        #[argh(switch)]
        pub recursive: bool,
        /// setting:snapshot-interval
        #[argh(option)]
        pub snapshot_interval: Option<f64>,
        /// setting:min-interval
        #[argh(option)]
        pub min_interval: Option<f64>,
        /// setting:upload-workers
        #[argh(option)]
        pub upload_workers: Option<usize>,
        /// setting:poll
        #[argh(switch)]
        pub poll: bool,
        /// setting:shutdown-timeout
        #[argh(option)]
        pub shutdown_timeout: Option<f64>,
        /// setting:staging-limit
        #[argh(option)]
        pub staging_limit: Option<u64>,
        /// setting:retention
        #[argh(option)]
        pub retention: Option<String>,
        /// setting:exec
        #[argh(option)]
        pub exec: Option<String>,
        /// setting:metrics-addr
        #[argh(option)]
        pub metrics_addr: Option<String>,
        /// setting:heartbeat-url
        #[argh(option)]
        pub heartbeat_url: Option<String>,
        /// setting:heartbeat-interval
        #[argh(option)]
        pub heartbeat_interval: Option<f64>,
        /// setting:heartbeat-max-lag
        #[argh(option)]
        pub heartbeat_max_lag: Option<f64>,
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
    pub struct SnapshotCmd {
        /// setting:database
        #[argh(positional)]
        pub database: PathBuf,
        /// setting:name
        #[argh(option)]
        pub name: Option<String>,
    }
}

with_destination! {
    /// List the databases backed up under a destination.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "list", note = "Exit codes: see walsync --help.")]
    pub struct ListCmd {
        /// setting:json
        #[argh(switch)]
        pub json: bool,
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
    pub struct StatusCmd {
        /// setting:names
        #[argh(positional)]
        pub names: Vec<String>,
        /// setting:json
        #[argh(switch)]
        pub json: bool,
    }
}

with_destination! {
    /// Restore a database from its replica.
    #[derive(FromArgs)]
    #[argh(subcommand, name = "restore", note = "Exit codes: see walsync --help.")]
    pub struct RestoreCmd {
        /// setting:restore-name
        #[argh(positional)]
        pub name: String,
        /// setting:output
        #[argh(option, short = 'o')]
        pub output: PathBuf,
        /// setting:point-in-time
        #[argh(option)]
        pub point_in_time: Option<String>,
        /// setting:generation
        #[argh(option)]
        pub generation: Option<String>,
        /// setting:force
        #[argh(switch)]
        pub force: bool,
        /// setting:if-db-not-exists
        #[argh(switch)]
        pub if_db_not_exists: bool,
        /// setting:if-replica-exists
        #[argh(switch)]
        pub if_replica_exists: bool,
        /// setting:restore-dry-run
        #[argh(switch)]
        pub dry_run: bool,
        /// setting:parallel
        #[argh(option, default = "4")]
        pub parallel: usize,
        /// setting:mode
        #[argh(option)]
        pub mode: Option<String>,
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
    pub struct PruneCmd {
        /// setting:names
        #[argh(positional)]
        pub names: Vec<String>,
        /// setting:prune-retention
        #[argh(option)]
        pub retention: Option<String>,
        /// setting:prune-dry-run
        #[argh(switch)]
        pub dry_run: bool,
    }
}

/// Where a replica is and how to reach it: the settings every command shares, from flags
/// or from WALSYNC_BUCKET, WALSYNC_ENDPOINT and WALSYNC_S3_TIMEOUT.
pub struct StorageArgs {
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
    pub fn open(self) -> Result<(String, Arc<dyn Storage>)> {
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
    pub fn existing(mut self) -> Self {
        self.must_exist = true;
        self
    }
}

/// The retention from `--retention` or WALSYNC_RETENTION (None if neither is given). A
/// variable that does not parse is named, never quoted.
pub fn retention_setting(
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
