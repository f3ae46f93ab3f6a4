//! BackerClients: one per selected node (created here when the node appears,
//! deleted when it goes), or one per external host (created by an admin).
//! Deleting a BackerClient revokes its certificate on the server at once:
//! the finalizer holds the object until the server has done so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use backer_proto::v1 as pb;

use crate::backer::status;
use crate::context::Context;
use crate::crd::{BackerClient, BackerClientSpec};
use crate::error::Error;
use crate::status::{apply_status, from_unix, set_condition};

pub const FINALIZER: &str = "backer.dev/revoke";
const REFRESH: Duration = Duration::from_secs(15);

/// The Secret that holds external hosts' enrolment bundles, one key
/// `<client>.json` each (one Secret, so the operator's access to Secrets
/// can be limited to it and backer-pki by name).
pub const ENROL_SECRET: &str = "backer-enrol";

pub fn enrol_key(name: &str) -> String {
    format!("{name}.json")
}

/// Sets (or with `None` removes) client `name`'s bundle in `backer-enrol`.
async fn set_bundle(ctx: &Context, name: &str, bundle: Option<&str>) -> Result<(), Error> {
    use base64::Engine;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let value = bundle.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    let patch = serde_json::json!({ "data": { enrol_key(name): value } });
    match secrets
        .patch(ENROL_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.is_not_found() => {
            let Some(b) = bundle else { return Ok(()) };
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(ENROL_SECRET.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".into(),
                        "backer".into(),
                    )])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    enrol_key(name),
                    ByteString(b.as_bytes().to_vec()),
                )])),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn run(ctx: Arc<Context>) {
    let clients: Api<BackerClient> = Api::all(ctx.client.clone());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_watch = watcher::Config::default().labels(&ctx.settings.node_selector);
    // A node's departure concerns the client of the same name.
    let for_clients = Controller::new(clients, watcher::Config::default()).watches(
        nodes.clone(),
        node_watch.clone(),
        |node: Node| Some(ObjectRef::<BackerClient>::new(&node.name_any())),
    );
    // A node's arrival makes its client.
    let for_nodes = Controller::new(nodes, node_watch);
    futures::join!(
        super::drive(for_clients, "backerclient", Arc::clone(&ctx), reconcile),
        super::drive(for_nodes, "node", ctx, reconcile_node),
    );
}

/// Creates the BackerClient of a selected node that has none.
async fn reconcile_node(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    let clients: Api<BackerClient> = Api::all(ctx.client.clone());
    if node.metadata.deletion_timestamp.is_some() || clients.get_opt(&name).await?.is_some() {
        return Ok(Action::await_change());
    }
    let bc = BackerClient::new(
        &name,
        BackerClientSpec {
            node_name: Some(name.clone()),
        },
    );
    match clients.create(&PostParams::default(), &bc).await {
        Ok(_) => tracing::info!(backerclient = %name, "created for node"),
        Err(kube::Error::Api(e)) if e.is_already_exists() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

async fn reconcile(obj: Arc<BackerClient>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<BackerClient> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(bc) => apply(&bc, &ctx).await,
            Finalizer::Cleanup(bc) => cleanup(&bc, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(bc: &BackerClient, ctx: &Context) -> Result<Action, Error> {
    let name = bc.name_any();
    let api: Api<BackerClient> = Api::all(ctx.client.clone());
    if let Some(node) = &bc.spec.node_name {
        // Gone, or no longer selected (e.g. labelled a control-plane node,
        // which by default gets no agent): no identity either.
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let this_one = ListParams::default()
            .fields(&format!("metadata.name={node}"))
            .labels(&ctx.settings.node_selector);
        if nodes.list(&this_one).await?.items.is_empty() {
            tracing::info!(backerclient = %name, node, "node is gone or no longer selected: deleting its client");
            api.delete(&name, &DeleteParams::default()).await?;
            return Ok(Action::await_change());
        }
    }
    let known = ctx.backer.client(&name).await?;
    let mut m = ctx.backer.mgmt().await?;
    // An external host is registered here and gets its token in a Secret; a
    // node's agent is registered when its certificate request is approved.
    if bc.spec.node_name.is_none() && known.is_none() {
        let added = m
            .add_client(pb::AddClientRequest {
                name: name.clone(),
                reenroll: false,
            })
            .await
            .map_err(status("register the client"))?
            .into_inner();
        let bundle = serde_json::json!({
            "server": added.server_address,
            "client": name,
            "token": added.token,
            "ca_pem": added.ca_pem,
        });
        set_bundle(ctx, &name, Some(&bundle.to_string())).await?;
        ctx.event(
            bc,
            false,
            "TokenIssued",
            format!(
                "enrolment bundle in Secret {}/{ENROL_SECRET}, key {}: run `backer-agent enroll --bundle FILE` on the host",
                ctx.settings.namespace,
                enrol_key(&name)
            ),
        )
        .await;
    }
    let last_backup = m
        .list_snapshots(pb::ListSnapshotsRequest { client: name.clone() })
        .await
        .map_err(status("list snapshots"))?
        .into_inner()
        .snapshots
        .iter()
        .map(|s| s.time)
        .max();

    let old = bc.status.clone();
    let mut st = old.clone().unwrap_or_default();
    st.observed_generation = bc.metadata.generation;
    st.last_backup = last_backup.and_then(from_unix);
    match &known {
        Some(c) => {
            st.phase = Some(
                match c.state() {
                    pb::ClientState::Enrolled => "Enrolled",
                    pb::ClientState::Revoked => "Revoked",
                    _ => "Pending",
                }
                .into(),
            );
            st.connected = c.connected;
            st.agent_version = (!c.agent_version.is_empty()).then(|| c.agent_version.clone());
            st.last_seen = from_unix(c.last_seen).or(st.last_seen.take());
            st.certificate_expiry = from_unix(c.cert_not_after);
        }
        None => {
            st.phase = Some("Pending".into());
            st.connected = false;
        }
    }
    let enrolled = st.phase.as_deref() == Some("Enrolled");
    let (reason, message) = match (enrolled, st.connected) {
        (true, true) => ("Connected", "the agent is enrolled and connected".to_string()),
        (true, false) => (
            "Disconnected",
            "the agent is enrolled but not connected".to_string(),
        ),
        (false, _) if bc.spec.node_name.is_some() => (
            "AwaitingAgent",
            "waiting for the node's agent to request its certificate".to_string(),
        ),
        (false, _) => (
            "AwaitingEnrolment",
            format!(
                "the host has not enrolled yet (bundle in Secret {ENROL_SECRET}, key {})",
                enrol_key(&name)
            ),
        ),
    };
    set_condition(
        &mut st.conditions,
        "Ready",
        enrolled && st.connected,
        reason,
        &message,
        bc.metadata.generation,
    );
    apply_status(&api, bc, old.as_ref(), &st).await?;
    Ok(Action::requeue(REFRESH))
}

async fn cleanup(bc: &BackerClient, ctx: &Context) -> Result<Action, Error> {
    let name = bc.name_any();
    let mut m = ctx.backer.mgmt().await?;
    match m
        .remove_client(pb::RemoveClientRequest { name: name.clone() })
        .await
    {
        Ok(_) => {}
        // Never enrolled: nothing to revoke.
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(status("revoke the client's certificate")(s)),
    }
    set_bundle(ctx, &name, None).await?;
    tracing::info!(backerclient = %name, "certificate revoked");
    ctx.event(
        bc,
        false,
        "Revoked",
        format!("client {name} removed from the server; its certificate is refused"),
    )
    .await;
    Ok(Action::await_change())
}
