//! An S3 server inside the test process: s3s-fs over a temporary directory, on 127.0.0.1.
//!
//! Requests are really signed and checked (SigV4 with [`S3Server::access_key`] and
//! [`S3Server::secret_key`]). The server runs on its own thread with its own tokio runtime, so
//! each test can have its own; [`S3Server::stop`] closes the port (connections are refused)
//! and [`S3Server::restart`] serves the same data on the same port again.
//!
//! Like AWS, the server refuses chunked uploads (`411 MissingContentLength`) and anything
//! addressed to another bucket (`404 NoSuchBucket`, where s3s-fs would create the bucket on a
//! PutObject). It records every request it receives ([`S3Server::requests`]) so tests can
//! check what was sent, and can cut a download short ([`S3Server::cut_next_download_after`]).
//!
//! It also plays the HTTP part of a [`FaultMix`] ([`S3Server::set_fault_mix`], at any time;
//! the TCP part is the fault proxy's, `faultproxy.rs`, and passes here): per request, with
//! seeded probabilities ([`Options::fault_seed`]), it answers `500 InternalError` or
//! `503 SlowDown` (an S3 XML error body) without doing the work, or does the work and
//! truncates the answer: the headers complete, with the full Content-Length, then the body
//! cut at a random point and the connection broken. An answer without a body to cut (most
//! PUTs, a HEAD) is dropped whole instead: the connection closes with no answer. What it
//! injected is counted ([`S3Server::fault_counts`]), with the requests it served as they
//! were as `passed`.
//!
//! s3s-fs quirks to know: an object `a` and an object `a/b` cannot coexist (files vs
//! directories), and listings echo `encoding-type=url` without encoding keys, so a key with `+`
//! or `%` comes back altered (`+` as a space). It lacks ListMultipartUploads: the server
//! answers it here, from s3s-fs's files, with the same quirk, each upload's start time being
//! its metadata file's mtime ([`S3Server::age_uploads`] moves it back).
//!
//! With [`Options::tls`] it speaks HTTPS only, with a certificate of a private CA made for
//! the test ([`PrivateCa`]).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{CONTENT_LENGTH, EXPECT};
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use walsync::storage::s3::{S3Config, S3Storage};

use super::faults::{Fault, FaultCounts, FaultMix, SharedRng};

const BUCKET: &str = "walsync-test";
const ACCESS_KEY: &str = "walsync-test-key";
const SECRET_KEY: &str = "walsync-test-secret";
const REGION: &str = "us-east-1";

/// One request as the server saw it. The query keeps parameter names only (no signatures).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path, e.g. `/walsync-test/prefix/key`.
    pub path: String,
    /// Names of the query parameters, e.g. `["partNumber", "uploadId", "X-Amz-..."]`.
    pub query: Vec<String>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The `Range` header, e.g. `bytes=100-`.
    pub range: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Content-MD5` header.
    pub content_md5: Option<String>,
}

impl Request {
    pub fn has_param(&self, name: &str) -> bool {
        self.query.iter().any(|q| q == name)
    }
}

/// What [`S3Server::start_with`] may change from [`S3Server::start`]'s defaults (the
/// benchmark server, `examples/s3-server.rs`, uses them).
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Serve this directory (created if missing) instead of a new temporary one, which is
    /// then not removed when the server is dropped.
    pub root: Option<PathBuf>,
    /// Listen on this port of 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Also append every request to this file as a line `METHOD PATH[?QUERY] AGENT` (the
    /// query without its `X-Amz-*` signature parameters; the User-Agent's first word),
    /// written as it arrives.
    pub request_log: Option<PathBuf>,
    /// Accept these (access key, secret key) instead of the default test keys, e.g. keys
    /// the secrets test can recognise wherever they leak.
    pub credentials: Option<(String, String)>,
    /// Seeds the choice of faults ([`S3Server::set_fault_mix`]).
    pub fault_seed: u64,
    /// Serve HTTPS only, with this certificate.
    pub tls: Option<PrivateCa>,
    /// Take the bucket from the Host header (virtual-hosted style) under the domain
    /// `s3.test` ([`S3Server::virtual_host_endpoint`]), which no resolver knows: clients
    /// reach it through a CONNECT proxy ([`S3Server::connect_proxy`]).
    pub virtual_host: bool,
    /// Pose as AWS S3 with the bucket in this region: virtual-hosted under
    /// `s3.REGION.amazonaws.com` (reached through [`S3Server::connect_proxy`], with a
    /// [`PrivateCa::for_names`] certificate in [`Options::tls`]), and a `301
    /// PermanentRedirect` with `x-amz-bucket-region` for a request to another region's host.
    pub aws_region: Option<String>,
}

