//! The server's side of the data path. Agents hold no repository key: they
//! send compressed chunks, which are checked here (each must decompress and
//! hash to its id, so no agent can store data under a false id), sealed and
//! packed; trees and chunks go back only within a job the agent runs.

use std::sync::Arc;

use futures::StreamExt;

use crate::error::{CoreError, CoreResult};
use backer_proto::v1 as pb;
use backer_repo::crypto::ChunkKeys;
use backer_repo::error::Chain;
use backer_repo::id::BlobId;
use backer_repo::lock::Lock;
use backer_repo::pack::BlobType;
use backer_repo::packer::Packer;
use backer_repo::snapshot::Snapshot;
use backer_repo::store::{read_by_pack, verify_payload};
use backer_repo::tree::{Extent, Tree};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::jobs::{Active, JobState, Spec};
use crate::server::Shared;

/// Ids per Missing question, and per ReadChunks request.
pub const MAX_IDS: usize = 4096;

/// ReadChunks streams a restore job may have open at once: the agent keeps
/// 4. Each holds a blocking thread until read, and those are shared by
/// every client's uploads and restores.
pub const MAX_READS: usize = 8;

/// A ReadChunks stream's place among its job's [`MAX_READS`], given back
/// when the stream's reading ends.
struct ReadSlot(Arc<Active>);

impl ReadSlot {
    fn take(active: &Arc<Active>) -> CoreResult<ReadSlot> {
        if active.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_READS {
            active.reads.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return Err(CoreError::Refused(format!(
                "job {} already has {MAX_READS} chunk reads open; wait for one to end",
                active.id
            )));
        }
        Ok(ReadSlot(Arc::clone(active)))
    }
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        self.0.reads.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub fn blob_id(b: &[u8]) -> CoreResult<BlobId> {
    BlobId::from_slice(b).ok_or_else(|| CoreError::Invalid("a chunk id is not 32 bytes".into()))
}

pub fn backup_spec(active: &Active) -> CoreResult<&crate::jobs::BackupSpec> {
    match &active.spec {
        Spec::Backup(b) => Ok(b.as_ref()),
        Spec::Restore { .. } => Err(CoreError::Refused(format!("job {} is a restore", active.id))),
    }
}

/// Which of `ids` the repository lacks (by position).
pub fn missing(active: &Active, ids: &[Vec<u8>]) -> CoreResult<Vec<u32>> {
    backup_spec(active)?;
    if ids.len() > MAX_IDS {
        return Err(CoreError::Invalid(format!(
            "ask about at most {MAX_IDS} chunks at once"
        )));
    }
    let index = active.repo.index();
    let mut out = Vec::new();
    for (i, raw) in ids.iter().enumerate() {
        if !index.contains(&blob_id(raw)?) {
            out.push(i as u32);
        }
    }
    Ok(out)
}

/// Checks and packs the chunks of one upload stream; runs on its own thread.
/// Returns the number of blobs stored.
pub fn ingest(active: &Active, mut rx: mpsc::Receiver<pb::UploadBatch>, handle: Handle) -> CoreResult<u64> {
    // The job's repository lock, checked before each index file: one
    // written after a prune that overtook an expired lock would name packs
    // the prune removed.
    let lock = handle.block_on(active.lock.lock()).as_ref().map(Lock::check);
    if lock.is_none() {
        return Err(CoreError::Aborted("the job ended".into()));
    }
    let mut packer = Packer::new(&active.repo, lock, handle);
    let mut stored = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for m in batch.chunks {
            stored += ingest_one(active, &mut packer, m)?;
        }
    }
    packer
        .finish()
        .map_err(CoreError::repo("store the uploaded chunks"))?;
    Ok(stored)
}

/// Checks an uploaded chunk without storing it: a known kind, a 32-byte id,
/// a payload that decompresses to `raw_len` bytes hashing to that id, and
/// for a tree, exactly a tree's encoding. Pure, so the fuzz targets reach it.
pub fn check_upload(keys: &ChunkKeys, m: &pb::UploadChunk) -> CoreResult<(BlobId, BlobType)> {
    let id = blob_id(&m.id)?;
    let kind = match m.kind {
        0 => BlobType::Data,
        1 => BlobType::Tree,
        k => return Err(CoreError::Invalid(format!("unknown blob kind {k}"))),
    };
    let raw = verify_payload(keys, kind, &id, &m.payload, m.raw_len).map_err(CoreError::invalid)?;
    // Exactly as the tree encodes, nothing after: a data chunk whose first
    // byte decodes as an empty tree, stored as one under its id, would have
    // every backup of that data told it is stored and then refused.
    if kind == BlobType::Tree {
        let tree = Tree::from_bytes(&raw, &format!("uploaded tree {id}")).map_err(CoreError::invalid)?;
        if tree.to_bytes().map_err(CoreError::invalid)? != raw {
            return Err(CoreError::Invalid(format!(
                "uploaded tree {id} is not a tree's exact encoding"
            )));
        }
    }
    Ok((id, kind))
}

