//! The one-shot commands: `restore`, `snapshot`, `list`, `status` and `prune`. Each opens
//! the destination, does its one thing through the library (`walsync::restore`,
//! `Replica::snapshot`, `walsync::list`, `walsync::status`, the prune catalog), prints what
//! it did to stdout and returns; an error goes back to `main`, whose exit status comes from
//! its kind. What is here is the command line's part only: flags that contradict each other,
//! the `--if-*` short cuts, the dry-run reports, and the progress line on a terminal.

use std::path::Path;
use std::sync::Arc;

use walsync::storage::Storage;
use walsync::unstable as internals;
use walsync::{Error, ErrorKind, Generation, Replica, Result, UtcTime};
use walsync::{RestoreOptions, RestorePlan};

use crate::args::{retention_setting, ListCmd, PruneCmd, RestoreCmd, SnapshotCmd, StatusCmd};
use crate::{progress, settings, LOG_TARGET};

/// `walsync restore`.
pub fn restore_command(cmd: RestoreCmd) -> Result<()> {
    if cmd.force && cmd.if_db_not_exists {
        return Err(Error::invalid(
            "--force and --if-db-not-exists contradict each other; pass one",
        ));
    }
    if cmd.if_db_not_exists && cmd.output.exists() {
        log::info!(
            target: LOG_TARGET,
            "{} already exists; not restoring (--if-db-not-exists)",
            cmd.output.display()
        );
        return Ok(());
    }
    let point_in_time = cmd
        .point_in_time
        .as_deref()
        .map(UtcTime::parse_rfc3339)
        .transpose()?;
    let generation = cmd
        .generation
        .as_deref()
        .map(|text| {
            Generation::parse(text).ok_or_else(|| {
                Error::invalid(format!(
                    "--generation {text:?}: expected 16 lowercase hex digits, as `walsync list` \
                     shows them"
                ))
            })
        })
        .transpose()?;
    let options = RestoreOptions {
        point_in_time,
        force: cmd.force,
        parallelism: cmd.parallel.max(1),
        mode: cmd.mode.as_deref().map(parse_mode).transpose()?,
        generation,
    };
    let storage = match cmd.destination().and_then(|dest| dest.existing().open()) {
        Ok((_, storage)) => storage,
        // A file:// directory that does not exist holds no replica either.
        Err(e) if cmd.if_replica_exists && e.kind() == ErrorKind::NotFound => {
            log::info!(
                target: LOG_TARGET,
                "{e}: no replica of {:?}; not restoring (--if-replica-exists)",
                cmd.name
            );
            return Ok(());
        }
        Err(e) => {
            // A usage error (OUT exists) comes first, as when the destination is usable.
            internals::check_output(&cmd.output, cmd.force)?;
            return Err(e);
        }
    };
    let storage = with_progress(storage, "restore", !cmd.dry_run);
    if cmd.if_replica_exists && !internals::replica_exists(storage.as_ref(), &cmd.name)? {
        log::info!(
            target: LOG_TARGET,
            "no replica of {:?} in {}; not restoring (--if-replica-exists)",
            cmd.name,
            storage.describe()
        );
        return Ok(());
    }
    if cmd.dry_run {
        internals::check_output(&cmd.output, cmd.force)?;
        let plan = internals::plan_in(
            storage.as_ref(),
            &cmd.name,
            options.point_in_time,
            options.generation.as_ref(),
        )?;
        print!("{}", describe_plan(&plan, storage.as_ref(), &cmd.output));
        return Ok(());
    }
    let plan = walsync::restore(storage.as_ref(), &cmd.name, &cmd.output, &options);
    progress::finish();
    let plan = plan?;
    log::info!(
        target: LOG_TARGET,
        "restored {} to {} from generation {} (snapshot {} + {} segments, as of {})",
        cmd.name,
        cmd.output.display(),
        plan.generation,
        plan.snapshot.name.index,
        plan.segments.len(),
        plan.restored_to()
    );
    Ok(())
}

/// With `wanted` and stderr a terminal, turn on the progress line for `command` and count
/// `storage`'s downloads and uploads in it.
fn with_progress(
    storage: Arc<dyn Storage>,
    command: &'static str,
    wanted: bool,
) -> Arc<dyn Storage> {
    if !wanted || !progress::stderr_is_terminal() {
        return storage;
    }
    progress::enable(command);
    Arc::new(progress::Counted(storage))
}

