//! An opened repository: storage, the unwrapped key, the config and the index.
//!
//! Stored objects besides packs (`config`, `index/`, `snapshots/`) share one
//! encoding: postcard, zstd, then sealed with the object kind as associated
//! data; the name of each is the BLAKE3 hash of the stored bytes. Key files are
//! JSON, since they must be readable before there is a key.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::backend::Backend;
use crate::chunk;
use crate::crypto::{KdfParams, KeyFile, MasterKey};
use crate::error::{Error, Result};
use crate::id::{BlobId, IndexId, KeyId, SnapshotId, storage_hash};
use crate::index::{Index, IndexFile};
use crate::pack;
use crate::snapshot::{Snapshot, SnapshotEntry};
use crate::tree::Tree;

pub const FORMAT_VERSION: u32 = 1;

/// How many objects are fetched at once when loading many small ones.
const FETCH_CONCURRENCY: usize = 16;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub version: u32,
    pub id: String,
    pub chunker: String,
    pub min_chunk: u32,
    pub avg_chunk: u32,
    pub max_chunk: u32,
    pub zstd_level: i32,
    pub created: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug)]
pub struct Repository {
    backend: Backend,
    key: Arc<MasterKey>,
    config: Config,
    index: Index,
}

/// Object kinds, each a folder and the associated data its objects are sealed with.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Index,
    Snapshot,
    Lock,
}

impl Kind {
    pub(crate) fn dir(self) -> &'static str {
        match self {
            Kind::Index => "index",
            Kind::Snapshot => "snapshots",
            Kind::Lock => "locks",
        }
    }
    fn aad(self) -> &'static [u8] {
        match self {
            Kind::Index => b"backer index v1",
            Kind::Snapshot => b"backer snapshot v1",
            Kind::Lock => b"backer lock v1",
        }
    }
}

/// Encodes, compresses and seals an object; returns its name (`dir/hash`) and bytes.
pub fn seal_object<T: Serialize>(key: &MasterKey, kind: Kind, value: &T) -> Result<(String, Bytes)> {
    let plain = zstd::bulk::compress(&encode(value)?, 3)
        .map_err(|e| Error::Invalid(format!("failed to compress an object: {e}")))?;
    let sealed = key.data.seal(kind.aad(), &plain);
    let name = format!("{}/{}", kind.dir(), hex::encode(storage_hash(&sealed)));
    Ok((name, Bytes::from(sealed)))
}

/// Checks an object against its name, then opens and decodes it. Public
/// (with [`seal_object`]) so the fuzz targets reach it without a store.
pub fn open_object<T: DeserializeOwned>(key: &MasterKey, kind: Kind, name: &str, sealed: &[u8]) -> Result<T> {
    let path = format!("{}/{}", kind.dir(), name);
    if hex::encode(storage_hash(sealed)) != name {
        return Err(Error::corrupt(format!("{path}: content does not match its name")));
    }
    let plain = key.data.open(kind.aad(), sealed, &|| path.clone())?;
    let raw = zstd::stream::decode_all(plain.as_slice()).map_err(|_| Error::corrupt(path.clone()))?;
    decode(&raw, &path)
}

const CONFIG_AAD: &[u8] = b"backer config v1";

/// Opens the sealed `config` object and checks its format version.
pub fn open_config(key: &MasterKey, sealed: &[u8]) -> Result<Config> {
    let config: Config = decode(&key.data.open(CONFIG_AAD, sealed, &|| "config".into())?, "config")?;
    if config.version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion(config.version));
    }
    Ok(config)
}