/// Checks one chunk and packs it unless it is stored already; returns the
/// bytes stored.
fn ingest_one(active: &Active, packer: &mut Packer<'_>, m: pb::UploadChunk) -> CoreResult<u64> {
    let repo = &active.repo;
    let (id, kind) = check_upload(&repo.key().chunk, &m)?;
    if kind == BlobType::Tree {
        active.new_trees.lock().insert(id);
    }
    if repo.index().contains(&id) {
        return Ok(0);
    }
    packer
        .add(kind, id, &m.payload, m.raw_len)
        .map_err(CoreError::repo(format!("store chunk {id}")))?;
    Ok(m.payload.len() as u64)
}

/// A tree the job may read; its subtrees become readable in turn.
pub async fn read_tree(active: &Active, id: BlobId) -> CoreResult<Vec<u8>> {
    if !active.readable_trees.lock().contains(&id) {
        return Err(CoreError::Denied(format!(
            "tree {id} is not part of what job {} may read",
            active.id
        )));
    }
    let tree = active
        .repo
        .load_tree(&id)
        .await
        .map_err(CoreError::repo(format!("read tree {id}")))?;
    active
        .readable_trees
        .lock()
        .extend(tree.nodes.iter().filter_map(|n| n.subtree));
    tree.to_bytes()
        .map_err(CoreError::repo(format!("encode tree {id}")))
}

