//! Bad input gets one clear error line, a non-zero exit, and nothing half-written.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::fixtures::{files_in, walsync, walsync_err, walsync_ok, AppDb, Immutable};
use crate::common::s3server::S3Server;
use walsync::storage::Storage;
use walsync::Replica;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A replica `app` under `s3://bucket/<prefix>`: base snapshot plus three segments.
fn replica_with_three_segments(server: &S3Server, dir: &Path, prefix: &str) -> AppDb {
    let storage: Arc<dyn Storage> = Arc::new(server.storage(prefix));
    let mut app = AppDb::create(dir, "app.db");
    app.insert(10, 100);
    let mut replica = Replica::open(&app.path, storage, "app").unwrap();
    replica.snapshot().unwrap();
    for _ in 0..3 {
        app.insert(3, 2000);
        replica.sync().unwrap();
    }
    app
}

/// The file s3s-fs keeps for the `n`th (1-based) segment under `prefix/app/wal/`.
fn segment_file(server: &S3Server, prefix: &str, n: usize) -> PathBuf {
    let wal_dir = server
        .root()
        .join(server.bucket())
        .join(prefix)
        .join("app/wal");
    let names: Vec<String> = files_in(&wal_dir)
        .into_iter()
        .filter(|f| f.ends_with(".wal.gz"))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    wal_dir.join(&names[n - 1])
}

/// Restore must fail and leave nothing at `out` or beside it.
fn assert_restore_fails(server: &S3Server, prefix: &str, out: &Path, expect: &str) -> String {
    let dest = format!("s3://{}/{prefix}", server.bucket());
    let err = walsync_err(
        &["restore", "app", "-o", path_str(out), "-b", &dest],
        &server.env(),
    );
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    let dir = out.parent().unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    let left: Vec<String> = files_in(dir)
        .into_iter()
        .filter(|f| f.starts_with(name) || f.starts_with(".walsync"))
        .collect();
    assert!(
        left.is_empty(),
        "left behind after a failed restore: {left:?}"
    );
    err
}

#[test]
fn wrong_secret_key_is_a_clear_error_without_the_secret() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let secret = "not-the-secret-Zq81xx";
    let env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "AWS_SECRET_ACCESS_KEY" => (k, secret.to_string()),
            _ => (k, v),
        })
        .collect();
    let dest = format!("s3://{}/x", server.bucket());
    for args in [
        vec!["snapshot", path_str(&app.path), "-b", &dest],
        vec!["list", "-b", &dest],
        vec!["restore", "app", "-o", "/tmp/never-written.db", "-b", &dest],
    ] {
        let out = walsync(&args, &env);
        assert!(!out.status.success());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(secret), "secret leaked: {all}");
        assert!(!all.contains("X-Amz-Signature"), "signature leaked: {all}");
        let err = walsync_err(&args, &env);
        assert!(
            err.contains("access denied") || err.contains("SignatureDoesNotMatch"),
            "{err}"
        );
    }
    assert!(!Path::new("/tmp/never-written.db").exists());
}

#[test]
fn corrupt_segment_is_refused() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    replica_with_three_segments(&server, dir.path(), "c");
    let victim = segment_file(&server, "c", 2);
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&victim, bytes).unwrap();
    let err = assert_restore_fails(&server, "c", &dir.path().join("out.db"), "corrupt");
    assert!(
        err.contains("0000000002"),
        "error should name the object: {err}"
    );
}

#[test]
fn truncated_segment_is_refused() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    replica_with_three_segments(&server, dir.path(), "t");
    let victim = segment_file(&server, "t", 3);
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 20]).unwrap();
    assert_restore_fails(&server, "t", &dir.path().join("out.db"), "0000000003");
}

#[test]
fn missing_segment_in_the_middle_is_refused() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    replica_with_three_segments(&server, dir.path(), "m");
    std::fs::remove_file(segment_file(&server, "m", 2)).unwrap();
    let err = assert_restore_fails(&server, "m", &dir.path().join("out.db"), "missing");
    assert!(err.contains("segment 2"), "{err}");
}

#[test]
fn restore_into_an_unwritable_place_fails_cleanly() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    replica_with_three_segments(&server, dir.path(), "u");
    let dest = format!("s3://{}/u", server.bucket());
    // A directory nobody may create files in, root included, and a parent that is a file.
    for out in [
        "/proc/walsync-out.db".to_string(),
        format!("{}/x.db", dir.path().join("app.db").display()),
    ] {
        let err = walsync_err(&["restore", "app", "-o", &out, "-b", &dest], &server.env());
        assert!(err.contains("cannot write restore output"), "{err}");
        assert!(!Path::new(&out).exists());
    }
}

