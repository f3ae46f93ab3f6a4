//! Mirrors the repository's snapshots as Snapshot objects: in the PVC's
//! namespace for a volume, in the BackupJob's namespace for its node paths,
//! in the operator's namespace for anything else. Snapshots forgotten by
//! retention disappear here too. Runs every interval and when a run ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};

use backer_proto::v1 as pb;

use crate::backer::status;
use crate::context::Context;
use crate::controller::backupjob::{TAG_JOB, TAG_PVC};
use crate::crd::{Snapshot, SnapshotSpec};
use crate::error::Error;
use crate::status::from_unix;

const INTERVAL: Duration = Duration::from_secs(30);
/// The first 32 hex digits of the id (label values stop at 63 characters).
pub const LABEL_ID: &str = "backer.dev/snapshot-id";
const LABEL_MANAGED: &str = "app.kubernetes.io/managed-by";

pub async fn run(ctx: Arc<Context>) {
    loop {
        let started = std::time::Instant::now();
        if let Err(e) = sync(&ctx).await {
            ctx.metrics.failed("snapshot", e.category());
            tracing::warn!("failed to mirror snapshots: {e}");
        }
        ctx.metrics.reconciled("snapshot", started.elapsed());
        tokio::select! {
            _ = ctx.snapshots_changed.notified() => {}
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// The object a repository snapshot becomes: its namespace and spec.
pub fn mirror(s: &pb::Snapshot, operator_ns: &str) -> (String, String, SnapshotSpec) {
    let tagged = |prefix: &str| {
        s.tags
            .iter()
            .find_map(|t| t.strip_prefix(prefix))
            .and_then(|v| v.split_once('/'))
            .map(|(ns, name)| (ns.to_string(), name.to_string()))
    };
    let pvc = tagged(TAG_PVC);
    let job = tagged(TAG_JOB);
    let ns = pvc
        .as_ref()
        .or(job.as_ref())
        .map(|(ns, _)| ns.clone())
        .unwrap_or_else(|| operator_ns.to_string());
    let short = &s.id[..s.id.len().min(10)];
    let base = pvc
        .as_ref()
        .map(|(_, n)| n.clone())
        .or_else(|| job.as_ref().map(|(_, n)| n.clone()))
        .unwrap_or_else(|| s.client.clone());
    // Object names are at most 253 characters.
    let name = format!("{}-{short}", &base[..base.len().min(200)]);
    let spec = SnapshotSpec {
        id: s.id.clone(),
        client: s.client.clone(),
        pvc: pvc.map(|(_, n)| n),
        backup_job: job.map(|(_, n)| n),
        time: from_unix(s.time).unwrap_or_default(),
        paths: s.paths.clone(),
        tags: s.tags.clone(),
        files: s.files,
        bytes: s.bytes,
        partial: s.partial,
    };
    (ns, name, spec)
}

pub async fn sync(ctx: &Context) -> Result<(), Error> {
    let snaps = ctx
        .backer
        .mgmt()
        .await?
        .list_snapshots(pb::ListSnapshotsRequest {
            client: String::new(),
        })
        .await
        .map_err(status("list snapshots"))?
        .into_inner()
        .snapshots;
    let all: Api<Snapshot> = Api::all(ctx.client.clone());
    let existing: HashMap<String, Snapshot> = all
        .list(&ListParams::default().labels(&format!("{LABEL_MANAGED}=backer-operator")))
        .await?
        .into_iter()
        .map(|o| (o.spec.id.clone(), o))
        .collect();
    let mut wanted = std::collections::HashSet::new();
    for s in &snaps {
        wanted.insert(s.id.clone());
        if existing.contains_key(&s.id) {
            continue;
        }
        let (ns, name, spec) = mirror(s, &ctx.settings.namespace);
        let obj = Snapshot {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL_ID.into(), s.id[..s.id.len().min(32)].to_string()),
                    (LABEL_MANAGED.into(), "backer-operator".into()),
                    ("backer.dev/client".into(), s.client.clone()),
                ])),
                ..Default::default()
            },
            spec,
        };
        let api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
        match api
            .patch(
                &name,
                &PatchParams::apply(crate::MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
        {
            Ok(_) => tracing::info!(snapshot = %format!("{ns}/{name}"), "mirrored"),
            // The namespace went away: nothing to show the snapshot in.
            Err(kube::Error::Api(e)) if e.is_not_found() => {}
            // One namespace refusing (terminating, quota) must not stop the rest.
            Err(e) => {
                ctx.metrics.failed("snapshot", "kube");
                tracing::warn!(snapshot = %format!("{ns}/{name}"), "failed to mirror: {e}");
            }
        }
    }
    for (id, obj) in existing {
        if !wanted.contains(&id) {
            let ns = obj.namespace().unwrap_or_default();
            let api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
            match api.delete(&obj.name_any(), &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(snapshot = %format!("{ns}/{}", obj.name_any()), "forgotten in the repository: removed")
                }
                Err(kube::Error::Api(e)) if e.is_not_found() => {}
                Err(e) => {
                    ctx.metrics.failed("snapshot", "kube");
                    tracing::warn!(snapshot = %format!("{ns}/{}", obj.name_any()), "failed to remove: {e}");
                }
            }
        }
    }
    Ok(())
}

/// The repository's snapshot behind the Snapshot object `name` of namespace
/// `ns`. The object is only a pointer: the repository decides what the
/// snapshot is and which namespace it belongs to, so a Snapshot object made
/// by hand cannot reach another namespace's data or a node's files.
pub async fn resolve(ctx: &Context, ns: &str, name: &str) -> Result<pb::Snapshot, Error> {
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), ns);
    let snap = snaps.get_opt(name).await?.ok_or_else(|| {
        Error::Invalid(format!(
            "Snapshot {ns}/{name} does not exist (kubectl get snapshots -n {ns})"
        ))
    })?;
    let real = ctx
        .backer
        .mgmt()
        .await?
        .list_snapshots(pb::ListSnapshotsRequest {
            client: snap.spec.client.clone(),
        })
        .await
        .map_err(status("list snapshots"))?
        .into_inner()
        .snapshots
        .into_iter()
        .find(|s| s.id == snap.spec.id)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "Snapshot {ns}/{name} names no snapshot in the repository (forgotten by retention?)"
            ))
        })?;
    let (home, _, _) = mirror(&real, &ctx.settings.namespace);
    if home != ns {
        return Err(Error::Invalid(format!(
            "Snapshot {ns}/{name} is not of this namespace: it may be used only from {home}"
        )));
    }
    Ok(real)
}
