//! The index: which pack holds each blob. Index files list packs and their
//! blobs; they are written after the packs they name and before any snapshot
//! that uses them. In memory the index is one hash map from blob id to a
//! compact location.

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

/// Where a blob is, packed into 20 bytes so a million blobs cost ~60 MB.
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

#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<(PackId, u64)>,
    pack_pos: HashMap<PackId, u32>,
    blobs: HashMap<BlobId, Slot>,
}

impl Index {
    pub fn add_pack(&mut self, pack: &IndexedPack) {
        let pos = match self.pack_pos.get(&pack.id) {
            Some(p) => *p,
            None => {
                let p = self.packs.len() as u32;
                self.packs.push((pack.id, pack.size));
                self.pack_pos.insert(pack.id, p);
                p
            }
        };
        for e in &pack.blobs {
            self.blobs.entry(e.id).or_insert(Slot {
                pack: pos,
                offset: e.offset,
                len: e.len,
                raw_len: e.raw_len,
                kind: e.kind,
            });
        }
    }

    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.add_pack(p);
        }
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn get(&self, id: &BlobId) -> Option<Location> {
        self.blobs.get(id).map(|s| Location {
            pack: self.packs[s.pack as usize].0,
            entry: PackEntry {
                kind: s.kind,
                id: *id,
                offset: s.offset,
                len: s.len,
                raw_len: s.raw_len,
            },
        })
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Every pack the index names, with the size it recorded.
    pub fn packs(&self) -> impl Iterator<Item = (PackId, u64)> + '_ {
        self.packs.iter().copied()
    }

    /// Every blob, as (id, location).
    pub fn blobs(&self) -> impl Iterator<Item = Location> + '_ {
        self.blobs.iter().map(|(id, s)| Location {
            pack: self.packs[s.pack as usize].0,
            entry: PackEntry {
                kind: s.kind,
                id: *id,
                offset: s.offset,
                len: s.len,
                raw_len: s.raw_len,
            },
        })
    }
}
