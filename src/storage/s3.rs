//! [`S3Storage`]: any S3-compatible service, over plain blocking HTTP.
//!
//! Every request is signed with SigV4 in its `Authorization` header (`sigv4`), as the
//! AWS SDKs sign them, and sent with ureq. Request bodies are streamed from files with
//! positional reads and an explicit `Content-Length` (S3 rejects chunked uploads); every
//! upload (a PUT, each part of a multipart upload) carries its `Content-MD5`, which buckets
//! under Object Lock require and which lets the store refuse a body damaged on the way.
//! Response bodies are streamed into the caller's writer. Files larger than one part go up as
//! a multipart upload, one part at a time, each part read straight from its range of the file.
//!
//! Transient failures (5xx, 429, `SlowDown`, connection refused or reset, timeouts) are retried
//! a bounded number of times with exponential backoff and jitter, each request on its own: a
//! failed part is sent again, not the whole file, and an interrupted download resumes where it
//! stopped. Other failures are reported at once, classified into [`ErrorKind`]s, with the
//! server's own code and message and a hint chosen by the code (region, clock, credentials,
//! permissions, certificates). A bucket in another AWS region than the one configured is
//! followed once (its `x-amz-bucket-region`), with a warning naming the region to set.
//!
//! Many keys are deleted with DeleteObjects, up to [`DELETE_BATCH`] keys a request (with the
//! `Content-MD5` header S3 requires for it); keys the response reports as failed with a
//! temporary error are sent again, the rest is reported. A server that does not implement
//! DeleteObjects (501 `NotImplemented`) gets one DeleteObject request per key instead, from
//! then on.
//!
//! Error messages name the destination, the operation and the relative key, and the HTTP
//! status. Secrets are never printed: nothing secret is in a URL, and the secret key, the
//! session token and signatures are removed from any text a server sends back.
//!
//! # Where things are
//!
//! This file holds [`S3Storage`] itself: its construction and the [`Storage`] operations
//! (PUT, GET with its resumption, the listing, DELETE and DeleteObjects), each a request or a
//! few. The rest is in rooms of its own:
//!
//! - `config`: [`S3Config`] from the AWS variables, and what is settled from it at start
//!   (the bucket's URL, the prefix, the CA roots);
//! - `request`: one request signed, sent and retried; the keys renewed, the store's clock
//!   and region followed;
//! - `multipart`: files uploaded in parts, and the cleanup of the uploads a crash left;
//! - `documents`: the XML documents S3 answers with and the bodies walsync sends;
//! - `errors`: what a failure means (its [`ErrorKind`] and hint), and redaction.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::credentials;
use super::sigv4::{Bucket, Credentials};
use super::{check_key, ObjectInfo, Storage};
use crate::error::{Context, Error, ErrorKind, Result};

mod config;
mod documents;
mod errors;
mod multipart;
mod request;

pub(crate) use config::check_prefix;
pub use config::{Addressing, CaRoots, S3Config, DEFAULT_TIMEOUT};
pub use multipart::{MIN_PART_SIZE, MULTIPART_THRESHOLD, STALE_UPLOAD_AGE};
pub use request::DEFAULT_MAX_ATTEMPTS;

use config::{load_roots, make_bucket};
use documents::{delete_objects_body, parse_delete_result, parse_list_page};
use errors::{classify_status, is_missing_bucket, is_not_implemented, shorten, AnswerContext};
use request::{drain, header_u64, Keys, Method, Payload, Req, COPY_BUFFER};

/// Keys per DeleteObjects request: S3 takes at most 1000.
pub const DELETE_BATCH: usize = 1000;

