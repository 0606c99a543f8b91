//! `walsync list` and `walsync status`: what a destination holds, from one paginated LIST
//! (no GETs).
//!
//! The JSON forms (`--json`) are stable interfaces for scripts: fields are only ever added.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::layout::{Catalog, Generation, GenerationObjects, StoredObject};
use crate::storage::Storage;
use crate::utc::UtcTime;

/// Everything under a destination.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub destination: String,
    pub databases: Vec<DatabaseSummary>,
}

/// One replicated database.
#[derive(Debug, Serialize)]
pub struct DatabaseSummary {
    pub name: String,
    /// Total bytes stored for this database (compressed).
    pub bytes: u64,
    /// Oldest first; the last one is what a plain restore uses.
    pub generations: Vec<GenerationSummary>,
}

/// One generation of a database.
#[derive(Debug, Serialize)]
pub struct GenerationSummary {
    pub generation: String,
    /// RFC 3339 start time.
    pub started: String,
    pub snapshots: usize,
    pub segments: usize,
    /// Highest segment index stored (0 if none).
    pub last_index: u64,
    pub bytes: u64,
    pub newest_snapshot: Option<ObjectSummary>,
    pub newest_segment: Option<ObjectSummary>,
}

/// One object, as `list` reports it.
#[derive(Debug, Serialize)]
pub struct ObjectSummary {
    pub key: String,
    pub index: u64,
    /// RFC 3339.
    pub time: String,
    pub size: u64,
}

impl ObjectSummary {
    fn of(object: &StoredObject) -> ObjectSummary {
        ObjectSummary {
            key: object.key.clone(),
            index: object.name.index,
            time: object.name.time.to_rfc3339(),
            size: object.size,
        }
    }
}

/// Everything under `storage`, from one (paginated) LIST.
pub fn catalog(storage: &dyn Storage) -> Result<Catalog> {
    let objects = storage
        .list("")
        .context(|| format!("listing {}", storage.describe()))?;
    Ok(Catalog::from_listing(objects))
}

/// List every database under `storage`.
pub fn list(storage: &dyn Storage) -> Result<Listing> {
    let catalog = catalog(storage)?;
    let databases = catalog
        .databases
        .iter()
        .map(|(name, generations)| {
            let generations: Vec<GenerationSummary> = generations
                .iter()
                .map(|(generation, objects)| summarize(generation, objects))
                .collect();
            DatabaseSummary {
                name: name.clone(),
                bytes: generations.iter().map(|g| g.bytes).sum(),
                generations,
            }
        })
        .collect();
    Ok(Listing {
        destination: storage.describe(),
        databases,
    })
}

/// When a generation started: its base snapshot's time, if it is still stored. The id's
/// own time is a sequence (it sorts after the generation before it even when the clock
/// is behind, see [`Generation::after`]), which a clock that once ran ahead keeps ahead.
fn started(generation: &Generation, objects: &GenerationObjects) -> crate::utc::UtcTime {
    objects
        .snapshots
        .first()
        .filter(|s| s.name.index == 0)
        .map_or_else(|| generation.start_time(), |s| s.name.time)
}

fn summarize(generation: &Generation, objects: &GenerationObjects) -> GenerationSummary {
    GenerationSummary {
        generation: generation.to_string(),
        started: started(generation, objects).to_rfc3339(),
        snapshots: objects.snapshots.len(),
        segments: objects.segments.len(),
        last_index: objects.segments.last().map_or(0, |s| s.name.index),
        bytes: objects.bytes(),
        newest_snapshot: objects.snapshots.last().map(ObjectSummary::of),
        newest_segment: objects.segments.last().map(ObjectSummary::of),
    }
}

impl Listing {
    /// A table for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.databases.is_empty() {
            let _ = writeln!(out, "no replicas in {}", self.destination);
            return out;
        }
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:>9} {:>9} {:>12}  {:<24}  {:<24}",
            "NAME",
            "GENERATION",
            "SNAPSHOTS",
            "SEGMENTS",
            "BYTES",
            "NEWEST SNAPSHOT",
            "NEWEST SEGMENT"
        );
        for db in &self.databases {
            for g in &db.generations {
                let time =
                    |o: &Option<ObjectSummary>| o.as_ref().map_or("-".into(), |o| o.time.clone());
                let _ = writeln!(
                    out,
                    "{:<20} {:<16} {:>9} {:>9} {:>12}  {:<24}  {}",
                    db.name,
                    g.generation,
                    g.snapshots,
                    g.segments,
                    g.bytes,
                    time(&g.newest_snapshot),
                    time(&g.newest_segment)
                );
            }
        }
        out
    }
}

