//! The retention rules against a simple reference model, over random
//! timelines with equal timestamps and clock jumps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};

use backer_repo::id::{BlobId, SnapshotId};
use backer_repo::retention::{Grouping, RetentionPolicy};
use backer_repo::snapshot::{Snapshot, SnapshotEntry, Summary};
use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use proptest::prelude::*;

fn entry(i: usize, secs: i64, tagged: bool) -> SnapshotEntry {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    SnapshotEntry {
        id: SnapshotId(id),
        snapshot: Snapshot {
            time: Utc.timestamp_opt(secs, 0).unwrap(),
            hostname: "h".into(),
            username: "u".into(),
            paths: vec!["/data".into()],
            tags: if tagged { vec!["keep".into()] } else { vec![] },
            excludes: vec![],
            parent: None,
            tree: BlobId([0; 32]),
            summary: Summary::default(),
            partial: false,
            errors: vec![],
            program_version: "t".into(),
        },
    }
}

type Period = (i32, u32, u32, u32);
type Bucket = fn(&DateTime<Utc>) -> Period;

/// Keeps, for each of the `n` latest periods holding a snapshot, that
/// period's newest snapshot: computed by grouping, not by streaming.
fn newest_per_bucket(snaps: &[SnapshotEntry], n: u32, f: Bucket, keep: &mut HashSet<SnapshotId>) {
    let mut buckets: BTreeMap<Period, (DateTime<Utc>, SnapshotId)> = BTreeMap::new();
    for s in snaps {
        let k = f(&s.snapshot.time);
        let cand = (s.snapshot.time, s.id);
        let e = buckets.entry(k).or_insert(cand);
        if cand > *e {
            *e = cand;
        }
    }
    for (_, (_, id)) in buckets.iter().rev().take(n as usize) {
        keep.insert(*id);
    }
}

fn reference(p: &RetentionPolicy, snaps: &[SnapshotEntry]) -> HashSet<SnapshotId> {
    let mut keep = HashSet::new();
    let mut sorted: Vec<&SnapshotEntry> = snaps.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse((s.snapshot.time, s.id)));
    if let Some(n) = p.keep_last {
        keep.extend(sorted.iter().take(n as usize).map(|s| s.id));
    }
    let rules: [(Option<u32>, Bucket); 5] = [
        (p.keep_hourly, |t| (t.year(), t.month(), t.day(), t.hour())),
        (p.keep_daily, |t| (t.year(), t.month(), t.day(), 0)),
        (p.keep_weekly, |t| {
            (t.iso_week().year(), t.iso_week().week(), 0, 0)
        }),
        (p.keep_monthly, |t| (t.year(), t.month(), 0, 0)),
        (p.keep_yearly, |t| (t.year(), 0, 0, 0)),
    ];
    for (n, f) in rules {
        if let Some(n) = n {
            newest_per_bucket(snaps, n, f, &mut keep);
        }
    }
    if let Some(w) = p.keep_within_secs {
        let newest = snaps.iter().map(|s| s.snapshot.time).max().unwrap();
        for s in snaps {
            if (newest - s.snapshot.time).num_seconds() <= w as i64 {
                keep.insert(s.id);
            }
        }
    }
    for s in snaps {
        if p.keep_tags.iter().any(|t| s.snapshot.tags.contains(t)) {
            keep.insert(s.id);
        }
    }
    keep
}

/// Timelines: steps forward of 0 s (equal times) to weeks, and jumps back
/// (a clock set wrong, then fixed), over years.
fn timeline() -> impl Strategy<Value = Vec<SnapshotEntry>> {
    prop::collection::vec(
        (
            prop_oneof![
                3 => Just(0i64),
                5 => 1i64..7200,
                5 => 3600i64..200_000,
                2 => 86_400i64..5_000_000,
                1 => -5_000_000i64..-1,
            ],
            prop::bool::weighted(0.1),
        ),
        1..120,
    )
    .prop_map(|steps| {
        let mut t = 1_600_000_000i64;
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (step, tagged))| {
                t += step;
                entry(i, t, tagged)
            })
            .collect()
    })
}