/// A private certificate authority made for one test, and a certificate it signed for
/// `127.0.0.1` and `localhost`.
#[derive(Clone)]
pub struct PrivateCa {
    /// The CA's certificate (PEM): what a client must trust.
    pub ca_pem: String,
    /// The server's certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for PrivateCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateCa")
    }
}

impl PrivateCa {
    pub fn new() -> PrivateCa {
        PrivateCa::for_names(&["127.0.0.1", "localhost"])
    }

    /// A CA and a server certificate for `names` (host names, `*.` wildcards, addresses).
    pub fn for_names(names: &[&str]) -> PrivateCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "walsync test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        PrivateCa {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

pub struct S3Server {
    /// The temporary directory behind `root`, if the server made one (removed on drop).
    _temp: Option<tempfile::TempDir>,
    root: PathBuf,
    addr: SocketAddr,
    access_key: String,
    secret_key: String,
    tls: Option<PrivateCa>,
    /// The domain under which the Host header names the bucket, if it does.
    virtual_domain: Option<String>,
    shared: Arc<Shared>,
    running: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

impl S3Server {
    /// Serve a fresh bucket on a free port.
    pub fn start() -> S3Server {
        S3Server::start_with(Options::default())
    }

    /// Serve with other [`Options`] than the defaults.
    pub fn start_with(options: Options) -> S3Server {
        let (temp, root) = match options.root {
            Some(root) => (None, root),
            None => {
                let temp = tempfile::tempdir().expect("temporary directory");
                let root = temp.path().to_path_buf();
                (Some(temp), root)
            }
        };
        // An s3s-fs bucket is a directory under the root.
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket directory");
        let request_log = options.request_log.map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("request log {}: {e}", path.display()))
        });
        let listener = TcpListener::bind(("127.0.0.1", options.port)).expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        let virtual_domain = match (&options.aws_region, options.virtual_host) {
            (Some(region), _) => Some(format!("s3.{region}.amazonaws.com")),
            (None, true) => Some(format!("s3.test:{port}")),
            (None, false) => None,
        };
        let (access_key, secret_key) = options
            .credentials
            .unwrap_or_else(|| (ACCESS_KEY.to_string(), SECRET_KEY.to_string()));
        let mut server = S3Server {
            _temp: temp,
            root,
            addr: listener.local_addr().unwrap(),
            access_key,
            secret_key,
            tls: options.tls,
            virtual_domain: virtual_domain.clone(),
            shared: Arc::new(Shared {
                virtual_domain,
                request_log: Mutex::new(request_log),
                fault_rng: SharedRng::new(options.fault_seed),
                ..Shared::default()
            }),
            running: None,
        };
        server.serve(listener);
        server
    }

    /// The address the server listens on (kept across [`S3Server::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The endpoint of a [`Options::virtual_host`] server: `http://s3.test:PORT`.
    pub fn virtual_host_endpoint(&self) -> String {
        format!("http://s3.test:{}", self.addr.port())
    }

    /// A CONNECT proxy on 127.0.0.1 that sends every tunnel to this server, whatever host
    /// it names (the names of [`S3Server::virtual_host_endpoint`] resolve nowhere), and
    /// records the hosts asked for. Returns its URL (`http://127.0.0.1:PORT`).
    pub fn connect_proxy(&self) -> (String, Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = self.addr;
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                }
                let host = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                log.lock().unwrap().push(host);
                let Ok(upstream) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut up_read, mut up_write) = (upstream.try_clone().unwrap(), upstream);
                let mut client_write = client.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut reader, &mut up_write);
                    let _ = up_write.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_read, &mut client_write);
                    let _ = client_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        (url, asked)
    }

    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The directory s3s-fs serves: objects are at `root/<bucket>/<key>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Environment for a child process (`walsync -b s3://bucket/...`) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            // Empty counts as unset: a token inherited from the test's environment would
            // otherwise be sent along with our test keys.
            ("AWS_SESSION_TOKEN", String::new()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL_S3", self.endpoint()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            bucket: BUCKET.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint()),
            addressing: walsync::storage::s3::Addressing::Auto,
            region: REGION.to_string(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            session_token: None,
            credential_source: None,
            credential_origin: String::new(),
            timeout: walsync::storage::s3::DEFAULT_TIMEOUT,
            ca_roots: walsync::storage::s3::CaRoots::BuiltIn,
        }
    }

    /// A client for `s3://<bucket>/<prefix>` on this server.
    pub fn storage(&self, prefix: &str) -> S3Storage {
        S3Storage::new(self.config(prefix)).expect("S3 storage for the test server")
    }

    /// Make every incomplete multipart upload look started `by` earlier than it was.
    pub fn age_uploads(&self, by: Duration) {
        for (path, _) in upload_files(&self.root) {
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            let mtime = file.metadata().unwrap().modified().unwrap();
            file.set_modified(mtime - by).unwrap();
        }
    }

    /// The object keys of the incomplete multipart uploads, sorted.
    pub fn uploads(&self) -> Vec<String> {
        let mut keys: Vec<String> = upload_files(&self.root)
            .into_iter()
            .map(|(_, upload)| upload.key)
            .collect();
        keys.sort();
        keys
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// The next object download sends `bytes` bytes of its body, then the connection breaks.
    pub fn cut_next_download_after(&self, bytes: u64) {
        *self.shared.cut_next_download.lock().unwrap() = Some(bytes);
    }

    /// Answer the next request (only it) with this S3 error instead of serving it.
    pub fn fail_next_request(&self, status: u16, code: &str, message: &str) {
        *self.shared.next_error.lock().unwrap() =
            Some((status, code.to_string(), message.to_string()));
    }

    /// Answer DeleteObjects (`POST ?delete`) with `501 NotImplemented`, as some
    /// S3-compatible servers do, or (false) serve it again.
    pub fn refuse_delete_objects(&self, refuse: bool) {
        *self.shared.refuse_delete_objects.lock().unwrap() = refuse;
    }

    /// Answer every DeleteObjects with this `DeleteResult` body (HTTP 200) instead of
    /// deleting anything, e.g. to report per-key errors; None serves it again.
    pub fn answer_delete_objects_with(&self, body: Option<&str>) {
        *self.shared.delete_objects_answer.lock().unwrap() = body.map(str::to_string);
    }

    /// Play the HTTP faults of `mix` (500, 503 SlowDown, truncation) from the next request
    /// on; its TCP faults (reset, stall) pass here.
    pub fn set_fault_mix(&self, mix: FaultMix) {
        *self.shared.fault_mix.lock().unwrap() = mix;
    }

    /// The HTTP faults injected so far, and the requests served as they were (`passed`).
    pub fn fault_counts(&self) -> FaultCounts {
        *self.shared.fault_counts.lock().unwrap()
    }

    /// Stop serving: from now on connections to the port are refused. Idempotent.
    pub fn stop(&mut self) {
        if let Some((shutdown, thread)) = self.running.take() {
            let _ = shutdown.send(());
            thread.join().expect("S3 server thread panicked");
        }
    }

    /// Serve the same data on the same port again.
    pub fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; give the kernel a little time if it hesitates.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let fs = s3s_fs::FileSystem::new(&self.root).expect("s3s-fs root");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(
            self.access_key.as_str(),
            self.secret_key.as_str(),
        ));
        if let Some(domain) = &self.virtual_domain {
            builder.set_host(s3s::host::SingleDomain::new(domain).expect("virtual host domain"));
        }
        let service = builder.build();
        let shared = Arc::clone(&self.shared);
        let tls = self.tls.as_ref().map(PrivateCa::acceptor);
        let root = self.root.clone();
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(accept_loop(listener, service, shared, root, tls, stopped));
            // Dropping the runtime's tasks closes the connections still open.
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        self.running = Some((shutdown, thread));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
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
        return Ok(list_uploads(root, req.uri().query().unwrap_or("")));
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

