//! Where the operator keeps the CA: the Secret `backer-pki` (the CA and the
//! server's certificate, mounted by the server only) and the ConfigMap
//! `backer-ca` (the CA certificate alone, which agents read to trust the
//! server). The server's certificate is issued again before it ends.

use std::collections::BTreeMap;
use std::time::Duration;

use backer_proto::ca::{Ca, describe};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::error::Error;

pub const PKI_SECRET: &str = "backer-pki";
pub const CA_CONFIGMAP: &str = "backer-ca";
/// Issue the server's certificate again when it has fewer days left than this.
pub const RENEW_DAYS: i64 = 30;

fn pki_err(what: &'static str) -> impl FnOnce(backer_proto::ca::CaError) -> Error {
    move |e| Error::Pki(format!("failed to {what}: {e}"))
}

/// Loads the CA from `backer-pki`, creating it on first start, and makes sure
/// the server's certificate there names `server_names` and is not near its
/// end. Publishes the CA certificate in `backer-ca`.
pub async fn ensure(client: &Client, ns: &str, server_names: &[String]) -> Result<Ca, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let existing = secrets.get_opt(PKI_SECRET).await?;
    let mut data: BTreeMap<String, ByteString> =
        existing.as_ref().and_then(|s| s.data.clone()).unwrap_or_default();
    let text = |d: &BTreeMap<String, ByteString>, k: &str| {
        d.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let mut changed = false;
    let ca = match (text(&data, "ca.pem"), text(&data, "ca-key.pem")) {
        (Some(cert), Some(key)) => {
            Ca::load(&cert, &key).map_err(pki_err("read the CA in Secret backer-pki"))?
        }
        (None, None) => {
            // The public half outlives a lost Secret: if it is there, a CA
            // existed, and a new one would cut off every agent. Say so
            // rather than mint one silently; rotating is deleting both.
            let published = Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get_opt(CA_CONFIGMAP)
                .await?
                .is_some_and(|cm| cm.data.is_some_and(|d| d.contains_key("ca.pem")));
            if published {
                return Err(Error::Pki(format!(
                    "Secret {PKI_SECRET} is gone but ConfigMap {CA_CONFIGMAP} shows a CA existed: restore the \
                     Secret from backup; or, to start over with a new CA (every agent enrols again), delete \
                     ConfigMap {CA_CONFIGMAP} too"
                )));
            }
            let ca = Ca::create("Backer").map_err(pki_err("create the CA"))?;
            data.insert("ca.pem".into(), ByteString(ca.cert_pem.clone().into_bytes()));
            data.insert("ca-key.pem".into(), ByteString(ca.key_pem().as_bytes().to_vec()));
            changed = true;
            tracing::info!(secret = PKI_SECRET, "created the CA");
            ca
        }
        _ => {
            return Err(Error::Pki(
                "Secret backer-pki holds only one of ca.pem and ca-key.pem: restore both from backup \
                 rather than minting a new CA (every agent would have to enrol again)"
                    .into(),
            ));
        }
    };
    let now = chrono::Utc::now().timestamp();
    let current = text(&data, "server.pem").and_then(|c| describe(&c));
    let fits = current.is_some_and(|(names, not_after)| {
        server_names.iter().all(|n| names.contains(n)) && not_after - now > RENEW_DAYS * 86_400
    }) && data.contains_key("server-key.pem");
    if !fits {
        let issued = ca
            .issue_server(server_names)
            .map_err(pki_err("issue the server certificate"))?;
        data.insert("server.pem".into(), ByteString(issued.cert_pem.into_bytes()));
        data.insert(
            "server-key.pem".into(),
            ByteString(issued.key_pem.unwrap_or_default().into_bytes()),
        );
        changed = true;
        tracing::info!(secret = PKI_SECRET, names = ?server_names, "issued the server certificate");
    }
    if changed {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(PKI_SECRET.into()),
                namespace: Some(ns.into()),
                // Replacing with the version read makes a racing replica's write fail, not win.
                resource_version: existing
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".into(),
                    "backer".into(),
                )])),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match existing {
            Some(_) => {
                secrets
                    .replace(PKI_SECRET, &PostParams::default(), &secret)
                    .await?
            }
            None => secrets.create(&PostParams::default(), &secret).await?,
        };
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_CONFIGMAP.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".into(),
                "backer".into(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("ca.pem".into(), ca.cert_pem.clone())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(
            CA_CONFIGMAP,
            &PatchParams::apply(crate::MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
    Ok(ca)
}

/// Keeps the server's certificate current: checked daily and whenever
/// Secret `backer-pki` changes (a certificate edited, removed or near its
/// end by someone's hand is issued again at once, not a day later). The
/// server re-reads the files when the kubelet updates its mounted Secret.
pub async fn keep_current(client: Client, ns: String, server_names: Vec<String>) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let only_ours = watcher::Config::default().fields(&format!("metadata.name={PKI_SECRET}"));
    let mut changes = watcher(secrets, only_ours)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut daily = tokio::time::interval(Duration::from_secs(86_400));
    // The first tick is now: `ensure` ran at start.
    daily.tick().await;
    loop {
        tokio::select! {
            _ = daily.tick() => {}
            changed = changes.next() => match changed {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(secret = PKI_SECRET, "failed to watch: {e}");
                    continue;
                }
                None => {
                    tracing::warn!(secret = PKI_SECRET, "the watch ended: checking daily only");
                    changes = futures::stream::pending().boxed();
                    continue;
                }
            },
        }
        if let Err(e) = ensure(&client, &ns, &server_names).await {
            tracing::warn!("failed to check the server certificate: {e}");
        }
    }
}
