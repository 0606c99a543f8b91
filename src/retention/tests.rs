//! The prune plan on small hand-built listings: what it deletes and keeps, when the next
//! prune is due, and how durations are spelled; and, against restore's own choice
//! ([`crate::restore::choose`]), that every restore the rule promises reads the same objects
//! after a prune, or any prefix of one, as before: on replicas with several generations,
//! duplicate cuts and stepped clocks.

use super::*;
use crate::layout::ObjectName;
use crate::restore::{self, RestorePlan};
use crate::storage::ObjectInfo;

const T0: i64 = 1_768_046_400_000;
const SEC: i64 = 1000;

fn generation(start_offset_secs: i64, random: u16) -> Generation {
    let millis = (T0 + start_offset_secs * SEC) as u64;
    Generation::parse(&format!("{millis:012x}{random:04x}")).unwrap()
}

/// A replica listing built object by object: (kind, generation, index, time offset in
/// seconds from T0, size).
#[derive(Default)]
struct Listing {
    objects: Vec<ObjectInfo>,
}

impl Listing {
    fn add(&mut self, kind: ObjectKind, g: &Generation, index: u64, at: i64) -> String {
        let key = ObjectName {
            kind,
            generation: g.clone(),
            index,
            time: UtcTime::from_millis(T0 + at * SEC),
        }
        .key("app");
        self.objects.push(ObjectInfo {
            key: key.clone(),
            size: 100 + index,
        });
        key
    }
    fn snap(&mut self, g: &Generation, index: u64, at: i64) -> String {
        self.add(ObjectKind::Snapshot, g, index, at)
    }
    fn seg(&mut self, g: &Generation, index: u64, at: i64) -> String {
        self.add(ObjectKind::Segment, g, index, at)
    }
    fn catalog(&self) -> Catalog {
        let mut objects = self.objects.clone();
        objects.push(ObjectInfo {
            key: "app/state.json".into(),
            size: 10,
        });
        objects.push(ObjectInfo {
            key: "app/wal/not-ours.wal.gz".into(),
            size: 10,
        });
        Catalog::from_listing(objects)
    }
    fn generations(&self) -> BTreeMap<Generation, GenerationObjects> {
        self.catalog().databases.remove("app").unwrap_or_default()
    }
}

fn at(secs: i64) -> UtcTime {
    UtcTime::from_millis(T0 + secs * SEC)
}

fn plan_at(listing: &Listing, now: i64, retention_secs: u64) -> PrunePlan {
    plan(
        "app",
        &listing.generations(),
        at(now),
        Duration::from_secs(retention_secs),
    )
}

/// What remains after the plan's deletions.
fn after(
    generations: &BTreeMap<Generation, GenerationObjects>,
    plan: &PrunePlan,
) -> BTreeMap<Generation, GenerationObjects> {
    let gone: Vec<&str> = plan.delete.iter().map(|o| o.key.as_str()).collect();
    generations
        .iter()
        .map(|(g, o)| {
            let keep = |list: &[StoredObject]| -> Vec<StoredObject> {
                list.iter()
                    .filter(|s| !gone.contains(&s.key.as_str()))
                    .cloned()
                    .collect()
            };
            (
                g.clone(),
                GenerationObjects {
                    snapshots: keep(&o.snapshots),
                    segments: keep(&o.segments),
                },
            )
        })
        .collect()
}

fn same(a: &Result<RestorePlan>, b: &Result<RestorePlan>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => {
            a.snapshot == b.snapshot && a.segments == b.segments && a.alternatives == b.alternatives
        }
        _ => false,
    }
}

/// Every restore the rule promises gives the same plan after pruning as before: every
/// point from W on (each object time, W itself, and just after each), the latest, and
/// the newest generation with and without a point in time. Also any prefix of the
/// deletions (an interrupted prune) leaves them unchanged.
fn assert_restores_unchanged(listing: &Listing, plan: &PrunePlan) {
    let before = listing.generations();
    let Some(window) = plan.window_start else {
        assert!(plan.delete.is_empty());
        return;
    };
    let mut points: Vec<UtcTime> = vec![window];
    for o in &listing.objects {
        let t = ObjectName::parse_key(&o.key).unwrap().1.time;
        for p in [t, UtcTime::from_millis(t.millis() + 1)] {
            if p >= window {
                points.push(p);
            }
        }
    }
    let newest = before
        .iter()
        .rev()
        .find(|(_, o)| !o.snapshots.is_empty())
        .map(|(g, _)| g.clone());
    for cut in 0..=plan.delete.len() {
        let partial = PrunePlan {
            delete: plan.delete[..cut].to_vec(),
            ..plan.clone()
        };
        let pruned = after(&before, &partial);
        let check = |pit: Option<UtcTime>, g: Option<&Generation>| {
            let was = restore::choose("app", &before, pit, g, "test");
            let is = restore::choose("app", &pruned, pit, g, "test");
            if was.is_ok() {
                assert!(
                    same(&was, &is),
                    "restore to {pit:?} (generation {g:?}) changed after deleting {:?}:\n\
                     before {was:?}\nafter {is:?}",
                    partial.keys()
                );
            }
        };
        check(None, None);
        check(None, newest.as_ref());
        for p in &points {
            check(Some(*p), None);
            check(Some(*p), newest.as_ref());
        }
    }
}

