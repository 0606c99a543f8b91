//! walsync's test kit: what its tests and tools run walsync against, in a crate of its own so
//! that `examples/` holds examples only and the server's heavy dependencies (s3s, hyper,
//! tokio, rcgen, rustls) are this crate's, not walsync's.
//!
//! - [`s3server`]: an S3 server inside the test process (s3s-fs over a directory, SigV4
//!   checked, HTTPS with a private CA on request) that records what it was sent and plays
//!   HTTP faults;
//! - [`faultproxy`]: a TCP proxy in front of it that plays the network's faults (resets,
//!   stalls, delays); [`faults`] is the vocabulary the two share;
//! - [`torture`]: the crash-and-fault torture harness, which runs rounds of chaos against the
//!   real `walsync` binary and checks every restore.
//!
//! The integration tests (`tests/` in the repository's root; `walsync` takes this crate as a
//! dev-dependency) use all of it. Two small programs make tools of it:
//! `cargo run -p walsync-testkit --bin s3-server` (the benchmarks' S3 server,
//! `scripts/bench.sh`) and `--bin torture` (long torture runs, `scripts/torture.sh`).
//!
//! The kit depends on `walsync` (the library: the storage client, the replica format), and
//! `walsync` dev-depends on the kit. Cargo allows that cycle, but walsync's own unit tests
//! (`#[cfg(test)]` in `src/`) are a second copy of the crate, whose types are not the kit's:
//! they cannot use it, and do not.

pub mod faultproxy;
pub mod faults;
pub mod s3server;
pub mod torture;
