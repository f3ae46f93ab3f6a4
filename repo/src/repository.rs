//! An opened repository: storage, the unwrapped key, the config and the index.
//!
//! Stored objects besides packs (`config`, `index/`, `snapshots/`) share one
//! encoding: postcard, zstd, then sealed with the object kind as associated
//! data; the name of each is the BLAKE3 hash of the stored bytes. Key files are
//! JSON, since they must be readable before there is a key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::backend::{Backend, Listed};
use crate::cache::Cache;
use crate::chunk;
use crate::crypto::{KdfParams, KeyFile, MasterKey};
use crate::error::{Chain, Error, Result};
use crate::id::{BlobId, IndexId, KeyId, PackId, SnapshotId, storage_hash};
use crate::index::{Index, IndexFile, Location};
use crate::lock::{Lock, LockCheck};
use crate::pack;
use crate::snapshot::{Snapshot, SnapshotEntry, SnapshotFilter};
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

impl Config {
    /// A new repository's configuration: a fresh random id and this
    /// version's chunking and compression settings.
    fn fresh() -> Config {
        let mut rid = [0u8; 16];
        crate::crypto::random_fill(&mut rid);
        Config {
            version: FORMAT_VERSION,
            id: hex::encode(rid),
            chunker: "fastcdc-2020-seeded".into(),
            min_chunk: chunk::MIN_CHUNK as u32,
            avg_chunk: chunk::AVG_CHUNK as u32,
            max_chunk: chunk::MAX_CHUNK as u32,
            zstd_level: chunk::DEFAULT_ZSTD_LEVEL,
            created: chrono::Utc::now(),
        }
    }
}

#[derive(Debug)]
pub struct Repository {
    backend: Backend,
    key: Arc<MasterKey>,
    /// The key file that opened this repository.
    key_id: Option<KeyId>,
    config: Config,
    index: Index,
    /// Index files that could not be read when the index was last loaded.
    index_damage: Vec<Damaged>,
    /// Key files that could not be read when the repository was opened.
    key_damage: Vec<Damaged>,
    /// Tree packs read whole from an object store (see [`PackCache`]).
    tree_packs: Arc<parking_lot::Mutex<PackCache>>,
    /// Local copies of index, snapshot and tree-pack objects of a remote
    /// repository, when its backend names a cache root.
    cache: Option<Arc<Cache>>,
}

/// The cache for this repository, if its backend asks for one; a cache
/// that cannot be made is reported and done without.
fn open_cache(backend: &Backend, config: &Config) -> Option<Arc<Cache>> {
    let root = backend.cache_root()?;
    match Cache::open(root, &config.id) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(
                "failed to open the cache in {} ({e}); reading everything from the repository",
                root.display()
            );
            None
        }
    }
}

/// Whole tree packs, kept while they fit in a budget (oldest out first):
/// over a network, a restore or listing that reads each directory's tree
/// by its own request pays a round trip per directory; a tree pack holds
/// thousands of them.
#[derive(Debug, Default)]
pub struct PackCache {
    packs: HashMap<PackId, Bytes>,
    order: std::collections::VecDeque<PackId>,
    bytes: usize,
}

/// What [`PackCache`] keeps at most.
const TREE_PACK_BUDGET: usize = 64 << 20;

impl PackCache {
    fn get(&self, id: &PackId) -> Option<Bytes> {
        self.packs.get(id).cloned()
    }

    fn insert(&mut self, id: PackId, bytes: Bytes) {
        if bytes.len() > TREE_PACK_BUDGET || self.packs.contains_key(&id) {
            return;
        }
        while self.bytes + bytes.len() > TREE_PACK_BUDGET {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(b) = self.packs.remove(&old) {
                self.bytes -= b.len();
            }
        }
        self.bytes += bytes.len();
        self.order.push_back(id);
        self.packs.insert(id, bytes);
    }
}

