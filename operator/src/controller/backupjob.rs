//! Where a BackupJob becomes work: at each due time (once, without a
//! schedule) the job's sources are resolved to clients and directories, one
//! backup per client is started on the server, and the run is followed to
//! its end in the status. A run that the server no longer knows (it
//! restarted, and marked it failed) ends failed with the server's reason.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use backer_proto::v1 as pb;

use crate::backer::status;
use crate::context::Context;
use crate::crd::{
    BackerClient, BackupJob, BackupJobSpec, BackupJobStatus, ConcurrencyPolicy, Run, ServerJob,
};
use crate::error::Error;
use crate::status::{apply_status, parse_time, rfc3339, set_condition};

/// The operator's tags on every snapshot, which say where it belongs.
pub const TAG_JOB: &str = "backupjob=";
pub const TAG_PVC: &str = "pvc=";
/// How often a running job's progress is read.
const FOLLOW: Duration = Duration::from_secs(2);

pub async fn run(ctx: Arc<Context>) {
    let jobs: Api<BackupJob> = Api::all(ctx.client.clone());
    let controller = Controller::new(jobs, watcher::Config::default());
    super::drive(controller, "backupjob", ctx, reconcile).await;
}

/// A parsed schedule in its time zone.
#[derive(Debug)]
pub struct Schedule {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    pub fn parse(spec: &BackupJobSpec) -> Result<Option<Schedule>, String> {
        let Some(expr) = &spec.schedule else {
            return Ok(None);
        };
        let cron = expr
            .parse::<croner::Cron>()
            .map_err(|e| format!("schedule {expr:?} is not a valid cron expression: {e}"))?;
        let tz = match &spec.time_zone {
            None => chrono_tz::UTC,
            Some(z) => z
                .parse()
                .map_err(|_| format!("timeZone {z:?} is not a known IANA time zone (e.g. Europe/Berlin)"))?,
        };
        Ok(Some(Schedule { cron, tz }))
    }

    /// The first time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// What the object asks for that the API server's rules cannot refuse.
pub fn validate(job: &BackupJob, operator_ns: &str) -> Result<Option<Schedule>, String> {
    let ns = job.namespace().unwrap_or_default();
    if (!job.spec.clients.is_empty() || job.spec.client_selector.is_some()) && ns != operator_ns {
        return Err(format!(
            "clients and clientSelector are allowed only in the operator's namespace {operator_ns}; \
             back up a PersistentVolumeClaim of this namespace instead"
        ));
    }
    // The engine's own rule, so a pattern the agent would refuse at backup
    // time is refused here, when the object is applied.
    backer_repo::archiver::Excluder::new(&job.spec.exclude)
        .map_err(|e| backer_repo::error::Chain(&e).to_string())?;
    Schedule::parse(&job.spec)
}

/// One backup to start: which client, read where, and how to tag it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub client: String,
    pub root: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
}

async fn targets(job: &BackupJob, ctx: &Context) -> Result<Vec<Target>, Error> {
    let ns = job.namespace().unwrap_or_default();
    let mut tags = job.spec.tags.clone();
    tags.push(format!("{TAG_JOB}{ns}/{}", job.name_any()));
    if let Some(claim) = &job.spec.pvc {
        let at = crate::volume::locate(&ctx.client, &ns, claim, &ctx.settings.kubelet_root).await?;
        tags.push(format!("{TAG_PVC}{ns}/{claim}"));
        let paths = if job.spec.paths.is_empty() {
            vec!["/".to_string()]
        } else {
            job.spec.paths.clone()
        };
        return Ok(vec![Target {
            client: at.node,
            root: at.dir,
            paths,
            tags,
        }]);
    }
    let api: Api<BackerClient> = Api::all(ctx.client.clone());
    let mut names = job.spec.clients.clone();
    if let Some(sel) = &job.spec.client_selector {
        let selector = kube::core::Selector::try_from(sel.clone())
            .map_err(|e| {
                Error::Invalid(format!(
                    "clientSelector is not valid ({}): matchExpressions take In or NotIn with values, Exists or DoesNotExist",
                    e.0
                ))
            })?;
        for bc in api
            .list(&kube::api::ListParams::default().labels_from(&selector))
            .await?
        {
            names.push(bc.name_any());
        }
    }
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for n in names {
        if api.get_opt(&n).await?.is_none() {
            return Err(Error::Invalid(format!("BackerClient {n} does not exist")));
        }
        out.push(Target {
            client: n,
            root: String::new(),
            paths: job.spec.paths.clone(),
            tags: tags.clone(),
        });
    }
    if out.is_empty() {
        return Err(Error::Invalid("clientSelector selects no BackerClient".into()));
    }
    Ok(out)
}