/// `walsync status`: how fresh each replica under a destination is.
#[derive(Debug, Serialize)]
pub struct Status {
    pub destination: String,
    /// RFC 3339: when the listing was taken; every `age_seconds` is measured from here.
    pub checked_at: String,
    /// In name order, or in the order asked for.
    pub databases: Vec<DatabaseStatus>,
}

/// One database's freshness: its newest stored commit and newest generation.
#[derive(Debug, Serialize)]
pub struct DatabaseStatus {
    pub name: String,
    /// RFC 3339 time of the newest stored commit: the newest generation's newest segment,
    /// else (a generation with no segment yet) its newest snapshot.
    pub last_commit: String,
    /// Whole seconds from `last_commit` to `checked_at` (0 if the clock is behind).
    pub age_seconds: u64,
    /// The newest generation, the one a plain restore uses.
    pub generation: String,
    /// RFC 3339 start time of that generation.
    pub generation_started: String,
    /// Snapshots, segments and bytes (compressed) stored in that generation.
    pub snapshots: usize,
    pub segments: usize,
    pub bytes: u64,
    /// Highest segment index stored in that generation (0 if none).
    pub last_index: u64,
    /// Generations stored, and bytes stored for this database in all of them.
    pub generations: usize,
    pub total_bytes: u64,
}

/// The status of the databases under `storage` (all of them if `names` is empty), from one
/// LIST, with ages as of `now` (taken after the listing when `None`). A name without a
/// replica is a [`crate::error::ErrorKind::NotFound`] error.
pub fn status(storage: &dyn Storage, names: &[String], now: Option<UtcTime>) -> Result<Status> {
    let catalog = catalog(storage)?;
    let now = now.unwrap_or_else(UtcTime::now);
    let wanted: Vec<&String> = if names.is_empty() {
        catalog.databases.keys().collect()
    } else {
        names.iter().collect()
    };
    let mut databases = Vec::with_capacity(wanted.len());
    for name in wanted {
        let generations = catalog
            .databases
            .get(name)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no replica named {name:?} in {}",
                    storage.describe()
                ))
            })?;
        let (generation, objects) = generations.iter().next_back().expect("not empty");
        // Each generation listed holds at least one object.
        let Some(newest) = objects.segments.last().or(objects.snapshots.last()) else {
            continue;
        };
        let time = newest.name.time;
        databases.push(DatabaseStatus {
            name: name.clone(),
            last_commit: time.to_rfc3339(),
            age_seconds: u64::try_from(now.millis().saturating_sub(time.millis()) / 1000)
                .unwrap_or(0),
            generation: generation.to_string(),
            generation_started: started(generation, objects).to_rfc3339(),
            snapshots: objects.snapshots.len(),
            segments: objects.segments.len(),
            bytes: objects.bytes(),
            last_index: objects.segments.last().map_or(0, |s| s.name.index),
            generations: generations.len(),
            total_bytes: generations.values().map(GenerationObjects::bytes).sum(),
        });
    }
    Ok(Status {
        destination: storage.describe(),
        checked_at: now.to_rfc3339(),
        databases,
    })
}

/// An age for people: `42s`, `5m07s`, `3h02m`, `4d07h`.
fn human_age(seconds: u64) -> String {
    let (m, h, d) = (60, 3600, 86400);
    if seconds < m {
        format!("{seconds}s")
    } else if seconds < h {
        format!("{}m{:02}s", seconds / m, seconds % m)
    } else if seconds < d {
        format!("{}h{:02}m", seconds / h, seconds % h / m)
    } else {
        format!("{}d{:02}h", seconds / d, seconds % d / h)
    }
}

impl Status {
    /// A table for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.databases.is_empty() {
            let _ = writeln!(out, "no replicas in {}", self.destination);
            return out;
        }
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:>8}  {:<16} {:>9} {:>9} {:>12}",
            "NAME", "LAST COMMIT", "AGE", "GENERATION", "SNAPSHOTS", "SEGMENTS", "BYTES"
        );
        for db in &self.databases {
            let _ = writeln!(
                out,
                "{:<20} {:<24} {:>8}  {:<16} {:>9} {:>9} {:>12}",
                db.name,
                db.last_commit,
                human_age(db.age_seconds),
                db.generation,
                db.snapshots,
                db.segments,
                db.bytes
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::human_age;

    #[test]
    fn ages_read_well() {
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(307), "5m07s");
        assert_eq!(human_age(3 * 3600 + 125), "3h02m");
        assert_eq!(human_age(4 * 86400 + 7 * 3600 + 59), "4d07h");
    }
}
