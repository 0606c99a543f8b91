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

/// The salts the header of the WAL in `file` states, if it has a header with a WAL magic.
/// With [`frame_salts_at`], a cheap hint (two small reads) of how far a WAL has been
/// written, and nothing more: no checksum is verified, so a frame found may be torn or
/// uncommitted, and only a [`WalReader`] says what the WAL holds.
pub fn header_salts(file: &File) -> Result<Option<[u32; 2]>> {
    let mut header = [0u8; HEADER_SIZE as usize];
    let read = read_full_at(file, &mut header, 0).context(|| "reading the WAL header")?;
    let magic = be_u32(&header, 0);
    if read < header.len() || (magic != MAGIC_LITTLE_ENDIAN && magic != MAGIC_BIG_ENDIAN) {
        return Ok(None);
    }
    Ok(Some([be_u32(&header, 16), be_u32(&header, 20)]))
}

/// The salts in the header of the frame at `offset` of the WAL in `file`, if the file
/// reaches that far (see [`header_salts`]).
pub fn frame_salts_at(file: &File, offset: u64) -> Result<Option<[u32; 2]>> {
    let mut frame = [0u8; FRAME_HEADER_SIZE as usize];
    let read = read_full_at(file, &mut frame, offset)
        .context(|| format!("reading the WAL at offset {offset}"))?;
    Ok((read == frame.len()).then(|| [be_u32(&frame, 8), be_u32(&frame, 12)]))
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
mod tests;
