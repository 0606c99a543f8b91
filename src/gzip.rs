//! How every object walsync stores is compressed: one gzip member at level 1 ([`LEVEL`]),
//! with a snapshot's chain value in the header comment and nothing else there, byte for
//! byte as `docs/FORMAT.md` ("Segments", "Snapshots") specifies, since shell scripts read it.
//!
//! Segments and snapshots are both written through [`encoder`] and [`finish`], into a spool
//! file ([`crate::spool`]) they are then uploaded from. A segment cut under the barrier is
//! first written as it is ([`Stored`]) and compressed once the barrier is released
//! ([`recompress`]), before anything counts it. Reading them back (gunzipping as the
//! bytes arrive, telling bad data from a full disk) is restore's (`src/restore/download.rs`).

use std::fs::File;
use std::io::{BufWriter, Write};

use flate2::write::GzEncoder;
use flate2::{Compression, Crc, GzBuilder};

use crate::error::{Context, Error, Result};

/// Compression level of every object (segments and snapshots).
///
/// Compression is nearly all of walsync's CPU time under writes (a profile of 50 MiB of
/// writes shipped: about 80% in deflate, 1% in WAL checksums, the rest mostly the kernel).
/// Measured with flate2's miniz_oxide backend (release build) on 4 KiB pages, in ms of CPU
/// per MiB and compression ratio, on rows of word-like text / rows half random bytes:
/// level 1: 6.4 ms 3.1x / 5.0 ms 2.0x; level 2: 19.5 ms 3.5x / 16 ms 2.0x; level 3: 17.6
/// ms 4.0x / 17 ms 2.0x; level 6: 68 ms 4.3x / 18 ms 2.0x. The zlib-rs backend was no
/// better on this data (level 1: 6.1 ms 2.7x / 7.8 ms 1.9x; level 3: 32 ms 3.7x). Level 1
/// is the only level with miniz_oxide's fast matcher: a third of the CPU of level 3, for
/// about 30% more bytes on text and the same on data that hardly compresses.
pub const LEVEL: u32 = 1;

/// A gzip stream into `out`, buffered, with `comment` in its header when given (a
/// snapshot's chain value): how every object is written into its file.
pub fn encoder(out: &File, comment: Option<String>) -> GzEncoder<BufWriter<&File>> {
    let builder = match comment {
        Some(comment) => GzBuilder::new().comment(comment),
        None => GzBuilder::new(),
    };
    builder.write(BufWriter::new(out), Compression::new(LEVEL))
}

/// End a stream of [`encoder`] and write out what is buffered; `what` names the object
/// (`segment`, `snapshot`) in errors.
pub fn finish(gz: GzEncoder<BufWriter<&File>>, what: &str) -> Result<()> {
    gz.finish()
        .context(|| format!("compressing {what}"))?
        .into_inner()
        .map_err(|e| Error::from(e.into_error()))
        .context(|| format!("writing {what}"))?;
    Ok(())
}

/// A gzip member of stored deflate blocks: the data as it is, framed, at the speed of a
/// copy. What walsync cuts while it holds the application's write lock is written so and
/// compressed at [`LEVEL`] by [`recompress`] once the lock is released, before it counts
/// (see `Replica::persist`), so no object is ever stored uncompressed. (Measured, a writer
/// of 100 MiB in 100-row transactions: a cut under the lock took 20-30 us a frame at level
/// 1, 8-9 us stored.)
pub struct Stored<W: Write> {
    out: W,
    block: Vec<u8>,
    crc: Crc,
}

/// The most a stored deflate block holds (its length is 16 bits).
const STORED_BLOCK: usize = 65535;

impl<W: Write> Stored<W> {
    /// Write the gzip header (the same ten bytes as [`encoder`]'s without a comment).
    pub fn new(mut out: W) -> std::io::Result<Stored<W>> {
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255])?;
        Ok(Stored {
            out,
            block: Vec::with_capacity(STORED_BLOCK),
            crc: Crc::new(),
        })
    }

    fn write_block(&mut self, last: bool) -> std::io::Result<()> {
        // Never more than STORED_BLOCK bytes are buffered (see `write`).
        let len = u16::try_from(self.block.len()).unwrap_or(u16::MAX);
        let [l0, l1] = len.to_le_bytes();
        let [n0, n1] = (!len).to_le_bytes();
        self.out.write_all(&[u8::from(last), l0, l1, n0, n1])?;
        self.out.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Write the last block and the trailer (CRC-32 and length), and return the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.write_block(true)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Stored<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STORED_BLOCK - self.block.len());
        self.block.extend_from_slice(&data[..n]);
        self.crc.update(&data[..n]);
        if self.block.len() == STORED_BLOCK {
            self.write_block(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Compress the gzip member in `from` (written by [`Stored`]) into `to`, as [`encoder`]
/// would have.
pub fn recompress(mut from: &File, to: &File) -> Result<()> {
    let what = || "compressing a segment cut under the write lock";
    let mut gunzip = flate2::write::GzDecoder::new(encoder(to, None));
    std::io::copy(&mut from, &mut gunzip).context(what)?;
    finish(gunzip.finish().context(what)?, "segment")
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};

    use flate2::read::GzDecoder;

    use super::*;

    /// A stored member is a gzip file (any reader takes it), and recompressed it holds the
    /// same bytes, compressed.
    #[test]
    fn stored_members_read_back_and_recompress_to_the_same_bytes() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut stored = tempfile::tempfile().unwrap();
        let mut gz = Stored::new(BufWriter::new(&stored)).unwrap();
        gz.write_all(&data).unwrap();
        gz.finish().unwrap();
        let mut out = Vec::new();
        stored.rewind().unwrap();
        GzDecoder::new(&stored).read_to_end(&mut out).unwrap();
        assert!(out == data, "the stored member reads back");
        assert!(stored.metadata().unwrap().len() > data.len() as u64);

        stored.rewind().unwrap();
        let mut compressed = tempfile::tempfile().unwrap();
        recompress(&stored, &compressed).unwrap();
        compressed.rewind().unwrap();
        let mut header = [0u8; 10];
        compressed.read_exact(&mut header).unwrap();
        assert_eq!(header[8], 4, "XFL of level 1 (docs/FORMAT.md)");
        compressed.rewind().unwrap();
        let mut out = Vec::new();
        GzDecoder::new(&compressed).read_to_end(&mut out).unwrap();
        assert!(out == data, "the recompressed member reads back");
        assert!(compressed.metadata().unwrap().len() < data.len() as u64 / 2);

        // An empty one too.
        let mut empty = tempfile::tempfile().unwrap();
        Stored::new(&empty).unwrap().finish().unwrap();
        empty.rewind().unwrap();
        let mut out = Vec::new();
        GzDecoder::new(&empty).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }
}
