//! The engine's store seams over gRPC: a backup run by this agent writes
//! through the server, and a restore reads through it. The engine's
//! pipelines run unchanged; only where blobs go differs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use backer_proto::v1 as pb;
use backer_repo::Error;
use backer_repo::chunk;
use backer_repo::crypto::ChunkKeys;
use backer_repo::id::BlobId;
use backer_repo::pack::BlobType;
use backer_repo::store::{BackupStore, BlobWriter, ChunkSink, RestoreSource};
use backer_repo::tree::Tree;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Ids per ReadChunks request (the server accepts up to 4096).
const READ_BATCH: usize = 1024;
/// ReadChunks requests a restore keeps open at once: while one waits on
/// the server's disk or storage, another's chunks are decompressed here.
const READS_IN_FLIGHT: usize = 4;

/// Chunks travel in batches of about this many bytes: most chunks of a
/// system tree are small files, and a message each would cost more than
/// the data.
const UPLOAD_BATCH_BYTES: usize = 1 << 20;

fn remote(what: &str, s: tonic::Status) -> Error {
    Error::Interrupted(format!("failed to {what}: the server said: {}", s.message()))
}

/// How often an upload with nothing to send says it is alive.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// Trees read ahead of the walk, at most this many held, this many in flight.
const PREFETCH_HELD: usize = 256;
const PREFETCH_IN_FLIGHT: usize = 16;

type TreeFetch = tokio::task::JoinHandle<Result<Tree, Error>>;

/// Subtrees asked for as soon as their parent is read, so walking a
/// snapshot rarely waits on a round trip. Bounded: the oldest go first.
#[derive(Default)]
struct Prefetch {
    pending: HashMap<BlobId, TreeFetch>,
    order: VecDeque<BlobId>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        for f in self.pending.values() {
            f.abort();
        }
    }
}

/// One job's view of the server's repository.
pub struct RemoteStore {
    prefetch: Mutex<Prefetch>,
    in_flight: Arc<tokio::sync::Semaphore>,
    client: crate::Client,
    handle: Handle,
    job: String,
    keys: ChunkKeys,
    zstd_level: i32,
    /// Upload limit in bytes per second, if any.
    limit: Option<u64>,
}

impl RemoteStore {
    /// Fetches the repository's chunking keys for job `job`.
    pub async fn new(
        mut client: crate::Client,
        job: String,
        limit: Option<u64>,
    ) -> Result<RemoteStore, Error> {
        let k = client
            .chunk_keys(pb::ChunkKeysRequest {})
            .await
            .map_err(|s| remote("get the chunk keys", s))?
            .into_inner();
        let id_key = <[u8; 32]>::try_from(&k.id_key[..])
            .map_err(|_| Error::Interrupted("the server sent a chunk key of the wrong size".into()))?;
        Ok(RemoteStore {
            prefetch: Mutex::new(Prefetch::default()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(PREFETCH_IN_FLIGHT)),
            client,
            handle: Handle::current(),
            job,
            keys: ChunkKeys::from_parts(id_key, k.chunker_seed),
            zstd_level: k.zstd_level,
            limit,
        })
    }

    /// Reads a tree the job may read (async, for the start of a job).
    pub async fn read_tree(&self, id: &BlobId) -> Result<Tree, Error> {
        fetch_tree(self.client.clone(), self.job.clone(), *id).await
    }

    /// A tree for the walk: from the read-ahead if it was asked for, and
    /// its own subtrees asked for in turn.
    fn walk_tree(&self, id: &BlobId) -> Result<Tree, Error> {
        let ahead = self.prefetch.lock().pending.remove(id);
        let tree = match ahead {
            Some(fetch) => self
                .handle
                .block_on(fetch)
                .map_err(|e| Error::Interrupted(format!("failed to read tree {id}: {e}")))??,
            None => self.handle.block_on(self.read_tree(id))?,
        };
        let mut p = self.prefetch.lock();
        for sub in tree.nodes.iter().filter_map(|n| n.subtree) {
            if p.pending.contains_key(&sub) {
                continue;
            }
            if p.order.len() >= PREFETCH_HELD
                && let Some(old) = p.order.pop_front()
                && let Some(f) = p.pending.remove(&old)
            {
                f.abort();
            }
            let (client, job, permits) = (self.client.clone(), self.job.clone(), Arc::clone(&self.in_flight));
            let fetch = self.handle.spawn(async move {
                let _permit = permits.acquire_owned().await;
                fetch_tree(client, job, sub).await
            });
            p.pending.insert(sub, fetch);
            p.order.push_back(sub);
        }
        let Prefetch { pending, order } = &mut *p;
        order.retain(|k| pending.contains_key(k));
        Ok(tree)
    }
}

