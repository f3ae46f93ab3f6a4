//! The seams between the pipelines and where blobs live. A backup writes
//! through a [`BackupStore`] and a restore reads through a [`RestoreSource`];
//! `backer` in local mode uses the repository itself ([`LocalStore`]), while
//! `backer-agent` implements both over gRPC to a server that holds the
//! repository, so the same pipeline code runs on either side.

use std::collections::{HashMap, HashSet};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::chunk;
use crate::crypto::ChunkKeys;
use crate::error::{Chain, Error, Result};
use crate::id::{BlobId, PackId};
use crate::index::Location;
use crate::lock::Lock;
use crate::pack::{self, BlobType, pack_name};
use crate::packer::Packer;
use crate::repository::Repository;
use crate::tree::Tree;

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

/// Receives each chunk's id and data from [`RestoreSource::fetch_chunks`],
/// in any order and from several threads at once.
pub type ChunkSink<'a> = dyn Fn(&BlobId, &[u8]) + Sync + 'a;

/// Receives each blob's location and sealed bytes from [`read_by_pack`],
/// in any order and from several threads at once.
pub type SealedSink<'a> = dyn Fn(&Location, &[u8]) -> std::result::Result<(), String> + Sync + 'a;

/// What a restore needs from the place its blobs are read from.
pub trait RestoreSource: Sync {
    fn load_tree(&self, id: &BlobId) -> Result<Tree>;
    /// Fetches the data of every chunk in `ids`, each once, in whatever
    /// order reads them fastest (pack by pack), calling `each` with it.
    /// Returns the chunks that could not be read, each with why. Once
    /// `cancel` is cancelled it stops as soon as it can, returning what it
    /// did not deliver.
    fn fetch_chunks(
        &self,
        ids: &[BlobId],
        cancel: &CancellationToken,
        each: &ChunkSink<'_>,
    ) -> Vec<(BlobId, String)>;
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
        Ok(Box::new(Packer::new(
            self.repo,
            self.lock.map(Lock::check),
            self.handle.clone(),
        )))
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

    fn fetch_chunks(
        &self,
        ids: &[BlobId],
        cancel: &CancellationToken,
        each: &ChunkSink<'_>,
    ) -> Vec<(BlobId, String)> {
        let key = &self.repo.key().data;
        read_by_pack(self.repo, &self.handle, ids, cancel, &|loc, sealed| {
            let data = pack::open_blob(key, &loc.entry, sealed).map_err(|e| Chain(&e).to_string())?;
            each(&loc.entry.id, &data);
            Ok(())
        })
    }
}

/// One read of a pack: a byte range and the blobs in it, by offset.
struct PackRead {
    pack: PackId,
    range: std::ops::Range<u64>,
    blobs: Vec<Location>,
}

/// Plans the reads of `ids`: grouped by pack, each pack's blobs in offset
/// order, neighbours merged into one range when the gap between them is
/// at most `gap` (a range is streamed, so its length costs no memory).
/// Blobs no index names come back as failures.
fn plan_reads(repo: &Repository, ids: &[BlobId], gap: u64) -> (Vec<PackRead>, Vec<(BlobId, String)>) {
    let mut by_pack: HashMap<PackId, Vec<Location>> = HashMap::new();
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        match repo.index().get(id) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push(loc),
            None => missing.push((
                *id,
                format!("chunk {id} is in no index (`backer check` says more)"),
            )),
        }
    }
    let mut packs: Vec<(PackId, Vec<Location>)> = by_pack.into_iter().collect();
    // Packs in id order, so concurrent restores of shared data read alike.
    packs.sort_by_key(|(p, _)| *p);
    let mut reads = Vec::new();
    for (pack, mut locs) in packs {
        locs.sort_by_key(|l| l.entry.offset);
        let mut cur: Option<PackRead> = None;
        for loc in locs {
            let (start, end) = (
                u64::from(loc.entry.offset),
                u64::from(loc.entry.offset) + u64::from(loc.entry.len),
            );
            match &mut cur {
                Some(r) if start <= r.range.end + gap => {
                    r.range.end = r.range.end.max(end);
                    r.blobs.push(loc);
                }
                _ => {
                    reads.extend(cur.take());
                    cur = Some(PackRead {
                        pack,
                        range: start..end,
                        blobs: vec![loc],
                    });
                }
            }
        }
        reads.extend(cur);
    }
    (reads, missing)
}

