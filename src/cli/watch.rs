//! `walsync watch`: the one long-running command. Its flags and WALSYNC_* variables are
//! lowered into [`WatchSettings`] before anything starts, so a bad value is a usage error with
//! nothing done yet. Then the replicator starts on the named databases, the directories are
//! scanned and watched, the metrics listener and the heartbeat come up, and walsync waits:
//! for SIGTERM or SIGINT, for the `--exec` child to exit, or for every database to have
//! failed. Whichever it is, what is staged is shipped (up to the shutdown timeout) before
//! `watch` returns the exit status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use walsync::unstable as internals;
use walsync::{Error, Options, Replicator, Result, WatchMode};

use crate::args::{retention_setting, StorageArgs, WatchCmd};
use crate::heartbeat::{self, Heartbeat};
use crate::{metrics_server, settings, supervise, LOG_TARGET};

/// `walsync watch`'s settings, lowered from its flags and WALSYNC_* variables before
/// anything starts: a bad value is a usage error with nothing done yet.
struct WatchSettings {
    directories: Vec<walsync::DirectorySpec>,
    databases: Vec<String>,
    /// The `--exec` command, if any (blank counts as none).
    exec: Option<String>,
    options: Options,
    shutdown_timeout: Duration,
    /// `--metrics-addr`, bound once the rest is known to be good.
    metrics_addr: Option<String>,
    /// The heartbeat's URL, interval and lag bound.
    heartbeat: Option<(url::Url, Duration, Duration)>,
    storage: StorageArgs,
}

impl WatchCmd {
    /// The settings, in the order their errors were always reported.
    fn lower(&self) -> Result<WatchSettings> {
        let directories = self.directories()?;
        let databases = self.database_specs(!directories.is_empty())?;
        let exec = settings::EXEC
            .read(self.exec.clone())?
            .map(|(command, _)| command)
            .filter(|command| !command.trim().is_empty());
        let (options, shutdown_timeout) = self.options()?;
        let metrics_addr = settings::METRICS_ADDR
            .read(self.metrics_addr.clone())?
            .map(|(addr, _)| addr.trim().to_string());
        let heartbeat = self.heartbeat(options.min_interval)?;
        let storage = self.destination()?;
        Ok(WatchSettings {
            directories,
            databases,
            exec,
            options,
            shutdown_timeout,
            metrics_addr,
            heartbeat,
            storage,
        })
    }

    /// The replicator's options and the shutdown timeout.
    fn options(&self) -> Result<(Options, Duration)> {
        let defaults = Options::default();
        let mut options = Options {
            min_interval: settings::MIN_INTERVAL.seconds(
                self.min_interval,
                defaults.min_interval,
                true,
            )?,
            snapshot_interval: settings::SNAPSHOT_INTERVAL.seconds(
                self.snapshot_interval,
                defaults.snapshot_interval,
                false,
            )?,
            upload_workers: settings::UPLOAD_WORKERS
                .read(self.upload_workers)?
                .map_or(defaults.upload_workers, |(n, _)| n)
                .max(1),
            staging_limit: settings::STAGING_LIMIT
                .read(self.staging_limit)?
                .map_or(defaults.staging_limit, |(mib, _): (u64, _)| {
                    mib.saturating_mul(1024 * 1024)
                }),
            retention: retention_setting(&settings::RETENTION, self.retention.clone())?
                .unwrap_or(defaults.retention),
            watch_mode: if self.poll {
                WatchMode::Poll
            } else {
                WatchMode::Auto
            },
            ..defaults
        };
        let shutdown_timeout =
            settings::SHUTDOWN_TIMEOUT.seconds(self.shutdown_timeout, SHUTDOWN_TIMEOUT, false)?;
        // A database leaving a watched directory ships what it staged as at a stop.
        options.removal_timeout = shutdown_timeout;
        Ok((options, shutdown_timeout))
    }

    /// The databases to watch: the arguments, else WALSYNC_DATABASES (for service files:
    /// PATH or PATH:NAME, separated by whitespace). None at all is fine when directories
    /// are watched (`with_dirs`).
    fn database_specs(&self, with_dirs: bool) -> Result<Vec<String>> {
        let specs = settings::DATABASES.list(&self.databases)?;
        if specs.is_empty() && !with_dirs {
            return Err(Error::invalid(
                "watch needs at least one database: pass DB[:NAME]... or --dir DIR, or set \
                 WALSYNC_DATABASES or WALSYNC_DIR",
            ));
        }
        Ok(specs)
    }

