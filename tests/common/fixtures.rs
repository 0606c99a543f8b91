//! Real SQLite databases to replicate, and the real `walsync` binary to run against them.

#![allow(dead_code)] // each test binary uses its own part of the helper

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rusqlite::{params, Connection};

/// An application database in WAL mode with one table, written through a connection that
/// stays open (as an application's would), so its WAL survives between writes.
pub struct AppDb {
    pub path: PathBuf,
    pub conn: Connection,
    next_id: i64,
}

impl AppDb {
    /// Create `dir/name` in WAL mode with automatic checkpoints off, so tests decide when
    /// the WAL is checkpointed.
    pub fn create(dir: &Path, name: &str) -> AppDb {
        let path = dir.join(name);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA wal_autocheckpoint=0;
             CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT NOT NULL, body BLOB);",
        )
        .unwrap();
        AppDb {
            path,
            conn,
            next_id: 1,
        }
    }

    /// Commit one transaction inserting `rows` rows with `blob_len` pseudo-random bytes each.
    pub fn insert(&mut self, rows: usize, blob_len: usize) {
        let tx = self.conn.transaction().unwrap();
        for _ in 0..rows {
            let id = self.next_id;
            self.next_id += 1;
            tx.execute(
                "INSERT INTO items(id, label, body) VALUES (?1, ?2, ?3)",
                params![id, format!("item {id}"), noise(id as u64, blob_len)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    pub fn exec(&self, sql: &str) {
        self.conn.execute_batch(sql).unwrap();
    }

    /// The logical content of the database as it is now.
    pub fn dump(&self) -> String {
        dump_connection(&self.conn)
    }
}

/// Incompressible but repeatable bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every table's rows, in rowid order, as text: equal dumps mean equal content.
pub fn dump(path: &Path) -> String {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    dump_connection(&conn)
}

fn dump_connection(conn: &Connection) -> String {
    let mut out = String::new();
    let tables: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_schema WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (table, sql) in tables {
        out.push_str(&sql);
        out.push('\n');
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                let value: rusqlite::types::Value = row.get(i).unwrap();
                out.push_str(&format!("{value:?}|"));
            }
            out.push('\n');
        }
    }
    out
}

/// `PRAGMA integrity_check` of a database file.
pub fn integrity(path: &Path) -> String {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// Run the real `walsync` binary with `env` (and no other AWS_* variables).
pub fn walsync(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walsync"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("running walsync")
}

/// Run walsync and insist that it succeeded; returns stdout.
pub fn walsync_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = walsync(args, env);
    assert!(
        out.status.success(),
        "walsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run walsync and insist that it failed with a one-line error; returns that line.
pub fn walsync_err(args: &[&str], env: &[(String, String)]) -> String {
    let out = walsync(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "walsync {args:?} should have failed; stderr: {stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walsync: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// Files in `dir` (names only), sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
