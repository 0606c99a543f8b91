//! A sidecar that cannot be written for a while (root only: `chattr +i`): a position that
//! falls behind while walsync is killed never mixes two histories (4), and the torture
//! harness's finds: a SIGTERM during the retry still ships the last commits, an uncounted
//! staged file that cannot be removed is never uploaded, and a new generation that could
//! not be staged is started again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{assert_restored, count_objects, generations, path_str, restore_dump, s3_url, summary};
use crate::common::fixtures::{replica_sidecar, wait_for, AppDb, Immutable, WatchProcess};
use crate::common::root::needs_root;
use walsync::format::ObjectKind;
use walsync::storage::file::FileStorage;
use walsync::storage::Storage;
use walsync::{Replica, SyncOutcome, UtcTime};
use walsync_testkit::faultproxy::FaultProxy;
use walsync_testkit::s3server::S3Server;

/// The binary's environment for `server`, but talking to it through `endpoint`.
fn env_via(server: &S3Server, endpoint: &str) -> Vec<(String, String)> {
    let mut env = server.env();
    for (key, value) in &mut env {
        if key == "AWS_ENDPOINT_URL_S3" {
            *value = endpoint.to_string();
        }
    }
    env
}

/// Commit through `app` and note the time and the content right after.
fn commit_and_record(app: &mut AppDb, states: &mut Vec<(UtcTime, String)>) {
    let id = app.next_id;
    app.next_id += 2;
    app.exec(&format!(
        "BEGIN;
         INSERT INTO items(id, label, body)
             VALUES ({id}, 'item {id}', randomblob(3000)), ({}, 'item', randomblob(3000));
         UPDATE items SET label = label || '+' WHERE id % 2 = 0;
         COMMIT;",
        id + 1
    ));
    states.push((UtcTime::now(), app.dump()));
}

