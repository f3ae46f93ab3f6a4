//! A backup, as a pipeline that keeps every core busy with bounded memory:
//!
//! ```text
//! walk.rs           read.rs                                      mod.rs (run_pipeline)
//! walker ──files──▶ readers (cut + hash + dedup) ──new chunks──▶ compressors ──▶ packer ──▶ storage
//!    └──entries in order──▶ assembler (waits for each file's chunk list, builds trees) ──trees──▶ packer
//!                           assemble.rs
//! ```
//!
//! Every channel is bounded, so memory depends on the number of threads and
//! the depth of the tree, not on the number of files. New chunks travel in
//! batches of about [`BATCH_BYTES`], so a small file costs no hand-off of its
//! own between threads. Files unchanged since the parent snapshot (same size,
//! mtime, ctime and inode) are not read again.
//!
//! One file for each stage:
//!
//! - `select.rs`: which paths a backup covers ([`Excluder`], and the
//!   directories above the chosen paths);
//! - `walk.rs`: the walker, which sends every entry in tree order to the
//!   assembler and every file to be read to the readers; and the count of
//!   files ahead of it, for progress totals;
//! - `read.rs`: a reader, which cuts and hashes a file and passes on the
//!   chunks new to this run, in batches;
//! - `dedup.rs`: when the store negotiates (a server), the stage between the
//!   readers (and the assembler's trees) and the compressors that asks it
//!   which of the new chunks it lacks;
//! - `assemble.rs`: the assembler, which builds and stores the trees;
//! - this file: the public API, the state every stage shares, and the wiring
//!   of the threads, the compressors and the packer among them.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{TryRecvError, bounded, unbounded};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::chunk::{self, Compressor};
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::{BlobId, SnapshotId};
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::snapshot::{self, Snapshot, Summary};
use crate::store::{BackupStore, LocalStore};
use crate::tree::Tree;

mod assemble;
mod dedup;
mod read;
mod select;
mod walk;

use assemble::assemble;
use dedup::{ASKING_BYTES, Budget, NEGOTIATE_BATCH, negotiate};
use read::{Batch, FileJob, NewChunk, pass_on, read_file};
pub use select::Excluder;
use select::{Selection, build_selection, normalize, on_disk};
use walk::{ITEM_BATCH, Item, Walker, scan_totals, stat_helper};

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
    /// The parent snapshot recorded no errors. Then an entry whose kind,
    /// size, mtime, ctime and inode are the parent's keeps the parent's
    /// extended attributes instead of reading them again (changing one
    /// changes the ctime); after a partial parent they are read, so a read
    /// that failed is tried again. [`backup`] sets it from the parent.
    pub parent_whole: bool,
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

struct PackerMsg {
    kind: BlobType,
    id: BlobId,
    payload: Vec<u8>,
    raw_len: u32,
}

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
    /// Everything said to the user, in order.
    messages: Mutex<Vec<String>>,
    /// What the snapshot records: the errors' messages, the first
    /// [`snapshot::MAX_RECORDED_ERRORS`] of them.
    recorded: Mutex<Vec<String>>,
    /// Entries left out or recorded incompletely; any makes the snapshot partial.
    errors: AtomicU64,
    changed: AtomicU64,
    files_read: AtomicU64,
    /// See [`BackupOptions::parent_whole`].
    parent_whole: bool,
}

impl Shared<'_> {
    /// Whether the entry `name` of the directory at `dir` (on disk) is
    /// excluded. Patterns match the path as the snapshot records it, built
    /// only when there is a pattern to match.
    fn is_excluded(&self, dir: &Path, name: &[u8]) -> bool {
        if self.excluder.is_empty() {
            return false;
        }
        let real = dir.join(std::ffi::OsStr::from_bytes(name));
        let real = real.as_path();
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

    fn say(&self, msg: String) {
        tracing::warn!("{msg}");
        self.messages.lock().push(msg);
    }

    /// A file changed while it was read: said, and counted in the summary,
    /// but not an error (the snapshot holds what was read).
    fn changed_while_read(&self, path: &Path) {
        self.changed.fetch_add(1, Ordering::Relaxed);
        self.say(format!(
            "{} changed while it was read; the snapshot holds what was read",
            path.display()
        ));
    }

    /// Records an entry that is missing from the snapshot or incomplete in
    /// it: whichever stage meets it, the snapshot is marked partial.
    fn report(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        {
            let mut recorded = self.recorded.lock();
            if recorded.len() < snapshot::MAX_RECORDED_ERRORS {
                recorded.push(msg.clone());
            }
        }
        self.say(msg);
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
    opts.parent_whole = parent
        .as_ref()
        .is_some_and(|(_, s)| !s.partial && s.summary.errors == 0);
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
    // prune that removed chunks this snapshot reuses: it stops instead.
    let id = repo.save_snapshot(&snap, lock).await?;
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
        recorded: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        changed: AtomicU64::new(0),
        files_read: AtomicU64::new(0),
        parent_whole: opts.parent_whole,
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
        recorded,
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
        errors: recorded.into_inner(),
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
    let (item_tx, item_rx) = bounded::<Vec<Item>>(4096 / ITEM_BATCH);
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
        // Without the helper (one core, or no thread to be had) the walker
        // lists every directory and states every entry itself.
        let stat_helper = (threads > 1)
            .then(|| {
                // Unbounded, so that requests the helper never took go with
                // it (were it to stop) and free whoever waits on them; the
                // walker has at most two outstanding a level.
                let (work_tx, work_rx) = unbounded();
                std::thread::Builder::new()
                    .name("stat".into())
                    .spawn_scoped(s, move || stat_helper(shared, work_rx))
                    .ok()
                    .map(|_| work_tx)
            })
            .flatten();
        let walker = std::thread::Builder::new()
            .name("walker".into())
            .stack_size(fsmeta::WALK_STACK) // deep trees recurse
            .spawn_scoped(s, move || {
                let mut w = Walker {
                    shared,
                    items: item_tx,
                    batch: Vec::with_capacity(ITEM_BATCH),
                    jobs: job_tx,
                    depth: 0,
                    stat_helper,
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

/// Why an entry could not be examined, as the user reads it.
fn os_error(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}
