//! Objects and keys: what is put under a prefix is got back (and is where the server keeps
//! it), deleted, listed past a page of 1000 keys, found under prefixes that need encoding;
//! what is missing is not found, and keys or prefixes that cannot be right are refused
//! before any request.

use super::{get, pseudo_random, temp_file};
use crate::common::fixtures::walsync;
use walsync::storage::s3::S3Storage;
use walsync::storage::{Destination, ObjectInfo, Storage};
use walsync::ErrorKind;
use walsync_testkit::s3server::S3Server;

#[test]
fn put_get_bytes_round_trip_under_the_prefix() {
    let server = S3Server::start();
    let s3 = server.storage("db/prefix");
    assert_eq!(s3.describe(), format!("s3://{}/db/prefix", server.bucket()));

    s3.put_bytes("app/state.json", b"{\"generation\":1}")
        .unwrap();
    assert_eq!(get(&s3, "app/state.json").unwrap(), b"{\"generation\":1}");
    // The object key is prefix + "/" + key: that is where s3s-fs stored it.
    let on_disk = server
        .root()
        .join(server.bucket())
        .join("db/prefix/app/state.json");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"{\"generation\":1}");

    s3.put_bytes("app/state.json", b"replaced").unwrap();
    assert_eq!(get(&s3, "app/state.json").unwrap(), b"replaced");
    s3.put_bytes("empty", b"").unwrap();
    assert_eq!(get(&s3, "empty").unwrap(), b"");

    // Without a prefix, keys are object keys.
    let root = server.storage("");
    assert_eq!(root.describe(), format!("s3://{}", server.bucket()));
    assert_eq!(get(&root, "db/prefix/app/state.json").unwrap(), b"replaced");
}

#[test]
fn put_file_small_is_one_put_with_content_length() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(300 * 1024 + 7, 1);
    let file = temp_file(&dir, &data);
    server.clear_requests();

    s3.put_file("snap/0001.db.gz", &file).unwrap();

    let puts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert_eq!(
        puts[0].path,
        format!("/{}/p/snap/0001.db.gz", server.bucket())
    );
    assert_eq!(puts[0].content_length, Some(data.len() as u64));
    assert!(!puts[0].chunked, "S3 refuses chunked uploads");
    assert!(!puts[0].has_param("uploadId"));
    assert_eq!(s3.stats().multipart_uploads, 0);
    assert_eq!(get(&s3, "snap/0001.db.gz").unwrap(), data);
}

#[test]
fn list_follows_continuation_tokens_past_1000_objects() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let count = 1003;
    let mut expected: Vec<String> = (0..count)
        .map(|i| format!("gen/wal/{i:08x}.wal.gz"))
        .collect();
    // Neighbours that must not show up in a listing of "gen/wal/".
    s3.put_bytes("gen/wal-old", b"x").unwrap(); // (a file "gen/wal" could not coexist in s3s-fs)
    s3.put_bytes("gen/snapshot.gz", b"x").unwrap();
    server
        .storage("")
        .put_bytes("outside-the-prefix", b"x")
        .unwrap();
    std::thread::scope(|scope| {
        for chunk in expected.chunks(count / 4 + 1) {
            let s3 = &s3;
            scope.spawn(move || {
                for key in chunk.iter().rev() {
                    s3.put_bytes(key, key.as_bytes()).unwrap();
                }
            });
        }
    });
    expected.sort();

    // Default page size: S3 (and s3s-fs) return at most 1000 keys per page.
    server.clear_requests();
    let listed = s3.list("gen/wal/").unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys.len(), expected.len(), "first keys: {:?}", &keys[..3]);
    if let Some(i) = (0..keys.len()).find(|&i| keys[i] != expected[i]) {
        panic!("listing differs at {i}: {:?} != {:?}", keys[i], expected[i]);
    }
    assert!(listed.iter().all(|o| o.size == o.key.len() as u64));
    let pages: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.has_param("list-type"))
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(!pages[0].has_param("continuation-token"));
    assert!(pages[1].has_param("continuation-token"));

    // Smaller pages, counted by the client.
    let small = server.storage("p").with_list_page_size(100);
    let all = small.list("").unwrap();
    assert_eq!(all.len(), count + 2);
    assert_eq!(small.stats().list_pages, 11);
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(all, sorted);
    assert!(all.iter().all(|o| o.key != "outside-the-prefix"));
    assert!(s3.list("nothing/here/").unwrap().is_empty());
}

