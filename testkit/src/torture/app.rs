//! The application the harness tortures walsync with: its database ([`create_database`]),
//! the [`Writer`] thread that commits random transactions ([`one_transaction`]) and records
//! each commit's times and the [`digest`] of the content after it, the application's
//! checkpoint connection, and the replacement file a round renames into place. Apart
//! because it is what walsync serves, not what the harness does to walsync: none of it
//! knows walsync exists.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, TransactionBehavior};
use walsync::UtcTime;

use super::{sleep_ms, Rng};
use crate::faults::splitmix64;

/// One recorded commit: when it started and ended, and the content right after it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Commit {
    pub(super) start: UtcTime,
    pub(super) end: UtcTime,
    pub(super) digest: u64,
}

pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The application database: WAL mode, a counter bumped by every transaction (so every
/// commit's content is different), small rows and large blobs.
pub(super) fn create_database(path: &Path, autocheckpoint: bool) -> rusqlite::Result<()> {
    let conn = Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL;
         PRAGMA wal_autocheckpoint={};
         CREATE TABLE meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         INSERT INTO meta VALUES (1, 0);
         CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT, n INTEGER);
         CREATE TABLE blobs(id INTEGER PRIMARY KEY, body BLOB);",
        if autocheckpoint { 1000 } else { 0 }
    ))
}

/// A digest of the logical content: the schema and every table's rows in rowid order.
pub(super) fn digest(conn: &Connection) -> rusqlite::Result<u64> {
    let mut h = Digest::new();
    let schema: Vec<(String, String, String)> = conn
        .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (kind, name, sql) in &schema {
        h.feed(kind.as_bytes());
        h.feed(name.as_bytes());
        h.feed(sql.as_bytes());
    }
    for (kind, name, _) in &schema {
        if kind != "table" {
            continue;
        }
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{name}\" ORDER BY rowid"))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => h.feed(b"N"),
                    rusqlite::types::ValueRef::Integer(v) => h.feed(&v.to_le_bytes()),
                    rusqlite::types::ValueRef::Real(v) => h.feed(&v.to_le_bytes()),
                    rusqlite::types::ValueRef::Text(t) => h.feed(t),
                    rusqlite::types::ValueRef::Blob(b) => h.feed(b),
                }
            }
            h.feed(b"\n");
        }
    }
    Ok(h.finish())
}

/// A fast 64-bit hash over 8-byte words (MiB of blobs per commit, even in debug builds).
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    fn feed(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail));
    }
    fn finish(&self) -> u64 {
        let mut z = self.0;
        splitmix64(&mut z)
    }
}

#[derive(Debug, Default)]
pub(super) struct WriterStats {
    pub(super) blobs: u64,
    pub(super) schema_changes: u64,
    pub(super) vacuums: u64,
    /// Commits that failed with SQLITE_BUSY, and what each said (the first few).
    pub(super) busy: u64,
    pub(super) busy_failures: Vec<String>,
    pub(super) slowest: Duration,
    pub(super) slowest_at: Option<UtcTime>,
    /// States recorded at a reopen because the file changed under the closed connection
    /// (a replacement), not by a commit.
    pub(super) switches: u64,
}

/// The application: commits random transactions on its own thread and records each.
pub(super) struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<Commit>>>,
    control: mpsc::Sender<PauseRequest>,
    thread: Option<std::thread::JoinHandle<Result<WriterStats, String>>>,
}

/// Asks the writer to close its connection (see [`Writer::pause`]).
struct PauseRequest {
    closed: mpsc::SyncSender<()>,
    resume: mpsc::Receiver<()>,
}

/// The writer's connection is closed until this is dropped.
pub(super) struct Paused {
    _resume: mpsc::Sender<()>,
}

/// The application's connection: a 5 s busy timeout, as an application sharing its
/// database with walsync should set (see DESIGN.md); a commit that still fails with
/// SQLITE_BUSY means walsync held the write lock for seconds.
fn open_app(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("opening the database: {e}"))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The application's second connection, for checkpoints: a short busy timeout, so that a
/// checkpoint never holds the write lock long against the writer.
pub(super) fn open_checkpointer(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("opening the database: {e}"))?;
    conn.busy_timeout(Duration::from_millis(100))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// `path` with `suffix` appended (`app.db-wal`).
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Keep the blobs (and so the database) to a few MiB.
const BLOB_BUDGET: i64 = 5 * 1024 * 1024;