    /// The directories to watch: `--dir`, else WALSYNC_DIR (separated by whitespace), with
    /// `--pattern` (or WALSYNC_PATTERN) and `--recursive` (or WALSYNC_RECURSIVE).
    fn directories(&self) -> Result<Vec<walsync::DirectorySpec>> {
        let dirs: Vec<PathBuf> = if self.dir.is_empty() {
            settings::DIR
                .list(&[])?
                .into_iter()
                .map(PathBuf::from)
                .collect()
        } else {
            self.dir.clone()
        };
        let pattern = settings::PATTERN.read(self.pattern.clone())?;
        if pattern.is_some() && dirs.is_empty() {
            return Err(Error::invalid(
                "--pattern applies to --dir (or WALSYNC_DIR), and none is given",
            ));
        }
        let recursive = settings::RECURSIVE.switch(self.recursive)?;
        dirs.into_iter()
            .map(|dir| {
                let spec = walsync::DirectorySpec::new(dir).recursive(recursive);
                match &pattern {
                    Some((glob, _)) => spec.pattern(glob.trim()),
                    None => Ok(spec),
                }
            })
            .collect()
    }

    /// The heartbeat's URL, interval and lag bound, if it has a URL.
    fn heartbeat(&self, min_interval: Duration) -> Result<Option<(url::Url, Duration, Duration)>> {
        let Some((text, from)) = settings::HEARTBEAT_URL.read(self.heartbeat_url.clone())? else {
            return Ok(None);
        };
        let url = heartbeat::parse_url(text.trim(), from)?;
        let interval = settings::HEARTBEAT_INTERVAL.seconds(
            self.heartbeat_interval,
            HEARTBEAT_INTERVAL,
            false,
        )?;
        let max_lag = settings::HEARTBEAT_MAX_LAG.seconds(
            self.heartbeat_max_lag,
            heartbeat::default_max_lag(min_interval),
            false,
        )?;
        Ok(Some((url, interval, max_lag)))
    }
}

/// Shutdown timeout unless `--shutdown-timeout` or WALSYNC_SHUTDOWN_TIMEOUT says otherwise.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Heartbeat interval unless `--heartbeat-interval` or WALSYNC_HEARTBEAT_INTERVAL says
/// otherwise.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Wait for SIGTERM or SIGINT, or until every database's thread has failed (see
/// [`Replicator::all_failed`]): the signal, and whether it was the failure. A watcher thread
/// looks twice a second and then sends walsync its own SIGTERM, since the main thread
/// waits in sigwait for the blocked signals.
fn wait_for_stop_or_failure(
    signals: &supervise::Signals,
    replicator: &Replicator,
) -> (libc::c_int, bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stopped = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let signal = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(500));
                if replicator.all_failed() {
                    failed.store(true, Ordering::Relaxed);
                    // SAFETY: kill(2) on our own process id.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    return;
                }
            }
        });
        let signal = signals.wait_for_stop();
        stopped.store(true, Ordering::Relaxed);
        signal
    });
    (signal, failed.load(Ordering::Relaxed))
}

