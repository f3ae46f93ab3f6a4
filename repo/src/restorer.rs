//! Restore, safely. Everything is created relative to directory descriptors
//! opened with `O_NOFOLLOW`, starting from the target: a name in a snapshot
//! that is empty, `.`, `..`, or holds `/` or NUL is refused; a symlink found in
//! the target where a directory should be is refused; symlinks the restore
//! creates are never followed. Nothing is written outside the target.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::bounded;
use parking_lot::Mutex;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::fsmeta::{self, Meta};
use crate::id::BlobId;
use crate::repository::Repository;
use crate::snapshot::Snapshot;
use crate::store::{LocalStore, RestoreSource};
use crate::tree::{Extent, Node, NodeKind};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Absolute paths inside the snapshot; empty means everything.
    pub includes: Vec<String>,
    /// Replace files that exist in the target (never directories).
    pub overwrite: bool,
    /// Cancelling it stops the restore at the next entry or batch of files:
    /// it then ends with [`Error::Cancelled`], the target holding what was
    /// written so far.
    pub cancel: CancellationToken,
}

#[derive(Debug, Default)]
pub struct RestoreProgress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Debug, Default)]
pub struct RestoreOutcome {
    /// Files restored whole.
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    pub bytes: u64,
    /// Every entry that was refused or failed, with the reason.
    pub errors: Vec<String>,
    /// Files whose content could not be read or written whole (a damaged or
    /// missing pack, a full disk): none is left in the target, so nothing
    /// there looks complete when it is not.
    pub incomplete: Vec<String>,
}

/// A file the walker created, waiting for its content. It is opened
/// again by name when its content comes (see [`OpenFiles`]). A batch holds
/// tens of thousands: only what finishing the file needs is kept, and the
/// path shown in messages is its directory's (shared) and its name.
struct PlannedFile {
    /// The directory it is in, to reopen it by name, and to remove it if
    /// it cannot be filled.
    dir: Arc<OwnedFd>,
    /// That directory as shown in messages.
    dir_shown: Arc<str>,
    name: Box<[u8]>,
    /// The temporary name it is written under, when it is to replace an
    /// existing entry or be linked to (`--overwrite`); else its own.
    temp: Option<Box<[u8]>>,
    /// What it was created as: a name replaced in the target meanwhile is
    /// refused, never written through.
    id: FileId,
    /// Renamed to its own name once whole (it replaces an existing file).
    replace: bool,
    size: u64,
    /// The snapshot's (device, inode) of a file with other names, which
    /// are removed too when it cannot be restored.
    linked: Option<(u64, u64)>,
    meta: Meta,
    /// Chunks still to be written; the file is finished at zero.
    remaining: AtomicU64,
    /// Why its content cannot be whole, once that is known.
    failed: Mutex<Option<String>>,
}

impl PlannedFile {
    /// The name it has in its directory while its content is written.
    fn written_as(&self) -> &[u8] {
        self.temp.as_deref().unwrap_or(&self.name)
    }

    /// Its path, for messages.
    fn display(&self) -> String {
        entry_display(&self.dir_shown, &self.name)
    }
}

/// Files created by the walker and the chunks they need: fetched together,
/// pack by pack, so a pack is read once for many files however they are
/// spread. Bounded ([`BATCH_FILES`], [`BATCH_CHUNKS`]) so memory does not
/// grow with the size of the snapshot; the descriptors it holds are
/// bounded apart from that (`max_open`), so a low descriptor limit means
/// more opens, not more batches (and reads of each pack).
#[derive(Default)]
struct Batch {
    files: Vec<PlannedFile>,
    /// Files of the batch open now, at most `max_open`.
    open: OpenFiles,
    /// Directories the batch's files are in (each holds a descriptor),
    /// counted where the walker moves from one to another.
    dirs: usize,
    /// Chunk → (file, offset) of every place it goes.
    targets: HashMap<BlobId, Vec<(u32, u64)>>,
    /// Each chunk once, in the order the files need them: the order a
    /// backup stored them in, so a server that answers in request-sized
    /// groups finds each group in few packs.
    order: Vec<BlobId>,
    chunks: usize,
    /// About what the planned files' metadata takes in memory.
    meta_bytes: usize,
    max_open: usize,
}

/// A batch is fetched once it holds this many files…
const BATCH_FILES: usize = 65_536;
/// …or this many chunk placements (about 64 GiB of average chunks)…
const BATCH_CHUNKS: usize = 65_536;
/// …or when its files' metadata (names, paths, extents, xattrs) takes
/// this much memory: a snapshot of deep paths or large xattrs makes smaller
/// batches, not a larger restore.
const BATCH_META_BYTES: usize = 32 << 20;

impl Batch {
    fn add(
        &mut self,
        (file, id): (File, FileId),
        (dir, dir_shown): (&Arc<OwnedFd>, &Arc<str>),
        temp: Option<Vec<u8>>,
        replace: bool,
        mut node: Node,
    ) {
        self.meta_bytes += node.name.len()
            + temp.as_ref().map_or(0, Vec::len)
            + node.content.len() * std::mem::size_of::<Extent>()
            + node
                .xattrs
                .iter()
                .map(|x| x.name.len() + x.value.len())
                .sum::<usize>()
            + std::mem::size_of::<PlannedFile>();
        let index = self.files.len() as u32;
        if self.files.last().is_none_or(|f| !Arc::ptr_eq(&f.dir, dir)) {
            self.dirs += 1;
        }
        self.open.keep(index, Arc::new(file));
        let mut pos = 0u64;
        let mut chunks = 0;
        // Its extents live on as the batch's targets; the file needs its
        // metadata only.
        for e in &std::mem::take(&mut node.content) {
            if let Extent::Data { id, .. } = e {
                let places = self.targets.entry(*id).or_default();
                if places.is_empty() {
                    self.order.push(*id);
                }
                places.push((index, pos));
                chunks += 1;
            }
            pos += e.len();
        }
        self.chunks += chunks;
        // Grown by a step, not doubled: it is the batch's largest allocation.
        if self.files.len() == self.files.capacity() {
            self.files.reserve_exact(4096);
        }
        self.files.push(PlannedFile {
            dir: Arc::clone(dir),
            dir_shown: Arc::clone(dir_shown),
            temp: temp.map(Vec::into_boxed_slice),
            id,
            replace,
            size: node.size,
            linked: (node.nlink > 1).then_some((node.dev, node.inode)),
            meta: Meta::of(&mut node),
            name: std::mem::take(&mut node.name).into_boxed_slice(),
            remaining: AtomicU64::new(chunks as u64),
            failed: Mutex::new(None),
        });
    }

