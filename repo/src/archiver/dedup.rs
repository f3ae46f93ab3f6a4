//! When the store negotiates (a server), a stage between the readers and the
//! compressors asks it which of the new chunks it lacks, and passes on only
//! those; the bytes waiting for its answer are bounded.

use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::read::{Batch, NewChunk};
use super::{BATCH_BYTES, Shared};
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::pack::BlobType;

/// Bytes waiting for the store's answer on which chunks it lacks. The queue
/// is long in chunks (so one question covers many small files) and bounded
/// in bytes (so large chunks cannot pile up).
pub(super) struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

impl Budget {
    pub(super) fn new(cap: usize) -> Budget {
        Budget {
            left: Mutex::new(cap),
            freed: Condvar::new(),
            cap,
        }
    }

    pub(super) fn take(&self, n: usize, stopped: impl Fn() -> bool) -> Result<()> {
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
pub(super) const ASKING_BYTES: usize = 64 << 20;

/// Chunks per question to the store at most: a round trip for each small
/// file would cost more than reading it.
pub(super) const NEGOTIATE_BATCH: usize = 512;

/// Asks the store which of the new chunks it lacks, in batches of what is
/// waiting, and passes only those on to be compressed and sent.
pub(super) fn negotiate(
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