/// `walsync watch`; returns the exit status (0, or the `--exec` command's).
pub fn watch(cmd: WatchCmd) -> Result<u8> {
    let WatchSettings {
        directories,
        databases,
        exec,
        options,
        shutdown_timeout,
        metrics_addr,
        heartbeat,
        storage,
    } = cmd.lower()?;
    let signals = supervise::block_signals(exec.is_some());
    let metrics = metrics_addr
        .map(|addr| metrics_server::bind(&addr))
        .transpose()?;
    let (destination, storage) = storage.open()?;
    let databases = internals::assign_names(&databases)?;
    let retention = options.retention;
    // Each database keeps about six files open (two SQLite connections with their WAL
    // files, the shared-memory file, the sidecar lock); 1024, a common default, is too few
    // for a few hundred databases. Raised before any is opened. The host's limits are
    // judged for the named databases, and again once the directories have been scanned.
    let open_files = internals::raise_open_files_limit();
    let inotify = options.watch_mode == WatchMode::Auto && cfg!(target_os = "linux");
    let limits = internals::host_limits(open_files, inotify);
    // `uncounted`: databases found but not among `paths` (kept out by a limit, say).
    let judge_limit = |paths: &mut dyn Iterator<Item = &Path>, uncounted: u64| {
        let mut count = uncounted;
        let mut dirs = std::collections::HashSet::new();
        for path in paths {
            count += 1;
            dirs.insert(path.parent().map(Path::to_path_buf));
        }
        for warning in internals::limit_warnings(&limits, count, dirs.len() as u64) {
            log::warn!(target: LOG_TARGET, "{warning}");
        }
    };
    judge_limit(&mut databases.iter().map(|(path, _)| path.as_path()), 0);
    let replicator = Replicator::start(storage, &databases, options)?;
    for (name, path) in replicator.databases() {
        log::info!(target: LOG_TARGET, "watching {} as {name}", path.display());
    }
    // Named databases first: a file in a directory that would take one's name is refused.
    let mut found = 0;
    for spec in directories {
        match replicator.watch_directory(spec) {
            Ok(files) => found += files,
            Err(e) => {
                if let Err(stop) = replicator.stop(shutdown_timeout) {
                    log::error!(target: LOG_TARGET, "{stop}");
                }
                return Err(e);
            }
        }
    }
    // What the directories hold, not only what could be opened: the databases a limit kept
    // out are the ones the warning is for. Both lists go once counted: this frame lives as
    // long as walsync does, and they hold a name and a path a database.
    let count = {
        let replicated = replicator.databases();
        if found > 0 {
            let kept_out = (databases.len() + found).saturating_sub(replicated.len()) as u64;
            judge_limit(
                &mut replicated.iter().map(|(_, path)| path.as_path()),
                kept_out,
            );
        }
        replicated.len()
    };
    drop(databases);
    let retention = match retention {
        r if r.is_zero() => "keeping every backup".to_string(),
        r => format!("retention {}", internals::format_duration(r)),
    };
    log::info!(
        target: LOG_TARGET,
        "replicating {count} database(s) to {destination} ({} events, {retention})",
        replicator.watch_backend()
    );
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            log::info!(target: LOG_TARGET, "serving metrics on http://{addr}/metrics");
        }
        metrics_server::serve(listener, replicator.metrics_source())?;
    }
    let heartbeat = match heartbeat {
        Some((url, interval, max_lag)) => {
            log::info!(
                target: LOG_TARGET,
                "heartbeat to {} every {}s while every database's lag is under {}s",
                heartbeat::redacted(&url),
                interval.as_secs_f64(),
                max_lag.as_secs_f64()
            );
            Some(Heartbeat::start(
                url,
                interval,
                max_lag,
                replicator.metrics_source(),
            )?)
        }
        None => None,
    };
    let Some(command) = exec else {
        let (signal, failed) = wait_for_stop_or_failure(&signals, &replicator);
        drop(heartbeat);
        if failed {
            // Whatever is staged stays for the next start; the errors were logged.
            let _ = replicator.stop(shutdown_timeout);
            return Err(Error::invalid(
                "no database is being replicated any more (see the errors above)",
            ));
        }
        log::info!(
            target: LOG_TARGET,
            "{}: shipping what is left (up to {}s)",
            supervise::signal_name(signal),
            shutdown_timeout.as_secs_f64()
        );
        replicator.stop(shutdown_timeout)?;
        return Ok(0);
    };
    let status = supervise::Supervised::start(&command).and_then(|child| child.wait(&signals));
    drop(heartbeat);
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            // Still ship what is committed; the error is what gets reported.
            if let Err(stop) = replicator.stop(shutdown_timeout) {
                log::error!(target: LOG_TARGET, "{stop}");
            }
            return Err(e);
        }
    };
    log::info!(
        target: LOG_TARGET,
        "--exec command exited ({status}): shipping what is left (up to {}s)",
        shutdown_timeout.as_secs_f64()
    );
    replicator.stop(shutdown_timeout)?;
    Ok(supervise::child_exit_code(status))
}