async fn fetch_tree(mut client: crate::Client, job: String, id: BlobId) -> Result<Tree, Error> {
    let t = client
        .read_tree(pb::ReadTreeRequest {
            job_id: job,
            id: bytes::Bytes::copy_from_slice(&id.0),
        })
        .await
        .map_err(|s| remote(&format!("read tree {id}"), s))?
        .into_inner();
    Tree::from_bytes(&t.tree, &format!("tree {id}"))
}

impl BackupStore for RemoteStore {
    fn chunk_keys(&self) -> &ChunkKeys {
        &self.keys
    }

    fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    fn holds(&self, _id: &BlobId) -> bool {
        false
    }

    /// The server holds a repository lock for the job, so what the parent
    /// snapshot names stays stored while the job runs.
    fn parent_chunk_stored(&self, _id: &BlobId) -> bool {
        true
    }

    fn negotiates(&self) -> bool {
        true
    }

    fn missing(&self, ids: &[BlobId]) -> Result<Vec<bool>, Error> {
        let req = pb::MissingRequest {
            job_id: self.job.clone(),
            ids: ids.iter().map(|i| bytes::Bytes::copy_from_slice(&i.0)).collect(),
        };
        let resp = self
            .handle
            .block_on(self.client.clone().missing(req))
            .map_err(|s| remote("ask which chunks are new", s))?
            .into_inner();
        let mut out = vec![false; ids.len()];
        for i in resp.missing {
            *out.get_mut(i as usize).ok_or_else(|| {
                Error::Interrupted("the server named a chunk it was not asked about".into())
            })? = true;
        }
        Ok(out)
    }

    fn load_tree(&self, id: &BlobId) -> Result<Tree, Error> {
        self.walk_tree(id)
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter + '_>, Error> {
        // A bounded queue into one upload stream: the pipeline waits when
        // the network or the server is slower than it.
        let (tx, rx) = mpsc::channel(16);
        // An empty batch now and then tells the server a long walk through
        // unchanged files is not a stalled upload. It holds only a weak
        // sender: the stream still ends when the uploader is done.
        let beat = tx.downgrade();
        let job = self.job.clone();
        self.handle.spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let Some(tx) = beat.upgrade() else { return };
                let empty = pb::UploadBatch {
                    job_id: job.clone(),
                    chunks: Vec::new(),
                };
                if tx.send(empty).await.is_err() {
                    return;
                }
            }
        });
        let mut client = self.client.clone();
        let upload = self.handle.spawn(async move {
            client
                .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner().stored)
        });
        Ok(Box::new(Uploader {
            batch: Vec::new(),
            batch_bytes: 0,
            tx: Some(tx),
            upload: Some(upload),
            handle: self.handle.clone(),
            job: self.job.clone(),
            limit: self.limit.map(|l| (l, std::time::Instant::now(), 0)),
        }))
    }
}

struct Uploader {
    batch: Vec<pb::UploadChunk>,
    batch_bytes: usize,
    tx: Option<mpsc::Sender<pb::UploadBatch>>,
    upload: Option<tokio::task::JoinHandle<Result<u64, tonic::Status>>>,
    handle: Handle,
    job: String,
    /// (bytes per second, start, bytes sent) when uploads are limited.
    limit: Option<(u64, std::time::Instant, u64)>,
}

impl Uploader {
    /// Sends the chunks gathered so far.
    fn flush(&mut self) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if let Some((rate, start, sent)) = &mut self.limit {
            // Never ahead of the allowed rate: wait until the bytes sent so
            // far fit in the time elapsed.
            *sent += self.batch_bytes as u64;
            let due = std::time::Duration::from_secs_f64(*sent as f64 / *rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        self.batch_bytes = 0;
        let msg = pb::UploadBatch {
            job_id: self.job.clone(),
            chunks: std::mem::take(&mut self.batch),
        };
        let sent = self.tx.as_ref().is_some_and(|tx| tx.blocking_send(msg).is_ok());
        if !sent {
            // The stream ended early: its error says why.
            self.outcome()?;
            return Err(Error::Interrupted("the server closed the upload".into()));
        }
        Ok(())
    }

    /// The upload's outcome, once its stream has ended.
    fn outcome(&mut self) -> Result<u64, Error> {
        self.tx = None;
        let Some(upload) = self.upload.take() else {
            return Err(Error::Interrupted("the upload already ended".into()));
        };
        match self.handle.block_on(upload) {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(s)) => Err(remote("upload chunks", s)),
            Err(e) => Err(Error::Interrupted(format!("the upload task failed: {e}"))),
        }
    }
}

