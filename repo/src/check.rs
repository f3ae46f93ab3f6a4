//! `check`: the structure always (every index entry points into a pack that
//! exists with the recorded size; every snapshot's trees and chunks are
//! indexed), and with `read_data` every byte (each pack's hash matches its
//! name, its header matches the index, every blob decrypts, decompresses and
//! hashes to its id).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;

use crate::chunk;
use crate::error::{Chain, Result};
use crate::id::{BlobId, PackId, storage_hash};
use crate::index::{Index, IndexFile, IndexedPack};
use crate::pack::{self, pack_name};
use crate::repository::{Dir, Repository};
use crate::tree::Extent;

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub read_data: bool,
    /// Read only packs whose bucket (first byte of the id, mod `of`) is `part - 1`:
    /// `Some((part, of))`, 1-based, so `1/5` … `5/5` together read everything.
    pub subset: Option<(u32, u32)>,
}

#[derive(Debug, Default)]
pub struct CheckProgress {
    pub packs_total: AtomicU64,
    pub packs_done: AtomicU64,
    pub bytes_done: AtomicU64,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub snapshots: usize,
    pub trees: usize,
    pub packs: usize,
    pub packs_read: usize,
    pub blobs_read: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

pub async fn check(
    repo: &Repository,
    opts: &CheckOptions,
    progress: Arc<CheckProgress>,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();

    for d in &repo.damaged_keys().await? {
        report.errors.push(format!(
            "key file {d}; `backer key remove {}` removes it",
            d.name.trim_start_matches("keys/").get(..8).unwrap_or_default()
        ));
    }
    for l in crate::lock::list_locks(repo, None, crate::lock::Timing::from_env()).await? {
        if l.info.is_none() {
            report.warnings.push(format!(
                "{}: it counts as stale, and `backer unlock` removes it",
                l.describe()
            ));
        }
    }

    // Index files: each must load and match its name.
    let mut index_entries: HashMap<PackId, u64> = HashMap::new();
    let (files, damaged) = repo.load_index_files().await?;
    for d in &damaged {
        report.errors.push(format!(
            "index file {d}; `backer repair index` rebuilds the index from the packs"
        ));
    }
    for (_, f) in files {
        for p in f.packs {
            index_entries.insert(p.id, p.size);
        }
    }

    // Packs in storage against packs in the index.
    let stored: HashMap<PackId, u64> = repo
        .list(Dir::Data)
        .await?
        .into_iter()
        .filter_map(|l| l.name.parse().ok().map(|id| (id, l.size)))
        .collect();
    report.packs = stored.len();
    for (id, _) in repo.index().packs() {
        match (stored.get(&id), index_entries.get(&id)) {
            (None, _) => report.errors.push(format!(
                "pack {id} is named by the index but missing from storage; \
                 `backer repair index` then `backer repair snapshots` drop what it held"
            )),
            (Some(size), Some(rec)) if size != rec => report.errors.push(format!(
                "pack {id} has {size} bytes in storage, the index recorded {rec}"
            )),
            _ => {}
        }
    }

    // Packs no index names: their headers say what they hold, so none that
    // holds what a snapshot uses is ever called unused.
    let unindexed: Vec<(PackId, u64)> = stored
        .iter()
        .filter(|(id, _)| repo.index().get_pack(id).is_none())
        .map(|(id, size)| (*id, *size))
        .collect();
    let headers: Vec<(PackId, u64, Result<Vec<pack::PackEntry>>)> = futures::stream::iter(unindexed)
        .map(|(id, size)| async move { (id, size, repo.read_pack_header(&id, size).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut found = IndexFile::default();
    for (id, size, header) in headers {
        match header {
            Ok(blobs) => found.packs.push(IndexedPack { id, size, blobs }),
            Err(e) if e.is_damage() => report.errors.push(format!(
                "pack {id} is in no index and its header cannot be read ({}); what it holds is lost",
                Chain(&e)
            )),
            Err(e) => return Err(e),
        }
    }
    let found = Index::from_files([&found]);
    let locate = |id: &BlobId| repo.index().get(id).or_else(|| found.get(id));
    // Unindexed packs that snapshots need, with how many of their blobs.
    let mut needed: HashMap<PackId, u64> = HashMap::new();

    // Snapshots, their trees and chunks.
    let snapshots = repo.load_snapshots().await?;
    for d in &snapshots.damaged {
        report
            .errors
            .push(format!("snapshot file {d}; `backer repair snapshots` removes it"));
    }
    report.snapshots = snapshots.snapshots.len();
    let mut seen_trees: HashSet<BlobId> = HashSet::new();
    let mut trees_unread = 0usize;
    let mut seen_data: HashSet<BlobId> = HashSet::new();
    for s in &snapshots.snapshots {
        let mut stack = vec![(s.snapshot.tree, String::new())];
        while let Some((tree_id, path)) = stack.pop() {
            if !seen_trees.insert(tree_id) {
                continue;
            }
            let shown = if path.is_empty() { "/" } else { &path };
            let Some(loc) = locate(&tree_id) else {
                trees_unread += 1;
                report.errors.push(format!(
                    "snapshot {}: directory {}: tree {tree_id} is in no index and no pack",
                    s.id.short(),
                    crate::text::escape(shown)
                ));
                continue;
            };
            if repo.index().get(&tree_id).is_none() {
                *needed.entry(loc.pack).or_default() += 1;
            }
            let tree = match repo.load_tree_at(&tree_id, &loc).await {
                Ok(t) => t,
                Err(e) => {
                    trees_unread += 1;
                    report.errors.push(format!(
                        "snapshot {}: directory {}: failed to read tree {tree_id}: {}",
                        s.id.short(),
                        crate::text::escape(shown),
                        Chain(&e)
                    ));
                    continue;
                }
            };
            for n in &tree.nodes {
                let child = format!("{path}/{}", n.name_lossy());
                if let Some(sub) = n.subtree {
                    stack.push((sub, child.clone()));
                }
                for e in &n.content {
                    let Extent::Data { id, .. } = e else { continue };
                    if !seen_data.insert(*id) || repo.index().contains(id) {
                        continue;
                    }
                    match found.get(id) {
                        Some(loc) => *needed.entry(loc.pack).or_default() += 1,
                        None => report.errors.push(format!(
                            "snapshot {}: file {}: chunk {id} is in no index and no pack",
                            s.id.short(),
                            crate::text::escape(&child)
                        )),
                    }
                }
            }
        }
    }
    report.trees = seen_trees.len();
    let blind = trees_unread > 0 || !snapshots.damaged.is_empty();
    for (id, _) in found.packs() {
        match needed.get(&id) {
            Some(n) => report.errors.push(format!(
                "pack {id} is in no index but holds {n} blobs that snapshots use: do not delete it; \
                 `backer repair index` adds it back"
            )),
            // What unreadable trees or snapshot files reference is unknown:
            // the pack may be theirs.
            None if blind => report.errors.push(format!(
                "pack {id} is in no index; whether a snapshot needs it cannot be told while some trees or \
                 snapshot files cannot be read: do not delete it; `backer repair index` adds it back"
            )),
            None => report.warnings.push(format!(
                "pack {id} is in no index and holds nothing a snapshot uses (left by an interrupted \
                 backup, or written by one still running); `backer prune` removes it"
            )),
        }
    }

    if opts.read_data {
        read_data(repo, opts, &stored, &found, &progress, &mut report).await;
    }
    Ok(report)
}

async fn read_data(
    repo: &Repository,
    opts: &CheckOptions,
    stored: &HashMap<PackId, u64>,
    unindexed: &Index,
    progress: &CheckProgress,
    report: &mut CheckReport,
) {
    // Blobs the index places in each pack, to compare with the pack's header.
    let mut by_pack: HashMap<PackId, Vec<pack::PackEntry>> = HashMap::new();
    for loc in repo.index().blobs().chain(unindexed.blobs()) {
        by_pack.entry(loc.pack).or_default().push(loc.entry);
    }
    let packs: Vec<PackId> = repo
        .index()
        .packs()
        .chain(unindexed.packs())
        .map(|(id, _)| id)
        .filter(|id| stored.contains_key(id))
        .filter(|id| match opts.subset {
            Some((part, of)) => u32::from(id.0[0]) % of == part - 1,
            None => true,
        })
        .collect();
    progress.packs_total.store(packs.len() as u64, Ordering::Relaxed);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let results: Vec<(Vec<String>, u64)> = futures::stream::iter(packs)
        .map(|id| {
            let expected = by_pack.remove(&id).unwrap_or_default();
            async move {
                let name = pack_name(&id);
                let bytes = match repo.backend().get(&name).await {
                    Ok(b) => b,
                    Err(e) => return (vec![format!("pack {id}: failed to read: {}", Chain(&e))], 0),
                };
                let key = Arc::clone(repo.key());
                let r = tokio::task::spawn_blocking(move || verify_pack(&key, id, &bytes, expected)).await;
                progress.packs_done.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok((errs, n, len)) => {
                        progress.bytes_done.fetch_add(len, Ordering::Relaxed);
                        (errs, n)
                    }
                    Err(e) => (vec![format!("pack {id}: verification failed: {e}")], 0),
                }
            }
        })
        .buffer_unordered(threads + 1)
        .collect()
        .await;
    for (errs, n) in results {
        report.packs_read += 1;
        report.blobs_read += n;
        report.errors.extend(errs);
    }
}

/// Verifies every byte of one pack. Returns (errors, blobs verified, bytes).
fn verify_pack(
    key: &crate::crypto::MasterKey,
    id: PackId,
    bytes: &[u8],
    mut expected: Vec<pack::PackEntry>,
) -> (Vec<String>, u64, u64) {
    let mut errors = Vec::new();
    let len = bytes.len() as u64;
    if storage_hash(bytes) != id.0 {
        errors.push(format!(
            "pack {id}: content does not match its name (the stored bytes are damaged)"
        ));
    }
    let header = match pack::read_header(&key.data, bytes, &id.to_hex()) {
        Ok(h) => h,
        Err(e) => {
            errors.push(format!("pack {id}: {e}"));
            return (errors, 0, len);
        }
    };
    let mut ok = 0u64;
    for e in &header {
        let sealed = &bytes[e.offset as usize..(e.offset + e.len) as usize];
        match pack::open_blob(&key.data, e, sealed) {
            Ok(data) if chunk::blob_id(&key.chunk, &data) == e.id => ok += 1,
            Ok(_) => errors.push(format!("pack {id}: blob {} does not hash to its id", e.id)),
            Err(err) => errors.push(format!("pack {id}: {err}")),
        }
    }
    let mut header_sorted = header;
    header_sorted.sort_by_key(|e| e.offset);
    expected.sort_by_key(|e| e.offset);
    for e in &expected {
        if header_sorted
            .binary_search_by_key(&e.offset, |h| h.offset)
            .map(|i| header_sorted[i] != *e)
            .unwrap_or(true)
        {
            errors.push(format!(
                "pack {id}: the index places blob {} where the pack header does not",
                e.id
            ));
        }
    }
    (errors, ok, len)
}
