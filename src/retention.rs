//! Retention: which objects of a replica may be deleted so that every point in time inside
//! the retention window stays restorable exactly as it was.
//!
//! # The rule
//!
//! Let `W = now - retention`. Every point `t >= W` must restore afterwards exactly as
//! [`crate::restore`](mod@crate::restore) restores it before: with `--point-in-time t`,
//! without it (the latest), and with `--generation` naming the newest generation. So, from
//! one listing of the replica:
//!
//! - `S*` is the snapshot restore would choose for `t = W`: the greatest
//!   `(time, generation, index)` with `time <= W`, where a snapshot's time is the one restore
//!   chooses it by (its label, or an earlier label of an object after it, after a clock
//!   glitch: see `restore::snapshot_times`). If there is none, nothing is deleted: the
//!   window reaches back before the first backup.
//! - Kept snapshots: `S*` and every snapshot ordered after it in that order (for any
//!   `t >= W` restore chooses one of them, since `S*` itself qualifies), the snapshot the
//!   newest generation alone would use at `W` (`--generation` newest; it differs from `S*`
//!   only after the clock stepped back), and always the newest snapshot of the newest
//!   generation, whatever the times say: a clock stepped forward must not delete the latest
//!   backup.
//! - Kept segments: in each generation with a kept snapshot, every segment whose index is at
//!   least the smallest kept snapshot index there (restore applies the segments after its
//!   snapshot, and uses other cuts of the snapshot's own index as alternatives for the chain
//!   check); and everything ordered after the newest snapshot by (generation, index),
//!   including a newer generation that has no snapshot in this listing yet.
//! - Everything else is deleted: older snapshots, the segments only they needed, and whole
//!   generations none of whose snapshots is kept (also generations left with segments only).
//!   Never `state.json`, nor any key that does not parse as a walsync object name of this
//!   replica: the plan only ever holds objects of the [`Catalog`] listing.
//!
//! Deleting only objects a kept restore does not read leaves every kept restore unchanged:
//! the unit tests (`retention/tests.rs`) check it against [`restore::choose`] itself, for
//! every point in the window, on replicas with several generations, duplicate cuts and
//! stepped clocks.
//!
//! # Order, and interrupted prunes
//!
//! Deletions go snapshots first, then segments, each oldest first (generation, then index).
//! Batched deletes (S3 DeleteObjects) do not promise an order inside a batch, so ordering
//! by kind is what keeps every intermediate state restorable: while snapshots are being
//! deleted every remaining snapshot still has all its segments; once they are gone the
//! segments being deleted are read by no remaining snapshot. An interrupted prune may leave
//! a generation with segments only; restore never starts from a generation without a
//! snapshot, and the next prune deletes them.
//!
//! # Why pruning cannot race a running `walsync watch`
//!
//! The writer only ever adds objects ordered after what storage already holds: segments of
//! its current generation, numbered after everything it has stored (staged objects upload
//! one at a time, in order; a generation's base snapshot uploads before its segments; see
//! [`crate::replica`]); snapshots of that generation at its current index; and new
//! generations, whose ids sort after the newest generation in storage
//! ([`crate::layout::Generation::after`], given the newest generation listed when the
//! replica opened, and the writer's own tip). Pruning deletes only objects of its listing,
//! and only ones ordered before snapshots it keeps; the writer's current generation is the
//! newest, whose newest snapshot and everything after it are always kept. So an object the
//! writer adds during a prune is never deleted, and never needs one that is: a new segment
//! continues the kept tail, a new snapshot is self-contained. A listing taken while a new
//! generation is being written (its base snapshot not listed yet, its first segments
//! listed) keeps that generation whole, by the (generation, index) rule above.
//!
//! One case re-adds an object instead: a writer killed after an upload but before it
//! dropped the staged copy uploads the same object again on its next start; if a prune
//! deleted it meanwhile, the old object comes back (it is older than every kept restore
//! needs, changes none of them, and the next prune deletes it again).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::layout::{self, Catalog, Generation, GenerationObjects, ObjectKind, StoredObject};
use crate::restore;
use crate::storage::Storage;
use crate::utc::UtcTime;

