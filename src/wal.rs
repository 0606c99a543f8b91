//! The SQLite write-ahead log (WAL) file format: reading and validating frames, and writing
//! standalone WAL files that SQLite accepts.
//!
//! This follows SQLite's own `wal.c` (its header comment and `walIndexRecover`, which decides
//! what SQLite considers to be in a WAL after a crash). Whatever SQLite would ignore, this
//! module ignores too, so walsync never ships a frame that SQLite would not have applied.
//!
//! # Layout
//!
//! A WAL file is a 32-byte header followed by zero or more frames. Every field is an unsigned
//! 32-bit **big-endian** integer, whatever byte order the checksums use.
//!
//! WAL header ([`HEADER_SIZE`] = 32 bytes):
//!
//! | offset | field                                                                    |
//! |-------:|--------------------------------------------------------------------------|
//! |      0 | magic: 0x377f0682 = little-endian checksums, 0x377f0683 = big-endian     |
//! |      4 | file format version: 3007000                                             |
//! |      8 | database page size in bytes                                              |
//! |     12 | checkpoint sequence number                                               |
//! |     16 | salt-1                                                                   |
//! |     20 | salt-2                                                                   |
//! |     24 | checksum-1 \ checksum of header bytes 0..24                              |
//! |     28 | checksum-2 /                                                             |
//!
//! Each frame is a frame header ([`FRAME_HEADER_SIZE`] = 24 bytes) followed by one page of data
//! (page-size bytes). Frame `i` (counting from 0) starts at `32 + i * (24 + page_size)`.
//!
//! | offset | field                                                                    |
//! |-------:|--------------------------------------------------------------------------|
//! |      0 | page number (never 0)                                                    |
//! |      4 | commit frames: size of the database in pages after the commit; else 0    |
//! |      8 | salt-1, a copy of the header's                                           |
//! |     12 | salt-2, a copy of the header's                                           |
//! |     16 | checksum-1 \ cumulative checksum up to and including this frame          |
//! |     20 | checksum-2 /                                                             |
//!
//! # Checksum
//!
//! The checksum is a pair of 32-bit words `(s0, s1)` computed over data whose length is a
//! multiple of 8, read as 32-bit words `x[0], x[1], ...` in the byte order the magic names,
//! with wrapping addition:
//!
//! ```text
//! for each pair of words (x[i], x[i+1]):  s0 += x[i] + s1;  s1 += x[i+1] + s0;
//! ```
//!
//! It is cumulative. The header checksum is computed over header bytes 0..24 seeded with
//! `(0, 0)`. Each frame's checksum is computed over its frame header's first 8 bytes (page
//! number and commit size) and then its page data, seeded with the checksum of the frame before
//! it (the header checksum for the first frame). A frame's checksum therefore vouches for every
//! frame before it. The salts are not part of the checksum; they are compared for equality.
//!
//! SQLite writes checksums in the byte order of the machine it runs on (0x377f0682 on x86 and
//! most ARM) but reads either, so a WAL written with big-endian checksums is equally valid.
//!
//! # Traps
//!
//! - **A frame is valid only if** its salts equal the header's, its page number is not 0, and its
//!   checksum equals the one computed from the previous valid frame. Reading stops at the first
//!   invalid frame: nothing after it counts, because the checksum chain is broken there.
//! - **The file size is never the end of the WAL.** When a checkpoint has copied every frame back
//!   into the database and no reader needs the WAL, the next writer *restarts* it: it writes a
//!   new header at offset 0 (checkpoint sequence + 1, salt-1 + 1, a random salt-2) and
//!   overwrites frames from the top, without truncating the file (unless `journal_size_limit`
//!   is set). The old frames past the new end stay in the file and fail the salt check. A crash
//!   mid-write likewise leaves a torn frame at the end, which fails the checksum or is short.
//! - **Only frames up to the last commit frame are committed.** A commit frame has a nonzero
//!   commit size. Frames after the last commit belong to a transaction still being written (or
//!   abandoned by a crash); SQLite ignores them, and a writer may even overwrite them in place
//!   before it commits. Callers must only act on frames up to a commit; see
//!   [`WalReader::find_last_commit`].
//! - **The page-size field holds the size in bytes, 65536 included.** It is the *database*
//!   header's 2-byte field that stores 65536 as 1. SQLite writes 65536 into the WAL header and
//!   ignores a WAL whose field holds 1 (it requires a power of two in 512..=65536), so this module
//!   does the same.
//! - **An invalid header means an empty WAL.** SQLite ignores a WAL whose magic, page size or
//!   header checksum is wrong (e.g. a zeroed header), as if it held no frames. (A header that
//!   verifies but names another format version makes SQLite refuse to open the database;
//!   no SQLite has ever written one, and [`WalReader::open`] treats it as empty like the rest.)
//!
//! # In this module
//!
//! [`WalReader`] walks the valid frames of a WAL file with positional reads; [`WalPosition`] is
//! a resumable place in that walk; [`WalWriter`] writes a fresh, standalone WAL from pages.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use crate::error::{Context, Error, Result};

/// Bytes in the WAL header.
pub const HEADER_SIZE: u64 = 32;
/// Bytes in a frame header; the page data follows it.
pub const FRAME_HEADER_SIZE: u64 = 24;
/// Magic of a WAL whose checksums read the data as little-endian words.
pub const MAGIC_LITTLE_ENDIAN: u32 = 0x377f0682;
/// Magic of a WAL whose checksums read the data as big-endian words.
pub const MAGIC_BIG_ENDIAN: u32 = 0x377f0683;

/// The only WAL format version SQLite has ever written (it refuses any other).
const FORMAT_VERSION: u32 = 3007000;
/// `FRAME_HEADER_SIZE` as a `usize`, for slicing buffers.
const FRAME_HEADER_LEN: usize = FRAME_HEADER_SIZE as usize;

/// The 32-byte header at the start of a WAL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums use big-endian words (magic 0x377f0683).
    pub big_endian: bool,
    /// Page size in bytes: a power of two in 512..=65536.
    pub page_size: u32,
    /// Incremented each time the WAL restarts after a checkpoint.
    pub checkpoint_seq: u32,
    /// Copied into every frame of this generation of the WAL; a frame with other salts is stale.
    pub salt: [u32; 2],
    /// Checksum of the first 24 header bytes; seeds the checksum of the first frame.
    pub checksum: [u32; 2],
}

