//! Restore: plan from one listing, download, verify, apply, check, rename.
//!
//! 1. **Plan** from a single (paginated) LIST of `<name>/`: the snapshot to start from (the
//!    newest one, or for a point in time the newest taken at or before it) and the segments
//!    of its generation after it (all of them, or for a point in time those up to the last
//!    one committed at or before it: times are labels from a clock that may have stepped,
//!    indexes are the order), as `docs/FORMAT.md` ("Restoring") specifies ([`choose`]).
//!    Their indexes must be contiguous: a missing segment is an error, never a silent
//!    shorter restore.
//! 2. **Download** with bounded parallelism, gunzipping as the bytes arrive (the gzip CRC is
//!    checked at the end of each object). The snapshot goes straight into `OUT.tmp`;
//!    segments go to unlinked spool files beside it, a bounded batch at a time.
//! 3. **Verify** each segment as a WAL: valid header with the snapshot's page size, every
//!    frame's salts and checksum chain, no trailing bytes, and a commit frame at the end.
//!    If the snapshot carries a chain value ([`ChainValue`]), the segments must continue
//!    it, and where a writer cut one index more than once the chain chooses the cut, by
//!    the rules of `docs/FORMAT.md` ("The chain", "Duplicate cuts"): a restore never
//!    mixes two histories.
//! 4. **Apply** each frame's page at its offset in `OUT.tmp`; a commit frame's database size
//!    truncates or extends the file, as a checkpoint would.
//! 5. **Check** with `fsync` and `PRAGMA integrity_check`, remove stale `OUT-wal`/`OUT-shm`,
//!    then rename `OUT.tmp` to `OUT`. On any failure `OUT.tmp` is removed and `OUT` untouched.
//!    `OUT.tmp` is created owner-only (or with `--mode`, less the umask) before any data
//!    goes into it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use flate2::write::GzDecoder;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::files::with_suffix;
use crate::layout::{self, Catalog, ChainValue, Generation, GenerationObjects, StoredObject};
use crate::spool;
use crate::storage::Storage;
use crate::utc::UtcTime;
use crate::wal::WalReader;

/// Segments downloaded ahead of the one being applied; bounds open files and disk use.
const BATCH: usize = 32;

/// Mode of the restored file unless [`RestoreOptions::mode`] says otherwise (less the umask):
/// a database is readable by whoever may read the database, not by everyone.
pub const DEFAULT_MODE: u32 = 0o600;

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Restore the state as of this time instead of the latest.
    pub point_in_time: Option<UtcTime>,
    /// Replace an existing output file.
    pub force: bool,
    /// Downloads in flight at once.
    pub parallelism: usize,
    /// Permission bits of the restored file, less the umask as for open(2);
    /// [`DEFAULT_MODE`] (0600) when None.
    pub mode: Option<u32>,
    /// Restore from this generation (its newest snapshot within the point in time) instead
    /// of the newest one.
    pub generation: Option<Generation>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            point_in_time: None,
            force: false,
            parallelism: 4,
            mode: None,
            generation: None,
        }
    }
}

/// Which objects a restore uses.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub name: String,
    pub generation: Generation,
    pub snapshot: StoredObject,
    /// One segment per index, in order. From [`plan`], the newest in time at each index (what
    /// an unchained generation uses); from [`restore`], the segments applied.
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

