//! Continuity: where reading the WAL resumes after the tip, or why it cannot (see
//! "Continuity across restarts" in the [`crate::replica`] docs); the proof recorded before
//! a stop that lets the next start go on whatever the application did with the WAL; and
//! the new generation that starts when continuity is lost.

use super::pin::Pin;
use super::position::{hostname, Position, Proof};
use super::Replica;
use crate::database::Checkpoint;
use crate::error::{Error, Result};
use crate::files::FileIdentity;
use crate::layout::{ChainValue, Generation};
use crate::wal::{WalPosition, WalReader, HEADER_SIZE};

/// Where reading the WAL resumes, after checking that nothing was lost.
pub(super) enum Continuity {
    From(WalPosition),
    /// There is no WAL (or it has no valid header) and nothing was lost.
    NoWal,
    Lost(String),
}

impl Replica {
    /// Prepare for a stop: copy every staged frame into the database file and record its
    /// digest (the proof, see this module's docs), so that a restart can prove that nothing
    /// was committed while walsync was stopped, whatever the application does with the WAL
    /// meanwhile. Call before stopping, after the last [`Replica::poll`]. Without a complete
    /// checkpoint (a reader holds old frames) there is no proof, and the next start relies
    /// on the WAL alone.
    pub(crate) fn settle(&mut self) -> Result<()> {
        self.prepare()?;
        if self.tip.is_none() {
            // No generation yet (its snapshot failed so far): try once more, so that a stop
            // never reports success with nothing stored.
            self.poll()?;
        }
        if self.checkpoint()? == Checkpoint::Complete {
            self.prove()?;
        }
        Ok(())
    }

    /// Right after a complete checkpoint: the database file holds exactly the state at the
    /// tip, and the pin, taken after the copy, reads the file alone (read mark 0), which
    /// stops every checkpoint from copying later frames into it while it is read. Record
    /// its digest.
    pub(super) fn prove(&mut self) -> Result<()> {
        let sha256 = self
            .pin
            .content_digest()
            .map_err(|e| e.with_context(self.name.clone()))?;
        if !FileIdentity::of(self.pin.path())?.same_file(&self.opened) {
            return Ok(()); // replaced meanwhile: what was read proves nothing
        }
        if let Some(tip) = self.tip.as_mut() {
            tip.proof = Some(Proof {
                index: tip.index,
                sha256,
            });
            self.tip_changed = true;
        }
        self.persist()
    }

    /// Where reading the WAL resumes after the tip, or why continuity is lost.
    pub(super) fn continuity(
        &mut self,
        tip: &Position,
        reader: Option<&WalReader>,
        identity: &FileIdentity,
    ) -> Result<Continuity> {
        if !identity.same_file(&tip.db) {
            return Ok(Continuity::Lost("the database file was replaced".into()));
        }
        // Nothing that was committed can have left the WAL unread: the pin guards, or the
        // database file still holds exactly the state at the tip (checked by content, and
        // only when needed: it reads the whole file).
        let guarded = self.pin_state == Pin::Guarding;
        let header = reader.map(|r| *r.header());
        let same_wal = match (header, tip.wal) {
            (Some(header), Some(mark)) if header.salt == mark.salt => Some(mark),
            _ => None,
        };
        let proven = !guarded && same_wal.is_none() && self.proves_unchanged(tip)?;
        if proven {
            self.pin_state = Pin::Guarding;
        }
        let Some(reader) = reader else {
            if !(guarded || proven) {
                return Ok(Continuity::Lost(
                    "the WAL was checkpointed away while walsync was not holding it, and the \
                     database file no longer holds what was last replicated"
                        .into(),
                ));
            }
            // The pin, taken before this check, guards from now on.
            self.pin_state = Pin::Guarding;
            return Ok(Continuity::NoWal);
        };
        let header = *reader.header();
        if header.page_size != tip.page_size {
            return Ok(Continuity::Lost(format!(
                "page size changed from {} to {}",
                tip.page_size, header.page_size
            )));
        }
        let start = match same_wal {
            Some(mark) => {
                if !reader.still_holds(mark.end)? {
                    return Ok(Continuity::Lost(
                        "the WAL no longer holds the frames last read".into(),
                    ));
                }
                mark.end
            }
            // The WAL restarted (or appeared) since the tip: every frame in it is newer.
            None if guarded || proven => WalPosition {
                offset: HEADER_SIZE,
                checksum: header.checksum,
            },
            None => {
                return Ok(Continuity::Lost(
                    "the WAL was checkpointed and restarted while walsync was not holding it, \
                     and the database file no longer holds what was last replicated"
                        .into(),
                ))
            }
        };
        Ok(Continuity::From(start))
    }

    /// Whether the database file still holds exactly the state at the tip: its digest is
    /// the tip's proof.
    pub(super) fn proves_unchanged(&self, tip: &Position) -> Result<bool> {
        let Some(proof) = tip.proof.as_ref().filter(|p| p.index == tip.index) else {
            return Ok(false);
        };
        let sha256 = self
            .pin
            .content_digest()
            .map_err(|e| e.with_context(self.name.clone()))?;
        let same = sha256 == proof.sha256;
        log::debug!(
            "{}: the database file {} the state last replicated",
            self.name,
            if same {
                "still holds"
            } else {
                "no longer holds"
            }
        );
        Ok(same)
    }

    /// Start a new generation because of `reason`: under the barrier, note where the
    /// committed WAL ends and move the pin there; then snapshot through the pin.
    pub(super) fn new_generation(&mut self, reason: &str) -> Result<String> {
        if self.tip.is_some() {
            log::warn!("{}: starting a new generation: {reason}", self.name);
        } else {
            log::info!("{}: starting the first generation", self.name);
        }
        let mut marked = None;
        for _ in 0..3 {
            self.follow_replacement()?;
            let known = self.committed_end()?;
            marked = self.under_barrier(|r| {
                let identity = FileIdentity::of(r.pin.path())?;
                if !identity.same_file(&r.opened) {
                    return Ok(None); // replaced just now: follow it, then try again
                }
                let end = r.committed_end_after(known)?;
                r.repin()?;
                // Guarding only once the new generation's base is in place (below): until
                // then the tip is the old one, whose continuity is lost.
                r.pin_state = Pin::Behind(None);
                Ok(Some((end, identity)))
            })?;
            if marked.is_some() {
                break;
            }
        }
        let (end, identity) = marked.ok_or_else(|| {
            Error::invalid(format!(
                "{}: {} keeps being replaced",
                self.name,
                self.pin.path().display()
            ))
        })?;
        let previous = self.tip.as_ref();
        let newest = previous
            .map(|t| t.generation.clone())
            .max(self.newest_stored.clone());
        let generation = Generation::after(newest.as_ref());
        let base = Position {
            destination: self.storage.describe(),
            name: self.name.clone(),
            generation: generation.clone(),
            index: 0,
            page_size: self.pin.page_size()?,
            chain: ChainValue::of_generation(&generation),
            time_ms: previous.map_or(0, |t| t.time_ms),
            seq: self.next_seq() - 1,
            wal: end,
            db: identity,
            path: Some(self.absolute_path()),
            host: Some(hostname()),
            proof: None,
            leftovers: previous.map_or_else(|| self.leftovers.clone(), |t| t.leftovers.clone()),
        };
        self.backfilled = None;
        let key = self.stage_snapshot(base)?;
        // The pin was moved under the barrier to exactly where the new base is.
        self.pin_state = Pin::Guarding;
        self.lost = None;
        Ok(key)
    }
}