    fn full(&self) -> bool {
        self.files.len() >= BATCH_FILES
            || self.chunks >= BATCH_CHUNKS
            || self.meta_bytes >= BATCH_META_BYTES
            || self.dirs >= self.max_open
    }

    /// An empty batch keeping at most `max_open` files and about as many
    /// directories open.
    fn new(max_open: usize) -> Batch {
        Batch {
            max_open,
            open: OpenFiles {
                max: max_open,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// The files of a batch that are open, oldest first out: content arrives
/// in about the order files were created, so the oldest is the likeliest
/// to be done.
#[derive(Default)]
struct OpenFiles {
    files: HashMap<u32, Arc<File>>,
    order: std::collections::VecDeque<u32>,
    max: usize,
}

impl OpenFiles {
    fn keep(&mut self, index: u32, file: Arc<File>) {
        if self.files.insert(index, file).is_none() {
            self.order.push_back(index);
        }
        while self.files.len() > self.max.max(1) {
            let Some(old) = self.order.pop_front() else { break };
            self.files.remove(&old);
        }
    }

    fn close(&mut self, index: u32) {
        // Its place in `order` goes when it comes up: `keep` skips it.
        self.files.remove(&index);
    }
}

/// The open file `index` of a batch, opened again by name if it was
/// closed to keep within the descriptor budget: without following links
/// or blocking (a FIFO put at its name must not hang the restore), and only
/// if it is still the regular file, untouched, the walker created.
fn open_planned(
    open: &Mutex<OpenFiles>,
    index: u32,
    f: &PlannedFile,
) -> std::result::Result<Arc<File>, String> {
    if let Some(file) = open.lock().files.get(&index) {
        return Ok(Arc::clone(file));
    }
    let replaced = || {
        format!(
            "refused {}: the file this restore created was replaced in the target meanwhile",
            f.display()
        )
    };
    let fd = rustix::fs::openat(
        &f.dir,
        f.written_as(),
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP | Errno::NXIO => replaced(),
        e => format!("failed to open {} again: {e}", f.display()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("failed to inspect {}: {e}", f.display()))?;
    if FileId::of(&st) != f.id || FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(replaced());
    }
    let mut open = open.lock();
    // Another thread may have opened it meanwhile: one is enough.
    if let Some(file) = open.files.get(&index) {
        return Ok(Arc::clone(file));
    }
    let file = Arc::new(File::from(fd));
    open.keep(index, Arc::clone(&file));
    Ok(file)
}

/// A name written under a temporary one, to be renamed over an existing
/// entry once the restore knows its content is whole.
struct Deferred {
    dir: Arc<OwnedFd>,
    temp: Vec<u8>,
    name: Vec<u8>,
    key: (u64, u64),
    shown: String,
}

/// A file a worker could not fill whole, or whose metadata failed.
struct Failed {
    display: String,
    /// When other names may share its inode: its key in the snapshot and
    /// the (device, inode) it was given in the target.
    link_key: Option<((u64, u64), (u64, u64))>,
    size: u64,
    /// Whether its content was restored whole (only metadata failed).
    content_whole: bool,
    message: String,
}

/// Clears the way for a new entry after creating it found something there:
/// an existing non-directory is removed when overwriting is allowed.
fn make_room(dir: &OwnedFd, name: &[u8], overwrite: bool, shown: &str) -> std::result::Result<(), String> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(format!("failed to inspect {shown} in the target: {e}")),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(format!(
            "refused {shown}: a directory is in the way in the target"
        )),
        Ok(_) if !overwrite => Err(format!(
            "refused {shown}: it exists in the target; use --overwrite to replace it"
        )),
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(|e| format!("failed to replace {shown}: {e}")),
    }
}

/// A name for a file that will replace an existing one once it is whole:
/// hidden, short (whatever the length of the name it stands in for), and
/// unique.
fn temp_name() -> Vec<u8> {
    let mut r = [0u8; 8];
    crate::crypto::random_fill(&mut r);
    format!(".backer-restore-{}", hex::encode(r)).into_bytes()
}

/// Whether `name` in `dir` is an existing entry that `--overwrite` may
/// replace (never a directory); `Err` when it is refused.
fn replaceable(
    dir: &OwnedFd,
    name: &[u8],
    overwrite: bool,
    shown: &str,
) -> std::result::Result<bool, String> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(format!("failed to inspect {shown} in the target: {e}")),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(format!(
            "refused {shown}: a directory is in the way in the target"
        )),
        Ok(_) if !overwrite => Err(format!(
            "refused {shown}: it exists in the target; use --overwrite to replace it"
        )),
        Ok(_) => Ok(true),
    }
}

/// A created file, and the temporary name it has when it is to replace an
/// existing one: written there, renamed over the old one only once whole,
/// so a file that cannot be restored leaves the old one as it was.
struct Created {
    file: File,
    temp: Option<Vec<u8>>,
    id: FileId,
}

/// What a file the restore created is, to know it again when it is opened
/// by name later: its inode, owner, type and mode (still the one it was
/// created with). Another user cannot make a file of this user's at that
/// name, even on an inode number just freed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    uid: u32,
    mode: u32,
}

impl FileId {
    fn of(st: &rustix::fs::Stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            uid: st.st_uid,
            mode: st.st_mode,
        }
    }
}