/// Starts one run: a server job per target. A target that fails to start is
/// recorded in the run as a failed job, so the run ends failed, not silent.
async fn start(job: &BackupJob, ctx: &Context, now: DateTime<Utc>) -> Result<Run, Error> {
    let mut run = Run {
        started: rfc3339(now),
        phase: "Running".into(),
        ..Default::default()
    };
    let targets = match targets(job, ctx).await {
        Ok(t) => t,
        Err(Error::Invalid(why)) => {
            run.phase = "Failed".into();
            run.finished = Some(rfc3339(now));
            run.message = Some(why);
            return Ok(run);
        }
        Err(e) => return Err(e),
    };
    let retention = job.spec.retention.as_ref().map(|r| pb::Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
    });
    let mut m = ctx.backer.mgmt().await?;
    for t in targets {
        let started = m
            .start_backup(pb::StartBackupRequest {
                client: t.client.clone(),
                paths: t.paths,
                excludes: job.spec.exclude.clone(),
                tags: t.tags,
                root: t.root,
                retention,
            })
            .await;
        match started {
            Ok(j) => {
                let j = j.into_inner();
                run.jobs.push(ServerJob {
                    state: j.state().label().to_string(),
                    id: j.id,
                    client: t.client,
                    ..Default::default()
                });
            }
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Internal)
                    && run.jobs.is_empty() =>
            {
                return Err(status("start the backup")(s));
            }
            Err(s) => run.jobs.push(ServerJob {
                id: String::new(),
                client: t.client,
                state: "failed".into(),
                messages: vec![s.message().to_string()],
                ..Default::default()
            }),
        }
    }
    ctx.metrics.runs_started.inc();
    Ok(run)
}

fn finished(state: &str) -> bool {
    matches!(state, "succeeded" | "partial" | "failed")
}

/// Reads the run's jobs from the server and sums them up. Ends the run when
/// every job has ended.
pub async fn follow(run: &mut Run, ctx: &Context, now: DateTime<Utc>) -> Result<(), Error> {
    if run.finished.is_some() {
        return Ok(());
    }
    // Asked per client: the server's whole job table can be large.
    let mut clients: Vec<&str> = run
        .jobs
        .iter()
        .filter(|j| !finished(&j.state))
        .map(|j| j.client.as_str())
        .collect();
    clients.sort_unstable();
    clients.dedup();
    let mut m = ctx.backer.mgmt().await?;
    let mut server_jobs = Vec::new();
    for client in clients {
        server_jobs.extend(
            m.list_jobs(pb::ListJobsRequest {
                client: client.to_string(),
            })
            .await
            .map_err(status("list jobs"))?
            .into_inner()
            .jobs,
        );
    }
    summarize(run, &server_jobs, now);
    Ok(())
}

/// Pure: folds the server's view of the jobs into the run.
pub fn summarize(run: &mut Run, server_jobs: &[pb::Job], now: DateTime<Utc>) {
    let (mut files, mut bytes, mut files_total, mut bytes_total) = (0, 0, 0, 0);
    for sj in run.jobs.iter_mut() {
        if sj.id.is_empty() || finished(&sj.state) && sj.snapshot.is_some() {
            // Never started, or already final.
        } else if let Some(j) = server_jobs.iter().find(|j| j.id == sj.id) {
            sj.state = j.state().label().to_string();
            sj.snapshot = (!j.snapshot_id.is_empty()).then(|| j.snapshot_id.clone());
            sj.messages = j.messages.iter().take(5).cloned().collect();
            files += j.files_done;
            bytes += j.bytes_done;
            files_total += j.files_total;
            bytes_total += j.bytes_total;
        } else {
            sj.state = "failed".into();
            sj.messages = vec!["the server no longer knows this job (was it reset?)".into()];
        }
    }
    run.files = files.max(run.files);
    run.bytes = bytes.max(run.bytes);
    run.files_total = files_total.max(run.files_total);
    run.bytes_total = bytes_total.max(run.bytes_total);
    if let Some(started) = parse_time(&run.started) {
        let secs = (now - started).num_seconds().max(1) as u64;
        run.rate = run.bytes / secs;
    }
    if run.jobs.iter().all(|j| finished(&j.state)) {
        run.finished = Some(rfc3339(now));
        let failed = run.jobs.iter().filter(|j| j.state == "failed").count();
        let partial = run.jobs.iter().any(|j| j.state == "partial");
        run.phase = if run.jobs.is_empty() || failed == run.jobs.len() {
            "Failed"
        } else if failed > 0 || partial {
            "Partial"
        } else {
            "Succeeded"
        }
        .into();
        if run.message.is_none() {
            run.message = run
                .jobs
                .iter()
                .filter(|j| j.state != "succeeded")
                .flat_map(|j| j.messages.first().map(|m| format!("{}: {m}", j.client)))
                .next();
        }
    }
}