/// Counters of what an [`S3Storage`] did, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct S3Stats {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// ListObjectsV2 pages requested.
    pub list_pages: u64,
    /// Multipart uploads completed.
    pub multipart_uploads: u64,
    /// Parts uploaded successfully.
    pub parts_uploaded: u64,
    /// Requests retried after a transient failure.
    pub retries: u64,
    /// DeleteObjects requests that succeeded.
    pub batch_deletes: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    list_pages: AtomicU64,
    multipart_uploads: AtomicU64,
    parts_uploaded: AtomicU64,
    retries: AtomicU64,
    batch_deletes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Storage in an S3 bucket: `s3://bucket/prefix`.
pub struct S3Storage {
    /// Replaced when AWS says the bucket is in another region (see [`S3Storage::exchange`]).
    bucket: RwLock<Bucket>,
    /// Whether the endpoint is AWS's own, chosen from the region (so a bucket in another
    /// region can be followed there).
    aws_endpoint: bool,
    addressing: Addressing,
    /// The keys requests are signed with now, renewed before they expire.
    keys: Mutex<Keys>,
    /// Where temporary keys come from; `None` for keys that do not change.
    credential_source: Option<credentials::Source>,
    /// What a certificate failure should tell the user to set.
    ca_roots: CaRoots,
    agent: ureq::Agent,
    prefix: String,
    part_size: u64,
    max_attempts: u32,
    list_page_size: Option<usize>,
    counters: Counters,
    /// The server answered DeleteObjects with NotImplemented: delete one key per request.
    single_deletes: AtomicBool,
    /// Multipart uploads this process has started and not finished: never stale.
    uploads_in_flight: Mutex<HashSet<String>>,
    /// How far the store's clock is ahead of this host's (milliseconds), learnt from a
    /// `RequestTimeTooSkewed` answer: requests are signed with the store's time, as the AWS
    /// SDKs do, since a signature more than 15 minutes off is refused.
    clock_offset: AtomicI64,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("destination", &self.describe())
            .field("endpoint", &self.bucket().base_url().as_str())
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    pub fn new(config: S3Config) -> Result<S3Storage> {
        let prefix = config.prefix.trim_matches('/').to_string();
        check_prefix(&prefix)
            .map_err(|why| Error::invalid(format!("s3://{}/{prefix}: {why}", config.bucket)))?;
        let bucket = make_bucket(
            config.endpoint.as_deref(),
            config.addressing,
            &config.bucket,
            &config.region,
        )?;
        let static_keys = (!config.access_key.is_empty() || config.credential_source.is_none())
            .then(|| {
                Arc::new(Credentials::new(
                    config.access_key,
                    config.secret_key,
                    config.session_token,
                ))
            });
        // The one line that says where the keys come from (never the keys); the usual case,
        // the environment, only with -v.
        if !config.credential_origin.is_empty() {
            if config.credential_source.is_none()
                && config.credential_origin.starts_with("the environment")
            {
                log::debug!("S3 credentials from {}", config.credential_origin);
            } else {
                log::info!("S3 credentials from {}", config.credential_origin);
            }
        }
        // Certificates are read only for an https endpoint, which holds them for good.
        let roots = if bucket.base_url().scheme() == "https" {
            load_roots(&config.ca_roots)?
        } else {
            None
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(roots) = roots {
            log::debug!(
                "TLS: {} root certificates from {}",
                roots.len(),
                config.ca_roots.describe()
            );
            tls = tls.root_certs(ureq::tls::RootCerts::from(roots));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // S3 explains its errors in an XML body: read it rather than get a bare status.
            .http_status_as_error(false)
            // A redirect means the wrong region or endpoint; following it with a body and a
            // signature for another host cannot work, so report it instead.
            .max_redirects(0)
            .timeout_resolve(Some(Duration::from_secs(10)))
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(config.timeout))
            .timeout_per_write(Some(config.timeout))
            .tls_config(tls.build())
            .user_agent(concat!("walsync/", env!("CARGO_PKG_VERSION")))
            // 32 KiB each way, not ureq's 128: S3's response headers are a few hundred
            // bytes, bodies stream through, and a host of databases starting at once holds
            // a connection per thread (256 KiB each at ureq's sizes).
            .input_buffer_size(32 * 1024)
            .output_buffer_size(32 * 1024)
            .max_response_header_size(32 * 1024)
            .build()
            .into();
        Ok(S3Storage {
            bucket: RwLock::new(bucket),
            aws_endpoint: config.endpoint.is_none(),
            addressing: config.addressing,
            keys: Mutex::new(Keys {
                current: static_keys,
                expires: None,
                last_failure: None,
            }),
            credential_source: config.credential_source,
            ca_roots: config.ca_roots,
            agent,
            prefix,
            part_size: MULTIPART_THRESHOLD,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            list_page_size: None,
            counters: Counters::default(),
            single_deletes: AtomicBool::new(false),
            uploads_in_flight: Mutex::new(HashSet::new()),
            clock_offset: AtomicI64::new(0),
        })
    }

    /// Upload files larger than `bytes` in parts of `bytes` (the default is
    /// [`MULTIPART_THRESHOLD`]); a file that fits in one part goes up as one request.
    /// Sizes below [`MIN_PART_SIZE`], which S3 would refuse, are raised to it.
    pub fn with_part_size(mut self, bytes: u64) -> S3Storage {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    /// Try each request at most `attempts` times (at least once) before reporting a
    /// transient failure. The default is [`DEFAULT_MAX_ATTEMPTS`].
    pub fn with_max_attempts(mut self, attempts: u32) -> S3Storage {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Ask for at most `keys` keys per listing page (S3 never returns more than 1000).
    pub fn with_list_page_size(mut self, keys: usize) -> S3Storage {
        self.list_page_size = Some(keys.max(1));
        self
    }

    pub fn stats(&self) -> S3Stats {
        let c = &self.counters;
        S3Stats {
            requests: c.requests.load(Ordering::Relaxed),
            list_pages: c.list_pages.load(Ordering::Relaxed),
            multipart_uploads: c.multipart_uploads.load(Ordering::Relaxed),
            parts_uploaded: c.parts_uploaded.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            batch_deletes: c.batch_deletes.load(Ordering::Relaxed),
        }
    }

    /// The object key of a relative key.
    fn object_key(&self, key: &str) -> Result<String> {
        check_key(key).map_err(|why| {
            Error::invalid(format!("{}: invalid key {key:?}: {why}", self.describe()))
        })?;
        Ok(self.prefixed(key))
    }

    fn prefixed(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn put(&self, key: &str, object: &str, payload: Payload<'_>) -> Result<()> {
        let headers = [("content-md5", self.content_md5("PUT", key, payload)?)];
        let req = Req {
            op: "PUT",
            key,
            method: Method::Put,
            object: Some(object),
            query: &[],
            headers: &headers,
            payload,
        };
        self.retry(|| {
            drain(self.exchange(&req)?);
            Ok(())
        })
    }

    /// One DeleteObjects request per batch of `keys` (relative keys, already checked, with
    /// their object keys in `objects`). Keys the server reports as failed with a temporary
    /// error are sent again, with the retry conventions of every other request.
    fn delete_batch(&self, keys: &[String], objects: &[String]) -> Result<()> {
        let op = "DeleteObjects";
        let label = match keys {
            [only] => only.clone(),
            [first, .., last] => format!("{} keys {first} .. {last}", keys.len()),
            [] => return Ok(()),
        };
        // Object key -> relative key, to name failed keys as the caller knows them.
        let relative = |object: &str| {
            objects
                .iter()
                .position(|o| o == object)
                .map_or_else(|| object.to_string(), |i| keys[i].clone())
        };
        let mut remaining: Vec<String> = objects.to_vec();
        self.retry(|| {
            // Quiet: only failures are listed in the answer, a short body for 1000 keys.
            let body = delete_objects_body(&remaining);
            let payload = Payload::Bytes(body.as_bytes());
            let headers = [("content-md5", self.content_md5(op, &label, payload)?)];
            let req = Req {
                op,
                key: &label,
                method: Method::Post,
                object: None,
                query: &[("delete", "")],
                headers: &headers,
                payload,
            };
            let response = self.exchange(&req)?;
            let text = self.read_text(op, &label, response)?;
            let answer = match parse_delete_result(&text) {
                Ok(answer) => answer,
                // Like CompleteMultipartUpload, a 200 can carry an <Error> document.
                Err(_) if text.contains("<Error>") && !text.contains("DeleteResult") => {
                    return Err(self.answer_error(op, &label, 200, &text));
                }
                Err(e) => {
                    return Err(self.error(
                        ErrorKind::Other,
                        op,
                        &label,
                        format!("bad response: {e}"),
                    ))
                }
            };
            bump(&self.counters.batch_deletes);
            // A key already gone is deleted, as DeleteObject has it.
            let failed: Vec<_> = answer
                .into_iter()
                .filter(|e| e.code != "NoSuchKey")
                .collect();
            if failed.is_empty() {
                remaining.clear();
                return Ok(());
            }
            let kinds: Vec<ErrorKind> = failed
                .iter()
                .map(|e| {
                    let status = if e.code == "AccessDenied" { 403 } else { 200 };
                    let cx = AnswerContext {
                        bucket: "",
                        region: "",
                        bucket_region: None,
                    };
                    classify_status(status, &format!("<Code>{}</Code>", e.code), &cx).0
                })
                .collect();
            // Send again only what failed, and only if every failure was temporary.
            let kind = if kinds.iter().all(|k| *k == ErrorKind::Transient) {
                ErrorKind::Transient
            } else {
                kinds
                    .iter()
                    .copied()
                    .find(|k| *k != ErrorKind::Transient)
                    .unwrap_or(ErrorKind::Other)
            };
            let mut detail = format!("{} of {} keys not deleted:", failed.len(), remaining.len());
            for e in failed.iter().take(5) {
                detail.push_str(&format!(
                    " {} ({}: {});",
                    relative(&e.key),
                    e.code,
                    shorten(&e.message)
                ));
            }
            if failed.len() > 5 {
                detail.push_str(&format!(" and {} more", failed.len() - 5));
            }
            remaining.retain(|o| failed.iter().any(|e| e.key == *o));
            Err(self.error(kind, op, &label, self.redact(detail.trim_end_matches(';'))))
        })
    }
}

impl Storage for S3Storage {
    fn put_bytes(&self, key: &str, data: &[u8]) -> Result<()> {
        let object = self.object_key(key)?;
        self.put(key, &object, Payload::Bytes(data))
    }

    fn put_file(&self, key: &str, file: &File) -> Result<()> {
        let object = self.object_key(key)?;
        let len = file
            .metadata()
            .context(|| {
                format!(
                    "{}: PUT {key}: reading the source file size",
                    self.describe()
                )
            })?
            .len();
        if len <= self.part_size {
            self.put(
                key,
                &object,
                Payload::File {
                    file,
                    offset: 0,
                    len,
                },
            )
        } else {
            self.put_multipart(key, &object, file, len)
        }
    }

    fn get(&self, key: &str, out: &mut dyn Write) -> Result<u64> {
        let object = self.object_key(key)?;
        // Bytes already written to `out`: a retry after a broken download asks for the rest
        // only (with If-Match, so that it is the rest of the same object).
        let mut written = 0u64;
        let mut total: Option<u64> = None;
        let mut etag: Option<String> = None;
        self.retry(|| {
            if total == Some(written) && written > 0 {
                return Ok(());
            }
            let mut headers = Vec::new();
            if written > 0 {
                headers.push(("range", format!("bytes={written}-")));
                if let Some(etag) = &etag {
                    headers.push(("if-match", etag.clone()));
                }
            }
            let req = Req {
                op: "GET",
                key,
                method: Method::Get,
                object: Some(&object),
                query: &[],
                headers: &headers,
                payload: Payload::Empty,
            };
            let response = self.exchange(&req)?;
            // A server that ignores Range sends everything again: skip what we already have.
            let mut skip = if response.status() == 206 { 0 } else { written };
            if response.status() == 200 {
                total = header_u64(&response, "content-length");
                etag = response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
            }
            let mut body = response
                .into_body()
                .into_with_config()
                .limit(u64::MAX)
                .reader();
            let mut buf = vec![0u8; COPY_BUFFER];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let detail = format!("download interrupted after {written} bytes: {e}");
                        return Err(self.error(
                            ErrorKind::Transient,
                            "GET",
                            key,
                            self.redact(&detail),
                        ));
                    }
                };
                let skipped = skip.min(n as u64) as usize;
                skip -= skipped as u64;
                out.write_all(&buf[skipped..n]).map_err(|e| {
                    self.error(
                        ErrorKind::Io,
                        "GET",
                        key,
                        format!("writing the output: {e}"),
                    )
                })?;
                written += (n - skipped) as u64;
            }
            match total {
                Some(total) if written != total => Err(self.error(
                    ErrorKind::Transient,
                    "GET",
                    key,
                    format!("response ended after {written} of {total} bytes"),
                )),
                _ => Ok(()),
            }
        })?;
        Ok(written)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let op = "LIST";
        let full_prefix = self.prefixed(prefix);
        let strip = self.prefixed("");
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        // Some stores (s3s-fs) list keys as they are while saying they encoded them: once a
        // key shows it, every key of the listing is taken as it is.
        let mut raw = false;
        let max_keys = self
            .list_page_size
            .map(|keys| u16::try_from(keys).unwrap_or(u16::MAX).to_string());
        loop {
            // Keys come back URL-encoded: an XML document cannot carry every character.
            let mut query = vec![
                ("list-type", "2"),
                ("encoding-type", "url"),
                ("prefix", full_prefix.as_str()),
            ];
            if let Some(token) = &token {
                query.push(("continuation-token", token.as_str()));
            }
            if let Some(max_keys) = &max_keys {
                query.push(("max-keys", max_keys.as_str()));
            }
            let page = self.retry(|| {
                bump(&self.counters.list_pages);
                self.get_listing_page(op, prefix, &query, |text| {
                    parse_list_page(text, &full_prefix)
                })
            })?;
            raw |= page.raw;
            for content in page.objects {
                let relative = |key: &str| {
                    key.strip_prefix(&strip)
                        .filter(|k| k.starts_with(prefix))
                        .map(str::to_string)
                };
                let decoded = content.decoded.as_deref().filter(|_| !raw);
                let key = match decoded.and_then(relative) {
                    Some(key) => Some(key),
                    None => {
                        let key = relative(&content.key);
                        if key.is_some() && content.decoded.is_some() && !raw {
                            log::debug!(
                                "{}: {op} {prefix}: the store lists keys unencoded although \
                                 asked to encode them; taking them as they are",
                                self.describe()
                            );
                            raw = true;
                        }
                        key
                    }
                };
                match key {
                    Some(key) => objects.push(ObjectInfo {
                        key,
                        size: content.size,
                    }),
                    None => log::warn!(
                        "{}: {op} {prefix}: the store listed the key {:?}, which is not under \
                         the prefix asked for; ignoring it",
                        self.describe(),
                        content.key
                    ),
                }
            }
            match page.next_continuation_token {
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(self.error(
                        ErrorKind::Other,
                        op,
                        prefix,
                        "the server returned the same continuation token twice",
                    ));
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        // S3 lists in UTF-8 binary order already; some compatible servers may not.
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let object = self.object_key(key)?;
        let req = Req {
            op: "DELETE",
            key,
            method: Method::Delete,
            object: Some(&object),
            query: &[],
            headers: &[],
            payload: Payload::Empty,
        };
        self.retry(|| match self.exchange(&req) {
            Ok(response) => {
                drain(response);
                Ok(())
            }
            // S3 answers 204 for missing keys; some compatible servers say 404.
            Err(err) if err.kind() == ErrorKind::NotFound && !is_missing_bucket(&err) => Ok(()),
            Err(err) => Err(err),
        })
    }

    fn delete_many(&self, keys: &[String]) -> Result<()> {
        let objects: Vec<String> = keys
            .iter()
            .map(|key| self.object_key(key))
            .collect::<Result<_>>()?;
        for (keys, objects) in keys.chunks(DELETE_BATCH).zip(objects.chunks(DELETE_BATCH)) {
            if !self.single_deletes.load(Ordering::Relaxed) {
                match self.delete_batch(keys, objects) {
                    Ok(()) => continue,
                    Err(err) if is_not_implemented(&err) => {
                        log::info!("{err}: deleting one object per request instead (DeleteObject)");
                        self.single_deletes.store(true, Ordering::Relaxed);
                    }
                    Err(err) => return Err(err),
                }
            }
            for key in keys {
                self.delete(key)?;
            }
        }
        Ok(())
    }

    fn abort_stale_uploads(&self, prefix: &str) -> Result<usize> {
        S3Storage::abort_stale_uploads(self, prefix, STALE_UPLOAD_AGE).map(|keys| keys.len())
    }

    fn describe(&self) -> String {
        let bucket = self.bucket();
        if self.prefix.is_empty() {
            format!("s3://{}", bucket.name())
        } else {
            format!("s3://{}/{}", bucket.name(), self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shared with the tests of the rooms: a configuration from given variables, and the
    // URL a key is sent to.

    pub(super) fn vars(list: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| list.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    pub(super) const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
    ];

    pub(super) fn storage(bucket: &str, prefix: &str, endpoint: Option<&str>) -> S3Storage {
        let c = S3Config::from_vars(bucket, prefix, endpoint, vars(&KEYS), None).unwrap();
        S3Storage::new(c).unwrap()
    }

    pub(super) fn object_url(s: &S3Storage, key: &str) -> String {
        s.bucket()
            .url(Some(&s.object_key(key).unwrap()), &[])
            .to_string()
    }

    pub(super) fn config(list: &[(&str, &str)], endpoint: Option<&str>) -> Result<S3Config> {
        let mut all = KEYS.to_vec();
        all.extend_from_slice(list);
        S3Config::from_vars("b", "", endpoint, vars(&all), None)
    }

    #[test]
    fn url_styles_keys_and_describe() {
        let aws = storage("my-bucket", "db/app", None);
        assert_eq!(aws.describe(), "s3://my-bucket/db/app");
        assert_eq!(
            object_url(&aws, "x/y"),
            "https://my-bucket.s3.us-east-1.amazonaws.com/db/app/x/y"
        );
        let dotted = storage("my.bucket", "", None);
        assert_eq!(dotted.describe(), "s3://my.bucket");
        assert_eq!(
            object_url(&dotted, "k"),
            "https://s3.us-east-1.amazonaws.com/my.bucket/k"
        );
        let custom = storage("b", "", Some("http://127.0.0.1:9000"));
        assert_eq!(object_url(&custom, "k"), "http://127.0.0.1:9000/b/k");
        for bad in ["/abs", "a/../b", "", "a//b"] {
            assert_eq!(
                custom.object_key(bad).unwrap_err().kind(),
                ErrorKind::Invalid,
                "{bad:?}"
            );
        }
        let err = S3Storage::new(config(&[], Some("localhost:9000")).unwrap()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    }

    #[test]
    fn part_size_below_s3_minimum_is_raised_to_it() {
        let s = storage("b", "", Some("http://127.0.0.1:1")).with_part_size(1024);
        assert_eq!(s.part_size, MIN_PART_SIZE);
    }
}
