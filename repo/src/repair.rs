//! Repair: bring a damaged repository back to one that checks clean,
//! keeping everything that can be kept.
//!
//! - [`repair_index`] rebuilds the index from the packs: index files that
//!   are intact are trusted for packs still stored with the size they
//!   recorded; every other pack is described by its own header (the last
//!   word on what it holds, docs/FORMAT.md). With `read_data` every pack is
//!   read whole and every blob verified; a pack with damaged blobs has its
//!   good ones copied into new packs and then goes. Runs under an exclusive
//!   lock: it replaces index files and may delete packs.
//! - [`repair_snapshots`] removes snapshot files that cannot be read, and
//!   rewrites each snapshot whose trees or chunks are gone: a file missing a
//!   chunk is left out, a directory whose listing is lost becomes empty, and
//!   the new snapshot says so (tag `repaired`, `partial`, its errors) before
//!   the old one is removed.
//!
//! Both write in the engine's order (packs, then the index naming them,
//! then snapshots; deletions last), so a repair that dies half-way leaves a
//! repository no worse than before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;
use tokio::runtime::Handle;

use crate::chunk;
use crate::error::{Chain, Error, Result};
use crate::id::{BlobId, IndexId, PackId, SnapshotId, storage_hash};
use crate::index::{IndexFile, IndexedPack};
use crate::lock::Lock;
use crate::pack::{self, BlobType, PackEntry, pack_name};
use crate::packer::{INDEX_FLUSH_BLOBS, Packer};
use crate::repository::{Dir, Repository, encode};
use crate::text::escape;
use crate::tree::{Extent, Node, NodeKind, Tree};