/// The retention `walsync watch` applies unless told otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What pruning one replica deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunePlan {
    pub name: String,
    /// `now - retention`: every point from here on stays restorable. None when the
    /// retention is zero (keep everything).
    pub window_start: Option<UtcTime>,
    /// `S*`: the snapshot a restore to `window_start` starts from; None when nothing is
    /// older than the window (or the retention is zero), and then nothing is deleted.
    pub base: Option<StoredObject>,
    /// The objects to delete, in deletion order (see the module docs).
    pub delete: Vec<StoredObject>,
    /// Bytes the deletions free.
    pub bytes: u64,
    /// When pruning this listing again could delete more: once the window passes the next
    /// snapshot after `base`. None when only a new snapshot can change that (a database
    /// that stays idle then costs no more requests).
    pub next_due: Option<UtcTime>,
}

impl PrunePlan {
    pub fn keys(&self) -> Vec<String> {
        self.delete.iter().map(|o| o.key.clone()).collect()
    }

    pub fn snapshots(&self) -> usize {
        self.delete
            .iter()
            .filter(|o| o.name.kind == ObjectKind::Snapshot)
            .count()
    }

    pub fn segments(&self) -> usize {
        self.delete.len() - self.snapshots()
    }

    /// One line for people: what was (or would be) deleted, and from when the replica
    /// stays restorable.
    pub fn summary(&self, done: bool) -> String {
        let verb = if done { "deleted" } else { "would delete" };
        let Some(window) = self.window_start else {
            return format!("{}: retention 0: keeping everything", self.name);
        };
        let Some(base) = self.base.as_ref().filter(|_| !self.delete.is_empty()) else {
            return format!(
                "{}: nothing to delete (nothing is older than {window} that a later restore \
                 does not need)",
                self.name
            );
        };
        format!(
            "{}: {verb} {} ({}, {}), {} bytes freed; every point from {window} stays \
             restorable (oldest kept snapshot {})",
            self.name,
            count(self.delete.len(), "object"),
            count(self.snapshots(), "snapshot"),
            count(self.segments(), "segment"),
            self.bytes,
            base.name.time
        )
    }
}

/// `1 object`, `2 objects`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Parse a retention: a number with a unit `s`, `m`, `h` or `d` (`3600s`, `90m`, `24h`,
/// `7d`, `1.5h`), a plain number of seconds, or `0` (keep everything).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let bad = || {
        Error::invalid(format!(
            "{text:?} is not a duration: expected a number with a unit s, m, h or d, such as \
             24h, 90m, 7d or 3600s (0 keeps everything)"
        ))
    };
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad()),
    };
    if number.is_empty() || !number.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

