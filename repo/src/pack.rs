//! Packs: the files that hold blobs. A pack is written once, whole:
//!
//! ```text
//! [sealed blob]... [sealed header] [header length: u32 little-endian]
//! ```
//!
//! Each blob is sealed with its type and id as associated data, so a blob
//! cannot be passed off as another. The header lists what the pack holds, so
//! the index can be rebuilt from packs alone. A pack's name is the BLAKE3 hash
//! of its bytes.

use serde::{Deserialize, Serialize};

use crate::backend::Spool;
use crate::chunk;
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};

/// Packs are cut at about this size: large enough that an object store sees
/// few requests, small enough that a pack in memory costs little.
pub const PACK_TARGET: usize = 16 * 1024 * 1024;

const HEADER_AAD: &[u8] = b"backer pack header v1";

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum BlobType {
    Data,
    Tree,
}

/// Where one blob sits in a pack.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobType,
    pub id: BlobId,
    pub offset: u32,
    /// Sealed length in the pack.
    pub len: u32,
    /// Length of the chunk's bytes after decryption and decompression.
    pub raw_len: u32,
}

pub(crate) fn blob_aad(kind: BlobType, id: &BlobId) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = match kind {
        BlobType::Data => b'd',
        BlobType::Tree => b't',
    };
    aad[1..].copy_from_slice(&id.0);
    aad
}

/// Decrypts and decompresses one sealed blob, checking it is what `entry` says.
pub fn open_blob(key: &DataKey, entry: &PackEntry, sealed: &[u8]) -> Result<Vec<u8>> {
    let payload = open_payload(key, entry, sealed)?;
    chunk::decompress(&payload, entry.raw_len as usize)
        .map_err(|_| Error::corrupt(format!("{:?} blob {}", entry.kind, entry.id)))
}

/// Decrypts one sealed blob to its payload (flag byte and compressed data),
/// for moving it between packs without decompressing.
pub fn open_payload(key: &DataKey, entry: &PackEntry, sealed: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("{:?} blob {}", entry.kind, entry.id);
    key.open(&blob_aad(entry.kind, &entry.id), sealed, &what)
}

/// Builds one pack: in memory, or, given a [`Spool`], on disk as it fills
/// (then only about the last megabyte is in memory).
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    /// Bytes already handed to the spool.
    spooled: usize,
    hasher: blake3::Hasher,
    spool: Option<Spool>,
}

/// With a spool, bytes are handed on in pieces of about this size.
const SPOOL_PIECE: usize = 1 << 20;

/// A finished pack: in memory to store, or being finished by its spool.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: PackId,
    pub size: u64,
    pub entries: Vec<PackEntry>,
    pub body: PackBody,
}

/// Where a finished pack's bytes are.
#[derive(Debug)]
pub enum PackBody {
    /// The whole pack, to store under [`pack_name`].
    Memory(bytes::Bytes),
    /// Being written by its spool, which names it [`pack_name`]: done when
    /// the task ends.
    Spooled(tokio::task::JoinHandle<Result<()>>),
}

impl FinishedPack {
    /// The whole pack, when it was built in memory.
    pub fn bytes(&self) -> Option<&bytes::Bytes> {
        match &self.body {
            PackBody::Memory(b) => Some(b),
            PackBody::Spooled(_) => None,
        }
    }
}

impl PackWriter {
    pub fn new() -> Self {
        PackWriter {
            buf: Vec::with_capacity(PACK_TARGET + chunk::MAX_CHUNK),
            ..Default::default()
        }
    }

