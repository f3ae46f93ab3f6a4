//! Prune: remove data no snapshot uses, and repack mostly-empty packs.
//!
//! Runs under an exclusive lock (see [`crate::lock`]), so no backup runs
//! meanwhile, and writes in the order that keeps every reader safe:
//!
//! 1. find what the snapshots use, by reading every tree (any failure aborts:
//!    nothing is deleted on incomplete knowledge);
//! 2. copy the used blobs of packs chosen for repacking into new packs, and
//!    write index files for them;
//! 3. write index files for the packs that stay, then delete the old index
//!    files: from here on no index names a pack that is about to go;
//! 4. delete unused, repacked and orphaned packs (orphans: packs in no index,
//!    left by backups that died before writing their index).
//!
//! A crash between steps leaves duplicates in the index or unreferenced packs,
//! both harmless; the next prune cleans them up.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::id::{BlobId, IndexId, PackId};
use crate::index::{IndexFile, IndexedPack};
use crate::lock::Lock;
use crate::pack::{self, PackEntry, pack_name};
use crate::packer::{INDEX_FLUSH_BLOBS, Packer};
use crate::repository::{Dir, Repository};

#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Unused bytes allowed to stay in partly used packs, as a fraction of
    /// the used bytes: more means less repacking (faster), less means a smaller
    /// repository.
    pub max_unused: f64,
    pub dry_run: bool,
}

/// Repacking is cheap here (only used blobs are read, payloads move without
/// decompression), so the default keeps repositories tight.
pub const DEFAULT_MAX_UNUSED: f64 = 0.02;

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: DEFAULT_MAX_UNUSED,
            dry_run: false,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub packs_before: usize,
    pub packs_deleted: usize,
    pub packs_repacked: usize,
    pub orphan_packs: usize,
    pub packs_written: usize,
    pub blobs_used: usize,
    pub blobs_removed: usize,
    pub bytes_before: u64,
    pub bytes_freed: u64,
    pub bytes_repacked: u64,
    pub unused_bytes_kept: u64,
    pub index_files_replaced: usize,
    /// Staging files left by writers that died (a local directory's).
    pub staging_files: usize,
    pub staging_bytes: u64,
}

struct PackStat {
    pack: IndexedPack,
    used: Vec<PackEntry>,
    used_bytes: u64,
    unused_bytes: u64,
}

