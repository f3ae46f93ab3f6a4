//! Parsers of what the repository reads back from storage: trees, the
//! sealed objects (snapshots, index files, locks, config), packs and their
//! blobs, and key files. Storage is not trusted: a bucket can be damaged or
//! written by someone else, so none of these may panic, hang or allocate
//! without bound on what they read.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use backer_repo::chunk::{self, Compressor};
use backer_repo::crypto::KeyFile;
use backer_repo::id::{BlobId, PackId};
use backer_repo::index::{Index, IndexFile};
use backer_repo::lock::{FoundLock, LockInfo};
use backer_repo::pack::{BlobType, PackEntry, PackWriter, open_blob, open_payload, read_header};
use backer_repo::repository::{Config, FORMAT_VERSION, Kind, open_config, open_object, seal_object};
use backer_repo::snapshot::Snapshot;
use backer_repo::store::MAX_TREE;
use backer_repo::tree::Tree;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{CONFIG_AAD, Layer, PACK_HEADER_AAD, PASSWORD, key, kind_aad};

fn postcard<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap()
}

/// A tree blob's bytes (after decryption and decompression), as restore,
/// `ls`, prune and check decode them, and as the server decodes uploaded ones.
pub fn tree(data: &[u8]) {
    let Ok(t) = Tree::from_bytes(data, "fuzz tree") else {
        return;
    };
    let again = Tree::from_bytes(&t.to_bytes().unwrap(), "re-encoded tree").unwrap();
    assert_eq!(again, t);
    for n in &t.nodes {
        assert_eq!(n.mode_string().chars().count(), 10);
        let _ = n.name_lossy();
        for e in &n.content {
            let _ = (e.len(), e.is_empty());
        }
        // What restore relies on: a name it accepts is one plain component
        // of a path, never a way out of the directory it is created in.
        if n.has_safe_name() {
            let comps: Vec<_> = Path::new(OsStr::from_bytes(&n.name)).components().collect();
            assert!(
                matches!(comps.as_slice(), [Component::Normal(c)] if c.as_bytes() == n.name.as_slice()),
                "{:?} passes has_safe_name but is {comps:?}",
                n.name_lossy()
            );
        }
    }
    // A stored tree is sorted; lookups in an unsorted (hostile) one may miss
    // but must not panic.
    let sorted = t.nodes.windows(2).all(|w| w[0].name < w[1].name);
    for n in &t.nodes {
        let found = t.find(&n.name);
        if sorted {
            assert_eq!(found, Some(n));
        }
    }
}

/// Feeds `data` to `open_object` at the layer its first byte names; returns
/// what opened, after checking it round-trips through `seal_object`.
fn sealed_object<T: Serialize + DeserializeOwned>(kind: Kind, data: &[u8]) -> Option<T> {
    let (layer, body) = Layer::split(data)?;
    let aad = kind_aad(kind);
    let sealed = match layer {
        Layer::Stored => body.to_vec(),
        Layer::Compressed => key().data.seal(aad, body),
        Layer::Plain => key().data.seal(aad, &zstd::bulk::compress(body, 1).unwrap()),
    };
    let name = hex::encode(blake3::hash(&sealed).as_bytes());
    // An object is checked against its name before anything else.
    assert!(open_object::<T>(key(), kind, &"0".repeat(64), &sealed).is_err());
    let opened = open_object::<T>(key(), kind, &name, &sealed);
    match layer {
        Layer::Plain => assert_eq!(opened.is_ok(), postcard::from_bytes::<T>(body).is_ok()),
        Layer::Compressed => {
            let plain = zstd::stream::decode_all(body).ok();
            let decodes = plain.is_some_and(|p| postcard::from_bytes::<T>(&p).is_ok());
            assert_eq!(opened.is_ok(), decodes);
        }
        Layer::Stored => {}
    }
    let value = opened.ok()?;
    let (path, bytes) = seal_object(key(), kind, &value).unwrap();
    let (_, name) = path.split_once('/').unwrap();
    let back: T = open_object(key(), kind, name, &bytes).unwrap();
    // Compared encoded: a snapshot's f64 may be NaN, which is not equal to itself.
    assert_eq!(postcard(&back), postcard(&value));
    Some(value)
}

