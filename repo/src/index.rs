//! The index: which pack holds each blob. Index files list packs and their
//! blobs; they are written after the packs they name and before any snapshot
//! that uses them. In memory it is one sorted table from blob id to a
//! compact location (see [`Index`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::id::{BlobId, IndexId, PackId};
use crate::pack::{BlobType, PackEntry};

/// One `index/<id>` file.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct IndexFile {
    /// Index files whose content this one repeats; they may be deleted once
    /// this one is stored (used by prune).
    pub supersedes: Vec<IndexId>,
    pub packs: Vec<IndexedPack>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct IndexedPack {
    pub id: PackId,
    pub size: u64,
    pub blobs: Vec<PackEntry>,
}

/// Where a blob is, packed into 17 bytes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u32,
    offset: u32,
    len: u32,
    raw_len: u32,
    kind: BlobType,
}

/// A blob's location, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: PackEntry,
}

/// The in-memory index: one vector sorted by id, found through a table of
/// buckets on the id's first bits and a short binary search: 52 bytes a
/// blob and 4 to 8 for its share of the table, where a hash map needs over
/// 100 once its load factor is counted. There are one to two buckets a blob
/// (at least 65,536, at most 2^26), so a look-up
/// touches the table and then, mostly, one entry: an unchanged re-run looks
/// up every chunk of every file, and a binary search over a crowded bucket
/// was a tenth of it in cache misses on a million files. Built once from the
/// index files; a process that writes index files reloads it (see
/// `Repository::reload_index`).
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<(PackId, u64)>,
    pack_pos: HashMap<PackId, u32>,
    sorted: Vec<(BlobId, Slot)>,
    /// `buckets[p]..buckets[p + 1]` is the range of `sorted` whose ids
    /// start with the bits `p` ([`Index::bucket`]).
    buckets: Vec<u32>,
    /// How many of an id's first 64 bits are not its bucket's.
    shift: u32,
}

/// The first 64 bits of an id, read big-endian: ids sort by their bytes, so
/// first by this.
fn id_prefix(id: &BlobId) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(first)
}

/// Bucket bits: at least 16, about log2 of the blob count, at most 26.
fn bucket_bits(blobs: usize) -> u32 {
    (usize::BITS - blobs.leading_zeros()).clamp(16, 26)
}

impl Index {
    /// Builds an index from many files at once (the usual case: open).
    pub fn from_files<'a>(files: impl IntoIterator<Item = &'a IndexFile>) -> Self {
        let mut idx = Index::default();
        for f in files {
            idx.load(f);
        }
        idx.finish_loading();
        idx
    }

    /// Adds a file's entries without sorting; call [`Index::finish_loading`]
    /// after the last one. Lets a caller drop each file as soon as it is added.
    pub fn load(&mut self, file: &IndexFile) {
        for p in &file.packs {
            let pos = self.pack_slot(p);
            for e in &p.blobs {
                self.sorted.push((e.id, slot(pos, e)));
            }
        }
    }

    /// Sorts what was loaded and builds the bucket table.
    pub fn finish_loading(&mut self) {
        // Ids compared by their first 64 bits first, as one integer: a
        // `memcmp` call per comparison made this sort a third of the start
        // of an unchanged re-run of a million files. Stable, so the first
        // entry of a blob stored twice is the one kept.
        self.sorted
            .sort_by(|a, b| id_prefix(&a.0).cmp(&id_prefix(&b.0)).then_with(|| a.0.cmp(&b.0)));
        self.sorted.dedup_by(|b, a| a.0 == b.0);
        self.sorted.shrink_to_fit();
        self.count_buckets();
    }

    fn pack_slot(&mut self, pack: &IndexedPack) -> u32 {
        match self.pack_pos.get(&pack.id) {
            Some(p) => *p,
            None => {
                let p = self.packs.len() as u32;
                self.packs.push((pack.id, pack.size));
                self.pack_pos.insert(pack.id, p);
                p
            }
        }
    }

    /// Sizes the bucket table for the entries held and counts them into
    /// it: `buckets[b]` becomes where bucket `b` starts in sorted order.
    fn count_buckets(&mut self) {
        let bits = bucket_bits(self.sorted.len());
        self.shift = 64 - bits;
        let n = 1usize << bits;
        self.buckets = vec![0u32; n + 1];
        for (id, _) in &self.sorted {
            let b = self.bucket(id);
            self.buckets[b + 1] += 1;
        }
        for i in 0..n {
            self.buckets[i + 1] += self.buckets[i];
        }
    }

    /// The bucket of `id`: its first bits.
    fn bucket(&self, id: &BlobId) -> usize {
        (id_prefix(id) >> self.shift) as usize
    }

    fn find(&self, id: &BlobId) -> Option<&Slot> {
        if self.buckets.is_empty() {
            return None;
        }
        let b = self.bucket(id);
        let range = &self.sorted[self.buckets[b] as usize..self.buckets[b + 1] as usize];
        range
            .binary_search_by(|(k, _)| k.cmp(id))
            .ok()
            .map(|i| &range[i].1)
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.find(id).is_some()
    }

    pub fn get(&self, id: &BlobId) -> Option<Location> {
        self.find(id).map(|s| self.location(id, s))
    }

    fn location(&self, id: &BlobId, s: &Slot) -> Location {
        Location {
            pack: self.packs[s.pack as usize].0,
            entry: PackEntry {
                kind: s.kind,
                id: *id,
                offset: s.offset,
                len: s.len,
                raw_len: s.raw_len,
            },
        }
    }

    pub fn blob_count(&self) -> usize {
        self.sorted.len()
    }

    /// The size the index recorded for `pack`, if it names it.
    pub fn get_pack(&self, pack: &PackId) -> Option<u64> {
        self.pack_pos.get(pack).map(|p| self.packs[*p as usize].1)
    }

    /// Every pack the index names, with the size it recorded.
    pub fn packs(&self) -> impl Iterator<Item = (PackId, u64)> + '_ {
        self.packs.iter().copied()
    }

    /// Every blob, as its location.
    pub fn blobs(&self) -> impl Iterator<Item = Location> + '_ {
        self.sorted.iter().map(|(id, s)| self.location(id, s))
    }
}