/// Creates `name` in `dir` exclusively and without following links; an
/// existing entry is replaced (by rename, once whole) only with
/// `overwrite`, and never a directory.
fn create_file(
    dir: &OwnedFd,
    name: &[u8],
    overwrite: bool,
    shown: &str,
) -> std::result::Result<Created, String> {
    let create = |n: &[u8]| {
        rustix::fs::openat(
            dir,
            n,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    // Known by its identity from the start; one that cannot be inspected
    // is taken back, so nothing refers to it.
    let created = |fd: OwnedFd, n: &[u8], temp: Option<Vec<u8>>| match rustix::fs::fstat(&fd) {
        Ok(st) => Ok(Created {
            file: File::from(fd),
            temp,
            id: FileId::of(&st),
        }),
        Err(e) => {
            let _ = rustix::fs::unlinkat(dir, n, AtFlags::empty());
            Err(format!("failed to inspect {shown} once created: {e}"))
        }
    };
    match create(name) {
        Ok(fd) => return created(fd, name, None),
        Err(Errno::EXIST) => {}
        Err(e) => return Err(format!("failed to create {shown}: {e}")),
    }
    if !replaceable(dir, name, overwrite, shown)? {
        // Gone meanwhile: create it after all.
        return match create(name) {
            Ok(fd) => created(fd, name, None),
            Err(e) => Err(format!("failed to create {shown}: {e}")),
        };
    }
    let temp = temp_name();
    match create(&temp) {
        Ok(fd) => created(fd, &temp.clone(), Some(temp)),
        Err(e) => Err(format!("failed to create {shown}: {e}")),
    }
}

/// Names given more than once in a directory's listing: only a damaged or
/// crafted snapshot has any (a backup sorts a listing by name).
fn names_given_twice(nodes: &[Node]) -> HashSet<Vec<u8>> {
    if nodes.windows(2).all(|w| w[0].name < w[1].name) {
        return HashSet::new();
    }
    let mut seen = HashSet::new();
    nodes
        .iter()
        .filter(|n| !seen.insert(n.name.as_slice()))
        .map(|n| n.name.clone())
        .collect()
}

/// A restored directory. Its parent's index instead of its path keeps the
/// list linear in size however deep the tree.
struct DirToFinish {
    parent: Option<usize>,
    name: Vec<u8>,
    /// `None` for a directory only on the way to an included path: created,
    /// but its metadata is not part of what was asked for.
    meta: Option<Meta>,
}

struct Ctx<'a> {
    source: &'a dyn RestoreSource,
    opts: &'a RestoreOptions,
    includes: Vec<Vec<Vec<u8>>>,
    matched: Vec<bool>,
    target: Arc<OwnedFd>,
    errors: &'a Mutex<Vec<String>>,
    progress: Arc<RestoreProgress>,
    /// (dev, inode) of restored files with several links → where the first went.
    hardlinks: HashMap<(u64, u64), Vec<Vec<u8>>>,
    /// Links not made because the file they share was removed, incomplete.
    unlinked: Vec<String>,
    /// Hard-linked files and links written under temporary names to replace
    /// existing ones: renamed over them at the end, if their content is whole.
    deferred: Vec<Deferred>,
    /// Directories created, in walk order, to finish (mode, times) once
    /// their content is written.
    dirs: Vec<DirToFinish>,
    /// Where in `dirs` the directory being restored is; `None` for the target.
    current_dir: Option<usize>,
    /// Directory levels below the target: bounded, for the stack.
    depth: usize,
    /// Files created and not yet handed to the writer.
    batch: Batch,
    /// Files of one directory met by the walk, not yet given to a creator.
    group: Option<CreateJob>,
    /// Files given to creators, in walk order, and how many.
    pending: VecDeque<Pending>,
    pending_files: usize,
    /// The creator of each directory with files still being created there
    /// (by its descriptor's address), and how many jobs it has there.
    affinity: HashMap<usize, (usize, usize)>,
    /// At most this many files are being created at once (each will hold a
    /// descriptor once created).
    window: usize,
    outcome: RestoreOutcome,
}

/// Files and symlinks are created on a few threads besides the walker, so
/// a restore onto a file system where each create is slow (a network volume
/// behind a PVC, ext4 just after a large delete) is not one create at a
/// time. A directory's entries are created by one of them, in order:
/// creates in one directory take its lock, so spreading them only contends
/// (measured: twice the system time). A new directory goes to the least
/// busy. Measured (bench/slow-create, 48,651 files): onto a FUSE mount
/// adding 1 ms per create, 77 s with one creator, 47 s with four, 45 s
/// with eight (a directory of 17,912 files is one creator's alone); no
/// change on tmpfs or a quiet ext4.
const CREATORS: usize = 4;
/// Entries of one directory handed to a creator at once.
const CREATE_JOB: usize = 64;

/// Entries of one directory to create (files and symlinks).
struct CreateJob {
    dir: Arc<OwnedFd>,
    dir_shown: Arc<str>,
    files: Vec<(Node, String)>,
    overwrite: bool,
}

/// What a creator made of an entry.
enum Made {
    /// A file, waiting for its content.
    File(Created),
    /// A symlink, whole; why its metadata could not be set, if it could not.
    Symlink(Option<String>),
}

type CreatedFiles = Vec<(Node, std::result::Result<Made, String>)>;

/// A job given to a creator, waited for in walk order.
struct Pending {
    dir: Arc<OwnedFd>,
    dir_shown: Arc<str>,
    created: crossbeam_channel::Receiver<CreatedFiles>,
}

/// A creator thread's queue, and how many entries wait in it.
struct Creator {
    jobs: crossbeam_channel::Sender<(CreateJob, crossbeam_channel::Sender<CreatedFiles>)>,
    queued: Arc<AtomicU64>,
}

/// Where the walker's work goes: full batches to the writer, entries to
/// create to the creators. Owned by the walker's thread, so they all stop
/// when it ends, however it ends.
struct Outlet {
    batches: crossbeam_channel::Sender<Batch>,
    creators: Vec<Creator>,
}

/// A creator: creates the entries of each job it is given, in order.
fn create_entries(
    jobs: crossbeam_channel::Receiver<(CreateJob, crossbeam_channel::Sender<CreatedFiles>)>,
    queued: &AtomicU64,
) {
    for (job, done) in jobs {
        let created = job
            .files
            .into_iter()
            .map(|(node, shown)| {
                let made = if node.kind == NodeKind::Symlink {
                    make_symlink(&job.dir, &node, job.overwrite, &shown).map(Made::Symlink)
                } else {
                    create_file(&job.dir, &node.name, job.overwrite, &shown).map(Made::File)
                };
                queued.fetch_sub(1, Ordering::Relaxed);
                (node, made)
            })
            .collect();
        // The walker is gone only if the restore is ending early.
        let _ = done.send(created);
    }
}

/// Why [`create_with`] made nothing.
enum NotMade {
    /// Something is in the way and may not be replaced; the message says what.
    Refused(String),
    /// Making it failed.
    Failed(Errno),
}

/// Runs `op` (which creates `name` in `dir`); if something is already
/// there, removes it when overwriting is allowed (never a directory) and
/// tries once more.
fn create_with(
    dir: &OwnedFd,
    name: &[u8],
    overwrite: bool,
    shown: &str,
    op: impl Fn() -> rustix::io::Result<()>,
) -> std::result::Result<(), NotMade> {
    match op() {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            make_room(dir, name, overwrite, shown).map_err(NotMade::Refused)?;
            op().map_err(NotMade::Failed)
        }
        Err(e) => Err(NotMade::Failed(e)),
    }
}

