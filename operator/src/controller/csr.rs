//! Node agents get their certificates the way kubelets do: the agent files a
//! CertificateSigningRequest for signer `backer.dev/agent` with its pod's
//! projected ServiceAccount token, and the API server records who asked (the
//! ServiceAccount and the pod it is bound to). This signer approves only when
//! that pod is an agent pod running on the node whose client it asks to be;
//! then the server signs the CSR. So no agent can obtain another node's
//! identity, and the agent's key never leaves its node.

use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::context::Context;
use crate::crd::BackerClient;
use crate::error::Error;

use backer_proto::pki::AGENT_SIGNER as SIGNER;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

pub async fn run(ctx: Arc<Context>) {
    let csrs: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let only_ours = watcher::Config::default().fields(&format!("spec.signerName={SIGNER}"));
    super::drive(Controller::new(csrs, only_ours), "csr", ctx, reconcile).await;
}

/// Why a request is denied, or the client name it may have.
pub fn judge(
    csr: &CertificateSigningRequest,
    pod: Option<&Pod>,
    namespace: &str,
    service_account: &str,
) -> Result<String, String> {
    let spec = &csr.spec;
    let expected = format!("system:serviceaccount:{namespace}:{service_account}");
    if spec.username.as_deref() != Some(expected.as_str()) {
        return Err(format!(
            "requested by {}, not by the agents' ServiceAccount {expected}",
            spec.username.as_deref().unwrap_or("an unknown user")
        ));
    }
    let extra = |k: &str| {
        spec.extra
            .as_ref()
            .and_then(|e| e.get(k))
            .and_then(|v| v.first())
            .cloned()
    };
    let (Some(pod_name), Some(pod_uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err(
            "the requester's token is not bound to a pod: use the pod's projected ServiceAccount token"
                .into(),
        );
    };
    let Some(pod) = pod else {
        return Err(format!("pod {namespace}/{pod_name} that asked no longer exists"));
    };
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(format!(
            "pod {namespace}/{pod_name} is not the pod the token was issued to"
        ));
    }
    let p = pod.spec.as_ref();
    if p.and_then(|s| s.service_account_name.as_deref()) != Some(service_account) {
        return Err(format!("pod {pod_name} does not run as {service_account}"));
    }
    let node = match p.and_then(|s| s.node_name.clone()) {
        Some(node) if !node.is_empty() => node,
        _ => return Err(format!("pod {pod_name} is not on a node")),
    };
    let pem = String::from_utf8_lossy(&spec.request.0);
    match backer_proto::pki::requested_client(&pem) {
        Some(asked) if asked == node => Ok(node),
        Some(asked) => Err(format!(
            "pod {pod_name} runs on node {node} but asks to be {asked}: an agent may only be its own node"
        )),
        None => Err("the request does not name the client it asks to be".into()),
    }
}

fn decided(csr: &CertificateSigningRequest) -> bool {
    let st = csr.status.as_ref();
    st.is_some_and(|s| s.certificate.is_some())
        || st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| matches!(c.type_.as_str(), "Denied" | "Failed")))
}

pub async fn reconcile(csr: Arc<CertificateSigningRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    if csr.spec.signer_name != SIGNER || decided(&csr) {
        return Ok(Action::await_change());
    }
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let _one_at_a_time = ctx.signing.lock().await;
    // The cache may lag our own last write: signing twice would revoke the
    // first certificate, so decide on the object as it is now.
    let Some(csr) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if decided(&csr) {
        return Ok(Action::await_change());
    }
    let ns = &ctx.settings.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod_name = csr
        .spec
        .extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME))
        .and_then(|v| v.first())
        .cloned();
    let pod = match &pod_name {
        Some(p) => pods.get_opt(p).await?,
        None => None,
    };
    let mut verdict = judge(&csr, pod.as_ref(), ns, &ctx.settings.agent_service_account);
    if let Ok(node) = &verdict {
        let clients: Api<BackerClient> = Api::all(ctx.client.clone());
        match clients.get_opt(node).await? {
            Some(bc)
                if bc.metadata.deletion_timestamp.is_none() && bc.spec.node_name.as_ref() == Some(node) => {}
            _ => {
                verdict = Err(format!(
                    "node {node} has no BackerClient (is it selected for backup?)"
                ))
            }
        }
    }
    let node = match verdict {
        Ok(node) => node,
        Err(why) => {
            tracing::warn!(csr = %name, "denied: {why}");
            ctx.metrics.certificates_denied.inc();
            set_decision(&api, &name, "Denied", "NotThisNode", &why).await?;
            return Ok(Action::await_change());
        }
    };
    let csr_pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let signed = match ctx.backer.sign_client(&node, &csr_pem).await {
        Ok(s) => s,
        // Refused as asked (a name the server cannot take): retrying cannot help.
        Err(Error::Refused(why)) => {
            tracing::warn!(csr = %name, "denied: {why}");
            ctx.metrics.certificates_denied.inc();
            set_decision(&api, &name, "Denied", "ServerRefused", &why).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    set_decision(
        &api,
        &name,
        "Approved",
        "AgentOnItsNode",
        &format!("pod on node {node}"),
    )
    .await?;
    let status = serde_json::json!({
        "status": { "certificate": ByteString(signed.certificate_pem.into_bytes()) }
    });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    ctx.metrics.certificates_signed.inc();
    tracing::info!(csr = %name, node, "signed the agent's certificate");
    Ok(Action::await_change())
}

async fn set_decision(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    type_: &str,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "status": { "conditions": [{
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": message,
        }]}
    });
    api.patch_subresource("approval", name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