fn slot(pack: u32, e: &PackEntry) -> Slot {
    Slot {
        pack,
        offset: e.offset,
        len: e.len,
        raw_len: e.raw_len,
        kind: e.kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32) -> PackEntry {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.wrapping_mul(2654435761).to_be_bytes());
        PackEntry {
            kind: BlobType::Data,
            id: BlobId(id),
            offset: i,
            len: 10,
            raw_len: 20,
        }
    }

    fn pack(n: u8, range: std::ops::Range<u32>) -> IndexedPack {
        IndexedPack {
            id: PackId([n; 32]),
            size: 100,
            blobs: range.map(entry).collect(),
        }
    }

    #[test]
    fn lookups_across_files_and_packs() {
        let f = IndexFile {
            supersedes: vec![],
            packs: vec![pack(1, 0..5000), pack(2, 4000..9000)],
        };
        let idx = Index::from_files([&f]);
        assert_eq!(idx.blob_count(), 9000);
        // A blob in two packs keeps its first location.
        assert_eq!(idx.get(&entry(4500).id).unwrap().pack, PackId([1; 32]));
        assert_eq!(idx.get(&entry(8999).id).unwrap().pack, PackId([2; 32]));
        assert!(!idx.contains(&entry(9000).id));
        let later = IndexFile {
            supersedes: vec![],
            packs: vec![pack(3, 8500..300_000)],
        };
        let idx = Index::from_files([&f, &later]);
        assert_eq!(idx.blob_count(), 300_000);
        assert_eq!(idx.get(&entry(8600).id).unwrap().pack, PackId([2; 32]));
        assert_eq!(idx.get(&entry(299_999).id).unwrap().pack, PackId([3; 32]));
        assert_eq!(idx.get(&entry(123_456).id).unwrap().entry, entry(123_456));
        assert_eq!(idx.blobs().count(), 300_000);
        let ids: Vec<BlobId> = idx.blobs().map(|l| l.entry.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order, each once");
        assert_eq!(idx.packs().count(), 3);
        // A table of 2^19 buckets for 300,000 blobs: each one found, and an
        // id sharing a blob's bucket and first bytes is not taken for it.
        for i in (0..300_000).step_by(7) {
            let id = entry(i).id;
            assert!(idx.contains(&id), "{i}");
            let mut near = id;
            near.0[31] = 1;
            assert!(!idx.contains(&near), "{i}");
        }
    }
}
