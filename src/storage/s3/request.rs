//! One request to S3: signed, sent, and retried.
//!
//! Every operation of [`S3Storage`] describes its request as a [`Req`] (method, object,
//! query, headers, [`Payload`]) and hands it to [`S3Storage::exchange`], inside
//! [`S3Storage::retry`] but for a best-effort abort. The exchange signs it with SigV4
//! ([`crate::storage::sigv4`]) for the bucket as it is addressed now, with the keys of now,
//! and sends it with ureq; a file body goes out by positional reads with an explicit
//! `Content-Length` (S3 refuses chunked uploads) and `Expect: 100-continue`. What comes back
//! is a response to read, or a failure classified by [`super::errors`].
//!
//! Three answers are acted on before they become errors, each once per request: temporary
//! keys the store calls expired are fetched again ([`S3Storage::credentials`] renews them
//! ahead of their expiry otherwise); a `RequestTimeTooSkewed` makes every later request
//! signed with the store's clock, as the AWS SDKs do; and a bucket AWS says is in another
//! region is followed there. Transient failures are then tried again, a bounded number of
//! times with exponential backoff and jitter, each request on its own.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use md5::Digest as _;

use super::config::make_bucket;
use super::documents::xml_text;
use super::errors::{classify_status, wrong_region, AnswerContext};
use super::{bump, S3Storage};
use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::sigv4::{self, Bucket, Credentials};
use crate::storage::{FileRange, Storage as _};
use crate::utc::UtcTime;

/// How many times a request is tried before a transient failure is reported.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Error bodies are small XML documents; never read more than this of one.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;
/// A page of 1000 keys is a few hundred KiB of XML.
const XML_BODY_LIMIT: u64 = 32 * 1024 * 1024;

/// Files and response bodies are read this much at a time.
pub(super) const COPY_BUFFER: usize = 64 * 1024;

/// Temporary keys are asked for again this long before they expire (as the AWS SDKs do).
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// A source that failed to renew keys still valid is asked again after this long, not at
/// every request.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// The keys of an [`S3Storage`].
pub(super) struct Keys {
    /// `None` until the source is first asked (at the first request).
    pub(super) current: Option<Arc<Credentials>>,
    pub(super) expires: Option<UtcTime>,
    pub(super) last_failure: Option<std::time::Instant>,
}

