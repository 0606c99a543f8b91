//! [`FileStorage`]: a replica kept in a local directory tree (`file:///dir`).
//!
//! Each key is a file under the root, `/` in keys becoming directory separators. Objects are
//! written to a temporary sibling (`.<name>.tmp-<pid>-<counter>`), synced, then renamed into
//! place, so a reader sees an object whole or not at all, even after a crash. Listings skip
//! those temporary files.
//!
//! A replica holds the database's data, so only its owner may read it: objects (and their
//! temporary files) are created with mode 0600 (as `files::write_atomically` writes), the
//! directories created for them 0700 (both less the umask). Directories that already exist
//! are left as they are.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use super::{check_key, FileRange, ObjectInfo, Storage};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::files;

/// Size of the buffer used to copy files in and out.
const COPY_BUFFER: usize = 64 * 1024;

/// Mode of objects (less the umask): the replica is as private as the database.
const OBJECT_MODE: u32 = 0o600;

/// Mode of the directories created for objects (less the umask).
const DIR_MODE: u32 = 0o700;

/// Storage in a directory: `file:///root`.
#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    /// Storage rooted at `root`, which is created on the first put if it does not exist.
    pub fn new(root: PathBuf) -> FileStorage {
        FileStorage { root }
    }

    /// The path of `key`, after checking that it stays under the root.
    fn path(&self, key: &str) -> Result<PathBuf> {
        let bad =
            |why: &str| Error::invalid(format!("{}: invalid key {key:?}: {why}", self.describe()));
        check_key(key).map_err(bad)?;
        let path = self.root.join(key);
        // Belt and braces: whatever the platform makes of the key, stay under the root.
        let below = path
            .strip_prefix(&self.root)
            .map_err(|_| bad("escapes the root"))?;
        if below
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(bad("escapes the root"));
        }
        Ok(path)
    }

    /// Write an object atomically and durably (see [`files::write_atomically`]), owner-only.
    fn put_with(&self, key: &str, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
        let path = self.path(key)?;
        let what = || format!("{}: put {key}", self.describe());
        let Some(dir) = path.parent() else {
            return Err(Error::invalid(format!(
                "{}: bad key {key:?}",
                self.describe()
            )));
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .context(what)?;
        files::write_atomically(&path, OBJECT_MODE, fill).context(what)
    }

    fn walk(&self, dir: &Path, rel: &str, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // No such directory, or an object where `list` expected one ("b/" when "b"
            // is an object): no key there.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(())
            }
            Err(e) => {
                return Err(Error::from(e).with_context(format!(
                    "{}: list {}",
                    self.describe(),
                    dir.display()
                )))
            }
        };
        for entry in entries {
            let entry = entry.context(|| format!("{}: list {}", self.describe(), dir.display()))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                log::warn!(
                    "{}: skipping {}: name is not UTF-8",
                    self.describe(),
                    entry.path().display()
                );
                continue;
            };
            if files::is_temporary(name) {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            // Below the directory `list` starts in, the rest of the prefix has no `/`: an
            // entry whose key does not begin with the prefix has nothing under it that does.
            if !key.starts_with(prefix) {
                continue;
            }
            let meta = entry
                .metadata()
                .context(|| format!("{}: list {key}", self.describe()))?;
            if meta.is_dir() {
                self.walk(&entry.path(), &key, prefix, out)?;
            } else if meta.is_file() && key.starts_with(prefix) {
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn put_bytes(&self, key: &str, data: &[u8]) -> Result<()> {
        self.put_with(key, |f| f.write_all(data))
    }

    fn put_file(&self, key: &str, file: &File) -> Result<()> {
        let len = file
            .metadata()
            .context(|| format!("{}: put {key}: reading source size", self.describe()))?
            .len();
        self.put_with(key, |out| {
            let mut src = FileRange::new(file, 0, len);
            let mut buf = vec![0u8; COPY_BUFFER];
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
            }
        })
    }

    fn get(&self, key: &str, out: &mut dyn Write) -> Result<u64> {
        let path = self.path(key)?;
        let what = || format!("{}: get {key}", self.describe());
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!("{}: not found", what())));
            }
            Err(e) => return Err(Error::from(e).with_context(what())),
        };
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::from(e).with_context(what())),
            };
            out.write_all(&buf[..n]).map_err(|e| {
                Error::new(ErrorKind::Io, format!("{}: writing output: {e}", what()))
            })?;
            total += n as u64;
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Start in the deepest directory the prefix names whole ("t1/app" for "t1/app/"):
        // no key outside it can match. Walking from the root read every entry of the root
        // for each listing, and a replica lists its own name at each start: a restart of
        // 2,000 databases kept in one directory read it 2,000 times (4 million entries).
        let (rel, start) = match prefix.rfind('/') {
            None => ("", self.root.clone()),
            Some(end) => match self.path(&prefix[..end]) {
                Ok(dir) => (&prefix[..end], dir),
                // A prefix whose directories no key can have ("a//", "../"): nothing matches.
                Err(_) => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        self.walk(&start, rel, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(Error::from(e).with_context(format!("{}: delete {key}", self.describe())))
            }
        }
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::new(dir.path().join("replica"));
        (dir, storage)
    }

    fn get(storage: &FileStorage, key: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = storage.get(key, &mut out)?;
        assert_eq!(n, out.len() as u64);
        Ok(out)
    }

    fn keys(storage: &FileStorage, prefix: &str) -> Vec<String> {
        storage
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    #[test]
    fn put_get_round_trip_and_overwrite() {
        let (_dir, s) = storage();
        s.put_bytes("app/state.json", b"first").unwrap();
        assert_eq!(get(&s, "app/state.json").unwrap(), b"first");
        s.put_bytes("app/state.json", b"second, longer").unwrap();
        assert_eq!(get(&s, "app/state.json").unwrap(), b"second, longer");
        s.put_bytes("empty", b"").unwrap();
        assert_eq!(get(&s, "empty").unwrap(), b"");
    }

    #[test]
    fn put_file_copies_whole_file_regardless_of_cursor() {
        use std::io::{Seek, SeekFrom};
        let (dir, s) = storage();
        // Bigger than the copy buffer, and not a multiple of it.
        let data: Vec<u8> = (0..200_001u32).map(|i| (i * 7 % 251) as u8).collect();
        let src_path = dir.path().join("src.bin");
        fs::write(&src_path, &data).unwrap();
        let mut src = File::open(&src_path).unwrap();
        src.seek(SeekFrom::Start(1234)).unwrap();
        s.put_file("a/b/c.bin", &src).unwrap();
        assert_eq!(get(&s, "a/b/c.bin").unwrap(), data);
        assert_eq!(src.stream_position().unwrap(), 1234, "cursor must not move");
        assert_eq!(
            s.list("a/").unwrap(),
            vec![ObjectInfo {
                key: "a/b/c.bin".into(),
                size: data.len() as u64
            }]
        );
    }

    #[test]
    fn missing_key_is_not_found_and_delete_is_idempotent() {
        let (_dir, s) = storage();
        let err = get(&s, "nope/x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("nope/x"), "{err}");
        s.put_bytes("nope/x", b"1").unwrap();
        s.delete("nope/x").unwrap();
        assert_eq!(get(&s, "nope/x").unwrap_err().kind(), ErrorKind::NotFound);
        s.delete("nope/x").unwrap();
        s.delete("never/existed").unwrap();
    }

    #[test]
    fn list_is_recursive_sorted_and_filtered_by_prefix() {
        let (_dir, s) = storage();
        // Written out of order; "a-" sorts before "a/" in byte order, which a per-directory
        // walk would get wrong without the final sort.
        for key in ["b", "a/z", "a/b/c", "a-1", "a/a", "ab", "a/b/a"] {
            s.put_bytes(key, key.as_bytes()).unwrap();
        }
        assert_eq!(
            keys(&s, ""),
            vec!["a-1", "a/a", "a/b/a", "a/b/c", "a/z", "ab", "b"]
        );
        assert_eq!(keys(&s, "a/"), vec!["a/a", "a/b/a", "a/b/c", "a/z"]);
        assert_eq!(keys(&s, "a/b"), vec!["a/b/a", "a/b/c"]);
        assert_eq!(
            keys(&s, "a"),
            vec!["a-1", "a/a", "a/b/a", "a/b/c", "a/z", "ab"]
        );
        assert!(keys(&s, "zzz").is_empty());
        // Prefixes that name directories: `list` starts in the deepest one.
        assert_eq!(keys(&s, "a/b/c"), vec!["a/b/c"]);
        assert_eq!(keys(&s, "a/b/"), vec!["a/b/a", "a/b/c"]);
        assert!(keys(&s, "a/bb").is_empty());
        assert!(keys(&s, "q/r/").is_empty());
        assert!(keys(&s, "b/").is_empty(), "b is an object, not a directory");
        assert!(keys(&s, "a//").is_empty());
        assert!(keys(&s, "../a/").is_empty());
        let sizes: Vec<u64> = s.list("a/b/").unwrap().iter().map(|o| o.size).collect();
        assert_eq!(sizes, vec![5, 5]);
    }

    #[test]
    fn list_of_missing_root_is_empty() {
        let (_dir, s) = storage();
        assert!(s.list("").unwrap().is_empty());
    }

    #[test]
    fn bad_keys_are_rejected() {
        let (dir, s) = storage();
        for key in [
            "../escape",
            "a/../../escape",
            "/etc/passwd",
            "a//b",
            "./a",
            "",
            "a/..",
        ] {
            let err = s.put_bytes(key, b"x").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{key:?}: {err}");
            assert_eq!(
                get(&s, key).unwrap_err().kind(),
                ErrorKind::Invalid,
                "{key:?}"
            );
            assert_eq!(
                s.delete(key).unwrap_err().kind(),
                ErrorKind::Invalid,
                "{key:?}"
            );
        }
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn temporary_files_are_not_listed_and_not_left_behind() {
        let (_dir, s) = storage();
        s.put_bytes("db/generation/snapshot.gz", b"snap").unwrap();
        // A put interrupted by a crash leaves its temporary file behind.
        let leftover = s.root.join("db/generation/.wal.gz.tmp-999-7");
        fs::write(&leftover, b"partial").unwrap();
        assert_eq!(keys(&s, ""), vec!["db/generation/snapshot.gz"]);
        // A completed put leaves only the object (and the stale leftover) in the directory.
        let names: Vec<String> = fs::read_dir(s.root.join("db/generation"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, vec![".wal.gz.tmp-999-7", "snapshot.gz"]);
    }

    #[test]
    fn readers_see_whole_objects_while_a_writer_replaces_them() {
        let (_dir, s) = storage();
        let a = vec![b'a'; 256 * 1024];
        let b = vec![b'b'; 300 * 1024];
        s.put_bytes("obj", &a).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..30 {
                    s.put_bytes("obj", if i % 2 == 0 { &b } else { &a })
                        .unwrap();
                }
            });
            for _ in 0..100 {
                let got = get(&s, "obj").unwrap();
                assert!(got == a || got == b, "torn read of {} bytes", got.len());
                assert_eq!(
                    keys(&s, ""),
                    vec!["obj"],
                    "temporary files must not be listed"
                );
            }
        });
    }

    #[test]
    fn objects_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, s) = storage();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        s.put_bytes("db/state.json", b"{}").unwrap();
        s.put_bytes("db/wal/x.wal.gz", b"data").unwrap();
        // Whatever the umask, nothing is wider than owner-only, and the owner can use it.
        for file in [s.root.join("db/state.json"), s.root.join("db/wal/x.wal.gz")] {
            assert_eq!(mode(&file) | 0o600, 0o600, "{}", file.display());
            assert_eq!(mode(&file) & 0o600, 0o600, "{}", file.display());
        }
        for created in [s.root.clone(), s.root.join("db"), s.root.join("db/wal")] {
            assert_eq!(mode(&created) | 0o700, 0o700, "{}", created.display());
        }
        // A leftover temporary file with a wide mode is replaced, not reused as it is.
        let leftover = s.root.join("db/wal/.y.wal.gz.tmp-1-1");
        fs::write(&leftover, b"old").unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o644)).unwrap();
        let mut file = crate::spool::create_private(&leftover).unwrap();
        file.write_all(b"new").unwrap();
        assert_eq!(mode(&leftover) | 0o600, 0o600);
        assert_eq!(fs::read(&leftover).unwrap(), b"new");
    }

    #[test]
    fn describe_is_a_file_url() {
        let s = FileStorage::new(PathBuf::from("/var/backups/app"));
        assert_eq!(s.describe(), "file:///var/backups/app");
    }
}
