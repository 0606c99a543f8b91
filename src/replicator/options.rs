//! How a [`Replicator`](super::Replicator) behaves: its options and their defaults, in a
//! room of their own because everything else in the replicator reads them.

use std::time::Duration;

use crate::replica;
use crate::retention;
use crate::watcher::WatchMode;

/// How a [`Replicator`](super::Replicator) behaves. `Default` gives walsync's defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Under steady writes, ship a database at most this often.
    pub min_interval: Duration,
    /// Take a snapshot this often while a database changes.
    pub snapshot_interval: Duration,
    /// Upload workers shared by all databases.
    pub upload_workers: usize,
    /// File events (inotify/kqueue) or stat polling.
    pub watch_mode: WatchMode,
    /// How often the polling watcher looks.
    pub poll_interval: Duration,
    /// How often each database re-checks its WAL even without events (in case one was
    /// lost); a database at rest, six times less often. Also how often a watched directory
    /// is scanned whole.
    pub safety_interval: Duration,
    /// Checkpoint once walsync has staged this many frames since its last checkpoint.
    pub passive_checkpoint_frames: u64,
    /// Under heavy writes, read the WAL and checkpoint as soon as it holds this many frames
    /// that walsync has not read, without waiting for `min_interval`, so that the WAL
    /// restarts about as often as SQLite's own checkpoints would restart it; 0: never
    /// sooner than `min_interval`.
    pub restart_frames: u64,
    /// A WAL file at least this large is truncated (TRUNCATE checkpoint, while walsync's
    /// read transaction keeps it safe) after walsync's next complete checkpoint.
    pub wal_size_limit: u64,
    /// Per database: stop reading the WAL while this many bytes are staged on local disk
    /// and not yet stored (storage is down or slow); the WAL then stays pinned.
    pub staging_limit: u64,
    /// Keep every point in time this far back restorable and delete older objects (as
    /// [`crate::prune`] does); zero keeps everything.
    pub retention: Duration,
    /// How long a removed database ([`Replicator::remove`](super::Replicator::remove), or its file gone from a
    /// watched directory) keeps uploading what it staged before its thread lets go; what
    /// is left then stays staged in its sidecar.
    pub removal_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(3600),
            upload_workers: 2,
            watch_mode: WatchMode::Auto,
            poll_interval: Duration::from_secs(1),
            safety_interval: Duration::from_secs(10),
            passive_checkpoint_frames: 1000,
            restart_frames: 2000,
            wal_size_limit: replica::DEFAULT_WAL_SIZE_LIMIT,
            staging_limit: replica::DEFAULT_STAGING_LIMIT,
            retention: retention::DEFAULT_RETENTION,
            removal_timeout: Duration::from_secs(30),
        }
    }
}

/// A database is pruned at most this often (or once per retention, if that is shorter):
/// after each snapshot stored, since a snapshot is what lets older objects go.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