#[derive(Debug, Clone, Default)]
pub struct RepairIndexOptions {
    /// Read every pack whole and verify every blob, salvaging packs that
    /// hold damaged ones.
    pub read_data: bool,
    pub dry_run: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RepairIndexReport {
    pub dry_run: bool,
    pub packs_stored: usize,
    /// Packs described by an intact index file and kept as it says.
    pub packs_kept: usize,
    /// Packs no intact index file described, added back from their headers.
    pub packs_added: usize,
    /// Packs an index named that are no longer in storage.
    pub packs_missing: usize,
    /// Packs whose header cannot be read: what they held is lost.
    pub packs_unreadable: usize,
    /// Packs with damaged blobs whose good blobs were copied to new packs.
    pub packs_salvaged: usize,
    pub blobs_salvaged: u64,
    /// Blobs that could not be kept (damaged, or in a missing or unreadable pack).
    pub blobs_lost: u64,
    pub index_files_damaged: usize,
    pub index_files_replaced: usize,
    pub index_files_written: usize,
    /// Whether anything needed repairing.
    pub changed: bool,
    /// One line for each thing found, for people.
    pub messages: Vec<String>,
}

/// What one pack holds, as rebuilt.
struct PackPlan {
    pack: IndexedPack,
    /// Blobs to copy out of it before it goes (read_data found damage).
    salvage: Option<Vec<PackEntry>>,
}

pub async fn repair_index(
    repo: &mut Repository,
    lock: &Lock,
    opts: &RepairIndexOptions,
) -> Result<RepairIndexReport> {
    let mut report = RepairIndexReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let (files, damaged) = repo.load_index_files().await?;
    report.index_files_damaged = damaged.len();
    for d in &damaged {
        report
            .messages
            .push(format!("index file {d}: replaced by the rebuilt index"));
    }
    let old_files: Vec<String> = files
        .iter()
        .map(|(id, _)| format!("index/{id}"))
        .chain(damaged.iter().map(|d| d.name.clone()))
        .collect();
    let stored: HashMap<PackId, u64> = repo
        .list(Dir::Data)
        .await?
        .into_iter()
        .filter_map(|l| l.name.parse().ok().map(|id| (id, l.size)))
        .collect();
    report.packs_stored = stored.len();

    // Trust intact index files for packs still stored as they recorded.
    let mut plans: HashMap<PackId, PackPlan> = HashMap::new();
    let mut described: HashSet<PackId> = HashSet::new();
    // Blobs that were in packs now gone or damaged: lost unless another
    // pack that stays holds them too.
    let mut lost_ids: HashSet<BlobId> = HashSet::new();
    // What intact index files said of packs whose header must be read
    // again: where their blobs are, should the header be gone.
    let mut recorded: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
    for (_, f) in files {
        for p in f.packs {
            if !described.insert(p.id) {
                continue;
            }
            match stored.get(&p.id) {
                Some(size) if *size == p.size => {
                    plans.insert(
                        p.id,
                        PackPlan {
                            pack: p,
                            salvage: None,
                        },
                    );
                }
                Some(size) => {
                    report.messages.push(format!(
                        "pack {}: {size} bytes stored, {} recorded; described again from its header",
                        p.id, p.size
                    ));
                    recorded.insert(p.id, p.blobs);
                }
                None => {
                    report.packs_missing += 1;
                    lost_ids.extend(p.blobs.iter().map(|b| b.id));
                    report.messages.push(format!(
                        "pack {} is gone from storage: the {} blobs it held are lost unless another pack \
                         holds them too (`backer repair snapshots` then drops what needed them)",
                        p.id,
                        p.blobs.len()
                    ));
                }
            }
        }
    }
    report.packs_kept = plans.len();

    // Every other stored pack: its header says what it holds.
    let unread: Vec<(PackId, u64)> = stored
        .iter()
        .filter(|(id, _)| !plans.contains_key(id))
        .map(|(id, size)| (*id, *size))
        .collect();
    // Packs that cannot be used (no readable header): no index will name
    // them, and once the index is rebuilt they go, so check is clean after.
    let mut unreadable: Vec<PackId> = Vec::new();
    let this: &Repository = repo;
    let headers: Vec<(PackId, u64, Result<Vec<PackEntry>>)> = futures::stream::iter(unread)
        .map(|(id, size)| async move { (id, size, this.read_pack_header(&id, size).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    for (id, size, header) in headers {
        match header {
            Ok(blobs) => {
                report.packs_added += 1;
                report.messages.push(format!(
                    "pack {id}: in no intact index; added back from its header ({} blobs)",
                    blobs.len()
                ));
                plans.insert(
                    id,
                    PackPlan {
                        pack: IndexedPack { id, size, blobs },
                        salvage: None,
                    },
                );
            }
            Err(e) if e.is_damage() => match recorded.remove(&id) {
                // The index said where its blobs are: keep those still whole.
                Some(known) => {
                    let (within, beyond): (Vec<PackEntry>, Vec<PackEntry>) = known
                        .into_iter()
                        .partition(|e| u64::from(e.offset) + u64::from(e.len) <= size);
                    lost_ids.extend(beyond.iter().map(|b| b.id));
                    report.packs_salvaged += 1;
                    report.blobs_salvaged += within.len() as u64;
                    report.messages.push(format!(
                        "pack {id}: its header cannot be read ({}); the {} blobs the index placed in its \
                         remaining {size} bytes are copied to new packs, {} beyond are lost",
                        Chain(&e),
                        within.len(),
                        beyond.len()
                    ));
                    plans.insert(
                        id,
                        PackPlan {
                            pack: IndexedPack {
                                id,
                                size,
                                blobs: within.clone(),
                            },
                            salvage: Some(within),
                        },
                    );
                }
                None => {
                    report.packs_unreadable += 1;
                    unreadable.push(id);
                    report.messages.push(format!(
                        "pack {id}: its header cannot be read ({}); what it holds cannot be located, and the pack \
                         goes to lost+found/",
                        Chain(&e)
                    ));
                }
            },
            Err(e) => return Err(e),
        }
    }

    if opts.read_data {
        unreadable.extend(verify_packs(repo, &mut plans, &mut report, &mut lost_ids).await?);
    }
    // Nothing at all opens: the key does not belong to these packs (a key
    // file copied in from elsewhere), not a repository damaged throughout.
    if plans.is_empty() && unreadable.len() >= 2 {
        return Err(Error::Invalid(format!(
            "none of the {} packs opens with this repository's key: refusing to rebuild an empty index; \
             is a key file or config from another repository here?",
            unreadable.len()
        )));
    }
    let kept: HashSet<BlobId> = plans
        .values()
        .flat_map(|p| p.salvage.as_ref().unwrap_or(&p.pack.blobs).iter().map(|b| b.id))
        .collect();
    report.blobs_lost = lost_ids.iter().filter(|id| !kept.contains(id)).count() as u64;
    report.changed = !damaged.is_empty()
        || report.packs_missing > 0
        || report.packs_added > 0
        || report.packs_salvaged > 0
        || !unreadable.is_empty()
        || plans.len() != report.packs_kept;
    if opts.dry_run || !report.changed {
        return Ok(report);
    }

    // 1. Good blobs of damaged packs into new packs (indexed by the packer).
    let salvage: Vec<(PackId, Vec<PackEntry>)> = plans
        .values()
        .filter_map(|p| p.salvage.clone().map(|s| (p.pack.id, s)))
        .collect();
    if !salvage.is_empty() {
        let handle = Handle::current();
        let repo_ref: &Repository = repo;
        let (files, copied, lost) = tokio::task::block_in_place(|| -> Result<(usize, u64, u64)> {
            let mut packer = Packer::new(repo_ref, Some(lock.check()), handle.clone());
            let (mut copied, mut lost) = (0, 0);
            for (id, entries) in &salvage {
                let name = pack_name(id);
                for e in entries {
                    // Each blob is authenticated as it is copied: one that
                    // fails stays behind, counted lost.
                    let sealed = match repo_ref.backend().read_range_blocking(
                        &handle,
                        &name,
                        u64::from(e.offset)..u64::from(e.offset) + u64::from(e.len),
                    ) {
                        Ok(b) => b,
                        Err(err) if err.is_damage() => {
                            lost += 1;
                            continue;
                        }
                        Err(err) => return Err(err),
                    };
                    match pack::open_payload(&repo_ref.key().data, e, &sealed) {
                        Ok(payload) => {
                            packer.add(e.kind, e.id, &payload, e.raw_len)?;
                            copied += 1;
                        }
                        Err(err) if err.is_damage() => lost += 1,
                        Err(err) => return Err(err),
                    }
                }
            }
            Ok((packer.finish()?.index_files, copied, lost))
        })?;
        report.index_files_written += files;
        report.blobs_salvaged = copied;
        report.blobs_lost += lost;
    }
    let doomed: Vec<String> = salvage.iter().map(|(id, _)| pack_name(id)).collect();

    // 2. The rebuilt index for every pack that stays; the last file
    //    declares the old ones redundant. 3. Then the old files go.
    let keep: Vec<IndexedPack> = plans
        .into_values()
        .filter(|p| p.salvage.is_none())
        .map(|p| p.pack)
        .collect();
    let old_ids: Vec<IndexId> = old_files
        .iter()
        .filter_map(|n| n.trim_start_matches("index/").parse().ok())
        .collect();
    let batches = batch_packs(keep);
    let n = batches.len();
    for (i, packs) in batches.into_iter().enumerate() {
        let supersedes = if i + 1 == n { old_ids.clone() } else { Vec::new() };
        repo.write_index(&IndexFile { supersedes, packs }, Some(&lock.check()))
            .await?;
        report.index_files_written += 1;
    }
    lock.check_fresh().await?;
    for name in &old_files {
        repo.backend().delete(name).await?;
    }
    report.index_files_replaced = old_files.len();
    // 4. Packs whose good blobs moved: no index names them any more.
    //    Packs nothing can be read from go aside to `lost+found/`, where no
    //    command looks, instead of away: what they hold may yet be saved.
    lock.check_fresh().await?;
    for name in &doomed {
        repo.backend().delete(name).await?;
    }
    for id in &unreadable {
        move_aside(repo, id).await?;
    }
    repo.reload_index().await?;
    Ok(report)
}

/// Where packs that cannot be read are kept: a folder no listing of the
/// engine reads, so check is clean and prune never touches them.
pub const LOST_AND_FOUND: &str = "lost+found";

/// Copies the pack to `lost+found/` (read back to be sure), then removes it.
async fn move_aside(repo: &Repository, id: &PackId) -> Result<()> {
    let from = pack_name(id);
    let to = format!("{LOST_AND_FOUND}/{id}");
    let bytes = repo.backend().get(&from).await?;
    match repo.backend().put_new(&to, bytes.clone()).await {
        Ok(()) | Err(Error::AlreadyExists(_)) => {}
        Err(e) => return Err(e),
    }
    if repo.backend().get(&to).await? != bytes {
        return Err(Error::Invalid(format!(
            "{to} exists and differs from {from}; both are left as they are"
        )));
    }
    repo.backend().delete(&from).await
}

/// Index files of at most [`INDEX_FLUSH_BLOBS`] blobs each (one, at least).
fn batch_packs(packs: Vec<IndexedPack>) -> Vec<Vec<IndexedPack>> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut blobs = 0;
    for p in packs {
        blobs += p.blobs.len();
        batch.push(p);
        if blobs >= INDEX_FLUSH_BLOBS {
            out.push(std::mem::take(&mut batch));
            blobs = 0;
        }
    }
    if !batch.is_empty() || out.is_empty() {
        out.push(batch);
    }
    out
}

/// Reads every planned pack whole; a pack whose header or blobs fail is
/// described by its header and marked for salvage of its good blobs.
async fn verify_packs(
    repo: &Repository,
    plans: &mut HashMap<PackId, PackPlan>,
    report: &mut RepairIndexReport,
    lost_ids: &mut HashSet<BlobId>,
) -> Result<Vec<PackId>> {
    let mut unreadable = Vec::new();
    let ids: Vec<PackId> = plans.keys().copied().collect();
    let known: HashMap<PackId, Vec<PackEntry>> =
        plans.iter().map(|(id, p)| (*id, p.pack.blobs.clone())).collect();
    let known = &known;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let results: Vec<(PackId, Result<PackVerdict>)> = futures::stream::iter(ids)
        .map(|id| async move {
            let bytes = match repo.backend().get(&pack_name(&id)).await {
                Ok(b) => b,
                Err(e) => return (id, Err(e)),
            };
            let key = Arc::clone(repo.key());
            let known = known.get(&id).cloned().unwrap_or_default();
            let verdict = tokio::task::spawn_blocking(move || verify_pack(&key, id, &bytes, known))
                .await
                .map_err(|e| Error::Interrupted(format!("verification failed: {e}")));
            (id, verdict)
        })
        .buffer_unordered(threads + 1)
        .collect()
        .await;
    for (id, verdict) in results {
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) if e.is_damage() => PackVerdict::Unreadable(Chain(&e).to_string()),
            Err(e) => return Err(e),
        };
        match verdict {
            PackVerdict::Sound(header) => {
                if let Some(plan) = plans.get_mut(&id) {
                    // The header is the last word on what the pack holds.
                    plan.pack.blobs = header;
                }
            }
            PackVerdict::Damaged { good, bad } => {
                report.packs_salvaged += 1;
                report.blobs_salvaged += good.len() as u64;
                lost_ids.extend(bad.iter().copied());
                report.messages.push(format!(
                    "pack {id}: {} damaged blobs{}; its {} good blobs are copied to new packs and it is removed",
                    bad.len(),
                    if bad.is_empty() {
                        " (its header or the bytes between blobs are damaged)".to_string()
                    } else {
                        format!(" ({})", bad.iter().take(3).map(|b| b.to_string()).collect::<Vec<_>>().join(", "))
                    },
                    good.len()
                ));
                if let Some(plan) = plans.get_mut(&id) {
                    plan.salvage = Some(good);
                }
            }
            PackVerdict::Unreadable(why) => {
                report.packs_unreadable += 1;
                unreadable.push(id);
                if let Some(plan) = plans.remove(&id) {
                    lost_ids.extend(plan.pack.blobs.iter().map(|b| b.id));
                }
                report.messages.push(format!(
                    "pack {id}: its header cannot be read ({why}); what it holds cannot be located, and the pack \
                     goes to lost+found/"
                ));
            }
        }
    }
    Ok(unreadable)
}

enum PackVerdict {
    Sound(Vec<PackEntry>),
    Damaged { good: Vec<PackEntry>, bad: Vec<BlobId> },
    Unreadable(String),
}

/// Verifies every byte of a pack. A pack whose header cannot be read is
/// verified blob by blob where the index placed them (`known`), so what
/// the index still locates can be salvaged.
fn verify_pack(
    key: &crate::crypto::MasterKey,
    id: PackId,
    bytes: &[u8],
    known: Vec<PackEntry>,
) -> PackVerdict {
    let (header, header_ok) = match pack::read_header(&key.data, bytes, &id.to_hex()) {
        Ok(h) => (h, true),
        Err(_) if !known.is_empty() => (known, false),
        Err(e) => return PackVerdict::Unreadable(Chain(&e).to_string()),
    };
    let whole = header_ok && storage_hash(bytes) == id.0;
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for e in &header {
        let Some(sealed) = bytes.get(e.offset as usize..(e.offset as usize + e.len as usize)) else {
            bad.push(e.id);
            continue;
        };
        match pack::open_blob(&key.data, e, sealed) {
            Ok(data) if chunk::blob_id(&key.chunk, &data) == e.id => good.push(*e),
            _ => bad.push(e.id),
        }
    }
    if bad.is_empty() && whole {
        PackVerdict::Sound(header)
    } else {
        // A pack whose bytes do not match its name but whose blobs all
        // verify (damage between them) is rewritten too, so check is clean.
        PackVerdict::Damaged { good, bad }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RepairSnapshotsOptions {
    pub dry_run: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RepairSnapshotsReport {
    pub dry_run: bool,
    pub snapshots: usize,
    /// Snapshot files that could not be read, removed.
    pub removed: Vec<String>,
    /// Snapshots rewritten: (old id, new id, what was left out).
    pub rewritten: Vec<RewrittenSnapshot>,
    pub intact: usize,
}

#[derive(Debug, Serialize)]
pub struct RewrittenSnapshot {
    pub old: SnapshotId,
    /// `None` in a dry run.
    pub new: Option<SnapshotId>,
    /// Each entry left out or emptied, and why.
    pub dropped: Vec<String>,
}

/// The first error line of a repaired snapshot, before the original's id.
const REPAIRED_FROM: &str = "repaired from snapshot ";

/// What rewriting snapshots shares: trees already rewritten (by old id),
/// the new trees to store, and which packs are still stored.
struct Rewriter<'r> {
    repo: &'r Repository,
    stored: HashSet<PackId>,
    memo: HashMap<BlobId, BlobId>,
    /// What each rewritten tree (by old id) lost, for every snapshot holding it.
    losses: HashMap<BlobId, Losses>,
    new_trees: Vec<(BlobId, Vec<u8>)>,
    empty_id: BlobId,
    used_empty: bool,
}

impl Rewriter<'_> {
    /// Whether the blob can be read: indexed, in a pack that is stored.
    fn present(&self, id: &BlobId) -> bool {
        self.repo
            .index()
            .get(id)
            .is_some_and(|l| self.stored.contains(&l.pack))
    }
}

pub async fn repair_snapshots(
    repo: &mut Repository,
    lock: &Lock,
    opts: &RepairSnapshotsOptions,
) -> Result<RepairSnapshotsReport> {
    let mut report = RepairSnapshotsReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    repo.reload_index().await?;
    if !repo.index_damage().is_empty() {
        return Err(Error::NeedsRepair(format!(
            "damaged index files: {}; run `backer repair index` first, or this would drop data \
             that is only unindexed",
            repo.index_damage()
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // Packs the index names that are gone may have copies elsewhere that
    // only a rebuilt index finds: dropping files for them now would lose
    // data that is still there.
    repo.refuse_missing_packs().await?;
    let listed = repo.load_snapshots().await?;
    report.snapshots = listed.snapshots.len() + listed.damaged.len();
    let empty = encode(&Tree::default())?;
    let mut rw = Rewriter {
        repo,
        stored: repo
            .list(Dir::Data)
            .await?
            .into_iter()
            .filter_map(|l| l.name.parse().ok())
            .collect(),
        memo: HashMap::new(),
        losses: HashMap::new(),
        new_trees: Vec::new(),
        empty_id: chunk::blob_id(&repo.key().chunk, &empty),
        used_empty: false,
    };
    let mut plans = Vec::new();
    // A snapshot repaired by a run that died before removing its original
    // is not repaired twice: the original just goes.
    let done: HashSet<String> = listed
        .snapshots
        .iter()
        .flat_map(|s| s.snapshot.errors.iter())
        .filter_map(|e| e.strip_prefix(REPAIRED_FROM).map(str::to_string))
        .collect();
    for s in &listed.snapshots {
        let (root, lost) = rewrite_tree(&mut rw, s.snapshot.tree).await?;
        if root == s.snapshot.tree {
            report.intact += 1;
            continue;
        }
        let mut snap = s.snapshot.clone();
        snap.summary.files = snap.summary.files.saturating_sub(lost.files);
        snap.summary.bytes = snap.summary.bytes.saturating_sub(lost.bytes);
        let already = done.contains(&s.id.to_hex());
        plans.push((s.id, snap, root, lost.into_lines(), already));
    }
    if opts.dry_run {
        report.removed = listed.damaged.iter().map(|d| d.to_string()).collect();
        report.rewritten = plans
            .into_iter()
            .map(|(old, _, _, dropped, _)| RewrittenSnapshot {
                old,
                new: None,
                dropped,
            })
            .collect();
        return Ok(report);
    }

    // Trees first (packs, then their index), then the new snapshots, then
    // the old ones go.
    let Rewriter {
        new_trees,
        empty_id,
        used_empty,
        ..
    } = rw;
    if !new_trees.is_empty() || used_empty {
        let handle = Handle::current();
        let repo_ref: &Repository = repo;
        tokio::task::block_in_place(|| -> Result<()> {
            let mut compressor = chunk::Compressor::new(repo_ref.config().zstd_level)?;
            let mut packer = Packer::new(repo_ref, Some(lock.check()), handle.clone());
            let mut written = HashSet::new();
            let empty_tree = used_empty.then(|| (empty_id, empty.clone()));
            for (id, bytes) in new_trees.iter().chain(empty_tree.as_ref()) {
                if repo_ref.index().contains(id) || !written.insert(*id) {
                    continue;
                }
                packer.add(
                    BlobType::Tree,
                    *id,
                    &compressor.compress(bytes),
                    bytes.len() as u32,
                )?;
            }
            packer.finish()?;
            Ok(())
        })?;
    }
    for (old, mut snap, root, dropped, already) in plans {
        if already {
            lock.check_fresh().await?;
            repo.backend().delete(&format!("snapshots/{old}")).await?;
            report.rewritten.push(RewrittenSnapshot {
                old,
                new: None,
                dropped,
            });
            continue;
        }
        snap.tree = root;
        snap.partial = true;
        snap.summary.errors += dropped.len() as u64;
        // Where it came from first: a rerun knows it was done.
        snap.errors.insert(0, format!("{REPAIRED_FROM}{old}"));
        snap.errors
            .extend(dropped.iter().take(20).map(|d| format!("repaired: {d}")));
        if !snap.tags.iter().any(|t| t == "repaired") {
            snap.tags.push("repaired".into());
        }
        let new = repo.save_snapshot(&snap, lock).await?;
        repo.backend().delete(&format!("snapshots/{old}")).await?;
        report.rewritten.push(RewrittenSnapshot {
            old,
            new: Some(new),
            dropped,
        });
    }
    for d in &listed.damaged {
        lock.check_fresh().await?;
        repo.backend().delete(&d.name).await?;
        report.removed.push(d.to_string());
    }
    repo.reload_index().await?;
    Ok(report)
}

/// What a rewrite left out below one directory: a line for each loss (the
/// first [`LOSS_LINES`]), and how many files and bytes went.
#[derive(Debug, Clone, Default)]
struct Losses {
    lines: Vec<String>,
    more: u64,
    files: u64,
    bytes: u64,
}

const LOSS_LINES: usize = 100;

impl Losses {
    fn line(&mut self, l: String) {
        if self.lines.len() < LOSS_LINES {
            self.lines.push(l);
        } else {
            self.more += 1;
        }
    }

    fn merge(&mut self, other: &Losses) {
        for l in &other.lines {
            self.line(l.clone());
        }
        self.more += other.more;
        self.files += other.files;
        self.bytes += other.bytes;
    }

    fn into_lines(mut self) -> Vec<String> {
        if self.more > 0 {
            self.lines.push(format!("… and {} more", self.more));
        }
        self.lines
    }
}

/// One directory being rewritten: its old id, where it is, its entries as
/// kept so far, and the next entry to look at.
struct Frame {
    old: BlobId,
    path: String,
    nodes: std::vec::IntoIter<Node>,
    kept: Vec<Node>,
    changed: bool,
    /// The entry waiting for its subtree's rewrite.
    waiting: Option<Node>,
    lost: Losses,
}

/// Rewrites the tree `root` without what is gone, depth first with an
/// explicit stack (trees may be thousands of levels deep). Trees met before
/// (in this or another snapshot) are not read again, and what they lost is
/// counted again for each snapshot that holds them. Returns the new id (the
/// old one when nothing changed) and what was lost.
async fn rewrite_tree(rw: &mut Rewriter<'_>, root: BlobId) -> Result<(BlobId, Losses)> {
    if let Some(id) = rw.memo.get(&root) {
        return Ok((*id, rw.losses.get(&root).cloned().unwrap_or_default()));
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut lost_root = Losses::default();
    match open_frame(rw, root, String::new(), &mut lost_root).await? {
        Some(f) => stack.push(f),
        None => return Ok((rw.empty_id, lost_root)),
    }
    loop {
        let Some(top) = stack.last_mut() else {
            return Err(Error::Interrupted("tree rewrite lost its place".into()));
        };
        let Some(mut node) = top.nodes.next() else {
            // This directory is done.
            let Some(frame) = stack.pop() else { continue };
            let id = if frame.changed {
                let bytes = encode(&Tree { nodes: frame.kept })?;
                let id = chunk::blob_id(&rw.repo.key().chunk, &bytes);
                rw.new_trees.push((id, bytes));
                rw.losses.insert(frame.old, frame.lost.clone());
                id
            } else {
                frame.old
            };
            rw.memo.insert(frame.old, id);
            match stack.last_mut() {
                Some(parent) => {
                    parent.lost.merge(&frame.lost);
                    if let Some(mut n) = parent.waiting.take() {
                        parent.changed |= Some(id) != n.subtree;
                        n.subtree = Some(id);
                        parent.kept.push(n);
                    }
                }
                None => return Ok((id, frame.lost)),
            }
            continue;
        };
        let path = format!("{}/{}", top.path, node.name_lossy());
        if let Some(sub) = node.subtree {
            if let Some(id) = rw.memo.get(&sub).copied() {
                top.changed |= id != sub;
                if let Some(l) = rw.losses.get(&sub) {
                    top.lost.merge(l);
                }
                node.subtree = Some(id);
                top.kept.push(node);
                continue;
            }
            top.waiting = Some(node);
            let mut lost = Losses::default();
            match open_frame(rw, sub, path, &mut lost).await? {
                Some(f) => stack.push(f),
                None => {
                    let empty = rw.empty_id;
                    rw.memo.insert(sub, empty);
                    rw.losses.insert(sub, lost.clone());
                    if let Some(top) = stack.last_mut()
                        && let Some(mut n) = top.waiting.take()
                    {
                        top.lost.merge(&lost);
                        n.subtree = Some(empty);
                        top.changed = true;
                        top.kept.push(n);
                    }
                }
            }
            continue;
        }
        if node.kind == NodeKind::File {
            let missing = node.content.iter().find_map(|e| match e {
                Extent::Data { id, .. } if !rw.present(id) => Some(*id),
                _ => None,
            });
            if let Some(id) = missing {
                top.lost
                    .line(format!("file {} left out: its chunk {id} is gone", escape(&path)));
                top.lost.files += 1;
                top.lost.bytes += node.size;
                top.changed = true;
                continue;
            }
        }
        top.kept.push(node);
    }
}

/// Reads a directory's tree; `None` (and a note in `lost`) when it is gone.
async fn open_frame(
    rw: &mut Rewriter<'_>,
    id: BlobId,
    path: String,
    lost: &mut Losses,
) -> Result<Option<Frame>> {
    let shown = if path.is_empty() {
        "/".to_string()
    } else {
        path.clone()
    };
    let mut gone = |why: String| {
        lost.line(format!(
            "directory {} emptied: its listing (tree {id}) is lost: {why}",
            escape(&shown)
        ));
    };
    if !rw.present(&id) {
        gone("it is in no index or its pack is gone".into());
        rw.used_empty = true;
        return Ok(None);
    }
    match rw.repo.load_tree(&id).await {
        Ok(tree) => Ok(Some(Frame {
            old: id,
            path,
            nodes: tree.nodes.into_iter(),
            kept: Vec::new(),
            changed: false,
            waiting: None,
            lost: Losses::default(),
        })),
        Err(e) if e.is_damage() || matches!(e, Error::NotFound(_)) => {
            gone(Chain(&e).to_string());
            rw.used_empty = true;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
