//! Step 2, **download**: objects gunzipped into local files as their bytes arrive, with
//! bounded parallelism.
//!
//! The snapshot goes straight into `OUT.tmp`; segments go to unlinked spool files beside it
//! ([`crate::spool`]), [`BATCH`] at a time, so neither memory nor `/tmp` grows with the
//! replica. The gzip CRC is checked at the end of each object. A failure to write locally
//! (a full disk) is told apart from bad data: the first is an I/O error, the second
//! `Corrupt`, naming the object.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use flate2::write::GzDecoder;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::layout::StoredObject;
use crate::spool;
use crate::storage::Storage;

/// Segments downloaded ahead of the one being applied; bounds open files and disk use.
pub(super) const BATCH: usize = 32;

/// Download and gunzip `object` into `out` (a fresh, empty file), checking the gzip CRC.
/// Returns the gzip header's comment, if it has one.
pub(super) fn download_into(
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
pub(super) fn download_batch(
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
