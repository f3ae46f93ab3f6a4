//! Snapshots: the record of one backup, pointing at its root tree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, SnapshotId};

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
