//! The seams between the pipelines and where blobs live. A backup writes
//! through a [`BackupStore`] and a restore reads through a [`RestoreSource`];
//! `backer` in local mode uses the repository itself ([`LocalStore`]), while
//! `backer-agent` implements both over gRPC to a server that holds the
//! repository, so the same pipeline code runs on either side.

use tokio::runtime::Handle;

use crate::chunk;
use crate::crypto::ChunkKeys;
use crate::error::{Chain, Error, Result};
use crate::id::BlobId;
use crate::index::Location;
use crate::lock::Lock;
use crate::pack::{self, BlobType, pack_name};
use crate::packer::Packer;
use crate::repository::Repository;
use crate::tree::Tree;

/// Adjacent blobs of one pack are fetched in one read up to this size.
const MAX_READ: u64 = 16 * 1024 * 1024;

/// The largest tree blob accepted from elsewhere (a directory of some
/// 300,000 entries); it bounds what one upload can make a server allocate.
pub const MAX_TREE: usize = 64 * 1024 * 1024;

/// What a backup needs from the place its blobs go. Methods are called from
/// the pipeline's own threads, never from async code, and may block.
pub trait BackupStore: Sync {
    fn chunk_keys(&self) -> &ChunkKeys;
    fn zstd_level(&self) -> i32;
    /// Known, from memory, to be stored already: such a chunk is not sent.
    fn holds(&self, id: &BlobId) -> bool;
    /// Whether a chunk the parent snapshot names may be reused without
    /// reading the file again.
    fn parent_chunk_stored(&self, id: &BlobId) -> bool;
    /// Whether [`holds`](Self::holds) can miss chunks the store has, so the
    /// backup should ask [`missing`](Self::missing) before sending.
    fn negotiates(&self) -> bool {
        false
    }
    /// Of chunks not [`holds`](Self::holds), which the store lacks.
    fn missing(&self, ids: &[BlobId]) -> Result<Vec<bool>> {
        Ok(vec![true; ids.len()])
    }
    fn load_tree(&self, id: &BlobId) -> Result<Tree>;
    /// The one writer of this backup's blobs, used from one thread.
    fn writer(&self) -> Result<Box<dyn BlobWriter + '_>>;
}

pub trait BlobWriter: Send {
    /// Stores a blob: `payload` is the flag byte and (maybe zstd) data that
    /// [`chunk::Compressor`] makes; `raw_len` is the uncompressed length.
    fn add(&mut self, kind: BlobType, id: BlobId, payload: Vec<u8>, raw_len: u32) -> Result<()>;
    /// Flushes everything; returns the bytes stored.
    fn finish(self: Box<Self>) -> Result<u64>;
}

/// What a restore needs from the place its blobs are read from.
/// Receives each chunk's data during a restore; an error (a message for the
/// user) stops it.
pub type ChunkSink<'a> = dyn for<'d> FnMut(&'d [u8]) -> std::result::Result<(), String> + 'a;

/// Receives each blob's location and sealed bytes from [`read_blobs`].
pub type SealedSink<'a> =
    dyn for<'l, 'd> FnMut(&'l Location, &'d [u8]) -> std::result::Result<(), String> + 'a;

pub trait RestoreSource: Sync {
    fn load_tree(&self, id: &BlobId) -> Result<Tree>;
    /// Calls `write` with the data of each chunk, in the order given.
    fn read_chunks(&self, ids: &[BlobId], write: &mut ChunkSink<'_>) -> std::result::Result<(), String>;
}

/// The repository on this machine, with the lock that keeps prune away.
pub struct LocalStore<'r> {
    pub repo: &'r Repository,
    pub lock: Option<&'r Lock>,
    pub handle: Handle,
}

impl BackupStore for LocalStore<'_> {
    fn chunk_keys(&self) -> &ChunkKeys {
        &self.repo.key().chunk
    }

    fn zstd_level(&self) -> i32 {
        self.repo.config().zstd_level
    }

    fn holds(&self, id: &BlobId) -> bool {
        self.repo.index().contains(id)
    }

    fn parent_chunk_stored(&self, id: &BlobId) -> bool {
        self.repo.index().contains(id)
    }

    fn load_tree(&self, id: &BlobId) -> Result<Tree> {
        self.handle.block_on(self.repo.load_tree(id))
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter + '_>> {
        Ok(Box::new(Packer::new(self.repo, self.lock, self.handle.clone())))
    }
}

