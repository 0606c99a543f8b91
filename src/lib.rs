//! walsync: continuous replication of SQLite WAL databases to S3-compatible storage.
//!
//! ## Embedding
//!
//! An application runs the same engine as `walsync watch` in-process, from its own threads;
//! it needs no async runtime (from Tokio, call the blocking methods through
//! `spawn_blocking`; `examples/hyper-app.rs` is a whole web application doing so):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use walsync::{open_storage, Destination, Options, Replicator};
//! # fn main() -> walsync::Result<()> {
//!
//! let storage = Arc::from(open_storage(&Destination::parse("s3://bucket/prefix")?, None)?);
//! let replicator = Replicator::start(storage, &[("app.db".into(), "app".into())], Options::default())?;
//! // ... the application commits as usual ...
//! replicator.sync("app")?;             // force: ship now, return once stored
//! replicator.snapshot("app")?;         // force a snapshot
//! replicator.stop(Duration::from_secs(30))?; // ship what is left and stop
//! # Ok(())
//! # }
//! ```
//!
//! The same snippet is in README.md (a test keeps the two equal). Everything an embedding
//! application needs is re-exported here, at the crate root: [`Replicator`] and its
//! [`Options`] (databases can be added and removed while it runs, and directories watched
//! for them with a [`DirectorySpec`]), [`Replica`] for one-shot use (`snapshot()`, `sync()`), [`restore()`] with
//! [`RestoreOptions`], [`list()`] and [`status()`], the storage client ([`Destination`],
//! [`open_storage`], the [`Storage`] trait) and [`Error`], whose [`ErrorKind`], HTTP status
//! and S3 code are data to match on.
//!
//! The modules themselves are public only so that the `walsync` binary and the integration
//! tests can reach the internals they drive; they are hidden from these docs and are not a
//! stable API.
//!
//! ## Inside
//!
//! The modules follow the shape of the program (read them in `src/`):
//!
//! - `wal`: the SQLite WAL file format: read and validate frames, write standalone WALs.
//! - `storage`: the storage client behind one narrow trait (S3 and `file://`).
//! - `layout`: how objects are named in a replica (the public, scriptable contract,
//!   specified in `docs/FORMAT.md`).
//! - `database`: opening the SQLite database walsync replicates, and pinning its WAL.
//! - `snapshot`: consistent compressed copies of a database through the backup API.
//! - `segment`: cutting committed WAL frames into standalone compressed segments.
//! - `files`: small file ideas shared by every layer: identity, `-wal` paths, atomic writes.
//! - `sidecar`: walsync's files beside a database: lock, position, staged objects.
//! - `replica`: one database replicated to one destination: generations, staging, checkpoints.
//! - `watcher`: file events (inotify, kqueue, or polling) that wake a database's thread.
//! - `stack`: giving back thread stack pages an idle database no longer uses.
//! - `backoff`: the waits between retries (S3 requests, uploads).
//! - `uploader`: the small pool of blocking upload workers shared by all databases.
//! - `replicator`: continuous replication of many databases (`walsync watch`).
//! - `directory`: watched directories: which files are databases, their names, and adding
//!   and removing them as they come and go (`walsync watch --dir`); `glob` matches their
//!   file names.
//! - `restore`: planning, downloading, verifying and applying a replica to a file.
//! - `retention`: which old objects a prune deletes, keeping every point in the window restorable.
//! - `limits`: the host limits that bound how many databases fit, said at start.
//! - `list`: what a destination holds, for people and scripts.
//! - `metrics`: replication counters per database, served for Prometheus.
//! - `heartbeat`: a GET to a monitoring URL while every database's lag is under a bound.
//! - `progress`: a progress line on a terminal for one-shot commands.

#[doc(hidden)]
pub mod backoff;
#[doc(hidden)]
pub mod database;
#[doc(hidden)]
pub mod directory;
#[doc(hidden)]
pub mod error;
#[doc(hidden)]
pub mod files;
#[doc(hidden)]
pub mod gate;
#[doc(hidden)]
pub mod glob;
#[doc(hidden)]
pub mod gzip;
#[doc(hidden)]
pub mod heartbeat;
#[doc(hidden)]
pub mod layout;
#[doc(hidden)]
pub mod limits;
#[doc(hidden)]
pub mod list;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod progress;
#[doc(hidden)]
pub mod replica;
#[doc(hidden)]
pub mod replicator;
#[doc(hidden)]
pub mod restore;
#[doc(hidden)]
pub mod retention;
#[doc(hidden)]
pub mod segment;
#[doc(hidden)]
pub mod sidecar;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod spool;
#[doc(hidden)]
pub mod stack;
#[doc(hidden)]
pub mod storage;
#[cfg(test)]
mod test_random;
#[doc(hidden)]
pub mod uploader;
#[doc(hidden)]
pub mod utc;
#[doc(hidden)]
pub mod wal;
#[doc(hidden)]
pub mod watcher;

pub use directory::DirectorySpec;
pub use error::{Error, ErrorKind, Result};
pub use layout::Generation;
pub use list::{list, status, Listing, Status};
pub use metrics::DbMetrics;
pub use replica::{Replica, SyncOutcome};
pub use replicator::{Options, Replicator};
pub use restore::{restore, RestoreOptions, RestorePlan};
pub use storage::{open as open_storage, Destination, Storage};
pub use utc::UtcTime;

#[cfg(test)]
mod tests {
    /// The lines of the first code block in `text` that opens with `fence`, without
    /// rustdoc's hidden lines (`# ...`), blank lines and a `//! ` prefix.
    fn snippet(text: &str, fence: &str) -> Vec<String> {
        text.lines()
            .map(|line| {
                line.strip_prefix("//!")
                    .unwrap_or(line)
                    .trim_start_matches(' ')
            })
            .skip_while(|line| *line != fence)
            .skip(1)
            .take_while(|line| !line.starts_with("```"))
            .filter(|line| !line.trim().is_empty() && !line.starts_with("# "))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_readme_library_snippet_is_the_crate_doc_example() {
        let readme = snippet(include_str!("../README.md"), "```rust");
        let doc = snippet(include_str!("lib.rs"), "```no_run");
        assert!(readme.len() > 5, "{readme:?}");
        assert_eq!(readme, doc);
    }
}
