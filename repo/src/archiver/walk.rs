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

/// Listings at least this long are stated in two parts, one on the stat
/// helper: below it the hand-off costs about what it saves.
const SPLIT_MIN: usize = 32;

/// Names stated ahead of their handling at most: a huge directory costs a
/// bounded amount of memory, and so does each level of a deep walk, which
/// may hold the helper's part of its window while it walks a subdirectory.
const STAT_WINDOW: usize = 1024;

/// A listing's names, each with what `statat` said of it.
type Stated = Vec<(Vec<u8>, rustix::io::Result<Stat>)>;

/// Names of `dir` for the stat helper to state, and where to send them back.
pub(super) struct StatWork {
    dir: Arc<OwnedFd>,
    names: Vec<Vec<u8>>,
    reply: Sender<Stated>,
}

/// The stat helper's thread: states what it is sent, in order, until the
/// walker ends. An unchanged re-run is mostly the kernel's path look-ups of
/// `fstatat`, which two threads do at once in one directory (measured: a
/// million small files, see docs/BENCH-NOTES.md).
pub(super) fn stat_helper(work: Receiver<StatWork>) {
    for w in work {
        // A walker that stopped meanwhile no longer waits for the answer.
        let _ = w.reply.send(stat_names(&w.dir, w.names));
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
    pub(super) stat_helper: Option<Sender<StatWork>>,
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
        let work = StatWork {
            dir: Arc::clone(dir),
            names: names.split_off(names.len() * 2 / 5),
            reply,
        };
        match helper.send(work) {
            Ok(()) => (stat_names(dir, names), Some(answer)),
            Err(e) => {
                names.extend(e.into_inner().names);
                (stat_names(dir, names), None)
            }
        }
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
            Selection::All => self.walk_dir(dir, dir_path, parent.cloned()),
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
                            self.entry(dir, dir_path, name.clone(), st, old)?
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

    fn walk_dir(&mut self, dir: &Arc<OwnedFd>, dir_path: &Path, parent: Option<Tree>) -> Result<()> {
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
        let mut old_nodes = old_nodes.into_iter().peekable();
        names.retain(|name| !self.shared.is_excluded(dir_path, name));
        let mut names = names.into_iter();
        loop {
            let window: Vec<Vec<u8>> = names.by_ref().take(STAT_WINDOW).collect();
            if window.is_empty() {
                return Ok(());
            }
            // The helper states the second part while the first is handled:
            // three fifths, as the walker also handles every entry.
            let (first, rest) = self.stat_listing(dir, window);
            self.entries(dir, dir_path, first, &mut old_nodes)?;
            if let Some(rest) = rest {
                let rest = rest
                    .recv()
                    .map_err(|_| Error::Interrupted("the stat helper stopped".into()))?;
                self.entries(dir, dir_path, rest, &mut old_nodes)?;
            }
        }
    }

    /// Handles stated entries of `dir`, in name order, each with its old
    /// self from `old_nodes` (the parent's listing, in name order too).
    fn entries(
        &mut self,
        dir: &Arc<OwnedFd>,
        dir_path: &Path,
        stated: Stated,
        old_nodes: &mut std::iter::Peekable<std::vec::IntoIter<(Node, bool)>>,
    ) -> Result<()> {
        for (name, st) in stated {
            if self.shared.aborted() {
                return Err(Error::Interrupted("the backup stopped".into()));
            }
            while old_nodes.next_if(|(o, _)| o.name < name).is_some() {}
            let old = old_nodes.next_if(|(o, _)| o.name == name);
            match st {
                Ok(st) => self.entry(dir, dir_path, name, st, old)?,
                Err(e) => self.shared.report(format!(
                    "failed to read {}: {}",
                    child(dir_path, &name).display(),
                    os_error(e)
                )),
            }
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
                // matches the content even if another took its name meanwhile
                // (then its xattrs are read again, from what was opened).
                if let Ok(now) = rustix::fs::fstat(&sub) {
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
                let walked = self.walk_dir(&Arc::new(sub), path, subtree);
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
