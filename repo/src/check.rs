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
use crate::pack::{self, pack_name};
use crate::repository::Repository;
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

    // Index files: each must load and match its name.
    let mut index_entries: HashMap<PackId, (u64, usize)> = HashMap::new();
    match repo.load_index_files().await {
        Ok(files) => {
            for (_, f) in files {
                for p in f.packs {
                    index_entries.insert(p.id, (p.size, p.blobs.len()));
                }
            }
        }
        Err(e) => report
            .errors
            .push(format!("failed to read the index: {}", Chain(&e))),
    }

    // Packs in storage against packs in the index.
    let stored: HashMap<String, u64> = repo
        .backend()
        .list_all("data")
        .await?
        .into_iter()
        .map(|l| (format!("data/{}", l.name), l.size))
        .collect();
    report.packs = stored.len();
    for (id, _) in repo.index().packs() {
        let name = pack_name(&id);
        let recorded = index_entries.get(&id).map(|e| e.0);
        match (stored.get(&name), recorded) {
            (None, _) => report.errors.push(format!(
                "pack {id} is named by the index but missing from storage"
            )),
            (Some(size), Some(rec)) if *size != rec => report.errors.push(format!(
                "pack {id} has {size} bytes in storage, the index recorded {rec}"
            )),
            _ => {}
        }
    }
    let indexed: HashSet<String> = repo.index().packs().map(|(id, _)| pack_name(&id)).collect();
    for name in stored.keys() {
        if !indexed.contains(name) {
            report.warnings.push(format!(
                "{name} is in no index (left by an interrupted backup); it is unused and safe to remove"
            ));
        }
    }

    // Snapshots, their trees and chunks.
    let snapshots = match repo.snapshots().await {
        Ok(s) => s,
        Err(e) => {
            report
                .errors
                .push(format!("failed to read the snapshots: {}", Chain(&e)));
            Vec::new()
        }
    };
    report.snapshots = snapshots.len();
    let mut seen_trees: HashSet<BlobId> = HashSet::new();
    let mut seen_missing: HashSet<BlobId> = HashSet::new();
    for s in &snapshots {
        let mut stack = vec![(s.snapshot.tree, String::new())];
        while let Some((tree_id, path)) = stack.pop() {
            if !seen_trees.insert(tree_id) {
                continue;
            }
            let tree = match repo.load_tree(&tree_id).await {
                Ok(t) => t,
                Err(e) => {
                    report.errors.push(format!(
                        "snapshot {}: directory {}: failed to read tree {tree_id}: {e}",
                        s.id.short(),
                        if path.is_empty() { "/" } else { &path }
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
                    if let Extent::Data { id, .. } = e
                        && !repo.index().contains(id)
                        && seen_missing.insert(*id)
                    {
                        report.errors.push(format!(
                            "snapshot {}: file {child}: chunk {id} is not in the index",
                            s.id.short()
                        ));
                    }
                }
            }
        }
    }
    report.trees = seen_trees.len();

    if opts.read_data {
        read_data(repo, opts, &stored, &progress, &mut report).await;
    }
    Ok(report)
}

async fn read_data(
    repo: &Repository,
    opts: &CheckOptions,
    stored: &HashMap<String, u64>,
    progress: &CheckProgress,
    report: &mut CheckReport,
) {
    // Blobs the index places in each pack, to compare with the pack's header.
    let mut by_pack: HashMap<PackId, Vec<pack::PackEntry>> = HashMap::new();
    for loc in repo.index().blobs() {
        by_pack.entry(loc.pack).or_default().push(loc.entry);
    }
    let packs: Vec<PackId> = repo
        .index()
        .packs()
        .map(|(id, _)| id)
        .filter(|id| stored.contains_key(&pack_name(id)))
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
