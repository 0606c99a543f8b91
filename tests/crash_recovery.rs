//! What a crash between "stored in the bucket" and "noted in the sidecar" leaves behind, and
//! that walsync and restore cope with it. Both moments were found by the torture harness
//! (`scripts/torture.sh`) when walsync was SIGKILLed at the wrong time; these tests make the
//! same moment happen deterministically through the library.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::fixtures::{dump, integrity, wait_for, AppDb, WatchProcess};
use walsync::format::ObjectName;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::RestoreOptions;
use walsync::{Replica, SyncOutcome};

/// Store the next queued object the way an upload worker would, then "crash": drop the
/// replica without telling it the upload succeeded. Returns the stored key.
fn store_then_crash(mut replica: Replica, storage: &dyn Storage) -> String {
    let upload = replica.next_upload().unwrap().expect("an object staged");
    storage.put_file(&upload.key, &upload.file).unwrap();
    upload.key
}

fn restore_dump(storage: &dyn Storage, dir: &std::path::Path, n: u32, key: Option<&str>) -> String {
    let out = dir.join(format!("restored-{n}.db"));
    let options = RestoreOptions {
        point_in_time: key.map(|k| ObjectName::parse_key(k).unwrap().1.time),
        ..RestoreOptions::default()
    };
    walsync::restore(storage, "app", &out, &options).unwrap();
    assert_eq!(integrity(&out), "ok");
    dump(&out)
}

/// The staged object survives the crash and is uploaded again (the same bytes under the
/// same key); the next segment continues the chain after it. Before objects were staged,
/// the next start cut the same index again from an older place.
#[test]
fn a_segment_stored_but_not_noted_is_uploaded_again_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap();
    app.insert(5, 100);
    assert!(matches!(
        replica.poll().unwrap(),
        SyncOutcome::Shipped { .. }
    ));
    let at_orphan = app.dump();
    let stored = store_then_crash(replica, storage.as_ref());
    let stored_bytes = std::fs::read(dir.path().join("bucket").join(&stored)).unwrap();

    std::thread::sleep(Duration::from_millis(5));
    // Pages that only the next segment writes.
    app.exec("CREATE TABLE other(x); INSERT INTO other VALUES (1), (2);");
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    let next = match replica.sync().unwrap() {
        SyncOutcome::Shipped { key, .. } => key,
        other => panic!("expected a segment, got {other:?}"),
    };
    let index = |key: &str| ObjectName::parse_key(key).unwrap().1.index;
    assert_eq!(index(&next), index(&stored) + 1);
    assert_eq!(
        std::fs::read(dir.path().join("bucket").join(&stored)).unwrap(),
        stored_bytes,
        "the object uploaded again is the same"
    );
    app.insert(5, 100);
    replica.sync().unwrap();

    assert_eq!(
        restore_dump(storage.as_ref(), dir.path(), 0, None),
        app.dump()
    );
    assert_eq!(
        restore_dump(storage.as_ref(), dir.path(), 1, Some(&stored)),
        at_orphan,
        "a point in time between the two segments restores the first"
    );

    // The emergency restore script agrees.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/restore-by-hand.sh");
    let by_hand = dir.path().join("by-hand.db");
    let stored_time = ObjectName::parse_key(&stored).unwrap().1.time.to_compact();
    for (until, expected) in [(None, app.dump()), (Some(stored_time), at_orphan)] {
        let _ = std::fs::remove_file(&by_hand);
        let mut cmd = Command::new(&script);
        cmd.arg(dir.path().join("bucket")).arg("app").arg(&by_hand);
        cmd.args(until);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "restore-by-hand failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(dump(&by_hand), expected);
    }
}

#[test]
fn a_generation_stored_but_not_noted_still_belongs_to_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap();
    drop(replica);

    // While walsync is down the application checkpoints and restarts the WAL: the next
    // start needs a new generation, and is killed once its snapshot is stored.
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    assert!(matches!(
        replica.poll().unwrap(),
        SyncOutcome::NewGeneration { .. }
    ));
    store_then_crash(replica, storage.as_ref());

    // That newer generation is this database's own: starting again (which checks who owns
    // the name) must not refuse.
    app.insert(5, 100);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap();
    app.insert(5, 100);
    replica.sync().unwrap();
    assert_eq!(
        restore_dump(storage.as_ref(), dir.path(), 0, None),
        app.dump()
    );
}

/// After a storage outage long enough for the upload backoff to grow past the shutdown
/// timeout, a SIGTERM once storage is back must still ship everything and exit 0: the
/// workers retry at once when asked to stop instead of sleeping out their backoff.
#[test]
fn sigterm_after_an_outage_ships_at_once_and_exits_zero() {
    let mut server = crate::common::s3server::S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    let dest = format!("s3://{}/outage", server.bucket());
    let watch = WatchProcess::start(
        &[
            app.path.to_str().unwrap(),
            "-b",
            &dest,
            "--min-interval",
            "0.05",
            "--shutdown-timeout",
            "1",
        ],
        &server.env(),
        dir.path(),
    );
    app.insert(3, 100);
    server.stop();
    app.insert(3, 100);
    // The upload worker backs off 1 s, 2 s, then 4 s between attempts.
    wait_for(Duration::from_secs(60), "a 4 s upload backoff", || {
        watch.log().contains("retrying in 4s")
    });
    server.restart();
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let storage = server.storage("outage");
    let out = dir.path().join("restored.db");
    walsync::restore(&storage, "app", &out, &RestoreOptions::default()).unwrap();
    assert_eq!(dump(&out), app.dump());
}
