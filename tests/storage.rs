//! The S3 storage client against a real (in-process) S3 server: real HTTP, real SigV4.
//!
//! One room a theme (`cargo test --test tests storage::` runs them all):
//! - `objects`: keys under a prefix, put, get and delete, listings past one page, what is
//!   not found and what is refused before any request;
//! - `multipart`: uploads in parts, aborted when they fail and, once stale, by `prune` and
//!   `watch`;
//! - `signing`: every request signed in its `Authorization` header, every upload with its
//!   `Content-MD5`, wrong keys said without secrets, a host clock far off;
//! - `retries`: a server stopped or cut off, and its HTTP faults, ridden out by retries;
//! - `credentials`: keys from elsewhere than the environment (a profile, a
//!   `credential_process`, the container and instance endpoints, a web identity);
//! - `endpoints`: HTTPS with a private CA, virtual-hosted addressing, a second S3
//!   implementation (s3rver), a bucket in another AWS region.
//!
//! What they share is here: bytes that do not compress, a `get` that checks its count, a
//! file to upload.

mod credentials;
mod endpoints;
mod multipart;
mod objects;
mod retries;
mod signing;

use std::fs::File;
use std::io::Write;

use walsync::storage::Storage;

const MIB: usize = 1024 * 1024;

/// Deterministic bytes that do not compress and do not repeat with any short period.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn get(storage: &dyn Storage, key: &str) -> walsync::Result<Vec<u8>> {
    let mut out = Vec::new();
    let n = storage.get(key, &mut out)?;
    assert_eq!(
        n,
        out.len() as u64,
        "get must return the number of bytes written"
    );
    Ok(out)
}

fn temp_file(dir: &tempfile::TempDir, data: &[u8]) -> File {
    let path = dir.path().join("source.bin");
    File::create(&path).unwrap().write_all(data).unwrap();
    File::open(&path).unwrap()
}
