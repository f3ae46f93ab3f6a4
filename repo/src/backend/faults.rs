//! A fault-injecting object store, for tests that try to break the engine:
//! errors, hung calls, slow calls, reads cut short, writes whose reply is
//! lost, and listings that fail part-way, chosen by a seed.
//!
//! Whether a call fails is decided from the seed, the operation, the object
//! and how often that object was touched before, not from the order calls
//! arrive in, so a seed picks the same faults however the pipeline's threads
//! interleave.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use parking_lot::Mutex;

/// Which faults to inject and how often.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    /// Probability that a call gets a fault, 0.0 to 1.0.
    pub rate: f64,
    /// How long a "slow" call waits before it goes on.
    pub slow: Duration,
    /// How long a "hung" call waits before failing; longer than the
    /// backend's call timeout, so the timeout is what ends it.
    pub hang: Duration,
    /// Only calls whose object name contains this are touched (all if empty).
    pub only: String,
    /// The kinds of fault to choose from, equally likely.
    pub kinds: Vec<Fault>,
}

impl FaultPlan {
    pub fn new(seed: u64, rate: f64) -> Self {
        FaultPlan {
            seed,
            rate,
            slow: Duration::from_millis(20),
            hang: Duration::from_secs(2),
            only: String::new(),
            kinds: vec![Fault::Error, Fault::Hang, Fault::Slow, Fault::Broken],
        }
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub errors: AtomicU64,
    pub hangs: AtomicU64,
    pub slow: AtomicU64,
    pub short_reads: AtomicU64,
    pub lost_replies: AtomicU64,
    pub broken_listings: AtomicU64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        [
            &self.errors,
            &self.hangs,
            &self.slow,
            &self.short_reads,
            &self.lost_replies,
            &self.broken_listings,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} errors, {} hung calls, {} slow calls, {} short reads, {} lost write replies, {} listings broken part-way",
            n(&self.errors),
            n(&self.hangs),
            n(&self.slow),
            n(&self.short_reads),
            n(&self.lost_replies),
            n(&self.broken_listings)
        )
    }
}

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// The call fails at once, as on a dropped connection.
    Error,
    /// The call hangs, then fails: the caller's timeout must end it.
    Hang,
    /// The call waits a little, then goes on.
    Slow,
    /// Reads: the body is cut short. Writes: the write lands, the reply is
    /// lost. Listings: the listing fails part-way. Deletes: as writes.
    Broken,
}

/// The wrapper. Build it with [`crate::Backend::with_faults`].
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<State>,
}

struct State {
    plan: FaultPlan,
    counts: Arc<FaultCounts>,
    touched: Mutex<HashMap<(&'static str, String), u64>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan, counts: Arc<FaultCounts>) -> Self {
        FaultyStore {
            inner,
            state: Arc::new(State {
                plan,
                counts,
                touched: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl State {
    fn pick(&self, op: &'static str, path: &str) -> Fault {
        if !path.contains(&self.plan.only) {
            return Fault::None;
        }
        let n = {
            let mut t = self.touched.lock();
            let c = t.entry((op, path.to_string())).or_insert(0);
            *c += 1;
            *c
        };
        let h = splitmix(self.plan.seed ^ fnv(op.as_bytes()) ^ fnv(path.as_bytes()).rotate_left(17) ^ n);
        let roll = (h >> 11) as f64 / (1u64 << 53) as f64;
        if roll >= self.plan.rate {
            return Fault::None;
        }
        let kinds = &self.plan.kinds;
        if kinds.is_empty() {
            return Fault::None;
        }
        kinds[(splitmix(h) % kinds.len() as u64) as usize]
    }

    /// Applies the faults every kind of call shares; returns what is left for
    /// the call itself to do.
    async fn before(&self, op: &'static str, path: &str) -> Result<Fault> {
        match self.pick(op, path) {
            Fault::Error => {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                Err(injected(op, path, "connection reset"))
            }
            Fault::Hang => {
                self.counts.hangs.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.plan.hang).await;
                Err(injected(op, path, "hung and gave up"))
            }
            Fault::Slow => {
                self.counts.slow.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.plan.slow).await;
                Ok(Fault::None)
            }
            other => Ok(other),
        }
    }
}

fn injected(op: &str, path: &str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault: {op} {path}: {what}").into(),
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?}, {:?})", self.inner, self.state.plan)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let fault = self.state.before("put", location.as_ref()).await?;
        let r = self.inner.put_opts(location, payload, opts).await?;
        if fault == Fault::Broken {
            self.state.counts.lost_replies.fetch_add(1, Ordering::Relaxed);
            return Err(injected(
                "put",
                location.as_ref(),
                "stored, but the reply was lost",
            ));
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.state.before("put", location.as_ref()).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { "head" } else { "get" };
        let fault = self.state.before(op, location.as_ref()).await?;
        let r = self.inner.get_opts(location, options).await?;
        if fault != Fault::Broken || op == "head" {
            return Ok(r);
        }
        // The body ends early, as when a connection drops mid-transfer; the
        // metadata still claims the whole object.
        let (meta, range, attributes) = (r.meta.clone(), r.range.clone(), r.attributes.clone());
        let full = r.bytes().await?;
        let kept = if full.is_empty() {
            full
        } else {
            self.state.counts.short_reads.fetch_add(1, Ordering::Relaxed);
            full.slice(..full.len() / 2)
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::iter([Ok(kept)]).boxed()),
            meta,
            range,
            attributes,
            extensions: Default::default(),
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.state.before("get", location.as_ref()).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        // Each delete is decided on its own; a "broken" one removes the
        // object and then reports a failure, as when the reply is lost.
        let state = Arc::clone(&self.state);
        let inner = Arc::clone(&self.inner);
        locations
            .then(move |loc| {
                let state = Arc::clone(&state);
                let inner = Arc::clone(&inner);
                async move {
                    let loc = loc?;
                    let fault = state.before("delete", loc.as_ref()).await?;
                    inner.delete(&loc).await?;
                    if fault == Fault::Broken {
                        state.counts.lost_replies.fetch_add(1, Ordering::Relaxed);
                        return Err(injected(
                            "delete",
                            loc.as_ref(),
                            "deleted, but the reply was lost",
                        ));
                    }
                    Ok(loc)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let name = prefix.map(|p| p.to_string()).unwrap_or_default();
        let fault = self.state.pick("list", &name);
        let inner = self.inner.list(prefix);
        match fault {
            Fault::None => inner,
            Fault::Slow => {
                self.state.counts.slow.fetch_add(1, Ordering::Relaxed);
                let slow = self.state.plan.slow;
                futures::stream::once(async move {
                    tokio::time::sleep(slow).await;
                    inner
                })
                .flatten()
                .boxed()
            }
            Fault::Error | Fault::Hang => {
                self.state.counts.errors.fetch_add(1, Ordering::Relaxed);
                futures::stream::iter([Err(injected("list", &name, "connection reset"))]).boxed()
            }
            Fault::Broken => {
                // Some entries arrive, then the listing fails.
                self.state.counts.broken_listings.fetch_add(1, Ordering::Relaxed);
                let err = injected("list", &name, "listing failed part-way");
                inner.take(2).chain(futures::stream::iter([Err(err)])).boxed()
            }
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let name = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.state.before("list", &name).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.state.before("copy", to.as_ref()).await?;
        self.inner.copy_opts(from, to, options).await
    }
}