impl Repository {
    /// Creates a repository at `backend`, which must be empty.
    pub async fn init(mut backend: Backend, password: &[u8], kdf: KdfParams) -> Result<Self> {
        if password.is_empty() {
            return Err(Error::Invalid("the password is empty".into()));
        }
        if backend.head("config").await?.is_some() {
            return Err(Error::RepositoryExists(backend.location().into()));
        }
        backend.prepare_for_init().await?;
        let key = MasterKey::generate()?;
        let mut rid = [0u8; 16];
        crate::crypto::random_fill(&mut rid);
        let config = Config {
            version: FORMAT_VERSION,
            id: hex::encode(rid),
            chunker: "fastcdc-2020-seeded".into(),
            min_chunk: chunk::MIN_CHUNK as u32,
            avg_chunk: chunk::AVG_CHUNK as u32,
            max_chunk: chunk::MAX_CHUNK as u32,
            zstd_level: chunk::DEFAULT_ZSTD_LEVEL,
            created: chrono::Utc::now(),
        };
        // Key first, config last: a location with a config is a repository
        // that can be opened.
        let repo = Repository {
            backend,
            key: Arc::new(key),
            config,
            index: Index::default(),
        };
        repo.add_key(password, kdf).await?;
        let sealed = repo.key.data.seal(CONFIG_AAD, &encode(&repo.config)?);
        repo.backend.put_new("config", Bytes::from(sealed)).await?;
        Ok(repo)
    }

    /// Opens the repository at `backend` with `password` and loads its index.
    pub async fn open(backend: Backend, password: &[u8]) -> Result<Self> {
        if backend.missing_local_dir() {
            return Err(Error::NoRepository(backend.location().into()));
        }
        let sealed_config = match backend.get("config").await {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Err(Error::NoRepository(backend.location().into())),
            Err(e) => return Err(e),
        };
        let keys = backend.list_all("keys").await?;
        let mut found = None;
        for k in keys {
            let raw = backend.get(&format!("keys/{}", k.name)).await?;
            let kf: KeyFile = serde_json::from_slice(&raw)
                .map_err(|_| Error::corrupt(format!("key file keys/{}", k.name)))?;
            let pw = password.to_vec();
            let mk = tokio::task::spawn_blocking(move || kf.unwrap_with(&pw))
                .await
                .map_err(|e| Error::Interrupted(e.to_string()))??;
            if let Some(mk) = mk {
                found = Some(mk);
                break;
            }
        }
        let key = found.ok_or(Error::WrongPassword)?;
        let config = open_config(&key, &sealed_config)?;
        let mut repo = Repository {
            backend,
            key: Arc::new(key),
            config,
            index: Index::default(),
        };
        repo.reload_index().await?;
        Ok(repo)
    }

