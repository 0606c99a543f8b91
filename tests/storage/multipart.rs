//! Multipart uploads: a file larger than a part goes up in parts (the server assembles
//! exactly our bytes), a failed one is aborted, and the stale ones a crash leaves behind are
//! aborted by the client, by `prune` (its database's) and by `watch` (its destination's,
//! once). The ETags and the incomplete uploads are made and read with an independent
//! client, not ours.

use std::time::Duration;

use super::{get, pseudo_random, temp_file, MIB};
use crate::common::fixtures::{wait_for, AppDb, WatchProcess};
use walsync::storage::s3::STALE_UPLOAD_AGE;
use walsync::storage::{ObjectInfo, Storage};
use walsync::ErrorKind;
use walsync_testkit::s3server::S3Server;

/// The server's bucket and credentials for an independent client (rusty-s3 and ureq, not
/// walsync's), to see and set up the server's state without trusting what is tested.
fn independent_client(server: &S3Server) -> (rusty_s3::Bucket, rusty_s3::Credentials) {
    let bucket = rusty_s3::Bucket::new(
        server.endpoint().parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        server.bucket().to_string(),
        "us-east-1",
    )
    .unwrap();
    let credentials = rusty_s3::Credentials::new(server.access_key(), server.secret_key());
    (bucket, credentials)
}

/// The ETag the server gives an object, asked for directly (not through our client).
fn server_etag(server: &S3Server, object: &str) -> String {
    use rusty_s3::S3Action;
    let (bucket, credentials) = independent_client(server);
    let url = bucket
        .head_object(Some(&credentials), object)
        .sign(Duration::from_secs(60));
    let response = ureq::head(url.as_str()).call().expect("HEAD object");
    response.headers()["etag"].to_str().unwrap().to_string()
}

#[test]
fn put_file_larger_than_a_part_uses_multipart() {
    let server = S3Server::start();
    let s3 = server.storage("p").with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(12 * MIB + MIB / 2 + 3, 2);
    let file = temp_file(&dir, &data);
    server.clear_requests();

    s3.put_file("big/wal.gz", &file).unwrap();

    let requests = server.requests();
    let parts: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.has_param("partNumber") && r.has_param("uploadId"))
        .collect();
    let lengths: Vec<_> = parts.iter().map(|r| r.content_length).collect();
    let last = (data.len() - 10 * MIB) as u64;
    assert_eq!(
        lengths,
        vec![Some(5 * MIB as u64), Some(5 * MIB as u64), Some(last)],
        "{requests:?}"
    );
    assert!(parts.iter().all(|r| !r.chunked));
    assert!(requests
        .iter()
        .any(|r| r.method == "POST" && r.has_param("uploads")));
    assert!(requests
        .iter()
        .any(|r| r.method == "POST" && r.has_param("uploadId")));
    let stats = s3.stats();
    assert_eq!((stats.multipart_uploads, stats.parts_uploaded), (1, 3));

    // The server assembled a 3-part object (multipart ETags end in -<parts>)...
    let etag = server_etag(&server, "p/big/wal.gz");
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
    // ... with exactly our bytes, downloaded whole (beyond any default body limit).
    assert_eq!(get(&s3, "big/wal.gz").unwrap(), data);
    assert_eq!(
        s3.list("big/").unwrap(),
        vec![ObjectInfo {
            key: "big/wal.gz".into(),
            size: data.len() as u64
        }]
    );
}

