//! Names in a replica: replica names (and how a database gets one), object keys, generation
//! ids, chain values and `state.json`, and grouping a listing into a [`Catalog`].
//!
//! The format itself (what the names mean, their order, the bytes of each object, the chain)
//! is a public contract, described once in `docs/FORMAT.md`; people restore from it with
//! shell scripts (`scripts/restore-by-hand.sh`), so it changes only as that document's
//! versioning policy says. This module is its one spelling in code: every key walsync writes
//! comes from [`ObjectName::key`] or [`state_key`], and every object key it lists goes
//! through [`ObjectName::parse_key`], which refuses anything else (foreign keys are never
//! listed, restored or pruned).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::utc::UtcTime;

/// The name of one replicated database inside a destination: one path segment.
///
/// Letters, digits, `.`, `_` and `-` only, not starting with `.`, at most 128 bytes. This keeps
/// names safe as S3 keys and as directory names, and rules out `..` and `/`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 128 || name.starts_with('.') || !ok_chars {
        return Err(Error::invalid(format!(
            "invalid replica name {name:?}: use letters, digits, '.', '_' and '-' only, \
             not starting with '.' (no '/' or '..')"
        )));
    }
    Ok(())
}

/// The default replica name of a database: its file name without the extension
/// (`/var/lib/app/app.db` → `app`), with characters a name may not hold replaced by `_`
/// (`my app.db` → `my_app`). Every command (`watch`, `snapshot`) names by this one rule.
pub fn default_name(db_path: &Path) -> Result<String> {
    let stem = db_path.file_stem().ok_or_else(|| {
        Error::invalid(format!(
            "cannot derive a replica name from {}",
            db_path.display()
        ))
    })?;
    let name = sanitize(&stem.to_string_lossy());
    validate_name(&name)?;
    Ok(name)
}

/// Give each database a distinct, deterministic replica name.
///
/// `specs` are `PATH` or `PATH:NAME`. An explicit name is used as given. Otherwise the name is
/// the file stem (`/srv/app.db` → `app`); when several databases share a stem, each of them
/// is prefixed with as many of its parent directories as it takes to tell them apart
/// (`/var/lib/x/romneys/app.db` → `romneys-app`, `/var/lib/x/smiths/app.db` → `smiths-app`),
/// with characters not allowed in names replaced by `_`. The same database listed twice, or
/// two databases ending up with one name, is an error: one replica must never mix two
/// databases. A spec that names an existing file is a path even if it contains `:`.
pub fn assign_names(specs: &[String]) -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut parsed = Vec::new();
    for spec in specs {
        let (path, explicit) = match spec.rsplit_once(':') {
            // A file whose own name holds ':' is taken as a path.
            _ if Path::new(spec).exists() => (spec.as_str(), None),
            Some((path, name)) if !path.is_empty() => {
                validate_name(name)?;
                (path, Some(name.to_string()))
            }
            _ => (spec.as_str(), None),
        };
        let absolute =
            std::path::absolute(path).map_err(|e| Error::invalid(format!("{path}: {e}")))?;
        parsed.push((absolute, explicit));
    }
    for (i, (a, _)) in parsed.iter().enumerate() {
        if parsed[..i].iter().any(|(b, _)| a == b) {
            return Err(Error::invalid(format!("{} is listed twice", a.display())));
        }
    }
    // How many parent directories each unnamed database needs in its name.
    let mut depth = vec![0usize; parsed.len()];
    let name_at = |path: &Path, depth: usize| -> Result<String> {
        let stem = default_name(path)?;
        let parents: Vec<String> = path
            .parent()
            .into_iter()
            .flat_map(|p| p.iter().rev())
            .take(depth)
            .map(|c| sanitize(&c.to_string_lossy()))
            .collect();
        let mut parts: Vec<String> = parents.into_iter().rev().collect();
        parts.push(stem);
        let name = parts.join("-");
        validate_name(&name)?;
        Ok(name)
    };
    loop {
        let names: Vec<String> = parsed
            .iter()
            .zip(&depth)
            .map(|((path, explicit), d)| match explicit {
                Some(name) => Ok(name.clone()),
                None => name_at(path, *d),
            })
            .collect::<Result<_>>()?;
        let mut grew = false;
        for i in 0..names.len() {
            let clash = (0..names.len()).any(|j| j != i && names[j] == names[i]);
            if !clash {
                continue;
            }
            let (path, explicit) = &parsed[i];
            let parents = path.parent().map_or(0, |p| p.iter().count());
            if explicit.is_none() && depth[i] < parents {
                depth[i] += 1;
                grew = true;
            }
        }
        if !grew {
            for i in 0..names.len() {
                if let Some(j) = (0..i).find(|&j| names[j] == names[i]) {
                    return Err(Error::invalid(format!(
                        "{} and {} would both be replicated as {:?}; give one another name \
                         with PATH:NAME",
                        parsed[j].0.display(),
                        parsed[i].0.display(),
                        names[i]
                    )));
                }
            }
            return Ok(parsed.into_iter().map(|(p, _)| p).zip(names).collect());
        }
    }
}

