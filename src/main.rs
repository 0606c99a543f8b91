//! The `walsync` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use argh::FromArgs;

use std::time::Duration;

use walsync::error::{Error, Result};
use walsync::layout;
use walsync::replica::Replica;
use walsync::replicator::{Options, Replicator};
use walsync::restore::{self, RestoreOptions};
use walsync::storage::{self, Destination, Storage};
use walsync::utc::UtcTime;
use walsync::watcher::WatchMode;

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
    Watch(WatchCmd),
    Snapshot(SnapshotCmd),
    List(ListCmd),
    Restore(RestoreCmd),
}

/// Replicate databases continuously until SIGTERM or SIGINT.
#[derive(FromArgs)]
#[argh(subcommand, name = "watch")]
struct WatchCmd {
    /// databases to replicate, as PATH or PATH:NAME (each must be in WAL mode)
    #[argh(positional)]
    databases: Vec<String>,
    /// destination: s3://bucket/prefix or file:///dir
    #[argh(option, short = 'b')]
    bucket: String,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, else AWS)
    #[argh(option)]
    endpoint: Option<String>,
    /// seconds one S3 read or write may wait before the request fails and is retried
    /// (default 60)
    #[argh(option, default = "60.0")]
    s3_timeout: f64,
    /// seconds between snapshots of a changing database (default 3600)
    #[argh(option, default = "3600.0")]
    snapshot_interval: f64,
    /// under steady writes, ship each database at most this often, in seconds (default 1)
    #[argh(option, default = "1.0")]
    min_interval: f64,
    /// upload workers shared by all databases (default 2)
    #[argh(option, default = "2")]
    upload_workers: usize,
    /// poll files for changes instead of using inotify/kqueue
    #[argh(switch)]
    poll: bool,
    /// seconds to keep uploading after SIGTERM/SIGINT before giving up (default 30)
    #[argh(option, default = "30.0")]
    shutdown_timeout: f64,
    /// local disk each database may fill with staged segments while storage is slow or down,
    /// in MiB (default 1024); past it the WAL stays pinned and grows instead
    #[argh(option, default = "1024")]
    staging_limit: u64,
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
    /// seconds one S3 read or write may wait before the request fails and is retried
    /// (default 60)
    #[argh(option, default = "60.0")]
    s3_timeout: f64,
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
    /// seconds one S3 read or write may wait before the request fails and is retried
    /// (default 60)
    #[argh(option, default = "60.0")]
    s3_timeout: f64,
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
    /// seconds one S3 read or write may wait before the request fails and is retried
    /// (default 60)
    #[argh(option, default = "60.0")]
    s3_timeout: f64,
    /// restore the state as of this RFC 3339 time, e.g. 2026-01-10T12:00:00Z
    #[argh(option)]
    point_in_time: Option<String>,
    /// replace the output file if it exists
    #[argh(switch)]
    force: bool,
    /// downloads in flight at once (default 4)
    #[argh(option, default = "4")]
    parallel: usize,
    /// permission bits of the restored file, in octal, less the umask (default 0600)
    #[argh(option)]
    mode: Option<String>,
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
    let cli: Cli = argh::from_env();
    let default_level = if cli.verbose {
        "walsync=debug,info"
    } else {
        "walsync=info,warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        // ureq logs each request's URL at debug level and more at trace; presigned URLs carry
        // the session token (X-Amz-Security-Token) and the signature in their query. Keep the
        // HTTP client at info whatever RUST_LOG says, so `-v` and RUST_LOG=trace stay safe to
        // paste. (These directives come after RUST_LOG's and replace any it gave for them.)
        .filter_module("ureq", log::LevelFilter::Info)
        .filter_module("ureq_proto", log::LevelFilter::Info)
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

fn open_storage(bucket: &str, endpoint: Option<&str>, s3_timeout: f64) -> Result<Arc<dyn Storage>> {
    let dest = Destination::parse(bucket)?;
    let s3_timeout = seconds("--s3-timeout", s3_timeout)?;
    Ok(Arc::from(storage::open_with_timeout(
        &dest, endpoint, s3_timeout,
    )?))
}

/// Seconds from the command line as a Duration, refusing nonsense.
fn seconds(what: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero() || what == "--min-interval")
        .ok_or_else(|| Error::invalid(format!("{what} must be a positive number of seconds")))
}

/// `--mode`: octal permission bits such as `640` or `0640`.
fn parse_mode(text: &str) -> Result<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777 && !text.starts_with(['+', '-']))
        .ok_or_else(|| {
            Error::invalid(format!(
                "--mode {text:?}: expected octal permission bits such as 0640"
            ))
        })
}

/// Block SIGTERM and SIGINT in this thread and every thread started after, so that
/// [`wait_for_signal`] can take them synchronously.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a sigset_t we own; called before any thread is started.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait until SIGTERM or SIGINT arrives; returns its name.
fn wait_for_signal(set: &libc::sigset_t) -> &'static str {
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` is initialised and the signals in it are blocked in every thread.
    while unsafe { libc::sigwait(set, &mut signal) } != 0 {}
    if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

fn watch(cmd: WatchCmd) -> Result<()> {
    if cmd.databases.is_empty() {
        return Err(Error::invalid("watch needs at least one database"));
    }
    let signals = block_stop_signals();
    let options = Options {
        min_interval: seconds("--min-interval", cmd.min_interval)?,
        snapshot_interval: seconds("--snapshot-interval", cmd.snapshot_interval)?,
        upload_workers: cmd.upload_workers.max(1),
        staging_limit: cmd.staging_limit.saturating_mul(1024 * 1024),
        watch_mode: if cmd.poll {
            WatchMode::Poll
        } else {
            WatchMode::Auto
        },
        ..Options::default()
    };
    let shutdown_timeout = seconds("--shutdown-timeout", cmd.shutdown_timeout)?;
    let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref(), cmd.s3_timeout)?;
    let databases = layout::assign_names(&cmd.databases)?;
    let replicator = Replicator::start(storage, &databases, options)?;
    for (name, path) in replicator.databases() {
        println!("watching {} as {name}", path.display());
    }
    log::info!(
        "replicating {} database(s) to {} ({} events)",
        databases.len(),
        cmd.bucket,
        replicator.watch_backend()
    );
    let signal = wait_for_signal(&signals);
    log::info!(
        "{signal}: shipping what is left (up to {}s)",
        shutdown_timeout.as_secs_f64()
    );
    replicator.stop(shutdown_timeout)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Watch(cmd) => watch(cmd)?,
        Command::Snapshot(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref(), cmd.s3_timeout)?;
            let name = match cmd.name {
                Some(name) => name,
                None => layout::default_name(&cmd.database)?,
            };
            let mut replica = Replica::open(&cmd.database, storage, &name)?;
            let key = replica.snapshot()?;
            println!("{key}");
        }
        Command::List(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref(), cmd.s3_timeout)?;
            let listing = walsync::list::list(storage.as_ref())?;
            if cmd.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", listing.to_text());
            }
        }
        Command::Restore(cmd) => {
            let storage = open_storage(&cmd.bucket, cmd.endpoint.as_deref(), cmd.s3_timeout)?;
            let point_in_time = cmd
                .point_in_time
                .as_deref()
                .map(UtcTime::parse_rfc3339)
                .transpose()?;
            let options = RestoreOptions {
                point_in_time,
                force: cmd.force,
                parallelism: cmd.parallel.max(1),
                mode: cmd.mode.as_deref().map(parse_mode).transpose()?,
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
