//! Retention: which objects of a replica may be deleted so that every point in time inside
//! the retention window stays restorable exactly as it was.
//!
//! # The rule
//!
//! Let `W = now - retention`. Every point `t >= W` must restore afterwards exactly as
//! [`crate::restore`] restores it before: with `--point-in-time t`, without it (the latest),
//! and with `--generation` naming the newest generation. So, from one listing of the
//! replica:
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
//! the unit tests below check it against [`restore::choose`] itself, for every point in the
//! window, on replicas with several generations, duplicate cuts and stepped clocks.
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
mod tests {
    use super::*;
    use crate::layout::ObjectName;
    use crate::restore::{self, RestorePlan};
    use crate::storage::ObjectInfo;

    const T0: i64 = 1_768_046_400_000;
    const SEC: i64 = 1000;

    fn generation(start_offset_secs: i64, random: u16) -> Generation {
        let millis = (T0 + start_offset_secs * SEC) as u64;
        Generation::parse(&format!("{millis:012x}{random:04x}")).unwrap()
    }

    /// A replica listing built object by object: (kind, generation, index, time offset in
    /// seconds from T0, size).
    #[derive(Default)]
    struct Listing {
        objects: Vec<ObjectInfo>,
    }

    impl Listing {
        fn add(&mut self, kind: ObjectKind, g: &Generation, index: u64, at: i64) -> String {
            let key = ObjectName {
                kind,
                generation: g.clone(),
                index,
                time: UtcTime::from_millis(T0 + at * SEC),
            }
            .key("app");
            self.objects.push(ObjectInfo {
                key: key.clone(),
                size: 100 + index,
            });
            key
        }
        fn snap(&mut self, g: &Generation, index: u64, at: i64) -> String {
            self.add(ObjectKind::Snapshot, g, index, at)
        }
        fn seg(&mut self, g: &Generation, index: u64, at: i64) -> String {
            self.add(ObjectKind::Segment, g, index, at)
        }
        fn catalog(&self) -> Catalog {
            let mut objects = self.objects.clone();
            objects.push(ObjectInfo {
                key: "app/state.json".into(),
                size: 10,
            });
            objects.push(ObjectInfo {
                key: "app/wal/not-ours.wal.gz".into(),
                size: 10,
            });
            Catalog::from_listing(objects)
        }
        fn generations(&self) -> BTreeMap<Generation, GenerationObjects> {
            self.catalog().databases.remove("app").unwrap_or_default()
        }
    }

    fn at(secs: i64) -> UtcTime {
        UtcTime::from_millis(T0 + secs * SEC)
    }

    fn plan_at(listing: &Listing, now: i64, retention_secs: u64) -> PrunePlan {
        plan(
            "app",
            &listing.generations(),
            at(now),
            Duration::from_secs(retention_secs),
        )
    }

    /// What remains after the plan's deletions.
    fn after(
        generations: &BTreeMap<Generation, GenerationObjects>,
        plan: &PrunePlan,
    ) -> BTreeMap<Generation, GenerationObjects> {
        let gone: Vec<&str> = plan.delete.iter().map(|o| o.key.as_str()).collect();
        generations
            .iter()
            .map(|(g, o)| {
                let keep = |list: &[StoredObject]| -> Vec<StoredObject> {
                    list.iter()
                        .filter(|s| !gone.contains(&s.key.as_str()))
                        .cloned()
                        .collect()
                };
                (
                    g.clone(),
                    GenerationObjects {
                        snapshots: keep(&o.snapshots),
                        segments: keep(&o.segments),
                    },
                )
            })
            .collect()
    }

