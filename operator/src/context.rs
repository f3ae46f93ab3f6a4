//! What every reconciler shares.

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
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
}

pub struct Context {
    pub client: Client,
    pub backer: Backer,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Wakes the snapshot mirror when a run ends.
    pub snapshots_changed: Notify,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Context {
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
