//! Large files go up as multipart uploads, and what a crash leaves of one is cleaned up.
//!
//! A file larger than one part ([`MULTIPART_THRESHOLD`] unless
//! [`S3Storage::with_part_size`] says otherwise) is sent as CreateMultipartUpload, one
//! UploadPart per range of the file (read straight from it, each with its `Content-MD5`, each
//! retried on its own), then CompleteMultipartUpload with the parts' ETags. An upload that
//! fails is aborted, best effort: S3 keeps (and bills) the parts of an upload that is neither
//! completed nor aborted.
//!
//! A crash cannot abort anything, so [`S3Storage::abort_stale_uploads`] lists the incomplete
//! uploads under a prefix and aborts those started more than [`STALE_UPLOAD_AGE`] ago; the
//! uploads this process is still sending are noted in `uploads_in_flight` and never taken
//! for stale, whatever their age.

use std::fs::File;
use std::time::Duration;

use super::documents::{complete_multipart_body, parse_uploads_page};
use super::request::{drain, Method, Payload, Req};
use super::{bump, S3Storage};
use crate::error::{ErrorKind, Result};
use crate::storage::{xml, Storage as _};
use crate::utc::UtcTime;

/// Files larger than this are uploaded in parts (unless [`S3Storage::with_part_size`] says
/// otherwise); it is also the default part size.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;

/// The smallest part S3 accepts, except for the last part of an upload.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// S3 allows at most this many parts in one upload; bigger files get bigger parts.
const MAX_PARTS: u64 = 10_000;

/// Incomplete multipart uploads older than this, under a replica's prefix, are left over
/// from a crash and are aborted ([`S3Storage::abort_stale_uploads`]): no upload of walsync's
/// takes that long, and one this process is still sending is never aborted.
pub const STALE_UPLOAD_AGE: Duration = Duration::from_secs(24 * 60 * 60);

impl S3Storage {
    pub(super) fn put_multipart(
        &self,
        key: &str,
        object: &str,
        file: &File,
        len: u64,
    ) -> Result<()> {
        let part_size = self.part_size.max(len.div_ceil(MAX_PARTS));
        let parts = len.div_ceil(part_size);
        let op = "CreateMultipartUpload";
        let create = Req {
            op,
            key,
            method: Method::Post,
            object: Some(object),
            query: &[("uploads", "")],
            headers: &[],
            payload: Payload::Empty,
        };
        let upload_id = self.retry(|| {
            let response = self.exchange(&create)?;
            let body = self.read_text(op, key, response)?;
            xml::expect_root(&body, "InitiateMultipartUploadResult")
                .and_then(|content| xml::required(content, "UploadId"))
                .map_err(|e| self.error(ErrorKind::Other, op, key, format!("bad response: {e}")))
        })?;
        log::debug!("{op} {key}: {parts} parts of {part_size} bytes, upload id {upload_id}");
        self.in_flight(&upload_id, true);

        let uploaded = (|| {
            let mut etags = Vec::with_capacity(parts as usize);
            for index in 0..parts {
                let number = index + 1;
                let offset = index * part_size;
                let size = part_size.min(len - offset);
                let op = format!("UploadPart {number}/{parts}");
                let payload = Payload::File {
                    file,
                    offset,
                    len: size,
                };
                let part = number.to_string();
                let query = [
                    ("partNumber", part.as_str()),
                    ("uploadId", upload_id.as_str()),
                ];
                let headers = [("content-md5", self.content_md5(&op, key, payload)?)];
                let req = Req {
                    op: &op,
                    key,
                    method: Method::Put,
                    object: Some(object),
                    query: &query,
                    headers: &headers,
                    payload,
                };
                let etag = self.retry(|| {
                    let response = self.exchange(&req)?;
                    let etag = response
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    drain(response);
                    etag.ok_or_else(|| {
                        self.error(ErrorKind::Other, &op, key, "no ETag in response")
                    })
                })?;
                bump(&self.counters.parts_uploaded);
                etags.push(etag);
            }
            let op = "CompleteMultipartUpload";
            let body = complete_multipart_body(&etags);
            let req = Req {
                op,
                key,
                method: Method::Post,
                object: Some(object),
                query: &[("uploadId", upload_id.as_str())],
                headers: &[],
                payload: Payload::Bytes(body.as_bytes()),
            };
            self.retry(|| {
                let response = self.exchange(&req)?;
                // S3 can answer 200 and still fail, with an <Error> document as the body.
                let text = self.read_text(op, key, response)?;
                match xml::expect_root(&text, "CompleteMultipartUploadResult") {
                    Ok(_) => Ok(()),
                    Err(_) if text.contains("<Error>") => {
                        Err(self.answer_error(op, key, 200, &text))
                    }
                    Err(e) => {
                        Err(self.error(ErrorKind::Other, op, key, format!("bad response: {e}")))
                    }
                }
            })
        })();

        let result = match uploaded {
            Ok(()) => {
                bump(&self.counters.multipart_uploads);
                Ok(())
            }
            Err(err) => {
                self.abort_multipart(key, object, &upload_id);
                Err(err)
            }
        };
        self.in_flight(&upload_id, false);
        result
    }

