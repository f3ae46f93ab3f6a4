//! The storing side of a backup: seals blobs into packs, uploads finished
//! packs while the next ones fill, and writes an index file for them once
//! they are stored (every [`INDEX_FLUSH_BLOBS`] blobs and at the end), so
//! memory does not grow with the size of the backup. Runs on one thread;
//! uploads run on the async runtime, at most [`MAX_UPLOADS`] at a time.

use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::index::{IndexFile, IndexedPack};
use crate::lock::LockCheck;
use crate::pack::{BlobType, PACK_TARGET, PackBody, PackWriter, pack_name};
use crate::repository::Repository;

pub const MAX_UPLOADS: usize = 2;

/// An index file is written once this many blobs sit in stored packs.
pub const INDEX_FLUSH_BLOBS: usize = 50_000;

pub struct Packer<'r> {
    repo: &'r Repository,
    /// Checked before each index file: a holder whose lock expired stops.
    lock: Option<LockCheck>,
    key: Arc<crate::crypto::MasterKey>,
    backend: Backend,
    handle: Handle,
    data: PackWriter,
    tree: PackWriter,
    permits: Arc<Semaphore>,
    uploads: Vec<JoinHandle<Result<()>>>,
    packed: Vec<IndexedPack>,
    packed_blobs: usize,
    stored_bytes: u64,
    index_files: usize,
}

impl std::fmt::Debug for Packer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("packs", &self.packed.len())
            .finish()
    }
}

impl<'r> Packer<'r> {
    pub fn new(repo: &'r Repository, lock: Option<LockCheck>, handle: Handle) -> Self {
        Packer {
            repo,
            lock,
            key: Arc::clone(repo.key()),
            backend: repo.backend().clone(),
            data: new_writer(repo, &handle),
            tree: new_writer(repo, &handle),
            handle,
            permits: Arc::new(Semaphore::new(MAX_UPLOADS)),
            uploads: Vec::new(),
            packed: Vec::new(),
            packed_blobs: 0,
            stored_bytes: 0,
            index_files: 0,
        }
    }

    fn data_key(&self) -> &DataKey {
        &self.key.data
    }

    /// Adds one blob. `payload` is the flag byte and the (compressed) chunk.
    pub fn add(&mut self, kind: BlobType, id: BlobId, payload: &[u8], raw_len: u32) -> Result<()> {
        let key = Arc::clone(&self.key);
        let writer = match kind {
            BlobType::Data => &mut self.data,
            BlobType::Tree => &mut self.tree,
        };
        writer.add(&key.data, kind, id, payload, raw_len);
        if writer.len() >= PACK_TARGET {
            self.flush(kind)?;
        }
        Ok(())
    }

    fn flush(&mut self, kind: BlobType) -> Result<()> {
        let slot = match kind {
            BlobType::Data => &mut self.data,
            BlobType::Tree => &mut self.tree,
        };
        if slot.is_empty() {
            return Ok(());
        }
        let writer = std::mem::replace(slot, new_writer(self.repo, &self.handle));
        let pack = writer.finish(self.data_key())?;
        self.stored_bytes += pack.size;
        self.packed_blobs += pack.entries.len();
        self.packed.push(IndexedPack {
            id: pack.id,
            size: pack.size,
            blobs: pack.entries,
        });
        // Fail fast if an earlier upload already failed.
        self.reap(false)?;
        let name = pack_name(&pack.id);
        match pack.body {
            PackBody::Memory(bytes) => self.upload(kind, name, bytes)?,
            PackBody::Spooled(written) => self.await_spooled(written)?,
        }
        if self.packed_blobs >= INDEX_FLUSH_BLOBS {
            self.write_index()?;
        }
        Ok(())
    }

    /// Stores a pack built in memory, at most [`MAX_UPLOADS`] at a time.
    fn upload(&mut self, kind: BlobType, name: String, bytes: bytes::Bytes) -> Result<()> {
        let permit = self
            .handle
            .block_on(Arc::clone(&self.permits).acquire_owned())
            .map_err(|_| Error::Interrupted("upload queue closed".into()))?;
        let backend = self.backend.clone();
        // The next backup reads this run's trees as its parent's.
        let cache = self.repo.cache().filter(|_| kind == BlobType::Tree).cloned();
        self.uploads.push(self.handle.spawn(async move {
            let r = backend.put_new(&name, bytes.clone()).await;
            drop(permit);
            match r {
                // Same content, same name: a pack that exists is the pack we wrote.
                Ok(()) | Err(Error::AlreadyExists(_)) => {
                    if let Some(c) = cache {
                        c.put(&name, &bytes);
                    }
                    Ok(())
                }
                other => other,
            }
        }));
        Ok(())
    }

