//! The readers: each cuts a file into chunks, hashes them, and passes on the
//! chunks new to this run, in batches.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;
use rustix::fs::{Mode, OFlags};

use super::{Shared, os_error};
use crate::chunk::{self, ChunkError};
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::BlobId;
use crate::pack::BlobType;
use crate::tree::{Extent, Time};

pub(super) type FileOutcome = std::result::Result<FileRead, String>;

pub(super) struct FileRead {
    pub(super) content: Vec<Extent>,
    pub(super) size: u64,
    pub(super) changed: bool,
}

/// A file for a reader: opened from the directory the walker listed (held
/// open meanwhile), so a path swapped above it cannot redirect the read.
pub(super) struct FileJob {
    pub(super) dir: Arc<OwnedFd>,
    pub(super) name: Vec<u8>,
    /// For messages only.
    pub(super) path: PathBuf,
    /// What the walker found: the opened file must be the same one, and a
    /// different size or mtime after reading means it changed meanwhile.
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: Time,
    pub(super) reply: Sender<FileOutcome>,
}

pub(super) struct NewChunk {
    pub(super) kind: BlobType,
    pub(super) id: BlobId,
    pub(super) data: Vec<u8>,
}

/// New chunks held until there are `limit` bytes of them.
pub(super) struct Batch {
    chunks: Vec<NewChunk>,
    bytes: usize,
    limit: usize,
}

impl Batch {
    pub(super) fn new(limit: usize) -> Batch {
        Batch {
            chunks: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    /// Adds `chunk`; gives back the batch once it is full.
    pub(super) fn push(&mut self, chunk: NewChunk) -> Option<Vec<NewChunk>> {
        self.bytes += chunk.data.len();
        self.chunks.push(chunk);
        if self.bytes >= self.limit {
            self.take()
        } else {
            None
        }
    }

    /// What is held, if anything.
    pub(super) fn take(&mut self) -> Option<Vec<NewChunk>> {
        self.bytes = 0;
        (!self.chunks.is_empty()).then(|| std::mem::take(&mut self.chunks))
    }
}

/// Sends a reader's new chunks on, first taking budget for the store's
/// answer when it is asked.
pub(super) fn pass_on(
    shared: &Shared<'_>,
    to: &Sender<Vec<NewChunk>>,
    chunks: Option<Vec<NewChunk>>,
) -> Result<()> {
    let Some(chunks) = chunks else {
        return Ok(());
    };
    if let Some(b) = &shared.asking {
        b.take(chunks.iter().map(|c| c.data.len()).sum(), || shared.aborted())?;
    }
    to.send(chunks)
        .map_err(|_| Error::Interrupted("the backup stopped".into()))
}

/// Reads one file: cut, hash, queue new chunks. Never follows a symlink and
/// never blocks on a fifo put where a file was.
pub(super) fn read_file(
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
        shared.changed_while_read(path);
    }
    shared.files_read.fetch_add(1, Ordering::Relaxed);
    shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(FileRead {
        content,
        size,
        changed,
    })
}
