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
//!
//! Whoever runs the `walsync` binary, the tests or the harness, runs it through
//! [`walsync_command`]: only the test build knows where the binary is
//! (`CARGO_BIN_EXE_walsync`), so the kit takes its path.

// The kit's documentation is for reading its source: it names private steps (the harness's
// `Round::chaos_*`) as freely as public ones.
#![allow(rustdoc::private_intra_doc_links)]

use std::path::Path;
use std::process::Command;

pub mod faultproxy;
pub mod faults;
pub mod s3server;
pub mod torture;

/// `walsync` at `binary`, ready for its arguments, without the caller's settings (see
/// [`without_callers_settings`]).
pub fn walsync_command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    without_callers_settings(&mut command);
    command
}

/// Take this process's `AWS_*`, `WALSYNC_*` and `SSL_CERT_*` variables out of `command`'s
/// environment: what walsync is told comes from the caller (`.envs` of the test server's
/// [`s3server::S3Server::env`], say), never from whoever ran the tests. For a command that
/// runs walsync itself (`sh -c '... exec walsync'`, `script`), as [`walsync_command`] does.
pub fn without_callers_settings(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("AWS_") || name.starts_with("WALSYNC_") || name.starts_with("SSL_CERT")
        {
            command.env_remove(&key);
        }
    }
    command
}
