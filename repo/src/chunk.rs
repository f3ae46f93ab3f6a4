//! Where file data becomes chunks: cut at content-defined boundaries (FastCDC
//! 2020), named by a keyed BLAKE3 hash, compressed with zstd. This is all the
//! work that happens before a chunk is handed to the repository, so an agent
//! can do it with [`ChunkKeys`] alone.

use std::io::{self, Read};

use fastcdc::v2020::{FastCDC, Normalization};

use crate::crypto::ChunkKeys;
use crate::error::{Error, Result};
use crate::id::BlobId;

/// Chunk sizes. A 1 MiB average keeps the index small (about 1,300 entries a
/// GiB) while still finding shared runs inside large files; the 256 KiB floor
/// lets the chunker skip most of each chunk's bytes (cut-point skipping).
pub const MIN_CHUNK: usize = 256 * 1024;
pub const AVG_CHUNK: usize = 1024 * 1024;
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

/// zstd level. See docs/FORMAT.md for the measurements behind it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;

/// Payload flag: the first byte of every blob's plaintext.
const STORED: u8 = 0;
const ZSTD: u8 = 1;

/// Names a chunk: keyed BLAKE3 of its plaintext.
pub fn blob_id(keys: &ChunkKeys, data: &[u8]) -> BlobId {
    BlobId(*blake3::keyed_hash(&keys.id_key, data).as_bytes())
}

/// A reusable read buffer for [`for_each_chunk`]: allocate one per thread,
/// not per file (zeroing 8 MiB for every small file costs more than the rest
/// of the backup).
pub fn chunk_buffer() -> Vec<u8> {
    vec![0u8; 2 * MAX_CHUNK]
}

/// Splits a stream into content-defined chunks and calls `each` with every one,
/// in order. Returns the number of bytes read. `buf` comes from [`chunk_buffer`].
pub fn for_each_chunk<R: Read>(
    keys: &ChunkKeys,
    mut reader: R,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<u64, ChunkError> {
    if buf.len() < 2 * MAX_CHUNK {
        return Err(ChunkError::Sink(Error::Invalid("chunk buffer too small".into())));
    }
    let mut start = 0usize; // first unconsumed byte
    let mut end = 0usize; // one past the last byte read
    let mut eof = false;
    let mut total = 0u64;
    loop {
        if !eof && end - start < MAX_CHUNK {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            while end < buf.len() {
                let n = match reader.read(&mut buf[end..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ChunkError::Read(e)),
                };
                if n == 0 {
                    eof = true;
                    break;
                }
                end += n;
                total += n as u64;
            }
        }
        if start == end {
            return Ok(total);
        }
        let window = &buf[start..end];
        if window.len() <= MIN_CHUNK {
            // Only reachable at the end of the stream: the rest is one chunk.
            each(window).map_err(ChunkError::Sink)?;
            start = end;
            continue;
        }
        let cdc = FastCDC::with_level_and_seed(
            window,
            MIN_CHUNK,
            AVG_CHUNK,
            MAX_CHUNK,
            Normalization::Level1,
            keys.chunker_seed,
        );
        let (_, cut) = cdc.cut(0, window.len());
        each(&window[..cut]).map_err(ChunkError::Sink)?;
        start += cut;
    }
}

/// Why chunking stopped: the source failed, or the consumer did.
#[derive(Debug)]
pub enum ChunkError {
    Read(io::Error),
    Sink(Error),
}

/// Reusable zstd state for one worker thread.
pub struct Compressor {
    inner: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    pub fn new(level: i32) -> Result<Self> {
        let inner = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::Invalid(format!("failed to set up zstd level {level}: {e}")))?;
        Ok(Compressor { inner })
    }

    /// The blob payload for `data`: a flag byte, then zstd frames, or the
    /// bytes as they are when compression would save less than 2%.
    pub fn compress(&mut self, data: &[u8]) -> Vec<u8> {
        let bound = zstd::zstd_safe::compress_bound(data.len());
        let mut out = Vec::with_capacity(bound + 1);
        out.push(ZSTD);
        // A cursor past the flag byte makes zstd append instead of overwrite.
        let mut cursor = io::Cursor::new(out);
        cursor.set_position(1);
        let ok = self.inner.compress_to_buffer(data, &mut cursor).is_ok();
        let mut out = cursor.into_inner();
        if ok && out.len() - 1 < data.len() - data.len() / 50 {
            out
        } else {
            out.clear();
            out.push(STORED);
            out.extend_from_slice(data);
            out
        }
    }
}

