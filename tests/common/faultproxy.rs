//! A fault-injecting TCP proxy for HTTP/1.1, between walsync and the S3 test server.
//!
//! It listens on 127.0.0.1 and forwards each connection to the upstream server. To keep
//! request boundaries simple it rewrites every request to `Connection: close`, so the server
//! closes the connection after its response and ureq opens a new one for the next request:
//! one request per connection, and a fault hits exactly one request.
//!
//! For each request it picks, with seeded probabilities that can be changed at any time
//! ([`FaultProxy::set_mix`]), one of:
//! - pass it through;
//! - reset the connection (RST), either before the request reaches the server or after the
//!   server has answered (so the server did the work but the client never hears of it);
//! - answer `500 InternalError` or `503 SlowDown` itself, with an S3 XML error body;
//! - stall: hold the connection without answering for [`FaultProxy::stall`] (longer than
//!   the client's read timeout), either before forwarding or after the server answered;
//! - truncate: forward only a prefix of the server's response, then close.
//!
//! What it injected is counted ([`FaultProxy::counts`]).
//!
//! Independently of faults it can also be slow: [`FaultProxy::set_delay`] holds every
//! request for a while before doing anything with it (a slow S3, or with a long delay, a
//! paused one).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Probabilities (each 0..=1, summing to at most 1) of each fault per request; the rest
/// passes through.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultMix {
    pub reset: f64,
    pub error500: f64,
    pub slowdown503: f64,
    pub stall: f64,
    pub truncate: f64,
}

impl FaultMix {
    /// No faults: everything passes.
    pub fn none() -> FaultMix {
        FaultMix::default()
    }

    fn total(&self) -> f64 {
        self.reset + self.error500 + self.slowdown503 + self.stall + self.truncate
    }
}

/// What the proxy did, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub passed: u64,
    pub resets: u64,
    pub errors500: u64,
    pub slowdowns503: u64,
    pub stalls: u64,
    pub truncations: u64,
    /// Connections dropped because the upstream server was down (not an injected fault).
    pub upstream_down: u64,
}

impl FaultCounts {
    /// Faults injected on purpose (not counting passes or a stopped server).
    pub fn injected(&self) -> u64 {
        self.resets + self.errors500 + self.slowdowns503 + self.stalls + self.truncations
    }

    pub fn add(&mut self, other: &FaultCounts) {
        self.passed += other.passed;
        self.resets += other.resets;
        self.errors500 += other.errors500;
        self.slowdowns503 += other.slowdowns503;
        self.stalls += other.stalls;
        self.truncations += other.truncations;
        self.upstream_down += other.upstream_down;
    }
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reset {} / 500 {} / 503 SlowDown {} / stall {} / truncated {} (passed {}, server down {})",
            self.resets,
            self.errors500,
            self.slowdowns503,
            self.stalls,
            self.truncations,
            self.passed,
            self.upstream_down
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Pass,
    ResetEarly,
    ResetLate,
    Status(u16),
    StallEarly,
    StallLate,
    Truncate,
}

struct Shared {
    upstream: SocketAddr,
    mix: Mutex<FaultMix>,
    rng: Mutex<u64>,
    stall: Duration,
    /// How long every request is held before it is handled, in milliseconds.
    delay_ms: AtomicU64,
    stopping: AtomicBool,
    passed: AtomicU64,
    resets: AtomicU64,
    errors500: AtomicU64,
    slowdowns503: AtomicU64,
    stalls: AtomicU64,
    truncations: AtomicU64,
    upstream_down: AtomicU64,
}

impl Shared {
    fn next_random(&self) -> u64 {
        let mut state = self.rng.lock().unwrap();
        splitmix64(&mut state)
    }