impl BlobWriter for Packer<'_> {
    fn add(&mut self, kind: BlobType, id: BlobId, payload: Vec<u8>, raw_len: u32) -> Result<()> {
        Packer::add(self, kind, id, &payload, raw_len)
    }

    fn finish(self: Box<Self>) -> Result<u64> {
        Packer::finish(*self).map(|s| s.stored_bytes)
    }
}

impl RestoreSource for LocalStore<'_> {
    fn load_tree(&self, id: &BlobId) -> Result<Tree> {
        self.handle.block_on(self.repo.load_tree(id))
    }

    fn read_chunks(&self, ids: &[BlobId], write: &mut ChunkSink<'_>) -> std::result::Result<(), String> {
        read_blobs(self.repo, &self.handle, ids, &mut |loc, sealed| {
            let data =
                pack::open_blob(&self.repo.key().data, &loc.entry, sealed).map_err(|e| e.to_string())?;
            write(&data)
        })
    }
}

/// Reads the sealed bytes of each blob in `ids`, in order, merging blobs
/// that sit next to each other in one pack into one read. Blocking.
pub fn read_blobs(
    repo: &Repository,
    handle: &Handle,
    ids: &[BlobId],
    each: &mut SealedSink<'_>,
) -> std::result::Result<(), String> {
    let locate = |id: &BlobId| {
        repo.index()
            .get(id)
            .ok_or_else(|| format!("chunk {id} is missing from the repository"))
    };
    let mut i = 0;
    while i < ids.len() {
        let first = locate(&ids[i])?;
        let mut run: Vec<Location> = vec![first];
        let mut j = i + 1;
        while j < ids.len() {
            let Some(loc) = repo.index().get(&ids[j]) else {
                break;
            };
            let last = run[run.len() - 1].entry;
            if loc.pack != first.pack
                || loc.entry.offset != last.offset + last.len
                || u64::from(loc.entry.offset + loc.entry.len - first.entry.offset) > MAX_READ
            {
                break;
            }
            run.push(loc);
            j += 1;
        }
        let start = u64::from(first.entry.offset);
        let last = run[run.len() - 1].entry;
        let end = u64::from(last.offset) + u64::from(last.len);
        let bytes = repo
            .backend()
            .read_range_blocking(handle, &pack_name(&first.pack), start..end)
            .map_err(|e| format!("failed to read pack {}: {}", first.pack, Chain(&e)))?;
        for loc in &run {
            let off = (u64::from(loc.entry.offset) - start) as usize;
            let sealed = bytes
                .get(off..off + loc.entry.len as usize)
                .ok_or_else(|| format!("pack {} is shorter than the index says", first.pack))?;
            each(loc, sealed)?;
        }
        i = j;
    }
    Ok(())
}

/// Checks that a blob someone else compressed really is what its id says,
/// and returns its raw bytes: a server must not store a chunk under a
/// false id, or another backup reusing that id would restore wrong data.
pub fn verify_payload(
    keys: &ChunkKeys,
    kind: BlobType,
    id: &BlobId,
    payload: &[u8],
    raw_len: u32,
) -> Result<Vec<u8>> {
    let limit = match kind {
        BlobType::Data => chunk::MAX_CHUNK,
        BlobType::Tree => MAX_TREE,
    };
    if raw_len as usize > limit {
        return Err(Error::Invalid(format!(
            "chunk {id} claims {raw_len} bytes, more than a {kind:?} blob may hold"
        )));
    }
    let data = chunk::decompress(payload, raw_len as usize)
        .map_err(|_| Error::Invalid(format!("chunk {id} does not decompress to {raw_len} bytes")))?;
    if chunk::blob_id(keys, &data) != *id {
        return Err(Error::Invalid(format!("chunk {id} does not hash to its id")));
    }
    Ok(data)
}
