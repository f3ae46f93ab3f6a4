//! A backup, as a pipeline that keeps every core busy with bounded memory:
//!
//! ```text
//! walker ──files──▶ readers (cut + hash + dedup) ──new chunks──▶ compressors ──▶ packer ──▶ storage
//!    └──entries in order──▶ assembler (waits for each file's chunk list, builds trees) ──trees──▶ packer
//! ```
//!
//! Every channel is bounded, so memory depends on the number of threads and
//! the depth of the tree, not on the number of files. New chunks travel in
//! batches of about [`BATCH_BYTES`], so a small file costs no hand-off of its
//! own between threads. Files unchanged since the parent snapshot (same size,
//! mtime, ctime and inode) are not read again.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use parking_lot::{Condvar, Mutex};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::chunk::{self, ChunkError, Compressor};
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::{BlobId, SnapshotId};
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::repository::{Repository, encode};
use crate::snapshot::{self, Snapshot, Summary};
use crate::store::{BackupStore, LocalStore};
use crate::tree::{Extent, Node, NodeKind, Time, Tree};

/// How many errors a snapshot records by name (all are counted).
const MAX_RECORDED_ERRORS: usize = 100;

/// New chunks are passed on in batches of about this many bytes: on two
/// cores, a hand-off between threads for each small file cost more time
/// than compressing it (a first backup of /usr took 6 % longer).
const BATCH_BYTES: usize = 256 << 10;

#[derive(Debug, Clone, Default)]
pub enum ParentChoice {
    /// The newest snapshot of the same host and paths.
    #[default]
    Auto,
    /// Read every file.
    None,
    Id(SnapshotId),
}

#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Where the paths are read from: the snapshot records `root/x` as `/x`.
    /// `/` (or empty) for a host's own files; a volume's directory for a
    /// volume, so its snapshots look the same whichever pod or node mounted it.
    pub root: PathBuf,
    pub paths: Vec<PathBuf>,
    pub excludes: Vec<String>,
    pub tags: Vec<String>,
    pub parent: ParentChoice,
    pub hostname: Option<String>,
    /// Worker threads per stage; 0 means one per core.
    pub threads: usize,
    /// Count files first so progress can show a total and an ETA.
    pub scan: bool,
    /// Files and bytes the backup is expected to hold, known beforehand
    /// (its parent's). With `scan`, progress starts from them instead of
    /// walking the tree a second time only to count: on an unchanged
    /// re-run that walk is as long as the backup itself. When not given,
    /// [`backup`] takes the parent snapshot's.
    pub expected: Option<(u64, u64)>,
    /// Cancelling it stops the backup at the next file or chunk: it then
    /// ends with [`Error::Cancelled`] and writes no snapshot (what it
    /// stored already is reused by the next backup).
    pub cancel: CancellationToken,
}

impl BackupOptions {
    fn root(&self) -> PathBuf {
        if self.root.as_os_str().is_empty() {
            PathBuf::from("/")
        } else {
            self.root.clone()
        }
    }
}

/// Live counters for a progress display; updated by the pipeline.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub scan_done: AtomicBool,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub new_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// What a finished backup reports.
#[derive(Debug)]
pub struct BackupOutcome {
    pub id: SnapshotId,
    pub snapshot: Snapshot,
    /// Every error and warning, for the user (the snapshot keeps the first ones).
    pub messages: Vec<String>,
}

/// Decides which paths are left out. A pattern with a `/` matches the whole
/// absolute path; one without matches any file or directory name.
#[derive(Debug, Clone)]
pub struct Excluder {
    names: GlobSet,
    paths: GlobSet,
}

impl Excluder {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in patterns {
            let trimmed = p.trim_end_matches('/');
            if trimmed.is_empty() {
                return Err(Error::Invalid(format!("exclude pattern {p:?} matches nothing")));
            }
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::BadPattern {
                    pattern: p.clone(),
                    source: e,
                })?;
            if trimmed.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| Error::BadPattern {
                pattern: patterns.join(" "),
                source: e,
            })
        };
        Ok(Excluder {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    pub fn is_excluded(&self, path: &Path, name: &[u8]) -> bool {
        self.names.is_match(Path::new(std::ffi::OsStr::from_bytes(name))) || self.paths.is_match(path)
    }
}

/// Which parts of the file system a backup covers: every given path, and the
/// directories above them (recorded with their own metadata, nothing else).
#[derive(Debug)]
enum Selection {
    All,
    Some(BTreeMap<Vec<u8>, Selection>),
}

fn normalize(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Where the snapshot path `path` (absolute, normalized) is read from.
fn on_disk(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn build_selection(paths: &[PathBuf]) -> Selection {
    let mut root = Selection::Some(BTreeMap::new());
    for p in paths {
        let comps: Vec<Vec<u8>> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes().to_vec()),
                _ => None,
            })
            .collect();
        let mut cur = &mut root;
        for c in comps {
            cur = match cur {
                Selection::All => break,
                Selection::Some(map) => map.entry(c).or_insert_with(|| Selection::Some(BTreeMap::new())),
            };
        }
        *cur = Selection::All;
    }
    root
}