/// Replace characters a replica name may not hold with `_`.
fn sanitize(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => s,
    }
}

/// The key of a database's `state.json`.
pub fn state_key(name: &str) -> String {
    format!("{name}/state.json")
}

/// A generation id: 12 hex digits of start time in milliseconds, then 4 random hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(String);

impl Generation {
    /// A new generation starting now.
    pub fn new() -> Generation {
        Generation::starting_at(UtcTime::now(), random_u16())
    }

    /// A new generation that sorts after `previous` even if the clock went back since it
    /// was started: restore takes the newest generation by name, so a generation started
    /// after a clock step must not hide behind an older one.
    pub fn after(previous: Option<&Generation>) -> Generation {
        let now = UtcTime::now();
        let time = match previous {
            Some(p) if p.start_time() >= now => UtcTime::from_millis(p.start_time().millis() + 1),
            _ => now,
        };
        Generation::starting_at(time, random_u16())
    }

    fn starting_at(time: UtcTime, random: u16) -> Generation {
        let millis = time.millis().clamp(0, 0xffff_ffff_ffff) as u64;
        Generation(format!("{millis:012x}{random:04x}"))
    }

    pub fn parse(text: &str) -> Option<Generation> {
        let ok = text.len() == 16 && text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| Generation(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When this generation started.
    pub fn start_time(&self) -> UtcTime {
        UtcTime::from_millis(i64::from_str_radix(&self.0[..12], 16).unwrap_or(0))
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation::new()
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Saved as its id, a string (the sidecar's `position.json`).
impl serde::Serialize for Generation {
    fn serialize<S: serde::Serializer>(&self, out: S) -> std::result::Result<S::Ok, S::Error> {
        out.serialize_str(&self.0)
    }
}

/// Read back only if well formed ([`Generation::parse`]): a malformed id makes the document
/// holding it unreadable, rather than a value every later step would have to refuse.
impl<'de> serde::Deserialize<'de> for Generation {
    fn deserialize<D: serde::Deserializer<'de>>(input: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(input)?;
        Generation::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("malformed generation id {text:?}")))
    }
}

/// 16 random bits from the standard library's randomly seeded hasher; enough to keep two
/// generations started in the same millisecond apart, without a dependency.
fn random_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::Instant::now().elapsed().as_nanos());
    hasher.finish() as u16
}

/// The two kinds of data object in a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Snapshot,
    Segment,
}

impl ObjectKind {
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Segment => "wal",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ObjectKind::Snapshot => ".db.gz",
            ObjectKind::Segment => ".wal.gz",
        }
    }
}

/// Everything a data object's name says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: ObjectKind,
    pub generation: Generation,
    pub index: u64,
    pub time: UtcTime,
}

impl ObjectName {
    /// The object's key under the destination, e.g.
    /// `app/wal/019a8b2c3d4e5f60-0000000003-20261121T094423.123Z.wal.gz`.
    pub fn key(&self, name: &str) -> String {
        format!("{name}/{}/{}", self.kind.dir(), self.file_name())
    }

    /// The last part of the key: `<generation>-<index>-<time>.wal.gz` (or `.db.gz`).
    pub fn file_name(&self) -> String {
        format!(
            "{}-{:010}-{}{}",
            self.generation,
            self.index,
            self.time.to_compact(),
            self.kind.extension()
        )
    }

