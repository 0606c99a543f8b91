//! Step 3, **verify**: nothing is applied that is not a whole, valid piece of this history.
//!
//! The snapshot must be a SQLite database (its page size is the one every segment must
//! have), and if its gzip header carries a chain value ([`ChainValue`]) a base snapshot's
//! must be its generation's. Each segment must be a standalone WAL by the rules of
//! [`crate::wal`]: a valid header, every frame's salts and checksum chain, no trailing
//! bytes, and a commit frame at the end. Whether a verified segment continues the chain,
//! and which cut of an index to use, is decided as the segments are applied (`apply.rs`),
//! by the rules of `docs/FORMAT.md` ("The chain", "Duplicate cuts").

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::RestorePlan;
use crate::error::{Error, Result};
use crate::layout::ChainValue;
use crate::wal::WalReader;

/// The chain value the snapshot's gzip header comment carries; None if it has no comment
/// (an unchained generation). A base snapshot's value must be its generation's.
pub(super) fn snapshot_chain(
    plan: &RestorePlan,
    comment: Option<&[u8]>,
) -> Result<Option<ChainValue>> {
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

/// The page size from a database file's header (offset 16, big-endian; 1 means 65536).
pub(super) fn read_page_size(db: &File) -> Result<u32> {
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
pub(super) fn verify_segment(segment: &File, page_size: u32) -> Result<(ChainValue, ChainValue)> {
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
