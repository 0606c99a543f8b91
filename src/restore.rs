//! Restore: plan from one listing, download, verify, apply, check, rename.
//!
//! 1. **Plan** from a single (paginated) LIST of `<name>/`: the snapshot to start from (the
//!    newest one, or for a point in time the newest taken at or before it) and the segments
//!    of its generation after it (all of them, or those committed at or before the time).
//!    Their indexes must be contiguous: a missing segment is an error, never a silent
//!    shorter restore.
//! 2. **Download** with bounded parallelism, gunzipping as the bytes arrive (the gzip CRC is
//!    checked at the end of each object). The snapshot goes straight into `OUT.tmp`;
//!    segments go to unlinked spool files beside it, a bounded batch at a time.
//! 3. **Verify** each segment as a WAL: valid header with the snapshot's page size, every
//!    frame's salts and checksum chain, no trailing bytes, and a commit frame at the end.
//! 4. **Apply** each frame's page at its offset in `OUT.tmp`; a commit frame's database size
//!    truncates or extends the file, as a checkpoint would.
//! 5. **Check** with `fsync` and `PRAGMA integrity_check`, remove stale `OUT-wal`/`OUT-shm`,
//!    then rename `OUT.tmp` to `OUT`. On any failure `OUT.tmp` is removed and `OUT` untouched.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use flate2::write::GzDecoder;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::layout::{self, Catalog, Generation, StoredObject};
use crate::spool;
use crate::storage::Storage;
use crate::utc::UtcTime;
use crate::wal::WalReader;

/// Segments downloaded ahead of the one being applied; bounds open files and disk use.
const BATCH: usize = 32;

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Restore the state as of this time instead of the latest.
    pub point_in_time: Option<UtcTime>,
    /// Replace an existing output file.
    pub force: bool,
    /// Downloads in flight at once.
    pub parallelism: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            point_in_time: None,
            force: false,
            parallelism: 4,
        }
    }
}

/// Which objects a restore uses.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub name: String,
    pub generation: Generation,
    pub snapshot: StoredObject,
    pub segments: Vec<StoredObject>,
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
    let in_time = |o: &StoredObject| point_in_time.is_none_or(|t| o.name.time <= t);
    // Newest generation first; within it, the newest usable snapshot.
    let chosen = generations
        .iter()
        .flat_map(|(generation, objects)| objects.snapshots.iter().map(move |s| (generation, s)))
        .filter(|(_, s)| in_time(s))
        .max_by(|(ga, a), (gb, b)| match point_in_time {
            Some(_) => (a.name.time, ga, a.name.index).cmp(&(b.name.time, gb, b.name.index)),
            None => (ga, a.name.index).cmp(&(gb, b.name.index)),
        });
    let Some((generation, snapshot)) = chosen else {
        let earliest = generations
            .values()
            .flat_map(|o| &o.snapshots)
            .map(|s| s.name.time)
            .min();
        return Err(match (point_in_time, earliest) {
            (Some(t), Some(first)) => Error::not_found(format!(
                "no backup of {name:?} at or before {t}: the earliest snapshot is from {first}"
            )),
            _ => Error::not_found(format!(
                "replica {name:?} in {} has no snapshot to restore from",
                storage.describe()
            )),
        });
    };
    // Two segments with one index: walsync stored the segment, was killed before it noted
    // that, and on restart cut that index again from the same place in the WAL. The later
    // cut holds every frame of the earlier one (the WAL only grows until a checkpoint
    // restart, which starts a new generation), and the next index continues from it. So keep
    // the newest one in time; refusing would make the whole generation unrestorable.
    let mut candidates: Vec<&StoredObject> = Vec::new();
    for segment in &generations[generation].segments {
        match candidates.last_mut() {
            // Same index: listed oldest first, so a later one in time replaces it.
            Some(last) if last.name.index == segment.name.index => {
                if in_time(segment) {
                    *last = segment;
                }
            }
            _ => candidates.push(segment),
        }
    }
    let mut segments: Vec<StoredObject> = Vec::new();
    let after_snapshot = candidates
        .iter()
        .filter(|s| s.name.index > snapshot.name.index);
    for (expected, segment) in (snapshot.name.index + 1..).zip(after_snapshot) {
        if !in_time(segment) {
            break;
        }
        if segment.name.index != expected {
            return Err(Error::corrupt(format!(
                "segment {expected} of generation {generation} of {name:?} is missing \
                 (found {} next); refusing to restore past a gap",
                segment.key
            )));
        }
        segments.push((*segment).clone());
    }
    Ok(RestorePlan {
        name: name.to_string(),
        generation: generation.clone(),
        snapshot: snapshot.clone(),
        segments,
    })
}

/// Restore `name` from `storage` into `output`. Returns the plan that was applied.
pub fn restore(
    storage: &dyn Storage,
    name: &str,
    output: &Path,
    options: &RestoreOptions,
) -> Result<RestorePlan> {
    if !options.force && output.exists() {
        return Err(Error::invalid(format!(
            "{} already exists; choose another output or pass --force to replace it",
            output.display()
        )));
    }
    let plan = plan(storage, name, options.point_in_time)?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = TempOutput::create(output)?;
    download_into(storage, &plan.snapshot, tmp.file())?;
    let page_size = read_page_size(tmp.file()).context(|| plan.snapshot.key.clone())?;
    for batch in plan.segments.chunks(BATCH) {
        let files = download_batch(storage, batch, &dir, options.parallelism)?;
        for (segment, file) in batch.iter().zip(files) {
            apply_segment(&file, tmp.file(), page_size).context(|| segment.key.clone())?;
        }
    }
    tmp.file()
        .sync_all()
        .context(|| format!("syncing {}", tmp.path.display()))?;
    check_integrity(&tmp.path)?;
    tmp.commit(output)?;
    Ok(plan)
}

/// `OUT.tmp`, removed (with any `-wal`/`-shm` beside it) unless committed.
struct TempOutput {
    path: PathBuf,
    file: File,
}

impl TempOutput {
    fn create(output: &Path) -> Result<TempOutput> {
        let mut path = output.as_os_str().to_owned();
        path.push(".tmp");
        let path = PathBuf::from(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .context(|| format!("cannot write restore output {}", path.display()))?;
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

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
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
fn download_into(storage: &dyn Storage, object: &StoredObject, out: &File) -> Result<()> {
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
        .context(|| format!("writing downloaded {}", object.key))
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

/// Verify `segment` as a standalone WAL and write its pages into `db`.
fn apply_segment(segment: &File, db: &File, page_size: u32) -> Result<()> {
    let len = segment.metadata()?.len();
    let mut reader = WalReader::open(segment)?
        .ok_or_else(|| Error::corrupt("segment has no valid WAL header"))?;
    if reader.header().page_size != page_size {
        return Err(Error::corrupt(format!(
            "segment page size {} differs from the snapshot's {page_size}",
            reader.header().page_size
        )));
    }
    // Verify the whole segment before touching the output.
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
    let mut reader = WalReader::open(segment)?
        .ok_or_else(|| Error::corrupt("segment has no valid WAL header"))?;
    let page_size = u64::from(page_size);
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