    /// Parse the last part of a key (see [`ObjectName::file_name`]).
    pub fn parse_file_name(file: &str) -> Option<ObjectName> {
        let kind = [ObjectKind::Snapshot, ObjectKind::Segment]
            .into_iter()
            .find(|k| file.ends_with(k.extension()))?;
        let stem = file.strip_suffix(kind.extension())?;
        let mut fields = stem.split('-');
        let generation = Generation::parse(fields.next()?)?;
        let index_text = fields.next()?;
        if index_text.len() != 10 || !index_text.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let index = index_text.parse().ok()?;
        let time = UtcTime::parse_compact(fields.next()?)?;
        if fields.next().is_some() {
            return None;
        }
        Some(ObjectName {
            kind,
            generation,
            index,
            time,
        })
    }

    /// Parse a key relative to the destination into the replica name and object name.
    /// Keys that are not data objects (`state.json`, foreign files) give `None`.
    pub fn parse_key(key: &str) -> Option<(String, ObjectName)> {
        let mut parts = key.split('/');
        let (name, dir, file) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || validate_name(name).is_err() {
            return None;
        }
        let object = ObjectName::parse_file_name(file)?;
        if object.kind.dir() != dir {
            return None;
        }
        Some((name.to_string(), object))
    }
}

/// The value that links a generation's objects into one chain: two 32-bit words, spelled
/// `xxxxxxxx-xxxxxxxx` (lowercase hex). What it is for each object is in `docs/FORMAT.md`
/// ("The chain"); here it is made from a generation id ([`ChainValue::of_generation`]) and
/// written into and read from a snapshot's gzip comment ([`ChainValue::comment`]).
///
/// Saved as its two words (`[a, b]`, the sidecar's `position.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ChainValue(pub [u32; 2]);

impl ChainValue {
    const COMMENT_PREFIX: &'static str = "walsync-chain=";

    /// The chain value of a generation's base snapshot: its id read as two hex words.
    pub fn of_generation(generation: &Generation) -> ChainValue {
        let word = |hex: &str| u32::from_str_radix(hex, 16).unwrap_or(0);
        let id = generation.as_str();
        ChainValue([word(&id[..8]), word(&id[8..])])
    }

    /// The gzip header comment of a snapshot with this chain value.
    pub fn comment(&self) -> String {
        format!("{}{self}", Self::COMMENT_PREFIX)
    }

    /// Parse a snapshot's gzip header comment; None unless it is exactly what
    /// [`comment`](Self::comment) writes.
    pub fn parse_comment(comment: &[u8]) -> Option<ChainValue> {
        let text = std::str::from_utf8(comment).ok()?;
        let value = text.strip_prefix(Self::COMMENT_PREFIX)?;
        let (a, b) = value.split_once('-')?;
        let word = |hex: &str| {
            let ok = hex.len() == 8 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            ok.then(|| u32::from_str_radix(hex, 16).ok()).flatten()
        };
        Some(ChainValue([word(a)?, word(b)?]))
    }
}

impl fmt::Display for ChainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}-{:08x}", self.0[0], self.0[1])
    }
}

/// `state.json` (`docs/FORMAT.md`): which database writes a name (`source`, checked before
/// a database writes under a name it did not start) and the newest object stored, for
/// people. A restore never reads it; the object names alone are the truth.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaState {
    pub name: String,
    pub generation: String,
    /// Last segment index shipped in this generation (0 if only the base snapshot exists).
    pub index: u64,
    /// RFC 3339 time this state was written.
    pub updated: String,
    pub page_size: u32,
    /// `host:/path` of the database, for people reading the bucket and to notice two
    /// databases written under one name.
    pub source: String,
    pub walsync_version: String,
}

/// One stored object: its parsed name and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    pub name: ObjectName,
    pub key: String,
    pub size: u64,
}

/// The objects of one generation, each list in ascending index order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationObjects {
    pub snapshots: Vec<StoredObject>,
    pub segments: Vec<StoredObject>,
}

impl GenerationObjects {
    pub fn bytes(&self) -> u64 {
        self.snapshots
            .iter()
            .chain(&self.segments)
            .map(|o| o.size)
            .sum()
    }
}

/// Everything a listing says about the replicas under a destination, grouped by database
/// name and generation (both in ascending order). Built from LIST results alone.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub databases: BTreeMap<String, BTreeMap<Generation, GenerationObjects>>,
}