impl WalHeader {
    /// Parse and validate a WAL header: magic, header checksum, version 3007000 and a page size
    /// that is a power of two in 512..=65536. Anything else is an error of kind `Corrupt`.
    pub fn parse(buf: &[u8; 32]) -> Result<WalHeader> {
        let magic = be_u32(buf, 0);
        let big_endian = match magic {
            MAGIC_LITTLE_ENDIAN => false,
            MAGIC_BIG_ENDIAN => true,
            _ => {
                return Err(Error::corrupt(format!(
                "not a WAL header: magic is {magic:#010x}, expected {MAGIC_LITTLE_ENDIAN:#010x} \
                     or {MAGIC_BIG_ENDIAN:#010x}"
            )))
            }
        };
        let stored = [be_u32(buf, 24), be_u32(buf, 28)];
        let computed = checksum(big_endian, &buf[..24], [0, 0]);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "WAL header checksum mismatch: stored {stored:08x?}, computed {computed:08x?}"
            )));
        }
        let version = be_u32(buf, 4);
        if version != FORMAT_VERSION {
            return Err(Error::corrupt(format!(
                "unsupported WAL format version {version}, expected {FORMAT_VERSION}"
            )));
        }
        let page_size = be_u32(buf, 8);
        if !valid_page_size(page_size) {
            return Err(Error::corrupt(format!(
                "invalid WAL page size {page_size}: must be a power of two from 512 to 65536"
            )));
        }
        Ok(WalHeader {
            big_endian,
            page_size,
            checkpoint_seq: be_u32(buf, 12),
            salt: [be_u32(buf, 16), be_u32(buf, 20)],
            checksum: stored,
        })
    }

    /// A header for a new WAL; computes `checksum`. `page_size` is not checked here;
    /// [`WalWriter::new`] refuses a header SQLite would not accept.
    pub fn new(big_endian: bool, page_size: u32, checkpoint_seq: u32, salt: [u32; 2]) -> WalHeader {
        let mut header = WalHeader {
            big_endian,
            page_size,
            checkpoint_seq,
            salt,
            checksum: [0, 0],
        };
        let bytes = header.to_bytes();
        header.checksum = checksum(big_endian, &bytes[..24], [0, 0]);
        header
    }

    /// The header as stored in a WAL file, with `checksum` as it is (not recomputed).
    pub fn to_bytes(self) -> [u8; 32] {
        let magic = if self.big_endian {
            MAGIC_BIG_ENDIAN
        } else {
            MAGIC_LITTLE_ENDIAN
        };
        let fields = [
            magic,
            FORMAT_VERSION,
            self.page_size,
            self.checkpoint_seq,
            self.salt[0],
            self.salt[1],
            self.checksum[0],
            self.checksum[1],
        ];
        let mut buf = [0u8; 32];
        for (chunk, field) in buf.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&field.to_be_bytes());
        }
        buf
    }

    /// Bytes in one frame: FRAME_HEADER_SIZE + page_size.
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + u64::from(self.page_size)
    }
}

/// The 24-byte header in front of each page in the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The database page this frame holds (1-based, never 0).
    pub page_number: u32,
    /// Size of the database in pages after this commit; 0 when the frame is not a commit frame.
    pub commit_size: u32,
    /// Must equal the WAL header's salts for the frame to be valid.
    pub salt: [u32; 2],
    /// Cumulative checksum of the WAL up to and including this frame.
    pub checksum: [u32; 2],
}

impl FrameHeader {
    /// True for the last frame of a transaction: the transaction is committed once this frame
    /// is in the WAL.
    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }

    /// Decode the first 24 bytes of `frame`.
    fn decode(frame: &[u8]) -> FrameHeader {
        FrameHeader {
            page_number: be_u32(frame, 0),
            commit_size: be_u32(frame, 4),
            salt: [be_u32(frame, 8), be_u32(frame, 12)],
            checksum: [be_u32(frame, 16), be_u32(frame, 20)],
        }
    }
}

/// The cumulative WAL checksum of `data` (length a multiple of 8) seeded with `seed`.
///
/// Words are read little-endian, or big-endian when `big_endian` is set (the magic decides).
/// A trailing remainder shorter than 8 bytes is ignored; every length SQLite checksums (24
/// header bytes, 8 frame-header bytes, a page) is a multiple of 8.
pub fn checksum(big_endian: bool, data: &[u8], seed: [u32; 2]) -> [u32; 2] {
    debug_assert!(
        data.len().is_multiple_of(8),
        "WAL checksum over {} bytes",
        data.len()
    );
    // Two monomorphised copies of one tight loop, so the byte order is not tested per word.
    if big_endian {
        checksum_words(data, seed, u32::from_be_bytes)
    } else {
        checksum_words(data, seed, u32::from_le_bytes)
    }
}

#[inline(always)]
fn checksum_words(data: &[u8], seed: [u32; 2], word: impl Fn([u8; 4]) -> u32) -> [u32; 2] {
    let [mut s0, mut s1] = seed;
    for c in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word([c[0], c[1], c[2], c[3]]).wrapping_add(s1));
        s1 = s1.wrapping_add(word([c[4], c[5], c[6], c[7]]).wrapping_add(s0));
    }
    [s0, s1]
}

/// A place in a WAL: the byte offset of the next frame and the running checksum of everything
/// before it (for offset 32 that is the header checksum). Persisted by callers as JSON, hence
/// serde.
///
/// The checksum is what makes a position resumable: the next frame's checksum is seeded with
/// it, so a reader can continue from here without re-reading the frames before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalPosition {
    pub offset: u64,
    pub checksum: [u32; 2],
}

/// Reads valid frames from a WAL file with positional reads
/// (std::os::unix::fs::FileExt::read_at = pread); never uses the file cursor or the file size
/// as the end of the WAL.
///
/// Positional reads leave the file cursor alone, so the same `File` can be shared with other
/// code. The end of the WAL is wherever the first invalid frame is (see the module docs).
pub struct WalReader<'a> {
    file: &'a File,
    header: WalHeader,
    position: WalPosition,
    /// One whole frame (header + page), reused for every read.
    frame: Vec<u8>,
}