/// Turns a blob payload back into the chunk's bytes. `raw_len` is the length
/// the index recorded; a payload that decodes to anything else is corrupt.
pub fn decompress(payload: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    match payload.split_first() {
        Some((&STORED, rest)) if rest.len() == raw_len => Ok(rest.to_vec()),
        Some((&ZSTD, rest)) => {
            let mut out = Vec::with_capacity(raw_len);
            // One decompression context per thread: creating one per chunk
            // costs more than decompressing a small chunk.
            thread_local! {
                static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            DCTX.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(zstd::bulk::Decompressor::new()?);
                }
                match slot.as_mut() {
                    Some(d) => d.decompress_to_buffer(rest, &mut out).map(|_| ()),
                    None => Err(io::Error::other("no decompressor")),
                }
            })
            .map_err(|_| Error::corrupt("zstd payload"))?;
            if out.len() != raw_len {
                return Err(Error::corrupt("decompressed length"));
            }
            Ok(out)
        }
        _ => Err(Error::corrupt("blob payload header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;
    use backer_testkit::pseudo_random;

    fn cut(keys: &ChunkKeys, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_chunk(keys, data, &mut chunk_buffer(), |c| {
            out.push(c.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn chunks_cover_input_within_bounds() {
        let mk = MasterKey::generate().unwrap();
        let data = pseudo_random(20 * 1024 * 1024 + 12345, 7);
        let chunks = cut(&mk.chunk, &data);
        assert_eq!(chunks.concat(), data);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= MIN_CHUNK && c.len() <= MAX_CHUNK, "{}", c.len());
        }
    }

    #[test]
    fn insertion_shifts_only_nearby_chunks() {
        let mk = MasterKey::generate().unwrap();
        let data = pseudo_random(16 * 1024 * 1024, 3);
        let mut edited = data[..5_000_000].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[5_000_000..]);
        let ids = |d: &[u8]| -> std::collections::HashSet<BlobId> {
            cut(&mk.chunk, d).iter().map(|c| blob_id(&mk.chunk, c)).collect()
        };
        let (a, b) = (ids(&data), ids(&edited));
        let shared = a.intersection(&b).count();
        assert!(
            shared + 2 >= a.len(),
            "only {shared} of {} chunks shared",
            a.len()
        );
    }

    #[test]
    fn ids_depend_on_the_key() {
        let (a, b) = (MasterKey::generate().unwrap(), MasterKey::generate().unwrap());
        assert_ne!(blob_id(&a.chunk, b"x"), blob_id(&b.chunk, b"x"));
        assert_eq!(blob_id(&a.chunk, b"x"), blob_id(&a.chunk, b"x"));
    }

    #[test]
    fn compress_round_trip_and_incompressible_is_stored() {
        let mut c = Compressor::new(DEFAULT_ZSTD_LEVEL).unwrap();
        let text = b"abcabcabc".repeat(10_000);
        let p = c.compress(&text);
        assert_eq!(p[0], ZSTD);
        assert!(p.len() < text.len() / 10);
        assert_eq!(decompress(&p, text.len()).unwrap(), text);
        let noise = pseudo_random(100_000, 9);
        let p = c.compress(&noise);
        assert_eq!(p[0], STORED);
        assert_eq!(decompress(&p, noise.len()).unwrap(), noise);
        assert!(decompress(&p, noise.len() + 1).is_err());
        assert!(decompress(&[], 0).is_err());
    }
}
