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
//! for them with a [`DirectorySpec`]), [`Replica`] for one-shot use (`snapshot()`,
//! `sync()`), [`restore()`] with [`RestoreOptions`] (and [`plan_restore`] to see what it
//! would do), [`prune`], [`list()`] and [`status()`], the storage client ([`Destination`],
//! [`open_storage`], the [`Storage`] trait) and [`Error`], whose [`ErrorKind`], HTTP status
//! and S3 code are data to match on.
//!
//! Beyond the root, three modules are public: [`storage`] (the client and its trait, for a
//! destination of the application's own), [`format`](mod@format) (the names and records of
//! the replica format, specified in `docs/FORMAT.md`) and [`metrics`] (per-database counters
//! and their Prometheus text). Everything else is private. A `#[doc(hidden)]` module named `unstable`
//! lends a few internals to the `walsync` binary, the tests and the benchmark tools; it is
//! not part of the API and changes without notice.
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
//! - `gzip`: how every object is compressed (one gzip member, level 1, the chain value in
//!   a snapshot's header comment).
//! - `files`: small file ideas shared by every layer: identity, `-wal` paths, atomic writes.
//! - `spool`: scratch files on disk, so no buffer grows with database or transaction size.
//! - `sidecar`: walsync's files beside a database: lock, position, staged objects.
//! - `replica`: one database replicated to one destination: generations, staging, checkpoints.
//! - `watcher`: file events (inotify, kqueue, or polling) that wake a database's thread.
//! - `stack`: lean database threads, and giving back stack pages an idle one no longer uses.
//! - `gate`: how many threads may do one costly thing at once (snapshots, reconciles).
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
//! - `metrics`: replication counters per database, and their Prometheus text.
//! - `progress`: what a snapshot reports as it goes, for whoever draws a progress display.
//! - `error`: one error type, with a kind, an HTTP status and an S3 code to match on.
//! - `utc`: UTC timestamps in the two spellings the format and S3 use.
//!
//! The binary's own modules (arguments, settings, help pages, the heartbeat, the metrics
//! listener, the progress line, supervision of `--exec`) are in `src/cli/`, behind the
//! default `cli` feature.

mod backoff;
mod database;
mod directory;
mod error;
mod files;
mod gate;
mod glob;
mod gzip;
mod layout;
mod limits;
mod list;
pub mod metrics;
mod progress;
mod replica;
mod replicator;
mod restore;
mod retention;
mod segment;
mod sidecar;
mod snapshot;
mod spool;
mod stack;
pub mod storage;
#[cfg(test)]
mod test_random;
mod uploader;
mod utc;
mod wal;
mod watcher;

pub use database::keep_shared_maps_apart;
pub use directory::{DirectorySpec, Pattern};
pub use error::{Error, ErrorKind, Result};
pub use layout::Generation;
pub use list::{
    list, status, DatabaseStatus, DatabaseSummary, GenerationSummary, Listing, ObjectSummary,
    Status,
};
pub use metrics::DbMetrics;
pub use progress::Progress;
pub use replica::{Replica, SyncOutcome};
pub use replicator::{MetricsSource, Options, Replicator};
pub use restore::{plan as plan_restore, restore, RestoreOptions, RestorePlan};
pub use retention::{prune, PrunePlan};
pub use storage::{open as open_storage, Destination, Storage};
pub use utc::UtcTime;
pub use watcher::WatchMode;

/// The replica format's names and records, as `docs/FORMAT.md` specifies them: what an
/// object is called, what a generation is, the chain value that links a snapshot to the
/// segments after it, and a destination's objects sorted into databases and generations.
pub mod format {
    pub use crate::layout::{
        Catalog, ChainValue, Generation, GenerationObjects, ObjectKind, ObjectName, StoredObject,
    };
}

/// Internals lent to the `walsync` binary, the integration tests and the benchmark tools.
/// Not part of the API: anything here may change or go in any release.
#[doc(hidden)]
pub mod unstable {
    pub use crate::layout::{assign_names, default_name, validate_name};
    pub use crate::limits::{host_limits, raise_open_files_limit, warnings as limit_warnings};
    pub use crate::list::catalog;
    pub use crate::restore::{check_output, plan_in, replica_exists, DEFAULT_MODE};
    pub use crate::retention::{format_duration, parse_duration, prune_catalog};
}

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