/// A stored object that could not be read, and why. Damaged objects are
/// reported by name and skipped where skipping is safe (docs/FORMAT.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damaged {
    /// Its name in the repository, e.g. `snapshots/1a2b…`.
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// Snapshots as loaded: the readable ones, oldest first, and the damaged.
#[derive(Debug, Default)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotEntry>,
    pub damaged: Vec<Damaged>,
}

/// The folders of a repository whose objects are named by their id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Keys,
    Index,
    Snapshots,
    Locks,
    /// Packs, fanned out as `data/<first two hex digits>/<id>`.
    Data,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Keys => "keys",
            Dir::Index => "index",
            Dir::Snapshots => "snapshots",
            Dir::Locks => "locks",
            Dir::Data => "data",
        }
    }
}

fn is_id(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The objects in `dir`, each with its bare id as `name`. Names that are not
/// ids (a `.DS_Store`, a `README`, a sync tool's conflict copy) are no
/// repository objects: they are skipped, and said so at `-v`. A listing that
/// fails is an error, never a short list.
pub async fn list_ids(backend: &Backend, dir: Dir) -> Result<Vec<Listed>> {
    let mut listed = backend.list_all(dir.name()).await?;
    let mut strays = Vec::new();
    listed.retain_mut(|l| {
        let id = match dir {
            Dir::Data => match l.name.split_once('/') {
                Some((fan, id)) if is_id(id) && id.starts_with(fan) && fan.len() == 2 => Some(id.to_string()),
                _ => None,
            },
            _ => is_id(&l.name).then(|| l.name.clone()),
        };
        match id {
            Some(id) => {
                l.name = id;
                true
            }
            None => {
                strays.push(std::mem::take(&mut l.name));
                false
            }
        }
    });
    if let Some(first) = strays.first() {
        tracing::info!(
            "ignoring {} name(s) in {}/ that are not repository objects (e.g. {first:?})",
            strays.len(),
            dir.name()
        );
    }
    Ok(listed)
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
        self.folder().name()
    }
    pub(crate) fn folder(self) -> Dir {
        match self {
            Kind::Index => Dir::Index,
            Kind::Snapshot => Dir::Snapshots,
            Kind::Lock => Dir::Locks,
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

/// Why one key file could not be tried, or the key it holds for `password`.
async fn try_key(
    backend: &Backend,
    name: &str,
    password: &[u8],
) -> Result<std::result::Result<Option<MasterKey>, String>> {
    let raw = match backend.get(&format!("keys/{name}")).await {
        Ok(b) => b,
        Err(Error::NotFound(_)) => return Ok(Ok(None)), // removed meanwhile
        Err(e) if e.is_unreadable() => return Ok(Err(e.to_string())),
        Err(e) => return Err(e),
    };
    if hex::encode(storage_hash(&raw)) != name {
        return Ok(Err(
            "content does not match its name (altered or truncated)".into()
        ));
    }
    let kf: KeyFile = match serde_json::from_slice(&raw) {
        Ok(k) => k,
        Err(e) => return Ok(Err(format!("not a key file: {e}"))),
    };
    let pw = password.to_vec();
    let opened = tokio::task::spawn_blocking(move || kf.unwrap_with(&pw))
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))?;
    Ok(opened.map_err(|e| e.to_string()))
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
        let config = Config::fresh();
        // Key first, config last: a location with a config is a repository
        // that can be opened.
        let mut repo = Repository {
            cache: open_cache(&backend, &config),
            backend,
            key: Arc::new(key),
            key_id: None,
            config,
            index: Index::default(),
            index_damage: Vec::new(),
            key_damage: Vec::new(),
            tree_packs: Default::default(),
        };
        repo.key_id = Some(repo.add_key(password, kdf).await?);
        let sealed = repo.key.data.seal(CONFIG_AAD, &encode(&repo.config)?);
        repo.backend.put_new("config", Bytes::from(sealed)).await?;
        Ok(repo)
    }

    /// Opens the repository at `backend` with `password` and loads its index.
    pub async fn open(backend: Backend, password: &[u8]) -> Result<Self> {
        let mut repo = Self::open_without_index(backend, password).await?;
        repo.reload_index().await?;
        Ok(repo)
    }

    /// Opens the repository without reading its index, for a caller that
    /// takes a lock first: an index read before a lock may predate a prune
    /// that finished while the caller waited. Call [`Repository::reload_index`]
    /// once locked.
    pub async fn open_without_index(backend: Backend, password: &[u8]) -> Result<Self> {
        if backend.missing_local_dir() {
            return Err(Error::NoRepository(backend.location().into()));
        }
        let sealed_config = match backend.get("config").await {
            Ok(b) => b,
            Err(Error::NotFound(_)) if !list_ids(&backend, Dir::Keys).await?.is_empty() => {
                return Err(Error::NeedsRepair(
                    "the config object is missing, though key files are there; `backer repair config` \
                     writes a new one"
                        .into(),
                ));
            }
            Err(Error::NotFound(_)) => return Err(Error::NoRepository(backend.location().into())),
            Err(e) => return Err(e),
        };
        // Every key file is tried until one opens; a damaged one is
        // reported and passed over, so which password works never depends
        // on the order of a listing.
        // A key must also open the config: a key file copied in from
        // another repository may unwrap with the same password.
        let mut found = None;
        let mut unwrapped_elsewhere = None;
        let mut key_damage = Vec::new();
        for k in list_ids(&backend, Dir::Keys).await? {
            match try_key(&backend, &k.name, password).await? {
                Ok(Some(mk)) => match open_config(&mk, &sealed_config) {
                    Ok(config) => {
                        found = Some((mk, k.name.parse::<KeyId>()?, config));
                        break;
                    }
                    Err(e) if e.is_damage() => unwrapped_elsewhere = Some(k.name.clone()),
                    Err(e) => return Err(e),
                },
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(
                        "key file keys/{} is damaged and was skipped ({reason}); `backer key remove {}` removes it",
                        k.name,
                        &k.name[..8]
                    );
                    key_damage.push(Damaged {
                        name: format!("keys/{}", k.name),
                        reason,
                    });
                }
            }
        }
        let (key, key_id, config) = match (found, unwrapped_elsewhere) {
            (Some(f), _) => f,
            (None, Some(k)) => {
                return Err(Error::NeedsRepair(format!(
                    "the key file keys/{k} opens with this password, but not the config object: either \
                     the config is damaged (`backer repair config` checks which, and writes a new one if \
                     so) or that key file belongs to another repository"
                )));
            }
            (None, None) => {
                return Err(Error::WrongPassword {
                    damaged: key_damage.iter().map(|d| d.to_string()).collect(),
                });
            }
        };
        Ok(Repository {
            cache: open_cache(&backend, &config),
            backend,
            key: Arc::new(key),
            key_id: Some(key_id),
            config,
            index: Index::default(),
            index_damage: Vec::new(),
            key_damage,
            tree_packs: Default::default(),
        })
    }

    /// Opens a repository whose config object is damaged or missing, for
    /// `repair config`. Returns the handle and the config as it is now when
    /// some key opens it (then nothing needs repair). A key that unwraps
    /// with `password` but opens none of the repository's index or
    /// snapshot files belongs to another repository: refused, since a
    /// config sealed with it would make every object look damaged.
    pub async fn open_for_config_repair(backend: Backend, password: &[u8]) -> Result<(Self, Option<Config>)> {
        let sealed = match backend.get("config").await {
            Ok(b) => Some(b),
            Err(Error::NotFound(_)) => None,
            Err(e) if e.is_damage() => None,
            Err(e) => return Err(e),
        };
        let mut keys = Vec::new();
        for k in list_ids(&backend, Dir::Keys).await? {
            if let Ok(Some(mk)) = try_key(&backend, &k.name, password).await? {
                if let Some(config) = sealed.as_ref().and_then(|c| open_config(&mk, c).ok()) {
                    let repo = Self::with_key(backend, mk, k.name.parse()?, config.clone());
                    return Ok((repo, Some(config)));
                }
                keys.push((mk, k.name));
            }
        }
        let mut last_foreign = None;
        for (mk, name) in keys {
            let config = Config::fresh();
            let repo = Self::with_key(backend.clone(), mk, name.parse()?, config);
            if repo.key_opens_objects().await? {
                return Ok((repo, None));
            }
            last_foreign = Some(name);
        }
        Err(match last_foreign {
            Some(k) => Error::Invalid(format!(
                "the key file keys/{k} opens with this password but none of this repository's index or \
                 snapshot files: it belongs to another repository; remove it rather than repair the config"
            )),
            None => Error::WrongPassword { damaged: Vec::new() },
        })
    }

    fn with_key(backend: Backend, key: MasterKey, key_id: KeyId, config: Config) -> Self {
        Repository {
            // Only for repairs, which must read storage as it is.
            cache: None,
            backend,
            key: Arc::new(key),
            key_id: Some(key_id),
            config,
            index: Index::default(),
            index_damage: Vec::new(),
            key_damage: Vec::new(),
            tree_packs: Default::default(),
        }
    }

    /// Whether this handle's key opens the repository's objects: true when
    /// one of a few index or snapshot files opens with it, or when there
    /// are none yet (nothing to tell by).
    async fn key_opens_objects(&self) -> Result<bool> {
        let mut tried = 0;
        for kind in [Kind::Index, Kind::Snapshot] {
            for l in self.list(kind.folder()).await?.into_iter().take(3) {
                let sealed = match self.backend.get(&format!("{}/{}", kind.dir(), l.name)).await {
                    Ok(b) => b,
                    Err(e) if e.is_unreadable() || matches!(e, Error::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                tried += 1;
                if hex::encode(storage_hash(&sealed)) == l.name
                    && self.key.data.open(kind.aad(), &sealed, &String::new).is_ok()
                {
                    return Ok(true);
                }
            }
        }
        Ok(tried == 0)
    }

    /// Replaces the config object with this handle's config. Every field of
    /// it but the random id follows from the format version, so a damaged
    /// config loses nothing but that id.
    pub async fn rewrite_config(&self) -> Result<()> {
        let sealed = self.key.data.seal(CONFIG_AAD, &encode(&self.config)?);
        self.backend.delete("config").await?;
        self.backend.put_new("config", Bytes::from(sealed)).await
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

    /// Removes the key file `id`. The one this handle was opened with is
    /// refused: removing it could leave no password that opens the repository.
    pub async fn remove_key(&self, id: &KeyId) -> Result<()> {
        if self.key_id.as_ref() == Some(id) {
            return Err(Error::Invalid(
                "refusing to remove the key this command was opened with; open with another password to remove it"
                    .into(),
            ));
        }
        let name = format!("keys/{id}");
        if self.backend.head(&name).await?.is_none() {
            return Err(Error::NotFound(name));
        }
        self.backend.delete(&name).await
    }

    /// Where copies of this remote repository's objects are kept, if anywhere.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
    pub fn key(&self) -> &Arc<MasterKey> {
        &self.key
    }
    /// The key file this handle was opened with.
    pub fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn index(&self) -> &Index {
        &self.index
    }
    /// Index files that could not be read at the last load: the blobs they
    /// named look missing until `backer repair index` rebuilds them.
    pub fn index_damage(&self) -> &[Damaged] {
        &self.index_damage
    }
    /// Key files that could not be read when this handle was opened.
    pub fn key_damage(&self) -> &[Damaged] {
        &self.key_damage
    }

    /// Every key file that is damaged: one whose bytes no longer hash to its
    /// name, or that is not a key file at all. Found without any password,
    /// so a damaged key is seen whichever password opened the repository.
    pub async fn damaged_keys(&self) -> Result<Vec<Damaged>> {
        let mut out = Vec::new();
        for k in self.list(Dir::Keys).await? {
            let name = format!("keys/{}", k.name);
            let reason = match self.backend.get(&name).await {
                Err(Error::NotFound(_)) => continue,
                Err(e) if e.is_damage() => e.to_string(),
                // Another user's key (keys are 0600): not damage.
                Err(e) if e.is_unreadable() => {
                    tracing::info!("key file {name} cannot be read by this user: {e}");
                    continue;
                }
                Err(e) => return Err(e),
                Ok(raw) if hex::encode(storage_hash(&raw)) != k.name => {
                    "content does not match its name (altered or truncated)".to_string()
                }
                Ok(raw) => match serde_json::from_slice::<KeyFile>(&raw) {
                    Ok(_) => continue,
                    Err(e) => format!("not a key file: {e}"),
                },
            };
            out.push(Damaged { name, reason });
        }
        Ok(out)
    }

    /// Every object in `dir`, by id; names that are not ids are skipped.
    pub async fn list(&self, dir: Dir) -> Result<Vec<Listed>> {
        list_ids(&self.backend, dir).await
    }

    /// Reads every index file again. A damaged one is reported (see
    /// [`Repository::index_damage`]) and skipped: what the others name stays
    /// readable.
    pub async fn reload_index(&mut self) -> Result<()> {
        self.load_index(None).await.map(|_| ())
    }

    /// [`Repository::reload_index`], leaving out packs that storage no
    /// longer holds (one listing of `data/`): their blobs count as missing,
    /// so a backup stores them again instead of naming lost data, and a
    /// blob stored twice is read from the copy that is still there. Returns
    /// the missing packs, each reported.
    pub async fn reload_index_of_stored_packs(&mut self) -> Result<Vec<PackId>> {
        let stored: HashSet<PackId> = self
            .list(Dir::Data)
            .await?
            .into_iter()
            .filter_map(|l| l.name.parse().ok())
            .collect();
        let missing = self.load_index(Some(&stored)).await?;
        if !missing.is_empty() {
            tracing::warn!(
                "{} packs the index names are missing from storage (e.g. {}); what only they held is \
                 lost, a backup stores it again, and `backer repair index` drops them from the index",
                missing.len(),
                missing[0]
            );
        }
        Ok(missing)
    }

    /// Fails with [`Error::NeedsRepair`] when the index names packs storage
    /// lacks: their blobs may have copies elsewhere that only a rebuilt
    /// index finds, so nothing may be dropped or deleted until then.
    pub async fn refuse_missing_packs(&self) -> Result<()> {
        let missing = self.missing_packs().await?;
        match missing.first() {
            None => Ok(()),
            Some(first) => Err(Error::NeedsRepair(format!(
                "the index names {} packs missing from storage (e.g. {first}); run `backer repair index` first",
                missing.len(),
            ))),
        }
    }

    /// Packs the index names that storage does not hold.
    pub async fn missing_packs(&self) -> Result<Vec<PackId>> {
        let stored: HashSet<PackId> = self
            .list(Dir::Data)
            .await?
            .into_iter()
            .filter_map(|l| l.name.parse().ok())
            .collect();
        let mut missing: Vec<PackId> = self
            .index
            .packs()
            .map(|(id, _)| id)
            .filter(|id| !stored.contains(id))
            .collect();
        missing.sort();
        Ok(missing)
    }

    /// Loads the index, keeping only packs in `stored` when given; returns
    /// the packs left out.
    async fn load_index(&mut self, stored: Option<&HashSet<PackId>>) -> Result<Vec<PackId>> {
        // Each file is added and dropped as it arrives, so loading never holds
        // every index file and the index at once.
        let listed = self.list(Dir::Index).await?;
        if let Some(c) = &self.cache {
            let names: HashSet<String> = listed.iter().map(|l| format!("index/{}", l.name)).collect();
            c.retain("index", |n| names.contains(n));
        }
        let mut index = Index::default();
        let mut damage = Vec::new();
        let mut missing = HashSet::new();
        let this = &*self;
        let mut files = futures::stream::iter(listed)
            .map(|l| async move { (this.load_object::<IndexFile>(Kind::Index, &l.name).await, l.name) })
            .buffer_unordered(FETCH_CONCURRENCY);
        while let Some((file, name)) = files.next().await {
            match file {
                Ok(mut f) => {
                    if let Some(stored) = stored {
                        missing.extend(f.packs.iter().map(|p| p.id).filter(|id| !stored.contains(id)));
                        f.packs.retain(|p| stored.contains(&p.id));
                    }
                    index.load(&f)
                }
                Err(Error::NotFound(_)) => {} // replaced by a prune meanwhile
                Err(e) if e.is_damage() => damage.push(Damaged {
                    name: format!("index/{name}"),
                    reason: Chain(&e).to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        drop(files);
        index.finish_loading();
        if let Some(c) = &self.cache {
            let in_index = |n: &str| {
                n.rsplit('/')
                    .next()
                    .and_then(|id| id.parse::<PackId>().ok())
                    .is_some_and(|id| index.get_pack(&id).is_some())
            };
            c.retain("data", in_index);
        }
        for d in &damage {
            tracing::warn!(
                "index file {} is damaged and was skipped ({}); blobs only it names look missing until \
                 `backer repair index` rebuilds the index from the packs",
                d.name,
                d.reason
            );
        }
        self.index = index;
        self.index_damage = damage;
        let mut missing: Vec<PackId> = missing.into_iter().collect();
        missing.sort();
        Ok(missing)
    }

    /// A second handle on this repository with the index as stored now (of
    /// packs still stored), so a long-running process can take in other
    /// writers' blobs while readers of the old handle carry on.
    pub async fn refreshed(&self) -> Result<Repository> {
        let mut r = Repository {
            backend: self.backend.clone(),
            key: Arc::clone(&self.key),
            key_id: self.key_id,
            config: self.config.clone(),
            index: Index::default(),
            index_damage: Vec::new(),
            key_damage: self.key_damage.clone(),
            tree_packs: Arc::clone(&self.tree_packs),
            cache: self.cache.clone(),
        };
        r.reload_index_of_stored_packs().await?;
        Ok(r)
    }

    /// Every readable index file, and the damaged ones.
    pub async fn load_index_files(&self) -> Result<(Vec<(IndexId, IndexFile)>, Vec<Damaged>)> {
        let listed = self.list(Dir::Index).await?;
        let loaded: Vec<(String, Result<IndexFile>)> = futures::stream::iter(listed)
            .map(|l| async move { (l.name.clone(), self.load_object(Kind::Index, &l.name).await) })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut files = Vec::new();
        let mut damaged = Vec::new();
        for (name, f) in loaded {
            match f {
                Ok(f) => files.push((name.parse()?, f)),
                Err(Error::NotFound(_)) => {}
                Err(e) if e.is_damage() => damaged.push(Damaged {
                    name: format!("index/{name}"),
                    reason: Chain(&e).to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok((files, damaged))
    }

    async fn save_object<T: Serialize>(&self, kind: Kind, value: &T) -> Result<[u8; 32]> {
        let (name, bytes) = seal_object(&self.key, kind, value)?;
        self.backend.put_new(&name, bytes.clone()).await?;
        Ok(self.saved(&name, &bytes))
    }

    /// The id of the object `name` just stored as `bytes`, which the next
    /// command reads back: cached from the start.
    fn saved(&self, name: &str, bytes: &Bytes) -> [u8; 32] {
        if let Some(c) = &self.cache {
            c.put(name, bytes);
        }
        storage_hash(bytes)
    }

    async fn load_object<T: DeserializeOwned>(&self, kind: Kind, name: &str) -> Result<T> {
        let sealed = self.get_cached(&format!("{}/{}", kind.dir(), name), None).await?;
        open_object(&self.key, kind, name, &sealed)
    }

    /// The object `name` (of `size` bytes, when known), from the cache when
    /// it holds a copy (index, snapshot and pack objects only; see
    /// [`crate::cache`]).
    async fn get_cached(&self, name: &str, size: Option<u64>) -> Result<Bytes> {
        if let Some(b) = self.cache.as_ref().and_then(|c| c.get(name, size)) {
            return Ok(b);
        }
        let b = self.backend.get(name).await?;
        if let Some(c) = &self.cache {
            c.put(name, &b);
        }
        Ok(b)
    }

    /// Stores an index file; call only after the packs it names are stored.
    /// The in-memory index is not changed (see [`Repository::reload_index`]).
    /// Under `lock` it is written as [`Repository::save_under_lock`] says;
    /// without, the caller checks its lock before the snapshot that needs it.
    pub async fn write_index(&self, file: &IndexFile, lock: Option<&LockCheck>) -> Result<IndexId> {
        let id = match lock {
            Some(lock) => self.save_under_lock(Kind::Index, file, lock).await?,
            None => self.save_object(Kind::Index, file).await?,
        };
        Ok(IndexId(id))
    }

    /// Stores a snapshot; call only after the index naming its blobs is stored.
    pub async fn save_snapshot(&self, snap: &Snapshot, lock: &Lock) -> Result<SnapshotId> {
        Ok(SnapshotId(
            self.save_under_lock(Kind::Snapshot, snap, &lock.check()).await?,
        ))
    }

    /// Writes an object that must not outlive a prune it raced: the lock is
    /// checked before and again after. A process paused between the two past
    /// its lock's validity may have been overtaken by a prune that removed
    /// what the object names; then the object is taken back, and the caller
    /// hears that its lock expired. So is one whose write failed: it may
    /// have landed all the same (a lost reply, a call given up on).
    async fn save_under_lock<T: Serialize>(
        &self,
        kind: Kind,
        value: &T,
        lock: &LockCheck,
    ) -> Result<[u8; 32]> {
        let _writing = lock.hold_for_write().await;
        lock.check_fresh().await?;
        let (name, bytes) = seal_object(&self.key, kind, value)?;
        let put = self.backend.put_new(&name, bytes.clone()).await;
        if let Err(lost) = lock.check_fresh().await {
            let why = match lost {
                Error::LockExpired(why) => why,
                e => format!("the lock could not be checked after writing ({})", Chain(&e)),
            };
            return Err(Error::LockExpired(match self.backend.delete(&name).await {
                Ok(()) => format!("{why}; {name}, written meanwhile, was removed again"),
                Err(e) => format!(
                    "{why}; {name}, written meanwhile, could not be removed ({}): run `backer check`, \
                     and if it names missing data, `backer repair index` then `backer repair snapshots`",
                    Chain(&e)
                ),
            }));
        }
        put?;
        Ok(self.saved(&name, &bytes))
    }

    pub async fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        self.load_object(Kind::Snapshot, &id.to_hex()).await
    }

    /// Removes these snapshots (their data stays until a prune). Checks the
    /// lock first: a holder paused past its lock's life must not delete.
    pub async fn forget(&self, ids: &[SnapshotId], lock: &Lock) -> Result<()> {
        lock.check_fresh().await?;
        for id in ids {
            self.backend
                .delete(&format!("{}/{id}", Dir::Snapshots.name()))
                .await?;
        }
        Ok(())
    }

    /// Every snapshot that can be read, oldest first, and the damaged ones
    /// by name. Failing to reach storage is an error; one bad file is not.
    pub async fn load_snapshots(&self) -> Result<SnapshotList> {
        let listed = self.list(Dir::Snapshots).await?;
        if let Some(c) = &self.cache {
            let names: HashSet<String> = listed.iter().map(|l| format!("snapshots/{}", l.name)).collect();
            c.retain("snapshots", |n| names.contains(n));
        }
        let loaded: Vec<(String, Result<Snapshot>)> = futures::stream::iter(listed)
            .map(|l| async move { (l.name.clone(), self.load_object(Kind::Snapshot, &l.name).await) })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut out = SnapshotList::default();
        for (name, s) in loaded {
            match s {
                Ok(snapshot) => out.snapshots.push(SnapshotEntry {
                    id: name.parse()?,
                    snapshot,
                }),
                Err(Error::NotFound(_)) => {} // forgotten meanwhile
                Err(e) if e.is_damage() => out.damaged.push(Damaged {
                    name: format!("snapshots/{name}"),
                    reason: Chain(&e).to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        out.snapshots
            .sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
        out.damaged.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// All readable snapshots, oldest first; damaged ones are logged and
    /// left out (see [`Repository::load_snapshots`] to act on them).
    pub async fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let list = self.load_snapshots().await?;
        for d in &list.damaged {
            tracing::warn!(
                "snapshot file {} is damaged and was skipped ({}); `backer repair snapshots` removes it",
                d.name,
                d.reason
            );
        }
        Ok(list.snapshots)
    }

    /// The parent of a backup of `paths` by `host` with `tags` (see
    /// [`crate::snapshot::parent`]).
    pub async fn parent_snapshot(
        &self,
        host: &str,
        paths: &[String],
        tags: &[String],
    ) -> Result<Option<SnapshotEntry>> {
        let all = self.snapshots().await?;
        Ok(crate::snapshot::parent(&all, host, paths, tags).cloned())
    }

    /// Resolves `latest`, a full id, or a unique id prefix among the
    /// snapshots `filter` matches (see [`snapshot::find`]).
    pub async fn find_snapshot(&self, spec: &str, filter: &SnapshotFilter) -> Result<SnapshotEntry> {
        crate::snapshot::find(self.snapshots().await?, spec, filter)
    }

    /// Reads, decrypts and decompresses one blob.
    pub async fn load_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.index.get(id).ok_or(Error::NotIndexed(*id))?;
        self.load_blob_at(&loc).await
    }

    /// Reads one blob from where `loc` says it is. A tree from an object
    /// store comes from its whole pack, read once and kept.
    pub async fn load_blob_at(&self, loc: &Location) -> Result<Vec<u8>> {
        let e = loc.entry;
        if e.kind == pack::BlobType::Tree && self.backend.is_remote() {
            let cached = self.tree_packs.lock().get(&loc.pack);
            let whole = match cached {
                Some(b) => b,
                None => {
                    let size = self.index.get_pack(&loc.pack);
                    let b = self.get_cached(&pack::pack_name(&loc.pack), size).await?;
                    self.tree_packs.lock().insert(loc.pack, b.clone());
                    b
                }
            };
            let sealed = whole
                .get(e.offset as usize..e.offset as usize + e.len as usize)
                .ok_or_else(|| Error::corrupt(format!("pack {} is shorter than the index says", loc.pack)))?;
            return pack::open_blob(&self.key.data, &e, sealed);
        }
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
        self.decode_tree(id, &raw)
    }

    /// Reads the tree `id` from where `loc` says it is.
    pub async fn load_tree_at(&self, id: &BlobId, loc: &Location) -> Result<Tree> {
        let raw = self.load_blob_at(loc).await?;
        self.decode_tree(id, &raw)
    }

    fn decode_tree(&self, id: &BlobId, raw: &[u8]) -> Result<Tree> {
        if chunk::blob_id(&self.key.chunk, raw) != *id {
            return Err(Error::corrupt(format!(
                "tree {id}: content does not match its id"
            )));
        }
        decode(raw, &format!("tree {id}"))
    }

    /// The header of the pack `id`: what it holds, read from its tail in
    /// two ranged reads, not the whole pack.
    pub async fn read_pack_header(&self, id: &PackId, size: u64) -> Result<Vec<pack::PackEntry>> {
        pack::read_header_from(&self.backend, &self.key.data, id, size).await
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