fn names(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect()
}

#[test]
fn durations_parse_in_every_spelling() {
    for (text, secs) in [
        ("24h", 86400.0),
        ("90m", 5400.0),
        ("7d", 604_800.0),
        ("3600s", 3600.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("45", 45.0),
        ("1.5h", 5400.0),
        ("2.25s", 2.25),
        (" 10m ", 600.0),
    ] {
        assert_eq!(
            parse_duration(text).unwrap().as_secs_f64(),
            secs,
            "{text:?}"
        );
    }
    for bad in [
        "", "h", "-1h", "1w", "1hh", "1 h", "1e3s", "abc", "+5m", "1.2.3s",
    ] {
        let err = parse_duration(bad).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Invalid, "{bad:?}");
    }
    for d in ["1d", "2h", "90m", "7d", "3601s", "0"] {
        assert_eq!(format_duration(parse_duration(d).unwrap()), d);
    }
    assert_eq!(format_duration(parse_duration("24h").unwrap()), "1d");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
}

#[test]
fn an_empty_catalog_and_zero_retention_delete_nothing() {
    let empty = Listing::default();
    let plan = plan_at(&empty, 1000, 60);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.bytes, 0);
    assert!(plan.base.is_none());

    let mut listing = Listing::default();
    let g = generation(0, 1);
    listing.snap(&g, 0, 0);
    for i in 1..50 {
        listing.seg(&g, i, i as i64 * 10);
    }
    listing.snap(&g, 49, 500);
    let plan = plan_at(&listing, 1_000_000, 0);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.window_start, None);
    assert_eq!(plan.summary(false), "app: retention 0: keeping everything");
}

#[test]
fn a_window_reaching_before_the_first_snapshot_deletes_nothing() {
    let mut listing = Listing::default();
    let g = generation(0, 1);
    listing.snap(&g, 0, 100);
    listing.seg(&g, 1, 110);
    listing.snap(&g, 1, 120);
    // W = 50: before every snapshot.
    let plan = plan_at(&listing, 150, 100);
    assert!(plan.delete.is_empty(), "{:?}", plan.keys());
    assert!(plan.base.is_none());
    assert!(plan.summary(false).contains("nothing to delete"));
}

#[test]
fn the_next_prune_is_due_when_the_window_passes_the_next_snapshot() {
    let g = generation(0, 3);
    let mut l = Listing::default();
    l.snap(&g, 0, 0);
    l.seg(&g, 1, 5);
    l.snap(&g, 1, 10);
    l.snap(&g, 1, 30);
    // W = 15 - 60 < 0: nothing yet; due when W reaches the first snapshot (0 + 60).
    assert_eq!(plan_at(&l, 15, 60).next_due, Some(at(60)));
    // W = 5: S* is the first; due when W reaches the second (10 + 60).
    assert_eq!(plan_at(&l, 65, 60).next_due, Some(at(70)));
    // W = 30: S* is the newest; only a new snapshot can change anything.
    assert_eq!(plan_at(&l, 90, 60).next_due, None);
    assert_eq!(plan_at(&l, 90, 0).next_due, None);
}

