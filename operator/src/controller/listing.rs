//! SnapshotListings: a namespace's user asks what a Snapshot of the
//! namespace holds, without any access to the server. Answered once, in
//! the object's status, then deleted after [`KEEP`].

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::api::DeleteParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use backer_proto::v1 as pb;

use crate::backer::status;
use crate::context::Context;
use crate::crd::{ListedEntry, MAX_LISTED, SnapshotListing, SnapshotListingStatus};
use crate::error::Error;
use crate::status::apply_status;

/// How long an answered listing stays for its reader.
const KEEP: Duration = Duration::from_secs(600);

pub async fn run(ctx: Arc<Context>) {
    let listings: Api<SnapshotListing> = Api::all(ctx.client.clone());
    let controller = Controller::new(listings, watcher::Config::default());
    super::drive(controller, "snapshotlisting", ctx, reconcile).await;
}

async fn reconcile(req: Arc<SnapshotListing>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = req.namespace().unwrap_or_default();
    let api: Api<SnapshotListing> = Api::namespaced(ctx.client.clone(), &ns);
    if req.status.as_ref().is_some_and(|s| s.phase.is_some()) {
        // Answered: delete it once its reader has had time to read it.
        let age = req
            .creation_timestamp()
            .map(|t| Duration::from_secs((Utc::now().timestamp() - t.0.as_second()).max(0) as u64))
            .unwrap_or_default();
        if age >= KEEP {
            api.delete(&req.name_any(), &DeleteParams::default()).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(KEEP - age));
    }
    let st = match list(&req, &ns, &ctx).await {
        Ok(st) => st,
        Err(Error::Invalid(why)) => SnapshotListingStatus {
            phase: Some("Failed".into()),
            message: Some(why),
            ..Default::default()
        },
        Err(e) => return Err(e),
    };
    apply_status(&api, &*req, None, &st).await?;
    Ok(Action::requeue(KEEP))
}

/// Up to [`MAX_LISTED`] entries of the snapshot under the requested path.
async fn list(req: &SnapshotListing, ns: &str, ctx: &Context) -> Result<SnapshotListingStatus, Error> {
    let real = crate::controller::snapshot::resolve(ctx, ns, &req.spec.snapshot).await?;
    let path = req.spec.path.clone().unwrap_or_default();
    let mut stream = match ctx
        .backer
        .mgmt()
        .await?
        .list_files(pb::ListFilesRequest {
            snapshot: real.id,
            client: real.client,
            path: path.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            return Err(Error::Invalid(format!(
                "{path} is not in Snapshot {ns}/{}",
                req.spec.snapshot
            )));
        }
        Err(s) => return Err(status("list the snapshot's files")(s)),
    };
    let mut st = SnapshotListingStatus {
        phase: Some("Ready".into()),
        ..Default::default()
    };
    while let Some(e) = stream
        .message()
        .await
        .map_err(status("list the snapshot's files"))?
    {
        if st.entries.len() == MAX_LISTED {
            st.truncated = true;
            st.message = Some(format!(
                "only the first {MAX_LISTED} entries are listed: ask for a path inside the snapshot"
            ));
            break;
        }
        st.entries.push(ListedEntry {
            path: e.path,
            kind: e.kind,
            mode: e.mode,
            size: e.size,
            mtime: e.mtime,
        });
    }
    st.count = st.entries.len() as u64;
    Ok(st)
}
