//! `stats`: what the repository holds and how much dedup and compression save.

use serde::Serialize;

use crate::error::Result;
use crate::pack::BlobType;
use crate::repository::Repository;

#[derive(Debug, Default, Serialize)]
pub struct RepoStats {
    pub snapshots: usize,
    pub packs: usize,
    /// Bytes in storage for packs.
    pub stored_bytes: u64,
    pub data_blobs: u64,
    pub tree_blobs: u64,
    /// Unique chunk bytes before compression.
    pub unique_bytes: u64,
    /// File bytes summed over every snapshot, as if each were stored whole.
    pub snapshot_bytes: u64,
    /// snapshot_bytes / unique_bytes.
    pub dedup_ratio: f64,
    /// unique data bytes / stored bytes.
    pub compression_ratio: f64,
}

pub async fn stats(repo: &Repository) -> Result<RepoStats> {
    let mut s = RepoStats::default();
    let snaps = repo.snapshots().await?;
    s.snapshots = snaps.len();
    s.snapshot_bytes = snaps.iter().map(|e| e.snapshot.summary.bytes).sum();
    for (_, size) in repo.index().packs() {
        s.packs += 1;
        s.stored_bytes += size;
    }
    for loc in repo.index().blobs() {
        match loc.entry.kind {
            BlobType::Data => {
                s.data_blobs += 1;
                s.unique_bytes += u64::from(loc.entry.raw_len);
            }
            BlobType::Tree => s.tree_blobs += 1,
        }
    }
    if s.unique_bytes > 0 {
        s.dedup_ratio = s.snapshot_bytes as f64 / s.unique_bytes as f64;
    }
    if s.stored_bytes > 0 {
        s.compression_ratio = s.unique_bytes as f64 / s.stored_bytes as f64;
    }
    Ok(s)
}