pub async fn prune(repo: &mut Repository, lock: &Lock, opts: &PruneOptions) -> Result<PruneReport> {
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // The index as it is now that we hold the lock: one read before may
    // predate another prune, or miss a backup that finished meanwhile.
    repo.reload_index().await?;
    // Deleting on incomplete knowledge loses data: a damaged index file
    // hides which packs hold what, a damaged snapshot hides what it uses.
    if !repo.index_damage().is_empty() {
        return Err(Error::NeedsRepair(format!(
            "damaged index files: {}; run `backer repair index` first",
            names(repo.index_damage())
        )));
    }
    // A pack the index names but storage lacks: the index may place a blob
    // there that another pack still holds, and that copy would then count
    // as unused. Nothing is deleted until the index is rebuilt.
    repo.refuse_missing_packs().await?;
    let listed = repo.load_snapshots().await?;
    if !listed.damaged.is_empty() {
        return Err(Error::NeedsRepair(format!(
            "damaged snapshot files: {}; run `backer repair snapshots` first (it removes them), \
             or put back a good copy",
            names(&listed.damaged)
        )));
    }
    let snapshots = listed.snapshots;

    // 1. What is used.
    report.snapshots = snapshots.len();
    let (trees, data) = repo
        .reachable_blobs(snapshots.iter().map(|s| s.snapshot.tree))
        .await?;
    let used: HashSet<BlobId> = trees.union(&data).copied().collect();
    for id in &used {
        if !repo.index().contains(id) {
            return Err(Error::corrupt(format!(
                "blob {id} is used by a snapshot but in no index; run `backer check`, and \
                 `backer repair index` if it finds packs that no index names"
            )));
        }
    }
    report.blobs_used = used.len();

    // Packs as the index files describe them, first description wins.
    let (index_files, damaged) = repo.load_index_files().await?;
    if !damaged.is_empty() {
        return Err(Error::NeedsRepair(format!(
            "damaged index files: {}; run `backer repair index` first",
            names(&damaged)
        )));
    }
    let old_index_ids: Vec<IndexId> = index_files.iter().map(|(id, _)| *id).collect();
    let mut stats: HashMap<PackId, PackStat> = HashMap::new();
    for (_, file) in index_files {
        for p in file.packs {
            if stats.contains_key(&p.id) {
                continue;
            }
            let mut st = PackStat {
                used: Vec::new(),
                used_bytes: 0,
                unused_bytes: 0,
                pack: p,
            };
            for e in &st.pack.blobs {
                // A blob counts once: where the index finds it.
                let canonical = repo.index().get(&e.id).map(|l| l.pack) == Some(st.pack.id);
                if canonical && used.contains(&e.id) {
                    st.used.push(*e);
                    st.used_bytes += u64::from(e.len);
                } else {
                    st.unused_bytes += u64::from(e.len);
                    report.blobs_removed += 1;
                }
            }
            stats.insert(st.pack.id, st);
        }
    }
    let stored = repo.list(Dir::Data).await?;
    report.packs_before = stored.len();
    report.bytes_before = stored.iter().map(|l| l.size).sum();
    let orphans: Vec<(String, u64)> = stored
        .iter()
        .filter_map(|l| l.name.parse::<PackId>().ok().map(|id| (id, l.size)))
        .filter(|(id, _)| !stats.contains_key(id))
        .map(|(id, size)| (pack_name(&id), size))
        .collect();
    report.orphan_packs = orphans.len();
    // Under the exclusive lock no writer runs: every staging file is one a
    // killed backup left (a pack being written goes to one as it fills).
    (report.staging_files, report.staging_bytes) = repo.backend().stale_staging(!opts.dry_run).await?;

    // 2. Decide: drop empty packs, repack the emptiest partly used ones until
    // what stays unused is within the allowance.
    let total_used: u64 = stats.values().map(|s| s.used_bytes).sum();
    let allowance = (total_used as f64 * opts.max_unused.max(0.0)) as u64;
    let mut delete: Vec<PackId> = Vec::new();
    let mut partial: Vec<&PackStat> = Vec::new();
    for s in stats.values() {
        if s.used.is_empty() {
            delete.push(s.pack.id);
        } else if s.unused_bytes > 0 {
            partial.push(s);
        }
    }
    partial.sort_by(|a, b| {
        let ra = a.unused_bytes as f64 / (a.used_bytes + a.unused_bytes) as f64;
        let rb = b.unused_bytes as f64 / (b.used_bytes + b.unused_bytes) as f64;
        rb.total_cmp(&ra).then(a.pack.id.cmp(&b.pack.id))
    });
    let mut unused_left: u64 = partial.iter().map(|s| s.unused_bytes).sum();
    let mut repack: Vec<PackId> = Vec::new();
    for s in &partial {
        if unused_left <= allowance {
            break;
        }
        repack.push(s.pack.id);
        unused_left -= s.unused_bytes;
        report.bytes_repacked += s.used_bytes;
    }
    report.unused_bytes_kept = unused_left;
    report.packs_deleted = delete.len();
    report.packs_repacked = repack.len();
    let size_of = |id: &PackId| stats.get(id).map(|s| s.pack.size).unwrap_or(0);
    report.bytes_freed =
        delete.iter().chain(&repack).map(size_of).sum::<u64>() + orphans.iter().map(|(_, s)| *s).sum::<u64>();
    if opts.dry_run
        || (delete.is_empty() && repack.is_empty() && orphans.is_empty() && old_index_ids.len() <= 1)
    {
        return Ok(report);
    }

    // 3. Repack: used blobs move to new packs, each indexed once stored.
    let gone: HashSet<PackId> = delete.iter().chain(&repack).copied().collect();
    let handle = Handle::current();
    let written = {
        let repo_ref: &Repository = repo;
        let to_repack: Vec<&PackStat> = repack.iter().filter_map(|id| stats.get(id)).collect();
        tokio::task::block_in_place(|| -> Result<usize> {
            let mut packer = Packer::new(repo_ref, Some(lock.check()), handle.clone());
            for st in to_repack {
                // Read only the used blobs, adjacent ones together: a mostly
                // empty pack costs what it still holds, not its size.
                let mut used = st.used.clone();
                used.sort_by_key(|e| e.offset);
                let name = pack_name(&st.pack.id);
                let mut i = 0;
                while i < used.len() {
                    let mut j = i + 1;
                    while j < used.len() && used[j].offset == used[j - 1].offset + used[j - 1].len {
                        j += 1;
                    }
                    let start = u64::from(used[i].offset);
                    let end = u64::from(used[j - 1].offset) + u64::from(used[j - 1].len);
                    let bytes = repo_ref
                        .backend()
                        .read_range_blocking(&handle, &name, start..end)?;
                    for e in &used[i..j] {
                        let at = (u64::from(e.offset) - start) as usize;
                        let sealed = bytes.get(at..at + e.len as usize).ok_or_else(|| {
                            Error::corrupt(format!("pack {} is shorter than its index", st.pack.id))
                        })?;
                        let payload = pack::open_payload(&repo_ref.key().data, e, sealed)?;
                        packer.add(e.kind, e.id, &payload, e.raw_len)?;
                    }
                    i = j;
                }
            }
            let summary = packer.finish()?;
            Ok(summary.index_files)
        })?
    };
    report.packs_written = written;

    // 4. New index files for every pack that stays, then the old ones go.
    let keep: Vec<IndexedPack> = stats
        .values()
        .filter(|s| !gone.contains(&s.pack.id))
        .map(|s| s.pack.clone())
        .collect();
    let mut batch = Vec::new();
    let mut blobs_in_batch = 0;
    let mut new_files = Vec::new();
    for p in keep {
        blobs_in_batch += p.blobs.len();
        batch.push(p);
        if blobs_in_batch >= INDEX_FLUSH_BLOBS {
            new_files.push(std::mem::take(&mut batch));
            blobs_in_batch = 0;
        }
    }
    if !batch.is_empty() {
        new_files.push(batch);
    }
    let n_new = new_files.len();
    for (i, packs) in new_files.into_iter().enumerate() {
        let file = IndexFile {
            // The last file written declares the old ones redundant.
            supersedes: if i + 1 == n_new {
                old_index_ids.clone()
            } else {
                vec![]
            },
            packs,
        };
        repo.write_index(&file, Some(&lock.check())).await?;
    }
    lock.check_fresh().await?;
    delete_all(
        repo,
        old_index_ids.iter().map(|id| format!("index/{id}")).collect(),
    )
    .await?;
    report.index_files_replaced = old_index_ids.len();

    // 5. Only now may packs go.
    lock.check_fresh().await?;
    let mut doomed: Vec<String> = gone.iter().map(pack_name).collect();
    doomed.extend(orphans.into_iter().map(|(n, _)| n));
    delete_all(repo, doomed).await?;
    repo.reload_index().await?;
    Ok(report)
}

/// The damaged objects and why, for a message.
fn names(damaged: &[crate::repository::Damaged]) -> String {
    damaged
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

async fn delete_all(repo: &Repository, names: Vec<String>) -> Result<()> {
    futures::stream::iter(names)
        .map(|n| async move { repo.backend().delete(&n).await })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