/// `snapshots/<id>`.
pub fn snapshot(data: &[u8]) {
    let _ = sealed_object::<Snapshot>(Kind::Snapshot, data);
}

/// `index/<id>`, then the in-memory index built from it, checked against a
/// plain model: every blob found where its first entry puts it, every pack
/// listed once with the size its first entry gives.
pub fn index(data: &[u8]) {
    let Some(file) = sealed_object::<IndexFile>(Kind::Index, data) else {
        return;
    };
    let idx = Index::from_files([&file]);
    let mut first: HashMap<BlobId, (PackId, PackEntry)> = HashMap::new();
    let mut packs: Vec<(PackId, u64)> = Vec::new();
    for p in &file.packs {
        if !packs.iter().any(|(id, _)| *id == p.id) {
            packs.push((p.id, p.size));
        }
        for e in &p.blobs {
            first.entry(e.id).or_insert((p.id, *e));
        }
    }
    assert_eq!(idx.blob_count(), first.len());
    assert_eq!(idx.packs().collect::<Vec<_>>(), packs);
    for (id, (pack, entry)) in &first {
        let loc = idx.get(id).expect("an indexed blob is found");
        assert_eq!((loc.pack, loc.entry), (*pack, *entry));
    }
    let ids: Vec<BlobId> = idx.blobs().map(|l| l.entry.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let absent = BlobId(*blake3::hash(data).as_bytes());
    assert_eq!(idx.contains(&absent), first.contains_key(&absent));
}

/// `locks/<id>`, and the description other lockers print of it.
pub fn lock(data: &[u8]) {
    let Some(info) = sealed_object::<LockInfo>(Kind::Lock, data) else {
        return;
    };
    let found = FoundLock {
        name: "fuzz".into(),
        modified: info.created,
        info: Some(info),
        stale: None,
    };
    let _ = found.describe();
}

/// `config`: sealed, not compressed, so the compressed layer is the plain one.
pub fn config(data: &[u8]) {
    let Some((layer, body)) = Layer::split(data) else {
        return;
    };
    let sealed = match layer {
        Layer::Stored => body.to_vec(),
        Layer::Compressed | Layer::Plain => key().data.seal(CONFIG_AAD, body),
    };
    let opened = open_config(key(), &sealed);
    if layer != Layer::Stored {
        let model = postcard::from_bytes::<Config>(body)
            .ok()
            .filter(|c| c.version == FORMAT_VERSION);
        assert_eq!(opened.as_ref().ok(), model.as_ref());
    }
    let Ok(c) = opened else {
        return;
    };
    assert_eq!(postcard::from_bytes::<Config>(&postcard(&c)).unwrap(), c);
    // A backup's compressor is made at the level the config records.
    let _ = Compressor::new(c.zstd_level);
}

/// A whole pack, as `check --read-data` and prune read its header. The
/// first byte picks the stored bytes as they are, or a pack built here from
/// `[data length: u16 LE][data][header plaintext]` with the header sealed,
/// checked against a model of what the header may say.
pub fn pack_header(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (pack, model) = if mode % 2 == 0 {
        (rest.to_vec(), None)
    } else {
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        let (blobs, header) = rest.split_at(n);
        let sealed = key().data.seal(PACK_HEADER_AAD, header);
        let mut pack = blobs.to_vec();
        pack.extend_from_slice(&sealed);
        pack.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let model = postcard::from_bytes::<Vec<PackEntry>>(header).ok().filter(|es| {
            es.iter()
                .all(|e| u64::from(e.offset) + u64::from(e.len) <= n as u64)
        });
        (pack, Some(model))
    };
    let got = read_header(&key().data, &pack, "fuzz");
    if let Some(model) = model {
        assert_eq!(got.as_ref().ok(), model.as_ref());
    }
    let Ok(entries) = got else {
        return;
    };
    assert_eq!(
        postcard::from_bytes::<Vec<PackEntry>>(&postcard(&entries)).unwrap(),
        entries
    );
    for e in &entries {
        let end = e.offset as usize + e.len as usize;
        let sealed = pack
            .get(e.offset as usize..end)
            .expect("read_header keeps entries inside the pack");
        // Lengths in a header that authenticated were written by a key
        // holder, whose writers never record a blob over MAX_TREE.
        if e.raw_len as usize <= MAX_TREE {
            let _ = open_blob(&key().data, e, sealed);
        }
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Compressor> =
        RefCell::new(Compressor::new(chunk::DEFAULT_ZSTD_LEVEL).unwrap());
}

pub fn compress(raw: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|c| c.borrow_mut().compress(raw))
}

/// One blob's payload `[kind][raw length: u32 LE][flag byte and data]`,
/// sealed into a pack here and opened as a restore opens it: decrypted,
/// then decompressed to the length the index records.
pub fn blob(data: &[u8]) {
    let Some((head, payload)) = data.split_first_chunk::<5>() else {
        return;
    };
    let kind = if head[0] % 2 == 0 {
        BlobType::Data
    } else {
        BlobType::Tree
    };
    let raw_len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    let id = BlobId(*blake3::hash(payload).as_bytes());
    let mut w = PackWriter::default();
    w.add(&key().data, kind, id, payload, raw_len);
    let p = w.finish(&key().data).unwrap();
    let bytes = p.bytes().unwrap();
    let entries = read_header(&key().data, bytes, "fuzz").unwrap();
    assert_eq!(entries, p.entries);
    let e = entries[0];
    let sealed = &bytes[e.offset as usize..e.offset as usize + e.len as usize];
    assert_eq!(open_payload(&key().data, &e, sealed).unwrap(), payload);
    // Bound to its kind and id: a blob read as another is refused.
    let mut other = e;
    other.kind = match kind {
        BlobType::Data => BlobType::Tree,
        BlobType::Tree => BlobType::Data,
    };
    assert!(open_payload(&key().data, &other, sealed).is_err());
    let mut other = e;
    other.id.0[0] ^= 1;
    assert!(open_payload(&key().data, &other, sealed).is_err());
    // As in pack_header: a raw length over MAX_TREE is never written.
    if raw_len as usize > MAX_TREE {
        return;
    }
    let opened = open_blob(&key().data, &e, sealed);
    let model = chunk::decompress(payload, raw_len as usize);
    assert_eq!(opened.as_ref().ok(), model.as_ref().ok());
    if let Ok(raw) = opened {
        assert_eq!(raw.len(), raw_len as usize);
        assert_eq!(chunk::decompress(&compress(&raw), raw.len()).unwrap(), raw);
    }
}

/// A `keys/<id>` file, as `Repository::open` reads every one: JSON, then
/// unwrapped with the password.
pub fn key_file(data: &[u8]) {
    let Ok(kf) = serde_json::from_slice::<KeyFile>(data) else {
        return;
    };
    let json = serde_json::to_vec(&kf).unwrap();
    let back: KeyFile = serde_json::from_slice(&json).unwrap();
    assert_eq!(serde_json::to_vec(&back).unwrap(), json);
    // Parameters out of bounds are refused before any work (a hang or an
    // allocation here is the bug this target found); within bounds, only
    // cheap ones are worth running at fuzzing speed.
    if kf.params.check().is_err() {
        assert!(kf.unwrap_with(PASSWORD).is_err());
        return;
    }
    if u64::from(kf.params.memory_kib) * u64::from(kf.params.iterations) > 1024 {
        return;
    }
    let r = kf.unwrap_with(PASSWORD);
    // No key file but the seed repository's can hold a secret that this
    // password opens: a forged one fails authentication.
    if let Ok(Some(mk)) = r {
        assert_eq!(mk.chunk.to_parts(), key().chunk.to_parts());
    }
}