/// Refuse to plan a restore over an existing `output` unless `force`.
pub fn check_output(output: &Path, force: bool) -> Result<()> {
    if !force && output.exists() {
        return Err(Error::invalid(format!(
            "{} already exists; choose another output or pass --force to replace it",
            output.display()
        )));
    }
    Ok(())
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
    // chain (see `apply_chained`), so `alternatives` keeps the others.
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

/// Restore `name` from `storage` into `output`. Returns the plan that was applied.
pub fn restore(
    storage: &dyn Storage,
    name: &str,
    output: &Path,
    options: &RestoreOptions,
) -> Result<RestorePlan> {
    check_output(output, options.force)?;
    let mut plan = plan_in(
        storage,
        name,
        options.point_in_time,
        options.generation.as_ref(),
    )?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = TempOutput::create(output, options.mode.unwrap_or(DEFAULT_MODE))?;
    let comment = download_into(storage, &plan.snapshot, tmp.file())?;
    plan.chain = snapshot_chain(&plan, comment.as_deref())?;
    let page_size = read_page_size(tmp.file()).context(|| plan.snapshot.key.clone())?;
    let apply = Apply {
        storage,
        dir: &dir,
        db: tmp.file(),
        page_size,
        parallelism: options.parallelism,
    };
    match plan.chain {
        Some(chain) => apply.chained(&mut plan, chain)?,
        None => {
            if !plan.segments.is_empty() {
                log::info!(
                    "{} has no chain value (written before walsync chained segments): \
                     segments are not checked against it",
                    plan.snapshot.key
                );
            }
            apply.unchained(&plan.segments)?
        }
    }
    tmp.file()
        .sync_all()
        .context(|| format!("syncing {}", tmp.path.display()))?;
    check_integrity(&tmp.path)?;
    tmp.commit(output)?;
    note_restored(output, storage, &plan);
    Ok(plan)
}

/// Tell a later `walsync watch` of `output` that it was restored from this replica, so it
/// may take the name over from the host that wrote it (see [`Sidecar::note_restored`]). The
/// restore itself is complete either way: a failure here is a warning, and `watch` then
/// explains how to hand the name over by hand.
fn note_restored(output: &Path, storage: &dyn Storage, plan: &RestorePlan) {
    let noted = crate::sidecar::Sidecar::open(output, &storage.describe(), &plan.name).and_then(
        |sidecar| {
            let identity = crate::files::FileIdentity::of(output)?;
            let path = std::path::absolute(output).unwrap_or_else(|_| output.to_path_buf());
            sidecar.note_restored(
                plan.newest_generation.as_str(),
                &identity,
                &path.display().to_string(),
            )
        },
    );
    match noted {
        Ok(0) => {}
        Ok(n) => log::warn!(
            "{}: discarded {n} object(s) the replaced database had staged but not stored",
            output.display()
        ),
        Err(e) => log::warn!(
            "{}: could not note in its sidecar that it was restored from {:?} ({e}); \
             walsync watch may refuse the name until its state.json is removed",
            output.display(),
            plan.name
        ),
    }
}

/// The chain value the snapshot's gzip header comment carries; None if it has no comment
/// (an unchained generation). A base snapshot's value must be its generation's.
fn snapshot_chain(plan: &RestorePlan, comment: Option<&[u8]>) -> Result<Option<ChainValue>> {
    let Some(comment) = comment else {
        return Ok(None);
    };
    let snapshot = &plan.snapshot;
    let chain = ChainValue::parse_comment(comment).ok_or_else(|| {
        Error::corrupt(format!(
            "{}: gzip header comment {:?} is not a walsync chain value",
            snapshot.key,
            String::from_utf8_lossy(comment)
        ))
    })?;
    let base = ChainValue::of_generation(&snapshot.name.generation);
    if snapshot.name.index == 0 && chain != base {
        return Err(Error::corrupt(format!(
            "{}: base snapshot carries chain value {chain}, but its generation's is {base}",
            snapshot.key
        )));
    }
    Ok(Some(chain))
}

/// A downloaded, verified segment: where it sits in the chain.
struct Checked {
    object: StoredObject,
    file: File,
    /// Its WAL header salts: the chain value it continues.
    salts: ChainValue,
    /// The chain value after it: its last frame's cumulative checksum.
    end: ChainValue,
}

/// Applying segments to the restored file.
struct Apply<'a> {
    storage: &'a dyn Storage,
    /// Where spool files go (beside the output).
    dir: &'a Path,
    db: &'a File,
    page_size: u32,
    parallelism: usize,
}

