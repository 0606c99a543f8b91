//! The `walsync` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use argh::FromArgs;

use walsync::error::Result;
use walsync::layout;
use walsync::replica::Replica;
use walsync::restore::{self, RestoreOptions};
use walsync::storage::{self, Destination, Storage};
use walsync::utc::UtcTime;

/// Back up SQLite databases in WAL mode to S3-compatible storage, and restore them.
#[derive(FromArgs)]
struct Cli {
    /// log more (debug level); RUST_LOG overrides
    #[argh(switch, short = 'v')]
    verbose: bool,
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Snapshot(SnapshotCmd),
    List(ListCmd),
    Restore(RestoreCmd),
}

/// Store a full snapshot of a database now (starting a generation if it has none).
#[derive(FromArgs)]
#[argh(subcommand, name = "snapshot")]
struct SnapshotCmd {
    /// the database file (must be in WAL mode)
    #[argh(positional)]
    database: PathBuf,
    /// destination: s3://bucket/prefix or file:///dir
    #[argh(option, short = 'b')]
    bucket: String,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, else AWS)
    #[argh(option)]
    endpoint: Option<String>,
    /// replica name (default: the file name without extension)
    #[argh(option)]
    name: Option<String>,
}

/// List the databases backed up under a destination.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// destination: s3://bucket/prefix or file:///dir
    #[argh(option, short = 'b')]
    bucket: String,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, else AWS)
    #[argh(option)]
    endpoint: Option<String>,
    /// print JSON (a stable format for scripts)
    #[argh(switch)]
    json: bool,
}

/// Restore a database from its replica.
#[derive(FromArgs)]
#[argh(subcommand, name = "restore")]
struct RestoreCmd {
    /// replica name, as shown by `walsync list`
    #[argh(positional)]
    name: String,
    /// output database file
    #[argh(option, short = 'o')]
    output: PathBuf,
    /// destination: s3://bucket/prefix or file:///dir
    #[argh(option, short = 'b')]
    bucket: String,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, else AWS)
    #[argh(option)]
    endpoint: Option<String>,
    /// restore the state as of this RFC 3339 time, e.g. 2026-01-10T12:00:00Z
    #[argh(option)]
    point_in_time: Option<String>,
    /// replace the output file if it exists
    #[argh(switch)]
    force: bool,
    /// downloads in flight at once (default 4)
    #[argh(option, default = "4")]
    parallel: usize,
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    let default_level = if cli.verbose {
        "walsync=debug,info"
    } else {
        "walsync=info,warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walsync: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_storage(bucket: &str, endpoint: Option<&str>) -> Result<Arc<dyn Storage>> {
    let dest = Destination::parse(bucket)?;
    Ok(Arc::from(storage::open(&dest, endpoint)?))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Snapshot(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref())?;
            let name = match cmd.name {
                Some(name) => name,
                None => layout::default_name(&cmd.database)?,
            };
            let mut replica = Replica::open(&cmd.database, storage, &name)?;
            let key = replica.snapshot()?;
            println!("{key}");
        }
        Command::List(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref())?;
            let listing = walsync::list::list(storage.as_ref())?;
            if cmd.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", listing.to_text());
            }
        }
        Command::Restore(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref())?;
            let point_in_time = cmd
                .point_in_time
                .as_deref()
                .map(UtcTime::parse_rfc3339)
                .transpose()?;
            let options = RestoreOptions {
                point_in_time,
                force: cmd.force,
                parallelism: cmd.parallel.max(1),
            };
            let plan = restore::restore(storage.as_ref(), &cmd.name, &cmd.output, &options)?;
            log::info!(
                "restored {} to {} from generation {} (snapshot {} + {} segments, as of {})",
                cmd.name,
                cmd.output.display(),
                plan.generation,
                plan.snapshot.name.index,
                plan.segments.len(),
                plan.restored_to()
            );
        }
    }
    Ok(())
}