    fn fraction(&self) -> f64 {
        (self.next_random() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&self) -> Fault {
        let mix = *self.mix.lock().unwrap();
        if mix.total() <= 0.0 {
            return Fault::Pass;
        }
        let mut x = self.fraction();
        let early = self.next_random() & 1 == 0;
        for (p, fault) in [
            (
                mix.reset,
                if early {
                    Fault::ResetEarly
                } else {
                    Fault::ResetLate
                },
            ),
            (mix.error500, Fault::Status(500)),
            (mix.slowdown503, Fault::Status(503)),
            (
                mix.stall,
                if early {
                    Fault::StallEarly
                } else {
                    Fault::StallLate
                },
            ),
            (mix.truncate, Fault::Truncate),
        ] {
            if x < p {
                return fault;
            }
            x -= p;
        }
        Fault::Pass
    }

    fn count(&self, fault: Fault) {
        let counter = match fault {
            Fault::Pass => &self.passed,
            Fault::ResetEarly | Fault::ResetLate => &self.resets,
            Fault::Status(500) => &self.errors500,
            Fault::Status(_) => &self.slowdowns503,
            Fault::StallEarly | Fault::StallLate => &self.stalls,
            Fault::Truncate => &self.truncations,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The proxy. Dropping it stops accepting connections and ends stalls early.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Proxy to `upstream`, choosing faults with a generator seeded by `seed`; a stall holds
    /// a connection for `stall`.
    pub fn start(upstream: SocketAddr, seed: u64, stall: Duration) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let shared = Arc::new(Shared {
            upstream,
            mix: Mutex::new(FaultMix::none()),
            rng: Mutex::new(seed),
            stall,
            delay_ms: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            passed: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            errors500: AtomicU64::new(0),
            slowdowns503: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            truncations: AtomicU64::new(0),
            upstream_down: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_shared.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let shared = Arc::clone(&accept_shared);
                std::thread::spawn(move || {
                    let _ = handle(client, &shared);
                });
            }
        });
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give the client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change the fault probabilities from the next request on.
    pub fn set_mix(&self, mix: FaultMix) {
        *self.shared.mix.lock().unwrap() = mix;
    }

    /// Hold every request for `delay` after it arrives, before forwarding it (or injecting
    /// a fault). The delay is read again while a request waits, so lowering it releases the
    /// requests already held: a long delay then `set_delay(Duration::ZERO)` pauses and
    /// resumes traffic.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::Relaxed);
    }

    pub fn mix(&self) -> FaultMix {
        *self.shared.mix.lock().unwrap()
    }

    pub fn counts(&self) -> FaultCounts {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            passed: get(&s.passed),
            resets: get(&s.resets),
            errors500: get(&s.errors500),
            slowdowns503: get(&s.slowdowns503),
            stalls: get(&s.stalls),
            truncations: get(&s.truncations),
            upstream_down: get(&s.upstream_down),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Longest a proxied connection may sit idle before the proxy gives up on it.
const IDLE: Duration = Duration::from_secs(30);

fn handle(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_read_timeout(Some(IDLE))?;
    let Some((head, extra)) = read_head(&mut client)? else {
        return Ok(());
    };
    let request = Head::parse(&head);
    let arrived = Instant::now();
    while arrived.elapsed() < Duration::from_millis(shared.delay_ms.load(Ordering::Relaxed))
        && !shared.stopping.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let fault = shared.pick();
    match fault {
        Fault::ResetEarly => {
            shared.count(fault);
            reset(client);
            Ok(())
        }
        Fault::StallEarly => {
            shared.count(fault);
            hold(shared);
            reset(client);
            Ok(())
        }
        Fault::Status(status) => {
            shared.count(fault);
            // Without `Expect: 100-continue` the client sends its body right away: read it,
            // or closing with unread data would reset the connection before it sees the
            // answer. With it, the client waits, and an error answer means "don't send".
            if !request.expect_continue {
                let left = request.content_length.saturating_sub(extra.len() as u64);
                io::copy(&mut (&client).take(left), &mut io::sink())?;
            }
            let (code, message, reason) = if status == 500 {
                (
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                    "Internal Server Error",
                )
            } else {
                (
                    "SlowDown",
                    "Please reduce your request rate.",
                    "Service Unavailable",
                )
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
            );
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/xml\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(response.as_bytes())?;
            close_gracefully(client);
            Ok(())
        }
        Fault::Pass | Fault::ResetLate | Fault::StallLate | Fault::Truncate => {
            forward(client, shared, fault, &request, &extra)
        }
    }
}

/// Send the request upstream and relay (or spoil) the response.
fn forward(
    client: TcpStream,
    shared: &Shared,
    fault: Fault,
    request: &Head,
    extra: &[u8],
) -> io::Result<()> {
    let mut upstream = match TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2)) {
        Ok(upstream) => upstream,
        Err(_) => {
            // The server is stopped: the client sees its connection dropped.
            shared.upstream_down.fetch_add(1, Ordering::Relaxed);
            reset(client);
            return Ok(());
        }
    };
    shared.count(fault);
    upstream.set_read_timeout(Some(IDLE))?;
    upstream.write_all(&request.rewritten)?;
    upstream.write_all(extra)?;
    // The rest of the request body, as the client sends it (after a 100 Continue, maybe).
    let (mut from_client, mut to_upstream) = (client.try_clone()?, upstream.try_clone()?);
    let pump = std::thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut to_upstream);
        let _ = to_upstream.shutdown(Shutdown::Write);
    });
    let mut client_out = client.try_clone()?;
    let result = match fault {
        Fault::Pass => io::copy(&mut upstream, &mut client_out).map(|_| ()),
        _ => {
            let response = read_response(&mut upstream, &mut client_out)?;
            match fault {
                Fault::Truncate if response.len() > 1 => {
                    let cut = 1 + (shared.next_random() % (response.len() as u64 - 1)) as usize;
                    client_out.write_all(&response[..cut])
                }
                Fault::Truncate => Ok(()),
                Fault::StallLate => {
                    hold(shared);
                    Ok(())
                }
                _ => Ok(()), // ResetLate: the server answered; the client never hears it.
            }
        }
    };
    match fault {
        Fault::ResetLate | Fault::StallLate => reset(client),
        _ => {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = pump.join();
    result
}

/// The whole final response from upstream (which closes after it), forwarding any
/// `100 Continue` interim response at once so that the client sends its body.
fn read_response(upstream: &mut TcpStream, client: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        while buf.starts_with(b"HTTP/1.1 100") {
            let Some(end) = find(&buf, b"\r\n\r\n") else {
                break;
            };
            client.write_all(&buf[..end + 4])?;
            buf.drain(..end + 4);
        }
        let n = match upstream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0, // a reset upstream: whatever arrived is the response
        };
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Wait for the stall time, or until the proxy is dropped.
fn hold(shared: &Shared) {
    let end = Instant::now() + shared.stall;
    while Instant::now() < end && !shared.stopping.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Close with an RST instead of a FIN: the client sees "connection reset by peer".
fn reset(stream: TcpStream) {
    use std::os::unix::io::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// Finish sending, then wait (briefly) for the client to close, so nothing unread remains
/// that would turn the close into a reset.
fn close_gracefully(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The request head (through the blank line) and any body bytes read along with it; `None`
/// if the client closed first.
fn read_head(client: &mut TcpStream) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let extra = buf.split_off(end + 4);
            return Ok(Some((buf, extra)));
        }
        let n = match client.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the proxy needs to know about a request, and its head rewritten to close.
struct Head {
    content_length: u64,
    expect_continue: bool,
    rewritten: Vec<u8>,
}

impl Head {
    fn parse(head: &[u8]) -> Head {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let mut rewritten = String::new();
        if let Some(request_line) = lines.next() {
            rewritten.push_str(request_line);
            rewritten.push_str("\r\n");
        }
        let (mut content_length, mut expect_continue) = (0, false);
        for line in lines {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            match name.as_str() {
                "connection" | "keep-alive" => continue,
                "content-length" => content_length = value.parse().unwrap_or(0),
                "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
            rewritten.push_str(line);
            rewritten.push_str("\r\n");
        }
        rewritten.push_str("connection: close\r\n\r\n");
        Head {
            content_length,
            expect_continue,
            rewritten: rewritten.into_bytes(),
        }
    }
}

/// splitmix64: a small, good, seedable generator.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
