//! `walsync list`: what a destination holds, from one paginated LIST.
//!
//! The JSON form (`--json`) is a stable interface for scripts: fields are only ever added.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Context, Result};
use crate::layout::{Catalog, Generation, GenerationObjects, StoredObject};
use crate::storage::Storage;

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

/// List every database under `storage`.
pub fn list(storage: &dyn Storage) -> Result<Listing> {
    let objects = storage
        .list("")
        .context(|| format!("listing {}", storage.describe()))?;
    let catalog = Catalog::from_listing(objects);
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

fn summarize(generation: &Generation, objects: &GenerationObjects) -> GenerationSummary {
    GenerationSummary {
        generation: generation.to_string(),
        started: generation.start_time().to_rfc3339(),
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
