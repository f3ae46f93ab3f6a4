//! Writing an object into a local directory: through a staging file, made
//! durable, then linked to its name, so an object that lists is whole on
//! disk (docs/FORMAT.md). A [`Spool`] does the same for an object written
//! piece by piece before its name is known: a pack, whose name is the hash
//! of its bytes, goes to disk as it fills instead of being held in memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use rustix::fs::{Mode, OFlags};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{ensure_dir, object_mode, sync_dir};
use crate::error::{Error, Result};

/// Objects at least this big (packs) are written around the page cache
/// (`O_DIRECT`): a backup does not read them again, and a buffered write
/// costs the kernel more CPU than compressing them.
pub(super) const DIRECT_WRITE_MIN: usize = 1 << 20;
/// `O_DIRECT` wants buffers, offsets and lengths in whole blocks.
const DIRECT_ALIGN: usize = 4096;
/// Written in pieces of this size (a multiple of [`DIRECT_ALIGN`]).
pub(super) const DIRECT_PIECE: usize = 1 << 20;

/// A file being written under a name no listing takes for an object;
/// removed unless [`Staging::commit`] named it.
struct Staging {
    tmp: PathBuf,
    file: std::fs::File,
    /// With `O_DIRECT`: an aligned window of a plain buffer (no unsafe
    /// allocation) that whole blocks are written from.
    direct: Option<Window>,
    len: u64,
}

struct Window {
    buf: Vec<u8>,
    start: usize,
    filled: usize,
}

impl Window {
    fn new() -> Self {
        let buf = vec![0u8; DIRECT_PIECE + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Window {
            buf,
            start,
            filled: 0,
        }
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.start + self.filled..self.start + DIRECT_PIECE]
    }
}

impl Staging {
    /// Creates the staging file `tmp` (its name must hold a `#`: object_store's
    /// staging names, which every listing skips, so one left by a crash is
    /// never taken for an object).
    fn create(tmp: PathBuf, mode: u32, direct: bool) -> Result<Self> {
        let mode = Mode::from_raw_mode(mode);
        let base = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let open = |flags: OFlags| rustix::fs::open(&tmp, flags, mode);
        let (fd, direct) = if direct {
            match open(base | OFlags::DIRECT) {
                Ok(fd) => (fd, true),
                // This file system does not take O_DIRECT.
                Err(rustix::io::Errno::INVAL) => (
                    open(base).map_err(|e| Error::io("create", &tmp, e.into()))?,
                    false,
                ),
                Err(e) => return Err(Error::io("create", &tmp, e.into())),
            }
        } else {
            (
                open(base).map_err(|e| Error::io("create", &tmp, e.into()))?,
                false,
            )
        };
        Ok(Staging {
            tmp,
            file: std::fs::File::from(fd),
            direct: direct.then(Window::new),
            len: 0,
        })
    }

    fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        self.len += data.len() as u64;
        let Some(w) = self.direct.as_mut() else {
            return self.file.write_all(data);
        };
        while !data.is_empty() {
            let space = w.space();
            let n = space.len().min(data.len());
            space[..n].copy_from_slice(&data[..n]);
            w.filled += n;
            data = &data[n..];
            if w.filled == DIRECT_PIECE {
                self.file.write_all(&w.buf[w.start..w.start + DIRECT_PIECE])?;
                w.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is left, makes the data durable (`fdatasync`) if asked,
    /// and links the file to `dir/name`, failing with
    /// [`Error::AlreadyExists`] if that exists (as object_store's create does).
    fn commit(mut self, dir: &Path, name: &str, durable: bool) -> Result<()> {
        let path = dir.join(name);
        let parent = path.parent().unwrap_or(dir).to_path_buf();
        let written = (|| {
            if let Some(w) = self.direct.as_mut() {
                // The last block is padded: cut the file to the object's length.
                let blocks = w.filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                w.buf[w.start + w.filled..w.start + blocks].fill(0);
                self.file.write_all(&w.buf[w.start..w.start + blocks])?;
                self.file.set_len(self.len)?;
            }
            // The mode asked for at open is narrowed by the umask; set it exactly.
            rustix::fs::fchmod(&self.file, Mode::from_raw_mode(object_mode(name)))?;
            if durable {
                self.file.sync_data()?;
            }
            Ok::<(), std::io::Error>(())
        })();
        let linked = written
            .map_err(|e| Error::io("write", &self.tmp, e))
            .and_then(|()| ensure_dir(dir, &parent, durable))
            .and_then(|()| std::fs::hard_link(&self.tmp, &path).map_err(|e| Error::io("write", &path, e)));
        // Drop removes the staging file.
        drop(self);
        match linked {
            Ok(()) if durable => sync_dir(&parent),
            Ok(()) => Ok(()),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::AlreadyExists(name.into()))
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn staging_name(path: &Path) -> PathBuf {
    let mut nonce = [0u8; 8];
    crate::crypto::random_fill(&mut nonce);
    path.with_file_name(format!(
        "{}#{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        u64::from_le_bytes(nonce)
    ))
}

/// Creates `dir/name` holding `data` (see the module's comment).
pub(super) fn write_local(dir: &Path, name: &str, data: &[u8], durable: bool) -> Result<()> {
    let path = dir.join(name);
    ensure_dir(dir, path.parent().unwrap_or(dir), durable)?;
    let mut staging = Staging::create(
        staging_name(&path),
        object_mode(name),
        data.len() >= DIRECT_WRITE_MIN,
    )?;
    staging
        .write(data)
        .map_err(|e| Error::io("write", &staging.tmp, e))?;
    staging.commit(dir, name, durable)
}

enum Piece {
    Bytes(Vec<u8>),
    /// The last piece was written: name the object.
    Done(String),
}

/// One object written into a local directory as it is produced, by a
/// thread of its own, so the producer neither waits for the disk nor holds the
/// object: at most [`SPOOL_QUEUE`] pieces are in flight. Dropped without
/// [`Spool::finish`], it removes what it wrote.
pub struct Spool {
    dir: PathBuf,
    folder: String,
    durable: bool,
    handle: Handle,
    /// Started at the first piece, so an object never written costs nothing.
    open: Option<Open>,
}

struct Open {
    pieces: SyncSender<Piece>,
    /// Pieces the disk is done with, to fill again.
    back: Receiver<Vec<u8>>,
    task: JoinHandle<Result<()>>,
}

/// Pieces queued for the disk, each up to the producer's piece size.
const SPOOL_QUEUE: usize = 2;

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("folder", &self.folder).finish()
    }
}

impl Spool {
    pub(super) fn new(dir: PathBuf, folder: &str, durable: bool, handle: Handle) -> Self {
        Spool {
            dir,
            folder: folder.to_string(),
            durable,
            handle,
            open: None,
        }
    }

    fn opened(&mut self) -> &mut Open {
        let Spool {
            dir,
            folder,
            durable,
            handle,
            open,
        } = self;
        open.get_or_insert_with(|| {
            let (pieces, rx) = sync_channel::<Piece>(SPOOL_QUEUE);
            let (back_tx, back) = sync_channel::<Vec<u8>>(SPOOL_QUEUE + 1);
            let (dir, folder, durable) = (dir.clone(), folder.clone(), *durable);
            // A thread of its own, not the runtime's blocking pool: the
            // producer (a server's ingest, itself a blocking task) waits on
            // this queue, and a pool full of producers would never run it.
            let (done, result) = tokio::sync::oneshot::channel();
            let started = std::thread::Builder::new().name("spool".into()).spawn(move || {
                let _ = done.send(spool(&dir, &folder, durable, &rx, &back_tx));
            });
            let task = handle.spawn(async move {
                started.map_err(|e| Error::Interrupted(format!("failed to start a spool thread: {e}")))?;
                result
                    .await
                    .unwrap_or_else(|_| Err(Error::Interrupted("the spool thread ended early".into())))
            });
            Open { pieces, back, task }
        })
    }

    /// An empty buffer for the next piece: one the disk is done with when
    /// there is one, so pieces are not allocated again and again.
    pub fn buffer(&mut self) -> Vec<u8> {
        match self.open.as_ref().map(|o| o.back.try_recv()) {
            Some(Ok(mut b)) => {
                b.clear();
                b
            }
            _ => Vec::new(),
        }
    }

    /// Queues `piece`, the object's next bytes; waits while the queue is
    /// full. If writing has failed, the piece is dropped: [`Spool::finish`]
    /// reports why.
    pub fn write(&mut self, piece: Vec<u8>) {
        let _ = self.opened().pieces.send(Piece::Bytes(piece));
    }

    /// Names the object `name` once every piece is on disk; the task's
    /// result says whether it was stored ([`Error::AlreadyExists`] if the
    /// name was taken).
    pub fn finish(mut self, name: String) -> JoinHandle<Result<()>> {
        let _ = self.opened().pieces.send(Piece::Done(name));
        let Spool { open, handle, .. } = self;
        match open {
            Some(o) => o.task,
            // Not reached: `opened` above started it.
            None => handle.spawn(async { Err(Error::Interrupted("the spool never started".into())) }),
        }
    }
}

fn spool(
    dir: &Path,
    folder: &str,
    durable: bool,
    pieces: &Receiver<Piece>,
    back: &SyncSender<Vec<u8>>,
) -> Result<()> {
    let at = dir.join(folder);
    ensure_dir(dir, &at, durable)?;
    let mut staging = Staging::create(staging_name(&at.join("spool")), 0o644, true)?;
    loop {
        match pieces.recv() {
            Ok(Piece::Bytes(b)) => {
                staging
                    .write(&b)
                    .map_err(|e| Error::io("write", &staging.tmp, e))?;
                match back.try_send(b) {
                    Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
                }
            }
            Ok(Piece::Done(name)) => return staging.commit(dir, &name, durable),
            // The writer was dropped unfinished (a failed or cancelled
            // backup): the staging file goes with `staging`.
            Err(_) => return Err(Error::Interrupted("the object was abandoned unfinished".into())),
        }
    }
}

/// Whether `name` is a staging name: `NAME#DIGITS`, ours and object_store's.
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The staging files below `dir`, with their sizes: left by a writer that
/// died before naming them (a killed backup, a power cut). Removed when
/// `remove`. Symlinks are not followed.
pub(super) fn stale_staging(dir: &Path, remove: bool) -> Result<(usize, u64)> {
    let (mut count, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let entries = match std::fs::read_dir(&at) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &at, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &at, e))?;
            let kind = entry
                .file_type()
                .map_err(|e| Error::io("inspect", entry.path(), e))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && is_staging_name(&entry.file_name().to_string_lossy()) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if remove {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        // Its writer finished or removed it meanwhile.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io("remove", entry.path(), e)),
                    }
                }
                count += 1;
                bytes += len;
            }
        }
    }
    if remove && count > 0 {
        sync_dir(dir)?;
    }
    Ok((count, bytes))
}
