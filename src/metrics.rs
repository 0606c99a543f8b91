//! Replication metrics: a few atomics per database, updated by its thread and the upload
//! workers, and rendered in the Prometheus text exposition format ([`render`]); the binary
//! serves that on `walsync watch --metrics-addr`, an embedding application wherever it likes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::database::Checkpoint;
use crate::layout::{ObjectKind, ObjectName};

/// What one database's replication has done, since walsync started.
#[derive(Debug, Default)]
pub struct DbMetrics {
    name: String,
    /// Bytes and objects (segments and snapshots) stored.
    bytes_stored: AtomicU64,
    objects_stored: AtomicU64,
    /// Failed upload attempts, and those of them followed by another attempt.
    upload_errors: AtomicU64,
    upload_retries: AtomicU64,
    checkpoints_complete: AtomicU64,
    checkpoints_partial: AtomicU64,
    /// Staged objects not yet stored, and their bytes.
    staged_objects: AtomicU64,
    staged_bytes: AtomicU64,
    /// Unix time in milliseconds of the oldest commit not yet stored; 0 when every
    /// commit is.
    unstored_since_ms: AtomicU64,
    /// Time of the newest stored commit, unix milliseconds (0: none stored since start).
    newest_stored_ms: AtomicU64,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DbMetrics {
    pub fn new(name: &str) -> DbMetrics {
        DbMetrics {
            name: name.to_string(),
            ..DbMetrics::default()
        }
    }

    /// The replica name, the `db` label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An upload of `object`, `bytes` long, succeeded.
    pub(crate) fn stored(&self, object: &ObjectName, bytes: u64) {
        self.bytes_stored.fetch_add(bytes, Ordering::Relaxed);
        self.objects_stored.fetch_add(1, Ordering::Relaxed);
        let millis = object.time.millis().max(0) as u64;
        // Like `walsync status`: the newest segment's time, a snapshot's only until a
        // segment is stored (a later snapshot holds no later commit).
        if object.kind == ObjectKind::Segment {
            self.newest_stored_ms.fetch_max(millis, Ordering::Relaxed);
        } else {
            let _ = self.newest_stored_ms.compare_exchange(
                0,
                millis,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// An upload attempt failed; `retrying` if another attempt follows.
    pub(crate) fn upload_failed(&self, retrying: bool) {
        self.upload_errors.fetch_add(1, Ordering::Relaxed);
        if retrying {
            self.upload_retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A checkpoint ran (skipped ones are not counted).
    pub(crate) fn checkpointed(&self, result: Checkpoint) {
        match result {
            Checkpoint::Complete => self.checkpoints_complete.fetch_add(1, Ordering::Relaxed),
            Checkpoint::Partial => self.checkpoints_partial.fetch_add(1, Ordering::Relaxed),
            Checkpoint::Skipped => 0,
        };
    }

    /// What is staged in the sidecar and not yet stored.
    pub(crate) fn staged(&self, objects: usize, bytes: u64) {
        self.staged_objects.store(objects as u64, Ordering::Relaxed);
        self.staged_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The unix time in milliseconds of the oldest commit not yet stored, or None when
    /// every commit is stored. The database thread works it out (see
    /// `replicator::lag::LagTracker`) from what it has read, staged and seen stored, so that
    /// lag counts whatever holds a commit back: storage, the sidecar's disk, a pinned WAL.
    pub(crate) fn set_unstored_since(&self, since_ms: Option<u64>) {
        // 0 means "nothing unstored"; a real time is never 0.
        let value = since_ms.map_or(0, |ms| ms.max(1));
        self.unstored_since_ms.store(value, Ordering::Relaxed);
    }

    /// Seconds since the oldest commit not yet stored; 0 when caught up.
    pub fn lag_seconds(&self) -> f64 {
        match self.unstored_since_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            since => unix_millis().saturating_sub(since) as f64 / 1000.0,
        }
    }
}

/// A sample's extra label (name, value), if any, and its value.
type Sample = (Option<(&'static str, &'static str)>, f64);

/// One metric family: name, type, help, and how to read it from a database's metrics.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    values: fn(&DbMetrics) -> Vec<Sample>,
}

fn load(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

const FAMILIES: &[Family] = &[
    Family {
        name: "walsync_replication_lag_seconds",
        kind: "gauge",
        help: "Seconds since the oldest commit not yet stored (0 when caught up).",
        values: |m| vec![(None, m.lag_seconds())],
    },
    Family {
        name: "walsync_last_stored_commit_timestamp_seconds",
        kind: "gauge",
        help: "Unix time of the newest stored commit (0 until one is stored after start).",
        values: |m| vec![(None, load(&m.newest_stored_ms) / 1000.0)],
    },
    Family {
        name: "walsync_stored_bytes_total",
        kind: "counter",
        help: "Bytes of segments and snapshots stored.",
        values: |m| vec![(None, load(&m.bytes_stored))],
    },
    Family {
        name: "walsync_stored_objects_total",
        kind: "counter",
        help: "Segments and snapshots stored.",
        values: |m| vec![(None, load(&m.objects_stored))],
    },
    Family {
        name: "walsync_upload_errors_total",
        kind: "counter",
        help: "Failed upload attempts.",
        values: |m| vec![(None, load(&m.upload_errors))],
    },
    Family {
        name: "walsync_upload_retries_total",
        kind: "counter",
        help: "Failed upload attempts that were tried again.",
        values: |m| vec![(None, load(&m.upload_retries))],
    },
    Family {
        name: "walsync_checkpoints_total",
        kind: "counter",
        help: "Checkpoints run by walsync, by result (complete: the WAL can restart).",
        values: |m| {
            vec![
                (Some(("result", "complete")), load(&m.checkpoints_complete)),
                (Some(("result", "partial")), load(&m.checkpoints_partial)),
            ]
        },
    },
    Family {
        name: "walsync_staged_bytes",
        kind: "gauge",
        help: "Bytes staged on local disk and not yet stored.",
        values: |m| vec![(None, load(&m.staged_bytes))],
    },
    Family {
        name: "walsync_staged_objects",
        kind: "gauge",
        help: "Objects staged on local disk and not yet stored.",
        values: |m| vec![(None, load(&m.staged_objects))],
    },
];

/// A label value with `\`, `"` and newlines escaped as the text format wants.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `databases`.
pub fn render(databases: &[Arc<DbMetrics>]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for family in FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for db in databases {
            for (label, value) in (family.values)(db) {
                let extra = label.map_or(String::new(), |(k, v)| format!(",{k}=\"{v}\""));
                let _ = writeln!(
                    out,
                    "{}{{db=\"{}\"{extra}}} {value}",
                    family.name,
                    escape(db.name())
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_time_the_database_thread_gives() {
        let m = DbMetrics::new("a\"b");
        assert_eq!(m.lag_seconds(), 0.0);
        m.set_unstored_since(Some(unix_millis() - 3_000));
        let lag = m.lag_seconds();
        assert!((3.0..4.0).contains(&lag), "{lag}");
        m.staged(1, 100);
        m.upload_failed(true);
        let (_, object) =
            ObjectName::parse_key("a/wal/0000018f00000000-0000000001-20260101T000000.000Z.wal.gz")
                .unwrap();
        m.stored(&object, 10);
        m.set_unstored_since(None);
        assert_eq!(m.lag_seconds(), 0.0);
        assert_eq!(
            m.newest_stored_ms.load(Ordering::Relaxed),
            1_767_225_600_000
        );
        assert!(render(&[Arc::new(m)]).contains("{db=\"a\\\"b\"}"));
    }
}
