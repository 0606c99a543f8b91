//! Reconciling a replica's tip with what storage holds (see "Storage is the truth" in the
//! parent module's docs): one listing of the name decides whether the tip goes on, a new
//! generation starts, or the name belongs to another database.

use std::collections::{BTreeMap, BTreeSet};

use super::Replica;
use crate::error::{Context, Error, Result};
use crate::layout::{self, Generation, GenerationObjects, ObjectKind, ReplicaState};
use crate::sidecar::Staged;

impl Replica {
    /// Whether the tip has been checked against storage (see [`Replica::reconcile`]).
    pub(crate) fn is_reconciled(&self) -> bool {
        self.reconciled
    }

    /// Check the tip against what storage holds for this name (one LIST, and a GET of its
    /// `state.json` when ownership is in question), as the parent module's docs say: refuse
    /// a name another database writes, and start a new generation where storage contradicts
    /// the tip. Until this succeeds nothing is uploaded; a storage error leaves it to be tried
    /// again.
    pub(crate) fn reconcile(&mut self) -> Result<()> {
        let listing = self.list_own()?;
        self.reconcile_listed(listing)
    }

    /// Whether storage held a generation of this name when the replica was reconciled.
    pub(crate) fn had_history(&self) -> bool {
        self.newest_stored.is_some()
    }

    /// The LIST of [`Replica::reconcile`], for a caller that bounds how many run at once.
    pub(crate) fn list_own(&self) -> Result<Vec<crate::storage::ObjectInfo>> {
        self.storage
            .list(&format!("{}/", self.name))
            .context(|| format!("{}: listing {}", self.name, self.storage.describe()))
    }

    /// [`Replica::reconcile`] from the listing [`Replica::list_own`] took.
    pub(crate) fn reconcile_listed(
        &mut self,
        listing: Vec<crate::storage::ObjectInfo>,
    ) -> Result<()> {
        let mut catalog = layout::Catalog::from_listing(listing);
        let generations = catalog.databases.remove(&self.name).unwrap_or_default();
        let newest = generations.keys().next_back().cloned();
        self.newest_stored = self.newest_stored.clone().max(newest.clone());
        let verdict = self.judge(&generations, newest.as_ref())?;
        self.opening_listing = Some(generations);
        if let Some(reason) = verdict {
            self.abandon_tip(reason)?;
        }
        self.reconciled = true;
        Ok(())
    }

    /// What the listing of this name says about the tip: None to go on, or why a new
    /// generation must start. An error when another database writes the name.
    fn judge(
        &self,
        generations: &BTreeMap<Generation, GenerationObjects>,
        newest: Option<&Generation>,
    ) -> Result<Option<String>> {
        let Some((ours, index)) = self.generation() else {
            self.check_owner(newest)?;
            return Ok(None);
        };
        let here = generations.get(&ours);
        if let Some(newest) = newest.filter(|n| **n > ours) {
            self.check_owner(Some(newest)).map_err(|e| {
                e.with_context(format!(
                    "storage holds a newer generation {newest} than this database's {ours}"
                ))
            })?;
            return Ok(Some(format!(
                "storage holds generation {newest}, newer than this database's {ours}: the \
                 database and its sidecar were rolled back (a VM or filesystem snapshot \
                 restored?)"
            )));
        }
        if here.is_none() {
            // Not stored yet (begun before a stop, or while storage was unreachable), or
            // a destination that never held it: whoever wrote the name last must be us.
            self.check_owner(newest)?;
        }
        let objects = here.cloned().unwrap_or_default();
        if let Some(ahead) = objects
            .snapshots
            .iter()
            .chain(&objects.segments)
            .map(|o| o.name.index)
            .filter(|i| *i > index)
            .max()
        {
            return Ok(Some(format!(
                "storage holds index {ahead} of generation {ours}, past this database's \
                 position {index}: the database and its sidecar were rolled back (a VM or \
                 filesystem snapshot restored?)"
            )));
        }
        if !self.restorable(&ours, index, &objects) {
            return Ok(Some(format!(
                "{} lacks the snapshot or segments that generation {ours} builds on up to \
                 index {index} (a new endpoint, or a prefix emptied while walsync was stopped?)",
                self.storage.describe()
            )));
        }
        Ok(None)
    }

