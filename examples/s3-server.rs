//! A standalone S3 server for benchmarks: the integration tests' in-process server (s3s-fs,
//! SigV4 checked) as a program, on 127.0.0.1 only.
//!
//! ```text
//! cargo run --release --example s3-server -- [--port N] [--root DIR] [--request-log FILE]
//! ```
//!
//! Prints one line on stdout when it is ready,
//! `endpoint=http://127.0.0.1:PORT bucket=B access_key=K secret_key=S region=us-east-1`,
//! then serves until it is killed. Objects are files at `ROOT/B/<key>`. With
//! `--request-log`, every request is appended to FILE as it arrives, one line each:
//! `METHOD PATH[?QUERY] AGENT` (the query without its `X-Amz-*` signature parameters, then the
//! first word of the User-Agent header, or `-`).
//! Without `--root` the data goes to a temporary directory that is left behind on kill.

#[path = "../tests/common/s3server.rs"]
mod s3server;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use s3server::{Options, S3Server};

const USAGE: &str = "usage: s3-server [--port N] [--root DIR] [--request-log FILE]";

fn main() {
    let mut options = Options::default();
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
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other:?}")),
        }
    }

    let server = S3Server::start_with(options);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "endpoint={} bucket={} access_key={} secret_key={} region=us-east-1 root={}",
        server.endpoint(),
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