/// Makes the symlink `node` in `dir`; an existing entry is replaced only
/// with `overwrite`, and never a directory. `Ok(Some)`: only its metadata failed.
fn make_symlink(
    dir: &OwnedFd,
    node: &Node,
    overwrite: bool,
    shown: &str,
) -> std::result::Result<Option<String>, String> {
    let Some(target) = node.link_target.as_ref() else {
        return Err(format!("refused {shown}: symlink without a target"));
    };
    let name = node.name.as_slice();
    create_with(dir, name, overwrite, shown, || {
        rustix::fs::symlinkat(target.as_slice(), dir, name)
    })
    .map_err(|e| match e {
        NotMade::Refused(msg) => msg,
        NotMade::Failed(e) => format!("failed to create symlink {shown}: {e}"),
    })?;
    Ok(fsmeta::apply_at(dir, node)
        .err()
        .map(|e| format!("failed to set metadata of {shown}: {e}")))
}

/// A path for messages: every component escaped ([`crate::text`]), so a
/// hostile name cannot forge a line or drive a terminal.
fn display(comps: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in comps {
        s.push('/');
        s.push_str(&crate::text::escape_bytes(c));
    }
    if s.is_empty() { "/".into() } else { s }
}

/// [`display`] of an entry named `name` in the directory shown as `dir`.
fn entry_display(dir: &str, name: &[u8]) -> String {
    let name = crate::text::escape_bytes(name);
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn components(path: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(Error::Invalid(format!("include path {path:?} contains `..`")));
        }
        out.push(c.as_bytes().to_vec());
    }
    Ok(out)
}