#[test]
fn one_generation_keeps_the_snapshot_before_the_window_and_everything_after() {
    let g = generation(0, 7);
    let mut l = Listing::default();
    let s0 = l.snap(&g, 0, 0);
    let w1 = l.seg(&g, 1, 10);
    let w2 = l.seg(&g, 2, 20);
    let s2 = l.snap(&g, 2, 25);
    let w3 = l.seg(&g, 3, 30);
    let w4 = l.seg(&g, 4, 40);
    let s4 = l.snap(&g, 4, 45);
    let w5 = l.seg(&g, 5, 50);
    // W = 35: S* is the snapshot at index 2 (time 25). Segment 2 stays: restore reads
    // the cuts of its snapshot's own index as alternatives for the chain check.
    let plan = plan_at(&l, 135, 100);
    assert_eq!(plan.base.as_ref().unwrap().key, s2);
    assert_eq!(plan.keys(), [s0.clone(), w1.clone()]);
    assert_eq!(plan.bytes, 100 + 101);
    assert!(plan
        .summary(false)
        .starts_with("app: would delete 2 objects (1 snapshot, 1 segment), 201 bytes freed"));
    assert_restores_unchanged(&l, &plan);
    // W exactly at a snapshot's time keeps that snapshot as S*.
    let plan = plan_at(&l, 145, 100);
    assert_eq!(plan.base.as_ref().unwrap().key, s4);
    assert_eq!(
        plan.keys(),
        [s0, s2, w1, w2, w3],
        "snapshots first, then segments, oldest first"
    );
    assert!(!plan.keys().contains(&w4) && !plan.keys().contains(&w5));
    assert_restores_unchanged(&l, &plan);
    assert!(plan
        .summary(true)
        .starts_with("app: deleted 5 objects (2 snapshots, 3 segments), 508 bytes freed"));
}

#[test]
fn whole_old_generations_go_and_the_window_generation_keeps_its_tail() {
    let g1 = generation(0, 1);
    let g2 = generation(100, 2);
    let g3 = generation(200, 3);
    let mut l = Listing::default();
    l.snap(&g1, 0, 0);
    l.seg(&g1, 1, 10);
    l.snap(&g1, 1, 20);
    l.seg(&g1, 2, 30);
    l.snap(&g2, 0, 100);
    l.seg(&g2, 1, 110);
    l.seg(&g2, 2, 120);
    l.snap(&g2, 2, 130);
    l.seg(&g2, 3, 140);
    let g3_base = l.snap(&g3, 0, 200);
    let g3_first = l.seg(&g3, 1, 210);
    // A generation with segments only (its snapshot was pruned before): junk.
    let g0 = generation(-100, 9);
    let orphan = l.seg(&g0, 5, -50);
    for (now, expect_deleted) in [
        (1000 + 25, 2),  // W = 25: S* = g1@1
        (1000 + 105, 5), // W = 105: S* = g2@0
        (1000 + 135, 7), // W = 135: S* = g2@2
        (1000 + 205, 10),
        (1_000_000, 10), // far in the future: the newest snapshot and its tail stay
    ] {
        let plan = plan_at(&l, now, 1000);
        assert_eq!(
            plan.delete.len(),
            expect_deleted,
            "now {now}: {:?}",
            names(&plan.keys())
        );
        assert!(plan.keys().contains(&orphan));
        assert_restores_unchanged(&l, &plan);
    }
    let plan = plan_at(&l, 1_000_000, 1000);
    let remaining: Vec<String> = l
        .objects
        .iter()
        .map(|o| o.key.clone())
        .filter(|k| !plan.keys().contains(k))
        .collect();
    assert_eq!(remaining, [g3_base, g3_first]);
}

#[test]
fn duplicate_cuts_at_a_kept_snapshot_index_are_kept() {
    let g = generation(0, 4);
    let mut l = Listing::default();
    l.snap(&g, 0, 0);
    l.seg(&g, 1, 10);
    let dup_old = l.seg(&g, 2, 20);
    let dup_new = l.seg(&g, 2, 21);
    let s2 = l.snap(&g, 2, 22);
    l.seg(&g, 3, 30);
    l.seg(&g, 3, 31);
    l.seg(&g, 4, 40);
    let plan = plan_at(&l, 125, 100);
    assert_eq!(plan.base.as_ref().unwrap().key, s2);
    assert!(!plan.keys().contains(&dup_old) && !plan.keys().contains(&dup_new));
    assert_eq!(plan.delete.len(), 2, "{:?}", plan.keys());
    assert_restores_unchanged(&l, &plan);
}