#[test]
fn failed_multipart_upload_is_aborted() {
    let server = S3Server::start();
    let s3 = server.storage("p").with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source.bin");
    std::fs::write(&path, pseudo_random(11 * MIB, 3)).unwrap();
    // Opened for writing only: its size is known but reading it fails, after the upload was
    // created.
    let unreadable = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    server.clear_requests();

    let err = s3.put_file("big/broken", &unreadable).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("big/broken"), "{err}");
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.has_param("uploadId")),
        "the upload must be aborted: {requests:?}"
    );
    assert_eq!(s3.stats().retries, 0, "a local read error is not retried");
    assert_eq!(s3.stats().multipart_uploads, 0);
    assert_eq!(
        get(&s3, "big/broken").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // s3s-fs keeps parts as `.upload_id-*` files in its root until completed or aborted.
    let leftovers: Vec<_> = std::fs::read_dir(server.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Start a multipart upload of `object` and leave it incomplete, with an independent client.
fn start_upload(server: &S3Server, object: &str) {
    use rusty_s3::S3Action;
    let (bucket, credentials) = independent_client(server);
    let url = bucket
        .create_multipart_upload(Some(&credentials), object)
        .sign(Duration::from_secs(60));
    ureq::post(url.as_str())
        .send_empty()
        .expect("CreateMultipartUpload");
}

#[test]
fn stale_multipart_uploads_of_this_replica_are_aborted() {
    let server = S3Server::start();
    // A prefix that s3s-fs lists unencoded although it says it encoded it.
    let s3 = server.storage("p+q");
    start_upload(&server, "p+q/app/old"); // this replica's, left by a crash
    start_upload(&server, "p+q/other/old"); // another database's
    start_upload(&server, "elsewhere/old"); // outside the destination
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(3600));
    start_upload(&server, "p+q/app/new"); // may still be running somewhere
    assert_eq!(server.uploads().len(), 4);

    let aborted = s3.abort_stale_uploads("app/", STALE_UPLOAD_AGE).unwrap();
    assert_eq!(aborted, ["app/old"]);
    assert_eq!(
        server.uploads(),
        ["elsewhere/old", "p+q/app/new", "p+q/other/old"]
    );
    // Through the trait (as prune calls it), with the default age.
    let storage: &dyn Storage = &s3;
    assert_eq!(storage.abort_stale_uploads("other/").unwrap(), 1);
    assert_eq!(server.uploads(), ["elsewhere/old", "p+q/app/new"]);
    assert_eq!(storage.abort_stale_uploads("app/").unwrap(), 0);
    // file:// has no uploads to abort.
    let dir = tempfile::tempdir().unwrap();
    let file = walsync::storage::file::FileStorage::new(dir.path().to_path_buf());
    assert_eq!(file.abort_stale_uploads("app/").unwrap(), 0);
}

#[test]
fn prune_aborts_the_stale_uploads_of_the_database_it_prunes() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let s3 = server.storage("prune");
    start_upload(&server, "prune/app/snapshots/crashed.db.gz");
    start_upload(&server, "prune/other/snapshots/crashed.db.gz");
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(60));
    let now = walsync::UtcTime::now();
    let hour = Duration::from_secs(3600);

    // `walsync prune app` (one replica): a dry run changes nothing.
    let mut db = AppDb::create(dir.path(), "app.db");
    db.insert(1, 10);
    let storage: std::sync::Arc<dyn walsync::storage::Storage> =
        std::sync::Arc::new(server.storage("prune"));
    walsync::Replica::open(&db.path, storage, "app")
        .unwrap()
        .snapshot()
        .unwrap();
    let catalog = walsync::format::Catalog::from_listing(s3.list("").unwrap());
    let names = ["app".to_string()];
    let prune = |dry_run| {
        walsync::unstable::prune_catalog(&s3, &catalog, &names, now, hour, dry_run, |_, _| {})
            .unwrap()
    };
    prune(true);
    assert_eq!(server.uploads().len(), 2);
    prune(false);
    assert_eq!(server.uploads(), ["prune/other/snapshots/crashed.db.gz"]);
}

/// `watch` aborts the stale uploads of its whole destination once as it starts (one request,
/// not one a database), leaving the ones of other prefixes alone.
#[test]
fn watch_aborts_the_stale_uploads_of_its_destination_once_at_start() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    start_upload(&server, "w/app/snapshots/crashed.db.gz");
    start_upload(&server, "w/other/snapshots/crashed.db.gz");
    start_upload(&server, "elsewhere/app/snapshots/crashed.db.gz");
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(60));
    let dbs: Vec<AppDb> = ["a.db", "b.db", "c.db"]
        .iter()
        .map(|name| {
            let mut db = AppDb::create(dir.path(), name);
            db.insert(1, 10);
            db
        })
        .collect();
    let dest = format!("s3://{}/w", server.bucket());
    let mut args: Vec<&str> = Vec::new();
    args.extend(dbs.iter().map(|db| db.path.to_str().unwrap()));
    args.extend(["-b", dest.as_str()]);
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    wait_for(Duration::from_secs(30), "the stale uploads aborted", || {
        server.uploads() == ["elsewhere/app/snapshots/crashed.db.gz"]
    });
    // Every database stored: each has had its start-up prune by then, or soon after. (Any
    // three objects would not do: one database's snapshot, WAL and state make three.)
    wait_for(
        Duration::from_secs(30),
        "a snapshot of each database",
        || {
            let keys = server.storage("w").list("").unwrap();
            ["a", "b", "c"].iter().all(|name| {
                let snapshots = format!("{name}/snapshots/");
                keys.iter().any(|o| o.key.starts_with(&snapshots))
            })
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let listings = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.has_param("uploads"))
        .count();
    assert_eq!(listings, 1, "ListMultipartUploads requests");
}

/// With retention off (`--retention 0`: keep every backup) nothing is pruned, but the
/// uploads a crash left are still aborted: they cost storage whatever the retention.
/// (Before, the thread that aborts them was started only with retention on.)
#[test]
fn watch_with_retention_off_still_aborts_stale_uploads_and_deletes_nothing() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    start_upload(&server, "w/app/snapshots/crashed.db.gz");
    server.age_uploads(STALE_UPLOAD_AGE + Duration::from_secs(60));
    let mut db = AppDb::create(dir.path(), "app.db");
    db.insert(1, 10);
    let dest = format!("s3://{}/w", server.bucket());
    let args = [
        db.path.to_str().unwrap(),
        "-b",
        dest.as_str(),
        "--retention",
        "0",
    ];
    let watch = WatchProcess::start(&args, &server.env(), dir.path());
    wait_for(Duration::from_secs(30), "the stale upload aborted", || {
        server.uploads().is_empty()
    });
    wait_for(Duration::from_secs(30), "a snapshot stored", || {
        !server.storage("w").list("").unwrap().is_empty()
    });
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let requests = server.requests();
    let deletes: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "DELETE" || (r.method == "POST" && r.has_param("delete")))
        .collect();
    assert!(
        deletes.iter().all(|r| r.has_param("uploadId")),
        "only the stale upload's abort deletes anything: {deletes:?}"
    );
    assert_eq!(deletes.len(), 1, "{deletes:?}");
}
