//! Snapshots: the record of one backup, pointing at its root tree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, SnapshotId};

/// How many errors a snapshot records by name (all are counted), and how
/// long each may be: every listing of the repository reads them.
pub const MAX_RECORDED_ERRORS: usize = 100;
pub const MAX_ERROR_BYTES: usize = 2048;

/// `m` cut to at most `max` bytes, on a character boundary, marked as cut.
pub fn bounded_message(mut m: String, max: usize) -> String {
    if m.len() > max {
        let mut end = max;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
        m.push('…');
    }
    m
}

impl Snapshot {
    /// Bounds what an agent sent in `errors` (see [`MAX_RECORDED_ERRORS`]).
    pub fn bound_errors(&mut self) {
        let extra = self.errors.len().saturating_sub(MAX_RECORDED_ERRORS);
        self.errors.truncate(MAX_RECORDED_ERRORS);
        for e in &mut self.errors {
            *e = bounded_message(std::mem::take(e), MAX_ERROR_BYTES);
        }
        if extra > 0 {
            self.errors.push(format!("… and {extra} more"));
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub time: DateTime<Utc>,
    pub hostname: String,
    pub username: String,
    /// The paths given to `backup`, absolute.
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub excludes: Vec<String>,
    pub parent: Option<SnapshotId>,
    pub tree: BlobId,
    pub summary: Summary,
    /// True when some files could not be read; `errors` says which.
    pub partial: bool,
    /// The first errors met (more are counted in `summary.errors`).
    pub errors: Vec<String>,
    pub program_version: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
    /// Files read again (new or changed since the parent).
    pub files_read: u64,
    /// Chunk bytes that were new to the repository, before compression.
    pub new_bytes: u64,
    /// Bytes written to storage for new chunks and trees.
    pub stored_bytes: u64,
    pub new_blobs: u64,
    pub errors: u64,
    /// Files whose size or mtime changed while they were read.
    pub changed_while_read: u64,
    pub duration_secs: f64,
}

/// A snapshot with its id, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub id: SnapshotId,
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

pub fn username() -> String {
    std::env::var("USER").unwrap_or_else(|_| format!("uid {}", rustix::process::getuid().as_raw()))
}

/// Which snapshots a command means: every field given must match. The one
/// rule for `latest`, for `snapshots --host`, and for a client's snapshots
/// on a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub host: Option<String>,
    /// The snapshot's paths, exactly.
    pub paths: Option<Vec<String>>,
    /// Tags the snapshot must all carry (it may carry more).
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    pub fn host(host: impl Into<String>) -> Self {
        SnapshotFilter {
            host: Some(host.into()),
            ..Default::default()
        }
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.host.as_ref().is_none_or(|h| &s.hostname == h)
            && self.paths.as_ref().is_none_or(|p| &s.paths == p)
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

/// Whether `s` belongs to the series of backups by `host` of `paths` with
/// `tags` (as a set: order and repeats aside). Tags tell apart volumes that
/// share a node and a path inside them. The one rule for a backup's parent
/// and for what a server job's retention may forget.
pub fn in_series(s: &Snapshot, host: &str, paths: &[String], tags: &[String]) -> bool {
    fn set(t: &[String]) -> Vec<&String> {
        let mut v: Vec<&String> = t.iter().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
    s.hostname == host && s.paths == paths && set(&s.tags) == set(tags)
}

/// The parent of a backup of `paths` by `host` with `tags`, among `all`
/// (oldest first): the newest snapshot of the same series ([`in_series`]).
/// Its unchanged files are not read again; another host's snapshot is
/// never a parent. The one rule for `backer backup` and the server.
pub fn parent<'a>(
    all: &'a [SnapshotEntry],
    host: &str,
    paths: &[String],
    tags: &[String],
) -> Option<&'a SnapshotEntry> {
    all.iter()
        .rev()
        .find(|s| in_series(&s.snapshot, host, paths, tags))
}

/// Resolves `spec` among `all` (oldest first): `latest`, a full id, or a
/// unique prefix of at least 4 hex digits. Only snapshots `filter` matches
/// count. `latest` without a host, in a repository holding several hosts'
/// snapshots, means this machine's if it has any, and is refused as
/// ambiguous otherwise: restoring another machine's files by accident is
/// worse than asking.
pub fn find(all: Vec<SnapshotEntry>, spec: &str, filter: &SnapshotFilter) -> crate::Result<SnapshotEntry> {
    use crate::Error;
    let spec = spec.trim();
    let wanted = |s: &SnapshotEntry| filter.matches(&s.snapshot);
    if spec == "latest" {
        let mut mine: Vec<SnapshotEntry> = all.into_iter().filter(wanted).collect();
        if filter.host.is_none() {
            let mut hosts: Vec<&str> = mine.iter().map(|s| s.snapshot.hostname.as_str()).collect();
            hosts.sort_unstable();
            hosts.dedup();
            if hosts.len() > 1 {
                let this = hostname();
                if !hosts.contains(&this.as_str()) {
                    return Err(Error::AmbiguousLatest(hosts.join(", ")));
                }
                mine.retain(|s| s.snapshot.hostname == this);
            }
        }
        return mine.pop().ok_or_else(|| {
            Error::NoLatest(
                filter
                    .host
                    .as_ref()
                    .map(|h| format!(" of host {h}"))
                    .unwrap_or_default(),
            )
        });
    }
    if spec.len() < 4 || spec.len() > 64 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!(
            "{spec:?} is not a snapshot: give `latest` or at least 4 hex digits of an id"
        )));
    }
    let prefix = spec.to_ascii_lowercase();
    // Another host's snapshot is not named: on a server, that would tell
    // one client about another.
    let mut found: Vec<SnapshotEntry> = all
        .into_iter()
        .filter(|s| s.id.to_hex().starts_with(&prefix) && wanted(s))
        .collect();
    match (found.pop(), found.is_empty()) {
        (Some(s), true) => Ok(s),
        (Some(_), false) => Err(Error::AmbiguousSnapshot(spec.into())),
        (None, _) => Err(Error::NoSuchSnapshot(spec.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn errors_sent_for_a_snapshot_are_bounded() {
        let mut s = Snapshot {
            time: Utc::now(),
            hostname: "h".into(),
            username: "u".into(),
            paths: vec![],
            tags: vec![],
            excludes: vec![],
            parent: None,
            tree: BlobId([0; 32]),
            summary: Summary::default(),
            partial: true,
            errors: vec!["ü".repeat(5000); 150],
            program_version: "t".into(),
        };
        s.bound_errors();
        assert_eq!(s.errors.len(), MAX_RECORDED_ERRORS + 1);
        assert!(s.errors[0].len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(s.errors[0].starts_with("üü") && s.errors[0].ends_with('…'));
        assert_eq!(s.errors[MAX_RECORDED_ERRORS], "… and 50 more");
    }

    fn entry(n: u8, host: &str, minute: u32, tags: &[&str]) -> SnapshotEntry {
        SnapshotEntry {
            id: SnapshotId([n; 32]),
            snapshot: Snapshot {
                time: chrono::DateTime::from_timestamp(1_700_000_000 + i64::from(minute) * 60, 0).unwrap(),
                hostname: host.into(),
                username: "u".into(),
                paths: vec!["/data".into()],
                tags: tags.iter().map(|t| t.to_string()).collect(),
                excludes: vec![],
                parent: None,
                tree: BlobId([0; 32]),
                summary: Summary::default(),
                partial: false,
                errors: vec![],
                program_version: "test".into(),
            },
        }
    }

    #[test]
    fn the_parent_is_the_newest_of_the_same_host_paths_and_tags() {
        let all = vec![
            entry(0x11, "web", 1, &["vol-a", "pvc"]),
            entry(0x22, "web", 2, &["vol-b", "pvc"]),
            entry(0x33, "db", 3, &["vol-a", "pvc"]),
            entry(0x44, "web", 4, &[]),
        ];
        let paths = vec!["/data".to_string()];
        let tags = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let id = |s: Option<&SnapshotEntry>| s.map(|s| s.id.0[0]);
        // Tags in any order; never another host's; never a superset or subset.
        assert_eq!(
            id(parent(&all, "web", &paths, &tags(&["pvc", "vol-a"]))),
            Some(0x11)
        );
        assert_eq!(
            id(parent(&all, "web", &paths, &tags(&["vol-b", "pvc"]))),
            Some(0x22)
        );
        assert_eq!(id(parent(&all, "web", &paths, &[])), Some(0x44));
        assert_eq!(id(parent(&all, "web", &paths, &tags(&["pvc"]))), None);
        assert_eq!(id(parent(&all, "db", &paths, &tags(&["vol-b", "pvc"]))), None);
        assert_eq!(id(parent(&all, "web", &["/other".to_string()], &[])), None);
    }

    #[test]
    fn a_series_is_one_host_paths_and_tag_set_and_a_job_forgets_only_its_own() {
        let s = |n, host, minute, tags| entry(n, host, minute, tags);
        let all = vec![
            s(0x11, "h", 1, &["pvc=a", "ns=x"]),
            s(0x22, "h", 2, &["ns=x", "pvc=a"]),
            s(0x33, "h", 3, &["ns=x", "pvc=a", "extra"]),
            s(0x44, "other", 4, &["ns=x", "pvc=a"]),
            s(0x55, "h", 5, &["ns=x", "pvc=a", "pvc=a"]),
        ];
        let tags = ["pvc=a".to_string(), "ns=x".to_string()];
        let paths = ["/data".to_string()];
        let series: Vec<_> = all
            .iter()
            .filter(|e| in_series(&e.snapshot, "h", &paths, &tags))
            .cloned()
            .collect();
        // Tag order and repeats aside; a superset of tags or another host is
        // another series.
        let ids: Vec<u8> = series.iter().map(|e| e.id.0[0]).collect();
        assert_eq!(ids, [0x11, 0x22, 0x55]);
        assert_eq!(parent(&all, "h", &paths, &tags).unwrap().id.0[0], 0x55);
        let policy = crate::retention::RetentionPolicy {
            keep_last: Some(1),
            ..Default::default()
        };
        let grouping = crate::retention::Grouping::parse("host,paths,tags").unwrap();
        let plan = policy.plan_forget(&series, grouping).unwrap();
        assert_eq!(plan.remove, [SnapshotId([0x11; 32]), SnapshotId([0x22; 32])]);
    }

    #[test]
    fn latest_respects_the_host() {
        let this = hostname();
        let all = vec![
            entry(0x11, &this, 1, &[]),
            entry(0x22, "other", 2, &["nightly"]),
            entry(0x33, "third", 3, &[]),
        ];
        // Several hosts, no --host: this machine's, never the newest overall.
        let got = find(all.clone(), "latest", &SnapshotFilter::default()).unwrap();
        assert_eq!(got.id, SnapshotId([0x11; 32]));
        let got = find(all.clone(), "latest", &SnapshotFilter::host("other")).unwrap();
        assert_eq!(got.id, SnapshotId([0x22; 32]));
        // Without this machine's snapshots, several hosts are ambiguous.
        let others: Vec<_> = all[1..].to_vec();
        let e = find(others.clone(), "latest", &SnapshotFilter::default()).unwrap_err();
        assert!(
            matches!(e, Error::AmbiguousLatest(ref h) if h == "other, third"),
            "{e}"
        );
        // One host only: that one.
        let got = find(others[..1].to_vec(), "latest", &SnapshotFilter::default()).unwrap();
        assert_eq!(got.id, SnapshotId([0x22; 32]));
        let e = find(all.clone(), "latest", &SnapshotFilter::host("nobody")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "there is no snapshot of host nobody to take as `latest`"
        );
        let tagged = SnapshotFilter {
            tags: vec!["nightly".into()],
            ..Default::default()
        };
        assert_eq!(find(all, "latest", &tagged).unwrap().id, SnapshotId([0x22; 32]));
    }

    #[test]
    fn ids_by_prefix_within_the_filter() {
        let all = vec![entry(0xab, "a", 1, &[]), entry(0xac, "b", 2, &[])];
        assert_eq!(
            find(all.clone(), "abab", &SnapshotFilter::default()).unwrap().id,
            SnapshotId([0xab; 32])
        );
        assert_eq!(
            find(all.clone(), "ABAB", &SnapshotFilter::default()).unwrap().id,
            SnapshotId([0xab; 32])
        );
        // Too short to be meant, or not hex.
        assert!(matches!(
            find(all.clone(), "ab", &SnapshotFilter::default()),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            find(all.clone(), "zzzz", &SnapshotFilter::default()),
            Err(Error::Invalid(_))
        ));
        // Another host's snapshot is not found, and not named.
        let e = find(all.clone(), "abab", &SnapshotFilter::host("b")).unwrap_err();
        assert_eq!(e.to_string(), "no snapshot matches \"abab\"");
        let mut twins = all.clone();
        twins.push(entry(0xab, "a", 3, &[]));
        twins[2].id.0[31] = 0;
        assert!(matches!(
            find(twins, "abab", &SnapshotFilter::default()),
            Err(Error::AmbiguousSnapshot(_))
        ));
    }
}
