//! The walker: lists directories from their descriptors, in tree order, and
//! tells the assembler every entry and the readers every file to read; and
//! the count of files and bytes ahead of it, for progress totals.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender, bounded};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use super::read::{FileJob, FileOutcome};
use super::select::Selection;
use super::{Shared, os_error};
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::tree::{Extent, Node, NodeKind, Tree};

/// Entries per message from the walker to the assembler.
pub(super) const ITEM_BATCH: usize = 256;

/// Windows at least this long are stated in two parts, one on the stat
/// helper: below it the hand-off costs about what it saves.
const SPLIT_MIN: usize = 32;

/// Names stated ahead of their handling at most: a huge directory costs a
/// bounded amount of memory. A window also ends at a directory, so that
/// no stat waits through a subdirectory's walk (a file gone meanwhile
/// would be an error, not an absence).
const STAT_WINDOW: usize = 1024;

/// From this many levels down, nothing is listed ahead. A listing made
/// ahead waits through a deeper walk only in a race (a name listed as a file
/// is a directory when stated); then at most this many levels hold one.
const AHEAD_DEPTH: usize = 64;

/// A listing's names, each with what `statat` said of it.
type Stated = Vec<(Vec<u8>, rustix::io::Result<Stat>)>;

/// What a listing said a name is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hint {
    Dir,
    NotDir,
    /// The file system does not say (`DT_UNKNOWN`): it may be a directory.
    Unknown,
}

/// Names, each with what the listing said it is.
type Names = std::vec::IntoIter<(Vec<u8>, Hint)>;

/// What the walker asks of the stat helper; each answer comes on its own
/// channel, so a directory walked while one is awaited cannot take it.
pub(super) enum Work {
    /// State these names of `dir`.
    Stat {
        dir: Arc<OwnedFd>,
        names: Vec<Vec<u8>>,
        reply: Sender<Stated>,
    },
    /// Open the directory `name` of `dir` (at `path`), list it and state
    /// its first window: done while the walker handles what comes before.
    List {
        dir: Arc<OwnedFd>,
        name: Vec<u8>,
        path: std::path::PathBuf,
        reply: Sender<Opened>,
    },
}

/// A directory of the listing being walked, by name, that the stat helper
/// was asked to list ahead.
type Ahead = (Vec<u8>, Receiver<Opened>);

/// A directory opened and listed ahead of the walker.
pub(super) struct Opened {
    /// The open's error is the walker's to report.
    fd: rustix::io::Result<OwnedFd>,
    /// The opened directory's own state.
    stat: Option<Stat>,
    listing: Listing,
}

/// A directory's names in order, excluded ones left out.
struct Listing {
    /// The first window, stated (when listed ahead).
    stated: Stated,
    /// The names after it.
    rest: Names,
    /// What cut the listing short, or kept it from being made.
    failed: Option<rustix::io::Errno>,
}

impl Listing {
    fn empty(failed: Option<rustix::io::Errno>) -> Self {
        Listing {
            stated: Vec::new(),
            rest: Vec::new().into_iter(),
            failed,
        }
    }

    /// No directory in it and no more than a window: walked at once.
    fn is_leaf(&self) -> bool {
        self.rest.len() == 0 && !self.stated.iter().any(|(_, st)| is_dir(st))
    }
}

/// A directory as the walker goes through it.
struct InDir<'d> {
    dir: &'d Arc<OwnedFd>,
    path: &'d Path,
    /// The parent snapshot's listing, in name order, each entry with
    /// whether its chunks are all still stored.
    old_nodes: std::iter::Peekable<std::vec::IntoIter<(Node, bool)>>,
    /// The directory the stat helper is listing ahead, if any.
    ahead: Option<Ahead>,
    /// The names not yet stated.
    rest: Names,
}