    /// Whether a restore of generation `generation` up to `index` could be done from what
    /// is stored (`stored`) and staged: a snapshot, and every segment after it.
    fn restorable(&self, generation: &Generation, index: u64, stored: &GenerationObjects) -> bool {
        let staged = self
            .staged
            .iter()
            .filter(|s| s.object.generation == *generation)
            .map(|s| (s.object.kind, s.object.index));
        let stored_names = stored
            .snapshots
            .iter()
            .chain(&stored.segments)
            .map(|o| (o.name.kind, o.name.index));
        let have: BTreeSet<(ObjectKind, u64)> = staged.chain(stored_names).collect();
        let Some(base) = have
            .iter()
            .filter(|(kind, i)| *kind == ObjectKind::Snapshot && *i <= index)
            .map(|(_, i)| *i)
            .max()
        else {
            return false;
        };
        (base + 1..=index).all(|i| have.contains(&(ObjectKind::Segment, i)))
    }

    /// Refuse the name when its `state.json` says another database writes it (unless this
    /// database was restored from it, which hands the name over). `newest` is the newest
    /// generation stored: with none there is nobody to refuse.
    fn check_owner(&self, newest: Option<&Generation>) -> Result<()> {
        if newest.is_none() {
            return Ok(());
        }
        let mut body = Vec::new();
        match self.storage.get(&layout::state_key(&self.name), &mut body) {
            Ok(_) => {}
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.with_context(format!("{}: reading state.json", self.name))),
        }
        let state: ReplicaState = match serde_json::from_slice(&body) {
            Ok(state) => state,
            Err(_) => return Ok(()),
        };
        if state.source == self.source() {
            return Ok(());
        }
        // Restored here from this replica while `state.generation` was still its newest
        // (a container restarted with a new host name, a database moved to a new host):
        // the name is handed over. A newer generation means another walsync wrote since.
        if let Some(restored) = self.sidecar.restored_from(&self.opened) {
            if state.generation.as_str() <= restored.as_str() {
                log::info!(
                    "{:?}: taking the name over from {} (this database was restored from it)",
                    self.name,
                    state.source
                );
                return Ok(());
            }
        }
        Err(Error::invalid(format!(
            "{:?} in {} holds backups of {}, not {}: another walsync writes that name; give \
             this database another name with PATH:NAME, or remove {}/state.json to take the \
             name over",
            self.name,
            self.storage.describe(),
            state.source,
            self.source(),
            self.name
        )))
    }

    /// The tip cannot be continued (see [`Replica::judge`]): drop whatever it staged (never
    /// uploaded: it continues the wrong history, or one storage cannot restore) and make
    /// the next cut start a new generation, snapshotted from the database, which holds
    /// every commit those objects held.
    fn abandon_tip(&mut self, reason: String) -> Result<()> {
        let dropped: Vec<Staged> = self.staged.drain(..).collect();
        if !dropped.is_empty() {
            log::info!(
                "{}: dropping {} staged object(s) of a history storage does not continue",
                self.name,
                dropped.len()
            );
        }
        for object in &dropped {
            log::debug!("{}: dropping staged {}", self.name, object.path.display());
            if let Err(e) = self.sidecar.remove(object) {
                // Never uploaded: its number is kept among the leftovers.
                log::warn!("{}: {e}; it is left alone and never uploaded", self.name);
                self.leftovers.push(object.seq);
                if let Some(tip) = self.tip.as_mut() {
                    tip.leftovers.push(object.seq);
                    self.tip_changed = true;
                }
            }
        }
        self.unsynced.clear();
        self.lost = Some(reason);
        self.persist()
    }
}