impl Writer {
    pub(super) fn start(path: &Path, mut rng: Rng) -> Result<Writer, String> {
        let conn = open_app(path)?;
        let path = path.to_path_buf();
        let first = UtcTime::now();
        let d0 = digest(&conn).map_err(|e| e.to_string())?;
        let commits = Arc::new(Mutex::new(vec![Commit {
            start: first,
            end: first,
            digest: d0,
        }]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&commits));
        let (control, requests) = mpsc::channel::<PauseRequest>();
        let thread = std::thread::spawn(move || {
            let mut stats = WriterStats::default();
            let mut next_table = 0u64;
            let mut conn = conn;
            while !s.load(Ordering::Relaxed) {
                if let Ok(request) = requests.try_recv() {
                    // Really close the connection (the last close checkpoints and deletes
                    // the WAL), wait, and reopen whatever file is at the path now.
                    let paused_at = UtcTime::now();
                    drop(conn);
                    let _ = request.closed.send(());
                    let _ = request.resume.recv();
                    conn = open_app(&path)?;
                    let d = digest(&conn).map_err(|e| format!("writer digest: {e}"))?;
                    if let Ok(mut list) = c.lock() {
                        if list.last().is_some_and(|l| l.digest != d) {
                            stats.switches += 1;
                            list.push(Commit {
                                start: paused_at,
                                end: UtcTime::now(),
                                digest: d,
                            });
                        }
                    }
                    continue;
                }
                let start = UtcTime::now();
                let t0 = Instant::now();
                match one_transaction(&conn, &mut rng, &mut stats, &mut next_table) {
                    Ok(()) => {}
                    Err(e) if is_busy(&e) => {
                        // Not retried silently: the round fails (see `Round::play`).
                        stats.busy += 1;
                        if stats.busy_failures.len() < 3 {
                            stats
                                .busy_failures
                                .push(format!("after {} ms: {e}", t0.elapsed().as_millis()));
                        }
                        continue;
                    }
                    Err(e) => return Err(format!("writer: {e}")),
                }
                let end = UtcTime::now();
                if t0.elapsed() > stats.slowest {
                    stats.slowest = t0.elapsed();
                    stats.slowest_at = Some(start);
                }
                let d = digest(&conn).map_err(|e| format!("writer digest: {e}"))?;
                if let Ok(mut list) = c.lock() {
                    list.push(Commit {
                        start,
                        end,
                        digest: d,
                    });
                }
                sleep_ms(rng.below(25));
            }
            Ok(stats)
        });
        Ok(Writer {
            stop,
            commits,
            control,
            thread: Some(thread),
        })
    }

    /// Close the writer's connection (after its current transaction) until the returned
    /// guard is dropped; then it reopens the path and, if the content changed meanwhile (a
    /// replacement), records the new state.
    pub(super) fn pause(&self) -> Result<Paused, String> {
        let (closed, closed_rx) = mpsc::sync_channel(1);
        let (resume_tx, resume) = mpsc::channel();
        self.control
            .send(PauseRequest { closed, resume })
            .map_err(|_| "the writer has stopped".to_string())?;
        closed_rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the writer did not close its connection (has it failed?)".to_string())?;
        Ok(Paused { _resume: resume_tx })
    }

    pub(super) fn stop(mut self) -> Result<(Vec<Commit>, WriterStats), String> {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self
            .thread
            .take()
            .ok_or("the writer was already stopped")?
            .join()
            .map_err(|_| "the writer thread panicked".to_string())??;
        let commits = self.commits.lock().map_err(|e| e.to_string())?.clone();
        Ok((commits, stats))
    }
}

