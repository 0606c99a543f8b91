//! Step 1, **plan**: from one (paginated) LIST of `<name>/`, the snapshot a restore starts
//! from and the segments it applies after it, as `docs/FORMAT.md` ("Restoring") specifies.
//!
//! [`choose`] is the whole decision and is pure (a listing in, a [`RestorePlan`] out), so
//! that retention ([`crate::retention`]) can ask it, for every point in its window, whether
//! a prune would change what a restore reads. It refuses a gap in the segment indexes rather
//! than restore less than was asked for; where a writer cut one index more than once it
//! keeps the other cuts as `alternatives`, for the chain to choose among when the segments
//! are applied (`apply.rs`).

use std::collections::BTreeMap;

use crate::error::{Context, Error, Result};
use crate::layout::{self, Catalog, ChainValue, Generation, GenerationObjects, StoredObject};
use crate::storage::Storage;
use crate::utc::UtcTime;

/// Which objects a restore uses.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub name: String,
    pub generation: Generation,
    pub snapshot: StoredObject,
    /// One segment per index, in order. From [`plan`], the newest in time at each index (what
    /// an unchained generation uses); from [`restore()`](super::restore), the segments applied.
    pub segments: Vec<StoredObject>,
    /// The other segments (within the point in time) at the snapshot's index or at the index
    /// of one of `segments`: a writer cut that index more than once. A chained restore
    /// chooses among them by the chain.
    pub alternatives: Vec<StoredObject>,
    /// Segments a restore left out because they continue a branch the writer abandoned
    /// (empty from [`plan`]).
    pub abandoned: Vec<StoredObject>,
    /// The snapshot's chain value; None for an unchained (older) generation or from [`plan`].
    pub chain: Option<ChainValue>,
    /// The newest generation the replica held when planned (the restored one, unless a
    /// point in time or `--generation` chose an older one).
    pub newest_generation: Generation,
}

impl RestorePlan {
    /// The time of the newest object applied: the state the restore reproduces.
    pub fn restored_to(&self) -> UtcTime {
        self.segments
            .last()
            .map_or(self.snapshot.name.time, |s| s.name.time)
    }
}

/// Choose the snapshot and segments that rebuild `name` (as of `point_in_time`, if given).
pub fn plan(
    storage: &dyn Storage,
    name: &str,
    point_in_time: Option<UtcTime>,
) -> Result<RestorePlan> {
    plan_in(storage, name, point_in_time, None)
}

/// Whether `storage` holds a replica of `name` with a snapshot to restore from.
pub fn replica_exists(storage: &dyn Storage, name: &str) -> Result<bool> {
    layout::validate_name(name)?;
    let listing = storage
        .list(&format!("{name}/"))
        .context(|| format!("listing {}/{name}", storage.describe()))?;
    let catalog = Catalog::from_listing(listing);
    Ok(catalog
        .databases
        .get(name)
        .is_some_and(|generations| generations.values().any(|o| !o.snapshots.is_empty())))
}

/// [`plan`], from `generation` only when given (an unknown one is a NotFound error naming
/// the generations there are).
pub fn plan_in(
    storage: &dyn Storage,
    name: &str,
    point_in_time: Option<UtcTime>,
    generation: Option<&Generation>,
) -> Result<RestorePlan> {
    layout::validate_name(name)?;
    let listing = storage
        .list(&format!("{name}/"))
        .context(|| format!("listing {}/{name}", storage.describe()))?;
    let catalog = Catalog::from_listing(listing);
    let generations = catalog.databases.get(name).ok_or_else(|| {
        Error::not_found(format!(
            "no replica named {name:?} in {}",
            storage.describe()
        ))
    })?;
    choose(
        name,
        generations,
        point_in_time,
        generation,
        &storage.describe(),
    )
}

