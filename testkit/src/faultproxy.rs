//! A fault-injecting TCP proxy for HTTP/1.1, between walsync and the S3 test server.
//!
//! It listens on 127.0.0.1 and forwards each connection to the upstream server. To keep
//! request boundaries simple it rewrites every request to `Connection: close`, so the server
//! closes the connection after its response and ureq opens a new one for the next request:
//! one request per connection, and a fault hits exactly one request.
//!
//! It plays the TCP part of a [`FaultMix`] (set at any time with [`FaultProxy::set_mix`]);
//! the HTTP part (500, 503 SlowDown, truncated bodies) is the S3 server's to play
//! (`s3server.rs`), and passes here. For each request it picks, with seeded probabilities:
//! - pass it through;
//! - reset the connection (RST), either before the request reaches the server or after the
//!   server has answered (so the server did the work but the client never hears of it);
//! - stall: hold the connection without answering for the `stall` given to
//!   [`FaultProxy::start`] (longer than the client's read timeout), either before forwarding
//!   or after the server answered.
//!
//! The proxy and the server draw independently, so with a mix of both parts a request the
//! server spoiled can also be reset or stalled on its way back; each counts what it did.
//! What the proxy injected is counted ([`FaultProxy::counts`]; it leaves `passed` to the
//! server).
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

use crate::faults::{Fault, FaultCounts, FaultMix, SharedRng};

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug)]
enum Action {
    Pass,
    ResetEarly,
    ResetLate,
    StallEarly,
    StallLate,
}

struct Shared {
    upstream: SocketAddr,
    mix: Mutex<FaultMix>,
    rng: SharedRng,
    stall: Duration,
    /// How long every request is held before it is handled, in milliseconds.
    delay_ms: AtomicU64,
    stopping: AtomicBool,
    /// Storage "down": every connection is reset at once, nothing reaches the server.
    down: AtomicBool,
    resets: AtomicU64,
    stalls: AtomicU64,
    upstream_down: AtomicU64,
}

impl Shared {
    /// The TCP fault for the next request, if any (the mix's HTTP faults pass here).
    fn pick(&self) -> Action {
        let mix = *self.mix.lock().unwrap();
        if mix == FaultMix::none() {
            return Action::Pass;
        }
        let fault = mix.pick(self.rng.fraction());
        let early = self.rng.next() & 1 == 0;
        match (fault, early) {
            (Fault::Reset, true) => Action::ResetEarly,
            (Fault::Reset, false) => Action::ResetLate,
            (Fault::Stall, true) => Action::StallEarly,
            (Fault::Stall, false) => Action::StallLate,
            _ => Action::Pass,
        }
    }

    fn count(&self, action: Action) {
        let counter = match action {
            Action::Pass => return,
            Action::ResetEarly | Action::ResetLate => &self.resets,
            Action::StallEarly | Action::StallLate => &self.stalls,
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
            rng: SharedRng::new(seed),
            stall,
            delay_ms: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            down: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
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

    /// Change the fault probabilities from the next request on (only the TCP faults are
    /// played here).
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

    /// Play storage down (`true`) or back (`false`): while down, every connection is reset
    /// as soon as it is accepted. Unlike stopping the server, this keeps both ports bound,
    /// so another process on the machine (a parallel torture run) cannot take the port
    /// and answer in its place.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// The TCP faults injected so far, and the connections dropped while the server was down.
    pub fn counts(&self) -> FaultCounts {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            resets: get(&s.resets),
            stalls: get(&s.stalls),
            upstream_down: get(&s.upstream_down),
            ..FaultCounts::default()
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
    if shared.down.load(Ordering::Relaxed) {
        shared.upstream_down.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return Ok(());
    }
    client.set_read_timeout(Some(IDLE))?;
    let Some((head, extra)) = read_head(&mut client)? else {
        return Ok(());
    };
    let arrived = Instant::now();
    while arrived.elapsed() < Duration::from_millis(shared.delay_ms.load(Ordering::Relaxed))
        && !shared.stopping.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let action = shared.pick();
    match action {
        Action::ResetEarly => {
            shared.count(action);
            reset(client);
            Ok(())
        }
        Action::StallEarly => {
            shared.count(action);
            hold(shared);
            reset(client);
            Ok(())
        }
        Action::Pass | Action::ResetLate | Action::StallLate => {
            forward(client, shared, action, &rewrite_head(&head), &extra)
        }
    }
}

/// Send the request upstream and relay (or spoil) the response.
fn forward(
    client: TcpStream,
    shared: &Shared,
    action: Action,
    head: &[u8],
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
    shared.count(action);
    upstream.set_read_timeout(Some(IDLE))?;
    upstream.write_all(head)?;
    upstream.write_all(extra)?;
    // The rest of the request body, as the client sends it (after a 100 Continue, maybe).
    let (mut from_client, mut to_upstream) = (client.try_clone()?, upstream.try_clone()?);
    let pump = std::thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut to_upstream);
        let _ = to_upstream.shutdown(Shutdown::Write);
    });
    let mut client_out = client.try_clone()?;
    let result = match action {
        Action::Pass => io::copy(&mut upstream, &mut client_out).map(|_| ()),
        _ => {
            // The server answers in full; the client never hears it.
            read_response(&mut upstream, &mut client_out)?;
            if let Action::StallLate = action {
                hold(shared);
            }
            Ok(())
        }
    };
    match action {
        Action::ResetLate | Action::StallLate => reset(client),
        _ => {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = pump.join();
    result
}

/// Read the whole final response from upstream (which closes after it) without passing it
/// on, but forward any `100 Continue` interim response at once so that the client sends its
/// body.
fn read_response(upstream: &mut TcpStream, client: &mut TcpStream) -> io::Result<()> {
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
            return Ok(());
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

/// The request head with its connection headers replaced by `connection: close`.
fn rewrite_head(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let mut rewritten = String::new();
    if let Some(request_line) = lines.next() {
        rewritten.push_str(request_line);
        rewritten.push_str("\r\n");
    }
    for line in lines {
        let name = line.split_once(':').map_or(line, |(name, _)| name);
        let name = name.trim().to_ascii_lowercase();
        if name == "connection" || name == "keep-alive" {
            continue;
        }
        rewritten.push_str(line);
        rewritten.push_str("\r\n");
    }
    rewritten.push_str("connection: close\r\n\r\n");
    rewritten.into_bytes()
}