fn policy() -> impl Strategy<Value = RetentionPolicy> {
    let n = || prop::option::weighted(0.4, 0u32..8);
    (
        n(),
        n(),
        n(),
        n(),
        n(),
        n(),
        prop::option::weighted(0.3, 0u64..3_000_000),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(last, h, d, w, m, y, within, tags)| RetentionPolicy {
            keep_last: last,
            keep_hourly: h,
            keep_daily: d,
            keep_weekly: w,
            keep_monthly: m,
            keep_yearly: y,
            keep_within_secs: within,
            keep_tags: if tags { vec!["keep".into()] } else { vec![] },
        })
        .prop_filter("a policy keeps something", |p| !p.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn matches_the_reference_model(snaps in timeline(), p in policy()) {
        let decided = p.apply(&snaps, Grouping::default()).unwrap();
        prop_assert_eq!(decided.len(), 1);
        let kept: HashSet<SnapshotId> = decided[0].snapshots.iter().filter(|d| d.keep).map(|d| d.id).collect();
        prop_assert_eq!(&kept, &reference(&p, &snaps));
        // Every snapshot is decided once, and every kept one says why.
        prop_assert_eq!(decided[0].snapshots.len(), snaps.len());
        for d in &decided[0].snapshots {
            prop_assert_eq!(d.keep, !d.reasons.is_empty());
        }
    }
}

#[test]
fn empty_policy_is_refused() {
    let snaps = vec![entry(0, 1_600_000_000, false)];
    let err = RetentionPolicy::default()
        .apply(&snaps, Grouping::default())
        .unwrap_err();
    assert!(err.to_string().contains("no keep rule"), "{err}");
}

#[test]
fn groups_by_host_and_paths() {
    let mut a = entry(0, 1_600_000_000, false);
    let mut b = entry(1, 1_600_000_100, false);
    a.snapshot.hostname = "one".into();
    b.snapshot.hostname = "two".into();
    let p = RetentionPolicy {
        keep_last: Some(1),
        ..Default::default()
    };
    let d = p.apply(&[a.clone(), b.clone()], Grouping::default()).unwrap();
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|g| g.snapshots[0].keep));
    let d = p.apply(&[a, b], Grouping::parse("").unwrap()).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].snapshots.iter().filter(|x| x.keep).count(), 1);
    assert!(Grouping::parse("host,color").is_err());
}

#[test]
fn durations_parse() {
    use backer_repo::retention::parse_duration;
    assert_eq!(parse_duration("7d").unwrap(), 7 * 86_400);
    assert_eq!(parse_duration("1d12h").unwrap(), 36 * 3600);
    assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
    assert_eq!(parse_duration("6mo").unwrap(), 180 * 86_400);
    for bad in ["", "d", "7", "7x", "-1d"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

/// A duration longer than any calendar keeps everything, instead of
/// overflowing the date arithmetic (it used to panic).
#[test]
fn keep_within_longer_than_time_itself_keeps_all() {
    let snaps: Vec<SnapshotEntry> = (0..5)
        .map(|i| entry(i, 1_700_000_000 + i as i64 * 86_400, false))
        .collect();
    for secs in [
        backer_repo::retention::parse_duration("300000y").unwrap(),
        backer_repo::retention::parse_duration("100000000000h").unwrap(),
        u64::MAX,
    ] {
        let policy = RetentionPolicy {
            keep_within_secs: Some(secs),
            ..Default::default()
        };
        let groups = policy.apply(&snaps, Grouping::parse("").unwrap()).unwrap();
        let kept = groups
            .iter()
            .flat_map(|g| &g.snapshots)
            .filter(|d| d.keep)
            .count();
        assert_eq!(kept, 5, "keep-within {secs} s");
    }
}