/// `restore --dry-run`'s report: what a restore would download, from [`internals::plan_in`].
fn describe_plan(plan: &RestorePlan, storage: &dyn Storage, output: &Path) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run: would restore {} from {} to {} (nothing downloaded or written)",
        plan.name,
        storage.describe(),
        output.display()
    );
    let _ = writeln!(out, "generation   {}", plan.generation);
    let _ = writeln!(
        out,
        "snapshot     {}  {} bytes",
        plan.snapshot.key, plan.snapshot.size
    );
    for segment in &plan.segments {
        let _ = writeln!(out, "segment      {}  {} bytes", segment.key, segment.size);
    }
    for other in &plan.alternatives {
        let _ = writeln!(out, "duplicate    {}  {} bytes", other.key, other.size);
    }
    let total = plan.snapshot.size + plan.segments.iter().map(|s| s.size).sum::<u64>();
    let _ = writeln!(
        out,
        "total        {total} bytes (1 snapshot, {} segments)",
        plan.segments.len()
    );
    if plan.alternatives.is_empty() {
        let _ = writeln!(out, "restores to  {}", plan.restored_to());
    } else {
        let extra: u64 = plan.alternatives.iter().map(|s| s.size).sum();
        let _ = writeln!(out, "restores to  at most {}", plan.restored_to());
        let _ = writeln!(
            out,
            "note: some indexes were cut more than once (the duplicates above, {extra} bytes \
             more); duplicates are resolved at download time by the segment chain, which may \
             choose another cut or end the restore earlier"
        );
    }
    out
}

/// `--mode`: octal permission bits such as `640` or `0640`.
pub fn parse_mode(text: &str) -> Result<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777 && !text.starts_with(['+', '-']))
        .ok_or_else(|| {
            Error::invalid(format!(
                "--mode {text:?}: expected octal permission bits such as 0640"
            ))
        })
}

/// `walsync snapshot`.
pub fn snapshot_command(cmd: SnapshotCmd) -> Result<()> {
    let (_, storage) = cmd.destination()?.open()?;
    let name = match cmd.name {
        Some(name) => name,
        None => internals::default_name(&cmd.database)?,
    };
    let storage = with_progress(storage, "snapshot", true);
    let mut replica = Replica::open(&cmd.database, storage, &name)?;
    replica.set_progress(Arc::new(progress::Terminal));
    let key = replica.snapshot();
    progress::finish();
    println!("{}", key?);
    Ok(())
}

/// `walsync list`.
pub fn list_command(cmd: ListCmd) -> Result<()> {
    let (_, storage) = cmd.destination()?.existing().open()?;
    let listing = walsync::list(storage.as_ref())?;
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", listing.to_text());
    }
    Ok(())
}

/// `walsync status`.
pub fn status_command(cmd: StatusCmd) -> Result<()> {
    let (_, storage) = cmd.destination()?.existing().open()?;
    let status = walsync::status(storage.as_ref(), &cmd.names, None)?;
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}

/// `walsync prune`.
pub fn prune_command(cmd: PruneCmd) -> Result<()> {
    let retention = retention_setting(&settings::PRUNE_RETENTION, cmd.retention.clone())?
        .ok_or_else(|| {
            Error::invalid(
                "no retention: pass --retention DURATION (such as 24h or 7d; 0 keeps everything), \
             or set WALSYNC_RETENTION",
            )
        })?;
    for name in &cmd.names {
        internals::validate_name(name)?;
    }
    let (_, storage) = cmd.destination()?.existing().open()?;
    let catalog = internals::catalog(storage.as_ref())?;
    let now = UtcTime::now();
    if cmd.dry_run {
        println!(
            "dry run: nothing is deleted from {} (retention {}, now {now})",
            storage.describe(),
            internals::format_duration(retention)
        );
    }
    let plans = internals::prune_catalog(
        storage.as_ref(),
        &catalog,
        &cmd.names,
        now,
        retention,
        cmd.dry_run,
        |plan, done| {
            if !done {
                for object in &plan.delete {
                    println!("would delete  {}  {} bytes", object.key, object.size);
                }
            }
            println!("{}", plan.summary(done));
        },
    )?;
    if plans.is_empty() {
        println!("no replicas in {}", storage.describe());
    } else if cmd.dry_run {
        let objects: usize = plans.iter().map(|p| p.delete.len()).sum();
        let bytes: u64 = plans.iter().map(|p| p.bytes).sum();
        println!("dry run total: would delete {objects} objects, {bytes} bytes freed");
    }
    Ok(())
}
