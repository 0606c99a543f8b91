//! One database replicated to one destination: generations, positions, segments, snapshots.
//!
//! A [`Replica`] remembers how far it has shipped the database's WAL: the generation, the
//! last segment index, and the exact place in the WAL (salts, byte offset and running
//! checksum of the last shipped commit). That position is kept in a small JSON file in a
//! sidecar directory beside the database (`.app.db-walsync/`), written only after the
//! object it describes is durably stored, so a restart resumes where the last upload ended.
//!
//! Continuity is checked every time before shipping: the WAL must still start with the same
//! salts and hold the very same frames up to the saved position. If anything else happened
//! (the WAL was checkpointed and restarted while walsync was not holding it, the database
//! file was replaced, its page size changed), the frames in between may be gone, so the only
//! safe move is a new generation that starts with a full snapshot. The log says why.
//!
//! The sidecar also holds a lock file, so two walsync processes cannot replicate the same
//! database to the same destination at once and interleave their segments.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::database::{Database, FileIdentity};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::layout::{self, Generation, ObjectKind, ObjectName, ReplicaState};
use crate::segment;
use crate::snapshot;
use crate::storage::Storage;
use crate::utc::UtcTime;
use crate::wal::{WalHeader, WalPosition, WalReader, HEADER_SIZE};

/// A limit that ships nothing: the WAL had no header when the barrier was taken.
const NOTHING: WalPosition = WalPosition {
    offset: HEADER_SIZE,
    checksum: [0, 0],
};

/// How far a replica has shipped, saved in the sidecar after every durable upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Position {
    destination: String,
    name: String,
    generation: String,
    /// Last segment shipped in this generation (0: only the base snapshot).
    index: u64,
    page_size: u32,
    /// The WAL as of the last shipped commit; `None` when the WAL held no valid header then.
    wal: Option<WalMark>,
    /// The database file as of the last shipped commit.
    db: FileIdentity,
}

/// A place in one particular WAL (identified by its salts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct WalMark {
    salt: [u32; 2],
    end: WalPosition,
}

/// What one call to [`Replica::sync`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing new was committed since the last segment.
    Idle,
    /// A segment was stored.
    Shipped { key: String, frames: u64 },
    /// A snapshot starting a new generation was stored (first run, or continuity was lost).
    NewGeneration { key: String, reason: String },
}

/// The result of checking a saved position against the WAL on disk.
enum Continuity {
    /// Ship from this position of the current WAL.
    From(WalPosition),
    /// The WAL holds nothing after the saved position and has no header yet.
    Empty,
    /// The replica cannot continue its generation, for this reason.
    Lost(String),
}

/// One database replicated to one destination.
pub struct Replica {
    db: Database,
    storage: Arc<dyn Storage>,
    name: String,
    sidecar: PathBuf,
    position_path: PathBuf,
    position: Option<Position>,
    /// Held for the replica's lifetime: only one writer per database and destination.
    _lock: File,
}

