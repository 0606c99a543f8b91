//! [`S3Storage`]: any S3-compatible service, over plain blocking HTTP.
//!
//! Requests are presigned with SigV4 ([`super::sigv4`]: query-string signatures, valid for an hour)
//! and sent with ureq. Request bodies are streamed from files with positional reads and an
//! explicit `Content-Length` (S3 rejects chunked uploads); response bodies are streamed into
//! the caller's writer. Files larger than one part go up as a multipart upload, one part at a
//! time, each part read straight from its range of the file.
//!
//! Transient failures (5xx, 429, `SlowDown`, connection refused or reset, timeouts) are retried
//! a bounded number of times with exponential backoff and jitter, each request on its own: a
//! failed part is sent again, not the whole file, and an interrupted download resumes where it
//! stopped. Other failures are reported at once, classified into [`ErrorKind`]s.
//!
//! Many keys are deleted with DeleteObjects, up to [`DELETE_BATCH`] keys a request (with the
//! `Content-MD5` header S3 requires for it); keys the response reports as failed with a
//! temporary error are sent again, the rest is reported. A server that does not implement
//! DeleteObjects (501 `NotImplemented`) gets one DeleteObject request per key instead, from
//! then on.
//!
//! Error messages name the destination, the operation and the relative key, and the HTTP
//! status; URLs in them are printed without their query string, which holds the presigned
//! credential and signature. Secrets are never printed.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use md5::Digest as _;
use url::Url;

use super::sigv4::{Bucket, Credentials};
use super::{check_key, xml, FileRange, ObjectInfo, Storage};
use crate::backoff::Backoff;
use crate::error::{Context, Error, ErrorKind, Result};

/// Files larger than this are uploaded in parts (unless [`S3Storage::with_part_size`] says
/// otherwise); it is also the default part size.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;

/// The smallest part S3 accepts, except for the last part of an upload.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// S3 allows at most this many parts in one upload; bigger files get bigger parts.
const MAX_PARTS: u64 = 10_000;

/// How many times a request is tried before a transient failure is reported.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// How long one read or one write on an S3 connection may block before the request fails
/// (and is retried): the default of `--s3-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Presigned URLs are used at once; this only has to cover clock skew and slow starts.
const SIGNATURE_VALIDITY: Duration = Duration::from_secs(60 * 60);

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Error bodies are small XML documents; never read more than this of one.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;
/// A page of 1000 keys is a few hundred KiB of XML.
const XML_BODY_LIMIT: u64 = 32 * 1024 * 1024;

const COPY_BUFFER: usize = 64 * 1024;

/// Keys per DeleteObjects request: S3 takes at most 1000.
pub const DELETE_BATCH: usize = 1000;

/// Where and how to reach an S3 bucket.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every key with a `/`; empty for the bucket's root.
    pub prefix: String,
    /// `None` for AWS (`https://s3.<region>.amazonaws.com`, virtual-hosted style); anything
    /// else (MinIO, R2, a test server) is addressed path style.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Longest wait for one read or write on a connection ([`DEFAULT_TIMEOUT`] unless set):
    /// a server that stops answering mid-request fails the attempt after this long, and the
    /// request is retried, instead of hanging an upload worker.
    pub timeout: Duration,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl S3Config {
    /// Configuration from the usual AWS variables: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` (optional), `AWS_REGION` (else
    /// `AWS_DEFAULT_REGION`, else `us-east-1`), and `AWS_ENDPOINT_URL_S3` (else
    /// `AWS_ENDPOINT_URL`) unless `endpoint_flag` gives the endpoint. Empty variables count as
    /// unset.
    pub fn from_env(bucket: &str, prefix: &str, endpoint_flag: Option<&str>) -> Result<S3Config> {
        S3Config::from_vars(bucket, prefix, endpoint_flag, |name| {
            std::env::var(name).ok()
        })
    }

    fn from_vars(
        bucket: &str,
        prefix: &str,
        endpoint_flag: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Config> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let (Some(access_key), Some(secret_key)) =
            (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(Error::invalid(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set for s3:// destinations",
            ));
        };
        let endpoint = endpoint_flag
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .or_else(|| var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| var("AWS_ENDPOINT_URL"));
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".to_string()),
            access_key,
            secret_key,
            session_token: var("AWS_SESSION_TOKEN"),
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

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
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
    prefix: String,
    part_size: u64,
    max_attempts: u32,
    list_page_size: Option<usize>,
    counters: Counters,
    /// The server answered DeleteObjects with NotImplemented: delete one key per request.
    single_deletes: AtomicBool,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("destination", &self.describe())
            .field("endpoint", &self.bucket.base_url().as_str())
            .finish_non_exhaustive()
    }
}