impl<'a> WalReader<'a> {
    /// Read and validate the header. Ok(None) when the file is shorter than a header, or the
    /// header is invalid/zeroed (SQLite treats such a WAL as empty). Err only on I/O errors.
    pub fn open(file: &'a File) -> Result<Option<WalReader<'a>>> {
        let mut buf = [0u8; HEADER_SIZE as usize];
        let n = read_full_at(file, &mut buf, 0).context(|| "reading WAL header")?;
        if n < buf.len() {
            return Ok(None);
        }
        let Ok(header) = WalHeader::parse(&buf) else {
            return Ok(None);
        };
        Ok(Some(WalReader {
            file,
            header,
            position: WalPosition {
                offset: HEADER_SIZE,
                checksum: header.checksum,
            },
            frame: Vec::new(),
        }))
    }

    pub fn header(&self) -> &WalHeader {
        &self.header
    }

    /// Position after the last valid frame read so far (initially offset 32 + header checksum).
    pub fn position(&self) -> WalPosition {
        self.position
    }

    /// Continue from a position previously returned by `position()` of a reader on the same WAL
    /// header.
    ///
    /// The position is not checked here; [`next_frame`](Self::next_frame) refuses one that is
    /// not on a frame boundary. A position from another generation of the WAL (other salts)
    /// simply finds no valid frames, because its checksum no longer chains.
    pub fn seek(&mut self, pos: WalPosition) {
        self.position = pos;
    }

    /// Read the frame at the current position into `page` (resized to page_size) and return its
    /// header. Ok(None) at the end of valid frames: short/torn read, salt mismatch, or checksum
    /// mismatch; the position does not move then. Advances the position only over valid frames.
    ///
    /// A frame with page number 0 also ends the WAL, as in SQLite. Err(Invalid) if the position
    /// is not on a frame boundary (a caller bug, not the end of the WAL).
    pub fn next_frame(&mut self, page: &mut Vec<u8>) -> Result<Option<FrameHeader>> {
        let Some(frame) = self.read_frame()? else {
            return Ok(None);
        };
        page.clear();
        page.extend_from_slice(&self.frame[FRAME_HEADER_LEN..]);
        Ok(Some(frame))
    }

    /// Does this WAL still hold everything up to `pos`, a position taken earlier (perhaps by
    /// another process) from a reader with the same header?
    ///
    /// True when the frame ending at `pos` carries this WAL's salts and the cumulative checksum
    /// recorded in `pos`. SQLite changes the salts whenever it restarts the WAL and never
    /// rewrites a committed frame in place, and the checksum covers every frame before, so
    /// one 24-byte read stands for the whole prefix.
    pub fn still_holds(&self, pos: WalPosition) -> Result<bool> {
        if pos.offset == HEADER_SIZE {
            return Ok(pos.checksum == self.header.checksum);
        }
        let frame_size = self.header.frame_size();
        if pos.offset < HEADER_SIZE + frame_size
            || !(pos.offset - HEADER_SIZE).is_multiple_of(frame_size)
        {
            return Ok(false);
        }
        let mut buf = [0u8; FRAME_HEADER_LEN];
        let at = pos.offset - frame_size;
        let n = read_full_at(self.file, &mut buf, at)
            .context(|| format!("reading WAL frame header at offset {at}"))?;
        if n < buf.len() {
            return Ok(false);
        }
        let frame = FrameHeader::decode(&buf);
        Ok(frame.salt == self.header.salt && frame.checksum == pos.checksum)
    }

    /// Whether a valid frame may follow the current position: the next frame header is
    /// there and carries this WAL's salts and a page number (its checksum is not checked).
    /// False means there is certainly none, for the price of one 24-byte read.
    pub fn may_hold_frame(&self) -> Result<bool> {
        let mut buf = [0u8; FRAME_HEADER_LEN];
        let at = self.position.offset;
        let n = read_full_at(self.file, &mut buf, at)
            .context(|| format!("reading WAL frame header at offset {at}"))?;
        if n < buf.len() {
            return Ok(false);
        }
        let frame = FrameHeader::decode(&buf);
        Ok(frame.salt == self.header.salt && frame.page_number != 0)
    }

    /// Scan forward from the current position over all valid frames, leaving the reader at the
    /// end of them, and return the position just after the last commit frame seen (None if no
    /// commit frame was seen).
    ///
    /// That position is the end of the committed WAL: frames past it are an unfinished
    /// transaction. To read only committed frames, remember where you started, call this, then
    /// `seek` back and read frames until the returned offset.
    pub fn find_last_commit(&mut self) -> Result<Option<WalPosition>> {
        let mut last_commit = None;
        while let Some(frame) = self.read_frame()? {
            if frame.is_commit() {
                last_commit = Some(self.position);
            }
        }
        Ok(last_commit)
    }

    /// Read and validate the frame at the current position into `self.frame`, advancing past it
    /// if it is valid. The page data stays in `self.frame[24..]`.
    fn read_frame(&mut self) -> Result<Option<FrameHeader>> {
        let mut frame = std::mem::take(&mut self.frame);
        // Sized once: zeroing a buffer that is read over at once costs a few % of a cut.
        frame.resize(self.frame_len(), 0);
        let result = self.read_frame_into(&mut frame);
        self.frame = frame;
        result
    }

    /// Bytes in one frame: the frame header and a page.
    pub fn frame_len(&self) -> usize {
        // A page size of at most 65536 makes the frame size fit in usize.
        FRAME_HEADER_LEN + self.header.page_size as usize
    }

    /// Read the frame at the current position into `frame` (exactly
    /// [`frame_len`](Self::frame_len) bytes: frame header, then the page) and validate it
    /// there, advancing past it if it is valid, like [`next_frame`](Self::next_frame) but
    /// without copying the page out of a buffer of the reader's own: a caller that keeps
    /// several frames reads each straight into place. On `Ok(None)` or an error the
    /// content of `frame` is unspecified.
    pub fn read_frame_into(&mut self, frame: &mut [u8]) -> Result<Option<FrameHeader>> {
        let offset = self.position.offset;
        let frame_size = self.header.frame_size();
        if offset < HEADER_SIZE || !(offset - HEADER_SIZE).is_multiple_of(frame_size) {
            return Err(Error::invalid(format!(
                "WAL position {offset} is not on a frame boundary (frames of {frame_size} bytes \
                 start at {HEADER_SIZE})"
            )));
        }
        if frame.len() != self.frame_len() {
            return Err(Error::invalid(format!(
                "a buffer of {} bytes for a WAL frame of {}",
                frame.len(),
                self.frame_len()
            )));
        }
        let n = read_full_at(self.file, frame, offset)
            .context(|| format!("reading WAL frame at offset {offset}"))?;
        if n < frame.len() {
            // Short read: the file ends inside this frame (torn write) or right before it.
            return Ok(None);
        }
        let Some((header, sum)) = self.validate(frame) else {
            return Ok(None);
        };
        self.position = WalPosition {
            offset: offset + frame_size,
            checksum: sum,
        };
        Ok(Some(header))
    }

    /// Read again, into `frame`, the frame at `offset` that this reader validated earlier
    /// (one that lies before its position). Only the salts are checked: the checksum chain
    /// runs through every frame, so it cannot be checked again for frames read out of order.
    /// That is enough to tell the same frames from a WAL restarted since (whose frames carry
    /// new salts); frames before the last commit are never rewritten in place, and the pin
    /// keeps the WAL from restarting meanwhile anyway.
    pub fn reread_frame(&self, offset: u64, frame: &mut [u8]) -> Result<FrameHeader> {
        let frame_size = self.header.frame_size();
        let gone = || {
            Error::corrupt(format!(
                "WAL frame at offset {offset} is no longer the one read a moment ago"
            ))
        };
        if offset < HEADER_SIZE
            || !(offset - HEADER_SIZE).is_multiple_of(frame_size)
            || offset + frame_size > self.position.offset
            || frame.len() != self.frame_len()
        {
            return Err(Error::invalid(format!(
                "cannot read again a WAL frame at offset {offset} into {} bytes (read up to {})",
                frame.len(),
                self.position.offset
            )));
        }
        let n = read_full_at(self.file, frame, offset)
            .context(|| format!("reading WAL frame at offset {offset}"))?;
        if n < frame.len() {
            return Err(gone());
        }
        let header = FrameHeader::decode(frame);
        if header.salt != self.header.salt || header.page_number == 0 {
            return Err(gone());
        }
        Ok(header)
    }

    /// The header and cumulative checksum of `frame` (a whole frame read at the current
    /// position), if it is valid there.
    fn validate(&self, frame: &[u8]) -> Option<(FrameHeader, [u32; 2])> {
        let header = FrameHeader::decode(frame);
        if header.salt != self.header.salt || header.page_number == 0 {
            return None;
        }
        let big_endian = self.header.big_endian;
        let sum = checksum(big_endian, &frame[..8], self.position.checksum);
        let sum = checksum(big_endian, &frame[FRAME_HEADER_LEN..], sum);
        (sum == header.checksum).then_some((header, sum))
    }
}

/// Writes a standalone WAL file: a fresh header, then frames whose salts and checksum chain are
/// recomputed from that header, so SQLite itself (or walsync's restore) accepts the output as a
/// valid WAL.
///
/// Each frame is two `write_all` calls (header, page); give it a `BufWriter` when writing to a
/// file.
pub struct WalWriter<W: Write> {
    out: W,
    header: WalHeader,
    /// Checksum of everything written so far; seeds the next frame's checksum.
    checksum: [u32; 2],
    frames: u64,
}

impl<W: Write> WalWriter<W> {
    /// Writes the header immediately.
    ///
    /// The header's checksum is recomputed, so any `WalHeader` with a valid page size works.
    /// Err(Invalid) if the page size is not a power of two in 512..=65536, since SQLite would
    /// ignore the whole WAL.
    pub fn new(mut out: W, header: WalHeader) -> Result<WalWriter<W>> {
        if !valid_page_size(header.page_size) {
            return Err(Error::invalid(format!(
                "cannot write a WAL with page size {}: must be a power of two from 512 to 65536",
                header.page_size
            )));
        }
        let header = WalHeader::new(
            header.big_endian,
            header.page_size,
            header.checkpoint_seq,
            header.salt,
        );
        out.write_all(&header.to_bytes())
            .context(|| "writing WAL header")?;
        Ok(WalWriter {
            out,
            header,
            checksum: header.checksum,
            frames: 0,
        })
    }

