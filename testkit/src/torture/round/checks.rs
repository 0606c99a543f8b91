//! What a round checks once it is over (faults off, walsync stopped by SIGTERM): every
//! stored object downloaded and its place in the chain checked ([`Round::check_chain`]),
//! and the latest state and several points in time restored with the real binary and
//! compared with the digests the writer recorded ([`Round::check_restores`]): the
//! harness's verdicts (a) and (b) (see the module doc of `torture.rs`).
//!
//! Apart from the round's plumbing (`round.rs`) and its chaos (`chaos.rs`) because this is
//! where a round fails or passes: what counts as correct is all here.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;

use rusqlite::{Connection, OpenFlags};
use walsync::format::{Catalog, ChainValue, Generation, GenerationObjects};
use walsync::storage::Storage;
use walsync::UtcTime;

use super::{Round, NAME, PREFIX};
use crate::torture::app::{digest, Commit};
use crate::torture::Totals;

impl Round<'_> {
    /// Download every stored object of every generation and check the chain (see
    /// `src/segment.rs`): each segment's WAL header salts must equal the chain value after
    /// the index before it (the generation id read as two hex words for index 1), and each
    /// snapshot's gzip comment must be the chain value at its index. A duplicate index
    /// passes only if exactly one of the duplicates chains onward (at the end of a
    /// generation: only if they all end at the same value).
    ///
    /// Hunts two histories in one generation (an index cut again after a restart, a
    /// replaced file's frames shipped under the old generation, a gap), which a restore
    /// must refuse and a restore by hand would apply.
    pub(super) fn check_chain(&self, totals: &mut Totals) -> Result<(), String> {
        let storage = self.server.storage(PREFIX);
        let listing = storage
            .list(&format!("{NAME}/"))
            .map_err(|e| format!("listing the bucket: {e}"))?;
        let catalog = Catalog::from_listing(listing);
        let generations = catalog
            .databases
            .get(NAME)
            .ok_or("no replica in the bucket")?;
        for (generation, objects) in generations {
            totals.chain_generations += 1;
            if let Err(e) = check_generation_chain(&storage, generation, objects, totals) {
                totals.failures.push(format!(
                    "round {}: chain of generation {generation}: {e}",
                    self.round
                ));
            }
        }
        Ok(())
    }

    /// Restore with the real binary into a fresh file; its digest, or the error output.
    fn restore(&self, at: Option<UtcTime>, n: usize) -> Result<u64, String> {
        let out = self.dir.join(format!("restore-{n}.db"));
        let out_text = out.to_string_lossy().into_owned();
        let dest = self.dest();
        let timeout = self.config.s3_timeout.as_secs_f64().to_string();
        let mut args = vec![
            "restore",
            NAME,
            "-o",
            &out_text,
            "-b",
            &dest,
            "--s3-timeout",
            &timeout,
        ];
        let time;
        if let Some(at) = at {
            time = at.to_rfc3339();
            args.extend(["--point-in-time", &time]);
        }
        let output = self
            .command(&args)
            .output()
            .map_err(|e| format!("running walsync restore: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        let result = (|| {
            let conn = Connection::open_with_flags(&out, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| e.to_string())?;
            let check: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(|e| e.to_string())?;
            if check != "ok" {
                return Err(format!("integrity_check: {check}"));
            }
            digest(&conn).map_err(|e| e.to_string())
        })();
        // Opening the restored WAL-mode database left -wal and -shm files beside it.
        for suffix in ["", "-wal", "-shm"] {
            let mut path = out.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        result
    }

    pub(super) fn check_restores(
        &mut self,
        commits: &[Commit],
        totals: &mut Totals,
    ) -> Result<(), String> {
        let round = self.round;
        let last = commits.last().ok_or("no commits recorded")?;
        totals.latest_checks += 1;
        match self.restore(None, 0) {
            Ok(d) if d == last.digest => {}
            Ok(d) => {
                let which = commits.iter().rposition(|c| c.digest == d);
                totals.failures.push(format!(
                    "round {round}: (a) the latest restore is not the final commit {}: it matches {}",
                    commits.len() - 1,
                    which.map_or("no recorded commit".to_string(), |j| format!("commit {j}"))
                ));
            }
            Err(e) => totals
                .failures
                .push(format!("round {round}: (a) the latest restore failed: {e}")),
        }

        // Points in time: some segment boundaries (and just before them), some random moments.
        let storage = self.server.storage(PREFIX);
        let listing = storage
            .list(&format!("{NAME}/"))
            .map_err(|e| format!("listing the bucket: {e}"))?;
        let catalog = Catalog::from_listing(listing);
        let generations = catalog
            .databases
            .get(NAME)
            .ok_or("no replica in the bucket")?;
        let boundaries: Vec<UtcTime> = generations
            .values()
            .flat_map(|g| g.segments.iter().chain(&g.snapshots).map(|o| o.name.time))
            .collect();
        let first = commits[0].start.millis();
        let span = (last.end.millis() - first).max(1) as u64;
        let mut times = Vec::new();
        for _ in 0..4 {
            if !boundaries.is_empty() {
                let b = boundaries[self.rng.below(boundaries.len() as u64) as usize];
                times.push(b);
                times.push(UtcTime::from_millis(b.millis() - 1));
            }
            times.push(UtcTime::from_millis(
                first + self.rng.below(span + 500) as i64,
            ));
        }
        times.sort();
        times.dedup();
        let earliest_snapshot = generations
            .values()
            .flat_map(|g| &g.snapshots)
            .map(|s| s.name.time)
            .min();
        // Commit indices by digest (a VACUUM leaves the digest unchanged, so some repeat).
        let mut by_digest: HashMap<u64, Vec<usize>> = HashMap::new();
        for (j, c) in commits.iter().enumerate() {
            by_digest.entry(c.digest).or_default().push(j);
        }
        let mut previous = 0usize;
        for (n, at) in times.into_iter().enumerate() {
            if earliest_snapshot.is_none_or(|e| at < e) {
                totals.pitr_too_early += 1;
                continue;
            }
            totals.pitr_checks += 1;
            let d = match self.restore(Some(at), n + 1) {
                Ok(d) => d,
                Err(e) => {
                    totals
                        .failures
                        .push(format!("round {round}: (b) restore at {at} failed: {e}"));
                    continue;
                }
            };
            if self.clock_stepped_at.is_some_and(|s| at >= s) {
                // Object times after the clock step do not bound commit times.
                totals.pitr_clock_relaxed += 1;
                if !by_digest.contains_key(&d) {
                    totals.failures.push(format!(
                        "round {round}: (b) restore at {at} (after the clock step) is no recorded state (a partial transaction, or corrupt)"
                    ));
                }
                continue;
            }
            let newest = commits.iter().rposition(|c| c.start <= at).unwrap_or(0);
            let matches = by_digest.get(&d).cloned().unwrap_or_default();
            let allowed: Vec<usize> = matches
                .iter()
                .copied()
                .filter(|&j| commits[j].start <= at)
                .collect();
            let Some(&j) = allowed.iter().find(|&&j| j >= previous) else {
                let why = if matches.is_empty() {
                    "no recorded commit (a partial transaction, or corrupt)".to_string()
                } else if allowed.is_empty() {
                    format!(
                        "commit {} which started at {}, after the time asked for",
                        matches[0], commits[matches[0]].start
                    )
                } else {
                    format!(
                        "commit {}, older than commit {previous} restored for an earlier time",
                        allowed[allowed.len() - 1]
                    )
                };
                totals
                    .failures
                    .push(format!("round {round}: (b) restore at {at} is {why}"));
                continue;
            };
            previous = j;
            // Equal digests (a VACUUM) make the lag ambiguous: count the most favourable.
            let best = allowed.iter().copied().max().unwrap_or(j);
            let lag = (newest - best.min(newest)) as u64;
            if lag == 0 {
                totals.pitr_exact += 1;
            }
            totals.pitr_max_lag = totals.pitr_max_lag.max(lag);
            totals.pitr_lag_sum += lag;
        }
        Ok(())
    }
}

