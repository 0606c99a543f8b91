//! Step 4, **apply**: each verified segment's pages written at their offsets in `OUT.tmp`,
//! as a checkpoint would, a commit frame's database size truncating or extending the file.
//!
//! An unchained generation (written before walsync chained segments) applies the planned
//! segments in order. A chained one walks the chain: at each index it applies the newest
//! cut whose WAL salts continue the chain value so far, and stops before an index none of
//! whose cuts does, if they all continue a cut that was not applied (a branch the writer
//! abandoned); a cut that continues nothing known belongs to another history and fails the
//! restore. A restore never mixes two histories.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::download::{download_batch, BATCH};
use super::verify::verify_segment;
use super::RestorePlan;
use crate::error::{Context, Error, Result};
use crate::layout::{ChainValue, StoredObject};
use crate::storage::Storage;
use crate::wal::WalReader;

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
pub(super) struct Apply<'a> {
    pub(super) storage: &'a dyn Storage,
    /// Where spool files go (beside the output).
    pub(super) dir: &'a Path,
    pub(super) db: &'a File,
    pub(super) page_size: u32,
    pub(super) parallelism: usize,
}

impl Apply<'_> {
    /// An unchained generation: apply `segments` in order.
    pub(super) fn unchained(&self, segments: &[StoredObject]) -> Result<()> {
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
    pub(super) fn chained(&self, plan: &mut RestorePlan, snapshot_chain: ChainValue) -> Result<()> {
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