impl BlobWriter for Uploader {
    fn add(&mut self, kind: BlobType, id: BlobId, payload: Vec<u8>, raw_len: u32) -> Result<(), Error> {
        self.batch_bytes += payload.len();
        self.batch.push(pb::UploadChunk {
            id: bytes::Bytes::copy_from_slice(&id.0),
            kind: match kind {
                BlobType::Data => 0,
                BlobType::Tree => 1,
            },
            payload: payload.into(),
            raw_len,
        });
        if self.batch_bytes >= UPLOAD_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<u64, Error> {
        self.flush()?;
        self.outcome()
    }
}

impl RemoteStore {
    /// One ReadChunks request: every chunk in `batch` is delivered to `each`
    /// once, checked end to end against its id, or returned with why not.
    /// Once `cancel` is cancelled, stops at once (dropping the stream
    /// stops the server's reads) and returns the rest as not delivered.
    async fn fetch_batch(
        &self,
        batch: &[BlobId],
        cancel: &CancellationToken,
        each: &ChunkSink<'_>,
    ) -> Vec<(BlobId, String)> {
        let mut wanted: HashSet<BlobId> = batch.iter().copied().collect();
        let all =
            |why: String, wanted: &HashSet<BlobId>| wanted.iter().map(|id| (*id, why.clone())).collect();
        let req = pb::ReadChunksRequest {
            job_id: self.job.clone(),
            ids: batch
                .iter()
                .map(|i| bytes::Bytes::copy_from_slice(&i.0))
                .collect(),
        };
        let mut stream = match self.client.clone().read_chunks(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return all(
                    format!("failed to read chunks: the server said: {}", s.message()),
                    &wanted,
                );
            }
        };
        let mut lost = Vec::new();
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = cancel.cancelled() => {
                    lost.extend(all("cancelled".into(), &wanted));
                    return lost;
                }
            };
            let c = match next {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(s) => {
                    lost.extend(all(
                        format!("failed to read chunks: the server said: {}", s.message()),
                        &wanted,
                    ));
                    return lost;
                }
            };
            // Only what was asked for, once: anything else is the server's error.
            let Some(id) = BlobId::from_slice(&c.id).filter(|id| wanted.remove(id)) else {
                lost.extend(all(
                    "the server sent a chunk that was not asked for".into(),
                    &wanted,
                ));
                return lost;
            };
            if !c.error.is_empty() {
                lost.push((id, c.error));
                continue;
            }
            if c.raw_len as usize > chunk::MAX_CHUNK {
                lost.push((id, format!("the server sent an oversized chunk for {id}")));
                continue;
            }
            // Checked end to end: the data must hash to the id the snapshot names.
            match chunk::decompress(&c.payload, c.raw_len as usize) {
                Ok(data) if chunk::blob_id(&self.keys, &data) == id => each(&id, &data),
                Ok(_) => lost.push((id, format!("chunk {id} from the server does not match its id"))),
                Err(e) => lost.push((id, format!("chunk {id} from the server: {e}"))),
            }
        }
        lost.extend(all("the server did not send it".into(), &wanted));
        lost
    }
}

impl RestoreSource for RemoteStore {
    fn load_tree(&self, id: &BlobId) -> Result<Tree, Error> {
        self.walk_tree(id)
    }

    fn fetch_chunks(
        &self,
        ids: &[BlobId],
        cancel: &CancellationToken,
        each: &ChunkSink<'_>,
    ) -> Vec<(BlobId, String)> {
        // Requests of READ_BATCH ids, several in flight, each answered pack
        // by pack by the server; decompressed and checked here, in parallel.
        let queue = Mutex::new(ids.chunks(READ_BATCH));
        let lost = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..READS_IN_FLIGHT {
                s.spawn(|| {
                    loop {
                        let next = queue.lock().next();
                        let Some(batch) = next else { break };
                        if cancel.is_cancelled() {
                            lost.lock()
                                .extend(batch.iter().map(|id| (*id, "cancelled".to_string())));
                            continue;
                        }
                        let failed = self.handle.block_on(self.fetch_batch(batch, cancel, each));
                        lost.lock().extend(failed);
                    }
                });
            }
        });
        lost.into_inner()
    }
}