impl Replica {
    /// Open `db_path` for replication to `storage` under `name`.
    pub fn open(db_path: &Path, storage: Arc<dyn Storage>, name: &str) -> Result<Replica> {
        layout::validate_name(name)?;
        let db = Database::open(db_path)?;
        let sidecar = sidecar_dir(db_path)?;
        std::fs::create_dir_all(&sidecar)
            .context(|| format!("creating walsync's directory {}", sidecar.display()))?;
        let destination = storage.describe();
        let stem = format!("{name}-{:016x}", fnv1a(&format!("{destination}\n{name}")));
        let lock_path = sidecar.join(format!("{stem}.lock"));
        let lock = File::create(&lock_path)
            .context(|| format!("creating lock file {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            return Err(Error::invalid(format!(
                "another walsync is already replicating {} to {destination} as {name:?}",
                db_path.display()
            )));
        }
        let position_path = sidecar.join(format!("{stem}.json"));
        let position = load_position(&position_path)?
            .filter(|p| p.destination == destination && p.name == name);
        Ok(Replica {
            db,
            storage,
            name: name.to_string(),
            sidecar,
            position_path,
            position,
            _lock: lock,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The current generation and last shipped segment index, if any.
    pub fn generation(&self) -> Option<(Generation, u64)> {
        let p = self.position.as_ref()?;
        Some((Generation::parse(&p.generation)?, p.index))
    }

    /// Ship every transaction committed since the last shipped one as one segment.
    ///
    /// Starts a new generation with a snapshot when there is none yet or continuity is lost.
    pub fn sync(&mut self) -> Result<SyncOutcome> {
        let Some(position) = self.position.clone() else {
            let key = self.snapshot_new_generation()?;
            return Ok(SyncOutcome::NewGeneration {
                key,
                reason: "no generation yet".into(),
            });
        };
        self.db.pin()?;
        let shipped = self.ship_pending(&position, None);
        self.db.release()?;
        match shipped? {
            Ok(outcome) => Ok(outcome),
            Err(reason) => {
                log::warn!(
                    "{}: starting a new generation: {reason}",
                    self.db.path().display()
                );
                let key = self.snapshot_new_generation()?;
                Ok(SyncOutcome::NewGeneration { key, reason })
            }
        }
    }

    /// Store a snapshot aligned to a segment boundary, returning its key.
    ///
    /// Commits not yet shipped are first shipped as a segment, so the snapshot is exactly
    /// the database at the end of the segment its index names. Starts a new generation when
    /// there is none or continuity is lost.
    pub fn snapshot(&mut self) -> Result<String> {
        let Some(position) = self.position.clone() else {
            return self.snapshot_new_generation();
        };
        // The barrier: no commit can slip in between the last segment and the snapshot.
        self.db.lock_writes()?;
        let marked = self.mark_committed_end().and_then(|mark| {
            let reader = self.db.reopen()?;
            reader.pin()?;
            Ok((mark, reader))
        });
        self.db.release()?;
        let (mark, pinned) = marked?;
        // The pinned reader sees exactly what was committed under the barrier, and the WAL
        // cannot be restarted while it is open; ship up to that point and no further.
        let limit = mark.map_or(NOTHING, |m| m.end);
        let result = match self.ship_pending(&position, Some(limit))? {
            Ok(_) => {
                let position = self.position.clone().unwrap_or(position);
                let generation = Generation::parse(&position.generation)
                    .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
                self.store_snapshot(&pinned, generation, position.index)
            }
            Err(reason) => {
                drop(pinned);
                log::warn!(
                    "{}: starting a new generation: {reason}",
                    self.db.path().display()
                );
                return self.snapshot_new_generation();
            }
        };
        pinned.release()?;
        result
    }

    /// Ship committed frames after `position`, up to `limit` if given, as one segment. The
    /// caller pins the WAL. The inner `Err` is a reason why continuity is lost.
    fn ship_pending(
        &mut self,
        position: &Position,
        limit: Option<WalPosition>,
    ) -> Result<Result<SyncOutcome, String>> {
        let wal = self.db.open_wal()?;
        let reader = match &wal {
            Some(file) => WalReader::open(file)?,
            None => None,
        };
        let (Some(file), Some(mut reader)) = (&wal, reader) else {
            return Ok(match self.check_without_wal(position)? {
                Continuity::Lost(reason) => Err(reason),
                _ => Ok(SyncOutcome::Idle),
            });
        };
        let start = match self.check_continuity(position, &reader)? {
            Continuity::From(start) => start,
            Continuity::Empty => return Ok(Ok(SyncOutcome::Idle)),
            Continuity::Lost(reason) => return Ok(Err(reason)),
        };
        reader.seek(start);
        let Some(mut end) = reader.find_last_commit()? else {
            return Ok(Ok(SyncOutcome::Idle));
        };
        if let Some(limit) = limit.filter(|l| l.offset < end.offset) {
            end = limit;
        }
        if end.offset <= start.offset {
            return Ok(Ok(SyncOutcome::Idle));
        }
        let header = *reader.header();
        let cut = segment::cut(file, &header, start, end, &self.sidecar)
            .context(|| format!("cutting a segment of {}", self.db.path().display()))?;
        let generation = Generation::parse(&position.generation)
            .ok_or_else(|| Error::corrupt("saved generation id is malformed"))?;
        let object = ObjectName {
            kind: ObjectKind::Segment,
            generation,
            index: position.index + 1,
            time: UtcTime::now(),
        };
        let key = object.key(&self.name);
        self.storage.put_file(&key, &cut.file).context(|| {
            format!(
                "uploading segment {} of {}",
                object.index,
                self.db.path().display()
            )
        })?;
        log::info!("{}: stored {key} ({} frames)", self.name, cut.frames);
        self.save_position(Position {
            index: object.index,
            wal: Some(WalMark {
                salt: header.salt,
                end,
            }),
            db: FileIdentity::of(self.db.path())?,
            ..position.clone()
        })?;
        Ok(Ok(SyncOutcome::Shipped {
            key,
            frames: cut.frames,
        }))
    }

    /// Is the WAL on disk still the one `position` describes, holding the same frames?
    fn check_continuity(&self, position: &Position, reader: &WalReader) -> Result<Continuity> {
        let identity = FileIdentity::of(self.db.path())?;
        if !identity.same_file(&position.db) {
            return Ok(Continuity::Lost("the database file was replaced".into()));
        }
        let header = *reader.header();
        if header.page_size != position.page_size {
            return Ok(Continuity::Lost(format!(
                "page size changed from {} to {}",
                position.page_size, header.page_size
            )));
        }
        let Some(mark) = position.wal else {
            // The WAL had no header when the position was taken: every frame in it now is
            // newer, provided nothing was checkpointed into the database file meanwhile.
            if identity != position.db {
                return Ok(Continuity::Lost(
                    "the database file changed while walsync was not watching".into(),
                ));
            }
            return Ok(Continuity::From(reader.position()));
        };
        if header.salt != mark.salt {
            return Ok(Continuity::Lost(
                "the WAL was checkpointed and restarted while walsync was not watching".into(),
            ));
        }
        if !reader.still_holds(mark.end)? {
            return Ok(Continuity::Lost(
                "the WAL no longer holds the frames last shipped".into(),
            ));
        }
        Ok(Continuity::From(mark.end))
    }

    /// Continuity when there is no WAL file or it has no valid header.
    fn check_without_wal(&self, position: &Position) -> Result<Continuity> {
        let identity = FileIdentity::of(self.db.path())?;
        if position.wal.is_none() && identity == position.db {
            Ok(Continuity::Empty)
        } else if !identity.same_file(&position.db) {
            Ok(Continuity::Lost("the database file was replaced".into()))
        } else {
            Ok(Continuity::Lost(
                "the WAL was checkpointed away while walsync was not watching".into(),
            ))
        }
    }

    /// Start a new generation: barrier, pin, snapshot at index 0.
    fn snapshot_new_generation(&mut self) -> Result<String> {
        self.db.lock_writes()?;
        let marked = self.mark_committed_end().and_then(|mark| {
            let reader = self.db.reopen()?;
            reader.pin()?;
            Ok((mark, reader, FileIdentity::of(self.db.path())?))
        });
        self.db.release()?;
        let (mark, pinned, identity) = marked?;
        let page_size = pinned.page_size()?;
        let generation = Generation::new();
        let previous = self.position.replace(Position {
            destination: self.storage.describe(),
            name: self.name.clone(),
            generation: generation.as_str().to_string(),
            index: 0,
            page_size,
            wal: mark,
            db: identity,
        });
        let result = self.store_snapshot(&pinned, generation, 0);
        pinned.release()?;
        if result.is_err() {
            self.position = previous;
        }
        result
    }

    /// Where the committed part of the WAL ends right now (call under the barrier).
    fn mark_committed_end(&self) -> Result<Option<WalMark>> {
        let Some(file) = self.db.open_wal()? else {
            return Ok(None);
        };
        let Some(mut reader) = WalReader::open(&file)? else {
            return Ok(None);
        };
        let end = reader.find_last_commit()?.unwrap_or(WalPosition {
            offset: HEADER_SIZE,
            checksum: reader.header().checksum,
        });
        let header: WalHeader = *reader.header();
        Ok(Some(WalMark {
            salt: header.salt,
            end,
        }))
    }

    /// Copy the pinned database and store it as the snapshot at `index` of `generation`,
    /// then save the position (already updated by the caller) and write `state.json`.
    fn store_snapshot(
        &mut self,
        pinned: &Database,
        generation: Generation,
        index: u64,
    ) -> Result<String> {
        let what = || format!("snapshot of {}", self.db.path().display());
        let snap = snapshot::take(pinned, &self.sidecar).context(what)?;
        let object = ObjectName {
            kind: ObjectKind::Snapshot,
            generation,
            index,
            time: UtcTime::now(),
        };
        let key = object.key(&self.name);
        self.storage
            .put_file(&key, &snap.file)
            .context(|| format!("uploading {}", what()))?;
        log::info!(
            "{}: stored {key} ({} bytes uncompressed)",
            self.name,
            snap.db_size
        );
        let position = self
            .position
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Other, "snapshot without a position"))?;
        self.save_position(position)?;
        self.write_state()?;
        Ok(key)
    }

    /// Write `state.json` for `list` and for people; restores never need it.
    pub fn write_state(&self) -> Result<()> {
        let Some(p) = &self.position else {
            return Ok(());
        };
        let state = ReplicaState {
            name: self.name.clone(),
            generation: p.generation.clone(),
            index: p.index,
            updated: UtcTime::now().to_rfc3339(),
            page_size: p.page_size,
            source: self.db.path().display().to_string(),
            walsync_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let body = serde_json::to_vec_pretty(&state)?;
        let key = layout::state_key(&self.name);
        self.storage
            .put_bytes(&key, &body)
            .context(|| format!("writing {key}"))
    }

    fn save_position(&mut self, position: Position) -> Result<()> {
        let tmp = self.position_path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&position)?;
        let what = || format!("saving position to {}", self.position_path.display());
        std::fs::write(&tmp, body).context(what)?;
        File::open(&tmp).and_then(|f| f.sync_all()).context(what)?;
        std::fs::rename(&tmp, &self.position_path).context(what)?;
        self.position = Some(position);
        Ok(())
    }
}

/// `.app.db-walsync/` beside `app.db`: positions, locks and spool files.
fn sidecar_dir(db_path: &Path) -> Result<PathBuf> {
    let file_name = db_path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} does not name a file", db_path.display())))?;
    let mut dir_name = std::ffi::OsString::from(".");
    dir_name.push(file_name);
    dir_name.push("-walsync");
    let parent = db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(dir_name))
}

fn load_position(path: &Path) -> Result<Option<Position>> {
    match std::fs::read(path) {
        Ok(body) => match serde_json::from_slice(&body) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                log::warn!(
                    "ignoring unreadable position file {} ({e}); a new generation will start",
                    path.display()
                );
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from(e).with_context(format!("reading {}", path.display()))),
    }
}

/// FNV-1a, 64 bits: a stable short name for a (destination, name) pair.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