    /// Adds another password that opens this repository.
    pub async fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<KeyId> {
        let kf = self.key.wrap(password, kdf)?;
        let bytes = serde_json::to_vec_pretty(&kf)
            .map_err(|e| Error::Invalid(format!("failed to encode a key file: {e}")))?;
        let id = KeyId(storage_hash(&bytes));
        self.backend
            .put_new(&format!("keys/{id}"), Bytes::from(bytes))
            .await?;
        Ok(id)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
    pub fn key(&self) -> &Arc<MasterKey> {
        &self.key
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Reads every index file again.
    pub async fn reload_index(&mut self) -> Result<()> {
        // Each file is added and dropped as it arrives, so loading never holds
        // every index file and the index at once.
        let listed = self.backend.list_all(Kind::Index.dir()).await?;
        let mut index = Index::default();
        let this = &*self;
        let mut files = futures::stream::iter(listed)
            .map(|l| async move { this.load_object::<IndexFile>(Kind::Index, &l.name).await })
            .buffer_unordered(FETCH_CONCURRENCY);
        while let Some(file) = files.next().await {
            index.load(&file?);
        }
        drop(files);
        index.finish_loading();
        self.index = index;
        Ok(())
    }

    /// A second handle on this repository with the index as stored now, so a
    /// long-running process can take in other writers' blobs while readers
    /// of the old handle carry on.
    pub async fn refreshed(&self) -> Result<Repository> {
        let mut r = Repository {
            backend: self.backend.clone(),
            key: Arc::clone(&self.key),
            config: self.config.clone(),
            index: Index::default(),
        };
        r.reload_index().await?;
        Ok(r)
    }

    pub async fn load_index_files(&self) -> Result<Vec<(IndexId, IndexFile)>> {
        let listed = self.backend.list_all(Kind::Index.dir()).await?;
        futures::stream::iter(listed)
            .map(|l| async move {
                let id: IndexId = l.name.parse()?;
                let f: IndexFile = self.load_object(Kind::Index, &l.name).await?;
                Ok::<_, Error>((id, f))
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn save_object<T: Serialize>(&self, kind: Kind, value: &T) -> Result<[u8; 32]> {
        let (name, bytes) = seal_object(&self.key, kind, value)?;
        let id = storage_hash(&bytes);
        self.backend.put_new(&name, bytes).await?;
        Ok(id)
    }

    async fn load_object<T: DeserializeOwned>(&self, kind: Kind, name: &str) -> Result<T> {
        let sealed = self.backend.get(&format!("{}/{}", kind.dir(), name)).await?;
        open_object(&self.key, kind, name, &sealed)
    }

    /// Stores an index file; call only after the packs it names are stored.
    /// The in-memory index is not changed (see [`Repository::reload_index`]).
    pub async fn write_index(&self, file: &IndexFile) -> Result<IndexId> {
        Ok(IndexId(self.save_object(Kind::Index, file).await?))
    }

    /// Stores a snapshot; call only after the index naming its blobs is stored.
    pub async fn save_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId> {
        Ok(SnapshotId(self.save_object(Kind::Snapshot, snap).await?))
    }

    pub async fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        self.load_object(Kind::Snapshot, &id.to_hex()).await
    }

    /// All snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let listed = self.backend.list_all(Kind::Snapshot.dir()).await?;
        let mut all: Vec<SnapshotEntry> = futures::stream::iter(listed)
            .map(|l| async move {
                let id: SnapshotId = l.name.parse()?;
                let snapshot = self.load_snapshot(&id).await?;
                Ok::<_, Error>(SnapshotEntry { id, snapshot })
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        all.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Resolves `latest`, a full id, or an unambiguous id prefix.
    pub async fn find_snapshot(&self, spec: &str) -> Result<SnapshotEntry> {
        let all = self.snapshots().await?;
        if spec == "latest" {
            return all
                .into_iter()
                .last()
                .ok_or_else(|| Error::NoSuchSnapshot(spec.into()));
        }
        if spec.is_empty() || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::NoSuchSnapshot(spec.into()));
        }
        let spec_l = spec.to_ascii_lowercase();
        let mut matches = all.into_iter().filter(|s| s.id.to_hex().starts_with(&spec_l));
        match (matches.next(), matches.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(Error::AmbiguousSnapshot(spec.into())),
            (None, _) => Err(Error::NoSuchSnapshot(spec.into())),
        }
    }

    /// Reads, decrypts and decompresses one blob.
    pub async fn load_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self
            .index
            .get(id)
            .ok_or_else(|| Error::corrupt(format!("blob {id} is not in the index")))?;
        let e = loc.entry;
        let sealed = self
            .backend
            .get_range(
                &pack::pack_name(&loc.pack),
                u64::from(e.offset)..u64::from(e.offset) + u64::from(e.len),
            )
            .await?;
        pack::open_blob(&self.key.data, &e, &sealed)
    }

    pub async fn load_tree(&self, id: &BlobId) -> Result<Tree> {
        let raw = self.load_blob(id).await?;
        if chunk::blob_id(&self.key.chunk, &raw) != *id {
            return Err(Error::corrupt(format!(
                "tree {id}: content does not match its id"
            )));
        }
        decode(&raw, &format!("tree {id}"))
    }

    /// Every blob reachable from these snapshots' trees: (trees, data).
    /// Memory grows with the number of distinct blobs, not files.
    pub async fn reachable_blobs(
        &self,
        roots: impl IntoIterator<Item = BlobId>,
    ) -> Result<(HashSet<BlobId>, HashSet<BlobId>)> {
        let mut trees = HashSet::new();
        let mut data = HashSet::new();
        let mut stack: Vec<BlobId> = roots.into_iter().collect();
        while let Some(t) = stack.pop() {
            if !trees.insert(t) {
                continue;
            }
            let tree = self.load_tree(&t).await?;
            for n in tree.nodes {
                if let Some(s) = n.subtree {
                    stack.push(s);
                }
                for e in n.content {
                    if let crate::tree::Extent::Data { id, .. } = e {
                        data.insert(id);
                    }
                }
            }
        }
        Ok((trees, data))
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Invalid(format!("failed to encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Decode {
        what: what.into(),
        source: e,
    })
}