/// Reads the sealed bytes of every blob in `ids` pack by pack: each pack
/// once, in as few ranged reads as its layout allows (see [`plan_reads`]),
/// several packs at a time ([`Backend::read_parallelism`]). `each` gets
/// every blob as it arrives; a blob it refuses, or one that cannot be read,
/// is returned with why. Blocking: call it outside async code. Each range
/// is streamed ([`Backend::stream_range_blocking`]): memory is about one blob per
/// reader, whatever the packs' size. Once `cancel` is cancelled no range
/// is started and no blob handed on: the rest is returned as not read.
pub fn read_by_pack(
    repo: &Repository,
    handle: &Handle,
    ids: &[BlobId],
    cancel: &CancellationToken,
    each: &SealedSink<'_>,
) -> Vec<(BlobId, String)> {
    let backend = repo.backend();
    let (reads, mut failed) = plan_reads(repo, ids, backend.read_merge_gap());
    let queue = parking_lot::Mutex::new(reads.into_iter());
    let failures = parking_lot::Mutex::new(Vec::new());
    let readers = backend.read_parallelism().min(queue.lock().len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| {
                loop {
                    let next = queue.lock().next();
                    let Some(read) = next else { break };
                    if cancel.is_cancelled() {
                        failures
                            .lock()
                            .extend(read.blobs.iter().map(|l| (l.entry.id, "cancelled".to_string())));
                        continue;
                    }
                    let mut lost = Vec::new();
                    // Blobs are handed on as soon as their bytes are in:
                    // memory is one blob and one piece, whatever the range.
                    let mut buf = bytes::BytesMut::new();
                    let mut buf_at = read.range.start;
                    let mut next = 0;
                    let streamed = backend.stream_range_blocking(
                        handle,
                        &pack_name(&read.pack),
                        read.range.clone(),
                        &mut |piece| {
                            buf.extend_from_slice(&piece);
                            while let Some(loc) = read.blobs.get(next) {
                                let start = u64::from(loc.entry.offset);
                                let end = start + u64::from(loc.entry.len);
                                if start < buf_at {
                                    // Only a damaged index makes blobs overlap.
                                    lost.push((
                                        loc.entry.id,
                                        format!(
                                            "the index places {} over another blob of pack {}",
                                            loc.entry.id, read.pack
                                        ),
                                    ));
                                    next += 1;
                                    continue;
                                }
                                if buf_at + (buf.len() as u64) < end {
                                    break;
                                }
                                let sealed = &buf[(start - buf_at) as usize..(end - buf_at) as usize];
                                let handed = if cancel.is_cancelled() {
                                    Err("cancelled".to_string())
                                } else {
                                    each(loc, sealed)
                                };
                                if let Err(why) = handed {
                                    lost.push((loc.entry.id, why));
                                }
                                bytes::Buf::advance(&mut buf, (end - buf_at) as usize);
                                buf_at = end;
                                next += 1;
                            }
                        },
                    );
                    let why = match streamed {
                        Err(e) => format!("failed to read pack {}: {}", read.pack, Chain(&e)),
                        Ok(()) => format!("pack {} is shorter than the index says", read.pack),
                    };
                    lost.extend(read.blobs[next..].iter().map(|l| (l.entry.id, why.clone())));
                    if !lost.is_empty() {
                        failures.lock().extend(lost);
                    }
                }
            });
        }
    });
    failed.extend(failures.into_inner());
    failed
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
