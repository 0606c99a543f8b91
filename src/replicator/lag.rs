//! A database's lag: how long its oldest commit not yet stored has waited, which the
//! metrics serve and the heartbeat bounds. Counted here, by the database's thread, from
//! what it has read, staged and seen stored.

use std::collections::VecDeque;

use crate::replica::Replica;

/// Where a database's lag counts from: the oldest commit not yet stored, whatever holds it
/// back (storage down or slow, the sidecar's disk full or read-only, the staging limit).
///
/// Commits are noticed when the WAL changes (a file event), read into a staged object by a
/// later step, and stored when that object's upload succeeds. So the tracker keeps when the
/// first change not yet read was noticed, and for each staged object the time of the first
/// change it holds. A step that fails to read keeps the unread time, so a sidecar that
/// cannot be written shows as growing lag instead of 0.
pub(super) struct LagTracker {
    /// Unix milliseconds of the first change not yet read into a staged object.
    unread: Option<u64>,
    /// Staged objects in upload order: key, and the time of the first change each holds
    /// (None: it holds no commit that was waiting, such as a snapshot of a quiet database).
    staged: VecDeque<(String, Option<u64>)>,
}

impl LagTracker {
    /// At start nothing is known to be stored until the first read.
    pub(super) fn started() -> LagTracker {
        LagTracker {
            unread: Some(unix_millis()),
            staged: VecDeque::new(),
        }
    }

    /// The WAL or database file changed: a commit may wait to be read.
    pub(super) fn changed(&mut self) {
        self.unread.get_or_insert_with(unix_millis);
    }

    /// The object `key` was stored; uploads go in order, so those before it were too.
    pub(super) fn stored(&mut self, key: &str) {
        if let Some(at) = self.staged.iter().position(|(k, _)| k == key) {
            self.staged.drain(..=at);
        }
    }

    /// After a step: a newly staged object takes the unread changes with it; with
    /// `all_read` (a read ran and did not fail) and nothing staged, nothing waits at all.
    pub(super) fn after_step(&mut self, replica: &Replica, all_read: bool) {
        if replica.is_flushed() {
            self.staged.clear();
            if all_read {
                self.unread = None;
            }
            return;
        }
        if let Some(key) = replica.last_queued_key() {
            if self.staged.back().is_none_or(|(k, _)| *k != key) {
                let since = self.unread.take();
                self.staged.push_back((key, since));
            }
        }
    }

    /// Give back the list's buffer while nothing is staged (before the thread sleeps).
    pub(super) fn shrink(&mut self) {
        if self.staged.is_empty() {
            self.staged = VecDeque::new();
        }
    }

    /// Unix milliseconds of the oldest commit not yet stored, if any.
    pub(super) fn since(&self) -> Option<u64> {
        let staged = self.staged.iter().find_map(|(_, since)| *since);
        match (staged, self.unread) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
