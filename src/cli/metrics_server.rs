//! The metrics listener of `walsync watch --metrics-addr`: a tiny blocking HTTP server that
//! answers `GET /metrics` with [`walsync::DbMetrics`]'s Prometheus text ([`render`]).
//!
//! The listener handles one connection at a time on its own thread: it reads the request
//! line and headers (at most [`MAX_REQUEST`] bytes within [`IO_TIMEOUT`]), answers
//! `GET /metrics` and 404 for any other path, and closes the connection. Nothing a client
//! sends can make it panic or hold it for long.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walsync::metrics::render;
use walsync::{DbMetrics, Error, MetricsSource, Result};

/// The longest request (line and headers) the listener reads.
pub const MAX_REQUEST: usize = 8 * 1024;

/// How long the listener waits for a whole request, and for each write of its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Listen on `addr` (host:port); an error names the address.
pub fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| Error::from(e).with_context(format!("metrics address {addr}: cannot listen")))
}

/// Serve `GET /metrics` on `listener` from a new thread, for as long as the process runs,
/// for the databases `databases` returns at each request (they come and go under
/// `watch --dir`).
pub fn serve(listener: TcpListener, databases: MetricsSource) -> Result<()> {
    std::thread::Builder::new()
        .name("walsync-metrics".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &databases()) {
                            log::debug!("metrics request: {e}");
                        }
                    }
                    Err(e) => {
                        log::warn!("metrics listener: {e}");
                        // Out of file descriptors and the like: do not spin.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| Error::from(e).with_context("starting the metrics thread"))?;
    Ok(())
}

/// Read one request from `stream` and answer it.
fn answer(mut stream: TcpStream, databases: &[Arc<DbMetrics>]) -> std::io::Result<()> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // One deadline for the whole request, so a client trickling bytes cannot hold the
    // (only) listener thread for longer.
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
        {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if request.len() >= MAX_REQUEST || left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break false;
        }
        request.extend_from_slice(&buf[..n.min(MAX_REQUEST - request.len())]);
    };
    let (status, body) = respond(complete.then_some(&request[..]), databases);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if status.starts_with("200") {
            "text/plain; version=0.0.4; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        },
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// The status line and body for a request (None: too long or cut short).
fn respond(request: Option<&[u8]>, databases: &[Arc<DbMetrics>]) -> (&'static str, String) {
    let Some(line) = request
        .and_then(|r| r.split(|b| *b == b'\n').next())
        .and_then(|l| std::str::from_utf8(l).ok())
    else {
        return ("400 Bad Request", "bad request\n".into());
    };
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", "bad request\n".into());
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", render(databases)),
        (_, "/metrics") => ("405 Method Not Allowed", "only GET\n".into()),
        _ => ("404 Not Found", "not found; try /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Vec<Arc<DbMetrics>> {
        vec![Arc::new(DbMetrics::new("app"))]
    }

    #[test]
    fn requests_are_answered_by_path_and_method() {
        let dbs = one();
        let ok = respond(Some(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), &dbs);
        assert_eq!(ok.0, "200 OK");
        assert!(ok.1.contains("walsync_stored_bytes_total{db=\"app\"} 0\n"));
        let query = respond(Some(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), &dbs);
        assert_eq!(query.0, "200 OK");
        assert_eq!(
            respond(Some(b"GET / HTTP/1.1\r\n\r\n"), &dbs).0,
            "404 Not Found"
        );
        assert_eq!(
            respond(Some(b"POST /metrics HTTP/1.1\r\n\r\n"), &dbs).0,
            "405 Method Not Allowed"
        );
        for bad in [
            &b"\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / FTP/1\r\n\r\n",
        ] {
            assert_eq!(respond(Some(bad), &dbs).0, "400 Bad Request");
        }
        assert_eq!(respond(None, &dbs).0, "400 Bad Request");
    }
}
