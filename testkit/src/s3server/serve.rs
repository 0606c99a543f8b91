//! How the test server serves a request, on the tokio runtime of its thread (started by
//! [`S3Server::serve`](super::S3Server::serve)): accept the connection (TLS if asked), play
//! the request's HTTP fault (500, 503 SlowDown, an answer truncated or dropped), refuse what
//! AWS would refuse (a chunked upload, another bucket, another region's host), record and
//! log the request, and pass the rest to s3s-fs. [`CutBody`], every answer's body, is how a
//! download is cut short.
//!
//! The request path, apart from the server's controls (`s3server.rs`), which only set what
//! it reads in [`Shared`].

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{CONTENT_LENGTH, EXPECT};
use hyper_util::rt::TokioIo;
use s3s::service::S3Service;

use super::uploads::list_uploads;
use super::{Request, Shared, BUCKET};
use crate::faults::Fault;

pub(super) async fn accept_loop(
    listener: TcpListener,
    service: S3Service,
    shared: Arc<Shared>,
    root: PathBuf,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let socket = tokio::select! {
            _ = &mut stopped => return, // drops the listener: the port is closed
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        let (service, shared, root) = (service.clone(), Arc::clone(&shared), root.clone());
        let handler = hyper::service::service_fn(move |req| {
            handle(service.clone(), Arc::clone(&shared), root.clone(), req)
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(socket), handler)
                        .await;
                }
                // A client that does not trust the certificate closes the handshake.
                Some(tls) => {
                    if let Ok(stream) = tls.accept(socket).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), handler)
                            .await;
                    }
                }
            }
        });
    }
}