    /// Append one frame. `page.len()` must equal the page size (Err Invalid otherwise).
    ///
    /// `commit_size` is the database size in pages after the transaction for its last frame,
    /// and 0 for the others. Page number 0 is refused (Err Invalid): SQLite would end the WAL
    /// there.
    pub fn write_frame(&mut self, page_number: u32, commit_size: u32, page: &[u8]) -> Result<()> {
        if page.len() != self.header.page_size as usize {
            return Err(Error::invalid(format!(
                "WAL frame page is {} bytes, expected the page size {}",
                page.len(),
                self.header.page_size
            )));
        }
        if page_number == 0 {
            return Err(Error::invalid("WAL frame page number must not be 0"));
        }
        let mut frame_header = [0u8; FRAME_HEADER_LEN];
        let fields = [
            page_number,
            commit_size,
            self.header.salt[0],
            self.header.salt[1],
        ];
        for (chunk, field) in frame_header.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&field.to_be_bytes());
        }
        let big_endian = self.header.big_endian;
        let sum = checksum(big_endian, &frame_header[..8], self.checksum);
        let sum = checksum(big_endian, page, sum);
        frame_header[16..20].copy_from_slice(&sum[0].to_be_bytes());
        frame_header[20..24].copy_from_slice(&sum[1].to_be_bytes());

        let frame_index = self.frames;
        self.out
            .write_all(&frame_header)
            .and_then(|()| self.out.write_all(page))
            .context(|| format!("writing WAL frame {frame_index}"))?;
        self.checksum = sum;
        self.frames += 1;
        Ok(())
    }

    /// Number of frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The cumulative checksum of everything written so far (the last frame's, or the
    /// header's before any frame).
    pub fn checksum(&self) -> [u32; 2] {
        self.checksum
    }

    /// Flush and return the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.out.flush().context(|| "flushing WAL")?;
        Ok(self.out)
    }
}

/// SQLite's rule for the WAL header's page size (see `walIndexRecover`).
fn valid_page_size(page_size: u32) -> bool {
    (512..=65536).contains(&page_size) && page_size.is_power_of_two()
}