impl Drop for Writer {
    /// On an early return, the writer stops too (its thread is not waited for).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A replacement for the database at `db`, written at `out` with no WAL beside it (WAL
/// mode): a copy of its current content (`VACUUM INTO`) or a fresh database, either way
/// with a marker row and the counter moved on, so its state differs from every recorded
/// one.
pub(super) fn prepare_replacement(
    db: &Path,
    out: &Path,
    fresh: bool,
    rng: &mut Rng,
) -> Result<(), String> {
    let fail = |e: rusqlite::Error| format!("preparing the replacement: {e}");
    if fresh {
        create_database(out, true).map_err(fail)?;
    } else {
        let source = open_app(db)?;
        source
            .execute("VACUUM INTO ?1", [out.to_string_lossy()])
            .map_err(fail)?;
    }
    let conn = Connection::open(out).map_err(fail)?;
    conn.execute_batch("PRAGMA journal_mode=WAL")
        .map_err(fail)?;
    conn.execute(
        "INSERT INTO items(label, n) VALUES (?1, ?2)",
        params![
            format!("replacement {}", rng.next()),
            rng.below(1000) as i64
        ],
    )
    .map_err(fail)?;
    conn.execute("UPDATE meta SET n = n + 1000 WHERE k = 1", [])
        .map_err(fail)?;
    // The last close checkpoints and removes the replacement's own WAL.
    drop(conn);
    Ok(())
}

/// One random transaction (or a VACUUM), committed.
fn one_transaction(
    conn: &Connection,
    rng: &mut Rng,
    stats: &mut WriterStats,
    next_table: &mut u64,
) -> rusqlite::Result<()> {
    let kind = rng.below(100);
    if kind < 3 {
        stats.vacuums += 1;
        return conn.execute_batch("VACUUM");
    }
    let mut tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.set_drop_behavior(rusqlite::DropBehavior::Rollback);
    let tables: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' AND name LIKE 'extra%'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    match kind {
        3..=35 => {
            let table = if !tables.is_empty() && rng.chance(0.3) {
                tables[rng.below(tables.len() as u64) as usize].clone()
            } else {
                "items".to_string()
            };
            for _ in 0..rng.range(1, 20) {
                let label = format!("row {}", rng.next());
                if table == "items" {
                    tx.execute(
                        "INSERT INTO items(label, n) VALUES (?1, ?2)",
                        params![label, rng.below(1000) as i64],
                    )?;
                } else {
                    tx.execute(
                        &format!("INSERT INTO \"{table}\"(v) VALUES (?1)"),
                        params![label],
                    )?;
                }
            }
        }
        36..=55 => {
            let m = rng.range(2, 9) as i64;
            tx.execute(
                "UPDATE items SET n = n + ?1, label = label || 'u' WHERE id % ?2 = ?3",
                params![rng.range(1, 50) as i64, m, rng.below(m as u64) as i64],
            )?;
        }
        56..=67 => {
            let m = rng.range(2, 9) as i64;
            tx.execute(
                "DELETE FROM items WHERE id % ?1 = ?2",
                params![m, rng.below(m as u64) as i64],
            )?;
        }
        68..=81 => {
            // A large blob (page growth); past the budget, old blobs go first (shrink).
            stats.blobs += 1;
            let len = rng.range(100 * 1024, 2 * 1024 * 1024) as i64;
            let total: i64 = tx.query_row(
                "SELECT coalesce(sum(length(body)), 0) FROM blobs",
                [],
                |r| r.get(0),
            )?;
            if total + len > BLOB_BUDGET {
                tx.execute(
                    "DELETE FROM blobs WHERE id IN (SELECT id FROM blobs ORDER BY id LIMIT ?1)",
                    params![rng.range(1, 4) as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO blobs(body) VALUES (?1)",
                params![rng.bytes(len as usize)],
            )?;
        }
        82..=87 => {
            if rng.chance(0.5) {
                tx.execute("DELETE FROM blobs", [])?;
            } else {
                tx.execute("DELETE FROM blobs WHERE id % 2 = 0", [])?;
            }
        }
        _ => {
            stats.schema_changes += 1;
            let columns: i64 =
                tx.query_row("SELECT count(*) FROM pragma_table_info('items')", [], |r| {
                    r.get(0)
                })?;
            match rng.below(3) {
                0 if tables.len() < 6 => {
                    *next_table += 1;
                    tx.execute_batch(&format!(
                        "CREATE TABLE extra{}_{}(id INTEGER PRIMARY KEY, v TEXT)",
                        *next_table,
                        rng.below(1000)
                    ))?;
                }
                1 if !tables.is_empty() => {
                    let t = &tables[rng.below(tables.len() as u64) as usize];
                    tx.execute_batch(&format!("DROP TABLE \"{t}\""))?;
                }
                _ if columns < 16 => {
                    tx.execute_batch(&format!(
                        "ALTER TABLE items ADD COLUMN c{columns} INTEGER DEFAULT {}",
                        rng.below(100)
                    ))?;
                }
                _ => {
                    tx.execute_batch("CREATE INDEX IF NOT EXISTS items_n ON items(n)")?;
                }
            }
        }
    }
    tx.execute("UPDATE meta SET n = n + 1 WHERE k = 1", [])?;
    tx.commit()
}
