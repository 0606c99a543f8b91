//! Uploads: staged objects handed out one at a time, in order, only up to the saved tip
//! and only once the tip is reconciled with storage; and `state.json`, which says what the
//! newest stored object is, for `list` and for people.
//!
//! `walsync watch` hands each object to its upload pool ([`crate::uploader`]) and reports
//! back with [`Replica::upload_done`]; one-shot use ([`Replica::sync`],
//! [`Replica::snapshot`]) uploads from the caller's thread with [`Replica::flush`].

use std::fs::File;

use super::Replica;
use crate::error::{Context, Error, Result};
use crate::layout::{self, Generation, ObjectKind, ReplicaState};
use crate::utc::UtcTime;

/// An upload for a worker: store `file` under `key`, then call [`Replica::upload_done`].
pub struct Upload {
    pub key: String,
    pub file: File,
}

impl Replica {
    /// The next object to upload, if none is out for upload now. Uploads go one at a time,
    /// in order, only up to the saved tip, and only once the tip is reconciled with
    /// storage; report each with [`Replica::upload_done`].
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
            key: front.object.key(&self.name),
            file,
        }))
    }

    /// An upload handed out by [`Replica::next_upload`] succeeded. Returns true when it was a
    /// snapshot, after which `state.json` is worth rewriting ([`Replica::state_object`]); the
    /// caller does that, so that a hundred databases do not all write at once.
    pub fn upload_done(&mut self, key: &str) -> Result<bool> {
        let front = match self.staged.front() {
            Some(s) if self.uploading && s.object.key(&self.name) == key => s.clone(),
            _ => {
                return Err(Error::new(
                    crate::ErrorKind::Other,
                    format!("{}: upload of {key} finished out of order", self.name),
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
    pub fn upload_returned(&mut self, _upload: Upload) {
        self.uploading = false;
    }

    /// Upload everything staged, in order, from this thread (after reconciling with
    /// storage, if that is still to do: then a new generation may start first).
    pub fn flush(&mut self) -> Result<()> {
        if !self.reconciled {
            self.reconcile()?;
            if self.lost.is_some() {
                self.poll()?;
            }
        }
        while let Some(upload) = self.next_upload()? {
            let stored = self
                .storage
                .put_file(&upload.key, &upload.file)
                .context(|| format!("{}: uploading {}", self.name, upload.key));
            let key = upload.key.clone();
            if let Err(e) = stored {
                self.upload_returned(upload);
                return Err(e);
            }
            log::info!("{}: stored {key}", self.name);
            if self.upload_done(&key)? {
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
    pub fn take_opening_listing(
        &mut self,
    ) -> Option<std::collections::BTreeMap<Generation, layout::GenerationObjects>> {
        self.opening_listing.take()
    }

    /// Write `state.json` for `list` and for people; restores never need it.
    pub fn write_state(&self) -> Result<()> {
        let Some((key, body)) = self.state_object()? else {
            return Ok(());
        };
        self.storage
            .put_bytes(&key, &body)
            .context(|| format!("writing {key}"))
    }

    /// The key and content of `state.json` as of the newest stored object (None before any).
    pub fn state_object(&self) -> Result<Option<(String, Vec<u8>)>> {
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
        Ok(Some((layout::state_key(&self.name), body)))
    }
}