impl Apply<'_> {
    /// An unchained generation: apply `segments` in order.
    fn unchained(&self, segments: &[StoredObject]) -> Result<()> {
        for batch in segments.chunks(BATCH) {
            for checked in self.download(batch)? {
                self.write(&checked)?;
            }
        }
        Ok(())
    }

    /// Download and verify `objects`, `parallelism` at a time, in order.
    fn download(&self, objects: &[StoredObject]) -> Result<Vec<Checked>> {
        let files = download_batch(self.storage, objects, self.dir, self.parallelism)?;
        objects
            .iter()
            .zip(files)
            .map(|(object, file)| {
                let (salts, end) =
                    verify_segment(&file, self.page_size).context(|| object.key.clone())?;
                Ok(Checked {
                    object: object.clone(),
                    file,
                    salts,
                    end,
                })
            })
            .collect()
    }

    fn write(&self, segment: &Checked) -> Result<()> {
        write_segment(&segment.file, self.db, self.page_size).context(|| segment.object.key.clone())
    }

    /// A chained generation: at each index apply the newest candidate that continues the
    /// chain. Leaves in `plan.segments` what was applied and in `plan.abandoned` what was
    /// left out because it continues an abandoned branch.
    fn chained(&self, plan: &mut RestorePlan, snapshot_chain: ChainValue) -> Result<()> {
        // Candidates per index, oldest first (same generation and index: key order is
        // time order).
        let groups: Vec<Vec<StoredObject>> = plan
            .segments
            .iter()
            .map(|segment| {
                let mut group: Vec<StoredObject> = plan
                    .alternatives
                    .iter()
                    .filter(|a| a.name.index == segment.name.index)
                    .cloned()
                    .collect();
                group.push(segment.clone());
                group.sort_by(|a, b| a.key.cmp(&b.key));
                group
            })
            .collect();
        let mut expected = snapshot_chain;
        let mut previous = plan.snapshot.key.clone();
        // Chain values after the candidates at the index before that were not applied
        // (None: not known yet; those at the snapshot's index are fetched only if needed).
        let mut set_aside: Option<Vec<ChainValue>> = None;
        let mut applied: Vec<StoredObject> = Vec::new();
        let mut next = 0;
        while next < groups.len() {
            // As many whole indexes as fit in a batch (at least one).
            let mut end = next + 1;
            let mut objects = groups[next].len();
            while end < groups.len() && objects + groups[end].len() <= BATCH {
                objects += groups[end].len();
                end += 1;
            }
            let flat: Vec<StoredObject> = groups[next..end].iter().flatten().cloned().collect();
            let mut downloaded = self.download(&flat)?.into_iter();
            for i in next..end {
                let candidates: Vec<Checked> = downloaded.by_ref().take(groups[i].len()).collect();
                let Some(chosen) = candidates.iter().rposition(|c| c.salts == expected) else {
                    let known = match set_aside.take() {
                        Some(known) => known,
                        None => self
                            .chain_ends(&at_index(&plan.alternatives, plan.snapshot.name.index))?,
                    };
                    self.no_candidate_continues(&candidates, &known, &previous, expected)?;
                    // An abandoned branch: stop before it.
                    plan.abandoned = groups[i..].iter().flatten().cloned().collect();
                    log::warn!(
                        "restoring {} only up to {previous}: the later segments continue a \
                         branch the writer abandoned, ignored: {}",
                        plan.name,
                        plan.abandoned
                            .iter()
                            .map(|o| o.key.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    plan.segments = applied;
                    return Ok(());
                };
                let mut others = candidates;
                let chosen = others.remove(chosen);
                self.write(&chosen)?;
                for other in &others {
                    if other.salts == expected {
                        log::debug!(
                            "{} was cut again later as {}; using the later one",
                            other.object.key,
                            chosen.object.key
                        );
                    } else {
                        log::warn!(
                            "ignoring {}: it does not continue {previous} (its WAL salts \
                             are {}, the chain value there is {expected}); using {}",
                            other.object.key,
                            other.salts,
                            chosen.object.key
                        );
                    }
                }
                set_aside = Some(others.iter().map(|c| c.end).collect());
                expected = chosen.end;
                previous.clone_from(&chosen.object.key);
                applied.push(chosen.object);
            }
            next = end;
        }
        plan.segments = applied;
        Ok(())
    }

    /// No candidate at an index continues the chain: fine (an abandoned branch, Ok) only if
    /// each continues one of `known`, the cuts of the index before that were not applied.
    fn no_candidate_continues(
        &self,
        candidates: &[Checked],
        known: &[ChainValue],
        previous: &str,
        expected: ChainValue,
    ) -> Result<()> {
        for candidate in candidates {
            if !known.contains(&candidate.salts) {
                return Err(Error::corrupt(format!(
                    "{} does not continue {previous}: its WAL salts are {}, but the chain \
                     value after {previous} is {expected}; it belongs to another history",
                    candidate.object.key, candidate.salts
                )));
            }
        }
        Ok(())
    }

    /// The chain values after `objects` (downloaded and verified for this).
    fn chain_ends(&self, objects: &[StoredObject]) -> Result<Vec<ChainValue>> {
        let mut ends = Vec::new();
        for batch in objects.chunks(BATCH) {
            ends.extend(self.download(batch)?.into_iter().map(|c| c.end));
        }
        Ok(ends)
    }
}

fn at_index(objects: &[StoredObject], index: u64) -> Vec<StoredObject> {
    objects
        .iter()
        .filter(|o| o.name.index == index)
        .cloned()
        .collect()
}

/// `OUT.tmp`, removed (with any `-wal`/`-shm` beside it) unless committed.
struct TempOutput {
    path: PathBuf,
    file: File,
}

impl TempOutput {
    /// Create `OUT.tmp` afresh with `mode` (less the umask): a leftover from an interrupted
    /// restore is removed first, so its mode and any `-wal` beside it cannot carry over.
    fn create(output: &Path, mode: u32) -> Result<TempOutput> {
        let path = with_suffix(output, ".tmp");
        let what = || format!("cannot write restore output {}", path.display());
        for suffix in ["", "-wal", "-shm", "-journal"] {
            remove_if_exists(&with_suffix(&path, suffix)).context(what)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .context(what)?;
        Ok(TempOutput { path, file })
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// Remove stale `-wal`/`-shm` beside `output` and move the restored file into place.
    fn commit(mut self, output: &Path) -> Result<()> {
        for suffix in ["-wal", "-shm"] {
            remove_if_exists(&with_suffix(output, suffix))?;
        }
        std::fs::rename(&self.path, output)
            .context(|| format!("renaming {} to {}", self.path.display(), output.display()))?;
        if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .context(|| format!("syncing directory {}", dir.display()))?;
        }
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(with_suffix(&self.path, suffix));
            }
        }
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::from(e).with_context(format!("removing stale {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Download and gunzip `object` into `out` (a fresh, empty file), checking the gzip CRC.
/// Returns the gzip header's comment, if it has one.
fn download_into(
    storage: &dyn Storage,
    object: &StoredObject,
    out: &File,
) -> Result<Option<Vec<u8>>> {
    let mut local = LocalWriter {
        out: BufWriter::new(out),
        failed: None,
    };
    let mut gunzip = GzDecoder::new(&mut local);
    let got = storage.get(&object.key, &mut gunzip).and_then(|_| {
        gunzip
            .try_finish()
            .map_err(|e| Error::corrupt(e.to_string()))
    });
    let comment = gunzip
        .header()
        .and_then(|h| h.comment())
        .map(<[u8]>::to_vec);
    drop(gunzip);
    if let Some(e) = local.failed.take() {
        return Err(Error::from(e).with_context("writing downloaded data"));
    }
    match got {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound | ErrorKind::Auth | ErrorKind::Transient
            ) =>
        {
            return Err(e.with_context(format!("downloading {}", object.key)));
        }
        // Everything else is the data itself: bad gzip header, bad CRC, truncated stream.
        Err(e) => {
            return Err(Error::corrupt(format!(
                "{}: corrupt or truncated gzip data ({e})",
                object.key
            )))
        }
    }
    local
        .out
        .flush()
        .context(|| format!("writing downloaded {}", object.key))?;
    Ok(comment)
}

/// A writer that remembers its own failures, so a full disk is not reported as bad data.
struct LocalWriter<W: Write> {
    out: W,
    failed: Option<std::io::Error>,
}

impl<W: Write> Write for LocalWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf).inspect_err(|e| {
            self.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().inspect_err(|e| {
            self.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
        })
    }
}

/// Download `batch` into spool files in `dir`, `parallelism` at a time, in batch order.
fn download_batch(
    storage: &dyn Storage,
    batch: &[StoredObject],
    dir: &Path,
    parallelism: usize,
) -> Result<Vec<File>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<File>>>> =
        batch.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..parallelism.clamp(1, batch.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(object) = batch.get(i) else { break };
                let result = spool::anonymous(dir).and_then(|file| {
                    download_into(storage, object, &file)?;
                    Ok(file)
                });
                let failed = result.is_err();
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(result);
                }
                if failed {
                    // Stop handing out work; the first error in order is reported.
                    next.store(batch.len(), Ordering::Relaxed);
                }
            });
        }
    });
    let mut files = Vec::with_capacity(batch.len());
    for (slot, object) in results.into_iter().zip(batch) {
        let result = slot.into_inner().ok().flatten().ok_or_else(|| {
            Error::new(
                ErrorKind::Other,
                format!("download of {} did not run", object.key),
            )
        });
        files.push(result??);
    }
    Ok(files)
}