/// What the walker tells the assembler, in tree order.
enum Item {
    EnterDir(Node),
    ExitDir,
    Leaf(Node),
    File(Node, Receiver<FileOutcome>),
}

type FileOutcome = std::result::Result<FileRead, String>;

struct FileRead {
    content: Vec<Extent>,
    size: u64,
    changed: bool,
}

/// A file for a reader: opened from the directory the walker listed (held
/// open meanwhile), so a path swapped above it cannot redirect the read.
struct FileJob {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    /// For messages only.
    path: PathBuf,
    /// What the walker found: the opened file must be the same one, and a
    /// different size or mtime after reading means it changed meanwhile.
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Time,
    reply: Sender<FileOutcome>,
}

struct NewChunk {
    kind: BlobType,
    id: BlobId,
    data: Vec<u8>,
}

struct PackerMsg {
    kind: BlobType,
    id: BlobId,
    payload: Vec<u8>,
    raw_len: u32,
}

/// New chunks held until there are `limit` bytes of them.
struct Batch {
    chunks: Vec<NewChunk>,
    bytes: usize,
    limit: usize,
}

impl Batch {
    fn new(limit: usize) -> Batch {
        Batch {
            chunks: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    /// Adds `chunk`; gives back the batch once it is full.
    fn push(&mut self, chunk: NewChunk) -> Option<Vec<NewChunk>> {
        self.bytes += chunk.data.len();
        self.chunks.push(chunk);
        if self.bytes >= self.limit {
            self.take()
        } else {
            None
        }
    }

    /// What is held, if anything.
    fn take(&mut self) -> Option<Vec<NewChunk>> {
        self.bytes = 0;
        (!self.chunks.is_empty()).then(|| std::mem::take(&mut self.chunks))
    }
}

/// Sends a reader's new chunks on, first taking budget for the store's
/// answer when it is asked.
fn pass_on(shared: &Shared<'_>, to: &Sender<Vec<NewChunk>>, chunks: Option<Vec<NewChunk>>) -> Result<()> {
    let Some(chunks) = chunks else {
        return Ok(());
    };
    if let Some(b) = &shared.asking {
        b.take(chunks.iter().map(|c| c.data.len()).sum(), || shared.aborted())?;
    }
    to.send(chunks)
        .map_err(|_| Error::Interrupted("the backup stopped".into()))
}

/// Bytes waiting for the store's answer on which chunks it lacks. The queue
/// is long in chunks (so one question covers many small files) and bounded
/// in bytes (so large chunks cannot pile up).
struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

impl Budget {
    fn new(cap: usize) -> Budget {
        Budget {
            left: Mutex::new(cap),
            freed: Condvar::new(),
            cap,
        }
    }

    fn take(&self, n: usize, stopped: impl Fn() -> bool) -> Result<()> {
        let n = n.min(self.cap);
        let mut left = self.left.lock();
        while *left < n {
            if stopped() {
                return Err(Error::Interrupted("the backup stopped".into()));
            }
            self.freed
                .wait_for(&mut left, std::time::Duration::from_millis(100));
        }
        *left -= n;
        Ok(())
    }

    fn give(&self, n: usize) {
        *self.left.lock() += n.min(self.cap);
        self.freed.notify_all();
    }
}

/// Bytes of new chunks that may wait on the store's answer.
const ASKING_BYTES: usize = 64 << 20;

/// Shared by all pipeline stages.
struct Shared<'a> {
    store: &'a dyn BackupStore,
    /// Present when the store negotiates which chunks it lacks.
    asking: Option<Budget>,
    excluder: Excluder,
    root: PathBuf,
    /// Blobs queued in this run, so each is stored once.
    seen: Mutex<HashSet<BlobId>>,
    progress: Arc<Progress>,
    abort: AtomicBool,
    cancel: CancellationToken,
    messages: Mutex<Vec<String>>,
    /// Entries left out or recorded incompletely; any makes the snapshot partial.
    errors: AtomicU64,
    changed: AtomicU64,
    files_read: AtomicU64,
}

impl Shared<'_> {
    /// Excludes match the path as the snapshot records it.
    fn is_excluded(&self, real: &Path, name: &[u8]) -> bool {
        match real.strip_prefix(&self.root) {
            Ok(rel) if self.root != Path::new("/") => {
                self.excluder.is_excluded(&Path::new("/").join(rel), name)
            }
            _ => self.excluder.is_excluded(real, name),
        }
    }

    fn is_new(&self, id: &BlobId) -> bool {
        if self.store.holds(id) {
            return false;
        }
        self.seen.lock().insert(*id)
    }

    /// Records a message for the user without counting it as an error.
    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.messages.lock().push(msg);
    }

    /// Records an entry that is missing from the snapshot or incomplete in
    /// it: whichever stage meets it, the snapshot is marked partial.
    fn report(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        self.warn(msg);
    }

    /// A stage failed, or the backup was cancelled: every stage stops.
    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.cancel.is_cancelled()
    }
}