/// What a request sends.
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
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
pub(super) enum Method {
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
    /// The keys to sign with now: asked for at the first request when they come from a
    /// source, and again when they are about to expire. A renewal that fails while the keys
    /// still work is a warning (tried again after [`RENEW_RETRY`]); once they have expired,
    /// an error.
    fn credentials(&self) -> Result<Arc<Credentials>> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(source) = &self.credential_source else {
            if let Some(current) = &keys.current {
                return Ok(Arc::clone(current));
            }
            return Err(Error::new(ErrorKind::Auth, "no S3 credentials"));
        };
        // Expiry times are the issuer's (AWS's) clock, which the store's time stands for.
        let now = self.signing_time().millis();
        let left = keys.expires.map(|at| at.millis() - now);
        let renew_before = i64::try_from(RENEW_BEFORE.as_millis()).unwrap_or(i64::MAX);
        let usable = keys.current.is_some() && left.is_none_or(|left| left > 0);
        let due = keys.current.is_none() || left.is_some_and(|left| left < renew_before);
        let resting = keys
            .last_failure
            .is_some_and(|at| at.elapsed() < RENEW_RETRY);
        if let (Some(current), false) = (&keys.current, due && !(usable && resting)) {
            return Ok(Arc::clone(current));
        }
        match source.fetch() {
            Ok(fetched) => {
                let first = keys.current.is_none();
                let until = fetched
                    .expires
                    .map_or_else(|| "no expiry".to_string(), |at| format!("valid until {at}"));
                if first {
                    log::debug!("S3 credentials from {} ({until})", source.describe());
                } else {
                    log::info!(
                        "S3 credentials renewed from {} ({until})",
                        source.describe()
                    );
                }
                let current =
                    Arc::new(Credentials::new(fetched.key, fetched.secret, fetched.token));
                keys.current = Some(Arc::clone(&current));
                keys.expires = fetched.expires;
                keys.last_failure = None;
                Ok(current)
            }
            Err(err) => {
                keys.last_failure = Some(std::time::Instant::now());
                match (&keys.current, keys.expires) {
                    (Some(current), Some(at)) if usable => {
                        log::warn!("{err}; the current ones work until {at}");
                        Ok(Arc::clone(current))
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// Take the current keys as expired: the next request asks the source for new ones.
    fn expire_keys(&self) {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.expires = Some(UtcTime::from_millis(self.signing_time().millis()));
        keys.last_failure = None;
    }

    /// The bucket as requests address it now.
    pub(super) fn bucket(&self) -> Bucket {
        self.bucket
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Run `attempt` until it succeeds, fails for good, or has failed transiently
    /// `max_attempts` times, sleeping with exponential backoff and jitter in between.
    pub(super) fn retry<T>(&self, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
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

    /// One HTTP exchange: `req` signed for the bucket as it is now. Returns the response if
    /// its status is a success, and otherwise an error classified from the status, the S3
    /// error code, or the transport failure. A bucket that AWS says is in another region is
    /// followed there once (the request signed again for it).
    pub(super) fn exchange(&self, req: &Req<'_>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut followed = false;
        let mut corrected = false;
        let mut renewed = false;
        loop {
            let bucket = self.bucket();
            match self.exchange_once(&bucket, req) {
                Ok(response) => return Ok(response),
                Err(Failed::Error(err)) => return Err(err),
                Err(Failed::Answer(answer)) => {
                    let cx = AnswerContext {
                        bucket: bucket.name(),
                        region: bucket.region(),
                        bucket_region: answer.bucket_region.as_deref(),
                    };
                    let code = xml_text(&answer.body, "Code");
                    // Temporary keys the store finds expired before their stated expiry (a
                    // revoked session, an issuer's clock): fetched again once, at once.
                    if !renewed
                        && self.credential_source.is_some()
                        && matches!(code.as_str(), "ExpiredToken" | "TokenRefreshRequired")
                    {
                        renewed = true;
                        self.expire_keys();
                        continue;
                    }
                    if !corrected && code == "RequestTimeTooSkewed" {
                        corrected = true;
                        if self.correct_clock(&answer) {
                            continue;
                        }
                    }
                    if !followed && self.aws_endpoint {
                        if let Some(region) = wrong_region(answer.status, &answer.body, &cx) {
                            followed = true;
                            if self.follow_region(&bucket, &region) {
                                continue;
                            }
                        }
                    }
                    let (kind, detail) = classify_status(answer.status, &answer.body, &cx);
                    let code = xml_text(&answer.body, "Code");
                    return Err(self
                        .error(kind, req.op, req.key, self.redact(&detail))
                        .with_response(answer.status, &code));
                }
            }
        }
    }

    /// Sign with the store's time from now on, from its answer to a request signed too far
    /// from it (`<ServerTime>`, else the `Date` header); false if the answer says nothing
    /// usable or this host's time is not that far off.
    fn correct_clock(&self, answer: &Answer) -> bool {
        let server = Some(xml_text(&answer.body, "ServerTime"))
            .filter(|t| !t.is_empty())
            .and_then(|t| UtcTime::parse_rfc3339(&t).ok())
            .or_else(|| answer.date.as_deref().and_then(parse_http_date));
        let Some(server) = server else {
            return false;
        };
        let offset = server.millis() - UtcTime::now().millis();
        if offset.abs() < 60_000 {
            return false;
        }
        let was = self.clock_offset.swap(offset, Ordering::Relaxed);
        if (was - offset).abs() >= 60_000 {
            log::warn!(
                "{}: this host's clock is {} s {} the store's: signing requests with the \
                 store's time (set the clock right: NTP)",
                self.describe(),
                offset.abs() / 1000,
                if offset > 0 { "behind" } else { "ahead of" }
            );
        }
        true
    }

    /// The time to sign with: this host's, corrected by what the store said its time is.
    fn signing_time(&self) -> UtcTime {
        UtcTime::from_millis(UtcTime::now().millis() + self.clock_offset.load(Ordering::Relaxed))
    }

    /// Address the bucket in `region` from now on, unless another request already did;
    /// false if it cannot be (a region name that makes no host name).
    fn follow_region(&self, was: &Bucket, region: &str) -> bool {
        let Ok(moved) = make_bucket(None, self.addressing, was.name(), region) else {
            return false;
        };
        // Named before the lock is taken: `describe` reads the bucket.
        let destination = self.describe();
        let mut bucket = self
            .bucket
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if bucket.region() == was.region() {
            log::warn!(
                "{destination}: the bucket is in region {region}, not {}: using {region} \
                 (set AWS_REGION={region} to go there directly)",
                was.region()
            );
            *bucket = moved;
        }
        true
    }

    fn exchange_once(
        &self,
        bucket: &Bucket,
        req: &Req<'_>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, Failed> {
        let credentials = self.credentials().map_err(|err| {
            Failed::Error(err.with_context(format!("{}: {} {}", self.describe(), req.op, req.key)))
        })?;
        bump(&self.counters.requests);
        let url = bucket.url(req.object, req.query);
        let payload_hash = match req.payload {
            Payload::Empty => sigv4::EMPTY_SHA256.to_string(),
            Payload::Bytes(data) => sigv4::sha256_hex(data),
            // Not read twice to hash it: its Content-MD5 protects it instead.
            Payload::File { .. } => sigv4::UNSIGNED_PAYLOAD.to_string(),
        };
        let signed = bucket.sign_at(
            &credentials,
            req.method.as_str(),
            &url,
            req.headers,
            &payload_hash,
            self.signing_time(),
        );
        let headers = req
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .chain(signed.iter().map(|(n, v)| (*n, v.as_str())));
        let uri = url.as_str();
        let mut source = None;
        let result = match req.method {
            Method::Get => with_headers(self.agent.get(uri), headers).call(),
            Method::Delete => with_headers(self.agent.delete(uri), headers).call(),
            Method::Put | Method::Post => {
                let builder = if req.method == Method::Put {
                    self.agent.put(uri)
                } else {
                    self.agent.post(uri)
                };
                let builder = with_headers(builder, headers);
                match req.payload {
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
            return Err(Failed::Error(Error::from(failure).with_context(format!(
                "{}: {} {}: reading the source file",
                self.describe(),
                req.op,
                req.key
            ))));
        }
        match result {
            Ok(response) if response.status().is_success() => {
                log::debug!(
                    "{} {}: HTTP {}",
                    req.op,
                    req.key,
                    response.status().as_u16()
                );
                Ok(response)
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let bucket_region = header("x-amz-bucket-region");
                let date = header("date");
                let body = match response
                    .into_body()
                    .into_with_config()
                    .limit(ERROR_BODY_LIMIT)
                    .lossy_utf8(true)
                    .read_to_string()
                {
                    Ok(body) => body,
                    // An error document cut short says nothing reliable (a 403 may be a
                    // clock skew the client corrects, or keys it renews): the answer was
                    // lost, as any cut transfer, and is asked for again.
                    Err(ureq::Error::BodyExceedsLimit(_)) => String::new(),
                    Err(err) => {
                        let detail = format!("HTTP {status}, the answer cut short: {err}");
                        return Err(Failed::Error(self.error(
                            ErrorKind::Transient,
                            req.op,
                            req.key,
                            detail,
                        )));
                    }
                };
                Err(Failed::Answer(Answer {
                    status,
                    body,
                    bucket_region,
                    date,
                }))
            }
            Err(err) => Err(Failed::Error(
                self.transport_error(req.op, req.key, &url, &err),
            )),
        }
    }

    /// Read a whole (small) success body, as text.
    pub(super) fn read_text(
        &self,
        op: &str,
        key: &str,
        response: ureq::http::Response<ureq::Body>,
    ) -> Result<String> {
        response
            .into_body()
            .into_with_config()
            .limit(XML_BODY_LIMIT)
            .read_to_string()
            .map_err(|e| {
                let kind = match e {
                    ureq::Error::BodyExceedsLimit(_) => ErrorKind::Other,
                    _ => ErrorKind::Transient,
                };
                self.error(kind, op, key, format!("reading the response: {e}"))
            })
    }

    /// One attempt at a page of a bucket listing (ListObjectsV2, ListMultipartUploads): a
    /// GET on the bucket with `query`, its XML answer handed to `parse`. `prefix` names the
    /// listing in errors; an answer `parse` refuses is a failure for good. The caller pages
    /// and retries.
    pub(super) fn get_listing_page<T>(
        &self,
        op: &str,
        prefix: &str,
        query: &[(&str, &str)],
        parse: impl FnOnce(&str) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let req = Req {
            op,
            key: prefix,
            method: Method::Get,
            object: None,
            query,
            headers: &[],
            payload: Payload::Empty,
        };
        let response = self.exchange(&req)?;
        let text = self.read_text(op, prefix, response)?;
        parse(&text)
            .map_err(|e| self.error(ErrorKind::Other, op, prefix, format!("bad response: {e}")))
    }

    /// The `Content-MD5` header of a payload: the base64 of its MD5, read from the file
    /// for a file range (once, before the attempts to send it).
    pub(super) fn content_md5(&self, op: &str, key: &str, payload: Payload<'_>) -> Result<String> {
        let mut md5 = md5::Md5::new();
        match payload {
            Payload::Empty => {}
            Payload::Bytes(data) => md5.update(data),
            Payload::File { file, offset, len } => {
                let mut range = FileRange::new(file, offset, len);
                let mut buf = vec![0u8; COPY_BUFFER];
                loop {
                    let n = match range.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(Error::from(e).with_context(format!(
                                "{}: {op} {key}: reading the source file",
                                self.describe()
                            )))
                        }
                    };
                    md5.update(&buf[..n]);
                }
            }
        }
        Ok(sigv4::base64(&md5.finalize()))
    }
}

/// One request: what [`S3Storage::exchange`] signs and sends.
pub(super) struct Req<'a> {
    /// The operation, for messages (`PUT`, `UploadPart 2/3`...).
    pub(super) op: &'a str,
    /// The relative key (or a label for many), for messages.
    pub(super) key: &'a str,
    pub(super) method: Method,
    /// The object key (the bucket itself if `None`).
    pub(super) object: Option<&'a str>,
    pub(super) query: &'a [(&'a str, &'a str)],
    /// Headers to send and sign besides the signature's own.
    pub(super) headers: &'a [(&'a str, String)],
    pub(super) payload: Payload<'a>,
}

/// A request that failed: a server's answer (kept whole, to decide on following the bucket
/// to another region) or any other error.
enum Failed {
    Answer(Answer),
    Error(Error),
}

struct Answer {
    status: u16,
    body: String,
    /// The `x-amz-bucket-region` header: where AWS says the bucket is.
    bucket_region: Option<String>,
    /// The `Date` header: the store's time.
    date: Option<String>,
}

/// An HTTP date (RFC 9110's IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`), if it is one.
fn parse_http_date(text: &str) -> Option<UtcTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let day: u32 = day.parse().ok()?;
    UtcTime::parse_rfc3339(&format!("{year}-{month:02}-{day:02}T{time}Z")).ok()
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

fn with_headers<'a, B>(
    mut builder: ureq::RequestBuilder<B>,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> ureq::RequestBuilder<B> {
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
}

/// Read what is left of a small success body so that the connection can be reused.
pub(super) fn drain(response: ureq::http::Response<ureq::Body>) {
    let mut reader = response
        .into_body()
        .into_with_config()
        .limit(ERROR_BODY_LIMIT)
        .reader();
    let _ = io::copy(&mut reader, &mut io::sink());
}

pub(super) fn header_u64(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let at = |text| parse_http_date(text).map(|t| t.to_rfc3339());
        assert_eq!(
            at("Sun, 06 Dec 2026 21:35:07 GMT").as_deref(),
            Some("2026-12-06T21:35:07.000Z")
        );
        assert_eq!(
            at("Tue, 01 Feb 2028 00:00:00 GMT").as_deref(),
            Some("2028-02-01T00:00:00.000Z")
        );
        for bad in [
            "",
            "Sun, 06 Dec 2026 21:35:07 UTC",
            "Sun, 06 Foo 2026 21:35:07 GMT",
            "x y",
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }
}
