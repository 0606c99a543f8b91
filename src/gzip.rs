//! How every object walsync stores is compressed: one gzip member at level 1 ([`LEVEL`]),
//! with a snapshot's chain value in the header comment and nothing else there, byte for
//! byte as `docs/FORMAT.md` ("Segments", "Snapshots") specifies, since shell scripts read it.
//!
//! Segments and snapshots are both written through [`encoder`] and [`finish`], into a spool
//! file ([`crate::spool`]) they are then uploaded from. Reading them back (gunzipping as the
//! bytes arrive, telling bad data from a full disk) is restore's (`src/restore/download.rs`).

use std::fs::File;
use std::io::BufWriter;

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

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