/// Opens `comps` below `root`, one component at a time, never following a symlink.
fn open_dir_path(root: &OwnedFd, comps: &[Vec<u8>]) -> std::io::Result<OwnedFd> {
    let mut cur = rustix::fs::openat(
        root,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for c in comps {
        cur = rustix::fs::openat(
            &cur,
            c.as_slice(),
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(cur)
}

impl Ctx<'_> {
    fn error(&self, msg: String) {
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        tracing::info!("{msg}");
        self.errors.lock().push(msg);
    }

    /// (restore this whole subtree, descend into it at all)
    fn selected(&mut self, comps: &[Vec<u8>]) -> (bool, bool) {
        if self.includes.is_empty() {
            return (true, true);
        }
        let mut full = false;
        let mut partial = false;
        for (i, inc) in self.includes.iter().enumerate() {
            if comps.len() >= inc.len() && comps[..inc.len()] == inc[..] {
                full = true;
                self.matched[i] = true;
            } else if inc.len() > comps.len() && inc[..comps.len()] == comps[..] {
                partial = true;
            }
        }
        (full, full || partial)
    }

    /// A file or symlink the walk met, to be created by a creator with the
    /// others of its directory; a file joins a batch once created (see
    /// [`Ctx::settle`]).
    fn create_later(
        &mut self,
        (dir, dir_shown): (&Arc<OwnedFd>, &Arc<str>),
        node: Node,
        shown: &str,
        out: &Outlet,
    ) -> Result<()> {
        if self.group.as_ref().is_some_and(|g| !Arc::ptr_eq(&g.dir, dir)) {
            self.dispatch(out)?;
        }
        let group = self.group.get_or_insert_with(|| CreateJob {
            dir: Arc::clone(dir),
            dir_shown: Arc::clone(dir_shown),
            files: Vec::new(),
            overwrite: self.opts.overwrite,
        });
        group.files.push((node, shown.to_string()));
        if group.files.len() >= CREATE_JOB.min(self.window / 4).max(1) {
            self.dispatch(out)?;
        }
        Ok(())
    }

    /// Gives the entries gathered to the creator of their directory (the
    /// least busy one for a directory none has), and takes in what is
    /// created beyond the window.
    fn dispatch(&mut self, out: &Outlet) -> Result<()> {
        let Some(job) = self.group.take() else {
            return Ok(());
        };
        let (done, created) = bounded(1);
        let dir = Arc::clone(&job.dir);
        let dir_shown = Arc::clone(&job.dir_shown);
        let n = job.files.len();
        self.pending_files += n;
        let creator = match self.affinity.get_mut(&(Arc::as_ptr(&dir) as usize)) {
            Some((c, jobs)) => {
                *jobs += 1;
                *c
            }
            None => {
                let c = (0..out.creators.len())
                    .min_by_key(|&c| out.creators[c].queued.load(Ordering::Relaxed))
                    .unwrap_or(0);
                self.affinity.insert(Arc::as_ptr(&dir) as usize, (c, 1));
                c
            }
        };
        let creator = &out.creators[creator];
        creator.queued.fetch_add(n as u64, Ordering::Relaxed);
        creator
            .jobs
            .send((job, done))
            .map_err(|_| Error::Interrupted("a restore's file creator stopped".into()))?;
        self.pending.push_back(Pending {
            dir,
            dir_shown,
            created,
        });
        // Each pending file holds a descriptor, and each job its directory's.
        while self.pending_files + self.pending.len() > self.window {
            self.settle(out)?;
        }
        Ok(())
    }

    /// Waits for the oldest job given to a creator, and plans its files.
    fn settle(&mut self, out: &Outlet) -> Result<()> {
        let Some(Pending {
            dir,
            dir_shown,
            created,
        }) = self.pending.pop_front()
        else {
            return Ok(());
        };
        let created = created
            .recv()
            .map_err(|_| Error::Interrupted("a restore's file creator stopped".into()))?;
        self.pending_files -= created.len();
        let key = Arc::as_ptr(&dir) as usize;
        if let Some((_, jobs)) = self.affinity.get_mut(&key) {
            *jobs -= 1;
            if *jobs == 0 {
                self.affinity.remove(&key);
            }
        }
        for (node, made) in created {
            match made {
                Ok(Made::File(Created { file, temp, id })) => {
                    let replace = temp.is_some();
                    self.plan((file, id), (&dir, &dir_shown), temp, replace, node, out)?;
                }
                Ok(Made::Symlink(meta)) => {
                    self.outcome.others += 1;
                    if let Some(msg) = meta {
                        self.error(msg);
                    }
                }
                Err(msg) => self.error(msg),
            }
        }
        Ok(())
    }

    /// Everything given or to be given to a creator in `dir`, created.
    fn settle_dir(&mut self, dir: &Arc<OwnedFd>, out: &Outlet) -> Result<()> {
        if self.group.as_ref().is_some_and(|g| Arc::ptr_eq(&g.dir, dir)) {
            self.dispatch(out)?;
        }
        let key = Arc::as_ptr(dir) as usize;
        while self.affinity.contains_key(&key) {
            self.settle(out)?;
        }
        Ok(())
    }

    /// Everything still with the creators, in walk order.
    fn settle_all(&mut self, out: &Outlet) -> Result<()> {
        self.dispatch(out)?;
        while !self.pending.is_empty() {
            self.settle(out)?;
        }
        Ok(())
    }

    /// A created file joins the batch; a full batch goes to the writer.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &mut self,
        created: (File, FileId),
        dir: (&Arc<OwnedFd>, &Arc<str>),
        temp: Option<Vec<u8>>,
        replace: bool,
        node: Node,
        out: &Outlet,
    ) -> Result<()> {
        self.outcome.files += 1;
        self.outcome.bytes += node.size;
        self.batch.add(created, dir, temp, replace, node);
        if self.batch.full() {
            let next = Batch::new(self.batch.max_open);
            out.batches
                .send(std::mem::replace(&mut self.batch, next))
                .map_err(|_| Error::Interrupted("the restore's writer stopped".into()))?;
        }
        Ok(())
    }

    fn restore_dir(
        &mut self,
        dir: &Arc<OwnedFd>,
        comps: &mut Vec<Vec<u8>>,
        tree: BlobId,
        full: bool,
        out: &Outlet,
    ) -> Result<()> {
        let tree = match self.source.load_tree(&tree) {
            Ok(t) => t,
            Err(e) => {
                self.error(format!(
                    "failed to read the listing of {}: {}",
                    display(comps),
                    crate::error::Chain(&e)
                ));
                return Ok(());
            }
        };
        let twice = names_given_twice(&tree.nodes);
        let here: Arc<str> = display(comps).into();
        for node in tree.nodes {
            // An entry whose name is given again is made after everything
            // before it and before everything after it, as the listing orders.
            let in_order = twice.contains(node.name.as_slice());
            if in_order {
                self.settle_dir(dir, out)?;
            }
            comps.push(node.name.clone());
            let shown = entry_display(&here, &node.name);
            let (whole, descend) = if full { (true, true) } else { self.selected(comps) };
            if !descend {
                comps.pop();
                continue;
            }
            if !node.has_safe_name() {
                self.error(format!(
                    "refused an entry with an unsafe name {:?} in {here}",
                    node.name_lossy(),
                ));
                comps.pop();
                continue;
            }
            if node.kind != NodeKind::Dir && !whole {
                comps.pop();
                continue;
            }
            self.restore_node((dir, &here), comps, node, whole, &shown, out)?;
            comps.pop();
            if in_order {
                self.settle_dir(dir, out)?;
            }
        }
        // This directory's files go to a creator now, not when the walk
        // next comes upon another directory's.
        self.dispatch(out)
    }

    fn restore_node(
        &mut self,
        (dir, here): (&Arc<OwnedFd>, &Arc<str>),
        comps: &mut Vec<Vec<u8>>,
        node: Node,
        whole: bool,
        shown: &str,
        out: &Outlet,
    ) -> Result<()> {
        // With --overwrite a creator removes what is in its way: nothing the
        // walker makes itself in this directory is made while a creator may
        // still work there (names a file system folds together, by case or
        // normalization, would meet, and one could remove the other's).
        // Cancelled: the walk passes over what is left, and what was
        // created goes through the writer, which fails and removes it.
        if self.opts.cancel.is_cancelled() {
            return Ok(());
        }
        let by_creator = node.kind == NodeKind::Symlink || (node.kind == NodeKind::File && node.nlink <= 1);
        if self.opts.overwrite && !by_creator {
            self.settle_dir(dir, out)?;
        }
        let name = node.name.as_slice();
        match node.kind {
            NodeKind::Dir => {
                if self.depth >= fsmeta::MAX_DEPTH {
                    self.error(format!(
                        "refused {shown}: deeper than {} directory levels",
                        fsmeta::MAX_DEPTH
                    ));
                    return Ok(());
                }
                match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        self.error(format!("failed to create directory {shown}: {e}"));
                        return Ok(());
                    }
                }
                let sub = match rustix::fs::openat(
                    dir,
                    name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => Arc::new(fd),
                    Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                        self.error(format!(
                            "refused {shown}: the target holds a symlink or a file where this directory goes"
                        ));
                        return Ok(());
                    }
                    Err(e) => {
                        self.error(format!("failed to open directory {shown}: {e}"));
                        return Ok(());
                    }
                };
                let index = self.dirs.len();
                self.dirs.push(DirToFinish {
                    parent: self.current_dir,
                    name: name.to_vec(),
                    meta: None,
                });
                if let Some(t) = node.subtree {
                    let above = self.current_dir.replace(index);
                    self.depth += 1;
                    let restored = self.restore_dir(&sub, comps, t, whole, out);
                    self.depth -= 1;
                    self.current_dir = above;
                    restored?;
                }
                self.outcome.dirs += 1;
                if whole {
                    let mut node = node;
                    self.dirs[index].meta = Some(Meta::of(&mut node));
                }
            }
            NodeKind::File => {
                if node.nlink > 1 {
                    let key = (node.dev, node.inode);
                    if let Some(first) = self.hardlinks.get(&key).cloned() {
                        let (first_name, first_dir) = match first.split_last() {
                            Some(x) => x,
                            None => return Ok(()),
                        };
                        // An existing name is replaced by rename at the end,
                        // and only if the file it links to was restored whole.
                        let replace = match replaceable(dir, name, self.opts.overwrite, shown) {
                            Ok(r) => r,
                            Err(msg) => {
                                self.error(msg);
                                return Ok(());
                            }
                        };
                        let link_name = if replace { temp_name() } else { name.to_vec() };
                        let linked = open_dir_path(&self.target, first_dir)
                            .map_err(|e| Some(Errno::from_io_error(&e).unwrap_or(Errno::IO)))
                            .and_then(|fd| {
                                rustix::fs::linkat(
                                    &fd,
                                    first_name.as_slice(),
                                    dir,
                                    link_name.as_slice(),
                                    AtFlags::empty(),
                                )
                                .map_err(Some)
                            });
                        if linked.is_ok() && replace {
                            self.deferred.push(Deferred {
                                dir: Arc::clone(dir),
                                temp: link_name,
                                name: name.to_vec(),
                                key,
                                shown: shown.to_string(),
                            });
                        }
                        match linked {
                            Ok(()) => self.outcome.files += 1,
                            // The first name is gone: a worker removed it
                            // because its content could not be restored.
                            Err(Some(Errno::NOENT)) => {
                                self.error(format!(
                                    "{shown} was not restored: it is a hard link to {}, whose content could not be restored",
                                    display(&first)
                                ));
                                self.unlinked.push(shown.to_string());
                            }
                            Err(Some(e)) => {
                                self.error(format!("failed to link {shown} to {}: {e}", display(&first)))
                            }
                            Err(None) => {}
                        }
                        return Ok(());
                    }
                }
                if node.nlink <= 1 {
                    return self.create_later((dir, here), node, shown, out);
                }
                // The first name of a hard-linked file is created here, so
                // its other names can be linked to it as the walk meets them.
                let Created { file, temp, id } = match create_file(dir, name, self.opts.overwrite, shown) {
                    Ok(c) => c,
                    Err(msg) => {
                        self.error(msg);
                        return Ok(());
                    }
                };
                // Only a file this restore created may be linked to: never
                // one that was in the target and refused. One created under
                // a temporary name keeps it until the whole restore is done,
                // so later links can always reach it by that name.
                let mut at = comps.clone();
                if let Some(temp) = &temp {
                    if let Some(last) = at.last_mut() {
                        *last = temp.clone();
                    }
                    self.deferred.push(Deferred {
                        dir: Arc::clone(dir),
                        temp: temp.clone(),
                        name: name.to_vec(),
                        key: (node.dev, node.inode),
                        shown: shown.to_string(),
                    });
                }
                self.hardlinks.insert((node.dev, node.inode), at);
                // Renamed at the end with its links, if it is whole (`deferred`).
                self.plan((file, id), (dir, here), temp, false, node, out)?;
            }
            NodeKind::Symlink => return self.create_later((dir, here), node, shown, out),
            NodeKind::Fifo | NodeKind::CharDevice | NodeKind::BlockDevice => {
                let ft = match node.kind {
                    NodeKind::Fifo => FileType::Fifo,
                    NodeKind::CharDevice => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                let made = create_with(dir, name, self.opts.overwrite, shown, || {
                    rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(node.mode & 0o777), node.rdev)
                });
                match made {
                    Ok(()) => {
                        if let Err(e) = fsmeta::apply_at(dir, &node) {
                            self.error(format!("failed to set metadata of {shown}: {e}"));
                        }
                        self.outcome.others += 1;
                    }
                    Err(NotMade::Refused(msg)) => self.error(msg),
                    Err(NotMade::Failed(Errno::PERM)) => {
                        self.error(format!("skipped device node {shown}: creating it needs root"))
                    }
                    Err(NotMade::Failed(e)) => self.error(format!("failed to create {shown}: {e}")),
                }
            }
            NodeKind::Socket => {
                self.error(format!(
                    "skipped socket {shown}: sockets belong to running programs and are not restored"
                ));
            }
        }
        Ok(())
    }
}

