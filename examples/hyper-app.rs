//! A small Tokio web application (hyper 1) that keeps its data in SQLite and replicates it
//! with walsync's library, in the same process:
//!
//! ```text
//! cargo run --example hyper-app                       # replica in a temporary directory
//! cargo run --example hyper-app -- s3://bucket/prefix # or any walsync destination
//! curl -d 'buy milk' http://127.0.0.1:3000/notes      # stored in the replica on return
//! curl http://127.0.0.1:3000/notes
//! ```
//!
//! Settings: the destination is the first argument, else `WALSYNC_BUCKET`, else a
//! `file://` directory under the system's temporary directory; `APP_DB` (default
//! `notes.db` in that temporary directory) and `APP_ADDR` (default `127.0.0.1:3000`).
//! Ctrl-C (or SIGTERM) stops accepting requests, then stops the replicator, which ships
//! what is committed before returning.
//!
//! walsync's library is blocking and needs no runtime: the replicator runs its own threads,
//! and the few blocking calls (`start`, `sync`, `stop`, and rusqlite itself) run on Tokio's
//! blocking pool through `spawn_blocking`, never on an async worker thread.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rusqlite::Connection;
use walsync::storage::{self, Destination, Storage};
use walsync::{Options, Replicator};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The replica name of the application's database.
pub const NAME: &str = "notes";

/// The largest note accepted, in bytes.
const MAX_NOTE: usize = 64 * 1024;

pub struct Config {
    /// The application's database.
    pub db: PathBuf,
    /// Where walsync replicates it (`main` opens it from `s3://bucket/prefix` or
    /// `file:///dir`; a test hands in its own).
    pub storage: Arc<dyn Storage>,
}

struct App {
    db: Mutex<Connection>,
    replicator: Replicator,
}

/// Open the application's database with the settings an application embedding walsync
/// should use (see the README's "What the application should set").
pub fn open_database(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL mode is what walsync replicates; it persists in the file.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // walsync takes the write lock for a few milliseconds now and then: wait, don't fail.
    conn.busy_timeout(Duration::from_secs(5))?;
    // In WAL mode NORMAL is safe against corruption; a power cut may lose the last
    // commits locally, which is what the replica (after sync) is for.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS notes (
             id INTEGER PRIMARY KEY,
             body TEXT NOT NULL,
             created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         )",
    )?;
    Ok(conn)
}

/// Serve the application on `listener` until `shutdown` completes, replicating its
/// database meanwhile; then stop replicating (shipping what is committed).
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let app = tokio::task::spawn_blocking(move || -> Result<App, BoxError> {
        let conn = open_database(&config.db)?;
        let replicator = Replicator::start(
            config.storage,
            &[(config.db.clone(), NAME.to_string())],
            Options::default(),
        )?;
        Ok(App {
            db: Mutex::new(conn),
            replicator,
        })
    })
    .await??;
    let app = Arc::new(app);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (socket, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::task::yield_now().await;
                    continue;
                }
            },
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&app), req));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service);
            if let Err(e) = connection.await {
                eprintln!("connection: {e}");
            }
        });
    }
    // Requests still running hold the app for a moment; then stop the replicator, which
    // ships what is committed.
    stop(app, std::time::Instant::now() + Duration::from_secs(10)).await
}

/// Wait for the last requests to let go of the app (until `deadline`), then stop the
/// replicator (waiting at most 30 s for storage). Blocking, so on the blocking pool.
async fn stop(app: Arc<App>, deadline: std::time::Instant) -> Result<(), BoxError> {
    tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
        let mut app = app;
        let app = loop {
            match Arc::try_unwrap(app) {
                Ok(app) => break app,
                Err(_) if std::time::Instant::now() >= deadline => {
                    return Err("requests still running at shutdown".into())
                }
                Err(shared) => {
                    app = shared;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        app.replicator.stop(Duration::from_secs(30))?;
        Ok(())
    })
    .await?
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<String>, BoxError> {
    let route = (req.method().clone(), req.uri().path().to_string());
    match (route.0, route.1.as_str()) {
        (Method::POST, "/notes") => {
            let Some(body) = read_body(req.into_body(), MAX_NOTE).await? else {
                return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, "note too large\n"));
            };
            let Ok(text) = String::from_utf8(body) else {
                return Ok(reply(StatusCode::BAD_REQUEST, "a note is UTF-8 text\n"));
            };
            // Insert, then wait until the commit is stored in the replica: an important
            // write is acknowledged only once it would survive losing this machine.
            let id = tokio::task::spawn_blocking(move || -> Result<i64, BoxError> {
                let id = {
                    let db = app.db.lock().map_err(|_| "database mutex poisoned")?;
                    db.execute("INSERT INTO notes (body) VALUES (?1)", [text])?;
                    db.last_insert_rowid()
                };
                app.replicator.sync(NAME)?;
                Ok(id)
            })
            .await??;
            Ok(reply(StatusCode::CREATED, &format!("stored note {id}\n")))
        }
        (Method::GET, "/notes") => {
            let notes = tokio::task::spawn_blocking(move || -> Result<String, BoxError> {
                let db = app.db.lock().map_err(|_| "database mutex poisoned")?;
                let mut statement =
                    db.prepare("SELECT id, created, body FROM notes ORDER BY id")?;
                let mut out = String::new();
                let mut rows = statement.query([])?;
                while let Some(row) = rows.next()? {
                    let (id, created, body): (i64, String, String) =
                        (row.get(0)?, row.get(1)?, row.get(2)?);
                    out.push_str(&format!("{id}\t{created}\t{body}\n"));
                }
                Ok(out)
            })
            .await??;
            Ok(reply(StatusCode::OK, &notes))
        }
        _ => Ok(reply(
            StatusCode::NOT_FOUND,
            "try POST /notes or GET /notes\n",
        )),
    }
}

fn reply(status: StatusCode, body: &str) -> Response<String> {
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    response
}

/// The request body, or None if it is longer than `limit`.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Option<Vec<u8>>, BoxError> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            if out.len() + data.len() > limit {
                return Ok(None);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Some(out))
}

/// Block SIGINT and SIGTERM in every thread (call before any is started) and return a
/// future that completes when one arrives, taken synchronously by a small thread.
fn stop_signal() -> impl Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // SAFETY: plain libc calls on a sigset_t we own, before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and its signals are blocked in every thread.
        while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

#[allow(dead_code)] // when this file is a module of the test that runs it
fn main() -> Result<(), BoxError> {
    let shutdown = stop_signal();
    // walsync logs through the `log` crate: upload failures and new generations are worth
    // seeing. (Keep ureq at info level: its debug lines carry presigned URLs.)
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("walsync=info"))
        .filter_module("ureq", log::LevelFilter::Info)
        .init();
    let temp = std::env::temp_dir().join("walsync-hyper-app");
    std::fs::create_dir_all(&temp)?;
    let destination = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("WALSYNC_BUCKET").ok())
        .unwrap_or_else(|| format!("file://{}", temp.join("replica").display()));
    let db = std::env::var_os("APP_DB").map_or_else(|| temp.join("notes.db"), PathBuf::from);
    let addr: SocketAddr = std::env::var("APP_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    // Opening S3 storage may ask a credentials endpoint: before the runtime, not on it.
    let storage: Arc<dyn Storage> =
        Arc::from(storage::open(&Destination::parse(&destination)?, None)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!(
            "serving http://{addr}/notes, {} replicated to {destination} (Ctrl-C stops)",
            db.display()
        );
        run(Config { db, storage }, listener, shutdown).await?;
        println!("stopped; everything committed is in the replica");
        Ok(())
    })
}