/// The page size from a database file's header (offset 16, big-endian; 1 means 65536).
fn read_page_size(db: &File) -> Result<u32> {
    let mut header = [0u8; 100];
    db.read_exact_at(&mut header, 0)
        .map_err(|_| Error::corrupt("snapshot is shorter than a database header"))?;
    if &header[..16] != b"SQLite format 3\0" {
        return Err(Error::corrupt("snapshot is not a SQLite database"));
    }
    let size = u32::from(u16::from_be_bytes([header[16], header[17]]));
    let size = if size == 1 { 65536 } else { size };
    if !(512..=65536).contains(&size) || !size.is_power_of_two() {
        return Err(Error::corrupt(format!(
            "snapshot has an invalid page size {size}"
        )));
    }
    Ok(size)
}

/// Verify `segment` as a standalone WAL for a database of `page_size`: returns its salts (the
/// chain value it continues) and its last frame's cumulative checksum (the value after it).
fn verify_segment(segment: &File, page_size: u32) -> Result<(ChainValue, ChainValue)> {
    let len = segment.metadata()?.len();
    let mut reader = WalReader::open(segment)?
        .ok_or_else(|| Error::corrupt("segment has no valid WAL header"))?;
    if reader.header().page_size != page_size {
        return Err(Error::corrupt(format!(
            "segment page size {} differs from the snapshot's {page_size}",
            reader.header().page_size
        )));
    }
    let mut page = Vec::new();
    let mut last_commit = 0;
    while let Some(frame) = reader.next_frame(&mut page)? {
        last_commit = frame.commit_size;
    }
    if reader.position().offset != len {
        return Err(Error::corrupt(format!(
            "bad WAL frame at offset {} of {len} (checksum or salt mismatch, or truncated)",
            reader.position().offset
        )));
    }
    if last_commit == 0 {
        return Err(Error::corrupt("segment does not end with a commit frame"));
    }
    Ok((
        ChainValue(reader.header().salt),
        ChainValue(reader.position().checksum),
    ))
}

