//! What the replica's tests share: a replicated database to start from, and a restore to
//! check it against.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::Replica;
use crate::storage::file::FileStorage;
use crate::storage::Storage;

pub(super) fn setup(dir: &Path) -> (Connection, Replica) {
    let path = dir.join("app.db");
    let app = Connection::open(&path).unwrap();
    app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.join("bucket")));
    let mut replica = Replica::open(&path, storage, "app").unwrap();
    replica.sync().unwrap();
    (app, replica)
}

/// Restore `app` from the test's bucket; the rows of `t` in the restored database and in
/// the application's.
pub(super) fn restored_and_source_rows(dir: &Path) -> (i64, i64) {
    let out = dir.join("restored.db");
    let storage = FileStorage::new(dir.join("bucket"));
    crate::restore::restore(&storage, "app", &out, &Default::default()).unwrap();
    let count = |path: &Path| -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    (count(&out), count(&dir.join("app.db")))
}

/// An application write that must not wait for walsync.
pub(super) fn write_now(app: &Connection) -> rusqlite::Result<()> {
    app.busy_timeout(Duration::ZERO)?;
    app.execute_batch("INSERT INTO t VALUES (2);")
}

/// `n` rows into `t`, each the SQL expression `value` (`randomblob(3000)`, say), in one
/// transaction of the application's.
pub(super) fn insert_rows(app: &Connection, n: u32, value: &str) {
    app.execute_batch(&format!(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) \
         INSERT INTO t SELECT {value} FROM s;"
    ))
    .unwrap();
}