/// Applies the recorded metadata of every directory in `dirs` (in walk
/// order, each after its parent), children before parents. Each directory
/// is opened once, from its parent's descriptor: linear in the number of
/// directories, with one descriptor per level open.
fn finish_dirs(ctx: &Ctx<'_>, dirs: &[DirToFinish]) {
    // The open directories from the target down to the one last opened.
    let mut open: Vec<(usize, Option<OwnedFd>)> = Vec::new();
    let shown = |open: &[(usize, Option<OwnedFd>)]| {
        let comps: Vec<Vec<u8>> = open.iter().map(|(i, _)| dirs[*i].name.clone()).collect();
        display(&comps)
    };
    let finish = |open: &mut Vec<(usize, Option<OwnedFd>)>| {
        let Some((i, fd)) = open.pop() else { return };
        let (Some(fd), Some(meta)) = (fd, &dirs[i].meta) else {
            return;
        };
        let mut xattr_errors = Vec::new();
        let applied = fsmeta::apply_to_fd(&fd, meta, &mut xattr_errors);
        if applied.is_err() || !xattr_errors.is_empty() {
            open.push((i, None));
            let shown_path = shown(open);
            open.pop();
            if let Err(e) = applied {
                ctx.error(format!("failed to set metadata of directory {shown_path}: {e}"));
            }
            for e in xattr_errors {
                ctx.error(format!("directory {shown_path}: failed to set {e}"));
            }
        }
    };
    for (i, d) in dirs.iter().enumerate() {
        // Finish what is not above this directory: walk order puts its
        // parent on the stack, and everything below the parent is done.
        while let Some((top, _)) = open.last()
            && Some(*top) != d.parent
        {
            finish(&mut open);
        }
        let fd = match open.last() {
            Some((_, Some(parent))) => Some(open_dir_path(parent, std::slice::from_ref(&d.name))),
            // The parent could not be opened, and was reported.
            Some((_, None)) => None,
            None => Some(open_dir_path(&ctx.target, std::slice::from_ref(&d.name))),
        };
        open.push((i, None));
        match fd {
            Some(Ok(fd)) => {
                if let Some(last) = open.last_mut() {
                    last.1 = Some(fd);
                }
            }
            Some(Err(e)) if d.meta.is_some() => {
                ctx.error(format!(
                    "failed to set metadata of directory {}: {e}",
                    shown(&open)
                ));
            }
            _ => {}
        }
    }
    while !open.is_empty() {
        finish(&mut open);
    }
}