/// A duration as [`parse_duration`] reads it: `24h`, `90m`, `7d`, `3600s`, `0`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if duration.subsec_millis() != 0 {
        return format!("{}s", duration.as_secs_f64());
    }
    match secs {
        0 => "0".to_string(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Plan the pruning of one replica from its listing grouped by generation (as in
/// [`Catalog::databases`]), as of `now`. Pure: no storage, no clock.
pub fn plan(
    name: &str,
    generations: &BTreeMap<Generation, GenerationObjects>,
    now: UtcTime,
    retention: Duration,
) -> PrunePlan {
    let mut plan = PrunePlan {
        name: name.to_string(),
        window_start: None,
        base: None,
        delete: Vec::new(),
        bytes: 0,
        next_due: None,
    };
    if retention.is_zero() {
        return plan;
    }
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let window = UtcTime::from_millis(now.millis().saturating_sub(retention_ms));
    plan.window_start = Some(window);

    let snapshots = || {
        generations
            .iter()
            .flat_map(|(g, objects)| objects.snapshots.iter().map(move |s| (g, s)))
    };
    // The times restore chooses snapshots by (see `restore::snapshot_times`).
    let times = restore::snapshot_times(generations);
    let time_of = |s: &StoredObject| times.get(&s.key).copied().unwrap_or(s.name.time);
    plan.next_due = snapshots()
        .map(|(_, s)| time_of(s))
        .filter(|time| *time > window)
        .min()
        .map(|time| UtcTime::from_millis(time.millis().saturating_add(retention_ms)));
    let restore_order =
        |(g, s): &(&Generation, &StoredObject)| (time_of(s), (*g).clone(), s.name.index);
    // S*: what a restore to W starts from.
    let Some(base) = snapshots()
        .filter(|(_, s)| time_of(s) <= window)
        .max_by_key(restore_order)
    else {
        return plan;
    };
    let base_order = restore_order(&base);
    // The newest snapshot of the newest generation (what a plain restore uses), and what
    // `--generation <newest>` uses at W.
    let newest = snapshots().max_by_key(|(g, s)| ((*g).clone(), s.name.index));
    let newest_at_window = newest.and_then(|(newest_generation, _)| {
        snapshots()
            .filter(|(g, s)| *g == newest_generation && time_of(s) <= window)
            .max_by_key(|(_, s)| (time_of(s), s.name.index))
            .map(|(_, s)| s.key.clone())
    });
    let newest_position = newest.map(|(g, s)| (g.clone(), s.name.index));
    // Ordered at or after the newest snapshot by (generation, index): the writer's tail.
    let in_tail = |g: &Generation, index: u64| {
        newest_position
            .as_ref()
            .is_some_and(|(ng, ni)| (g, index) >= (ng, *ni))
    };

    let mut delete_snapshots = Vec::new();
    let mut delete_segments = Vec::new();
    for (generation, objects) in generations {
        let mut smallest_kept: Option<u64> = None;
        for snapshot in &objects.snapshots {
            let keep = restore_order(&(generation, snapshot)) >= base_order
                || newest_at_window.as_deref() == Some(snapshot.key.as_str())
                || in_tail(generation, snapshot.name.index);
            if keep {
                smallest_kept = Some(
                    smallest_kept.map_or(snapshot.name.index, |k: u64| k.min(snapshot.name.index)),
                );
            } else {
                delete_snapshots.push(snapshot);
            }
        }
        for segment in &objects.segments {
            let keep = smallest_kept.is_some_and(|k| segment.name.index >= k)
                || in_tail(generation, segment.name.index);
            if !keep {
                delete_segments.push(segment);
            }
        }
    }
    // Snapshots first, then segments, each oldest first (see the module docs). The catalog
    // is in generation order and, within one, in key (index, then time) order already; sort
    // anyway so the order does not rest on how the caller built the map.
    let oldest_first = |a: &&StoredObject, b: &&StoredObject| {
        (&a.name.generation, a.name.index, &a.key).cmp(&(&b.name.generation, b.name.index, &b.key))
    };
    delete_snapshots.sort_by(oldest_first);
    delete_segments.sort_by(oldest_first);
    plan.delete = delete_snapshots
        .into_iter()
        .chain(delete_segments)
        // Belt and braces: only this replica's objects.
        .filter(|o| o.key.starts_with(&format!("{name}/")))
        .cloned()
        .collect();
    plan.bytes = plan.delete.iter().map(|o| o.size).sum();
    plan.base = Some(base.1.clone());
    plan
}

/// Prune every replica in `catalog` named in `names` (all of them if `names` is empty),
/// as of `now`. With `dry_run`, only plan. Returns the plans in name order (or the order
/// asked for); a name without a replica is a NotFound error before anything is deleted.
pub fn prune_catalog(
    storage: &dyn Storage,
    catalog: &Catalog,
    names: &[String],
    now: UtcTime,
    retention: Duration,
    dry_run: bool,
    mut report: impl FnMut(&PrunePlan, bool),
) -> Result<Vec<PrunePlan>> {
    let wanted: Vec<&String> = if names.is_empty() {
        catalog.databases.keys().collect()
    } else {
        names.iter().collect()
    };
    let mut plans = Vec::with_capacity(wanted.len());
    for name in &wanted {
        layout::validate_name(name)?;
        let generations = catalog.databases.get(*name).ok_or_else(|| {
            Error::not_found(format!(
                "no replica named {name:?} in {}",
                storage.describe()
            ))
        })?;
        plans.push(plan(name, generations, now, retention));
    }
    for plan in &plans {
        if !dry_run {
            execute(storage, plan)?;
            abort_stale_uploads(storage, &plan.name);
        }
        report(plan, !dry_run);
    }
    Ok(plans)
}

/// Prune one replica: one LIST of `name/`, the plan as of `now`, then the deletions
/// (none with `dry_run`). Returns the plan.
pub fn prune(
    storage: &dyn Storage,
    name: &str,
    now: UtcTime,
    retention: Duration,
    dry_run: bool,
) -> Result<PrunePlan> {
    layout::validate_name(name)?;
    let listing = storage
        .list(&format!("{name}/"))
        .context(|| format!("{name}: listing {} to prune it", storage.describe()))?;
    let catalog = Catalog::from_listing(listing);
    let empty = BTreeMap::new();
    let generations = catalog.databases.get(name).unwrap_or(&empty);
    prune_listed(storage, name, generations, now, retention, dry_run)
}

/// [`prune`] from a listing of `name` already taken (any time before: see the module
/// docs on why an older listing is as safe), so without a LIST.
pub fn prune_listed(
    storage: &dyn Storage,
    name: &str,
    generations: &BTreeMap<Generation, GenerationObjects>,
    now: UtcTime,
    retention: Duration,
    dry_run: bool,
) -> Result<PrunePlan> {
    let plan = plan(name, generations, now, retention);
    if !dry_run {
        execute(storage, &plan)?;
    }
    Ok(plan)
}

/// Abort the incomplete multipart uploads under `name/` (every name: `""`) that a crash left
/// in storage (see [`Storage::abort_stale_uploads`]), which S3 would otherwise keep and
/// bill. `walsync prune` does it for each database it prunes; `watch` once at start and
/// then daily for its whole destination, one request rather than one a database. Best
/// effort: a failure is a warning and fails nothing.
pub fn abort_stale_uploads(storage: &dyn Storage, name: &str) {
    let prefix = if name.is_empty() {
        String::new()
    } else {
        format!("{name}/")
    };
    let name = if name.is_empty() {
        "every database"
    } else {
        name
    };
    match storage.abort_stale_uploads(&prefix) {
        Ok(0) => {}
        Ok(n) => log::info!(
            "{name}: aborted {n} incomplete multipart upload(s) left by a crash in {}",
            storage.describe()
        ),
        // Stores without ListMultipartUploads: nothing to do about it, every prune.
        Err(err) if err.http_status() == Some(501) || err.s3_code() == Some("NotImplemented") => {
            log::debug!("{name}: incomplete multipart uploads not listed: {err}")
        }
        Err(err) => log::warn!(
            "{name}: the incomplete multipart uploads left by a crash were not aborted: {err}"
        ),
    }
}

/// Delete what `plan` says, in its order.
fn execute(storage: &dyn Storage, plan: &PrunePlan) -> Result<()> {
    if plan.delete.is_empty() {
        return Ok(());
    }
    storage.delete_many(&plan.keys()).context(|| {
        format!(
            "{}: pruning {} objects older than the retention window",
            plan.name,
            plan.delete.len()
        )
    })
}

#[cfg(test)]
mod tests;
