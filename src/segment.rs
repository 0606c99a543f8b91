//! Cutting committed WAL frames into a segment: a standalone, gzipped WAL file.
//!
//! A segment holds the frames between two commit boundaries of the live WAL, rewritten under
//! a fresh WAL header with the checksum chain recomputed (see [`crate::wal::WalWriter`]), so
//! that `gunzip` gives a file SQLite itself accepts as a WAL for the database as of the
//! segment before it. It is written straight into a file in the sidecar; at most one
//! transaction of up to 1 MiB of frames is held in memory meanwhile, so a transaction of
//! hundreds of MiB costs disk, not RAM.

use std::fs::File;
use std::io::Write;

use crate::error::{Error, Result};
use crate::spool;
use crate::wal::{WalHeader, WalPosition, WalReader, WalWriter, FRAME_HEADER_SIZE};

/// A segment cut into a file.
pub struct Segment {
    /// Frames in the segment.
    pub frames: u64,
    /// Size of the database in pages after the segment's last commit.
    pub commit_size: u32,
    /// Where in the live WAL the segment ends (just after its last commit frame).
    pub end: WalPosition,
    /// The chain value after this segment: its last frame's checksum, which the next
    /// segment's header salts must equal.
    pub chain: [u32; 2],
}

/// Frames of one transaction held in memory while it is not known yet whether it commits.
/// A transaction larger than this is read a second time instead (see [`cut`]), so memory
/// does not grow with transaction size.
const PENDING_LIMIT: usize = 1024 * 1024;

/// Copy every committed frame of `reader` from its position up to its last commit frame
/// into `out` as a gzipped standalone WAL whose header salts are `chain`, the chain value
/// of the object before it. `Ok(None)` when no commit frame follows (then `out` holds
/// nothing useful and the reader is at the end of the valid frames).
///
/// # The chain
///
/// Each segment names the exact state it applies to: its salts are the previous segment's
/// last frame checksum (for the first segment of a generation, the generation's
/// [`ChainValue::of_generation`](crate::layout::ChainValue::of_generation); a snapshot records the chain value
/// it was taken at in its gzip header, see `snapshot.rs`). Since the checksum chain of a WAL
/// starts from a header checksum that covers the salts, every segment's last checksum
/// vouches for every segment before it, and a restore can prove that the segments it applies
/// form one unbroken history rather than pieces of two. SQLite ignores salt values when it
/// replays a WAL, so `gunzip` + `sqlite3` still restore by hand.
///
/// # One read per frame
///
/// Frames are validated (salts, checksum chain) as they are read, each straight into a
/// buffer holding the transaction it belongs to, and a transaction's frames are compressed
/// from there once its commit frame has been read; frames after the last commit (a
/// transaction still being written) are never written. A transaction larger than
/// [`PENDING_LIMIT`] is not held: the rest of the WAL is scanned for a commit, then that
/// transaction is read again from its start and validated again as it is copied, and if
/// the WAL no longer holds the same valid frames (it was restarted under us) this fails
/// rather than ship garbage.
pub fn cut(reader: &mut WalReader, chain: [u32; 2], out: &File) -> Result<Option<Segment>> {
    let header = *reader.header();
    let gz = spool::gzip_into(out, None);
    let fresh = WalHeader::new(header.big_endian, header.page_size, 0, chain);
    let mut writer = WalWriter::new(gz, fresh)?;
    let frame_len = reader.frame_len();
    // Where the frames written so far end (after a commit frame), and the database size
    // that commit left.
    let mut committed: Option<(WalPosition, u32)> = None;
    let mut transaction_start = reader.position();
    // The frames of the current transaction are `pending[..used]`. The buffer is zeroed
    // only as it grows, not for every frame read over it.
    let mut pending = Vec::new();
    let mut used = 0;
    loop {
        if pending.len() < used + frame_len {
            pending.resize(used + frame_len, 0);
        }
        let Some(frame) = reader.read_frame_into(&mut pending[used..used + frame_len])? else {
            break;
        };
        used += frame_len;
        if frame.is_commit() {
            write_frames(&mut writer, &pending[..used], frame_len)?;
            used = 0;
            transaction_start = reader.position();
            committed = Some((transaction_start, frame.commit_size));
        } else if used >= PENDING_LIMIT {
            drop(std::mem::take(&mut pending));
            let Some(end) = reader.find_last_commit()? else {
                break;
            };
            reader.seek(transaction_start);
            committed = Some(copy_frames(reader, end, &mut writer, frame_len)?);
            break;
        }
    }
    let Some((end, commit_size)) = committed else {
        return Ok(None);
    };
    let frames = writer.frames();
    let chain = writer.checksum();
    spool::finish_gzip(writer.finish()?, "segment")?;
    Ok(Some(Segment {
        frames,
        commit_size,
        end,
        chain,
    }))
}

/// Write whole frames held in `frames` (as read from the WAL) to `writer`.
fn write_frames<W: Write>(
    writer: &mut WalWriter<W>,
    frames: &[u8],
    frame_len: usize,
) -> Result<()> {
    for frame in frames.chunks_exact(frame_len) {
        let (page_number, commit_size) = frame_numbers(frame);
        writer.write_frame(
            page_number,
            commit_size,
            &frame[FRAME_HEADER_SIZE as usize..],
        )?;
    }
    Ok(())
}

/// Copy frames from the reader's position up to `end` (a commit boundary found a moment
/// ago by the same reader) one at a time. Returns `end` and its commit's database size.
fn copy_frames<W: Write>(
    reader: &mut WalReader,
    end: WalPosition,
    writer: &mut WalWriter<W>,
    frame_len: usize,
) -> Result<(WalPosition, u32)> {
    let mut frame = vec![0; frame_len];
    let mut commit_size = 0;
    while reader.position().offset < end.offset {
        let header = reader.read_frame_into(&mut frame)?.ok_or_else(|| {
            Error::corrupt(format!(
                "WAL frame at offset {} is no longer valid while cutting a segment",
                reader.position().offset
            ))
        })?;
        write_frames(writer, &frame, frame_len)?;
        commit_size = header.commit_size;
    }
    if reader.position() != end || commit_size == 0 {
        return Err(Error::corrupt(
            "segment does not end on the expected commit frame",
        ));
    }
    Ok((end, commit_size))
}

/// Page number and commit size from the start of a frame header.
fn frame_numbers(frame: &[u8]) -> (u32, u32) {
    let word =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    (word(0), word(4))
}
