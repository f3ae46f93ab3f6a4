//! What every reconciler shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::backer::Backer;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's namespace: where node-path jobs and the PKI live.
    pub namespace: String,
    /// The agents' ServiceAccount: only its pods may ask for a node's certificate.
    pub agent_service_account: String,
    /// Where kubelets keep pod volumes on the nodes.
    pub kubelet_root: String,
    /// Nodes that get a BackerClient (a label selector; all when empty).
    pub node_selector: String,
    /// Directories holding hostPath volumes (local-path's) that the agents
    /// may restore into; empty when not known.
    pub host_volume_dirs: Vec<String>,
}

/// The backoff key of an object: `kind/namespace/name`.
pub fn key_of<K: Resource>(kind: &str, obj: &K) -> String {
    format!(
        "{kind}/{}/{}",
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

pub struct Context {
    pub client: Client,
    pub backer: Backer,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Wakes the snapshot mirror when a run ends.
    pub snapshots_changed: Notify,
    /// Consecutive failures per object, for its retry backoff.
    pub failures: Mutex<HashMap<String, backon::ExponentialBackoff>>,
    /// One certificate signed at a time: two requests for one node signed
    /// at once would each revoke the other's certificate.
    pub signing: tokio::sync::Mutex<()>,
    /// The operator's one stop (SIGTERM, or the lease lost): the
    /// controllers end the reconciles under way and return.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Context {
    /// How long object `key` waits before its next try: 5 s, doubling per
    /// consecutive failure, at most 5 minutes. One broken object does not
    /// slow the others, and does not hammer the API or the server.
    pub fn backoff(&self, key: String) -> Duration {
        use backon::BackoffBuilder;
        const MAX: Duration = Duration::from_secs(300);
        let mut f = self.failures.lock();
        let waits = f.entry(key).or_insert_with(|| {
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(5))
                .with_max_delay(MAX)
                .without_max_times()
                .build()
        });
        waits.next().unwrap_or(MAX)
    }

    /// Forgets `key`'s failures after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().remove(key);
    }

    /// Records an Event on `obj`; a failure to record is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), "failed to record event {reason}: {e}");
        }
    }
}