fn is_dir(st: &rustix::io::Result<Stat>) -> bool {
    st.as_ref()
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// The stat helper's thread: does what it is sent, in order, until the
/// walker ends. An unchanged re-run is mostly the kernel's path look-ups
/// of `fstatat`, `openat` and `getdents`: on this thread they overlap the
/// walker's (measured: a million small files, see docs/BENCH-NOTES.md).
pub(super) fn stat_helper(shared: &Shared<'_>, work: Receiver<Work>) {
    // A walker that stopped meanwhile no longer waits for an answer.
    for w in work {
        // Dropped unanswered (the walker's wait then ends), not left queued:
        // the walker may still wait for a later request.
        if shared.aborted() {
            continue;
        }
        match w {
            Work::Stat { dir, names, reply } => {
                let _ = reply.send(stat_names(&dir, names));
            }
            Work::List {
                dir,
                name,
                path,
                reply,
            } => {
                let fd = open_dir_at(&dir, &name, false);
                let (stat, listing) = match &fd {
                    Ok(fd) => (rustix::fs::fstat(fd).ok(), list(shared, fd, &path, true)),
                    Err(_) => (None, Listing::empty(None)),
                };
                let _ = reply.send(Opened { fd, stat, listing });
            }
        }
    }
}

fn stat_names(dir: &OwnedFd, names: Vec<Vec<u8>>) -> Stated {
    names
        .into_iter()
        .map(|n| {
            let st = rustix::fs::statat(dir, n.as_slice(), AtFlags::SYMLINK_NOFOLLOW);
            (n, st)
        })
        .collect()
}

/// The next window of `names`: up to [`STAT_WINDOW`] of them, ending at the
/// first that may be a directory.
fn next_window(names: &mut Names) -> Vec<(Vec<u8>, Hint)> {
    let mut window = Vec::new();
    for (name, hint) in names.by_ref() {
        window.push((name, hint));
        if hint != Hint::NotDir || window.len() >= STAT_WINDOW {
            break;
        }
    }
    window
}

/// Lists `dir` (at `dir_path`): its names sorted, excluded ones left out,
/// the first window stated when `state_first`.
fn list(shared: &Shared<'_>, dir: &OwnedFd, dir_path: &Path, state_first: bool) -> Listing {
    let mut names = Vec::new();
    let mut failed = None;
    // A duplicate, not `Dir::read_from`: that opens "." and so needs
    // search permission, which a listable directory may lack.
    match rustix::io::fcntl_dupfd_cloexec(dir, 0).and_then(rustix::fs::Dir::new) {
        Ok(entries) => {
            for e in entries {
                match e {
                    Ok(e) => {
                        let name = e.file_name().to_bytes();
                        if name != b"." && name != b".." {
                            let hint = match e.file_type() {
                                FileType::Directory => Hint::Dir,
                                FileType::Unknown => Hint::Unknown,
                                _ => Hint::NotDir,
                            };
                            names.push((name.to_vec(), hint));
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        Err(e) => return Listing::empty(Some(e)),
    }
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    names.retain(|(name, _)| !shared.is_excluded(dir_path, name));
    let mut rest = names.into_iter();
    let stated = if state_first {
        stat_names(dir, next_window(&mut rest).into_iter().map(|(n, _)| n).collect())
    } else {
        Vec::new()
    };
    Listing { stated, rest, failed }
}

/// What the walker tells the assembler, in tree order.
pub(super) enum Item {
    EnterDir(Node),
    ExitDir,
    Leaf(Node),
    File(Node, Receiver<FileOutcome>),
}

pub(super) struct Walker<'s, 'r> {
    pub(super) shared: &'s Shared<'r>,
    /// Entries go to the assembler in batches of [`ITEM_BATCH`]: one
    /// hand-off per entry kept the assembler spinning on its channel
    /// (a tenth of an unchanged re-run's CPU).
    pub(super) items: Sender<Vec<Item>>,
    pub(super) batch: Vec<Item>,
    pub(super) jobs: Sender<FileJob>,
    /// Directory levels below the root: bounded, for the stack.
    pub(super) depth: usize,
    /// The stat helper's queue; none on one core.
    pub(super) stat_helper: Option<Sender<Work>>,
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
    /// States `names` in `dir`, in order: the first part here, and for a
    /// long enough listing the rest on the stat helper meanwhile,
    /// whose answer comes through the receiver returned.
    fn stat_listing(
        &self,
        dir: &Arc<OwnedFd>,
        mut names: Vec<Vec<u8>>,
    ) -> (Stated, Option<Receiver<Stated>>) {
        let Some(helper) = self.stat_helper.as_ref().filter(|_| names.len() >= SPLIT_MIN) else {
            return (stat_names(dir, names), None);
        };
        let (reply, answer) = bounded(1);
        let work = Work::Stat {
            dir: Arc::clone(dir),
            names: names.split_off(names.len() * 2 / 5),
            reply,
        };
        match helper.send(work) {
            Ok(()) => (stat_names(dir, names), Some(answer)),
            Err(e) => {
                if let Work::Stat { names: second, .. } = e.into_inner() {
                    names.extend(second);
                }
                (stat_names(dir, names), None)
            }
        }
    }

    /// Asks the stat helper to open and list the directory `name` of `dir`
    /// ahead of the walker; none when there is no helper or the walk is
    /// deep (see [`AHEAD_DEPTH`]).
    fn ask_ahead(&self, dir: &Arc<OwnedFd>, dir_path: &Path, name: &[u8]) -> Option<Ahead> {
        let helper = self.stat_helper.as_ref().filter(|_| self.depth < AHEAD_DEPTH)?;
        let (reply, answer) = bounded(1);
        let work = Work::List {
            dir: Arc::clone(dir),
            name: name.to_vec(),
            path: child(dir_path, name),
            reply,
        };
        helper.send(work).ok().map(|()| (name.to_vec(), answer))
    }

    fn send(&mut self, item: Item) -> Result<()> {
        self.batch.push(item);
        if self.batch.len() >= ITEM_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(ITEM_BATCH));
        self.items
            .send(batch)
            .map_err(|_| Error::Interrupted("the backup stopped".into()))
    }

    /// The parent snapshot's listing of a directory, when it had one.
    fn load_parent_subtree(&self, old: Option<&Node>) -> Option<Tree> {
        let id = old?.subtree?;
        match self.shared.store.load_tree(&id) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("failed to load tree {id} of the parent snapshot, reading files again: {e}");
                None
            }
        }
    }

    /// Walks from the root, whose descriptor is opened here.
    pub(super) fn walk_root(&mut self, sel: &Selection, parent: Option<&Tree>) -> Result<()> {
        let root = &self.shared.root;
        let fd = rustix::fs::open(
            root.as_path(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", root, os_error(e)))?;
        self.walk_selection(&Arc::new(fd), root, sel, parent)?;
        self.flush()
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
            Selection::All => self.walk_dir(dir, dir_path, parent.cloned(), None),
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
                    let old = parent.and_then(|p| p.find(name));
                    match child_sel {
                        Selection::All => {
                            let old = old.map(|o| (o.clone(), self.chunks_stored(o)));
                            self.entry(dir, dir_path, name.clone(), st, old, None)?
                        }
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
                            let subtree = self.load_parent_subtree(old);
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

    /// Walks the directory `dir` (at `dir_path`), listed ahead when
    /// `listed` is some.
    fn walk_dir(
        &mut self,
        dir: &Arc<OwnedFd>,
        dir_path: &Path,
        parent: Option<Tree>,
        listed: Option<Listing>,
    ) -> Result<()> {
        let Listing { stated, rest, failed } =
            listed.unwrap_or_else(|| list(self.shared, dir, dir_path, false));
        if let Some(e) = failed {
            self.shared
                .report(format!("failed to list {}: {}", dir_path.display(), os_error(e)));
        }
        // The parent's listing is in name order too: each entry's old self
        // is found by moving forward, and taken, not copied. Whether its
        // chunks are still stored is asked for the whole listing first:
        // independent index look-ups overlap their cache misses, where one
        // per entry, between two system calls, waits for each.
        let old_nodes: Vec<(Node, bool)> = parent
            .map(|t| t.nodes)
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                let stored = self.chunks_stored(&n);
                (n, stored)
            })
            .collect();
        let mut d = InDir {
            dir,
            path: dir_path,
            old_nodes: old_nodes.into_iter().peekable(),
            ahead: None,
            rest,
        };
        // The first window, stated with the listing ahead.
        if let Some((name, st)) = stated.last()
            && is_dir(st)
        {
            self.ask_for_window_dir(&mut d, name);
        }
        self.entries(&mut d, stated)?;
        loop {
            let window = next_window(&mut d.rest);
            let Some((last, hint)) = window.last() else {
                return Ok(());
            };
            // A name of unknown type is not asked for: on a file system
            // that never says, that would be a hand-off per file.
            if *hint == Hint::Dir {
                self.ask_for_window_dir(&mut d, last);
            }
            let names = window.into_iter().map(|(n, _)| n).collect();
            // The helper states the second part while the first is handled:
            // three fifths, as the walker also handles every entry.
            let (first, second) = self.stat_listing(dir, names);
            self.entries(&mut d, first)?;
            if let Some(second) = second {
                let second = second
                    .recv()
                    .map_err(|_| Error::Interrupted("the stat helper stopped".into()))?;
                self.entries(&mut d, second)?;
            }
        }
    }

    /// Has the directory `name` ending a window listed while the window is
    /// handled, unless already asked for (one asked for and not reached,
    /// its stat having failed, is dropped).
    fn ask_for_window_dir(&self, d: &mut InDir<'_>, name: &[u8]) {
        if d.ahead.as_ref().is_none_or(|(n, _)| n != name) {
            d.ahead = self.ask_ahead(d.dir, d.path, name);
        }
    }

    /// Handles stated entries of `d`, in name order, each with its old
    /// self and, for a directory the stat helper listed ahead, with that
    /// listing. Before a directory that holds no other is walked, the next
    /// one in `d.rest` is asked for ahead.
    fn entries(&mut self, d: &mut InDir<'_>, stated: Stated) -> Result<()> {
        for (name, st) in stated {
            if self.shared.aborted() {
                return Err(Error::Interrupted("the backup stopped".into()));
            }
            while d.old_nodes.next_if(|(o, _)| o.name < name).is_some() {}
            let old = d.old_nodes.next_if(|(o, _)| o.name == name);
            let st = match st {
                Ok(st) => st,
                Err(e) => {
                    self.shared.report(format!(
                        "failed to read {}: {}",
                        child(d.path, &name).display(),
                        os_error(e)
                    ));
                    continue;
                }
            };
            let opened = d
                .ahead
                .take_if(|(n, _)| *n == name)
                .and_then(|(_, answer)| answer.recv().ok());
            // A directory walked at once: the next one, if within a
            // window's reach, is listed meanwhile. Before a longer walk, or
            // farther, not: what it listed would wait that long.
            if opened.as_ref().is_some_and(|o| o.listing.is_leaf())
                && let Some((next, _)) = d
                    .rest
                    .as_slice()
                    .iter()
                    .take(STAT_WINDOW)
                    .find(|(_, hint)| *hint == Hint::Dir)
            {
                d.ahead = self.ask_ahead(d.dir, d.path, next);
            }
            self.entry(d.dir, d.path, name, st, old, opened)?;
        }
        Ok(())
    }

    /// Records the entry `name` of `dir` (found with `st`; `old` is what the
    /// parent snapshot recorded under that name, and whether its chunks are
    /// all still stored), and walks it when it is a directory. Its path is
    /// made only where it is needed: not for an unchanged file.
    fn entry(
        &mut self,
        dir: &Arc<OwnedFd>,
        dir_path: &Path,
        name: Vec<u8>,
        st: Stat,
        old: Option<(Node, bool)>,
        opened: Option<Opened>,
    ) -> Result<()> {
        let (mut old, stored) = match old {
            Some((o, stored)) => (Some(o), stored),
            None => (None, false),
        };
        let mut node = fsmeta::node_from_stat(name, &st);
        match old
            .as_mut()
            .filter(|o| self.shared.parent_whole && same_inode_state(o, &node))
        {
            // Reading them costs a path lookup per entry: a fifth of an
            // unchanged re-run of a million small files.
            Some(o) => node.xattrs = std::mem::take(&mut o.xattrs),
            None => {
                let path = child(dir_path, &node.name);
                match fsmeta::read_xattrs_at(dir.as_fd(), &node.name, &path) {
                    Ok(x) => node.xattrs = x,
                    Err(e) => self.shared.report(format!(
                        "failed to read extended attributes of {}: {e}",
                        path.display()
                    )),
                }
            }
        }
        match node.kind {
            NodeKind::Dir => {
                let path = &child(dir_path, &node.name);
                if self.depth >= fsmeta::MAX_DEPTH {
                    self.shared.report(format!(
                        "refused {}: deeper than {} directory levels",
                        path.display(),
                        fsmeta::MAX_DEPTH
                    ));
                    return Ok(());
                }
                // Opened and listed by the stat helper, when asked ahead.
                let (sub, now, listed) = match opened {
                    Some(o) => (o.fd, o.stat, Some(o.listing)),
                    None => {
                        let fd = open_dir_at(dir, &node.name, false);
                        let now = fd.as_ref().ok().and_then(|fd| rustix::fs::fstat(fd).ok());
                        (fd, now, None)
                    }
                };
                let sub = match sub {
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
                // matches the content even if another took its name meanwhile
                // (then its xattrs are read again, from what was opened).
                if let Some(now) = now {
                    let mut opened = fsmeta::node_from_stat(std::mem::take(&mut node.name), &now);
                    opened.xattrs = if same_inode_state(&node, &opened) {
                        std::mem::take(&mut node.xattrs)
                    } else {
                        fsmeta::read_xattrs_at(sub.as_fd(), b".", path).unwrap_or_else(|e| {
                            self.shared.report(format!(
                                "failed to read extended attributes of {}: {e}",
                                path.display()
                            ));
                            Vec::new()
                        })
                    };
                    node = opened;
                }
                let subtree = self.load_parent_subtree(old.as_ref());
                self.send(Item::EnterDir(node))?;
                self.depth += 1;
                let walked = self.walk_dir(&Arc::new(sub), path, subtree, listed);
                self.depth -= 1;
                walked?;
                self.send(Item::ExitDir)
            }
            NodeKind::File => {
                if let Some(old) = old
                    && stored
                    && same_inode_state(&old, &node)
                {
                    node.content = old.content;
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
                    path: child(dir_path, &node.name),
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
                    self.shared.report(format!(
                        "failed to read link {}: {}",
                        child(dir_path, &node.name).display(),
                        os_error(e)
                    ));
                    Ok(())
                }
            },
            _ => self.send(Item::Leaf(node)),
        }
    }

    /// Whether `old` is a file whose chunks may all be reused: with the same
    /// inode state ([`same_inode_state`]) it is not read again.
    fn chunks_stored(&self, old: &Node) -> bool {
        old.kind == NodeKind::File
            && old.content.iter().all(|e| match e {
                Extent::Data { id, .. } => self.shared.store.parent_chunk_stored(id),
                Extent::Hole { .. } => true,
            })
    }
}

/// The path of the entry `name` of the directory at `dir_path`.
fn child(dir_path: &Path, name: &[u8]) -> std::path::PathBuf {
    dir_path.join(std::ffi::OsStr::from_bytes(name))
}

/// Whether `new` is `old` as the parent snapshot saw it: same kind, inode,
/// size, mtime and ctime (which any change of content or metadata moves).
fn same_inode_state(old: &Node, new: &Node) -> bool {
    old.kind == new.kind
        && old.size == new.size
        && old.mtime == new.mtime
        && old.ctime == new.ctime
        && old.inode == new.inode
}

/// Counts files and bytes ahead of the walker, for progress totals only.
pub(super) fn scan_totals(shared: &Shared<'_>, sel: &Selection, dir: &Path) {
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
                    if !shared.is_excluded(&p, e.file_name().as_bytes()) {
                        stack.push(e.path());
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
