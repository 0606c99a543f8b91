//! The tip as saved in the sidecar (`position.json`), and whose it is.
//!
//! A position counts the objects staged for one database file: a copy of the database and
//! its sidecar (`cp -a`, another host's volume) carries a position that belongs to the
//! original, and continuing it would cut the original's indexes again differently. So a
//! position records the file's path, identity and host, and a position saved for another
//! file is dropped with what it staged (see [`Position::is_foreign`]). Whether the *name*
//! in storage belongs to this database is the other half of ownership, judged against its
//! `state.json` when the replica is reconciled with storage (`reconcile.rs`).

use std::path::Path;

use super::Replica;
use crate::files::FileIdentity;
use crate::layout::{ChainValue, Generation};
use crate::wal::{WalHeader, WalPosition};

/// How far the WAL has been read into staged objects: saved in the sidecar, and written
/// before anything it covers is uploaded. Its fields are listed in `docs/FORMAT.md` ("The
/// sidecar", `position.json`): change them there too.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Position {
    pub(super) destination: String,
    pub(super) name: String,
    pub(super) generation: Generation,
    /// Last segment in this generation (0: only the base snapshot).
    pub(super) index: u64,
    pub(super) page_size: u32,
    /// Chain value after `index` (see [`crate::segment`]).
    pub(super) chain: ChainValue,
    /// Time of the newest object, in milliseconds (a label: see [`Replica::next_time`]).
    pub(super) time_ms: i64,
    /// Staging sequence number of the newest object this position counts.
    pub(super) seq: u64,
    /// The WAL just after the last commit read; `None` when the WAL had no valid header.
    pub(super) wal: Option<WalMark>,
    /// The database file as of the last read (dev and inode tell a replacement or a copy).
    pub(super) db: FileIdentity,
    /// The database's absolute path: a position found beside another path was copied there
    /// (None in positions saved before walsync recorded it).
    #[serde(default)]
    pub(super) path: Option<String>,
    /// The host name when the position was saved: with another inode at the same path, a
    /// position of this host is a database replaced by rename (a new generation), one of
    /// another host a copy (see [`Position::is_foreign`]).
    #[serde(default)]
    pub(super) host: Option<String>,
    /// The database file's content when it alone held the state at this position, if
    /// known (see [`Replica::settle`]).
    #[serde(default)]
    pub(super) proof: Option<Proof>,
    /// Staging numbers of uncounted files that could not be removed yet: never uploaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) leftovers: Vec<u64>,
}

impl Position {
    /// Whether this position was saved for another database file than `opened` at `path`:
    /// a copy of the database and its sidecar (`cp -a`, another host's volume), whose
    /// position and staged objects belong to the original. A file renamed over the same
    /// path on this host is not foreign: its position's objects are the old file's last
    /// commits, uploaded before the new file starts a new generation.
    pub(super) fn is_foreign(&self, opened: &FileIdentity, path: &str) -> bool {
        let moved = self.path.as_deref().is_some_and(|p| p != path);
        let other_host = self.host.as_deref().is_some_and(|h| h != hostname());
        moved || (!self.db.same_file(opened) && other_host)
    }
}

/// The digest of a database file that held exactly the state at segment `index` of the
/// position's generation: every frame up to there checkpointed into it, nothing after.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Proof {
    pub(super) index: u64,
    pub(super) sha256: String,
}

/// A place in one particular WAL (identified by its salts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct WalMark {
    pub(super) salt: [u32; 2],
    pub(super) end: WalPosition,
}

impl Replica {
    /// `host:/absolute/path` of this database, as recorded in `state.json`.
    pub(super) fn source(&self) -> String {
        format!("{}:{}", hostname(), self.absolute_path())
    }

    /// The database's absolute path, as recorded in the position and in `state.json`.
    pub(super) fn absolute_path(&self) -> String {
        absolute_path(self.pin.path())
    }
}

pub(super) fn mark(header: &WalHeader, end: WalPosition) -> WalMark {
    WalMark {
        salt: header.salt,
        end,
    }
}

/// `path` made absolute (as it is, if that fails), as text.
pub(super) fn absolute_path(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.into())
        .display()
        .to_string()
}

/// This machine's host name, or "localhost" if it cannot be read.
pub(super) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `position.json` keeps the shape `docs/FORMAT.md` gives it: the generation as its id,
    /// the chain as two numbers. One with a malformed generation id is unreadable (and so
    /// ignored by the sidecar: a new generation starts).
    #[test]
    fn a_position_is_saved_with_plain_ids() {
        let position = Position {
            destination: "file:///b".into(),
            name: "app".into(),
            generation: Generation::parse("0123456789abcdef").unwrap(),
            index: 3,
            page_size: 4096,
            chain: ChainValue([1, 2]),
            time_ms: 0,
            seq: 4,
            wal: None,
            db: FileIdentity {
                dev: 1,
                ino: 10,
                size: 4096,
                mtime_ns: 0,
            },
            path: None,
            host: None,
            proof: None,
            leftovers: Vec::new(),
        };
        let mut saved = serde_json::to_value(&position).unwrap();
        assert_eq!(saved["generation"], serde_json::json!("0123456789abcdef"));
        assert_eq!(saved["chain"], serde_json::json!([1, 2]));
        let back: Position = serde_json::from_value(saved.clone()).unwrap();
        assert_eq!(back, position);
        saved["generation"] = serde_json::json!("not-a-generation");
        assert!(serde_json::from_value::<Position>(saved).is_err());
    }

    /// Whose position it is: a copy elsewhere (another path) is foreign; another inode at
    /// the same path is foreign only when another host saved the position (a copy put in
    /// place there), not on this host (a file renamed over the database: a replacement,
    /// whose old staged objects are still uploaded); the same file under a new host name
    /// (a container restarted) is ours; positions saved before walsync recorded the path
    /// and host are judged by nothing they lack.
    #[test]
    fn a_position_belongs_to_its_path_and_file_not_to_a_copy() {
        let file = FileIdentity {
            dev: 1,
            ino: 10,
            size: 4096,
            mtime_ns: 0,
        };
        let other_inode = FileIdentity { ino: 11, ..file };
        let position = |path: Option<&str>, host: Option<&str>| Position {
            destination: "file:///b".into(),
            name: "app".into(),
            generation: Generation::parse("0123456789abcdef").unwrap(),
            index: 3,
            page_size: 4096,
            chain: ChainValue([1, 2]),
            time_ms: 0,
            seq: 4,
            wal: None,
            db: file,
            path: path.map(str::to_string),
            host: host.map(str::to_string),
            proof: None,
            leftovers: Vec::new(),
        };
        let here = hostname();
        let ours = position(Some("/data/app.db"), Some(&here));
        assert!(!ours.is_foreign(&file, "/data/app.db"));
        assert!(ours.is_foreign(&file, "/staging/app.db"));
        assert!(!ours.is_foreign(&other_inode, "/data/app.db"));
        let other_host = position(Some("/data/app.db"), Some("another-host"));
        assert!(other_host.is_foreign(&other_inode, "/data/app.db"));
        assert!(!other_host.is_foreign(&file, "/data/app.db"));
        let old = position(None, None);
        assert!(!old.is_foreign(&other_inode, "/anywhere/app.db"));
    }
}