/// When the next run is due, given the last time the schedule fired.
fn due(job: &BackupJob, schedule: Option<&Schedule>, st: &BackupJobStatus, now: DateTime<Utc>) -> bool {
    match schedule {
        _ if job.spec.suspend => false,
        None => st.last_run.is_none(),
        Some(s) => {
            let since = st
                .last_schedule_time
                .as_deref()
                .and_then(parse_time)
                .or_else(|| {
                    job.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| DateTime::from_timestamp(t.0.as_second(), 0).unwrap_or(now))
                })
                .unwrap_or(now);
            s.next_after(since).is_some_and(|t| t <= now)
        }
    }
}

pub async fn reconcile(job: Arc<BackupJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let api: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Utc::now();
    let old = job.status.clone();
    let mut st = old.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    st.observed_generation = generation;

    // Follow the running run first, whatever else changed.
    if let Some(run) = st.last_run.as_mut() {
        let was_running = run.finished.is_none();
        follow(run, &ctx, now).await?;
        if was_running && run.finished.is_some() {
            ctx.snapshots_changed.notify_one();
            if run.phase == "Failed" {
                ctx.metrics.runs_failed.inc();
            }
            let note = format!("run {}", run.summary());
            ctx.event(
                &*job,
                run.phase != "Succeeded",
                &format!("Run{}", run.phase),
                note,
            )
            .await;
        }
    }

    // Under concurrencyPolicy Allow an earlier run may still be going.
    for run in st.history.iter_mut().filter(|r| r.finished.is_none()) {
        follow(run, &ctx, now).await?;
    }

    let schedule = match validate(&job, &ctx.settings.namespace) {
        Ok(s) => s,
        Err(why) => {
            st.phase = Some("Invalid".into());
            st.next_run = None;
            set_condition(&mut st.conditions, "Ready", false, "Invalid", &why, generation);
            if old.as_ref().and_then(|o| o.phase.as_deref()) != Some("Invalid") {
                ctx.event(&*job, true, "Invalid", why).await;
            }
            apply_status(&api, &*job, old.as_ref(), &st).await?;
            return Ok(Action::await_change());
        }
    };
    let running = st.last_run.as_ref().is_some_and(|r| r.finished.is_none());
    if due(&job, schedule.as_ref(), &st, now) {
        // Decide on the object as it is now: a cached copy that lags our
        // last status write would start the same run twice.
        if api.get(&name).await?.status != old {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        st.last_schedule_time = Some(rfc3339(now));
        if running && job.spec.concurrency_policy == ConcurrencyPolicy::Forbid {
            ctx.event(
                &*job,
                true,
                "Skipped",
                "a run came due while the previous one still runs (concurrencyPolicy Forbid)".into(),
            )
            .await;
        } else {
            let run = start(&job, &ctx, now).await?;
            tracing::info!(backupjob = %format!("{ns}/{name}"), jobs = run.jobs.len(), "run started");
            ctx.event(
                &*job,
                run.phase == "Failed",
                "RunStarted",
                format!(
                    "backing up {} client(s): {}",
                    run.jobs.len(),
                    run.jobs
                        .iter()
                        .map(|j| j.client.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .await;
            if let Some(prev) = st.last_run.replace(run) {
                st.history.insert(0, prev);
            }
            st.history
                .truncate(job.spec.history_limit.saturating_sub(1) as usize);
        }
    }
    st.next_run = schedule
        .as_ref()
        .filter(|_| !job.spec.suspend)
        .and_then(|s| s.next_after(now))
        .map(rfc3339);
    let last = st.last_run.as_ref();
    let running = last.is_some_and(|r| r.finished.is_none());
    st.phase = Some(match last {
        Some(_) if running => "Running".into(),
        Some(_) if schedule.is_some() => "Scheduled".into(),
        Some(r) => r.phase.clone(),
        None if schedule.is_some() => "Scheduled".into(),
        None => "Pending".into(),
    });
    let (ok, reason, message) = match last {
        None => (true, "Waiting", "no run yet".to_string()),
        Some(r) if running => (
            true,
            "Running",
            format!("{} files, {} bytes so far", r.files, r.bytes),
        ),
        Some(r) if r.phase == "Succeeded" => (
            true,
            "Succeeded",
            format!("last run: {} files, {} bytes", r.files, r.bytes),
        ),
        Some(r) => (
            false,
            "RunFailed",
            r.message
                .clone()
                .unwrap_or_else(|| format!("last run {}", r.phase)),
        ),
    };
    set_condition(&mut st.conditions, "Ready", ok, reason, &message, generation);
    apply_status(&api, &*job, old.as_ref(), &st).await?;

    Ok(if running {
        Action::requeue(FOLLOW)
    } else if let Some(next) = st.next_run.as_deref().and_then(parse_time) {
        let wait = (next - now).to_std().unwrap_or_default() + Duration::from_millis(200);
        Action::requeue(wait.min(Duration::from_secs(300)))
    } else {
        Action::await_change()
    })
}