impl Catalog {
    /// Group listed objects; keys that are not data objects are ignored.
    pub fn from_listing(objects: impl IntoIterator<Item = crate::storage::ObjectInfo>) -> Catalog {
        let mut catalog = Catalog::default();
        for info in objects {
            let Some((db, name)) = ObjectName::parse_key(&info.key) else {
                continue;
            };
            let generation = catalog
                .databases
                .entry(db)
                .or_default()
                .entry(name.generation.clone())
                .or_default();
            let list = match name.kind {
                ObjectKind::Snapshot => &mut generation.snapshots,
                ObjectKind::Segment => &mut generation.segments,
            };
            list.push(StoredObject {
                name,
                key: info.key,
                size: info.size,
            });
        }
        for generations in catalog.databases.values_mut() {
            for objects in generations.values_mut() {
                objects.snapshots.sort_by(|a, b| a.key.cmp(&b.key));
                objects.segments.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_round_trip_and_sort_in_replay_order() {
        let generation = Generation::starting_at(UtcTime::from_millis(1_768_046_400_000), 0xbeef);
        assert_eq!(generation.as_str(), "019ba7c71200beef");
        assert_eq!(generation.start_time().millis(), 1_768_046_400_000);
        let keys: Vec<String> = (0..12)
            .map(|index| {
                ObjectName {
                    kind: ObjectKind::Segment,
                    generation: generation.clone(),
                    index,
                    time: UtcTime::from_millis(1_768_046_400_000 + index as i64 * 10),
                }
                .key("app")
            })
            .collect();
        assert_eq!(
            keys[3],
            "app/wal/019ba7c71200beef-0000000003-20260110T120000.030Z.wal.gz"
        );
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys);
        let (name, parsed) = ObjectName::parse_key(&keys[3]).unwrap();
        assert_eq!(name, "app");
        assert_eq!(parsed.index, 3);
        assert_eq!(parsed.kind, ObjectKind::Segment);
        assert_eq!(parsed.generation, generation);
        assert_eq!(parsed.key("app"), keys[3]);
    }

    #[test]
    fn later_generations_sort_after_earlier_ones() {
        let a = Generation::starting_at(UtcTime::from_millis(1_000), 0xffff);
        let b = Generation::starting_at(UtcTime::from_millis(1_001), 0x0000);
        assert!(a.as_str() < b.as_str());
    }

    #[test]
    fn foreign_keys_are_not_objects() {
        for key in [
            "app/state.json",
            "app/wal/junk.wal.gz",
            "app/wal/019ba7c71200beef-3-20260110T120000.030Z.wal.gz",
            "app/snapshots/019ba7c71200beef-0000000003-20260110T120000.030Z.wal.gz",
            "../wal/019ba7c71200beef-0000000003-20260110T120000.030Z.wal.gz",
            "a/b/wal/019ba7c71200beef-0000000003-20260110T120000.030Z.wal.gz",
        ] {
            assert!(ObjectName::parse_key(key).is_none(), "{key} parsed");
        }
    }

    #[test]
    fn a_new_generation_sorts_after_the_previous_one_even_when_the_clock_went_back() {
        let day = 86_400_000;
        let from_the_future =
            Generation::starting_at(UtcTime::from_millis(UtcTime::now().millis() + day), 0xffff);
        let next = Generation::after(Some(&from_the_future));
        assert!(next > from_the_future);
        assert_eq!(
            next.start_time().millis(),
            from_the_future.start_time().millis() + 1
        );
        let old = Generation::starting_at(UtcTime::from_millis(1_000), 0);
        let next = Generation::after(Some(&old));
        assert!(
            next.start_time().millis() > UtcTime::now().millis() - day,
            "uses the clock"
        );
    }

    #[test]
    fn chain_values_round_trip_through_the_snapshot_comment() {
        let generation = Generation::parse("019ba7c71200beef").unwrap();
        let chain = ChainValue::of_generation(&generation);
        assert_eq!(chain, ChainValue([0x019b_a7c7, 0x1200_beef]));
        assert_eq!(chain.comment(), "walsync-chain=019ba7c7-1200beef");
        assert_eq!(
            ChainValue::parse_comment(b"walsync-chain=019ba7c7-1200beef"),
            Some(chain)
        );
        for bad in [
            &b""[..],
            b"walsync-chain=019BA7C7-1200beef",
            b"walsync-chain=019ba7c7-1200bee",
            b"walsync-chain=019ba7c71200beef",
            b"walsync-chain=019ba7c7-1200beef ",
            b"other=019ba7c7-1200beef",
            b"walsync-chain=+19ba7c7-1200beef",
        ] {
            assert_eq!(ChainValue::parse_comment(bad), None, "{bad:?}");
        }
    }

    /// In the sidecar's `position.json` a generation is its id and a chain value its two
    /// words, as when both were kept there as a plain string and array; a malformed id is
    /// refused on reading.
    #[test]
    fn generations_and_chain_values_are_saved_as_their_plain_forms() {
        let generation = Generation::parse("019ba7c71200beef").unwrap();
        let chain = ChainValue([0x019b_a7c7, 7]);
        let text = serde_json::to_string(&(&generation, chain)).unwrap();
        assert_eq!(text, r#"["019ba7c71200beef",[26978247,7]]"#);
        let back: (Generation, ChainValue) = serde_json::from_str(&text).unwrap();
        assert_eq!(back, (generation, chain));
        for bad in [r#""019BA7C71200BEEF""#, r#""019ba7c7""#, "16"] {
            assert!(serde_json::from_str::<Generation>(bad).is_err(), "{bad}");
        }
    }

    /// docs/FORMAT.md's `state.json` example has exactly the fields walsync writes, and its
    /// chain examples are the code's: the document cannot silently fall behind.
    #[test]
    fn the_format_document_matches_the_code() {
        let format = include_str!("../docs/FORMAT.md");
        let section = &format[format.find("## 7. `state.json`").unwrap()..];
        let json = section.split("```json\n").nth(1).unwrap();
        let json = &json[..json.find("```").unwrap()];
        let example: serde_json::Value = serde_json::from_str(json).unwrap();
        let state: ReplicaState = serde_json::from_value(example.clone()).unwrap();
        let written = serde_json::to_value(&state).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(keys(&example), keys(&written));
        assert!(Generation::parse(&state.generation).is_some());
        UtcTime::parse_rfc3339(&state.updated).unwrap();
        let chain = ChainValue::of_generation(&Generation::parse("019ba7c71200beef").unwrap());
        assert!(format.contains(&format!("gives `{chain}`")), "{chain}");
        assert!(format.contains(&format!("the comment `{}", ChainValue::COMMENT_PREFIX)));
    }

    fn names(specs: &[&str]) -> Result<Vec<String>> {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Ok(assign_names(&specs)?.into_iter().map(|(_, n)| n).collect())
    }

    #[test]
    fn colliding_stems_get_their_parent_directories() {
        assert_eq!(
            names(&[
                "/var/lib/x/romneys/app.db",
                "/var/lib/x/smiths/app.db",
                "/var/lib/x/jones/app.db",
                "/srv/other.db"
            ])
            .unwrap(),
            ["romneys-app", "smiths-app", "jones-app", "other"]
        );
        // Deeper collisions take more parents; odd characters become '_'.
        assert_eq!(
            names(&["/a/t 1/db/app.db", "/b/t 1/db/app.db"]).unwrap(),
            ["a-t_1-db-app", "b-t_1-db-app"]
        );
        assert_eq!(names(&["/x/app.db"]).unwrap(), ["app"]);
    }

    #[test]
    fn explicit_names_win_and_duplicates_are_refused() {
        assert_eq!(
            names(&["/x/a/app.db:tenant-a", "/x/b/app.db"]).unwrap(),
            ["tenant-a", "app"]
        );
        let err = names(&["/x/a.db:same", "/x/b.db:same"]).unwrap_err();
        assert!(err.to_string().contains("PATH:NAME"), "{err}");
        let err = names(&["/x/a.db", "/x/a.db"]).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        assert!(names(&["/x/a.db:../evil"]).is_err());
        assert!(names(&["/x/a.db:"]).is_err());
    }

    #[test]
    fn names_are_single_safe_segments() {
        for good in ["app", "app-1", "my_db.v2", "A9"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "..", ".", "a/b", "../x", ".hidden", "a b", "a\\b", "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(default_name(Path::new("/var/lib/x/app.db")).unwrap(), "app");
        assert_eq!(default_name(Path::new("my app.db")).unwrap(), "my_app");
    }
}