#[test]
fn missing_key_and_missing_bucket_are_not_found() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    let err = get(&s3, "app/missing.json").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "s3://{}/p: GET app/missing.json: ",
            server.bucket()
        )),
        "{message}"
    );
    assert!(message.contains("404"), "{message}");
    assert!(!message.contains("X-Amz-"), "{message}");
    // The server's answer is data, not only text.
    assert_eq!(err.http_status(), Some(404), "{err}");
    assert_eq!(err.s3_code(), Some("NoSuchKey"), "{err}");

    let mut config = server.config("p");
    config.bucket = "no-such-bucket".into();
    let missing = S3Storage::new(config).unwrap();
    let errors = [
        missing.list("").unwrap_err(),
        missing.put_bytes("k", b"x").unwrap_err(),
        get(&missing, "k").unwrap_err(),
        missing.delete("k").unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let message = err.to_string();
        assert!(
            message.contains("bucket \"no-such-bucket\" does not exist"),
            "{message}"
        );
        assert_eq!(err.s3_code(), Some("NoSuchBucket"), "{message}");
    }
}

#[test]
fn delete_removes_and_ignores_missing_keys() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    s3.put_bytes("a/1", b"1").unwrap();
    s3.put_bytes("a/2", b"2").unwrap();
    s3.delete("a/1").unwrap();
    assert_eq!(get(&s3, "a/1").unwrap_err().kind(), ErrorKind::NotFound);
    let keys: Vec<String> = s3.list("a/").unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(keys, vec!["a/2"]);
    s3.delete("a/1").unwrap();
    s3.delete("never/existed").unwrap();
}

#[test]
fn invalid_keys_are_refused_before_any_request() {
    let server = S3Server::start();
    let s3 = server.storage("p");
    server.clear_requests();
    for key in ["/abs", "a/../b", "", "a//b"] {
        assert_eq!(
            s3.put_bytes(key, b"x").unwrap_err().kind(),
            ErrorKind::Invalid,
            "{key:?}"
        );
    }
    assert!(server.requests().is_empty());
}

#[test]
fn open_builds_file_storage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let storage = walsync::storage::open(&Destination::parse(&url).unwrap(), None).unwrap();
    assert_eq!(storage.describe(), url);
    storage.put_bytes("x/y", b"z").unwrap();
    assert_eq!(std::fs::read(dir.path().join("x/y")).unwrap(), b"z");
}

#[test]
fn keys_under_a_prefix_with_plus_or_percent_are_listed_and_found() {
    let server = S3Server::start();
    // s3s-fs lists keys unencoded while saying `encoding-type=url`: decoded, these prefixes
    // would not match and every backup under them would be invisible.
    for prefix in ["a+b", "c%41d/e+f", "sp ace+/%2F"] {
        let s3 = server.storage(prefix);
        s3.put_bytes("app/state.json", b"1").unwrap();
        s3.put_bytes("app/wal/0001.wal.gz", b"22").unwrap();
        let on_disk = server.root().join(server.bucket()).join(prefix);
        assert!(on_disk.join("app/state.json").is_file(), "{prefix}");
        let listed = s3.list("app/").unwrap();
        assert_eq!(
            listed,
            [
                ObjectInfo {
                    key: "app/state.json".into(),
                    size: 1
                },
                ObjectInfo {
                    key: "app/wal/0001.wal.gz".into(),
                    size: 2
                }
            ],
            "{prefix}"
        );
        assert_eq!(get(&s3, "app/wal/0001.wal.gz").unwrap(), b"22");
        s3.delete_many(&listed.into_iter().map(|o| o.key).collect::<Vec<_>>())
            .unwrap();
        assert!(s3.list("").unwrap().is_empty(), "{prefix}");
    }
}

#[test]
fn prefixes_with_dot_or_empty_segments_are_refused_in_one_line() {
    let server = S3Server::start();
    for prefix in ["a/../b", "./a", "a/.", "a//b"] {
        let dest = format!("s3://{}/{prefix}", server.bucket());
        let out = walsync(&["list", "-b", &dest], &server.env());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{prefix}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("the prefix must not contain empty, '.' or '..' segments"),
            "{stderr}"
        );
    }
    assert!(server.requests().is_empty());
}
