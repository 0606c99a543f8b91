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
//!
//! This file is what a test holds: the [`S3Server`], its [`Options`], the [`Request`]s it
//! recorded and the state its controls share with the server's threads. The rest is in
//! rooms of its own: `s3server/serve.rs` serves each request (the faults, AWS's refusals,
//! the recording, the cut body), `s3server/uploads.rs` answers ListMultipartUploads from
//! s3s-fs's files, `s3server/listing.rs` answers listings by walking the prefix's directory
//! only (s3s-fs walks the whole bucket), and `s3server/ca.rs` makes the private CA.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use walsync::storage::s3::{S3Config, S3Storage};

use crate::faults::{Fault, FaultCounts, FaultMix, SharedRng};

mod ca;
mod listing;
mod serve;
mod uploads;

pub use ca::PrivateCa;

use serve::accept_loop;
use uploads::upload_files;

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
/// benchmark server, `src/bin/s3-server.rs`, uses them).
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
        let mut builder = S3ServiceBuilder::new(listing::Listing::new(&self.root));
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