#[test]
fn a_clock_stepped_forward_never_deletes_the_latest_backup() {
    let g1 = generation(0, 1);
    let g2 = generation(10, 2);
    let mut l = Listing::default();
    l.snap(&g1, 0, 0);
    l.seg(&g1, 1, 5);
    // The newest generation was written with a clock far behind: its objects look old.
    let base = l.snap(&g2, 0, -5000);
    l.seg(&g2, 1, -4990);
    l.snap(&g2, 1, -4980);
    l.seg(&g2, 2, -4970);
    // now far ahead (the clock stepped forward): W is after everything. S* is g1@0 (the
    // greatest time before W); the newest generation's newest snapshot (g2@1) stays
    // whatever its time, with the cuts of its index and after; only g2's base goes.
    let plan = plan_at(&l, 100_000, 60);
    assert_eq!(plan.base.as_ref().unwrap().name.generation, g1);
    assert_eq!(plan.keys(), [base]);
    assert_restores_unchanged(&l, &plan);
    // A plain restore still gets the newest generation.
    let pruned = after(&l.generations(), &plan);
    let latest = restore::choose("app", &pruned, None, None, "test").unwrap();
    assert_eq!(latest.generation, g2);
    assert_eq!(latest.segments.len(), 1);
}

#[test]
fn a_clock_stepped_back_keeps_what_the_newest_generation_alone_restores_from() {
    // g1 was written with a clock ahead (times 200..), g2 after the clock went back.
    let g1 = generation(0, 1);
    let g2 = generation(1, 2);
    let mut l = Listing::default();
    l.snap(&g1, 0, 200);
    l.seg(&g1, 1, 210);
    let g2_base = l.snap(&g2, 0, 50);
    l.seg(&g2, 1, 60);
    l.seg(&g2, 2, 150);
    l.snap(&g2, 2, 250);
    l.seg(&g2, 3, 260);
    // W = 220: S* = g1@0 (time 200). A restore with --generation g2 at 220 starts from
    // g2@0 (time 50): it must stay too, with its segments.
    let plan = plan_at(&l, 1220, 1000);
    assert_eq!(plan.base.as_ref().unwrap().name.generation, g1);
    assert!(!plan.keys().contains(&g2_base), "{:?}", plan.keys());
    assert_restores_unchanged(&l, &plan);
    // Times that go back inside one generation, too.
    let g = generation(500, 5);
    let mut l = Listing::default();
    l.snap(&g, 0, 100);
    l.seg(&g, 1, 110);
    l.snap(&g, 1, 40);
    l.seg(&g, 2, 50);
    l.snap(&g, 2, 60);
    l.seg(&g, 3, 70);
    for now in [1030, 1045, 1055, 1065, 1105, 1200, 9999] {
        let plan = plan_at(&l, now, 1000);
        assert_restores_unchanged(&l, &plan);
    }
}

#[test]
fn a_newer_generation_without_a_listed_snapshot_is_left_alone() {
    // The listing caught a new generation's first segment but not its base snapshot
    // (a LIST racing the writer, or an upload still in progress): keep it whole.
    let g1 = generation(0, 1);
    let g2 = generation(100, 2);
    let mut l = Listing::default();
    l.snap(&g1, 0, 0);
    l.seg(&g1, 1, 10);
    l.snap(&g1, 1, 20);
    let g2_segment = l.seg(&g2, 1, 110);
    let plan = plan_at(&l, 10_000, 100);
    assert!(!plan.keys().contains(&g2_segment));
    assert_restores_unchanged(&l, &plan);
}

#[test]
fn every_window_over_a_messy_replica_keeps_every_restore() {
    // Several generations, duplicate cuts, a time step back, a segments-only generation.
    let mut l = Listing::default();
    let ga = generation(0, 0xa);
    let gb = generation(300, 0xb);
    let gc = generation(301, 0xc);
    let gd = generation(600, 0xd);
    l.snap(&ga, 0, 0);
    for i in 1..=6 {
        l.seg(&ga, i, i as i64 * 10);
        if i % 2 == 0 {
            l.snap(&ga, i, i as i64 * 10 + 1);
        }
    }
    l.seg(&ga, 6, 65);
    l.seg(&gb, 3, 290);
    l.snap(&gc, 0, 310);
    l.seg(&gc, 1, 320);
    l.seg(&gc, 1, 321);
    l.snap(&gc, 1, 322);
    l.seg(&gc, 2, 250); // clock went back
    l.snap(&gc, 2, 255);
    l.seg(&gc, 3, 330);
    l.snap(&gd, 0, 600);
    l.seg(&gd, 1, 610);
    l.seg(&gd, 2, 620);
    for w in (-10..700).step_by(5) {
        let plan = plan_at(&l, w + 100, 100);
        assert_restores_unchanged(&l, &plan);
        // Never state.json or foreign keys; never the newest snapshot or later.
        assert!(plan
            .keys()
            .iter()
            .all(|k| ObjectName::parse_key(k).is_some()));
        assert!(!plan.keys().iter().any(|k| k.contains(gd.as_str())));
    }
}
