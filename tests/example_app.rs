//! Runs the embedding example (`examples/hyper-app.rs`) briefly against the test S3 server:
//! a note POSTed is in the replica when the answer arrives (`Replicator::sync`), and a stop
//! ships the rest (`Replicator::stop`). The example's own code, included as a module.

#[allow(dead_code)]
#[path = "../examples/hyper-app.rs"]
mod app;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::fixtures::{dump, walsync};
use walsync_testkit::s3server::S3Server;

fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The notes in a database file, in order.
fn notes_in(path: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut statement = conn.prepare("SELECT body FROM notes ORDER BY id").unwrap();
    let rows = statement.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn the_example_app_replicates_what_it_acknowledges() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.db");
    let destination = format!("s3://{}/example", s3.bucket());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The test server's storage handed in: no process-wide variables, which every other
    // test of this one binary would see.
    let config = app::Config {
        db: db.clone(),
        storage: std::sync::Arc::new(s3.storage("example")),
    };
    let server = runtime.spawn(app::run(config, listener, async move {
        let _ = stopped.await;
    }));

    let (status, body) = request(addr, "POST", "/notes", "buy milk");
    assert_eq!(status, 201, "{body}");
    assert_eq!(body, "stored note 1\n");
    // Acknowledged means stored: a restore from the replica has it now.
    let first = dir.path().join("first.db");
    let out = walsync(
        &[
            "restore",
            app::NAME,
            "-o",
            first.to_str().unwrap(),
            "-b",
            &destination,
        ],
        &s3.env(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(notes_in(&first), ["buy milk"]);

    // The first note may have made it into the base snapshot; this one is a segment.
    assert_eq!(request(addr, "POST", "/notes", "call mum").0, 201);
    let second = dir.path().join("second.db");
    let out = walsync(
        &[
            "restore",
            app::NAME,
            "-o",
            second.to_str().unwrap(),
            "-b",
            &destination,
        ],
        &s3.env(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(notes_in(&second), ["buy milk", "call mum"]);
    let (status, list) = request(addr, "GET", "/notes", "");
    assert_eq!(status, 200);
    assert!(
        list.starts_with("1\t") && list.contains("\tbuy milk\n"),
        "{list}"
    );
    assert!(
        list.contains("2\t") && list.contains("\tcall mum\n"),
        "{list}"
    );
    assert_eq!(request(addr, "GET", "/elsewhere", "").0, 404);

    stop.send(()).unwrap();
    runtime.block_on(server).unwrap().unwrap();
    let last = dir.path().join("last.db");
    let out = walsync(
        &[
            "restore",
            app::NAME,
            "-o",
            last.to_str().unwrap(),
            "-b",
            &destination,
        ],
        &s3.env(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dump(&last), dump(&db));
    assert_eq!(notes_in(&last), ["buy milk", "call mum"]);
}
