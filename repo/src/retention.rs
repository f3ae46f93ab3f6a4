//! Retention: which snapshots a policy keeps, and why. A plain data type, so
//! the CLI's `forget`, the server's backup definitions and the operator's
//! `BackupJob` all speak the same policy.
//!
//! Snapshots are grouped (by host and paths unless told otherwise); in each
//! group they are ordered newest first (equal times by id) and each rule keeps
//! its share: `last` the newest N; `hourly`…`yearly` the newest snapshot of each
//! of the N newest periods that hold one (periods in UTC); `within` everything
//! no older than the duration before the group's newest snapshot; `tags` every
//! snapshot carrying one of the tags. A snapshot kept by any rule is kept.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::snapshot::SnapshotEntry;

/// The period a time falls in, as a tuple that orders like time.
type PeriodOf = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Seconds before the group's newest snapshot.
    pub keep_within_secs: Option<u64>,
    pub keep_tags: Vec<String>,
}

/// Which snapshot fields make a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grouping {
    pub host: bool,
    pub paths: bool,
    pub tags: bool,
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            host: true,
            paths: true,
            tags: false,
        }
    }
}

impl Grouping {
    /// Parses `host,paths,tags` (any subset; empty means one group).
    pub fn parse(s: &str) -> Result<Self> {
        let mut g = Grouping {
            host: false,
            paths: false,
            tags: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => g.host = true,
                "paths" => g.paths = true,
                "tags" => g.tags = true,
                other => {
                    return Err(Error::Invalid(format!(
                        "unknown group-by field {other:?}; use host, paths and/or tags"
                    )));
                }
            }
        }
        Ok(g)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct GroupKey {
    pub host: Option<String>,
    pub paths: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: SnapshotId,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// Why it is kept (empty when it goes).
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupDecision {
    pub group: GroupKey,
    /// Newest first.
    pub snapshots: Vec<Decision>,
}

/// A policy's verdict over a set of snapshots (see
/// [`RetentionPolicy::plan_forget`]).
#[derive(Debug, Clone)]
pub struct ForgetPlan {
    pub groups: Vec<GroupDecision>,
    /// Each once, in id order.
    pub remove: Vec<SnapshotId>,
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_within_secs.is_none()
            && self.keep_tags.is_empty()
    }

    /// Decides for every snapshot. Refuses an empty policy: it would remove
    /// everything, which is never what a forgotten flag meant.
    pub fn apply(&self, snapshots: &[SnapshotEntry], grouping: Grouping) -> Result<Vec<GroupDecision>> {
        if self.is_empty() {
            return Err(Error::Invalid(
                "no keep rule given; that would remove every snapshot (use --keep-last, --keep-daily, …)"
                    .into(),
            ));
        }
        let mut groups: BTreeMap<GroupKey, Vec<&SnapshotEntry>> = BTreeMap::new();
        for s in snapshots {
            // Tags as a set, as a series is ([`crate::snapshot::in_series`]).
            let mut tags = s.snapshot.tags.clone();
            tags.sort();
            tags.dedup();
            let key = GroupKey {
                host: grouping.host.then(|| s.snapshot.hostname.clone()),
                paths: grouping.paths.then(|| s.snapshot.paths.clone()),
                tags: grouping.tags.then_some(tags),
            };
            groups.entry(key).or_default().push(s);
        }
        Ok(groups
            .into_iter()
            .map(|(group, mut list)| {
                list.sort_by(|a, b| b.snapshot.time.cmp(&a.snapshot.time).then(b.id.cmp(&a.id)));
                GroupDecision {
                    group,
                    snapshots: self.decide(&list),
                }
            })
            .collect())
    }

    /// What this policy forgets among `snapshots`: each group's decisions
    /// (to show) and the ids that go. The one rule for `backer forget` and
    /// a server job's retention; [`crate::Repository::forget`] removes them.
    pub fn plan_forget(&self, snapshots: &[SnapshotEntry], grouping: Grouping) -> Result<ForgetPlan> {
        let groups = self.apply(snapshots, grouping)?;
        let mut remove: Vec<SnapshotId> = groups
            .iter()
            .flat_map(|g| &g.snapshots)
            .filter(|d| !d.keep)
            .map(|d| d.id)
            .collect();
        remove.sort();
        remove.dedup();
        Ok(ForgetPlan { groups, remove })
    }

    /// `list` is newest first.
    fn decide(&self, list: &[&SnapshotEntry]) -> Vec<Decision> {
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); list.len()];
        if let Some(n) = self.keep_last {
            for r in reasons.iter_mut().take(n as usize) {
                r.push("last".into());
            }
        }
        let rules: [(Option<u32>, &str, PeriodOf); 5] = [
            (self.keep_hourly, "hourly", |t| {
                (t.year(), t.month(), t.day(), t.hour())
            }),
            (self.keep_daily, "daily", |t| (t.year(), t.month(), t.day(), 0)),
            (self.keep_weekly, "weekly", |t| {
                let w = t.iso_week();
                (w.year(), w.week(), 0, 0)
            }),
            (self.keep_monthly, "monthly", |t| (t.year(), t.month(), 0, 0)),
            (self.keep_yearly, "yearly", |t| (t.year(), 0, 0, 0)),
        ];
        for (count, name, bucket) in rules {
            let Some(n) = count else { continue };
            let mut left = n;
            let mut last = None;
            for (i, s) in list.iter().enumerate() {
                if left == 0 {
                    break;
                }
                let b = bucket(&s.snapshot.time);
                if last != Some(b) {
                    reasons[i].push(name.to_string());
                    last = Some(b);
                    left -= 1;
                }
            }
        }
        if let (Some(secs), Some(newest)) = (self.keep_within_secs, list.first()) {
            // A duration reaching back before any representable time keeps
            // everything (and must not overflow).
            let limit = i64::try_from(secs)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|d| newest.snapshot.time.checked_sub_signed(d));
            for (i, s) in list.iter().enumerate() {
                if limit.is_none_or(|limit| s.snapshot.time >= limit) {
                    reasons[i].push(format!("within {}", format_duration(secs)));
                }
            }
        }
        for (i, s) in list.iter().enumerate() {
            for t in &self.keep_tags {
                if s.snapshot.tags.contains(t) {
                    reasons[i].push(format!("tag {t}"));
                }
            }
        }
        list.iter()
            .zip(reasons)
            .map(|(s, reasons)| Decision {
                id: s.id,
                time: s.snapshot.time,
                keep: !reasons.is_empty(),
                reasons,
            })
            .collect()
    }
}

/// Parses `90m`, `36h`, `7d`, `2w`, `6mo`(30 days), `1y`(365 days), or
/// combinations like `1d12h`.
pub fn parse_duration(s: &str) -> Result<u64> {
    let bad = || {
        Error::Invalid(format!(
            "{s:?} is not a duration; use e.g. 12h, 7d, 2w, 6mo, 1y, 1d12h"
        ))
    };
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(char::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "mo" => 30 * 86_400,
            "y" => 365 * 86_400,
            _ => return Err(bad()),
        };
        total = total
            .checked_add(n.checked_mul(secs).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    Ok(total)
}

fn format_duration(secs: u64) -> String {
    if secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        format!("{secs}s")
    }
}