/// The big-endian u32 at `at` in `buf`. Callers pass fixed offsets inside buffers known to be
/// long enough (a 32-byte header, a frame of at least 24 bytes).
fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Read into `buf` at `offset` until it is full or the file ends; returns the bytes read, fewer
/// than `buf.len()` only at end of file. (`read_exact_at` cannot tell a short file from an
/// error after the fact, and a short file is the normal end of a WAL.)
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use rusqlite::Connection;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// Page size of the test databases, and the resulting frame size.
    const PAGE: u64 = 4096;
    const FRAME: u64 = FRAME_HEADER_SIZE + PAGE;
    /// Pages in the test database: page 1 (schema), table `a` (page 2), table `b` (page 3).
    const DB_PAGES: u32 = 3;

    /// Offset of frame `i` (0-based) in a WAL of 4096-byte pages.
    fn frame_offset(i: u64) -> u64 {
        HEADER_SIZE + i * FRAME
    }

    /// A WAL-mode database with tables `a` (root page 2) and `b` (root page 3), checkpointed
    /// and with an empty WAL, so each test knows exactly which frames its transactions write:
    /// a small insert into one table is one commit frame of that table's page, and a
    /// transaction inserting into both is a frame of page 2 then a commit frame of page 3.
    struct TestDb {
        dir: tempfile::TempDir,
        conn: Connection,
    }

    impl TestDb {
        fn new() -> TestDb {
            let dir = tempfile::tempdir().unwrap();
            let conn = Connection::open(dir.path().join("test.db")).unwrap();
            conn.execute_batch("PRAGMA page_size=4096").unwrap();
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            conn.execute_batch(
                "PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE a(id INTEGER PRIMARY KEY, v TEXT);
                 CREATE TABLE b(id INTEGER PRIMARY KEY, v TEXT);",
            )
            .unwrap();
            let db = TestDb { dir, conn };
            assert_eq!(db.checkpoint("TRUNCATE"), (0, 0, 0));
            assert_eq!(fs::metadata(db.wal_path()).unwrap().len(), 0);
            db
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn wal_path(&self) -> PathBuf {
            self.path("test.db-wal")
        }

        /// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames checkpointed).
        fn checkpoint(&self, mode: &str) -> (i64, i64, i64) {
            self.conn
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap()
        }

        /// One transaction, one frame: the table's root page, as a commit frame.
        fn insert(&self, table: &str, v: &str) {
            self.conn
                .execute(&format!("INSERT INTO {table}(v) VALUES (?1)"), [v])
                .unwrap();
        }

        /// One transaction, two frames: page 2 (not a commit), then page 3 (commit).
        fn insert_both(&self, v: &str) {
            let tx = self.conn.unchecked_transaction().unwrap();
            tx.execute("INSERT INTO a(v) VALUES (?1)", [v]).unwrap();
            tx.execute("INSERT INTO b(v) VALUES (?1)", [v]).unwrap();
            tx.commit().unwrap();
        }

        /// Copy the live WAL (the connection stays open, so SQLite has not deleted it).
        fn copy_wal(&self, name: &str) -> PathBuf {
            let to = self.path(name);
            fs::copy(self.wal_path(), &to).unwrap();
            to
        }

        /// Copy the database file as it is now.
        fn copy_db(&self, name: &str) -> PathBuf {
            let to = self.path(name);
            fs::copy(self.path("test.db"), &to).unwrap();
            to
        }
    }

    type Frames = Vec<(FrameHeader, Vec<u8>)>;

    /// Every valid frame of the WAL at `path`, and the reader's position after them.
    fn read_all(path: &Path) -> (WalHeader, Frames, WalPosition) {
        let file = File::open(path).unwrap();
        let mut reader = WalReader::open(&file).unwrap().expect("valid WAL header");
        let mut frames = Vec::new();
        let mut page = Vec::new();
        while let Some(frame) = reader.next_frame(&mut page).unwrap() {
            assert_eq!(page.len(), PAGE as usize);
            frames.push((frame, page.clone()));
        }
        (*reader.header(), frames, reader.position())
    }

    fn last_commit(path: &Path) -> Option<WalPosition> {
        let file = File::open(path).unwrap();
        let mut reader = WalReader::open(&file).unwrap().unwrap();
        reader.find_last_commit().unwrap()
    }

    /// (page number, commit size) of each frame.
    fn shape(frames: &Frames) -> Vec<(u32, u32)> {
        frames
            .iter()
            .map(|(h, _)| (h.page_number, h.commit_size))
            .collect()
    }

    /// Modify the file at `path` in place.
    fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = fs::read(path).unwrap();
        f(&mut bytes);
        fs::write(path, bytes).unwrap();
    }

    fn be_word(bytes: &[u8], at: u64) -> u32 {
        let at = at as usize;
        u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    /// Open `base` as a database with `wal` as its WAL, in a fresh directory, as SQLite would
    /// after a crash: no -shm, so SQLite recovers the WAL by validating its frames itself.
    fn open_with_wal(base: &Path, wal: &[u8]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(base, dir.path().join("x.db")).unwrap();
        fs::write(dir.path().join("x.db-wal"), wal).unwrap();
        let conn = Connection::open(dir.path().join("x.db")).unwrap();
        (dir, conn)
    }

    fn rows(conn: &Connection, table: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("SELECT v FROM {table} ORDER BY id"))
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    fn integrity_check(conn: &Connection) -> String {
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    /// Set a header's checksum bytes to match its first 24 bytes (little-endian words).
    fn reseal_header(bytes: &mut [u8]) {
        let sum = checksum(false, &bytes[..24], [0, 0]);
        bytes[24..28].copy_from_slice(&sum[0].to_be_bytes());
        bytes[28..32].copy_from_slice(&sum[1].to_be_bytes());
    }

    /// Writes: txn 1 = frame 0 (page 2, commit); txn 2 = frames 1 (page 2) and 2 (page 3,
    /// commit); txn 3 = frame 3 (page 2, commit).
    fn three_transactions(db: &TestDb) {
        db.insert("a", "one");
        db.insert_both("two");
        db.insert("a", "three");
    }
    const THREE_TXN_SHAPE: [(u32, u32); 4] = [(2, DB_PAGES), (2, 0), (3, DB_PAGES), (2, DB_PAGES)];

    #[test]
    fn checksum_known_values() {
        let data = [0, 0, 0, 1, 0, 0, 0, 2];
        // Big-endian words 1 and 2: s0 = 0 + 1 + 0 = 1, s1 = 0 + 2 + 1 = 3.
        assert_eq!(checksum(true, &data, [0, 0]), [1, 3]);
        // The same bytes as little-endian words are 0x01000000 and 0x02000000.
        assert_eq!(checksum(false, &data, [0, 0]), [0x0100_0000, 0x0300_0000]);
        // Seeded: s0 = 10 + 1 + 20 = 31, s1 = 20 + 2 + 31 = 53.
        assert_eq!(checksum(true, &data, [10, 20]), [31, 53]);
        // Wrapping: s0 = 2 + 0xffffffff + 0 = 1, s1 = 0 + 0 + 1 = 1.
        assert_eq!(
            checksum(true, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], [2, 0]),
            [1, 1]
        );
        // Cumulative: summing in two parts equals summing the whole.
        let whole: Vec<u8> = (0..64u8).collect();
        for big_endian in [false, true] {
            let first = checksum(big_endian, &whole[..24], [7, 9]);
            assert_eq!(
                checksum(big_endian, &whole[24..], first),
                checksum(big_endian, &whole, [7, 9])
            );
        }
    }

    #[test]
    fn parses_header_of_real_wal() {
        let db = TestDb::new();
        db.insert("a", "one");
        let wal = db.copy_wal("copy.wal");
        let bytes = fs::read(&wal).unwrap();
        assert_eq!(bytes.len() as u64, frame_offset(1));

        let header = WalHeader::parse(bytes[..32].try_into().unwrap()).unwrap();
        // SQLite checksums in native byte order.
        assert_eq!(header.big_endian, cfg!(target_endian = "big"));
        let magic = if cfg!(target_endian = "big") {
            0x377f0683
        } else {
            0x377f0682
        };
        assert_eq!(be_word(&bytes, 0), magic);
        assert_eq!(header.page_size, 4096);
        assert_eq!(header.frame_size(), 4120);
        // The TRUNCATE checkpoint in TestDb::new restarted the WAL once.
        assert_eq!(header.checkpoint_seq, 1);
        assert_eq!(header.salt, [be_word(&bytes, 16), be_word(&bytes, 20)]);
        assert_eq!(header.checksum, [be_word(&bytes, 24), be_word(&bytes, 28)]);
        assert_eq!(header.to_bytes()[..], bytes[..32]);
        // new() computes the same checksum SQLite stored.
        assert_eq!(
            WalHeader::new(header.big_endian, 4096, 1, header.salt),
            header
        );

        let file = File::open(&wal).unwrap();
        let reader = WalReader::open(&file).unwrap().unwrap();
        assert_eq!(*reader.header(), header);
        assert_eq!(
            reader.position(),
            WalPosition {
                offset: 32,
                checksum: header.checksum
            }
        );
    }

    #[test]
    fn rejects_bad_headers() {
        let db = TestDb::new();
        db.insert("a", "one");
        let good: [u8; 32] = fs::read(db.wal_path()).unwrap()[..32].try_into().unwrap();
        assert!(WalHeader::parse(&good).is_ok());

        /// What the error message should say, and how to damage the header.
        type Case = (&'static str, fn(&mut [u8; 32]));
        let cases: [Case; 7] = [
            ("magic", |b| b[3] = 0x84),
            ("checksum mismatch", |b| b[17] ^= 1),
            ("checksum mismatch", |b| b[30] ^= 1),
            ("version 3007001", |b| {
                b[4..8].copy_from_slice(&3007001u32.to_be_bytes());
                reseal_header(b);
            }),
            // 65536 is stored as 65536 in a WAL; 1 is only the database header's encoding.
            ("page size 1:", |b| {
                b[8..12].copy_from_slice(&1u32.to_be_bytes());
                reseal_header(b);
            }),
            ("page size 1000:", |b| {
                b[8..12].copy_from_slice(&1000u32.to_be_bytes());
                reseal_header(b);
            }),
            ("page size 131072:", |b| {
                b[8..12].copy_from_slice(&131072u32.to_be_bytes());
                reseal_header(b);
            }),
        ];
        for (expected, corrupt) in cases {
            let mut bytes = good;
            corrupt(&mut bytes);
            let err = WalHeader::parse(&bytes).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{expected}");
            assert!(err.to_string().contains(expected), "{expected}: {err}");

            // A reader treats the same file as an empty WAL.
            let path = db.path("bad.wal");
            let mut file_bytes = fs::read(db.wal_path()).unwrap();
            file_bytes[..32].copy_from_slice(&bytes);
            fs::write(&path, file_bytes).unwrap();
            let file = File::open(&path).unwrap();
            assert!(WalReader::open(&file).unwrap().is_none(), "{expected}");
        }
    }

    #[test]
    fn open_returns_none_for_empty_short_or_zeroed_file() {
        let db = TestDb::new();
        db.insert("a", "one");
        let real = fs::read(db.wal_path()).unwrap();
        let path = db.path("w");
        for contents in [Vec::new(), real[..31].to_vec(), vec![0u8; 32 + 4120]] {
            fs::write(&path, &contents).unwrap();
            let file = File::open(&path).unwrap();
            assert!(
                WalReader::open(&file).unwrap().is_none(),
                "{} bytes",
                contents.len()
            );
        }

        // A header and no frames is a valid, empty WAL.
        fs::write(&path, &real[..32]).unwrap();
        let file = File::open(&path).unwrap();
        let mut reader = WalReader::open(&file).unwrap().unwrap();
        assert_eq!(reader.next_frame(&mut Vec::new()).unwrap(), None);
        assert_eq!(reader.find_last_commit().unwrap(), None);
        assert_eq!(reader.position().offset, 32);
    }

    #[test]
    fn counts_frames_and_commits_of_real_wal() {
        let db = TestDb::new();
        three_transactions(&db);
        let wal = db.copy_wal("copy.wal");
        let bytes = fs::read(&wal).unwrap();

        let (header, frames, end) = read_all(&wal);
        assert_eq!(shape(&frames), THREE_TXN_SHAPE);
        for (frame, _) in &frames {
            assert_eq!(frame.salt, header.salt);
        }
        assert_eq!(
            frames
                .iter()
                .map(|(h, _)| h.is_commit())
                .collect::<Vec<_>>(),
            [true, false, true, true]
        );
        // Page data is the table's b-tree leaf (type 0x0d) holding the row just written.
        let (_, last_page) = &frames[3];
        assert_eq!(last_page[0], 0x0d);
        assert!(last_page.windows(5).any(|w| w == b"three"));
        assert_eq!(last_page[..], bytes[frame_offset(3) as usize + 24..]);

        // The position after the last frame carries that frame's stored checksum.
        assert_eq!(end.offset, frame_offset(4));
        assert_eq!(end.offset, bytes.len() as u64);
        assert_eq!(
            end.checksum,
            [
                be_word(&bytes, frame_offset(3) + 16),
                be_word(&bytes, frame_offset(3) + 20)
            ]
        );
        assert_eq!(frames[3].0.checksum, end.checksum);

        // The last commit is the end of the 3rd transaction, and SQLite agrees: it counts
        // 4 frames in its WAL.
        assert_eq!(last_commit(&wal), Some(end));
        assert_eq!(db.checkpoint("PASSIVE"), (0, 4, 4));
    }

    #[test]
    fn stops_before_torn_last_frame() {
        let db = TestDb::new();
        three_transactions(&db);
        let full = fs::read(db.wal_path()).unwrap();
        let (_, all_frames, _) = read_all(&db.wal_path());

        // Cut inside the page of the last frame, and inside its frame header.
        for cut in [frame_offset(3) + 1000, frame_offset(3) + 10] {
            let wal = db.path("torn.wal");
            fs::write(&wal, &full[..cut as usize]).unwrap();

            let (_, frames, end) = read_all(&wal);
            assert_eq!(shape(&frames), THREE_TXN_SHAPE[..3]);
            assert_eq!(frames, all_frames[..3]);
            assert_eq!(end.offset, frame_offset(3));

            // The last commit is now the end of the 2nd transaction.
            let commit = last_commit(&wal).unwrap();
            assert_eq!(commit, end);
            assert_eq!(commit.checksum, all_frames[2].0.checksum);
        }
    }

    #[test]
    fn stops_at_bad_checksum() {
        let db = TestDb::new();
        three_transactions(&db);

        // A flipped byte in the page data of frame 1 (the first frame of the 2nd transaction).
        let wal = db.copy_wal("bad-page.wal");
        patch(&wal, |b| b[frame_offset(1) as usize + 24 + 2000] ^= 0x40);
        let file = File::open(&wal).unwrap();
        let mut reader = WalReader::open(&file).unwrap().unwrap();
        let mut page = Vec::new();
        assert_eq!(
            reader.next_frame(&mut page).unwrap().map(|h| h.page_number),
            Some(2)
        );
        let after_first = reader.position();
        assert_eq!(after_first.offset, frame_offset(1));
        // Frame 1 is invalid: no frame, and the position does not move, however often asked.
        assert_eq!(reader.next_frame(&mut page).unwrap(), None);
        assert_eq!(reader.next_frame(&mut page).unwrap(), None);
        assert_eq!(reader.position(), after_first);
        assert_eq!(reader.find_last_commit().unwrap(), None);
        assert_eq!(reader.position(), after_first);
        // Frames 2 and 3 are intact on their own, but unreachable: the chain is broken.
        assert_eq!(last_commit(&wal), Some(after_first));

        // The commit-size field is covered by the checksum too: make frame 2 claim not to be
        // a commit frame.
        let wal = db.copy_wal("bad-commit-size.wal");
        patch(&wal, |b| b[frame_offset(2) as usize + 7] = 0);
        let (_, frames, end) = read_all(&wal);
        assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
        assert_eq!(end.offset, frame_offset(2));
        // Only the 1st transaction is committed; frame 1 is an unfinished transaction.
        assert_eq!(last_commit(&wal).unwrap().offset, frame_offset(1));
    }

    #[test]
    fn stops_at_salt_mismatch_or_page_zero() {
        let db = TestDb::new();
        three_transactions(&db);

        // Salts are not in the checksum; they are compared. Change salt-2 of frame 2.
        let wal = db.copy_wal("bad-salt.wal");
        patch(&wal, |b| b[frame_offset(2) as usize + 15] ^= 1);
        let (_, frames, end) = read_all(&wal);
        assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
        assert_eq!(end.offset, frame_offset(2));

        // Page number 0 ends the WAL even with a correct checksum (SQLite's rule).
        let wal = db.copy_wal("page-zero.wal");
        let (header, frames, _) = read_all(&wal);
        patch(&wal, |b| {
            let at = frame_offset(2) as usize;
            b[at..at + 4].fill(0);
            let sum = checksum(header.big_endian, &b[at..at + 8], frames[1].0.checksum);
            let sum = checksum(header.big_endian, &b[at + 24..at + 24 + 4096], sum);
            b[at + 16..at + 20].copy_from_slice(&sum[0].to_be_bytes());
            b[at + 20..at + 24].copy_from_slice(&sum[1].to_be_bytes());
        });
        let (_, frames, end) = read_all(&wal);
        assert_eq!(shape(&frames), THREE_TXN_SHAPE[..2]);
        assert_eq!(end.offset, frame_offset(2));
    }

    #[test]
    fn ignores_stale_frames_after_wal_restart() {
        let db = TestDb::new();
        for v in ["1", "2", "3"] {
            db.insert("a", v);
        }
        db.insert_both("4");
        db.insert("a", "5");
        let old_wal = db.copy_wal("old.wal");
        let (old_header, old_frames, _) = read_all(&old_wal);
        assert_eq!(old_frames.len(), 6);

        // Checkpoint everything with no reader holding the WAL, then write again: the writer
        // restarts the WAL from the top instead of appending.
        assert_eq!(db.checkpoint("PASSIVE"), (0, 6, 6));
        db.insert("b", "after restart");
        let wal = db.copy_wal("new.wal");
        let bytes = fs::read(&wal).unwrap();

        let (header, frames, end) = read_all(&wal);
        assert_eq!(header.checkpoint_seq, old_header.checkpoint_seq + 1);
        assert_eq!(header.salt[0], old_header.salt[0].wrapping_add(1));
        assert_ne!(header.salt[1], old_header.salt[1]);
        // Only the new transaction's frame, and it carries the new salts.
        assert_eq!(shape(&frames), [(3, DB_PAGES)]);
        assert_eq!(frames[0].0.salt, header.salt);
        assert!(frames[0].1.windows(13).any(|w| w == b"after restart"));
        assert_eq!(end.offset, frame_offset(1));
        assert_eq!(last_commit(&wal), Some(end));

        // The file still holds all 6 old frames' worth of bytes; frames 1..6 are the old
        // ones, with the old salts.
        assert_eq!(bytes.len() as u64, frame_offset(6));
        assert!(bytes.len() as u64 > end.offset);
        for i in 1..6 {
            let at = frame_offset(i);
            assert_eq!(
                [be_word(&bytes, at + 8), be_word(&bytes, at + 12)],
                old_header.salt
            );
        }
        // SQLite agrees: one frame in its WAL.
        assert_eq!(db.checkpoint("PASSIVE"), (0, 1, 1));
    }

    #[test]
    fn still_holds_a_position_until_the_wal_restarts() {
        let db = TestDb::new();
        for v in ["1", "2", "3"] {
            db.insert("a", v);
        }
        let (_, _, end) = read_all(&db.copy_wal("before.wal"));
        let live = File::open(db.copy_wal("same.wal")).unwrap();
        let reader = WalReader::open(&live).unwrap().unwrap();
        assert!(reader.still_holds(end).unwrap());
        let header_only = WalPosition {
            offset: HEADER_SIZE,
            checksum: reader.header().checksum,
        };
        assert!(reader.still_holds(header_only).unwrap());
        // A wrong checksum, an offset off the frame grid, or one past the end: not held.
        let wrong = WalPosition {
            checksum: [end.checksum[0] ^ 1, end.checksum[1]],
            ..end
        };
        assert!(!reader.still_holds(wrong).unwrap());
        let off_grid = WalPosition {
            offset: end.offset - 1,
            ..end
        };
        assert!(!reader.still_holds(off_grid).unwrap());
        let beyond = WalPosition {
            offset: end.offset + reader.header().frame_size(),
            ..end
        };
        assert!(!reader.still_holds(beyond).unwrap());

        // After a checkpoint and a restart, the old position is gone even though the file
        // still holds the old frames' bytes past the new end.
        assert_eq!(db.checkpoint("PASSIVE"), (0, 3, 3));
        db.insert("b", "after restart");
        let restarted = File::open(db.copy_wal("after.wal")).unwrap();
        let reader = WalReader::open(&restarted).unwrap().unwrap();
        assert!(!reader.still_holds(end).unwrap());
    }

    #[test]
    fn find_last_commit_excludes_uncommitted_tail() {
        let db = TestDb::new();
        let base = db.copy_db("base.db");
        db.insert("a", "one");
        db.insert_both("two");
        let full = fs::read(db.wal_path()).unwrap();

        // A copy that ends after frame 1: the 2nd transaction's first, non-commit frame.
        let wal = db.path("partial.wal");
        fs::write(&wal, &full[..frame_offset(2) as usize]).unwrap();
        let (_, frames, _) = read_all(&wal);
        assert_eq!(shape(&frames), [(2, DB_PAGES), (2, 0)]);

        let file = File::open(&wal).unwrap();
        let mut reader = WalReader::open(&file).unwrap().unwrap();
        let commit = reader.find_last_commit().unwrap().unwrap();
        assert_eq!(commit.offset, frame_offset(1));
        assert_eq!(commit.checksum, frames[0].0.checksum);
        // The reader itself went on over the valid but uncommitted frame.
        assert_eq!(reader.position().offset, frame_offset(2));
        // From there no further commit is found.
        assert_eq!(reader.find_last_commit().unwrap(), None);

        // SQLite also applies only the 1st transaction from this WAL.
        let (_dir, conn) = open_with_wal(&base, &full[..frame_offset(2) as usize]);
        assert_eq!(rows(&conn, "a"), ["one"]);
        assert!(rows(&conn, "b").is_empty());
    }

    #[test]
    fn seek_resumes_from_saved_position() {
        let db = TestDb::new();
        three_transactions(&db);
        let wal = db.copy_wal("copy.wal");
        let (_, all_frames, end) = read_all(&wal);

        let file = File::open(&wal).unwrap();
        let mut first = WalReader::open(&file).unwrap().unwrap();
        let mut page = Vec::new();
        first.next_frame(&mut page).unwrap().unwrap();
        first.next_frame(&mut page).unwrap().unwrap();
        let saved = first.position();
        assert_eq!(saved.offset, frame_offset(2));

        // Positions are persisted as JSON.
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"offset":8272,"checksum":[{},{}]}}"#,
                all_frames[1].0.checksum[0], all_frames[1].0.checksum[1]
            )
        );
        let restored: WalPosition = serde_json::from_str(&json).unwrap();

        let mut second = WalReader::open(&file).unwrap().unwrap();
        second.seek(restored);
        let mut rest = Vec::new();
        while let Some(frame) = second.next_frame(&mut page).unwrap() {
            rest.push((frame, page.clone()));
        }
        assert_eq!(rest, all_frames[2..]);
        assert_eq!(second.position(), end);

        // A position whose checksum is not the chain's finds nothing.
        second.seek(WalPosition {
            offset: saved.offset,
            checksum: [0, 0],
        });
        assert_eq!(second.next_frame(&mut page).unwrap(), None);

        // A position off a frame boundary is a caller bug.
        for offset in [0, 31, saved.offset + 1] {
            second.seek(WalPosition { offset, ..saved });
            let err = second.next_frame(&mut page).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid);
        }
    }

    /// Copy the frames of a real 3-transaction WAL into a fresh WAL with new salts, then open
    /// it with SQLite on top of the database as it was before those transactions.
    fn rewrite_and_open(big_endian: bool) {
        let db = TestDb::new();
        let base = db.copy_db("base.db");
        three_transactions(&db);
        let (real_header, frames, _) = read_all(&db.copy_wal("copy.wal"));

        let salt = [0x1234_5678, 0x9abc_def0];
        let header = WalHeader::new(big_endian, 4096, 42, salt);
        let mut writer = WalWriter::new(Vec::new(), header).unwrap();
        for (frame, page) in &frames {
            writer
                .write_frame(frame.page_number, frame.commit_size, page)
                .unwrap();
        }
        assert_eq!(writer.frames(), 4);
        let written = writer.finish().unwrap();
        assert_eq!(written.len() as u64, frame_offset(4));
        let magic = if big_endian {
            MAGIC_BIG_ENDIAN
        } else {
            MAGIC_LITTLE_ENDIAN
        };
        assert_eq!(be_word(&written, 0), magic);

        // Our reader accepts it: same pages, new salts, new checksum chain.
        let path = db.path("written.wal");
        fs::write(&path, &written).unwrap();
        let (read_header, read_frames, end) = read_all(&path);
        assert_eq!(read_header, header);
        assert_eq!(read_header.big_endian, big_endian);
        assert_ne!(read_header.salt, real_header.salt);
        assert_eq!(shape(&read_frames), THREE_TXN_SHAPE);
        for ((read, read_page), (real, real_page)) in read_frames.iter().zip(&frames) {
            assert_eq!(read.salt, salt);
            assert_ne!(read.checksum, real.checksum);
            assert_eq!(read_page, real_page);
        }
        assert_eq!(end.offset, frame_offset(4));
        assert_eq!(last_commit(&path), Some(end));

        // And so does SQLite, which validates every frame before applying it.
        let (_dir, conn) = open_with_wal(&base, &written);
        assert_eq!(rows(&conn, "a"), ["one", "two", "three"]);
        assert_eq!(rows(&conn, "b"), ["two"]);
        assert_eq!(integrity_check(&conn), "ok");
        drop(conn);

        // Negative control: with a flipped bit in the last frame's page, SQLite drops the 3rd
        // transaction, so the check above really depends on our checksums.
        let mut damaged = written.clone();
        damaged[frame_offset(3) as usize + 100] ^= 1;
        let (_dir, conn) = open_with_wal(&base, &damaged);
        assert_eq!(rows(&conn, "a"), ["one", "two"]);
    }

    #[test]
    fn written_wal_is_accepted_by_sqlite() {
        rewrite_and_open(false);
    }

    /// SQLite on little-endian machines only writes little-endian checksums, but it reads
    /// big-endian ones, so the big-endian variant can be checked against SQLite too.
    #[test]
    fn big_endian_wal_roundtrips_and_is_accepted_by_sqlite() {
        rewrite_and_open(true);

        // The byte order really changes the checksums.
        let le = WalHeader::new(false, 4096, 0, [1, 2]);
        let be = WalHeader::new(true, 4096, 0, [1, 2]);
        assert_ne!(le.checksum, be.checksum);
        assert_eq!(WalHeader::parse(&be.to_bytes()).unwrap(), be);
        // A big-endian checksum under the little-endian magic does not verify.
        let mut bytes = be.to_bytes();
        bytes[3] = 0x82;
        let err = WalHeader::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn page_size_65536_is_stored_literally() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("big.db")).unwrap();
        conn.execute_batch("PRAGMA page_size=65536").unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch("CREATE TABLE t(x)").unwrap();

        let wal = dir.path().join("big.db-wal");
        let bytes = fs::read(&wal).unwrap();
        assert_eq!(be_word(&bytes, 8), 65536);
        let file = File::open(&wal).unwrap();
        let mut reader = WalReader::open(&file).unwrap().unwrap();
        assert_eq!(reader.header().page_size, 65536);
        assert_eq!(reader.header().frame_size(), 65560);
        let mut page = Vec::new();
        let first = reader.next_frame(&mut page).unwrap().unwrap();
        assert_eq!((first.page_number, first.commit_size), (1, 0));
        assert_eq!(page.len(), 65536);
        assert_eq!(&page[..16], b"SQLite format 3\0");
        let commit = reader.find_last_commit().unwrap().unwrap();
        assert_eq!(commit.offset, 32 + 2 * 65560);
    }

    #[test]
    fn writer_rejects_bad_input() {
        for page_size in [0, 1, 1000, 131072] {
            let header = WalHeader::new(false, page_size, 0, [1, 2]);
            let err = WalWriter::new(Vec::new(), header).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Invalid, "page size {page_size}");
        }

        let header = WalHeader::new(false, 512, 0, [1, 2]);
        let mut writer = WalWriter::new(Vec::new(), header).unwrap();
        let err = writer.write_frame(1, 1, &[0; 511]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        let err = writer.write_frame(0, 1, &[0; 512]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert_eq!(writer.frames(), 0);
        writer.write_frame(1, 1, &[7; 512]).unwrap();
        assert_eq!(writer.frames(), 1);
        let out = writer.finish().unwrap();
        // Nothing of the refused frames was written.
        assert_eq!(out.len(), 32 + 24 + 512);
        assert_eq!(&out[..32], &header.to_bytes());
    }
}