    /// Note that this process is running (or no longer running) the upload `id`.
    fn in_flight(&self, id: &str, running: bool) {
        let mut ids = self
            .uploads_in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running {
            ids.insert(id.to_string());
        } else {
            ids.remove(id);
        }
    }

    /// Best effort: parts of an upload that is neither completed nor aborted are kept (and
    /// billed) until a lifecycle rule removes them, or [`S3Storage::abort_stale_uploads`].
    fn abort_multipart(&self, key: &str, object: &str, upload_id: &str) {
        let req = Req {
            op: "AbortMultipartUpload",
            key,
            method: Method::Delete,
            object: Some(object),
            query: &[("uploadId", upload_id)],
            headers: &[],
            payload: Payload::Empty,
        };
        match self.exchange(&req) {
            Ok(response) => drain(response),
            Err(err) => log::warn!(
                "{err}; the parts already uploaded stay in the bucket until walsync finds \
                 the upload stale (after {} h) or a lifecycle rule removes them",
                STALE_UPLOAD_AGE.as_secs() / 3600
            ),
        }
    }

    /// Abort the incomplete multipart uploads under `prefix` (relative to the destination's
    /// prefix, like a [`Storage::list`](crate::storage::Storage::list) prefix) that were
    /// started more than `older_than` ago, except those this process is running: what a
    /// crash in the middle of an upload left behind, which S3 keeps (and bills) until
    /// aborted. Uploads with a start time that cannot be read are left alone. Returns the
    /// relative keys of the uploads aborted.
    pub fn abort_stale_uploads(&self, prefix: &str, older_than: Duration) -> Result<Vec<String>> {
        let op = "ListMultipartUploads";
        let full_prefix = self.prefixed(prefix);
        let strip = self.prefixed("");
        let now = UtcTime::now();
        let cutoff = now.millis() - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let mut aborted = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = vec![
                ("uploads", ""),
                ("encoding-type", "url"),
                ("prefix", full_prefix.as_str()),
            ];
            if let Some((key_marker, id_marker)) = &markers {
                query.push(("key-marker", key_marker.as_str()));
                query.push(("upload-id-marker", id_marker.as_str()));
            }
            let page = self.retry(|| {
                self.get_listing_page(op, prefix, &query, |text| {
                    parse_uploads_page(text, &full_prefix)
                })
            })?;
            for upload in &page.uploads {
                let Some(relative) = upload.key.strip_prefix(&strip) else {
                    continue;
                };
                if !relative.starts_with(prefix) {
                    continue;
                }
                let running = self
                    .uploads_in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&upload.upload_id);
                let started = UtcTime::parse_rfc3339(&upload.initiated).ok();
                match started {
                    Some(started) if started.millis() < cutoff && !running => {
                        log::info!(
                            "{}: aborting the incomplete multipart upload of {relative} \
                             started {} (left by a crash)",
                            self.describe(),
                            upload.initiated
                        );
                        self.abort_multipart(relative, &upload.key, &upload.upload_id);
                        aborted.push(relative.to_string());
                    }
                    Some(_) => {}
                    None => log::debug!(
                        "{op} {prefix}: upload of {relative} has an unreadable start time {:?}",
                        upload.initiated
                    ),
                }
            }
            match page.next {
                Some(next) if markers.as_ref() == Some(&next) => {
                    return Err(self.error(
                        ErrorKind::Other,
                        op,
                        prefix,
                        "the server returned the same markers twice",
                    ));
                }
                Some(next) => markers = Some(next),
                None => break,
            }
        }
        Ok(aborted)
    }
}
