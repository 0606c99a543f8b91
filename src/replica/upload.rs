//! Uploads: staged objects handed out one at a time, in order, only up to the saved tip
//! and only once the tip is reconciled with storage; and `state.json`, which says what the
//! newest stored object is, for `list` and for people.
//!
//! There are two ways to upload, with one step in common ([`uploader::store`]):
//! `walsync watch` hands each object to its upload pool ([`crate::uploader`]), which
//! retries until it is stored, and reports back with [`Replica::upload_done`]; one-shot
//! use ([`Replica::sync`], [`Replica::snapshot`]) uploads from the caller's thread with
//! [`Replica::flush`], which tries each object once and returns the error. Both write
//! `state.json` through [`StateObject::write`].

use std::fs::File;

use super::Replica;
use crate::error::{Context, Error, Result};
use crate::layout::{self, Generation, ObjectKind, ObjectName, ReplicaState};
use crate::storage::Storage;
use crate::uploader::{self, Attempts, Upload};
use crate::utc::UtcTime;

/// `state.json` as of the newest stored object, ready to write (see
/// [`Replica::state_object`]).
pub struct StateObject {
    key: String,
    body: Vec<u8>,
}

impl StateObject {
    /// Write it: the one writer of `state.json`, from the uploading thread in one-shot use
    /// ([`Replica::write_state`]) and on an upload worker in `walsync watch` (so that many
    /// databases stopping or snapshotting at once make at most `upload_workers` requests at
    /// a time). Callers take a failure as a warning: only `list` reads `state.json`, and
    /// the objects themselves are stored.
    pub fn write(&self, storage: &dyn Storage) -> Result<()> {
        storage
            .put_bytes(&self.key, &self.body)
            .context(|| format!("writing {}", self.key))
    }
}

impl Replica {
    /// The next object to upload, if none is out for upload now. Uploads go one at a time,
    /// in order, only up to the saved tip, and only once the tip is reconciled with
    /// storage; report each with [`Replica::upload_done`].
    #[doc(hidden)] // for tests that stage without uploading (not API)
    pub fn next_upload(&mut self) -> Result<Option<Upload>> {
        if self.uploading || !self.reconciled {
            return Ok(None);
        }
        let Some(front) = self.staged.front() else {
            return Ok(None);
        };
        if front.seq > self.saved_seq {
            return Ok(None);
        }
        let file = File::open(&front.path)
            .context(|| format!("{}: opening staged {}", self.name, front.path.display()))?;
        self.uploading = true;
        Ok(Some(Upload {
            object: front.object.clone(),
            key: front.object.key(&self.name),
            file,
        }))
    }

    /// The upload of `object` handed out by [`Replica::next_upload`] succeeded. Returns true
    /// when it was a snapshot, after which `state.json` is worth rewriting
    /// ([`Replica::state_object`]); the caller does that, so that a hundred databases do
    /// not all write at once.
    pub(crate) fn upload_done(&mut self, object: &ObjectName) -> Result<bool> {
        let front = match self.staged.front() {
            Some(s) if self.uploading && s.object == *object => s.clone(),
            _ => {
                return Err(Error::new(
                    crate::error::ErrorKind::Other,
                    format!(
                        "{}: upload of {} finished out of order",
                        self.name,
                        object.key(&self.name)
                    ),
                ))
            }
        };
        self.uploading = false;
        self.staged.pop_front();
        if let Err(e) = self.sidecar.remove(&front) {
            // Stored all the same; a later start uploads the same bytes again.
            log::warn!("{}: {e}", self.name);
        }
        let object = front.object;
        self.stored = Some((object.generation.clone(), object.index));
        Ok(object.kind == ObjectKind::Snapshot)
    }

    /// An upload handed out by [`Replica::next_upload`] could not be completed (walsync is
    /// stopping): a later call hands it out again.
    pub(crate) fn upload_returned(&mut self, _upload: Upload) {
        self.uploading = false;
    }

    /// Upload everything staged, in order, from this thread (after reconciling with
    /// storage, if that is still to do: then a new generation may start first). Each object
    /// is tried once ([`Attempts::Once`]): the first failure is returned, and the object
    /// stays staged for the next call.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.reconciled {
            self.reconcile()?;
            if self.lost.is_some() {
                self.poll()?;
            }
        }
        while let Some(upload) = self.next_upload()? {
            let stored = uploader::store(
                self.storage.as_ref(),
                &self.name,
                &upload,
                None,
                Attempts::Once,
            );
            if let Err(e) = stored {
                self.upload_returned(upload);
                return Err(e);
            }
            if self.upload_done(&upload.object)? {
                if let Err(e) = self.write_state() {
                    // Only `list` reads state.json; the snapshot itself is stored.
                    log::warn!("{}: {e}", self.name);
                }
            }
        }
        Ok(())
    }

    /// The listing of this name taken when the replica was opened (once; see
    /// [`crate::retention`] on why an older listing is safe to prune from).
    pub(crate) fn take_opening_listing(
        &mut self,
    ) -> Option<std::collections::BTreeMap<Generation, layout::GenerationObjects>> {
        self.opening_listing.take()
    }

    /// Write `state.json` for `list` and for people, from this thread; restores never need
    /// it.
    pub(crate) fn write_state(&self) -> Result<()> {
        match self.state_object()? {
            Some(state) => state.write(self.storage.as_ref()),
            None => Ok(()),
        }
    }

    /// `state.json` as of the newest stored object (None before any), to write with
    /// [`StateObject::write`].
    pub(crate) fn state_object(&self) -> Result<Option<StateObject>> {
        let (Some((generation, index)), Some(tip)) = (&self.stored, &self.tip) else {
            return Ok(None);
        };
        let state = ReplicaState {
            name: self.name.clone(),
            generation: generation.to_string(),
            index: *index,
            updated: UtcTime::now().to_rfc3339(),
            page_size: tip.page_size,
            source: self.source(),
            walsync_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let body = serde_json::to_vec_pretty(&state)?;
        Ok(Some(StateObject {
            key: layout::state_key(&self.name),
            body,
        }))
    }
}