/// Write the pages of `segment`, verified by [`verify_segment`], into `db`.
fn write_segment(segment: &File, db: &File, page_size: u32) -> Result<()> {
    let mut reader = WalReader::open(segment)?
        .ok_or_else(|| Error::corrupt("segment has no valid WAL header"))?;
    let page_size = u64::from(page_size);
    let mut page = Vec::new();
    while let Some(frame) = reader.next_frame(&mut page)? {
        if frame.page_number == 0 {
            return Err(Error::corrupt("frame for page 0"));
        }
        db.write_all_at(&page, u64::from(frame.page_number - 1) * page_size)
            .context(|| "writing restored page")?;
        if frame.is_commit() {
            db.set_len(u64::from(frame.commit_size) * page_size)
                .context(|| "resizing restored database")?;
        }
    }
    Ok(())
}

/// Open the restored file with SQLite and insist on `PRAGMA integrity_check` = ok.
fn check_integrity(path: &Path) -> Result<()> {
    let what = || format!("checking restored database {}", path.display());
    let conn = rusqlite::Connection::open(path).context(what)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check").context(what)?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .context(what)?
        .collect::<std::result::Result<_, _>>()
        .context(what)?;
    drop(stmt);
    conn.close().map_err(|(_, e)| e).context(what)?;
    if rows != ["ok"] {
        return Err(Error::corrupt(format!(
            "restored database fails PRAGMA integrity_check: {}",
            rows.into_iter().take(3).collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Synthetic replicas in `file://` storage: real SQLite pages, written as segments with
    //! chosen salts, and snapshots with or without a chain value.

    use std::io::Write as _;
    use std::sync::Arc;

    use flate2::write::GzEncoder;
    use flate2::{Compression, GzBuilder};
    use rusqlite::Connection;

    use super::*;
    use crate::layout::{ObjectKind, ObjectName};
    use crate::storage::file::FileStorage;
    use crate::wal::{WalHeader, WalWriter};

    const GENERATION: &str = "019ba7c71200beef";
    const T0: i64 = 1_768_046_400_000;

    /// A WAL-mode database whose commits are read back as frames.
    struct Source {
        conn: Connection,
        path: PathBuf,
    }

    impl Source {
        fn create(path: PathBuf) -> Source {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "PRAGMA page_size=4096; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE t(x TEXT); PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
            Source { conn, path }
        }

        /// A second history: a copy of this database as it is now.
        fn fork(&self, path: PathBuf) -> Source {
            std::fs::copy(&self.path, &path).unwrap();
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA wal_autocheckpoint=0;").unwrap();
            Source { conn, path }
        }

        /// Commit `rows` and return the frames they wrote (then checkpoint them away).
        fn commit(&self, rows: &[&str]) -> Vec<(u32, u32, Vec<u8>)> {
            for row in rows {
                self.conn
                    .execute("INSERT INTO t VALUES (?1)", [row])
                    .unwrap();
            }
            let wal = File::open(with_suffix(&self.path, "-wal")).unwrap();
            let mut reader = WalReader::open(&wal).unwrap().unwrap();
            let mut frames = Vec::new();
            let mut page = Vec::new();
            while let Some(frame) = reader.next_frame(&mut page).unwrap() {
                frames.push((frame.page_number, frame.commit_size, page.clone()));
            }
            assert_ne!(frames.last().unwrap().1, 0);
            self.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
            frames
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }

        fn rows(&self) -> Vec<String> {
            rows(&self.conn)
        }
    }

    fn rows(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT x FROM t ORDER BY rowid").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<std::result::Result<_, _>>().unwrap()
    }

    struct Replica {
        _dir: tempfile::TempDir,
        root: PathBuf,
        storage: Arc<FileStorage>,
        generation: Generation,
    }

    impl Replica {
        fn new() -> Replica {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            Replica {
                storage: Arc::new(FileStorage::new(root.join("replica"))),
                root,
                _dir: dir,
                generation: Generation::parse(GENERATION).unwrap(),
            }
        }

        fn key(&self, kind: ObjectKind, index: u64, at: i64) -> String {
            ObjectName {
                kind,
                generation: self.generation.clone(),
                index,
                time: UtcTime::from_millis(T0 + at * 1000),
            }
            .key("app")
        }

        /// Store `db` as the snapshot at `index`, with `chain` in its gzip comment (none:
        /// a legacy snapshot).
        fn snapshot(&self, index: u64, at: i64, db: &[u8], chain: Option<ChainValue>) -> String {
            let builder = match chain {
                Some(chain) => GzBuilder::new().comment(chain.comment()),
                None => GzBuilder::new(),
            };
            let mut gz = builder.write(Vec::new(), Compression::fast());
            gz.write_all(db).unwrap();
            let key = self.key(ObjectKind::Snapshot, index, at);
            self.storage.put_bytes(&key, &gz.finish().unwrap()).unwrap();
            key
        }

        /// Store `frames` as segment `index` with WAL salts `salts`; returns its key and the
        /// chain value after it.
        fn segment(
            &self,
            index: u64,
            at: i64,
            salts: ChainValue,
            frames: &[(u32, u32, Vec<u8>)],
        ) -> (String, ChainValue) {
            let header = WalHeader::new(false, 4096, 0, salts.0);
            let mut writer = WalWriter::new(Vec::new(), header).unwrap();
            for (page_number, commit_size, page) in frames {
                writer
                    .write_frame(*page_number, *commit_size, page)
                    .unwrap();
            }
            let wal = writer.finish().unwrap();
            let word = |at: usize| u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
            let last = wal.len() - 4096 - 24;
            let end = ChainValue([word(last + 16), word(last + 20)]);
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&wal).unwrap();
            let key = self.key(ObjectKind::Segment, index, at);
            self.storage.put_bytes(&key, &gz.finish().unwrap()).unwrap();
            (key, end)
        }

        fn restore(&self, until: Option<i64>) -> Result<(RestorePlan, Vec<String>)> {
            let out = self.root.join(format!("out-{until:?}.db"));
            let options = RestoreOptions {
                point_in_time: until.map(|at| UtcTime::from_millis(T0 + at * 1000)),
                force: true,
                ..RestoreOptions::default()
            };
            let plan = restore(self.storage.as_ref(), "app", &out, &options)?;
            let conn = Connection::open(&out).unwrap();
            Ok((plan, rows(&conn)))
        }
    }

    fn keys(objects: &[StoredObject]) -> Vec<&str> {
        objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn a_proper_chain_restores_and_a_second_cut_of_an_index_wins() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        // Index 2 cut twice from the same place: the later cut holds more.
        let first_cut = src.commit(&["b"]);
        let mut frames = first_cut.clone();
        frames.extend(src.commit(&["c"]));
        let (early, _) = r.segment(2, 2, c1, &first_cut);
        let at_early = src_rows_after(&src, 1);
        let (s2, c2) = r.segment(2, 3, c1, &frames);
        let (s3, _) = r.segment(3, 4, c2, &src.commit(&["d"]));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, src.rows());
        assert_eq!(rows, ["a", "b", "c", "d"]);
        assert_eq!(keys(&plan.segments), [&s1, &s2, &s3]);
        assert_eq!(keys(&plan.alternatives), [&early]);
        assert!(plan.abandoned.is_empty());
        assert_eq!(plan.chain, Some(base));

        // A point in time between the two cuts takes the first.
        let (plan, rows) = r.restore(Some(2)).unwrap();
        assert_eq!(keys(&plan.segments), [&s1, &early]);
        assert_eq!(rows, at_early);
    }

    /// The rows of `src` without its last `drop` rows: what it held a few commits ago.
    fn src_rows_after(src: &Source, drop: usize) -> Vec<String> {
        let rows = src.rows();
        rows[..rows.len() - drop].to_vec()
    }

    #[test]
    fn a_segment_from_another_history_is_refused_naming_it() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        let foreign = ChainValue([c1.0[0], c1.0[1] ^ 1]);
        let (s2, _) = r.segment(2, 2, foreign, &src.commit(&["b"]));

        let err = r.restore(None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let text = err.to_string();
        assert!(text.contains(&s2) && text.contains(&s1), "{text}");
        assert!(text.contains(&foreign.to_string()), "{text}");
        assert!(text.contains(&c1.to_string()), "{text}");
        assert!(!r.root.join("out-None.db").exists());
        assert!(!r.root.join("out-None.db.tmp").exists());

        // The first segment's salts must be the snapshot's chain value too.
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let snap = r.snapshot(0, 0, &src.file(), Some(base));
        let (s1, _) = r.segment(1, 1, ChainValue([1, 2]), &src.commit(&["a"]));
        let text = r.restore(None).unwrap_err().to_string();
        assert!(text.contains(&s1) && text.contains(&snap), "{text}");

        // And a base snapshot must carry its generation's value.
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let snap = r.snapshot(0, 0, &src.file(), Some(ChainValue([1, 2])));
        let text = r.restore(None).unwrap_err().to_string();
        assert!(
            text.contains(&snap) && text.contains("generation"),
            "{text}"
        );
    }

    #[test]
    fn an_abandoned_branch_is_not_mixed_into_the_newer_one() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (s1, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        // The writer's local position is rolled back to after segment 1 (K): the old branch
        // K+1, K+2, K+3 is in the bucket, and the writer cuts a new K+1' from K.
        let new = old.fork(r.root.join("new.db"));
        let (old2, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, c3) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (old4, _) = r.segment(4, 4, c3, &old.commit(&["old 4"]));
        let (new2, new_c2) = r.segment(2, 5, c1, &new.commit(&["new 2"]));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        assert_eq!(keys(&plan.segments), [&s1, &new2]);
        assert_eq!(keys(&plan.abandoned), [&old3, &old4]);
        assert_eq!(plan.restored_to().millis(), T0 + 5000);
        // Before the new branch existed, the old one is the history.
        let (plan, rows) = r.restore(Some(4)).unwrap();
        assert_eq!(rows, ["k", "old 2", "old 3", "old 4"]);
        assert_eq!(keys(&plan.segments), [&s1, &old2, &old3, &old4]);

        // Once the new branch goes on, its K+2' is chosen over the old K+2.
        let (new3, new_c3) = r.segment(3, 6, new_c2, &new.commit(&["new 3"]));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2", "new 3"]);
        assert_eq!(keys(&plan.segments), [&s1, &new2, &new3]);
        assert_eq!(keys(&plan.abandoned), [&old4]);

        // A snapshot of the new branch at index 3: the old K+3 continues the old K+2, a cut
        // of the snapshot's index, so it is an abandoned branch too.
        let snap = r.snapshot(3, 7, &new.file(), Some(new_c3));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2", "new 3"]);
        assert_eq!(plan.snapshot.key, snap);
        assert_eq!(keys(&plan.abandoned), [&old4]);
        // But one that continues nothing known is refused.
        let (stray, _) = r.segment(4, 8, ChainValue([5, 6]), &new.commit(&["stray"]));
        let err = r.restore(None).unwrap_err().to_string();
        assert!(err.contains(&stray) && err.contains(&snap), "{err}");
    }

    /// Object times are the writer's clock: one segment labelled 30 days ahead (the clock
    /// glitched, then came back) is applied by a point-in-time restore to a moment after
    /// the glitch, not taken as the end of the history. The blur stays at the step: a
    /// point before it restores as before.
    #[test]
    fn a_clock_stepped_forward_blurs_point_in_time_only_at_the_step() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &src.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &src.commit(&["a"]));
        let (_, c2) = r.segment(2, 30 * 86400, c1, &src.commit(&["b"]));
        let (_, c3) = r.segment(3, 3, c2, &src.commit(&["c"]));
        r.segment(4, 4, c3, &src.commit(&["d"]));
        assert_eq!(r.restore(Some(3)).unwrap().1, ["a", "b", "c"]);
        assert_eq!(r.restore(Some(5)).unwrap().1, ["a", "b", "c", "d"]);
        assert_eq!(r.restore(Some(1)).unwrap().1, ["a"]);
        assert_eq!(r.restore(None).unwrap().1, ["a", "b", "c", "d"]);
    }

    #[test]
    fn an_abandoned_branch_after_a_later_snapshot_ends_the_restore_there() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        let new = old.fork(r.root.join("new.db"));
        let (_, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, _) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (_, new_c2) = r.segment(2, 5, c1, &new.commit(&["new 2"]));
        let snap = r.snapshot(2, 6, &new.file(), Some(new_c2));

        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        assert_eq!(plan.snapshot.key, snap);
        assert!(plan.segments.is_empty());
        assert_eq!(keys(&plan.abandoned), [&old3]);
    }

    /// Run `scripts/restore-by-hand.sh` on the replica: Ok(rows) or Err(stderr).
    fn by_hand(r: &Replica, out: &str) -> std::result::Result<(Vec<String>, String), String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/restore-by-hand.sh");
        let out = r.root.join(out);
        let done = std::process::Command::new("bash")
            .arg(script)
            .arg(r.root.join("replica"))
            .arg("app")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
        if !done.status.success() {
            assert!(!out.exists());
            return Err(stderr);
        }
        Ok((rows(&Connection::open(&out).unwrap()), stderr))
    }

    #[test]
    fn the_script_follows_and_checks_the_chain_too() {
        let r = Replica::new();
        let old = Source::create(r.root.join("old.db"));
        let base = ChainValue::of_generation(&r.generation);
        r.snapshot(0, 0, &old.file(), Some(base));
        let (_, c1) = r.segment(1, 1, base, &old.commit(&["k"]));
        let new = old.fork(r.root.join("new.db"));
        let (_, c2) = r.segment(2, 2, c1, &old.commit(&["old 2"]));
        let (old3, _) = r.segment(3, 3, c2, &old.commit(&["old 3"]));
        let (new2, _) = r.segment(2, 5, c1, &new.commit(&["new 2"]));

        let (rows, stderr) = by_hand(&r, "by-hand.db").unwrap();
        assert_eq!(rows, ["k", "new 2"]);
        let file = |key: &str| key.rsplit('/').next().unwrap().to_string();
        assert!(
            stderr.contains("abandoned") && stderr.contains(&file(&old3)),
            "{stderr}"
        );
        let (plan, _) = r.restore(None).unwrap();
        assert_eq!(keys(&plan.abandoned), [&old3]);
        assert_eq!(
            std::fs::read(r.root.join("by-hand.db")).unwrap(),
            std::fs::read(r.root.join("out-None.db")).unwrap(),
            "the script and walsync restore the same bytes"
        );

        // A segment from another history stops it, naming the segment and what it follows.
        let (stray, _) = r.segment(3, 6, ChainValue([5, 6]), &new.commit(&["stray"]));
        let stderr = by_hand(&r, "by-hand-2.db").unwrap_err();
        assert!(stderr.contains(&file(&stray)), "{stderr}");
        assert!(stderr.contains(&file(&new2)), "{stderr}");
        assert!(stderr.contains("another history"), "{stderr}");
    }

    #[test]
    fn a_legacy_snapshot_without_a_chain_value_still_restores() {
        let r = Replica::new();
        let src = Source::create(r.root.join("src.db"));
        r.snapshot(0, 0, &src.file(), None);
        // Old writers kept the live WAL's salts: nothing to check them against.
        r.segment(1, 1, ChainValue([7, 8]), &src.commit(&["a"]));
        let (_, _) = r.segment(2, 2, ChainValue([7, 8]), &src.commit(&["b"]));
        let (plan, rows) = r.restore(None).unwrap();
        assert_eq!(rows, ["a", "b"]);
        assert_eq!(plan.chain, None);
        assert_eq!(plan.segments.len(), 2);
    }
}