/// What a request sends.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of the file from `offset`, read with positional reads.
    File {
        file: &'a File,
        offset: u64,
        len: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Put,
    Post,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

impl S3Storage {
    pub fn new(config: S3Config) -> Result<S3Storage> {
        // Path style (`https://host/bucket/key`) or virtual-hosted (`https://bucket.host/key`).
        let (endpoint, path_style) = match &config.endpoint {
            Some(endpoint) => (endpoint.clone(), true),
            // Bucket names with dots do not match the wildcard certificate of virtual hosts.
            None if config.bucket.contains('.') => {
                (format!("https://s3.{}.amazonaws.com", config.region), true)
            }
            None => (format!("https://s3.{}.amazonaws.com", config.region), false),
        };
        let bad_endpoint = |why: String| {
            Error::invalid(format!(
                "s3://{}: invalid S3 endpoint {endpoint:?}: {why} (expected http://host:port or https://host)",
                config.bucket
            ))
        };
        let url: Url = endpoint.parse().map_err(|e| bad_endpoint(format!("{e}")))?;
        let bucket = Bucket::new(
            url,
            path_style,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| bad_endpoint(format!("{e:?}")))?;
        let credentials =
            Credentials::new(config.access_key, config.secret_key, config.session_token);
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
            .user_agent(concat!("walsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(S3Storage {
            bucket,
            credentials,
            agent,
            prefix: config.prefix.trim_matches('/').to_string(),
            part_size: MULTIPART_THRESHOLD,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            list_page_size: None,
            counters: Counters::default(),
            single_deletes: AtomicBool::new(false),
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

    /// A presigned URL for `method` on `object` (the bucket itself if `None`), with the extra
    /// query parameters `query`.
    fn presign(&self, method: Method, object: Option<&str>, query: &[(&str, &str)]) -> Url {
        let url = match object {
            Some(object) => self.bucket.object_url(object),
            None => self.bucket.base_url().clone(),
        };
        self.bucket.sign(
            &self.credentials,
            method.as_str(),
            url,
            query,
            SIGNATURE_VALIDITY,
        )
    }

    /// An error about `op` on `key`: `s3://bucket/prefix: GET app/state.json: {detail}`.
    fn error(&self, kind: ErrorKind, op: &str, key: &str, detail: impl fmt::Display) -> Error {
        Error::new(kind, format!("{}: {op} {key}: {detail}", self.describe()))
    }

    /// Run `attempt` until it succeeds, fails for good, or has failed transiently
    /// `max_attempts` times, sleeping with exponential backoff and jitter in between.
    fn retry<T>(&self, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        for n in 1.. {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(err) if err.is_transient() && n < self.max_attempts => {
                    let sleep = backoff.next_jittered();
                    // `err` already names the destination, the operation and the key.
                    log::warn!(
                        "{err}; retrying in {} ms (attempt {} of {})",
                        sleep.as_millis(),
                        n + 1,
                        self.max_attempts
                    );
                    bump(&self.counters.retries);
                    std::thread::sleep(sleep);
                }
                Err(err) if err.is_transient() && n > 1 => {
                    return Err(Error::new(
                        err.kind(),
                        format!("{err} (gave up after {n} attempts)"),
                    ));
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the loop returns")
    }

    /// One HTTP exchange. Returns the response if its status is a success, and otherwise an
    /// error classified from the status, the S3 error code, or the transport failure.
    fn exchange(
        &self,
        op: &str,
        key: &str,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        bump(&self.counters.requests);
        let uri = url.as_str();
        let mut source = None;
        let result = match method {
            Method::Get => with_headers(self.agent.get(uri), headers).call(),
            Method::Delete => with_headers(self.agent.delete(uri), headers).call(),
            Method::Put | Method::Post => {
                let builder = if method == Method::Put {
                    self.agent.put(uri)
                } else {
                    self.agent.post(uri)
                };
                let builder = with_headers(builder, headers);
                match payload {
                    Payload::Empty => builder.send_empty(),
                    Payload::Bytes(data) => builder.send(data),
                    Payload::File { file, offset, len } => {
                        // An explicit length: without it ureq would send the reader chunked.
                        let reader = source.insert(SourceReader {
                            inner: FileRange::new(file, offset, len),
                            failure: None,
                        });
                        builder
                            .header("content-length", len.to_string())
                            // Lets S3 refuse (bad signature, wrong bucket...) before we send
                            // megabytes, instead of closing the connection in the middle.
                            .header("expect", "100-continue")
                            .send(ureq::SendBody::from_reader(reader))
                    }
                }
            }
        };
        if let Some(failure) = source.and_then(|s| s.failure) {
            // Reading our own file failed: not a network problem, and retrying won't help.
            return Err(Error::from(failure).with_context(format!(
                "{}: {op} {key}: reading the source file",
                self.describe()
            )));
        }
        match result {
            Ok(response) if response.status().is_success() => {
                log::debug!("{op} {key}: HTTP {}", response.status().as_u16());
                Ok(response)
            }
            Ok(response) => Err(self.status_error(op, key, url, response)),
            Err(err) => Err(self.transport_error(op, key, url, &err)),
        }
    }

    /// An error for a response with a failure status, from its status and S3 error code.
    fn status_error(
        &self,
        op: &str,
        key: &str,
        url: &Url,
        response: ureq::http::Response<ureq::Body>,
    ) -> Error {
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .into_with_config()
            .limit(ERROR_BODY_LIMIT)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_default();
        self.answer_error(op, key, url, status, &body)
    }

    /// An error for an answer with `status` and error document `body`, carrying both as data.
    fn answer_error(&self, op: &str, key: &str, url: &Url, status: u16, body: &str) -> Error {
        let (kind, detail) = classify_status(status, body, self.bucket.name());
        let code = xml_tag(body, "Code").unwrap_or_default();
        self.error(kind, op, key, redact(&detail, url))
            .with_response(status, code)
    }

    /// An error for a request that got no response.
    fn transport_error(&self, op: &str, key: &str, url: &Url, err: &ureq::Error) -> Error {
        let kind = match err {
            ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled => ErrorKind::Transient,
            _ => ErrorKind::Other,
        };
        let detail = format!("{err} (requesting {})", without_query(url));
        self.error(kind, op, key, redact(&detail, url))
    }

    /// Read a whole (small) success body, as text.
    fn read_text(
        &self,
        op: &str,
        key: &str,
        url: &Url,
        response: ureq::http::Response<ureq::Body>,
    ) -> Result<String> {
        response
            .into_body()
            .into_with_config()
            .limit(XML_BODY_LIMIT)
            .read_to_string()
            .map_err(|e| self.transport_error(op, key, url, &e))
    }

    /// [`S3Storage::exchange`] without extra headers.
    fn send(
        &self,
        op: &str,
        key: &str,
        method: Method,
        url: &Url,
        payload: Payload<'_>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        self.exchange(op, key, method, url, &[], payload)
    }

    fn put(&self, key: &str, object: &str, payload: Payload<'_>) -> Result<()> {
        self.retry(|| {
            let url = self.presign(Method::Put, Some(object), &[]);
            drain(self.send("PUT", key, Method::Put, &url, payload)?);
            Ok(())
        })
    }

    fn put_multipart(&self, key: &str, object: &str, file: &File, len: u64) -> Result<()> {
        let part_size = self.part_size.max(len.div_ceil(MAX_PARTS));
        let parts = len.div_ceil(part_size);
        let op = "CreateMultipartUpload";
        let upload_id = self.retry(|| {
            let url = self.presign(Method::Post, Some(object), &[("uploads", "1")]);
            let response = self.send(op, key, Method::Post, &url, Payload::Empty)?;
            let body = self.read_text(op, key, &url, response)?;
            xml::expect_root(&body, "InitiateMultipartUploadResult")
                .and_then(|content| xml::required(content, "UploadId"))
                .map_err(|e| self.error(ErrorKind::Other, op, key, format!("bad response: {e}")))
        })?;
        log::debug!("{op} {key}: {parts} parts of {part_size} bytes, upload id {upload_id}");

        let uploaded = (|| {
            let mut etags = Vec::with_capacity(parts as usize);
            for index in 0..parts {
                let number = u16::try_from(index + 1).expect("at most 10000 parts");
                let offset = index * part_size;
                let size = part_size.min(len - offset);
                let op = format!("UploadPart {number}/{parts}");
                let etag = self.retry(|| {
                    let part = number.to_string();
                    let query = [
                        ("partNumber", part.as_str()),
                        ("uploadId", upload_id.as_str()),
                    ];
                    let url = self.presign(Method::Put, Some(object), &query);
                    let payload = Payload::File {
                        file,
                        offset,
                        len: size,
                    };
                    let response = self.send(&op, key, Method::Put, &url, payload)?;
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
            self.retry(|| {
                let url = self.presign(
                    Method::Post,
                    Some(object),
                    &[("uploadId", upload_id.as_str())],
                );
                let body = complete_multipart_body(&etags);
                let response =
                    self.send(op, key, Method::Post, &url, Payload::Bytes(body.as_bytes()))?;
                // S3 can answer 200 and still fail, with an <Error> document as the body.
                let text = self.read_text(op, key, &url, response)?;
                match xml::expect_root(&text, "CompleteMultipartUploadResult") {
                    Ok(_) => Ok(()),
                    Err(_) if text.contains("<Error>") => {
                        Err(self.answer_error(op, key, &url, 200, &text))
                    }
                    Err(e) => {
                        Err(self.error(ErrorKind::Other, op, key, format!("bad response: {e}")))
                    }
                }
            })
        })();

        match uploaded {
            Ok(()) => {
                bump(&self.counters.multipart_uploads);
                Ok(())
            }
            Err(err) => {
                self.abort_multipart(key, object, &upload_id);
                Err(err)
            }
        }
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
            let url = self.presign(Method::Post, None, &[("delete", "1")]);
            // Quiet: only failures are listed in the answer, a short body for 1000 keys.
            let body = delete_objects_body(&remaining);
            let md5 = super::sigv4::base64(&md5::Md5::digest(body.as_bytes()));
            let headers = [("content-md5", md5)];
            let response = self.exchange(
                op,
                &label,
                Method::Post,
                &url,
                &headers,
                Payload::Bytes(body.as_bytes()),
            )?;
            let text = self.read_text(op, &label, &url, response)?;
            let answer = match parse_delete_result(&text) {
                Ok(answer) => answer,
                // Like CompleteMultipartUpload, a 200 can carry an <Error> document.
                Err(_) if text.contains("<Error>") && !text.contains("DeleteResult") => {
                    let (kind, detail) = classify_status(200, &text, self.bucket.name());
                    return Err(self.error(kind, op, &label, redact(&detail, &url)));
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
                    classify_status(status, &format!("<Code>{}</Code>", e.code), "").0
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
            Err(self.error(kind, op, &label, redact(detail.trim_end_matches(';'), &url)))
        })
    }

    /// Best effort: parts of an upload that is neither completed nor aborted are kept (and
    /// billed) until a lifecycle rule removes them.
    fn abort_multipart(&self, key: &str, object: &str, upload_id: &str) {
        let url = self.presign(Method::Delete, Some(object), &[("uploadId", upload_id)]);
        match self.send(
            "AbortMultipartUpload",
            key,
            Method::Delete,
            &url,
            Payload::Empty,
        ) {
            Ok(response) => drain(response),
            Err(err) => log::warn!(
                "{err}; the parts already uploaded stay in the bucket until an \
                 AbortIncompleteMultipartUpload lifecycle rule removes them"
            ),
        }
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
            let url = self.presign(Method::Get, Some(&object), &[]);
            let mut headers = Vec::new();
            if written > 0 {
                headers.push(("range", format!("bytes={written}-")));
                if let Some(etag) = &etag {
                    headers.push(("if-match", etag.clone()));
                }
            }
            let response =
                self.exchange("GET", key, Method::Get, &url, &headers, Payload::Empty)?;
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
                            redact(&detail, &url),
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
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.retry(|| {
                // Keys come back URL-encoded: an XML document cannot carry every character.
                let mut query = vec![
                    ("list-type", "2"),
                    ("encoding-type", "url"),
                    ("prefix", full_prefix.as_str()),
                ];
                if let Some(token) = &token {
                    query.push(("continuation-token", token.as_str()));
                }
                let max_keys = self
                    .list_page_size
                    .map(|keys| u16::try_from(keys).unwrap_or(u16::MAX).to_string());
                if let Some(max_keys) = &max_keys {
                    query.push(("max-keys", max_keys.as_str()));
                }
                let url = self.presign(Method::Get, None, &query);
                bump(&self.counters.list_pages);
                let response = self.send(op, prefix, Method::Get, &url, Payload::Empty)?;
                let text = self.read_text(op, prefix, &url, response)?;
                parse_list_page(&text).map_err(|e| {
                    self.error(ErrorKind::Other, op, prefix, format!("bad response: {e}"))
                })
            })?;
            for content in page.objects {
                match content.key.strip_prefix(&strip) {
                    Some(key) if key.starts_with(prefix) => objects.push(ObjectInfo {
                        key: key.to_string(),
                        size: content.size,
                    }),
                    _ => log::warn!(
                        "{}: {op} {prefix}: ignoring unexpected key {:?} in the listing",
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
        self.retry(|| {
            let url = self.presign(Method::Delete, Some(&object), &[]);
            match self.send("DELETE", key, Method::Delete, &url, Payload::Empty) {
                Ok(response) => {
                    drain(response);
                    Ok(())
                }
                // S3 answers 204 for missing keys; some compatible servers say 404.
                Err(err) if err.kind() == ErrorKind::NotFound && !is_missing_bucket(&err) => Ok(()),
                Err(err) => Err(err),
            }
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

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket.name())
        } else {
            format!("s3://{}/{}", self.bucket.name(), self.prefix)
        }
    }
}

/// One page of a ListObjectsV2 listing.
struct ListPage {
    objects: Vec<ListedObject>,
    next_continuation_token: Option<String>,
}

struct ListedObject {
    key: String,
    size: u64,
}

fn parse_list_page(text: &str) -> std::result::Result<ListPage, String> {
    let content = xml::expect_root(text, "ListBucketResult")?;
    // Asked for with `encoding-type=url`; AWS and MinIO encode keys as HTML forms do (space
    // as `+`, `+` as `%2B`), others percent-encode everything: decoding `+` first reads both.
    let url_encoded = xml::text(content, "EncodingType")?.as_deref() == Some("url");
    let mut objects = Vec::new();
    for entry in xml::elements(content, "Contents") {
        let entry = entry?;
        let mut key = xml::required(entry, "Key")?;
        if url_encoded {
            let plus_decoded = key.replace('+', " ");
            if let Ok(decoded) = percent_encoding::percent_decode_str(&plus_decoded).decode_utf8() {
                key = decoded.into_owned();
            }
        }
        let size = match xml::text(entry, "Size")? {
            Some(size) => size
                .trim()
                .parse()
                .map_err(|_| format!("invalid <Size> {size:?} of {key:?}"))?,
            None => 0,
        };
        objects.push(ListedObject { key, size });
    }
    let truncated = match xml::text(content, "IsTruncated")? {
        Some(t) => match t.trim() {
            "true" => Some(true),
            "false" => Some(false),
            other => return Err(format!("invalid <IsTruncated> {other:?}")),
        },
        None => None,
    };
    // Without a token a truncated listing would silently end early, while following a token
    // given with a complete one would restart it.
    let token = xml::text(content, "NextContinuationToken")?;
    let next_continuation_token = match (truncated, token) {
        (Some(false), _) => None,
        (_, Some(token)) if !token.is_empty() => Some(token),
        (Some(true), _) => {
            return Err("truncated listing without <NextContinuationToken>".to_string())
        }
        (None, _) => None,
    };
    Ok(ListPage {
        objects,
        next_continuation_token,
    })
}

/// A key that DeleteObjects reports as not deleted.
struct DeleteFailure {
    key: String,
    code: String,
    message: String,
}

fn parse_delete_result(text: &str) -> std::result::Result<Vec<DeleteFailure>, String> {
    let content = xml::expect_root(text, "DeleteResult")?;
    xml::elements(content, "Error")
        .map(|error| {
            let error = error?;
            Ok(DeleteFailure {
                key: xml::required(error, "Key")?,
                code: xml::required(error, "Code")?,
                message: xml::text(error, "Message")?.unwrap_or_default(),
            })
        })
        .collect()
}

/// The DeleteObjects request body for `objects`, in quiet mode (only failures are reported).
fn delete_objects_body(objects: &[String]) -> String {
    let mut body = String::from("<Delete>");
    for object in objects {
        body.push_str("<Object><Key>");
        body.push_str(&xml::escape(object));
        body.push_str("</Key></Object>");
    }
    body.push_str("<Quiet>true</Quiet></Delete>");
    body
}

/// The CompleteMultipartUpload request body: the `n`-th ETag is part number `n`.
fn complete_multipart_body(etags: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (i, etag) in etags.iter().enumerate() {
        body.push_str(&format!(
            "<Part><ETag>{}</ETag><PartNumber>{}</PartNumber></Part>",
            xml::escape(etag),
            i + 1
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

fn is_missing_bucket(err: &Error) -> bool {
    err.s3_code() == Some("NoSuchBucket")
}

/// The server does not implement the request (HTTP 501, `NotImplemented`): for
/// DeleteObjects, which some S3-compatible servers lack.
fn is_not_implemented(err: &Error) -> bool {
    err.http_status() == Some(501) || err.s3_code() == Some("NotImplemented")
}

/// A request body read from a file range, remembering whether reading the file failed (as
/// opposed to sending it), since ureq reports both as I/O errors.
struct SourceReader<'a> {
    inner: FileRange<'a>,
    failure: Option<io::Error>,
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.failure = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

fn with_headers<B>(
    mut builder: ureq::RequestBuilder<B>,
    headers: &[(&str, String)],
) -> ureq::RequestBuilder<B> {
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder
}

/// Read what is left of a small success body so that the connection can be reused.
fn drain(response: ureq::http::Response<ureq::Body>) {
    let mut reader = response
        .into_body()
        .into_with_config()
        .limit(ERROR_BODY_LIMIT)
        .reader();
    let _ = io::copy(&mut reader, &mut io::sink());
}

fn header_u64(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// The kind and a description of an S3 failure, from the HTTP status and the XML error body.
fn classify_status(status: u16, body: &str, bucket: &str) -> (ErrorKind, String) {
    let code = xml_tag(body, "Code").unwrap_or_default();
    let message = xml_tag(body, "Message").unwrap_or_default();
    let http = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code}")
    };
    let explained = |what: &str| {
        if message.is_empty() {
            format!("{what} ({http})")
        } else {
            format!("{what} ({http}: {})", shorten(message))
        }
    };
    match code {
        "NoSuchBucket" => (
            ErrorKind::NotFound,
            format!("bucket {bucket:?} does not exist ({http})"),
        ),
        "NoSuchKey" | "NoSuchUpload" => (ErrorKind::NotFound, format!("not found ({http})")),
        "SignatureDoesNotMatch" | "InvalidAccessKeyId" => (
            ErrorKind::Auth,
            format!("access denied ({http}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        ),
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => (
            ErrorKind::Auth,
            format!("access denied ({http}): check AWS_SESSION_TOKEN (temporary credentials expire)"),
        ),
        "RequestTimeTooSkewed" => (
            ErrorKind::Auth,
            format!("access denied ({http}): the system clock is off; check it"),
        ),
        "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" => {
            (ErrorKind::Transient, explained("temporary failure"))
        }
        // Retrying cannot help: the server lacks the request (some lack DeleteObjects).
        "NotImplemented" => (ErrorKind::Other, explained("not implemented by this server")),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" if status != 403 => (
            ErrorKind::Other,
            explained("wrong region or endpoint for this bucket; check AWS_REGION"),
        ),
        _ => match status {
            403 => (
                ErrorKind::Auth,
                format!(
                    "access denied ({http}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and their permissions"
                ),
            ),
            404 => (ErrorKind::NotFound, format!("not found ({http})")),
            501 => (ErrorKind::Other, explained("not implemented by this server")),
            429 | 500..=599 => (ErrorKind::Transient, explained("temporary failure")),
            301 | 307 => (
                ErrorKind::Other,
                explained("wrong region or endpoint for this bucket; check AWS_REGION"),
            ),
            _ => (ErrorKind::Other, explained("request failed")),
        },
    }
}

/// The text of the first `<tag>...</tag>` in `xml`, if any.
fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim())
}

/// Server messages are for people: keep them to one short line.
fn shorten(message: &str) -> String {
    let line: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 200 {
        format!("{}...", line.chars().take(200).collect::<String>())
    } else {
        line
    }
}

/// The URL without its query string, where presigned URLs keep credential and signature.
fn without_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// Remove any trace of the signed query string from text about a request to `url`.
fn redact(text: &str, url: &Url) -> String {
    let mut text = text.replace(url.as_str(), &without_query(url));
    if let Some(query) = url.query().filter(|q| !q.is_empty()) {
        text = text.replace(query, "<redacted>");
    }
    // Whatever else echoed part of a signed request (a server message, say), cut it.
    for marker in [
        "X-Amz-Credential",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
    ] {
        if let Some(at) = text.find(marker) {
            text.truncate(at);
            text.push_str("<redacted>");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| list.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
    ];

    #[test]
    fn config_from_vars_defaults_and_precedence() {
        let c = S3Config::from_vars("b", "/p/q/", None, vars(&KEYS)).unwrap();
        assert_eq!(c.bucket, "b");
        assert_eq!(c.prefix, "p/q");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.session_token, None);

        let mut all = KEYS.to_vec();
        all.extend([
            ("AWS_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL_S3", "http://env:9000"),
            ("AWS_SESSION_TOKEN", "tok-tok"),
        ]);
        let c = S3Config::from_vars("b", "", None, vars(&all)).unwrap();
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.endpoint.as_deref(), Some("http://env:9000"));
        assert_eq!(c.session_token.as_deref(), Some("tok-tok"));
        let c = S3Config::from_vars("b", "", Some("http://flag:1"), vars(&all)).unwrap();
        assert_eq!(
            c.endpoint.as_deref(),
            Some("http://flag:1"),
            "the flag wins"
        );
    }

    #[test]
    fn config_requires_credentials() {
        for list in [&KEYS[..1], &KEYS[1..], &[][..]] {
            let err = S3Config::from_vars("b", "", None, vars(list)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid);
            assert_eq!(
                err.to_string(),
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set for s3:// destinations"
            );
        }
        let empty = [("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "")];
        assert!(S3Config::from_vars("b", "", None, vars(&empty)).is_err());
    }

    #[test]
    fn config_debug_hides_secrets() {
        let mut all = KEYS.to_vec();
        all.push(("AWS_SESSION_TOKEN", "tok-tok-secret"));
        let c = S3Config::from_vars("b", "", None, vars(&all)).unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("tok-tok-secret"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        let storage = S3Storage::new(c).unwrap();
        let shown = format!("{storage:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("tok-tok-secret"), "{shown}");
    }

    fn storage(bucket: &str, prefix: &str, endpoint: Option<&str>) -> S3Storage {
        let c = S3Config::from_vars(bucket, prefix, endpoint, vars(&KEYS)).unwrap();
        S3Storage::new(c).unwrap()
    }

    #[test]
    fn url_styles_keys_and_describe() {
        let aws = storage("my-bucket", "db/app", None);
        assert_eq!(aws.describe(), "s3://my-bucket/db/app");
        assert_eq!(
            aws.bucket
                .object_url(&aws.object_key("x/y").unwrap())
                .as_str(),
            "https://my-bucket.s3.us-east-1.amazonaws.com/db/app/x/y"
        );
        let dotted = storage("my.bucket", "", None);
        assert_eq!(dotted.describe(), "s3://my.bucket");
        assert_eq!(
            dotted
                .bucket
                .object_url(&dotted.object_key("k").unwrap())
                .as_str(),
            "https://s3.us-east-1.amazonaws.com/my.bucket/k"
        );
        let custom = storage("b", "", Some("http://127.0.0.1:9000"));
        assert_eq!(
            custom
                .bucket
                .object_url(&custom.object_key("k").unwrap())
                .as_str(),
            "http://127.0.0.1:9000/b/k"
        );
        for bad in ["/abs", "a/../b", "", "a//b"] {
            assert_eq!(
                custom.object_key(bad).unwrap_err().kind(),
                ErrorKind::Invalid,
                "{bad:?}"
            );
        }
        let err = S3Storage::new(
            S3Config::from_vars("b", "", Some("localhost:9000"), vars(&KEYS)).unwrap(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    }

    #[test]
    fn statuses_and_codes_map_to_kinds() {
        let xml = |code: &str| {
            format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>Some words.</Message></Error>")
        };
        let kind = |status, body: &str| classify_status(status, body, "b").0;
        assert_eq!(kind(403, &xml("SignatureDoesNotMatch")), ErrorKind::Auth);
        assert_eq!(kind(403, &xml("InvalidAccessKeyId")), ErrorKind::Auth);
        assert_eq!(kind(403, &xml("AccessDenied")), ErrorKind::Auth);
        assert_eq!(kind(403, ""), ErrorKind::Auth);
        assert_eq!(kind(400, &xml("ExpiredToken")), ErrorKind::Auth);
        assert_eq!(kind(404, &xml("NoSuchKey")), ErrorKind::NotFound);
        assert_eq!(kind(404, ""), ErrorKind::NotFound);
        assert_eq!(kind(404, &xml("NoSuchBucket")), ErrorKind::NotFound);
        assert_eq!(kind(503, &xml("SlowDown")), ErrorKind::Transient);
        assert_eq!(kind(500, ""), ErrorKind::Transient);
        assert_eq!(kind(429, ""), ErrorKind::Transient);
        assert_eq!(kind(400, &xml("RequestTimeout")), ErrorKind::Transient);
        assert_eq!(kind(200, &xml("InternalError")), ErrorKind::Transient);
        assert_eq!(kind(400, &xml("InvalidArgument")), ErrorKind::Other);
        assert_eq!(kind(301, &xml("PermanentRedirect")), ErrorKind::Other);
        assert_eq!(kind(409, ""), ErrorKind::Other);
        assert_eq!(kind(501, ""), ErrorKind::Other);
        assert_eq!(kind(501, &xml("NotImplemented")), ErrorKind::Other);
        assert_eq!(kind(400, &xml("NotImplemented")), ErrorKind::Other);

        let (_, detail) = classify_status(403, &xml("SignatureDoesNotMatch"), "b");
        assert_eq!(
            detail,
            "access denied (HTTP 403 SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        );
        let (_, detail) = classify_status(404, &xml("NoSuchBucket"), "bk");
        assert_eq!(
            detail,
            "bucket \"bk\" does not exist (HTTP 404 NoSuchBucket)"
        );
        let (_, detail) = classify_status(400, &xml("InvalidArgument"), "b");
        assert_eq!(
            detail,
            "request failed (HTTP 400 InvalidArgument: Some words.)"
        );
    }

    #[test]
    fn redaction_removes_signed_query() {
        let url: Url = "http://h:1/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F2024&X-Amz-Signature=abcdef"
            .parse()
            .unwrap();
        let text = format!("failed: {url} / {}", url.query().unwrap());
        let clean = redact(&text, &url);
        assert_eq!(clean, "failed: http://h:1/b/k / <redacted>");
        assert_eq!(
            redact("server said X-Amz-Signature=zzz oops", &url),
            "server said <redacted>"
        );
        assert_eq!(without_query(&url), "http://h:1/b/k");
    }

    #[test]
    fn xml_tags() {
        let body =
            "<Error><Code>NoSuchKey</Code><Message> The key\n does not exist. </Message></Error>";
        assert_eq!(xml_tag(body, "Code"), Some("NoSuchKey"));
        assert_eq!(
            xml_tag(body, "Message").map(shorten).as_deref(),
            Some("The key does not exist.")
        );
        assert_eq!(xml_tag(body, "Missing"), None);
        assert_eq!(xml_tag("<Code>unterminated", "Code"), None);
    }

    #[test]
    fn list_pages_decode_keys_and_follow_tokens() {
        let page = |body: &str| {
            parse_list_page(&format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
                 <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{body}</ListBucketResult>"
            ))
        };
        let p = page(
            "<Name>b</Name><Prefix>p</Prefix><EncodingType>url</EncodingType>\
             <IsTruncated>true</IsTruncated>\
             <Contents><Key>a+b%2Bc%20%C3%A9</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
             <ETag>&quot;x&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>\
             <Contents><Key>k&amp;%3C</Key><Size>0</Size></Contents>\
             <NextContinuationToken>t/1+=</NextContinuationToken>",
        )
        .unwrap();
        let keys: Vec<_> = p.objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
        assert_eq!(keys, [("a b+c é", 12), ("k&<", 0)]);
        assert_eq!(p.next_continuation_token.as_deref(), Some("t/1+="));
        // Without EncodingType, keys are taken as they are (entities decoded).
        let p = page("<Contents><Key>a+b%20&lt;</Key><Size>1</Size></Contents>").unwrap();
        assert_eq!(p.objects[0].key, "a+b%20<");
        assert_eq!(p.next_continuation_token, None);
        // A complete listing ends even with a token; a truncated one needs one.
        let p = page(
            "<IsTruncated>false</IsTruncated><NextContinuationToken>t</NextContinuationToken>",
        )
        .unwrap();
        assert_eq!(p.next_continuation_token, None);
        assert!(page("<IsTruncated>true</IsTruncated>").is_err());
        assert!(page("<IsTruncated>true</IsTruncated><NextContinuationToken/>").is_err());
        assert!(page("<Contents><Key>k</Key><Size>-1</Size></Contents>").is_err());
        assert!(page("<Contents><Size>1</Size></Contents>").is_err());
        assert!(parse_list_page("<Error><Code>NoSuchBucket</Code></Error>").is_err());
    }

    #[test]
    fn delete_objects_bodies_and_answers() {
        let body = delete_objects_body(&["a".to_string(), "b&<\r\"'é".to_string()]);
        assert_eq!(
            body,
            "<Delete><Object><Key>a</Key></Object>\
             <Object><Key>b&amp;&lt;&#xD;&quot;&apos;é</Key></Object><Quiet>true</Quiet></Delete>"
        );
        // The Content-MD5 header of a body, as S3 checks it (`openssl md5 -binary | base64`).
        assert_eq!(
            super::super::sigv4::base64(&md5::Md5::digest(b"<Delete></Delete>")),
            "R2cEG0GhQVRNiyXR3QnSyw=="
        );
        let failures = parse_delete_result(
            "<?xml version=\"1.0\"?><DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Deleted><Key>gone</Key></Deleted>\
             <Error><Key>x&amp;y</Key><Code>AccessDenied</Code><Message>No &lt;way&gt;.</Message></Error>\
             <Error><Key>z</Key><Code>InternalError</Code></Error></DeleteResult>",
        )
        .unwrap();
        let got: Vec<_> = failures
            .iter()
            .map(|f| (f.key.as_str(), f.code.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("x&y", "AccessDenied", "No <way>."),
                ("z", "InternalError", "")
            ]
        );
        assert!(parse_delete_result("<DeleteResult/>").unwrap().is_empty());
        assert!(parse_delete_result("<Error><Code>SlowDown</Code></Error>").is_err());
        assert_eq!(
            complete_multipart_body(&["\"e1\"".to_string(), "e2".to_string()]),
            "<CompleteMultipartUpload><Part><ETag>&quot;e1&quot;</ETag><PartNumber>1</PartNumber></Part>\
             <Part><ETag>e2</ETag><PartNumber>2</PartNumber></Part></CompleteMultipartUpload>"
        );
    }

    #[test]
    fn part_size_below_s3_minimum_is_raised_to_it() {
        let s = storage("b", "", Some("http://127.0.0.1:1")).with_part_size(1024);
        assert_eq!(s.part_size, MIN_PART_SIZE);
    }
}