/// An incomplete multipart upload, from s3s-fs's files.
struct Upload {
    key: String,
    id: String,
    started: std::time::SystemTime,
}

/// The metadata files of s3s-fs's incomplete uploads
/// (`.bucket-<b64>.object-<b64>.upload-<uuid>.metadata.json`) and what they say.
fn upload_files(root: &Path) -> Vec<(PathBuf, Upload)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".bucket-") else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(".metadata.json") else {
            continue;
        };
        let Some((bucket_and_key, id)) = rest.split_once(".upload-") else {
            continue;
        };
        let Some((_, key)) = bucket_and_key.split_once(".object-") else {
            continue;
        };
        let started = entry.metadata().unwrap().modified().unwrap();
        let key = String::from_utf8(base64_url_decode(key)).unwrap();
        let id = id.to_string();
        found.push((entry.path(), Upload { key, id, started }));
    }
    found
}

/// Base64 with the URL-safe alphabet and no padding, as s3s-fs names its files.
fn base64_url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => panic!("not base64url: {text}"),
    };
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u32, 0);
    for c in text.bytes() {
        bits = (bits << 6) | u32::from(value(c));
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// A ListMultipartUploads answer (one page) for the raw query `query`: like s3s-fs's
/// listings, it echoes `encoding-type=url` and encodes nothing.
fn list_uploads(root: &Path, query: &str) -> hyper::Response<CutBody> {
    let mut prefix = String::new();
    let mut encoding = false;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .unwrap()
            .to_string();
        match name {
            "prefix" => prefix = value,
            "encoding-type" => encoding = value == "url",
            _ => {}
        }
    }
    let mut uploads: Vec<Upload> = upload_files(root)
        .into_iter()
        .map(|(_, upload)| upload)
        .filter(|u| u.key.starts_with(&prefix))
        .collect();
    uploads.sort_by(|a, b| (&a.key, &a.id).cmp(&(&b.key, &b.id)));
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult>\
         <Bucket>{BUCKET}</Bucket><Prefix>{}</Prefix><IsTruncated>false</IsTruncated>",
        escape(&prefix)
    );
    if encoding {
        body.push_str("<EncodingType>url</EncodingType>");
    }
    for upload in uploads {
        let millis = upload
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let initiated = walsync::UtcTime::from_millis(millis as i64).to_rfc3339();
        body.push_str(&format!(
            "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiated>{initiated}</Initiated></Upload>",
            escape(&upload.key),
            upload.id
        ));
    }
    body.push_str("</ListMultipartUploadsResult>");
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/xml")
        .body(CutBody::new(s3s::Body::from(body), None))
        .unwrap()
}

