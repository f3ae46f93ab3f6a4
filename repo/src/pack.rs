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

use crate::chunk;
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId, storage_hash};

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

/// Builds one pack in memory.
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to store.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: PackId,
    pub bytes: bytes::Bytes,
    pub entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn new() -> Self {
        PackWriter {
            buf: Vec::with_capacity(PACK_TARGET + chunk::MAX_CHUNK),
            entries: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Seals `payload` (a flag byte and the possibly compressed chunk) into the pack.
    pub fn add(&mut self, key: &DataKey, kind: BlobType, id: BlobId, payload: &[u8], raw_len: u32) {
        let offset = self.buf.len();
        key.seal_into(&blob_aad(kind, &id), payload, &mut self.buf);
        self.entries.push(PackEntry {
            kind,
            id,
            offset: offset as u32,
            len: (self.buf.len() - offset) as u32,
            raw_len,
        });
    }

    pub fn finish(mut self, key: &DataKey) -> Result<FinishedPack> {
        let header = postcard::to_stdvec(&self.entries)
            .map_err(|e| Error::Invalid(format!("failed to encode a pack header: {e}")))?;
        let sealed = key.seal(HEADER_AAD, &header);
        self.buf.extend_from_slice(&sealed);
        self.buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = PackId(storage_hash(&self.buf));
        Ok(FinishedPack {
            id,
            bytes: bytes::Bytes::from(self.buf),
            entries: self.entries,
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

    #[test]
    fn pack_round_trip_and_tamper() {
        let mk = MasterKey::generate().unwrap();
        let mut c = Compressor::new(3).unwrap();
        let mut w = PackWriter::new();
        let blobs: Vec<Vec<u8>> = vec![b"one".repeat(1000), b"two".to_vec(), vec![]];
        for b in &blobs {
            w.add(
                &mk.data,
                BlobType::Data,
                blob_id(&mk.chunk, b),
                &c.compress(b),
                b.len() as u32,
            );
        }
        let p = w.finish(&mk.data).unwrap();
        assert_eq!(p.id, PackId(storage_hash(&p.bytes)));
        let entries = read_header(&mk.data, &p.bytes, "x").unwrap();
        assert_eq!(entries, p.entries);
        for (e, b) in entries.iter().zip(&blobs) {
            let s = &p.bytes[e.offset as usize..(e.offset + e.len) as usize];
            assert_eq!(&open_blob(&mk.data, e, s).unwrap(), b);
            let mut wrong = *e;
            wrong.kind = BlobType::Tree;
            assert!(open_blob(&mk.data, &wrong, s).is_err());
        }
        let mut bad = p.bytes.to_vec();
        let n = bad.len();
        bad[n - 10] ^= 0x40;
        assert!(read_header(&mk.data, &bad, "x").is_err());
        assert!(read_header(&mk.data, &bad[..2], "x").is_err());
    }
}