/// 4. walsync cannot note its position (its sidecar directory is unwritable) while segments
///    it cut earlier are still being stored, and is then killed: the restarted walsync must
///    not produce a bucket where a restore, latest or at any point in time, mixes the
///    segments of the two runs.
#[test]
fn a_position_that_falls_behind_never_mixes_two_histories_in_a_restore() {
    needs_root!("chattr +i on the sidecar");
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr(), 1, Duration::from_secs(1));
    // Under the target directory: the same filesystem as the checkout, which supports chattr.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = base.path();
    let storage = server.storage("behind");
    let dest = s3_url(&server, "behind");
    let env = env_via(&server, &proxy.endpoint());
    let mut app = AppDb::create(dir, "app.db");
    let mut states = vec![(UtcTime::now(), app.dump())];
    commit_and_record(&mut app, &mut states);

    let db = app.path.clone();
    let args = [path_str(&db), "-b", &dest, "--min-interval", "0.05"];
    let watch = WatchProcess::start(&args, &env, dir);
    commit_and_record(&mut app, &mut states);
    wait_for(Duration::from_secs(20), "the first commits stored", || {
        restore_dump(&storage, "app", dir, None).as_ref() == Ok(&states.last().unwrap().1)
    });

    // Storage pauses; each commit becomes a segment queued behind it.
    let before = count_objects(&storage, "app", ObjectKind::Segment);
    proxy.set_delay(Duration::from_secs(3600));
    for _ in 0..5 {
        commit_and_record(&mut app, &mut states);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The sidecar becomes unwritable, then storage comes back: the queued segments are
    // stored, but walsync cannot note it.
    let sidecar = dir.join(".app.db-walsync");
    assert!(sidecar.is_dir(), "no sidecar at {}", sidecar.display());
    let guard = Immutable::new(&sidecar);
    proxy.set_delay(Duration::ZERO);
    // Whatever walsync had cut before the sidecar froze is stored within a moment; wait
    // until the count of segments has settled (unchanged for 2 s).
    let mut stored = (before, Instant::now());
    wait_for(
        Duration::from_secs(30),
        "the queued segments stored",
        || {
            let now = count_objects(&storage, "app", ObjectKind::Segment);
            if now != stored.0 {
                stored = (now, Instant::now());
            }
            now > before && stored.1.elapsed() > Duration::from_secs(2)
        },
    );
    eprintln!(
        "{} segments stored while the sidecar was unwritable",
        stored.0 - before
    );
    watch.kill();
    drop(guard);

    // walsync starts again on a writable sidecar; the application goes on.
    let watch = WatchProcess::start(&args, &env, dir);
    commit_and_record(&mut app, &mut states);
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "walsync exit status {status}");

    // For the failure message: the objects both runs stored.
    let keys: Vec<String> = storage
        .list("app/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    eprintln!("stored objects:\n{}", keys.join("\n"));
    let (_, last) = states.last().unwrap();
    let mut problems = Vec::new();
    match restore_dump(&storage, "app", dir, None) {
        Ok(text) if text == *last => {}
        Ok(text) => problems.push(format!(
            "the latest restore is {} but the application ended with {}",
            summary(&text),
            summary(last)
        )),
        Err(e) => problems.push(format!("the latest restore: {e}")),
    }
    for (i, (time, _)) in states.iter().enumerate() {
        match restore_dump(&storage, "app", dir, Some(*time)) {
            Ok(text) if states.iter().any(|(_, s)| *s == text) => {}
            Ok(text) => problems.push(format!(
                "the restore at commit {i} ({}) is a state the application never had: {}",
                time.to_rfc3339(),
                summary(&text)
            )),
            // Before the first snapshot there is nothing to restore.
            Err(e) if e.contains("no backup") => {}
            Err(e) => problems.push(format!("the restore at commit {i}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Found by the torture harness: a SIGTERM that arrives while walsync waits to retry a
/// local error (here: its sidecar was unwritable, and is writable again) must still read
/// the last commits before it stops. It used to skip them, report "everything committed is
/// stored" and exit 0 with the last commits missing from the replica.
#[test]
fn a_sigterm_during_a_local_error_still_ships_the_last_commits() {
    needs_root!("chattr +i on the sidecar");
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let dest = s3_url(&server, "retrying");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest, "--min-interval", "0.05"],
        &server.env(),
        dir.path(),
    );
    let storage = server.storage("retrying");
    wait_for(Duration::from_secs(20), "the first generation", || {
        count_objects(&storage, "app", ObjectKind::Snapshot) == 1
    });
    let frozen = Immutable::new(&replica_sidecar(&app.path));
    app.insert(3, 100);
    wait_for(Duration::from_secs(20), "walsync to hit the error", || {
        watch.log().contains("Operation not permitted")
    });
    drop(frozen);
    app.insert(3, 100);
    // Well inside the 5 s retry delay.
    let status = watch.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert_restored(
        restore_dump(&storage, "app", dir.path(), None),
        &app.dump(),
        "the restore after the stop",
    );
}

/// Found by the torture harness: an uncounted staged file (left by a run killed before it
/// saved its position) that cannot be removed at start, because the sidecar is read-only
/// for now, must neither stop walsync from starting nor ever be uploaded.
#[test]
fn an_uncounted_file_that_cannot_be_removed_is_never_uploaded() {
    needs_root!("chattr +i on the sidecar");
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(3, 100);
    let dest = s3_url(&server, "leftover");
    let storage = server.storage("leftover");
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    wait_for(Duration::from_secs(20), "the first generation", || {
        count_objects(&storage, "app", ObjectKind::Snapshot) == 1
    });
    assert!(watch.terminate(Duration::from_secs(30)).success());

    // As if a killed run had staged segment 1 of some generation with a number past the
    // saved position.
    let sidecar = replica_sidecar(&app.path);
    let stray = "999999999999-01a2000000000000-0000000001-20260101T000000.000Z.wal.gz";
    std::fs::write(sidecar.join(stray), b"not a segment").unwrap();
    let frozen = Immutable::new(&sidecar);
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    wait_for(
        Duration::from_secs(20),
        "the warning about the stray",
        || watch.log().contains("never uploaded"),
    );
    drop(frozen);
    for _ in 0..3 {
        app.insert(3, 100);
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert!(watch.terminate(Duration::from_secs(30)).success());
    let keys: Vec<String> = storage
        .list("app/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        !keys.iter().any(|k| k.contains("01a2000000000000")),
        "the stray was uploaded: {keys:?}"
    );
    // A later start removes it.
    let watch = WatchProcess::start(
        &[path_str(&app.path), "-b", &dest],
        &server.env(),
        dir.path(),
    );
    assert!(watch.terminate(Duration::from_secs(30)).success());
    assert!(!sidecar.join(stray).exists());
    assert_restored(
        restore_dump(&storage, "app", dir.path(), None),
        &app.dump(),
        "the restore after the stray",
    );
}

/// Found by the torture harness: when continuity is lost and the new generation's snapshot
/// cannot be staged (here: the sidecar is read-only for a moment), the next attempt must
/// start that new generation again. It used to append the WAL's new frames to the old
/// generation instead, as segments on top of a state they do not follow: the restore
/// failed `PRAGMA integrity_check`.
#[test]
fn a_new_generation_that_could_not_be_staged_is_started_again_not_skipped() {
    needs_root!("chattr +i on the sidecar");
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().join("bucket")));
    let mut app = AppDb::create(dir.path(), "app.db");
    app.insert(20, 500);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    replica.sync().unwrap();
    drop(replica);

    // While walsync is away the application writes, copies it all into the database file
    // and restarts the WAL: continuity is lost.
    app.exec("UPDATE items SET label = label || ' changed';");
    app.exec("PRAGMA wal_checkpoint(TRUNCATE);");
    app.insert(20, 500);
    let mut replica = Replica::open(&app.path, Arc::clone(&storage), "app").unwrap();
    {
        let _frozen = Immutable::new(&replica_sidecar(&app.path));
        assert!(replica.poll().is_err(), "the snapshot cannot be staged");
    }
    app.insert(20, 500);
    assert!(
        matches!(replica.poll().unwrap(), SyncOutcome::NewGeneration { .. }),
        "continuity was lost: the next poll must start the new generation"
    );
    app.insert(5, 500);
    replica.sync().unwrap();
    drop(replica);
    assert_eq!(generations(storage.as_ref(), "app"), 2);
    assert_restored(
        restore_dump(storage.as_ref(), "app", dir.path(), None),
        &app.dump(),
        "the restore after the retried generation",
    );
}