    fn same(a: &Result<RestorePlan>, b: &Result<RestorePlan>) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => {
                a.snapshot == b.snapshot
                    && a.segments == b.segments
                    && a.alternatives == b.alternatives
            }
            _ => false,
        }
    }

    /// Every restore the rule promises gives the same plan after pruning as before: every
    /// point from W on (each object time, W itself, and just after each), the latest, and
    /// the newest generation with and without a point in time. Also any prefix of the
    /// deletions (an interrupted prune) leaves them unchanged.
    fn assert_restores_unchanged(listing: &Listing, plan: &PrunePlan) {
        let before = listing.generations();
        let Some(window) = plan.window_start else {
            assert!(plan.delete.is_empty());
            return;
        };
        let mut points: Vec<UtcTime> = vec![window];
        for o in &listing.objects {
            let t = ObjectName::parse_key(&o.key).unwrap().1.time;
            for p in [t, UtcTime::from_millis(t.millis() + 1)] {
                if p >= window {
                    points.push(p);
                }
            }
        }
        let newest = before
            .iter()
            .rev()
            .find(|(_, o)| !o.snapshots.is_empty())
            .map(|(g, _)| g.clone());
        for cut in 0..=plan.delete.len() {
            let partial = PrunePlan {
                delete: plan.delete[..cut].to_vec(),
                ..plan.clone()
            };
            let pruned = after(&before, &partial);
            let check = |pit: Option<UtcTime>, g: Option<&Generation>| {
                let was = restore::choose("app", &before, pit, g, "test");
                let is = restore::choose("app", &pruned, pit, g, "test");
                if was.is_ok() {
                    assert!(
                        same(&was, &is),
                        "restore to {pit:?} (generation {g:?}) changed after deleting {:?}:\n\
                         before {was:?}\nafter {is:?}",
                        partial.keys()
                    );
                }
            };
            check(None, None);
            check(None, newest.as_ref());
            for p in &points {
                check(Some(*p), None);
                check(Some(*p), newest.as_ref());
            }
        }
    }

    fn names(keys: &[String]) -> Vec<String> {
        keys.iter()
            .map(|k| k.rsplit('/').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn durations_parse_in_every_spelling() {
        for (text, secs) in [
            ("24h", 86400.0),
            ("90m", 5400.0),
            ("7d", 604_800.0),
            ("3600s", 3600.0),
            ("0", 0.0),
            ("0s", 0.0),
            ("45", 45.0),
            ("1.5h", 5400.0),
            ("2.25s", 2.25),
            (" 10m ", 600.0),
        ] {
            assert_eq!(
                parse_duration(text).unwrap().as_secs_f64(),
                secs,
                "{text:?}"
            );
        }
        for bad in [
            "", "h", "-1h", "1w", "1hh", "1 h", "1e3s", "abc", "+5m", "1.2.3s",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Invalid, "{bad:?}");
        }
        for d in ["1d", "2h", "90m", "7d", "3601s", "0"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
        assert_eq!(format_duration(parse_duration("24h").unwrap()), "1d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn an_empty_catalog_and_zero_retention_delete_nothing() {
        let empty = Listing::default();
        let plan = plan_at(&empty, 1000, 60);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.bytes, 0);
        assert!(plan.base.is_none());

        let mut listing = Listing::default();
        let g = generation(0, 1);
        listing.snap(&g, 0, 0);
        for i in 1..50 {
            listing.seg(&g, i, i as i64 * 10);
        }
        listing.snap(&g, 49, 500);
        let plan = plan_at(&listing, 1_000_000, 0);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.window_start, None);
        assert_eq!(plan.summary(false), "app: retention 0: keeping everything");
    }

    #[test]
    fn a_window_reaching_before_the_first_snapshot_deletes_nothing() {
        let mut listing = Listing::default();
        let g = generation(0, 1);
        listing.snap(&g, 0, 100);
        listing.seg(&g, 1, 110);
        listing.snap(&g, 1, 120);
        // W = 50: before every snapshot.
        let plan = plan_at(&listing, 150, 100);
        assert!(plan.delete.is_empty(), "{:?}", plan.keys());
        assert!(plan.base.is_none());
        assert!(plan.summary(false).contains("nothing to delete"));
    }

    #[test]
    fn the_next_prune_is_due_when_the_window_passes_the_next_snapshot() {
        let g = generation(0, 3);
        let mut l = Listing::default();
        l.snap(&g, 0, 0);
        l.seg(&g, 1, 5);
        l.snap(&g, 1, 10);
        l.snap(&g, 1, 30);
        // W = 15 - 60 < 0: nothing yet; due when W reaches the first snapshot (0 + 60).
        assert_eq!(plan_at(&l, 15, 60).next_due, Some(at(60)));
        // W = 5: S* is the first; due when W reaches the second (10 + 60).
        assert_eq!(plan_at(&l, 65, 60).next_due, Some(at(70)));
        // W = 30: S* is the newest; only a new snapshot can change anything.
        assert_eq!(plan_at(&l, 90, 60).next_due, None);
        assert_eq!(plan_at(&l, 90, 0).next_due, None);
    }

    #[test]
    fn one_generation_keeps_the_snapshot_before_the_window_and_everything_after() {
        let g = generation(0, 7);
        let mut l = Listing::default();
        let s0 = l.snap(&g, 0, 0);
        let w1 = l.seg(&g, 1, 10);
        let w2 = l.seg(&g, 2, 20);
        let s2 = l.snap(&g, 2, 25);
        let w3 = l.seg(&g, 3, 30);
        let w4 = l.seg(&g, 4, 40);
        let s4 = l.snap(&g, 4, 45);
        let w5 = l.seg(&g, 5, 50);
        // W = 35: S* is the snapshot at index 2 (time 25). Segment 2 stays: restore reads
        // the cuts of its snapshot's own index as alternatives for the chain check.
        let plan = plan_at(&l, 135, 100);
        assert_eq!(plan.base.as_ref().unwrap().key, s2);
        assert_eq!(plan.keys(), [s0.clone(), w1.clone()]);
        assert_eq!(plan.bytes, 100 + 101);
        assert!(plan
            .summary(false)
            .starts_with("app: would delete 2 objects (1 snapshot, 1 segment), 201 bytes freed"));
        assert_restores_unchanged(&l, &plan);
        // W exactly at a snapshot's time keeps that snapshot as S*.
        let plan = plan_at(&l, 145, 100);
        assert_eq!(plan.base.as_ref().unwrap().key, s4);
        assert_eq!(
            plan.keys(),
            [s0, s2, w1, w2, w3],
            "snapshots first, then segments, oldest first"
        );
        assert!(!plan.keys().contains(&w4) && !plan.keys().contains(&w5));
        assert_restores_unchanged(&l, &plan);
        assert!(plan
            .summary(true)
            .starts_with("app: deleted 5 objects (2 snapshots, 3 segments), 508 bytes freed"));
    }

    #[test]
    fn whole_old_generations_go_and_the_window_generation_keeps_its_tail() {
        let g1 = generation(0, 1);
        let g2 = generation(100, 2);
        let g3 = generation(200, 3);
        let mut l = Listing::default();
        l.snap(&g1, 0, 0);
        l.seg(&g1, 1, 10);
        l.snap(&g1, 1, 20);
        l.seg(&g1, 2, 30);
        l.snap(&g2, 0, 100);
        l.seg(&g2, 1, 110);
        l.seg(&g2, 2, 120);
        l.snap(&g2, 2, 130);
        l.seg(&g2, 3, 140);
        let g3_base = l.snap(&g3, 0, 200);
        let g3_first = l.seg(&g3, 1, 210);
        // A generation with segments only (its snapshot was pruned before): junk.
        let g0 = generation(-100, 9);
        let orphan = l.seg(&g0, 5, -50);
        for (now, expect_deleted) in [
            (1000 + 25, 2),  // W = 25: S* = g1@1
            (1000 + 105, 5), // W = 105: S* = g2@0
            (1000 + 135, 7), // W = 135: S* = g2@2
            (1000 + 205, 10),
            (1_000_000, 10), // far in the future: the newest snapshot and its tail stay
        ] {
            let plan = plan_at(&l, now, 1000);
            assert_eq!(
                plan.delete.len(),
                expect_deleted,
                "now {now}: {:?}",
                names(&plan.keys())
            );
            assert!(plan.keys().contains(&orphan));
            assert_restores_unchanged(&l, &plan);
        }
        let plan = plan_at(&l, 1_000_000, 1000);
        let remaining: Vec<String> = l
            .objects
            .iter()
            .map(|o| o.key.clone())
            .filter(|k| !plan.keys().contains(k))
            .collect();
        assert_eq!(remaining, [g3_base, g3_first]);
    }

    #[test]
    fn duplicate_cuts_at_a_kept_snapshot_index_are_kept() {
        let g = generation(0, 4);
        let mut l = Listing::default();
        l.snap(&g, 0, 0);
        l.seg(&g, 1, 10);
        let dup_old = l.seg(&g, 2, 20);
        let dup_new = l.seg(&g, 2, 21);
        let s2 = l.snap(&g, 2, 22);
        l.seg(&g, 3, 30);
        l.seg(&g, 3, 31);
        l.seg(&g, 4, 40);
        let plan = plan_at(&l, 125, 100);
        assert_eq!(plan.base.as_ref().unwrap().key, s2);
        assert!(!plan.keys().contains(&dup_old) && !plan.keys().contains(&dup_new));
        assert_eq!(plan.delete.len(), 2, "{:?}", plan.keys());
        assert_restores_unchanged(&l, &plan);
    }

    #[test]
    fn a_clock_stepped_forward_never_deletes_the_latest_backup() {
        let g1 = generation(0, 1);
        let g2 = generation(10, 2);
        let mut l = Listing::default();
        l.snap(&g1, 0, 0);
        l.seg(&g1, 1, 5);
        // The newest generation was written with a clock far behind: its objects look old.
        let base = l.snap(&g2, 0, -5000);
        l.seg(&g2, 1, -4990);
        l.snap(&g2, 1, -4980);
        l.seg(&g2, 2, -4970);
        // now far ahead (the clock stepped forward): W is after everything. S* is g1@0 (the
        // greatest time before W); the newest generation's newest snapshot (g2@1) stays
        // whatever its time, with the cuts of its index and after; only g2's base goes.
        let plan = plan_at(&l, 100_000, 60);
        assert_eq!(plan.base.as_ref().unwrap().name.generation, g1);
        assert_eq!(plan.keys(), [base]);
        assert_restores_unchanged(&l, &plan);
        // A plain restore still gets the newest generation.
        let pruned = after(&l.generations(), &plan);
        let latest = restore::choose("app", &pruned, None, None, "test").unwrap();
        assert_eq!(latest.generation, g2);
        assert_eq!(latest.segments.len(), 1);
    }

    #[test]
    fn a_clock_stepped_back_keeps_what_the_newest_generation_alone_restores_from() {
        // g1 was written with a clock ahead (times 200..), g2 after the clock went back.
        let g1 = generation(0, 1);
        let g2 = generation(1, 2);
        let mut l = Listing::default();
        l.snap(&g1, 0, 200);
        l.seg(&g1, 1, 210);
        let g2_base = l.snap(&g2, 0, 50);
        l.seg(&g2, 1, 60);
        l.seg(&g2, 2, 150);
        l.snap(&g2, 2, 250);
        l.seg(&g2, 3, 260);
        // W = 220: S* = g1@0 (time 200). A restore with --generation g2 at 220 starts from
        // g2@0 (time 50): it must stay too, with its segments.
        let plan = plan_at(&l, 1220, 1000);
        assert_eq!(plan.base.as_ref().unwrap().name.generation, g1);
        assert!(!plan.keys().contains(&g2_base), "{:?}", plan.keys());
        assert_restores_unchanged(&l, &plan);
        // Times that go back inside one generation, too.
        let g = generation(500, 5);
        let mut l = Listing::default();
        l.snap(&g, 0, 100);
        l.seg(&g, 1, 110);
        l.snap(&g, 1, 40);
        l.seg(&g, 2, 50);
        l.snap(&g, 2, 60);
        l.seg(&g, 3, 70);
        for now in [1030, 1045, 1055, 1065, 1105, 1200, 9999] {
            let plan = plan_at(&l, now, 1000);
            assert_restores_unchanged(&l, &plan);
        }
    }

    #[test]
    fn a_newer_generation_without_a_listed_snapshot_is_left_alone() {
        // The listing caught a new generation's first segment but not its base snapshot
        // (a LIST racing the writer, or an upload still in progress): keep it whole.
        let g1 = generation(0, 1);
        let g2 = generation(100, 2);
        let mut l = Listing::default();
        l.snap(&g1, 0, 0);
        l.seg(&g1, 1, 10);
        l.snap(&g1, 1, 20);
        let g2_segment = l.seg(&g2, 1, 110);
        let plan = plan_at(&l, 10_000, 100);
        assert!(!plan.keys().contains(&g2_segment));
        assert_restores_unchanged(&l, &plan);
    }

    #[test]
    fn every_window_over_a_messy_replica_keeps_every_restore() {
        // Several generations, duplicate cuts, a time step back, a segments-only generation.
        let mut l = Listing::default();
        let ga = generation(0, 0xa);
        let gb = generation(300, 0xb);
        let gc = generation(301, 0xc);
        let gd = generation(600, 0xd);
        l.snap(&ga, 0, 0);
        for i in 1..=6 {
            l.seg(&ga, i, i as i64 * 10);
            if i % 2 == 0 {
                l.snap(&ga, i, i as i64 * 10 + 1);
            }
        }
        l.seg(&ga, 6, 65);
        l.seg(&gb, 3, 290);
        l.snap(&gc, 0, 310);
        l.seg(&gc, 1, 320);
        l.seg(&gc, 1, 321);
        l.snap(&gc, 1, 322);
        l.seg(&gc, 2, 250); // clock went back
        l.snap(&gc, 2, 255);
        l.seg(&gc, 3, 330);
        l.snap(&gd, 0, 600);
        l.seg(&gd, 1, 610);
        l.seg(&gd, 2, 620);
        for w in (-10..700).step_by(5) {
            let plan = plan_at(&l, w + 100, 100);
            assert_restores_unchanged(&l, &plan);
            // Never state.json or foreign keys; never the newest snapshot or later.
            assert!(plan
                .keys()
                .iter()
                .all(|k| ObjectName::parse_key(k).is_some()));
            assert!(!plan.keys().iter().any(|k| k.contains(gd.as_str())));
        }
    }
}