/// Fills every file of a batch: the chunks are fetched pack by pack and
/// each is written wherever it goes; a file is finished (size, metadata)
/// when its last chunk is written. Files whose content cannot be whole are
/// removed again and reported.
fn fill_batch(
    source: &dyn RestoreSource,
    batch: Batch,
    cancel: &CancellationToken,
    progress: &RestoreProgress,
) -> Vec<Failed> {
    let Batch {
        files,
        targets,
        order,
        open,
        ..
    } = batch;
    let open = Mutex::new(open);
    let mut failed = Vec::new();
    let fail = |f: &PlannedFile, why: String| {
        let mut slot = f.failed.lock();
        slot.get_or_insert(why);
    };
    let finish =
        |index: u32, f: &PlannedFile, failed_meta: &Mutex<Vec<Failed>>| match open_planned(&open, index, f)
            .and_then(|file| {
                let done = finish_file(f, &file, progress);
                open.lock().close(index);
                done
            }) {
            Ok(None) => {}
            Ok(Some(msg)) => failed_meta.lock().push(Failed {
                display: f.display(),
                link_key: None,
                size: f.size,
                content_whole: true,
                message: msg,
            }),
            Err(msg) => fail(f, msg),
        };
    let meta_failures = Mutex::new(Vec::new());
    for (index, f) in files.iter().enumerate() {
        if f.remaining.load(Ordering::Relaxed) == 0 {
            finish(index as u32, f, &meta_failures);
        }
    }
    let lost = source.fetch_chunks(&order, cancel, &|id, data| {
        for &(index, offset) in targets.get(id).map(Vec::as_slice).unwrap_or_default() {
            let f = &files[index as usize];
            if f.failed.lock().is_some() {
                continue;
            }
            let written = open_planned(&open, index, f).and_then(|file| {
                file.write_all_at(data, offset)
                    .map_err(|e| format!("failed to write {}: {e}", f.display()))
            });
            if let Err(why) = written {
                fail(f, why);
                continue;
            }
            progress
                .bytes_done
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if f.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                finish(index, f, &meta_failures);
            }
        }
    });
    for (id, why) in lost {
        for &(index, _) in targets.get(&id).map(Vec::as_slice).unwrap_or_default() {
            let f = &files[index as usize];
            fail(f, format!("failed to restore {}: {why}", f.display()));
        }
    }
    failed.extend(meta_failures.into_inner());
    drop(open);
    for f in files {
        let why = f.failed.lock().take();
        let why = match (why, f.remaining.load(Ordering::Relaxed)) {
            (Some(why), _) => why,
            (None, 0) => continue,
            (None, n) => format!(
                "failed to restore {}: {n} of its chunks never arrived",
                f.display()
            ),
        };
        let link_key = f.linked.map(|snapshot| (snapshot, (f.id.dev, f.id.ino)));
        let removed = match (
            rustix::fs::unlinkat(&f.dir, f.written_as(), AtFlags::empty()),
            f.replace,
        ) {
            (Ok(()), true) => "the file that was in the target is kept as it was".to_string(),
            (Ok(()), false) => "the incomplete file was removed".to_string(),
            (Err(e), _) => format!("the incomplete file could not be removed ({e}): do not trust it"),
        };
        progress.errors.fetch_add(1, Ordering::Relaxed);
        failed.push(Failed {
            display: f.display(),
            link_key,
            size: f.size,
            content_whole: false,
            message: format!("{why}; {removed}"),
        });
    }
    failed
}

/// Sets a file's size (holes at its end) and metadata once its content is
/// written, and renames it over the file it replaces. `Ok(Some)`: only
/// its metadata failed; `Err`: it is not whole or not in place.
fn finish_file(
    f: &PlannedFile,
    file: &File,
    progress: &RestoreProgress,
) -> std::result::Result<Option<String>, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("failed to {what} {}: {e}", f.display());
    // Always: the size is the snapshot's whatever the file held before
    // (and holes at its end are made).
    if let Err(e) = file.set_len(f.size) {
        return Err(fail("size", &e));
    }
    let mut xattr_errors = Vec::new();
    let meta = fsmeta::apply_to_fd(file.as_fd(), &f.meta, &mut xattr_errors);
    if f.replace {
        rustix::fs::renameat(&f.dir, f.written_as(), &f.dir, &*f.name).map_err(|e| fail("replace", &e))?;
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = meta {
        return Ok(Some(fail("set metadata of", &e)));
    }
    Ok(xattr_errors
        .first()
        .map(|e| format!("restored {}, but failed to set {e}", f.display())))
}

/// Finds, below `root`, the names of files whose snapshot link key is in
/// `linked` and that are, in the target, the inode given there; removes
/// them. Depth first with an explicit stack (trees may be deep).
fn remove_links(
    source: &dyn RestoreSource,
    root: BlobId,
    target: &OwnedFd,
    linked: &HashMap<(u64, u64), (u64, u64)>,
) -> Vec<(String, std::io::Result<()>)> {
    let mut out = Vec::new();
    let mut stack: Vec<(BlobId, Vec<Vec<u8>>)> = vec![(root, Vec::new())];
    while let Some((id, comps)) = stack.pop() {
        let Ok(tree) = source.load_tree(&id) else { continue };
        let Ok(dir) = open_dir_path(target, &comps) else {
            continue;
        };
        for node in tree.nodes {
            if !node.has_safe_name() {
                continue;
            }
            let mut path = comps.clone();
            path.push(node.name.clone());
            if let Some(sub) = node.subtree {
                stack.push((sub, path));
                continue;
            }
            let Some(inode) = linked.get(&(node.dev, node.inode)) else {
                continue;
            };
            let same = rustix::fs::statat(&dir, node.name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| (st.st_dev, st.st_ino) == *inode);
            if same {
                let removed =
                    rustix::fs::unlinkat(&dir, node.name.as_slice(), AtFlags::empty()).map_err(Into::into);
                out.push((display(&path), removed));
            }
        }
    }
    out
}

/// Restores `snapshot` (or the parts of it named in `opts.includes`) from
/// the local repository under `opts.target`. Must run on a multi-thread tokio
/// runtime.
pub async fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    opts: &RestoreOptions,
    progress: Arc<RestoreProgress>,
) -> Result<RestoreOutcome> {
    if opts.includes.is_empty() {
        progress
            .files_total
            .store(snapshot.summary.files, Ordering::Relaxed);
        progress
            .bytes_total
            .store(snapshot.summary.bytes, Ordering::Relaxed);
    }
    let source = LocalStore {
        repo,
        lock: None,
        handle: Handle::current(),
    };
    tokio::task::block_in_place(|| restore_tree(&source, snapshot.tree, opts, progress))
}

