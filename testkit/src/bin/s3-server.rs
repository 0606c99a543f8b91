//! A standalone S3 server for benchmarks: the integration tests' in-process server (s3s-fs,
//! SigV4 checked) as a program, on 127.0.0.1 only.
//!
//! ```text
//! cargo run --release -p walsync-testkit --bin s3-server -- [--port N] [--root DIR]
//!                                                      [--request-log FILE] [--latency-ms N]
//! ```
//!
//! Prints one line on stdout when it is ready,
//! `endpoint=http://127.0.0.1:PORT bucket=B access_key=K secret_key=S region=us-east-1`,
//! then serves until it is killed. Objects are files at `ROOT/B/<key>`. With
//! `--request-log`, every request is appended to FILE as it arrives, one line each:
//! `METHOD PATH[?QUERY] AGENT` (the query without its `X-Amz-*` signature parameters, then the
//! first word of the User-Agent header, or `-`).
//! Without `--root` the data goes to a temporary directory that is left behind on kill.
//!
//! With `--latency-ms N` the printed endpoint is a proxy on another loopback port (the
//! tests' fault proxy, `testkit/src/faultproxy.rs`, with no faults) that holds every request
//! for N ms before forwarding it: a distant S3. The proxy sends each request on its own
//! connection (`Connection: close`), so a client's keep-alive does not skip the delay.
//! `--port` is then the server's port behind the proxy.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use walsync_testkit::faultproxy::FaultProxy;
use walsync_testkit::s3server::{Options, S3Server};

const USAGE: &str =
    "usage: s3-server [--port N] [--root DIR] [--request-log FILE] [--latency-ms N]";

fn main() {
    let mut options = Options::default();
    let mut latency_ms: u64 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--port" => {
                let port = value("--port");
                options.port = port
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad port {port:?}")));
            }
            "--root" => options.root = Some(PathBuf::from(value("--root"))),
            "--request-log" => options.request_log = Some(PathBuf::from(value("--request-log"))),
            "--latency-ms" => {
                let ms = value("--latency-ms");
                latency_ms = ms
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad latency {ms:?}")));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other:?}")),
        }
    }

    let server = S3Server::start_with(options);
    // The proxy never stalls (no faults are mixed in), so its stall time is unused.
    let proxy = (latency_ms > 0).then(|| {
        let proxy = FaultProxy::start(server.addr(), 0, Duration::from_secs(1));
        proxy.set_delay(Duration::from_millis(latency_ms));
        proxy
    });
    let endpoint = proxy
        .as_ref()
        .map_or_else(|| server.endpoint(), FaultProxy::endpoint);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "endpoint={} bucket={} access_key={} secret_key={} region=us-east-1 root={}",
        endpoint,
        server.bucket(),
        server.access_key(),
        server.secret_key(),
        server.root().display(),
    )
    .and_then(|()| stdout.flush())
    .expect("stdout");
    drop(stdout);

    // Serve until killed. The helper also keeps every request in memory for tests; drop them
    // now and then so a long benchmark does not grow the server.
    loop {
        std::thread::sleep(Duration::from_secs(10));
        server.clear_requests();
    }
}

fn fail(message: &str) -> ! {
    eprintln!("s3-server: {message}\n{USAGE}");
    std::process::exit(2);
}