/// Runs a backup into the local repository and stores its snapshot. Must be
/// called from a multi-thread tokio runtime: the pipeline runs on its own
/// threads meanwhile. The repository's in-memory index is left as it was (the
/// new blobs are in index files; [`Repository::reload_index`] reads them),
/// which keeps a one-shot backup's memory to what it needs.
pub async fn backup(
    repo: &Repository,
    lock: &Lock,
    opts: BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupOutcome> {
    let paths = resolve_paths(&opts.root(), &opts.paths)?;
    let path_strings: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let hostname = opts.hostname.clone().unwrap_or_else(snapshot::hostname);
    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Id(id) => Some((*id, repo.load_snapshot(id).await?)),
        ParentChoice::Auto => repo
            .parent_snapshot(&hostname, &path_strings, &opts.tags)
            .await?
            .map(|s| (s.id, s.snapshot)),
    };
    let mut opts = opts;
    if opts.expected.is_none() {
        opts.expected = parent.as_ref().map(|(_, s)| (s.summary.files, s.summary.bytes));
    }
    // A parent whose root cannot be read (a damaged index or pack) only
    // costs speed: every file is read again, and the backup still runs.
    let parent = match parent {
        Some((id, s)) => match repo.load_tree(&s.tree).await {
            Ok(tree) => Some((id, tree)),
            Err(e) if e.is_damage() => {
                tracing::warn!(
                    "the parent snapshot {} cannot be read ({e}); every file is read again",
                    id.short()
                );
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let store = LocalStore {
        repo,
        lock: Some(lock),
        handle: Handle::current(),
    };
    let (snap, messages) = tokio::task::block_in_place(|| archive(&store, &opts, parent, progress))?;
    // A process paused past its lock's validity may have been overtaken by a
    // prune that removed chunks this snapshot reuses: stop instead.
    lock.check_fresh().await?;
    let id = repo.save_snapshot(&snap).await?;
    Ok(BackupOutcome {
        id,
        snapshot: snap,
        messages,
    })
}

/// The absolute, normalized, existing paths a backup covers, sorted.
pub fn resolve_paths(root: &Path, paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        return Err(Error::Invalid("no path to back up".into()));
    }
    let mut out = Vec::new();
    for p in paths {
        let n = normalize(p)?;
        let real = on_disk(root, &n);
        std::fs::symlink_metadata(&real).map_err(|e| Error::io("read", &real, e))?;
        out.push(n);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Reads the paths of `opts` into `store` and returns the snapshot to save
/// (not yet saved: where it goes is the caller's business) with every
/// warning. Blocking: call it outside async code. `parent` is the snapshot
/// to compare with and its root tree.
pub fn archive(
    store: &dyn BackupStore,
    opts: &BackupOptions,
    parent: Option<(SnapshotId, Tree)>,
    progress: Arc<Progress>,
) -> Result<(Snapshot, Vec<String>)> {
    let started = Instant::now();
    let paths = resolve_paths(&opts.root(), &opts.paths)?;
    let path_strings: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let hostname = opts.hostname.clone().unwrap_or_else(snapshot::hostname);
    let excluder = Excluder::new(&opts.excludes)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        opts.threads
    };
    let selection = build_selection(&paths);
    let _ = fsmeta::raise_fd_limit();
    let shared = Shared {
        store,
        asking: store.negotiates().then(|| Budget::new(ASKING_BYTES)),
        excluder,
        root: opts.root(),
        seen: Mutex::new(HashSet::new()),
        progress: Arc::clone(&progress),
        abort: AtomicBool::new(false),
        cancel: opts.cancel.clone(),
        messages: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        changed: AtomicU64::new(0),
        files_read: AtomicU64::new(0),
    };
    let (parent_id, parent_root) = match parent {
        Some((id, tree)) => (Some(id), Some(tree)),
        None => (None, None),
    };
    // Totals known beforehand spare the counting walk (see BackupOptions::expected).
    let scan = match opts.expected {
        Some((files, bytes)) if opts.scan && files > 0 => {
            progress.files_total.store(files, Ordering::Relaxed);
            progress.bytes_total.store(bytes, Ordering::Relaxed);
            false
        }
        _ => opts.scan,
    };
    let pipeline = run_pipeline(&shared, &selection, parent_root, threads, scan);
    // Whatever a stage said on its way out, a cancelled backup is that.
    if opts.cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let (root_id, stored_bytes, counts) = pipeline?;

    let Shared {
        messages,
        errors,
        changed,
        files_read,
        seen,
        ..
    } = shared;
    let messages = messages.into_inner();
    let errors = errors.into_inner();
    let seen = seen.into_inner();
    let new_blobs = seen.len() as u64;
    drop(seen);
    let summary = Summary {
        files: counts.files,
        dirs: counts.dirs,
        others: counts.others,
        bytes: counts.bytes,
        files_read: files_read.into_inner(),
        new_bytes: progress.new_bytes.load(Ordering::Relaxed),
        stored_bytes,
        new_blobs,
        errors,
        changed_while_read: changed.into_inner(),
        duration_secs: started.elapsed().as_secs_f64(),
    };
    let recorded: Vec<String> = messages
        .iter()
        .filter(|m| !m.contains("changed while"))
        .take(MAX_RECORDED_ERRORS)
        .cloned()
        .collect();
    let snap = Snapshot {
        time: chrono::Utc::now(),
        hostname,
        username: snapshot::username(),
        paths: path_strings,
        tags: opts.tags.clone(),
        excludes: opts.excludes.clone(),
        parent: parent_id,
        tree: root_id,
        partial: errors > 0,
        summary,
        errors: recorded,
        program_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok((snap, messages))
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    files: u64,
    dirs: u64,
    others: u64,
    bytes: u64,
}

/// The root tree, the bytes stored, and what was counted.
type PipelineResult = (BlobId, u64, Counts);

fn run_pipeline(
    shared: &Shared<'_>,
    selection: &Selection,
    parent_root: Option<Tree>,
    threads: usize,
    scan: bool,
) -> Result<PipelineResult> {
    let (item_tx, item_rx) = bounded::<Item>(4096);
    let (job_tx, job_rx) = bounded::<FileJob>(64);
    let (chunk_tx, chunk_rx) = bounded::<Vec<NewChunk>>(threads * 2);
    let (pack_tx, pack_rx) = bounded::<Vec<PackerMsg>>(threads * 2);
    let level = shared.store.zstd_level();
    // When the store must be asked which chunks it lacks, a dedup stage sits
    // between the readers and the compressors and asks in batches.
    let negotiates = shared.store.negotiates();
    let (asked_tx, asked_rx) = bounded::<Vec<NewChunk>>(NEGOTIATE_BATCH * 2);

    std::thread::scope(|s| {
        if scan {
            s.spawn(|| {
                scan_totals(shared, selection, &shared.root);
                shared.progress.scan_done.store(true, Ordering::Relaxed);
            });
        } else {
            shared.progress.scan_done.store(true, Ordering::Relaxed);
        }
        let walker = std::thread::Builder::new()
            .name("walker".into())
            .stack_size(fsmeta::WALK_STACK) // deep trees recurse
            .spawn_scoped(s, move || {
                let mut w = Walker {
                    shared,
                    items: item_tx,
                    jobs: job_tx,
                    depth: 0,
                };
                w.walk_root(selection, parent_root.as_ref())
            });
        let mut readers = Vec::new();
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let chunk_tx = if negotiates {
                asked_tx.clone()
            } else {
                chunk_tx.clone()
            };
            readers.push(s.spawn(move || {
                let mut buf = chunk::chunk_buffer();
                // The dedup stage batches its questions itself, and its
                // queue's bound in messages is what keeps millions of tiny
                // files from piling up there: it gets each chunk at once.
                let mut batch = Batch::new(if negotiates { 0 } else { BATCH_BYTES });
                loop {
                    let job = match job_rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty) => {
                            // Nothing to read yet: pass on what is held
                            // rather than sit on it while waiting.
                            if pass_on(shared, &chunk_tx, batch.take()).is_err() {
                                break;
                            }
                            match job_rx.recv() {
                                Ok(job) => job,
                                Err(_) => break,
                            }
                        }
                        Err(TryRecvError::Disconnected) => break,
                    };
                    if shared.aborted() {
                        break;
                    }
                    let outcome = read_file(shared, &job, &mut batch, &chunk_tx, &mut buf);
                    if job.reply.send(outcome).is_err() {
                        break;
                    }
                }
                // Fails only when the backup already stopped for another reason.
                let _ = pass_on(shared, &chunk_tx, batch.take());
            }));
        }
        drop(job_rx);
        let assembler_asked_tx = negotiates.then(|| asked_tx.clone());
        drop(asked_tx);
        let dedup = negotiates.then(|| {
            let chunk_tx = chunk_tx.clone();
            s.spawn(move || negotiate(shared, asked_rx, chunk_tx))
        });
        drop(chunk_tx);
        let mut compressors = Vec::new();
        for _ in 0..threads {
            let chunk_rx = chunk_rx.clone();
            let pack_tx = pack_tx.clone();
            compressors.push(s.spawn(move || -> Result<()> {
                let mut c = Compressor::new(level)?;
                for batch in chunk_rx {
                    let msgs = batch
                        .into_iter()
                        .map(|ch| PackerMsg {
                            kind: ch.kind,
                            id: ch.id,
                            payload: c.compress(&ch.data),
                            raw_len: ch.data.len() as u32,
                        })
                        .collect();
                    if pack_tx.send(msgs).is_err() {
                        break;
                    }
                }
                Ok(())
            }));
        }
        drop(chunk_rx);
        let assembler_pack_tx = pack_tx.clone();
        drop(pack_tx);
        let packer = s.spawn(move || -> Result<u64> {
            let mut p = shared.store.writer()?;
            for m in pack_rx.iter().flatten() {
                // Cancelled: what is queued is dropped, what is stored is
                // kept (finished below) for the next backup to reuse.
                if shared.cancel.is_cancelled() {
                    break;
                }
                if let Err(e) = p.add(m.kind, m.id, m.payload, m.raw_len) {
                    shared.abort.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            p.finish()
                .inspect_err(|_| shared.abort.store(true, Ordering::Relaxed))
        });

        let assembled = assemble(shared, item_rx, assembler_pack_tx, assembler_asked_tx, level);
        if assembled.is_err() {
            shared.abort.store(true, Ordering::Relaxed);
        }
        let walked = walker
            .map_err(|e| Error::Interrupted(format!("failed to start the walker: {e}")))
            .and_then(|h| {
                h.join()
                    .map_err(|_| Error::Interrupted("the walker panicked".into()))
            });
        for r in readers {
            if r.join().is_err() {
                return Err(Error::Interrupted("a reader thread panicked".into()));
            }
        }
        if let Some(d) = dedup {
            d.join()
                .map_err(|_| Error::Interrupted("the dedup thread panicked".into()))??;
        }
        for c in compressors {
            c.join()
                .map_err(|_| Error::Interrupted("a compressor thread panicked".into()))??;
        }
        let packed = packer
            .join()
            .map_err(|_| Error::Interrupted("the packer thread panicked".into()))??;
        walked??;
        let (root, counts) = assembled?;
        Ok((root, packed, counts))
    })
}

struct Walker<'s, 'r> {
    shared: &'s Shared<'r>,
    items: Sender<Item>,
    jobs: Sender<FileJob>,
    /// Directory levels below the root: bounded, for the stack.
    depth: usize,
}

/// Why an entry could not be examined, as the user reads it.
fn os_error(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Opens the directory `name` in `dir`. `follow` allows a symlink on the
/// way to a chosen path (a host's own `/var/run`); everywhere else a
/// directory swapped for a symlink is refused, so the walk never leaves
/// the directory it listed.
fn open_dir_at(dir: &OwnedFd, name: &[u8], follow: bool) -> rustix::io::Result<OwnedFd> {
    let mut flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    if !follow {
        flags |= OFlags::NOFOLLOW;
    }
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

impl Walker<'_, '_> {
    fn send(&self, item: Item) -> Result<()> {
        self.items
            .send(item)
            .map_err(|_| Error::Interrupted("the backup stopped".into()))
    }

    fn load_parent_subtree(&self, parent: Option<&Tree>, name: &[u8]) -> Option<Tree> {
        let id = parent?.find(name)?.subtree?;
        match self.shared.store.load_tree(&id) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("failed to load tree {id} of the parent snapshot, reading files again: {e}");
                None
            }
        }
    }

    /// Walks from the root, whose descriptor is opened here.
    fn walk_root(&mut self, sel: &Selection, parent: Option<&Tree>) -> Result<()> {
        let root = &self.shared.root;
        let fd = rustix::fs::open(
            root.as_path(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", root, os_error(e)))?;
        self.walk_selection(&Arc::new(fd), root, sel, parent)
    }

    /// Walks the directories above the chosen paths, entering only toward
    /// them. Everything is reached from the descriptor of the directory
    /// above, never through a path: a path is only for messages.
    fn walk_selection(
        &mut self,
        dir: &Arc<OwnedFd>,
        dir_path: &Path,
        sel: &Selection,
        parent: Option<&Tree>,
    ) -> Result<()> {
        match sel {
            Selection::All => self.walk_dir(dir, dir_path, parent),
            Selection::Some(children) => {
                for (name, child_sel) in children {
                    let path = dir_path.join(std::ffi::OsStr::from_bytes(name));
                    let st = match rustix::fs::statat(&**dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => st,
                        Err(e) => {
                            self.shared
                                .report(format!("failed to read {}: {}", path.display(), os_error(e)));
                            continue;
                        }
                    };
                    let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                    // Under a root (a volume whose contents its users
                    // control), a symlink on the way to a chosen path
                    // could lead anywhere on the node: never follow one.
                    let follow = self.shared.root == Path::new("/");
                    match child_sel {
                        Selection::All => self.entry(dir, &path, name.clone(), st, parent)?,
                        Selection::Some(_) if !is_dir && !follow => {
                            self.shared.report(format!(
                                "refused {}: a symlink or a file on the way to a chosen path",
                                path.display()
                            ));
                        }
                        Selection::Some(_) => {
                            let sub = match open_dir_at(dir, name, follow) {
                                Ok(fd) => Arc::new(fd),
                                Err(e) => {
                                    self.shared.report(format!(
                                        "failed to open {}: {}",
                                        path.display(),
                                        os_error(e)
                                    ));
                                    continue;
                                }
                            };
                            let node = fsmeta::node_from_stat(name.clone(), &st);
                            let subtree = self.load_parent_subtree(parent, name);
                            self.send(Item::EnterDir(node))?;
                            self.depth += 1;
                            let walked = self.walk_selection(&sub, &path, child_sel, subtree.as_ref());
                            self.depth -= 1;
                            walked?;
                            self.send(Item::ExitDir)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn walk_dir(&mut self, dir: &Arc<OwnedFd>, dir_path: &Path, parent: Option<&Tree>) -> Result<()> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        // A duplicate, not `Dir::read_from`: that opens "." and so needs
        // search permission, which a listable directory may lack.
        let listing = rustix::io::fcntl_dupfd_cloexec(&**dir, 0).and_then(rustix::fs::Dir::new);
        match listing {
            Ok(entries) => {
                for e in entries {
                    match e {
                        Ok(e) => {
                            let name = e.file_name().to_bytes();
                            if name != b"." && name != b".." {
                                names.push(name.to_vec());
                            }
                        }
                        Err(e) => {
                            self.shared.report(format!(
                                "failed to list {}: {}",
                                dir_path.display(),
                                os_error(e)
                            ));
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                self.shared
                    .report(format!("failed to list {}: {}", dir_path.display(), os_error(e)));
                return Ok(());
            }
        }
        names.sort();
        for name in names {
            if self.shared.aborted() {
                return Err(Error::Interrupted("the backup stopped".into()));
            }
            let path = dir_path.join(std::ffi::OsStr::from_bytes(&name));
            if self.shared.is_excluded(&path, &name) {
                continue;
            }
            match rustix::fs::statat(&**dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => self.entry(dir, &path, name, st, parent)?,
                Err(e) => self
                    .shared
                    .report(format!("failed to read {}: {}", path.display(), os_error(e))),
            }
        }
        Ok(())
    }

    /// Records the entry `name` of `dir` (found with `st`), and walks it
    /// when it is a directory.
    fn entry(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &Path,
        name: Vec<u8>,
        st: Stat,
        parent: Option<&Tree>,
    ) -> Result<()> {
        let mut node = fsmeta::node_from_stat(name, &st);
        match fsmeta::read_xattrs_at(dir.as_fd(), &node.name, path) {
            Ok(x) => node.xattrs = x,
            Err(e) => self.shared.report(format!(
                "failed to read extended attributes of {}: {e}",
                path.display()
            )),
        }
        match node.kind {
            NodeKind::Dir => {
                if self.depth >= fsmeta::MAX_DEPTH {
                    self.shared.report(format!(
                        "refused {}: deeper than {} directory levels",
                        path.display(),
                        fsmeta::MAX_DEPTH
                    ));
                    return Ok(());
                }
                let sub = match open_dir_at(dir, &node.name, false) {
                    Ok(fd) => fd,
                    Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => {
                        self.shared.report(format!(
                            "skipped {}: it was replaced between listing and reading ({})",
                            path.display(),
                            os_error(e)
                        ));
                        return Ok(());
                    }
                    Err(e) => {
                        // Recorded empty, with its own metadata, and reported.
                        self.shared
                            .report(format!("failed to list {}: {}", path.display(), os_error(e)));
                        self.send(Item::EnterDir(node))?;
                        return self.send(Item::ExitDir);
                    }
                };
                // The directory's metadata from what was opened, so that it
                // matches the content even if another took its name meanwhile.
                if let Ok(now) = rustix::fs::fstat(&sub) {
                    let xattrs = std::mem::take(&mut node.xattrs);
                    node = fsmeta::node_from_stat(std::mem::take(&mut node.name), &now);
                    node.xattrs = xattrs;
                }
                let subtree = self.load_parent_subtree(parent, &node.name);
                self.send(Item::EnterDir(node))?;
                self.depth += 1;
                let walked = self.walk_dir(&Arc::new(sub), path, subtree.as_ref());
                self.depth -= 1;
                walked?;
                self.send(Item::ExitDir)
            }
            NodeKind::File => {
                if let Some(old) = parent.and_then(|p| p.find(&node.name))
                    && self.unchanged(old, &node)
                {
                    node.content = old.content.clone();
                    self.shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .progress
                        .bytes_done
                        .fetch_add(node.size, Ordering::Relaxed);
                    return self.send(Item::Leaf(node));
                }
                let (tx, rx) = bounded(1);
                let job = FileJob {
                    dir: Arc::clone(dir),
                    name: node.name.clone(),
                    path: path.to_path_buf(),
                    dev: node.dev,
                    ino: node.inode,
                    size: node.size,
                    mtime: node.mtime,
                    reply: tx,
                };
                self.send(Item::File(node, rx))?;
                self.jobs
                    .send(job)
                    .map_err(|_| Error::Interrupted("the backup stopped".into()))
            }
            NodeKind::Symlink => match rustix::fs::readlinkat(&**dir, node.name.as_slice(), Vec::new()) {
                Ok(t) => {
                    node.link_target = Some(serde_bytes::ByteBuf::from(t.into_bytes()));
                    self.send(Item::Leaf(node))
                }
                Err(e) => {
                    self.shared
                        .report(format!("failed to read link {}: {}", path.display(), os_error(e)));
                    Ok(())
                }
            },
            _ => self.send(Item::Leaf(node)),
        }
    }

    fn unchanged(&self, old: &Node, new: &Node) -> bool {
        old.kind == NodeKind::File
            && old.size == new.size
            && old.mtime == new.mtime
            && old.ctime == new.ctime
            && old.inode == new.inode
            && old.content.iter().all(|e| match e {
                Extent::Data { id, .. } => self.shared.store.parent_chunk_stored(id),
                Extent::Hole { .. } => true,
            })
    }
}

/// Counts files and bytes ahead of the walker, for progress totals only.
fn scan_totals(shared: &Shared<'_>, sel: &Selection, dir: &Path) {
    match sel {
        Selection::Some(children) => {
            for (name, child) in children {
                let path = dir.join(std::ffi::OsStr::from_bytes(name));
                match child {
                    Selection::All => scan_path(shared, &path),
                    Selection::Some(_) => scan_totals(shared, child, &path),
                }
            }
        }
        Selection::All => scan_path(shared, dir),
    }
}

fn scan_path(shared: &Shared<'_>, path: &Path) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        if shared.aborted() {
            return;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                for e in rd.flatten() {
                    let child = e.path();
                    if !shared.is_excluded(&child, e.file_name().as_bytes()) {
                        stack.push(child);
                    }
                }
            }
        } else if md.is_file() {
            shared.progress.files_total.fetch_add(1, Ordering::Relaxed);
            shared
                .progress
                .bytes_total
                .fetch_add(md.size(), Ordering::Relaxed);
        }
    }
}

/// Reads one file: cut, hash, queue new chunks. Never follows a symlink and
/// never blocks on a fifo put where a file was.
fn read_file(
    shared: &Shared<'_>,
    job: &FileJob,
    batch: &mut Batch,
    chunks: &Sender<Vec<NewChunk>>,
    buf: &mut [u8],
) -> FileOutcome {
    let path = &job.path;
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("failed to {what} {}: {e}", path.display());
    let replaced = || {
        format!(
            "skipped {}: it was replaced between listing and reading",
            path.display()
        )
    };
    let fd = match rustix::fs::openat(
        &*job.dir,
        job.name.as_slice(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // NOFOLLOW met a symlink where the file was.
        Err(rustix::io::Errno::LOOP) => return Err(replaced()),
        Err(e) => return Err(fail("open", &os_error(e))),
    };
    let mut file = File::from(fd);
    let md = file.metadata().map_err(|e| fail("stat", &e))?;
    if !md.is_file() || md.ino() != job.ino || md.dev() != job.dev {
        return Err(replaced());
    }
    // Read no further than the size the file has now: a file growing faster
    // than it is read would otherwise keep the backup reading forever. Any
    // growth is reported below as a change.
    let limit = md.size();
    let regions = fsmeta::data_regions(&file, &md).map_err(|e| fail("map the holes of", &e))?;
    let content = std::cell::RefCell::new(Vec::new());
    let mut sink = |data: &[u8]| -> Result<()> {
        // A large file is not read to its end once the backup stops.
        if shared.aborted() {
            return Err(Error::Interrupted("the backup stopped".into()));
        }
        let id = chunk::blob_id(shared.store.chunk_keys(), data);
        content.borrow_mut().push(Extent::Data {
            id,
            len: data.len() as u32,
        });
        shared
            .progress
            .bytes_done
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if shared.is_new(&id) {
            shared
                .progress
                .new_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let full = batch.push(NewChunk {
                kind: BlobType::Data,
                id,
                data: data.to_vec(),
            });
            pass_on(shared, chunks, full)?;
        }
        Ok(())
    };
    let map_err = |e: ChunkError| match e {
        ChunkError::Read(e) => fail("read", &e),
        ChunkError::Sink(e) => e.to_string(),
    };
    let keys = shared.store.chunk_keys();
    let size = match regions {
        None => chunk::for_each_chunk(keys, (&mut file).take(limit), buf, &mut sink).map_err(map_err)?,
        Some(regions) => {
            // Holes are recorded, not read: a 1 TB sparse file costs its data only.
            let mut pos = 0u64;
            let mut shrank = false;
            for (start, len) in regions {
                if start > pos {
                    content.borrow_mut().push(Extent::Hole { len: start - pos });
                }
                file.seek(SeekFrom::Start(start))
                    .map_err(|e| fail("seek in", &e))?;
                let n =
                    chunk::for_each_chunk(keys, (&mut file).take(len), buf, &mut sink).map_err(map_err)?;
                pos = start + n;
                if n < len {
                    // The file shrank while it was read: it ends here, and
                    // no hole may stand for bytes it no longer has.
                    shrank = true;
                    break;
                }
            }
            if md.size() > pos && !shrank {
                content.borrow_mut().push(Extent::Hole { len: md.size() - pos });
                pos = md.size();
            }
            pos
        }
    };
    let content = content.into_inner();
    let after = file.metadata().map_err(|e| fail("stat", &e))?;
    let changed = after.size() != job.size
        || after.mtime() != job.mtime.secs
        || after.mtime_nsec() != i64::from(job.mtime.nanos);
    if changed {
        shared.changed.fetch_add(1, Ordering::Relaxed);
        shared.warn(format!(
            "{} changed while it was read; the snapshot holds what was read",
            path.display()
        ));
    }
    shared.files_read.fetch_add(1, Ordering::Relaxed);
    shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(FileRead {
        content,
        size,
        changed,
    })
}

/// Builds trees in walk order: waits for each file's chunk list, stores each
/// directory's tree when the walker leaves it, and finally the root.
fn assemble(
    shared: &Shared<'_>,
    items: Receiver<Item>,
    packer: Sender<Vec<PackerMsg>>,
    asked: Option<Sender<Vec<NewChunk>>>,
    level: i32,
) -> Result<(BlobId, Counts)> {
    let mut compressor = Compressor::new(level)?;
    let mut counts = Counts::default();
    let mut stack: Vec<(Option<Node>, Vec<Node>)> = vec![(None, Vec::new())];
    let mut store_tree = |nodes: Vec<Node>| -> Result<BlobId> {
        let mut tree = Tree { nodes };
        tree.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = encode(&tree)?;
        let id = chunk::blob_id(shared.store.chunk_keys(), &bytes);
        if !shared.is_new(&id) {
            return Ok(id);
        }
        if let Some(asked) = &asked {
            // The store may hold this tree already (an unchanged directory).
            if let Some(b) = &shared.asking {
                b.take(bytes.len(), || shared.aborted())?;
            }
            asked
                .send(vec![NewChunk {
                    kind: BlobType::Tree,
                    id,
                    data: bytes,
                }])
                .map_err(|_| Error::Interrupted("the backup stopped".into()))?;
        } else {
            let payload = compressor.compress(&bytes);
            packer
                .send(vec![PackerMsg {
                    kind: BlobType::Tree,
                    id,
                    payload,
                    raw_len: bytes.len() as u32,
                }])
                .map_err(|_| Error::Interrupted("the packer stopped".into()))?;
        }
        Ok(id)
    };
    for item in items {
        match item {
            Item::EnterDir(node) => stack.push((Some(node), Vec::new())),
            Item::ExitDir => {
                let (node, children) = stack
                    .pop()
                    .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))?;
                let mut node = node.ok_or_else(|| Error::Interrupted("walker left the root".into()))?;
                node.subtree = Some(store_tree(children)?);
                counts.dirs += 1;
                top(&mut stack)?.push(node);
            }
            Item::Leaf(node) => {
                match node.kind {
                    NodeKind::File => {
                        counts.files += 1;
                        counts.bytes += node.size;
                    }
                    _ => counts.others += 1,
                }
                top(&mut stack)?.push(node);
            }
            Item::File(mut node, rx) => match rx.recv() {
                Ok(Ok(read)) => {
                    node.content = read.content;
                    node.size = read.size;
                    let _ = read.changed;
                    counts.files += 1;
                    counts.bytes += node.size;
                    top(&mut stack)?.push(node);
                }
                Ok(Err(msg)) => shared.report(msg),
                Err(_) => return Err(Error::Interrupted("a reader stopped".into())),
            },
        }
    }
    if shared.aborted() {
        return Err(Error::Interrupted("the backup stopped".into()));
    }
    if stack.len() != 1 {
        return Err(Error::Interrupted("the walk ended early".into()));
    }
    let (_, root) = stack
        .pop()
        .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))?;
    let id = store_tree(root)?;
    Ok((id, counts))
}

/// Chunks per question to the store at most: a round trip for each small
/// file would cost more than reading it.
const NEGOTIATE_BATCH: usize = 512;

/// Asks the store which of the new chunks it lacks, in batches of what is
/// waiting, and passes only those on to be compressed and sent.
fn negotiate(
    shared: &Shared<'_>,
    asked: Receiver<Vec<NewChunk>>,
    to_compress: Sender<Vec<NewChunk>>,
) -> Result<()> {
    let failed = |e: Error| {
        shared.abort.store(true, Ordering::Relaxed);
        Err(e)
    };
    let mut waiting = Vec::with_capacity(NEGOTIATE_BATCH);
    while let Ok(first) = asked.recv() {
        waiting.extend(first);
        while waiting.len() < NEGOTIATE_BATCH {
            match asked.try_recv() {
                Ok(more) => waiting.extend(more),
                Err(_) => break,
            }
        }
        // Chunks come one to a message (see the readers), so this asks
        // about at most NEGOTIATE_BATCH.
        let ids: Vec<BlobId> = waiting.iter().map(|c| c.id).collect();
        let missing = match shared.store.missing(&ids) {
            Ok(m) if m.len() == ids.len() => m,
            Ok(_) => return failed(Error::Interrupted("the store answered for other chunks".into())),
            Err(e) => return failed(e),
        };
        let mut lacking = Batch::new(BATCH_BYTES);
        for (chunk, lacks) in waiting.drain(..).zip(missing) {
            let len = chunk.data.len();
            if let Some(b) = &shared.asking {
                b.give(len);
            }
            if !lacks {
                // Counted as new when read (trees never were).
                if chunk.kind == BlobType::Data {
                    shared.progress.new_bytes.fetch_sub(len as u64, Ordering::Relaxed);
                }
                continue;
            }
            if let Some(full) = lacking.push(chunk)
                && to_compress.send(full).is_err()
            {
                return Ok(());
            }
        }
        if let Some(rest) = lacking.take()
            && to_compress.send(rest).is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

fn top(stack: &mut [(Option<Node>, Vec<Node>)]) -> Result<&mut Vec<Node>> {
    stack
        .last_mut()
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))
}