/// The choice [`plan_in`] makes, from the listing of `name` already grouped by generation
/// (`destination` only names where it came from, in errors). Pure: retention planning
/// ([`crate::retention`]) checks against it that pruning changes no restore it must keep.
pub fn choose(
    name: &str,
    generations: &BTreeMap<Generation, GenerationObjects>,
    point_in_time: Option<UtcTime>,
    generation: Option<&Generation>,
    destination: &str,
) -> Result<RestorePlan> {
    if let Some(wanted) = generation.filter(|g| !generations.contains_key(*g)) {
        let known: Vec<&str> = generations.keys().map(Generation::as_str).collect();
        return Err(Error::not_found(format!(
            "replica {name:?} in {destination} has no generation {wanted}; it has {}",
            known.join(", ")
        )));
    }
    let in_time = |o: &StoredObject| point_in_time.is_none_or(|t| o.name.time <= t);
    let wanted = || {
        generations
            .iter()
            .filter(|(g, _)| generation.is_none_or(|wanted| wanted == *g))
    };
    let times = snapshot_times(generations);
    let time_of = |s: &StoredObject| times.get(&s.key).copied().unwrap_or(s.name.time);
    // Newest generation first; within it, the newest usable snapshot.
    let chosen = wanted()
        .flat_map(|(generation, objects)| objects.snapshots.iter().map(move |s| (generation, s)))
        .filter(|(_, s)| point_in_time.is_none_or(|t| time_of(s) <= t))
        .max_by(|(ga, a), (gb, b)| match point_in_time {
            Some(_) => (time_of(a), ga, a.name.index).cmp(&(time_of(b), gb, b.name.index)),
            None => (ga, a.name.index).cmp(&(gb, b.name.index)),
        });
    let Some((generation, snapshot)) = chosen else {
        let earliest = wanted()
            .flat_map(|(_, o)| &o.snapshots)
            .map(|s| s.name.time)
            .min();
        return Err(match (point_in_time, earliest) {
            (Some(t), Some(first)) => Error::not_found(format!(
                "no backup of {name:?} at or before {t}: the earliest snapshot is from {first}"
            )),
            (_, None) if generation.is_some() => Error::not_found(format!(
                "generation {} of {name:?} in {destination} has no snapshot to restore from \
                 (only segments are left, as an interrupted prune leaves them)",
                generation.map_or("", Generation::as_str)
            )),
            _ => Error::not_found(format!(
                "replica {name:?} in {destination} has no snapshot to restore from"
            )),
        });
    };
    // Several segments with one index: a writer stored the segment, but its own record of
    // that was lost (it was killed first, or its local state was rolled back), so it cut that
    // index again. Keep the newest in time here; a chained restore chooses among them by the
    // chain (see `Apply::chained` in `apply.rs`), so `alternatives` keeps the others.
    let objects = &generations[generation].segments;
    // For a point in time: every segment up to the last one committed at or before it.
    // Times are the writer's clock, which may have stepped: a segment labelled after the
    // point but followed by one labelled before it was committed before that one (a clock
    // stepped forward, then back), so it belongs to the restore. A step blurs the point in
    // time near the step, never further.
    let last = match point_in_time {
        Some(_) => objects
            .iter()
            .filter(|s| s.name.index > snapshot.name.index && in_time(s))
            .map(|s| s.name.index)
            .max()
            .unwrap_or(snapshot.name.index),
        None => u64::MAX,
    };
    let mut alternatives: Vec<StoredObject> = objects
        .iter()
        .filter(|s| s.name.index == snapshot.name.index && in_time(s))
        .cloned()
        .collect();
    let mut segments: Vec<StoredObject> = Vec::new();
    let mut rest = objects
        .iter()
        .filter(|s| s.name.index > snapshot.name.index)
        .peekable();
    let mut expected = snapshot.name.index + 1;
    while let Some(first) = rest.next() {
        let mut group = vec![first];
        while let Some(more) = rest.next_if(|s| s.name.index == first.name.index) {
            group.push(more);
        }
        if first.name.index > last {
            break;
        }
        // Listed oldest first within an index. Only the cuts within the point in time;
        // before the last index, if none is, all of them (see above).
        if first.name.index == last || group.iter().any(|s| in_time(s)) {
            group.retain(|s| in_time(s));
        }
        let Some((newest, older)) = group.split_last() else {
            break;
        };
        if first.name.index != expected {
            return Err(Error::corrupt(format!(
                "segment {expected} of generation {generation} of {name:?} is missing \
                 (found {} next); refusing to restore past a gap",
                first.key
            )));
        }
        segments.push((*newest).clone());
        alternatives.extend(older.iter().map(|s| (*s).clone()));
        expected += 1;
    }
    Ok(RestorePlan {
        name: name.to_string(),
        generation: generation.clone(),
        snapshot: snapshot.clone(),
        segments,
        alternatives,
        abandoned: Vec::new(),
        chain: None,
        newest_generation: generations.keys().next_back().unwrap_or(generation).clone(),
    })
}

/// The time each snapshot stands for in a point-in-time restore (by key): its own label, or
/// the earliest label of any object after it in its generation (by index) if that is
/// earlier. Labels come from the writer's clock: a snapshot labelled after a later object
/// was taken while the clock was ahead (it stepped forward, then back), and it certainly
/// holds a state from before that object. Without this, a snapshot taken during a forward
/// glitch would be out of reach of every point in time until the clock caught up.
/// [`crate::retention`] keeps what restores choose by the same times.
pub fn snapshot_times(
    generations: &BTreeMap<Generation, GenerationObjects>,
) -> std::collections::HashMap<String, UtcTime> {
    let mut times = std::collections::HashMap::new();
    for objects in generations.values() {
        // The earliest label at each index, then the earliest after each index.
        let mut earliest: BTreeMap<u64, UtcTime> = BTreeMap::new();
        for object in objects.snapshots.iter().chain(&objects.segments) {
            let slot = earliest
                .entry(object.name.index)
                .or_insert(object.name.time);
            *slot = (*slot).min(object.name.time);
        }
        let mut after: Option<UtcTime> = None;
        let mut later: BTreeMap<u64, Option<UtcTime>> = BTreeMap::new();
        for (index, time) in earliest.iter().rev() {
            later.insert(*index, after);
            after = Some(after.map_or(*time, |a| a.min(*time)));
        }
        for snapshot in &objects.snapshots {
            let next = later.get(&snapshot.name.index).copied().flatten();
            let time = next.map_or(snapshot.name.time, |n| n.min(snapshot.name.time));
            times.insert(snapshot.key.clone(), time);
        }
    }
    times
}