/// Streams the stored (compressed) payload of each chunk of a restore job.
/// A chunk id can only be known from a tree the job may read or from the
/// data itself, so an agent reads nothing it could not already know.
pub fn read_chunks(
    active: Arc<Active>,
    ids: Vec<Vec<u8>>,
    handle: Handle,
) -> CoreResult<mpsc::Receiver<pb::ChunkData>> {
    if !matches!(active.spec, Spec::Restore { .. }) {
        return Err(CoreError::Refused(format!("job {} is not a restore", active.id)));
    }
    if ids.len() > MAX_IDS {
        return Err(CoreError::Invalid(format!(
            "ask for at most {MAX_IDS} chunks at once"
        )));
    }
    let ids = ids.iter().map(|b| blob_id(b)).collect::<Result<Vec<_>, _>>()?;
    let slot = ReadSlot::take(&active)?;
    let (tx, rx) = mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let repo = &active.repo;
        // An agent gone reads nothing more.
        let gone = CancellationToken::new();
        // Pack by pack, each pack read once for the whole request.
        let lost = read_by_pack(repo, &handle, &ids, &gone, &|loc, sealed| {
            // Trees are read through ReadTree, which checks the job may.
            if loc.entry.kind != BlobType::Data {
                return Err(format!("{} is not a data chunk", loc.entry.id));
            }
            let payload = backer_repo::pack::open_payload(&repo.key().data, &loc.entry, sealed)
                .map_err(|e| e.to_string())?;
            let msg = pb::ChunkData {
                id: bytes::Bytes::copy_from_slice(&loc.entry.id.0),
                payload: payload.into(),
                raw_len: loc.entry.raw_len,
                error: String::new(),
            };
            tx.blocking_send(msg).map_err(|_| {
                gone.cancel();
                "the agent went away".to_string()
            })
        });
        // What could not be read is named, so the agent fails those files only.
        for (id, why) in lost {
            let msg = pb::ChunkData {
                id: bytes::Bytes::copy_from_slice(&id.0),
                error: why,
                ..Default::default()
            };
            if tx.blocking_send(msg).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Ends a backup: checks that every tree it uploaded names only stored
/// blobs and that its root is stored, then writes the snapshot, named
/// after the client whatever the agent says.
pub async fn finish_backup(shared: &Shared, active: &Active, snapshot_json: &str) -> CoreResult<String> {
    let spec = backup_spec(active)?;
    if *active.uploading.lock() {
        return Err(CoreError::Refused("an upload of this job is still open".into()));
    }
    if active.finishing.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(CoreError::Refused("this backup is already being finished".into()));
    }
    let started = std::time::Instant::now();
    let mut snap: Snapshot = serde_json::from_str(snapshot_json)
        .map_err(|e| CoreError::Invalid(format!("the snapshot is not valid: {e}")))?;
    let repo = shared
        .storage
        .refresh()
        .await
        .map_err(CoreError::repo("read the index"))?;
    let mut problems = Vec::new();
    // Stored, and as the kind of blob the tree says: a data chunk named as
    // a tree (or the reverse) is as absent as a missing one.
    let stored_as = |id: &BlobId, kind: BlobType| repo.index().get(id).is_some_and(|l| l.entry.kind == kind);
    if !stored_as(&snap.tree, BlobType::Tree) {
        problems.push(format!("its root tree {} was never uploaded", snap.tree));
    }
    // Checked: every tree this job uploaded, and every tree the snapshot
    // names that came neither from it nor from the parent (whose trees a
    // checked snapshot already names), whole: a tree left by an abandoned
    // job, naming chunks never stored, would otherwise enter a snapshot and
    // make every prune fail.
    let trusted = active.readable_trees.lock().clone();
    let mut seen = std::mem::take(&mut *active.new_trees.lock());
    let mut wave: Vec<BlobId> = seen.iter().copied().collect();
    if problems.is_empty() && !trusted.contains(&snap.tree) && seen.insert(snap.tree) {
        wave.push(snap.tree);
    }
    let mut checked = 0;
    while !wave.is_empty() && problems.len() <= 10 {
        checked += wave.len();
        let mut next = Vec::new();
        // Read back in parallel: thousands of small trees, each a ranged read.
        let mut reads = futures::stream::iter(std::mem::take(&mut wave))
            .map(|t| {
                let repo = &repo;
                async move { (t, repo.load_tree(&t).await) }
            })
            .buffer_unordered(8);
        while let Some((t, tree)) = reads.next().await {
            let tree = tree.map_err(CoreError::repo(format!("read back tree {t}")))?;
            for n in &tree.nodes {
                let missing = n.subtree.filter(|s| !stored_as(s, BlobType::Tree)).or_else(|| {
                    n.content.iter().find_map(|e| match e {
                        Extent::Data { id, .. } if !stored_as(id, BlobType::Data) => Some(*id),
                        _ => None,
                    })
                });
                if let Some(m) = missing {
                    problems.push(format!(
                        "{} names chunk {m}, which was never uploaded",
                        n.name_lossy()
                    ));
                    break;
                }
                if let Some(sub) = n.subtree
                    && !trusted.contains(&sub)
                    && seen.insert(sub)
                {
                    next.push(sub);
                }
            }
            if problems.len() > 10 {
                break;
            }
        }
        wave = next;
    }
    if !problems.is_empty() {
        let msg = format!(
            "the backup is incomplete, no snapshot written: {}",
            problems.join("; ")
        );
        crate::runner::end(shared, &active.id, JobState::Failed, vec![msg.clone()], None).await;
        return Err(CoreError::Refused(msg));
    }
    tracing::info!(job = %active.id, trees = checked, ms = started.elapsed().as_millis() as u64, "backup checked");
    // Kept in the repository, read by every listing: bounded.
    snap.bound_errors();
    snap.hostname = active.client.clone();
    snap.paths = spec.paths.clone();
    snap.excludes = spec.excludes.clone();
    snap.tags = spec.tags.clone();
    snap.parent = spec.parent.map(|(id, _)| id);
    snap.time = chrono::Utc::now();
    // The lock is held (and checked) until the snapshot is written: a job
    // ended meanwhile (its agent gone) has released it, and then no
    // snapshot may appear. The job ends under the same guard: a disconnect
    // ending it too waits for the guard, and finds it ended with its
    // snapshot rather than say none was written.
    let mut held = active.lock.lock().await;
    let Some(lock) = held.as_ref() else {
        return Err(CoreError::Aborted(
            "the job ended before its snapshot could be written".into(),
        ));
    };
    let id = repo.save_snapshot(&snap, lock).await.map_err(|e| match e {
        backer_repo::Error::LockExpired(_) => {
            CoreError::Aborted(format!("the repository lock was lost: {}", Chain(&e)))
        }
        e => CoreError::repo("write the snapshot")(e),
    })?;
    // Under the same lock: a forget checks it is still held.
    let forgotten = match &spec.retention {
        Some(policy) => {
            Some(apply_retention(&repo, lock, &active.client, &spec.paths, &spec.tags, policy).await)
        }
        None => None,
    };
    crate::runner::release_job_lock(&active.id, held.take()).await;
    let state = if snap.partial {
        JobState::Partial
    } else {
        JobState::Succeeded
    };
    shared.jobs.update(&active.id, |r| {
        r.files_done = snap.summary.files;
        r.bytes_done = snap.summary.bytes;
        r.new_bytes = snap.summary.new_bytes;
    });
    let mut messages = snap.errors.clone();
    if let Some(forgotten) = forgotten {
        match forgotten {
            Ok(0) => {}
            Ok(n) => messages.push(format!(
                "retention: forgot {n} older snapshots (`backer prune` frees their data)"
            )),
            Err(e) => messages.push(format!("failed to apply the retention policy: {e}")),
        }
    }
    crate::runner::finish(shared, &active.id, state, messages, Some(id.to_hex()));
    drop(held);
    Ok(id.to_hex())
}

/// Forgets the snapshots of `client`'s series (`paths`, `tags`) that
/// `policy` does not keep, through the repository's forget (which checks
/// `lock` is still held). Their data stays until a prune. Returns how many
/// went.
async fn apply_retention(
    repo: &backer_repo::Repository,
    lock: &Lock,
    client: &str,
    paths: &[String],
    tags: &[String],
    policy: &backer_repo::retention::RetentionPolicy,
) -> Result<usize, backer_repo::Error> {
    use backer_repo::retention::Grouping;
    let series: Vec<_> = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|s| backer_repo::snapshot::in_series(&s.snapshot, client, paths, tags))
        .collect();
    let plan = policy.plan_forget(&series, Grouping::parse("host,paths,tags")?)?;
    repo.forget(&plan.remove, lock).await?;
    for id in &plan.remove {
        tracing::info!(%client, snapshot = %id.short(), "forgotten by retention");
    }
    Ok(plan.remove.len())
}
