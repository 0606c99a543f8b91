//! The storage client: one narrow interface, two implementations.
//!
//! Everything walsync keeps remotely goes through [`Storage`]: put an object (from a small
//! buffer or streamed from a file), get an object into a writer, list keys under a prefix,
//! delete a key, or many at once (retention). Keys are relative to the destination's
//! prefix, use `/` as separator, and never start with `/`; each implementation maps them
//! onto its own namespace.
//!
//! - [`s3::S3Storage`]: any S3-compatible service, signed with SigV4 (`sigv4`, in the
//!   `Authorization` header) over a blocking HTTP client (ureq), with retries and multipart
//!   upload for large files.
//! - [`file::FileStorage`]: a directory tree, for `file://` destinations (tests, NFS mounts,
//!   and a quick start that needs no S3 server).

pub mod credentials;
pub mod file;
pub mod s3;
mod sigv4;
mod xml;

use std::fs::File;
use std::io::{self, Read, Write};

use crate::error::{Error, Result};

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the destination prefix, e.g. `app/wal/....wal.gz`.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// The narrow interface between walsync and wherever replicas live.
///
/// Implementations are blocking and safe to share between threads. Every error names the
/// operation and the key; none contains credentials.
pub trait Storage: Send + Sync {
    /// Store `data` under `key`, replacing nothing else.
    fn put_bytes(&self, key: &str, data: &[u8]) -> Result<()>;

    /// Store the whole content of `file` (offset 0 to its current length) under `key`.
    ///
    /// The file is read with positional reads, so its cursor is not used; large files are
    /// sent in parts without being held in memory.
    fn put_file(&self, key: &str, file: &File) -> Result<()>;

    /// Write the content of `key` to `out`, returning the number of bytes written.
    /// A missing key is an error of kind [`crate::error::ErrorKind::NotFound`].
    fn get(&self, key: &str, out: &mut dyn Write) -> Result<u64>;

    /// Every object whose key starts with `prefix`, in ascending key order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Remove `key`. Removing a key that does not exist is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Remove every key in `keys`; keys that do not exist are not an error. Keys are
    /// removed in the order given, except that a batching implementation (S3 DeleteObjects,
    /// up to 1000 keys a request) removes the keys of one batch in no particular order; it
    /// finishes each batch before it starts the next. The first failure stops it: the
    /// error names the keys that could not be removed, and later batches are not sent.
    ///
    /// The default removes the keys one at a time with [`Storage::delete`] (what `file://`
    /// does: one unlink each).
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        for key in keys {
            self.delete(key)?;
        }
        Ok(())
    }

    /// Abort the incomplete multipart uploads under `prefix` (relative, like a
    /// [`Storage::list`] prefix) that a crash left behind: those started more than
    /// [`s3::STALE_UPLOAD_AGE`] ago, which S3 keeps (and bills) until they are aborted.
    /// Returns how many were aborted. Storage without multipart uploads has none.
    fn abort_stale_uploads(&self, prefix: &str) -> Result<usize> {
        let _ = prefix;
        Ok(0)
    }

    /// Where this storage points, for messages: `s3://bucket/prefix` or `file:///dir`.
    fn describe(&self) -> String;
}

/// Build the storage for a destination.
///
/// `s3://` destinations take their credentials, region and endpoint from the environment (see
/// [`s3::S3Config::from_env`]); `endpoint` is the `--endpoint` flag, which wins over
/// `AWS_ENDPOINT_URL_S3`. It means nothing for `file://` destinations and is ignored there.
pub fn open(dest: &Destination, endpoint: Option<&str>) -> Result<Box<dyn Storage>> {
    open_with_timeout(dest, endpoint, s3::DEFAULT_TIMEOUT)
}