    /// A pack written to disk by `spool` as it fills.
    pub fn spooled(spool: Spool) -> Self {
        PackWriter {
            spool: Some(spool),
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.spooled + self.buf.len()
    }

    /// Seals `payload` (a flag byte and the possibly compressed chunk) into the pack.
    pub fn add(&mut self, key: &DataKey, kind: BlobType, id: BlobId, payload: &[u8], raw_len: u32) {
        let offset = self.len();
        key.seal_into(&blob_aad(kind, &id), payload, &mut self.buf);
        self.entries.push(PackEntry {
            kind,
            id,
            offset: offset as u32,
            len: (self.len() - offset) as u32,
            raw_len,
        });
        if let Some(spool) = self.spool.as_mut()
            && self.buf.len() >= SPOOL_PIECE
        {
            self.hasher.update(&self.buf);
            self.spooled += self.buf.len();
            let next = spool.buffer();
            spool.write(std::mem::replace(&mut self.buf, next));
        }
    }

    pub fn finish(mut self, key: &DataKey) -> Result<FinishedPack> {
        let header = postcard::to_stdvec(&self.entries)
            .map_err(|e| Error::Invalid(format!("failed to encode a pack header: {e}")))?;
        let sealed = key.seal(HEADER_AAD, &header);
        self.buf.extend_from_slice(&sealed);
        self.buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        // The same hash as `storage_hash` of the whole pack.
        self.hasher.update(&self.buf);
        let id = PackId(*self.hasher.finalize().as_bytes());
        let size = self.len() as u64;
        let body = match self.spool {
            Some(mut spool) => {
                spool.write(self.buf);
                PackBody::Spooled(spool.finish(pack_name(&id)))
            }
            None => PackBody::Memory(bytes::Bytes::from(self.buf)),
        };
        Ok(FinishedPack {
            id,
            size,
            entries: self.entries,
            body,
        })
    }
}

/// Reads the header at the end of a whole pack.
pub fn read_header(key: &DataKey, pack: &[u8], name: &str) -> Result<Vec<PackEntry>> {
    let what = || format!("header of pack {name}");
    if pack.len() < 4 {
        return Err(Error::corrupt(what()));
    }
    let (body, len_bytes) = pack.split_at(pack.len() - 4);
    let mut l = [0u8; 4];
    l.copy_from_slice(len_bytes);
    let hlen = u32::from_le_bytes(l) as usize;
    if hlen > body.len() {
        return Err(Error::corrupt(what()));
    }
    let plain = key.open(HEADER_AAD, &body[body.len() - hlen..], &what)?;
    let entries: Vec<PackEntry> = postcard::from_bytes(&plain).map_err(|e| Error::Decode {
        what: what(),
        source: e,
    })?;
    let data_end = (body.len() - hlen) as u64;
    for e in &entries {
        if u64::from(e.offset) + u64::from(e.len) > data_end {
            return Err(Error::corrupt(what()));
        }
    }
    Ok(entries)
}

/// Reads the header of the stored pack `id` (`size` bytes, as listed) from
/// its tail: one ranged read of the last few KiB, a second one only for a
/// header longer than that. For rebuilding the index without reading packs
/// whole.
pub async fn read_header_from(
    backend: &crate::backend::Backend,
    key: &DataKey,
    id: &PackId,
    size: u64,
) -> Result<Vec<PackEntry>> {
    const TAIL: u64 = 16 * 1024;
    let name = pack_name(id);
    let what = || format!("header of pack {id}");
    if size < 4 {
        return Err(Error::corrupt(format!(
            "{}: the pack has only {size} bytes",
            what()
        )));
    }
    let start = size.saturating_sub(TAIL);
    let tail = backend.get_range(&name, start..size).await?;
    let mut l = [0u8; 4];
    l.copy_from_slice(&tail[tail.len() - 4..]);
    let hlen = u64::from(u32::from_le_bytes(l));
    if hlen + 4 > size {
        return Err(Error::corrupt(what()));
    }
    let header_start = size - 4 - hlen;
    let sealed = if header_start >= start {
        tail.slice((header_start - start) as usize..tail.len() - 4)
    } else {
        backend.get_range(&name, header_start..size - 4).await?
    };
    let plain = key.open(HEADER_AAD, &sealed, &what)?;
    let entries: Vec<PackEntry> = postcard::from_bytes(&plain).map_err(|e| Error::Decode {
        what: what(),
        source: e,
    })?;
    for e in &entries {
        if u64::from(e.offset) + u64::from(e.len) > header_start {
            return Err(Error::corrupt(what()));
        }
    }
    Ok(entries)
}

/// The storage name of a pack: fanned out over 256 folders.
pub fn pack_name(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("data/{}/{}", &hex[..2], hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{Compressor, blob_id};
    use crate::crypto::MasterKey;
    use crate::id::storage_hash;

    /// Adds every blob of `blobs` to `w`.
    fn fill(w: &mut PackWriter, mk: &MasterKey, blobs: &[&[u8]]) {
        let mut c = Compressor::new(3).unwrap();
        for b in blobs {
            w.add(
                &mk.data,
                BlobType::Data,
                blob_id(&mk.chunk, b),
                &c.compress(b),
                b.len() as u32,
            );
        }
    }

    /// `bytes` are the pack `id` of `size` bytes: its header lists
    /// `entries`, which hold `blobs`.
    fn assert_reads_back(
        mk: &MasterKey,
        (id, size, entries): (PackId, u64, &[PackEntry]),
        bytes: &[u8],
        blobs: &[&[u8]],
    ) {
        assert_eq!(id, PackId(storage_hash(bytes)));
        assert_eq!(size, bytes.len() as u64);
        let read = read_header(&mk.data, bytes, "x").unwrap();
        assert_eq!(read, entries);
        for (e, b) in read.iter().zip(blobs) {
            let s = &bytes[e.offset as usize..(e.offset + e.len) as usize];
            assert_eq!(&open_blob(&mk.data, e, s).unwrap(), b);
            let mut wrong = *e;
            wrong.kind = BlobType::Tree;
            assert!(open_blob(&mk.data, &wrong, s).is_err());
        }
    }

    #[test]
    fn pack_round_trip_and_tamper() {
        let mk = MasterKey::generate().unwrap();
        let mut w = PackWriter::new();
        let one = b"one".repeat(1000);
        let blobs: Vec<&[u8]> = vec![&one, b"two", b""];
        fill(&mut w, &mk, &blobs);
        let p = w.finish(&mk.data).unwrap();
        let bytes = p.bytes().expect("a pack without a spool is in memory");
        assert_reads_back(&mk, (p.id, p.size, &p.entries), bytes, &blobs);
        let mut bad = bytes.to_vec();
        let n = bad.len();
        bad[n - 10] ^= 0x40;
        assert!(read_header(&mk.data, &bad, "x").is_err());
        assert!(read_header(&mk.data, &bad[..2], "x").is_err());
    }

    /// A pack spooled to disk piece by piece (several pieces, a last block
    /// padded for O_DIRECT) is named by the hash of its bytes and reads back
    /// as written; one dropped unfinished leaves nothing behind.
    #[test]
    fn a_spooled_pack_lands_whole_under_its_name_and_an_abandoned_one_leaves_nothing() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::backend::Backend::open(dir.path().to_str().unwrap()).unwrap();
        let mk = MasterKey::generate().unwrap();
        let mut noise = vec![0u8; 3 * SPOOL_PIECE + 12345];
        crate::crypto::random_fill(&mut noise);
        let blobs: Vec<&[u8]> = noise.chunks(700_001).chain([&b"tail"[..]]).collect();
        let mut w = PackWriter::spooled(backend.spool("data", rt.handle()).unwrap());
        fill(&mut w, &mk, &blobs);
        let p = w.finish(&mk.data).unwrap();
        let PackBody::Spooled(task) = p.body else {
            panic!("a pack with a spool is spooled")
        };
        rt.block_on(task).unwrap().unwrap();
        let bytes = std::fs::read(dir.path().join(pack_name(&p.id))).unwrap();
        assert_reads_back(&mk, (p.id, p.size, &p.entries), &bytes, &blobs);

        let mut abandoned = PackWriter::spooled(backend.spool("data", rt.handle()).unwrap());
        // Four pieces: the queue holds two, so the third waits for the spool
        // thread, which has made its staging file by then; the check below
        // cannot pass before that file exists.
        fill(&mut abandoned, &mk, &blobs);
        fill(&mut abandoned, &mk, &blobs);
        drop(abandoned);
        // The spool's task removes its staging file once it sees the drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let staged: Vec<_> = std::fs::read_dir(dir.path().join("data"))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains('#'))
                .collect();
            if staged.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "staging files left: {staged:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let packs = std::fs::read_dir(dir.path().join("data")).unwrap().count();
        assert_eq!(packs, 1, "only the finished pack's folder is there");
    }
}
