//! One module per resource the operator reconciles, and the one way they
//! are driven: metrics per reconcile, a per-object backoff on failure, the
//! object named in every failure's log line.

pub mod backupjob;
pub mod client;
pub mod csr;
pub mod listing;
pub mod restorejob;
pub mod snapshot;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use kube::Resource;
use kube::runtime::controller::{Action, Controller};
use serde::de::DeserializeOwned;

use crate::context::{Context, key_of};
use crate::error::Error;

/// Runs `controller` with `reconcile` until shutdown.
pub async fn drive<K, F, Fut>(controller: Controller<K>, kind: &'static str, ctx: Arc<Context>, reconcile: F)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let shutdown = ctx.shutdown.clone().cancelled_owned();
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj, ctx| {
                let reconcile = reconcile.clone();
                async move {
                    let key = key_of(kind, &*obj);
                    let started = std::time::Instant::now();
                    let r = reconcile(obj, Arc::clone(&ctx)).await;
                    ctx.metrics.reconciled(kind, started.elapsed());
                    if r.is_ok() {
                        ctx.succeeded(&key);
                    }
                    r
                }
            },
            move |obj, err: &Error, ctx| {
                let key = key_of(kind, &*obj);
                ctx.metrics.failed(kind, err.category());
                tracing::warn!(object = %key, category = err.category(), "reconcile failed: {err}");
                Action::requeue(ctx.backoff(key))
            },
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