    /// Follows a pack its spool is finishing (the last piece, fsync, its
    /// name); waits for the oldest while more than [`MAX_UPLOADS`] are.
    fn await_spooled(&mut self, written: JoinHandle<Result<()>>) -> Result<()> {
        self.uploads.push(written);
        while self.uploads.len() > MAX_UPLOADS {
            let oldest = self.uploads.remove(0);
            self.join(oldest)?;
        }
        Ok(())
    }

    /// Waits for every upload, then writes the index file naming those packs:
    /// packs first, index second, so an index never names a missing pack.
    fn write_index(&mut self) -> Result<()> {
        self.reap(true)?;
        if self.packed.is_empty() {
            return Ok(());
        }
        let file = IndexFile {
            supersedes: vec![],
            packs: std::mem::take(&mut self.packed),
        };
        self.packed_blobs = 0;
        self.handle
            .block_on(self.repo.write_index(&file, self.lock.as_ref()))?;
        self.index_files += 1;
        Ok(())
    }

    /// Collects finished uploads; with `wait`, all of them.
    fn reap(&mut self, wait: bool) -> Result<()> {
        let mut pending = Vec::new();
        let mut failed = Ok(());
        for h in std::mem::take(&mut self.uploads) {
            if wait || h.is_finished() {
                let r = self.join(h);
                if failed.is_ok() {
                    failed = r;
                }
            } else {
                pending.push(h);
            }
        }
        self.uploads = pending;
        failed
    }

    /// Waits for one upload. A holder whose lock expired hears that rather
    /// than the upload's error: a prune may have removed what it was
    /// writing, which is why it failed.
    fn join(&self, upload: JoinHandle<Result<()>>) -> Result<()> {
        let r = match self.handle.block_on(upload) {
            // Same content, same name: a pack that exists is the pack we wrote.
            Ok(Err(Error::AlreadyExists(_))) => Ok(()),
            Ok(r) => r,
            Err(e) => Err(Error::Interrupted(format!("upload task failed: {e}"))),
        };
        match (r, &self.lock) {
            (Err(e), Some(lock)) => self.handle.block_on(lock.check_fresh()).and(Err(e)),
            (r, _) => r,
        }
    }

    /// Flushes both open packs, waits until every pack is stored and writes
    /// the last index file. After this, a snapshot may use the blobs.
    pub fn finish(mut self) -> Result<PackerSummary> {
        self.flush(BlobType::Data)?;
        self.flush(BlobType::Tree)?;
        self.write_index()?;
        Ok(PackerSummary {
            stored_bytes: self.stored_bytes,
            index_files: self.index_files,
        })
    }
}

/// A pack writer that goes to disk as it fills where the repository is a
/// local directory (memory then holds no whole pack), in memory elsewhere.
fn new_writer(repo: &Repository, handle: &Handle) -> PackWriter {
    match repo.backend().spool("data", handle) {
        Some(spool) => PackWriter::spooled(spool),
        None => PackWriter::new(),
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PackerSummary {
    pub stored_bytes: u64,
    pub index_files: usize,
}

/// Stores whole blobs (plaintext) outside a backup pipeline: compresses,
/// packs, uploads, writes the index naming them, and reloads the in-memory
/// index. Returns their ids in order. For small amounts (trees written by
/// tools and tests); backups use the pipeline.
pub async fn store_blobs(repo: &mut Repository, blobs: Vec<(BlobType, Vec<u8>)>) -> Result<Vec<BlobId>> {
    let handle = Handle::current();
    let ids = tokio::task::block_in_place(|| -> Result<_> {
        let mut compressor = crate::chunk::Compressor::new(repo.config().zstd_level)?;
        let mut packer = Packer::new(repo, None, handle);
        let mut ids = Vec::new();
        for (kind, data) in &blobs {
            let id = crate::chunk::blob_id(&repo.key().chunk, data);
            ids.push(id);
            if !repo.index().contains(&id) {
                packer.add(*kind, id, &compressor.compress(data), data.len() as u32)?;
            }
        }
        packer.finish()?;
        Ok(ids)
    })?;
    repo.reload_index().await?;
    Ok(ids)
}