async fn handle(
    service: S3Service,
    shared: Arc<Shared>,
    root: PathBuf,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<CutBody>, s3s::HttpError> {
    let fault = shared.pick_fault();
    shared.count(fault);
    let expect_continue = (req.headers().get(EXPECT))
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (status, code, message) = match fault {
        Fault::Error500 => (
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        Fault::SlowDown503 => (503, "SlowDown", "Please reduce your request rate."),
        Fault::Truncate => {
            // A HEAD answer has a Content-Length but no body.
            let head = req.method() == hyper::Method::HEAD;
            let mut response = respond(service, &shared, &root, req).await?;
            let length = (response.headers().get(CONTENT_LENGTH))
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .or_else(|| response.body().size_hint().exact())
                .filter(|_| !head)
                .unwrap_or(0);
            if length == 0 {
                // Nothing to cut after the headers: the work is done, the answer lost.
                return Err(s3s::HttpError::new("test fault: answer dropped".into()));
            }
            let cut = shared.fault_rng.next() % length;
            let body = response.body_mut();
            body.left = Some(body.left.map_or(cut, |left| left.min(cut)));
            return Ok(response);
        }
        Fault::Pass | Fault::Reset | Fault::Stall => {
            return respond(service, &shared, &root, req).await
        }
    };
    // The request is seen (and recorded) but not served.
    note(&shared, &req);
    // Without `Expect: 100-continue` the client sends its body right away: read it, or
    // hyper, unable to drain much, would close with unread data, which resets the
    // connection before the client sees the answer. With it, the client waits, and hyper
    // sends no 100 Continue unless the body is read: an error answer means "don't send".
    if !expect_continue {
        let mut body = req.into_body();
        while let Some(Ok(_)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
        }
    }
    Ok(s3_error(status, code, message))
}

/// Record a request as it arrives, and append it to the request log if there is one.
fn note(shared: &Shared, req: &hyper::Request<hyper::body::Incoming>) {
    if let Some(log) = shared.request_log.lock().unwrap().as_mut() {
        // One write per line on an O_APPEND file: nothing is held back in a buffer.
        let _ = log.write_all(log_line(req).as_bytes());
    }
    shared.requests.lock().unwrap().push(record(req));
}

/// Serve one request: record it, refuse what AWS would refuse, or pass it to s3s-fs.
async fn respond(
    service: S3Service,
    shared: &Shared,
    root: &Path,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<CutBody>, s3s::HttpError> {
    let seen = record(&req);
    let chunked_put = seen.chunked && seen.method == "PUT";
    let (method_is_post, has_delete) = (seen.method == "POST", seen.has_param("delete"));
    let cut = if seen.method == "GET" && !seen.has_param("list-type") {
        shared.cut_next_download.lock().unwrap().take()
    } else {
        None
    };
    let host = (req.headers().get("host"))
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let bucket = if let Some(domain) = &shared.virtual_domain {
        // Another region's host, where AWS redirects: `walsync-test.s3.OTHER.amazonaws.com`.
        let (bucket, rest) = host.split_once('.').unwrap_or(("", ""));
        if rest != domain.as_str() && rest.ends_with(".amazonaws.com") {
            let region = domain
                .trim_start_matches("s3.")
                .trim_end_matches(".amazonaws.com");
            let message = "The bucket you are attempting to access must be addressed using \
                           the specified endpoint. Please send all future requests to this \
                           endpoint.";
            let mut response = s3_error(301, "PermanentRedirect", message);
            response
                .headers_mut()
                .insert("x-amz-bucket-region", region.parse().unwrap());
            return Ok(response);
        }
        bucket
    } else {
        seen.path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
    };
    let other_bucket = bucket != BUCKET;
    note(shared, &req);
    let next_error = shared.next_error.lock().unwrap().take();
    if let Some((status, code, message)) = next_error {
        return Ok(s3_error(status, &code, &message));
    }
    if chunked_put {
        let message = "You must provide the Content-Length HTTP header.";
        return Ok(s3_error(411, "MissingContentLength", message));
    }
    // s3s-fs would create a missing bucket on PutObject, and say NoSuchKey on GetObject.
    if other_bucket {
        let message = "The specified bucket does not exist";
        return Ok(s3_error(404, "NoSuchBucket", message));
    }
    let delete_objects = method_is_post && has_delete;
    if delete_objects && *shared.refuse_delete_objects.lock().unwrap() {
        let message = "A header you provided implies functionality that is not implemented";
        return Ok(s3_error(501, "NotImplemented", message));
    }
    // ListMultipartUploads, which s3s-fs lacks: answered here, so its signature is not
    // checked (every other request's is, by s3s).
    if seen.method == "GET" && seen.has_param("uploads") {
        let body = list_uploads(root, req.uri().query().unwrap_or(""));
        return Ok(hyper::Response::builder()
            .status(200)
            .header("content-type", "application/xml")
            .body(CutBody::new(s3s::Body::from(body), None))
            .unwrap());
    }
    let canned = shared.delete_objects_answer.lock().unwrap().clone();
    if let Some(body) = canned.filter(|_| delete_objects) {
        return Ok(hyper::Response::builder()
            .status(200)
            .header("content-type", "application/xml")
            .body(CutBody::new(s3s::Body::from(body), None))
            .unwrap());
    }
    let response = hyper::service::Service::call(&service, req).await?;
    Ok(response.map(|body| CutBody::new(body, cut)))
}

fn s3_error(status: u16, code: &str, message: &str) -> hyper::Response<CutBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(CutBody::new(s3s::Body::from(body), None))
        .unwrap()
}

/// `METHOD PATH[?QUERY] AGENT\n`: the query without its signature parameters, and the first
/// word of the User-Agent (`-` if none), which tells clients apart where the key does not
/// (a multi-object delete names its keys in the body).
fn log_line(req: &hyper::Request<hyper::body::Incoming>) -> String {
    let query: Vec<&str> = (req.uri().query().unwrap_or("").split('&'))
        .filter(|p| !p.is_empty() && !p.starts_with("X-Amz-"))
        .collect();
    let mut line = format!("{} {}", req.method(), req.uri().path());
    if !query.is_empty() {
        line.push('?');
        line.push_str(&query.join("&"));
    }
    let agent = (req.headers().get("user-agent"))
        .and_then(|v| v.to_str().ok()?.split_whitespace().next())
        .unwrap_or("-");
    line.push(' ');
    line.push_str(agent);
    line.push('\n');
    line
}

fn record(req: &hyper::Request<hyper::body::Incoming>) -> Request {
    let headers = req.headers();
    Request {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split('=').next().unwrap().to_string())
            .collect(),
        content_length: headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        chunked: headers
            .get_all("transfer-encoding")
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("chunked"))),
        range: headers
            .get("range")
            .and_then(|v| Some(v.to_str().ok()?.to_string())),
        authorization: headers
            .get("authorization")
            .and_then(|v| Some(v.to_str().ok()?.to_string())),
        content_md5: headers
            .get("content-md5")
            .and_then(|v| Some(v.to_str().ok()?.to_string())),
    }
}

/// A response body that fails after `left` bytes, if given, which breaks the connection.
pub(super) struct CutBody {
    inner: Pin<Box<s3s::Body>>,
    left: Option<u64>,
    /// Whether hyper has had its chance to send what it holds before the body fails.
    flushed: bool,
}

impl CutBody {
    pub(super) fn new(body: s3s::Body, left: Option<u64>) -> CutBody {
        CutBody {
            inner: Box::pin(body),
            left,
            flushed: false,
        }
    }
}

impl Body for CutBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == Some(0) {
            if !self.flushed {
                // Pending once, so that hyper sends the headers and the bytes before the cut
                // (it flushes while the body waits) instead of dropping them with the error.
                self.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err("test fault: download cut".into())));
        }
        let frame = match ready!(self.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Some(left) = self.left else {
            return Poll::Ready(Some(Ok(frame)));
        };
        Poll::Ready(Some(Ok(match frame.into_data() {
            Ok(mut data) => {
                data.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                self.left = Some(left - data.len() as u64);
                Frame::data(data)
            }
            Err(frame) => frame,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.left != Some(0) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
