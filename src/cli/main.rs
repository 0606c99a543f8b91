//! The `walsync` command line: a thin layer over the library.
//!
//! This file is the entry: it tunes memory before SQLite starts, parses the arguments
//! (answering `--help`, `--version` and `walsync help` itself), starts logging, runs the
//! command and turns its error's kind into the exit status, one table for every command.
//! What the command line accepts is in `args.rs`; `watch.rs` runs `watch`, the one
//! long-running command, and `commands.rs` the one-shot ones.

use std::process::ExitCode;

use argh::FromArgs;

mod args;
mod commands;
mod heartbeat;
mod help;
mod logging;
mod metrics_server;
mod progress;
mod settings;
mod supervise;
mod watch;

use args::{Cli, Command};
use walsync::{ErrorKind, Result};

/// Exit status of a command-line usage error (bad flags included).
const USAGE: u8 = 2;

/// The log target of what the commands themselves say (`INFO  walsync: watching ...`): the
/// binary's name, not the module that says it. The lines read as walsync's own, and a
/// `RUST_LOG` filter written for them keeps working whichever file the code is in.
const LOG_TARGET: &str = "walsync";

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
    walsync::keep_shared_maps_apart();
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
                    .replace(args::VERSION_PLACEHOLDER, &version)
                    .replace(args::PRUNE_RULE_PLACEHOLDER, help::PRUNE_RULE)
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