/// What the server threads share with the test.
#[derive(Default)]
struct Shared {
    virtual_domain: Option<String>,
    next_error: Mutex<Option<(u16, String, String)>>,
    requests: Mutex<Vec<Request>>,
    cut_next_download: Mutex<Option<u64>>,
    request_log: Mutex<Option<std::fs::File>>,
    refuse_delete_objects: Mutex<bool>,
    delete_objects_answer: Mutex<Option<String>>,
    fault_mix: Mutex<FaultMix>,
    fault_rng: SharedRng,
    fault_counts: Mutex<FaultCounts>,
}

impl Shared {
    /// The HTTP fault for the next request, if any (the mix's TCP faults pass here).
    fn pick_fault(&self) -> Fault {
        let mix = *self.fault_mix.lock().unwrap();
        if mix == FaultMix::none() {
            return Fault::Pass;
        }
        match mix.pick(self.fault_rng.fraction()) {
            Fault::Reset | Fault::Stall => Fault::Pass,
            fault => fault,
        }
    }

    fn count(&self, fault: Fault) {
        let mut counts = self.fault_counts.lock().unwrap();
        match fault {
            Fault::Pass | Fault::Reset | Fault::Stall => counts.passed += 1,
            Fault::Error500 => counts.errors500 += 1,
            Fault::SlowDown503 => counts.slowdowns503 += 1,
            Fault::Truncate => counts.truncations += 1,
        }
    }
}

/// A response body that fails after `left` bytes, if given, which breaks the connection.
struct CutBody {
    inner: Pin<Box<s3s::Body>>,
    left: Option<u64>,
    /// Whether hyper has had its chance to send what it holds before the body fails.
    flushed: bool,
}

impl CutBody {
    fn new(body: s3s::Body, left: Option<u64>) -> CutBody {
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
