//! A node agent's identity in Kubernetes, obtained the way kubelets get
//! theirs: a CertificateSigningRequest for signer `backer.dev/agent`, filed
//! with the pod's own ServiceAccount token. The operator approves it only
//! for the node this pod runs on and has the server sign it. The key is made
//! here and never leaves the node.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// How long to wait for the operator to sign.
const WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub namespace: String,
    /// The server's data address (host:port).
    pub server: String,
}

/// Requests a certificate for `id.node` and writes the agent's state.
pub async fn enrol(state_dir: &Path, id: &Identity) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (is this a pod with a ServiceAccount token?)")?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("failed to create {}", state_dir.display()))?;
    let (key_pem, csr_pem) = backer_proto::pki::new_client_csr(&id.node)?;
    let mut suffix = [0u8; 4];
    backer_repo::crypto::random_fill(&mut suffix);
    let name = format!("backer-agent-{}-{}", id.node, hex(&suffix));
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: backer_proto::pki::AGENT_SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    api.create(&PostParams::default(), &csr)
        .await
        .with_context(|| format!("failed to file certificate request {name}"))?;
    tracing::info!(csr = %name, node = %id.node, "certificate requested; waiting for the operator");
    let started = std::time::Instant::now();
    let cert_pem = loop {
        let now = api
            .get(&name)
            .await
            .with_context(|| format!("failed to read {name}"))?;
        let status = now.status.unwrap_or_default();
        if let Some(c) = status.certificate.filter(|c| !c.0.is_empty()) {
            break String::from_utf8(c.0).context("the signed certificate is not PEM text")?;
        }
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| matches!(c.type_.as_str(), "Denied" | "Failed"))
        {
            bail!(
                "certificate request {name} {}: {}",
                c.type_.to_lowercase(),
                c.message.as_deref().unwrap_or("no reason given")
            );
        }
        if started.elapsed() > WAIT {
            bail!(
                "certificate request {name} was not signed within {} s: is backer-operator running?",
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ca_pem = Api::<ConfigMap>::namespaced(client, &id.namespace)
        .get("backer-ca")
        .await
        .context("failed to read ConfigMap backer-ca (the server's CA)")?
        .data
        .and_then(|d| d.get("ca.pem").cloned())
        .context("ConfigMap backer-ca has no ca.pem")?;
    let not_after = backer_proto::ca::describe(&cert_pem)
        .map(|(_, t)| t)
        .context("the signed certificate cannot be read")?;
    crate::write(state_dir, "key.pem", &key_pem, true)?;
    crate::write(state_dir, "cert.pem", &cert_pem, false)?;
    crate::write(state_dir, "ca.pem", &ca_pem, false)?;
    crate::save_state(
        state_dir,
        &crate::AgentState {
            server: id.server.clone(),
            client: id.node.clone(),
            not_after,
            plaintext: false,
        },
    )?;
    tracing::info!(node = %id.node, "enrolled through the Kubernetes API");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