fn download(storage: &dyn Storage, key: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    storage
        .get(key, &mut body)
        .map_err(|e| format!("downloading {key}: {e}"))?;
    Ok(body)
}

/// A segment's WAL header salts and the chain value after it (its last frame's cumulative
/// checksum), from the gunzipped segment.
fn segment_chain(wal: &[u8]) -> Option<(ChainValue, ChainValue)> {
    let word = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = wal.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    };
    let frame = 24 + word(8)? as usize;
    let body = wal.len().checked_sub(32)?;
    if body == 0 || !body.is_multiple_of(frame) {
        return None;
    }
    let last = 32 + body - frame;
    Some((
        ChainValue([word(16)?, word(20)?]),
        ChainValue([word(last + 16)?, word(last + 20)?]),
    ))
}

/// The chain of one generation (see [`Round::check_chain`]).
fn check_generation_chain(
    storage: &dyn Storage,
    generation: &Generation,
    objects: &GenerationObjects,
    totals: &mut Totals,
) -> Result<(), String> {
    // Segments by index: key, salts, chain value after it (four downloads at a time).
    let links: Vec<Result<(ChainValue, ChainValue), String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                scope.spawn(move || {
                    objects
                        .segments
                        .iter()
                        .skip(w)
                        .step_by(4)
                        .map(|segment| {
                            let mut wal = Vec::new();
                            flate2::read::GzDecoder::new(
                                download(storage, &segment.key)?.as_slice(),
                            )
                            .read_to_end(&mut wal)
                            .map_err(|e| format!("gunzipping {}: {e}", segment.key))?;
                            segment_chain(&wal).ok_or_else(|| {
                                format!("{} is not a WAL file with whole frames", segment.key)
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut results: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default().into_iter())
            .collect();
        (0..objects.segments.len())
            .map(|i| {
                results[i % 4]
                    .next()
                    .unwrap_or_else(|| Err("a download thread panicked".into()))
            })
            .collect()
    });
    let mut by_index: BTreeMap<u64, Vec<(String, ChainValue, ChainValue)>> = BTreeMap::new();
    for (segment, link) in objects.segments.iter().zip(links) {
        let (salts, after) = link?;
        by_index
            .entry(segment.name.index)
            .or_default()
            .push((segment.key.clone(), salts, after));
    }
    let last = by_index.keys().next_back().copied().unwrap_or(0);
    let mut value = ChainValue::of_generation(generation);
    let mut after_index = BTreeMap::from([(0u64, value)]);
    for index in 1..=last {
        let candidates = by_index
            .get(&index)
            .ok_or_else(|| format!("index {index} is missing (segments go up to {last})"))?;
        if let Some((key, salts, _)) = candidates.iter().find(|c| c.1 != value) {
            return Err(format!(
                "{key} does not continue the chain: its salts are {salts}, the value after index {} is {value}",
                index - 1
            ));
        }
        totals.chain_links += 1;
        value = if let [(_, _, after)] = candidates.as_slice() {
            *after
        } else {
            totals.chain_duplicates += candidates.len() as u64 - 1;
            let keys: Vec<&str> = candidates.iter().map(|c| c.0.as_str()).collect();
            let next: Vec<ChainValue> = by_index
                .get(&(index + 1))
                .map(|n| n.iter().map(|c| c.1).collect())
                .unwrap_or_default();
            let onward: Vec<ChainValue> = candidates
                .iter()
                .map(|c| c.2)
                .filter(|after| next.contains(after))
                .collect();
            if index == last {
                if candidates.iter().any(|c| c.2 != candidates[0].2) {
                    return Err(format!(
                        "the last index {index} is stored {} times, ending at different values: {keys:?}",
                        candidates.len()
                    ));
                }
                candidates[0].2
            } else if let [after] = onward.as_slice() {
                *after
            } else {
                return Err(format!(
                    "index {index} is stored {} times and {} of them chain onward: {keys:?}",
                    candidates.len(),
                    onward.len()
                ));
            }
        };
        after_index.insert(index, value);
    }
    if !objects.segments.is_empty() && !objects.snapshots.iter().any(|s| s.name.index == 0) {
        return Err("segments but no base snapshot (index 0)".into());
    }
    for snapshot in &objects.snapshots {
        let body = download(storage, &snapshot.key)?;
        let mut decoder = flate2::read::GzDecoder::new(body.as_slice());
        // The header is parsed on the first read.
        let _ = decoder.read(&mut [0u8; 1]);
        let comment = decoder
            .header()
            .and_then(|h| h.comment())
            .unwrap_or_default();
        let chain = ChainValue::parse_comment(comment).ok_or_else(|| {
            format!(
                "{} has no walsync-chain comment ({:?})",
                snapshot.key,
                String::from_utf8_lossy(comment)
            )
        })?;
        let expected = after_index.get(&snapshot.name.index).ok_or_else(|| {
            format!(
                "{} is at index {} but segment {} is not stored",
                snapshot.key, snapshot.name.index, snapshot.name.index
            )
        })?;
        if chain != *expected {
            return Err(format!(
                "{} carries chain value {chain}, the value at its index is {expected}",
                snapshot.key
            ));
        }
        totals.chain_links += 1;
    }
    Ok(())
}