/// [`open`], with `s3_timeout` as the longest an S3 request may wait on one read or write
/// (`--s3-timeout`) before it fails and is retried. It means nothing for `file://`.
pub fn open_with_timeout(
    dest: &Destination,
    endpoint: Option<&str>,
    s3_timeout: std::time::Duration,
) -> Result<Box<dyn Storage>> {
    match dest {
        Destination::S3 { bucket, prefix } => {
            let mut config = s3::S3Config::from_env(bucket, prefix, endpoint)?;
            config.timeout = s3_timeout;
            Ok(Box::new(s3::S3Storage::new(config)?))
        }
        Destination::File { root } => {
            if endpoint.is_some() {
                log::warn!("the S3 endpoint is ignored for file:// destinations");
            }
            Ok(Box::new(file::FileStorage::new(root.clone())))
        }
    }
}

/// Why `key` is not a valid relative key, if it is not.
///
/// Keys are relative, `/`-separated, and made of non-empty components other than `.` and
/// `..`: both implementations refuse anything else rather than each interpreting it in its own
/// way (a path that escapes the root, a URL that normalizes to another object).
pub(crate) fn check_key(key: &str) -> std::result::Result<(), &'static str> {
    if key.is_empty() {
        return Err("keys must not be empty");
    }
    if key.starts_with('/') {
        return Err("keys are relative and must not start with '/'");
    }
    if key.contains(['\\', '\0']) {
        return Err("keys must not contain '\\' or NUL");
    }
    if key.split('/').any(|part| matches!(part, "" | "." | "..")) {
        return Err("keys must not contain empty, '.' or '..' components");
    }
    Ok(())
}

/// Reads `offset..offset + len` of a file with positional reads, leaving its cursor alone.
///
/// Reaching the end of the file before `len` bytes is an error (`UnexpectedEof`): the file
/// was truncated while being read, and sending a short object would be worse than failing.
pub(crate) struct FileRange<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> FileRange<'a> {
    pub(crate) fn new(file: &'a File, offset: u64, len: u64) -> FileRange<'a> {
        FileRange {
            file,
            pos: offset,
            end: offset + len,
        }
    }
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = read_at(self.file, &mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "file ended at byte {} before the expected {}: it was truncated while being read",
                    self.pos, self.end
                ),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::windows::fs::FileExt;
    file.seek_read(buf, offset)
}

/// A parsed `-b` destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `s3://bucket/optional/prefix`
    S3 { bucket: String, prefix: String },
    /// `file:///absolute/dir`
    File { root: std::path::PathBuf },
}

impl Destination {
    /// Parse `s3://bucket[/prefix]` or `file:///dir`.
    pub fn parse(url: &str) -> Result<Destination> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::invalid(format!(
                    "destination {url:?} has no bucket name (expected s3://bucket/prefix)"
                )));
            }
            let prefix = prefix.trim_matches('/').to_string();
            s3::check_prefix(&prefix).map_err(|why| {
                Error::invalid(format!(
                    "destination {url:?}: {why} (a store would keep the objects under \
                     another key than the one walsync lists)"
                ))
            })?;
            return Ok(Destination::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(Error::invalid(format!(
                    "destination {url:?} has no path (expected file:///some/dir)"
                )));
            }
            return Ok(Destination::File { root: path.into() });
        }
        Err(Error::invalid(format!(
            "destination {url:?} is not supported (expected s3://bucket/prefix or file:///some/dir)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_with_and_without_prefix() {
        assert_eq!(
            Destination::parse("s3://b/x/y/").unwrap(),
            Destination::S3 {
                bucket: "b".into(),
                prefix: "x/y".into()
            }
        );
        assert_eq!(
            Destination::parse("s3://b").unwrap(),
            Destination::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
    }

    #[test]
    fn parses_file_and_rejects_others() {
        assert_eq!(
            Destination::parse("file:///tmp/r").unwrap(),
            Destination::File {
                root: "/tmp/r".into()
            }
        );
        assert!(Destination::parse("http://x").is_err());
        assert!(Destination::parse("s3:///p").is_err());
        assert!(Destination::parse("file://").is_err());
    }
}