/// Restores the tree `root` from `source` under `opts.target`. Blocking:
/// call it outside async code.
pub fn restore_tree(
    source: &dyn RestoreSource,
    root: BlobId,
    opts: &RestoreOptions,
    progress: Arc<RestoreProgress>,
) -> Result<RestoreOutcome> {
    let includes = opts
        .includes
        .iter()
        .map(|p| components(p))
        .collect::<Result<Vec<_>>>()?;
    let target = &opts.target;
    std::fs::create_dir_all(target).map_err(|e| Error::io("create", target, e))?;
    let target_fd = rustix::fs::open(
        target.as_path(),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open", target, e.into()))?;
    // Three batches are open at once (being planned, queued, being
    // written), each holding files and directories open: each gets a
    // seventh of the descriptor limit for either, files being created and
    // their directories the last seventh, and 256 are left for the walk and
    // the reads.
    let limit = fsmeta::raise_fd_limit();
    let max_open = (limit.saturating_sub(256) / 7).clamp(16, 8192) as usize;
    let errors = Mutex::new(Vec::new());
    let failed: Mutex<Vec<Failed>> = Mutex::new(Vec::new());
    let mut ctx = Ctx {
        source,
        opts,
        matched: vec![false; includes.len()],
        includes,
        target: Arc::new(target_fd),
        errors: &errors,
        progress: Arc::clone(&progress),
        hardlinks: HashMap::new(),
        unlinked: Vec::new(),
        deferred: Vec::new(),
        dirs: Vec::new(),
        current_dir: None,
        depth: 0,
        batch: Batch::new(max_open),
        group: None,
        pending: VecDeque::new(),
        pending_files: 0,
        affinity: HashMap::new(),
        window: max_open,
        outcome: RestoreOutcome::default(),
    };
    {
        // One batch being filled while the walker builds the next.
        let (tx, rx) = bounded::<Batch>(1);
        std::thread::scope(|s| -> Result<()> {
            let failed = &failed;
            let progress = &progress;
            let writer = s.spawn(move || {
                for batch in rx {
                    // Even cancelled: its files exist, empty, and are removed
                    // as not filled (the source then reads nothing).
                    let lost = fill_batch(source, batch, &opts.cancel, progress);
                    failed.lock().extend(lost);
                }
            });
            let mut creators = Vec::new();
            let mut creator_threads = Vec::new();
            for i in 0..CREATORS {
                // Unbounded: the walker's window bounds what waits in all of them.
                let (jobs, queue) = crossbeam_channel::unbounded();
                let queued = Arc::new(AtomicU64::new(0));
                let counter = Arc::clone(&queued);
                let thread = std::thread::Builder::new()
                    .name(format!("restore-create-{i}"))
                    .spawn_scoped(s, move || create_entries(queue, &counter))
                    .map_err(|e| {
                        Error::Interrupted(format!("failed to start a restore's file creator: {e}"))
                    })?;
                creators.push(Creator { jobs, queued });
                creator_threads.push(thread);
            }
            let out = Outlet {
                batches: tx,
                creators,
            };
            let ctx = &mut ctx;
            // On its own thread for the stack: deep trees recurse.
            let walker = std::thread::Builder::new()
                .name("restore-walker".into())
                .stack_size(fsmeta::WALK_STACK)
                .spawn_scoped(s, move || {
                    let target = Arc::clone(&ctx.target);
                    ctx.restore_dir(&target, &mut Vec::new(), root, false, &out)?;
                    ctx.settle_all(&out)?;
                    out.batches
                        .send(std::mem::take(&mut ctx.batch))
                        .map_err(|_| Error::Interrupted("the restore's writer stopped".into()))
                    // Dropping `out` here lets the creators and the writer finish.
                });
            let mut walked = match walker {
                Ok(h) => h
                    .join()
                    .map_err(|_| Error::Interrupted("the restore walker panicked".into()))
                    .and_then(|r| r),
                Err(e) => Err(Error::Interrupted(format!(
                    "failed to start the restore walker: {e}"
                ))),
            };
            // Joined here, so a panic is an error like the walker's, not
            // the scope's panic.
            for thread in creator_threads {
                if thread.join().is_err() && walked.is_ok() {
                    walked = Err(Error::Interrupted("a restore's file creator panicked".into()));
                }
            }
            writer
                .join()
                .map_err(|_| Error::Interrupted("the restore's writer panicked".into()))?;
            walked
        })?;
    }
    // Seen once: a cancel that comes later finds the restore complete.
    let cancelled = opts.cancel.is_cancelled();
    // Directories last, so their times stick, and each after everything
    // inside it, so a mode that closes it cannot keep the restore out.
    // Not after a cancel: left open, they take the next restore.
    let dirs = std::mem::take(&mut ctx.dirs);
    if !cancelled {
        finish_dirs(&ctx, &dirs);
    }
    for (inc, matched) in opts.includes.iter().zip(&ctx.matched) {
        if !matched {
            ctx.error(format!("{inc:?} is not in the snapshot"));
        }
    }
    // Files that could not be filled: their other names (hard links made
    // while the content was still to come) go too.
    let failed = failed.into_inner();
    let mut incomplete = std::mem::take(&mut ctx.unlinked);
    let mut messages = Vec::new();
    let mut linked: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    for f in failed {
        tracing::info!("{}", f.message);
        messages.push(f.message);
        if f.content_whole {
            continue;
        }
        ctx.outcome.files = ctx.outcome.files.saturating_sub(1);
        ctx.outcome.bytes = ctx.outcome.bytes.saturating_sub(f.size);
        incomplete.push(f.display);
        if let Some((key, inode)) = f.link_key {
            linked.insert(key, inode);
        }
    }
    // Names written under temporary ones replace what was in the target
    // now, unless what they share could not be restored.
    for d in std::mem::take(&mut ctx.deferred) {
        if cancelled || linked.contains_key(&d.key) {
            let _ = rustix::fs::unlinkat(&d.dir, d.temp.as_slice(), AtFlags::empty());
            messages.push(format!(
                "kept {} as it was in the target: what was to replace it could not be restored",
                d.shown
            ));
            continue;
        }
        if let Err(e) = rustix::fs::renameat(&d.dir, d.temp.as_slice(), &d.dir, d.name.as_slice()) {
            let _ = rustix::fs::unlinkat(&d.dir, d.temp.as_slice(), AtFlags::empty());
            messages.push(format!("failed to replace {}: {e}", d.shown));
            ctx.outcome.files = ctx.outcome.files.saturating_sub(1);
            incomplete.push(d.shown);
        }
    }
    // Hard links made to a file whose content then failed share its
    // inode: found again by walking the snapshot (only in this rare case,
    // so a restore of many links keeps no list of them), and removed.
    if !linked.is_empty() {
        for (shown, removed) in remove_links(source, root, &ctx.target, &linked) {
            match removed {
                Ok(()) => {
                    ctx.outcome.files = ctx.outcome.files.saturating_sub(1);
                    messages.push(format!("removed {shown} too: it is a hard link to an incomplete file"));
                }
                Err(e) => messages.push(format!(
                    "{shown} is a hard link to an incomplete file and could not be removed ({e}): do not trust it"
                )),
            }
            incomplete.push(shown);
        }
    }
    let mut outcome = std::mem::take(&mut ctx.outcome);
    drop(ctx);
    outcome.errors = errors.into_inner();
    outcome.errors.extend(messages);
    outcome.incomplete = incomplete;
    if cancelled {
        return Err(Error::Cancelled);
    }
    Ok(outcome)
}
