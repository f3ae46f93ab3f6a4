//! RestoreJobs: a Snapshot of the job's namespace back into a directory of
//! a client (operator's namespace only) or into a PVC of the namespace,
//! where a running pod mounts it. Runs once; the status follows the server's job.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use backer_proto::v1 as pb;

use crate::backer::status;
use crate::context::Context;
use crate::controller::backupjob::follow;
use crate::crd::{OverwritePolicy, RestoreJob, Run, ServerJob};
use crate::error::Error;
use crate::status::{apply_status, rfc3339, set_condition};

pub async fn run(ctx: Arc<Context>) {
    let jobs: Api<RestoreJob> = Api::all(ctx.client.clone());
    let controller = Controller::new(jobs, watcher::Config::default());
    super::drive(controller, "restorejob", ctx, reconcile).await;
}

/// The server request this RestoreJob stands for.
async fn plan(job: &RestoreJob, ctx: &Context) -> Result<pb::StartRestoreRequest, Error> {
    let ns = job.namespace().unwrap_or_default();
    let real = crate::controller::snapshot::resolve(ctx, &ns, &job.spec.snapshot).await?;
    let t = &job.spec.target;
    let (to_client, target) = match (&t.client, &t.pvc) {
        (Some(client), None) => {
            if ns != ctx.settings.namespace {
                return Err(Error::Invalid(format!(
                    "target.client is allowed only in the operator's namespace {}; restore into a PVC of this namespace instead",
                    ctx.settings.namespace
                )));
            }
            (client.clone(), t.path.clone().unwrap_or_default())
        }
        (None, Some(claim)) => {
            let at = crate::volume::locate(&ctx.client, &ns, claim, &ctx.settings.kubelet_root).await?;
            crate::volume::restorable(
                &at.dir,
                &ctx.settings.kubelet_root,
                &ctx.settings.host_volume_dirs,
            )
            .map_err(|why| Error::Invalid(format!("PersistentVolumeClaim {ns}/{claim}: {why}")))?;
            let dir = match &t.sub_path {
                Some(sub) => format!("{}/{}", at.dir, sub.trim_end_matches('/')),
                None => at.dir,
            };
            (at.node, dir)
        }
        _ => return Err(Error::Invalid("target: set exactly one of pvc or client".into())),
    };
    Ok(pb::StartRestoreRequest {
        snapshot: real.id,
        client: real.client,
        to_client,
        target,
        includes: job.spec.paths.clone(),
        overwrite: job.spec.overwrite == OverwritePolicy::Always,
    })
}

async fn reconcile(job: Arc<RestoreJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let api: Api<RestoreJob> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Utc::now();
    let old = job.status.clone();
    let mut st = old.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    st.observed_generation = generation;

    match st.run.as_mut() {
        Some(run) => {
            let was_running = run.finished.is_none();
            follow(run, &ctx, now).await?;
            if was_running && run.finished.is_some() {
                let note = format!("restore {}", run.summary());
                ctx.event(
                    &*job,
                    run.phase != "Succeeded",
                    &format!("Restore{}", run.phase),
                    note,
                )
                .await;
            }
        }
        // A cached copy may lag our own write of the started run.
        None if api.get(&job.name_any()).await?.status != old => {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        None => match plan(&job, &ctx).await {
            Ok(req) => {
                let client = req.to_client.clone();
                let started = ctx.backer.mgmt().await?.start_restore(req).await;
                let mut run = Run {
                    started: rfc3339(now),
                    phase: "Running".into(),
                    ..Default::default()
                };
                match started {
                    Ok(j) => {
                        let j = j.into_inner();
                        run.jobs.push(ServerJob {
                            state: j.state().label().to_string(),
                            id: j.id,
                            client,
                            ..Default::default()
                        });
                        ctx.event(
                            &*job,
                            false,
                            "RestoreStarted",
                            format!("restoring onto {}", run.jobs[0].client),
                        )
                        .await;
                    }
                    Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Internal) => {
                        return Err(status("start the restore")(s));
                    }
                    Err(s) => {
                        run.phase = "Failed".into();
                        run.finished = Some(rfc3339(now));
                        run.message = Some(s.message().to_string());
                        ctx.event(&*job, true, "RestoreFailed", s.message().to_string())
                            .await;
                    }
                }
                st.run = Some(run);
            }
            Err(Error::Invalid(why)) => {
                st.phase = Some("Invalid".into());
                set_condition(&mut st.conditions, "Ready", false, "Invalid", &why, generation);
                if old.as_ref().and_then(|o| o.phase.as_deref()) != Some("Invalid") {
                    ctx.event(&*job, true, "Invalid", why).await;
                }
                apply_status(&api, &*job, old.as_ref(), &st).await?;
                // The cluster may change (a pod starts): look again later.
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            Err(e) => return Err(e),
        },
    }
    let run = st.run.as_ref();
    let running = run.is_some_and(|r| r.finished.is_none());
    st.phase = Some(run.map(|r| r.phase.clone()).unwrap_or_else(|| "Pending".into()));
    let (ok, reason, message) = match run {
        Some(r) if running => (
            true,
            "Running",
            format!("{} files, {} bytes so far", r.files, r.bytes),
        ),
        Some(r) if r.phase == "Succeeded" => (
            true,
            "Succeeded",
            format!("{} files, {} bytes restored", r.files, r.bytes),
        ),
        Some(r) => (
            false,
            "RestoreFailed",
            r.message.clone().unwrap_or_else(|| r.phase.clone()),
        ),
        None => (true, "Pending", String::new()),
    };
    set_condition(&mut st.conditions, "Ready", ok, reason, &message, generation);
    apply_status(&api, &*job, old.as_ref(), &st).await?;
    Ok(if running {
        Action::requeue(Duration::from_secs(2))
    } else {
        Action::await_change()
    })
}