#[test]
fn names_with_path_separators_are_refused() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let dest = format!("s3://{}/n", server.bucket());
    for name in ["../app", "a/b", "..", ".hidden"] {
        let out = dir.path().join("out.db");
        let err = walsync_err(
            &["restore", name, "-o", path_str(&out), "-b", &dest],
            &server.env(),
        );
        assert!(err.contains("invalid replica name"), "{err}");
        let err = walsync_err(
            &["snapshot", path_str(&app.path), "-b", &dest, "--name", name],
            &server.env(),
        );
        assert!(err.contains("invalid replica name"), "{err}");
    }
    // Nothing at all was written to the bucket.
    let objects = walsync_ok(&["list", "-b", &dest, "--json"], &server.env());
    assert!(objects.contains("\"databases\": []"), "{objects}");
}

#[test]
fn unusable_databases_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", dir.path().join("replica").display());
    let missing = dir.path().join("missing.db");
    let err = walsync_err(&["snapshot", path_str(&missing), "-b", &dest], &[]);
    assert!(err.contains("does not exist"), "{err}");

    let text = dir.path().join("notes.db");
    std::fs::write(
        &text,
        "these are notes, not a database; long enough to have a header",
    )
    .unwrap();
    let err = walsync_err(&["snapshot", path_str(&text), "-b", &dest], &[]);
    assert!(err.contains("not a SQLite database"), "{err}");

    let rollback = dir.path().join("rollback.db");
    rusqlite::Connection::open(&rollback)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let err = walsync_err(&["snapshot", path_str(&rollback), "-b", &dest], &[]);
    assert!(err.contains("PRAGMA journal_mode=WAL"), "{err}");
    assert!(
        !dir.path().join("replica").exists(),
        "nothing should be stored"
    );
}

#[test]
fn storage_problems_are_named() {
    let mut server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let err = walsync_err(
        &[
            "snapshot",
            path_str(&app.path),
            "-b",
            "s3://no-such-bucket/x",
        ],
        &server.env(),
    );
    assert!(err.contains("no-such-bucket"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    server.stop();
    let dest = format!("s3://{}/x", server.bucket());
    let err = walsync_err(&["list", "-b", &dest], &server.env());
    assert!(err.contains("list"), "{err}");

    let err = walsync_err(&["list", "-b", "ftp://example/x"], &[]);
    assert!(err.contains("not supported"), "{err}");
    let err = walsync_err(&["list", "-b", &dest], &[]);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
}

#[test]
fn a_second_replicator_of_the_same_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = AppDb::create(dir.path(), "app.db");
    let storage: Arc<dyn Storage> = Arc::new(walsync::storage::file::FileStorage::new(
        dir.path().join("replica"),
    ));
    let _first = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    let second = Replica::open(&app.path, storage, "app").err().unwrap();
    assert!(
        second.to_string().contains("already replicating"),
        "{second}"
    );
}

#[test]
fn a_segment_with_a_bad_wal_checksum_inside_valid_gzip_is_refused() {
    use std::io::{Read, Write};
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    replica_with_three_segments(&server, dir.path(), "w");
    let victim = segment_file(&server, "w", 2);
    let mut wal = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&victim).unwrap())
        .read_to_end(&mut wal)
        .unwrap();
    // One byte of the first frame's page: the gzip layer stays valid, the WAL checksum not.
    wal[32 + 24 + 100] ^= 0x01;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&wal).unwrap();
    std::fs::write(&victim, gz.finish().unwrap()).unwrap();
    let err = assert_restore_fails(&server, "w", &dir.path().join("out.db"), "0000000002");
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn a_database_in_a_read_only_directory_is_refused_cleanly() {
    // Under the target directory: the same filesystem as the checkout, which supports chattr.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dbdir = base.path().join("db");
    std::fs::create_dir(&dbdir).unwrap();
    let app = AppDb::create(&dbdir, "app.db");
    let replica = base.path().join("replica");
    let dest = format!("file://{}", replica.display());
    let _guard = Immutable::new(&dbdir);
    for command in ["snapshot", "watch"] {
        let err = walsync_err(&[command, path_str(&app.path), "-b", &dest], &[]);
        assert!(err.contains("creating walsync's directory"), "{err}");
        assert!(err.contains("not permitted"), "{err}");
    }
    assert!(!replica.exists(), "nothing may be stored");
}
