//! Where a request becomes work: a backup or restore asked for by an admin, a
//! schedule or the host itself is checked, recorded as a job, and sent to the
//! client's agent over its Work stream; its end releases what it held.

use std::sync::Arc;
use std::time::Duration;

use backer_proto::v1 as pb;
use backer_repo::error::Chain;
use backer_repo::lock::Lock;
use backer_repo::repository::Dir;
use parking_lot::Mutex;

use crate::error::{CoreError, CoreResult};

use crate::jobs::{Active, BackupSpec, JobRecord, JobState, Kind, Spec};
use crate::server::Shared;
use crate::state::ClientState;

/// How long a job waits for another process's exclusive lock (a prune).
const LOCK_WAIT: Duration = Duration::from_secs(60);

fn now(shared: &Shared) -> i64 {
    shared.now().timestamp()
}

/// The client must be enrolled and connected for a job to start.
fn check_client(shared: &Shared, client: &str) -> CoreResult<()> {
    match shared.registry().clients.get(client).map(|r| r.state) {
        Some(ClientState::Enrolled) => {}
        Some(ClientState::Revoked) => {
            return Err(CoreError::Refused(format!("client {client} has been revoked")));
        }
        Some(ClientState::Pending) => {
            return Err(CoreError::Refused(format!(
                "client {client} has not enrolled yet: run `backer-agent enroll` on it"
            )));
        }
        None => return Err(CoreError::NotFound(format!("no client named {client}"))),
    }
    if !shared.is_connected(client) {
        return Err(CoreError::Unavailable(format!(
            "client {client} is not connected: start `backer-agent run` on it"
        )));
    }
    Ok(())
}

/// Lexically absolute, `..`-free paths, sorted, as the agent will record them.
/// Public so the fuzz targets check it on decoded requests.
pub fn clean_paths(paths: &[String], what: &str) -> CoreResult<Vec<String>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.starts_with('/') {
            return Err(CoreError::Invalid(format!(
                "{what} {p:?} is not absolute: give the full path on the client"
            )));
        }
        let mut clean = std::path::PathBuf::from("/");
        for c in std::path::Path::new(p).components() {
            match c {
                std::path::Component::Normal(n) => clean.push(n),
                std::path::Component::ParentDir => {
                    return Err(CoreError::Invalid(format!("{what} {p:?} contains `..`")));
                }
                _ => {}
            }
        }
        out.push(clean.display().to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A backup that passed every check and can be launched.
#[derive(Debug)]
pub struct BackupPlan {
    client: String,
    spec: BackupSpec,
}

/// Starts a backup of `client`. Empty `paths` means the client's configured
/// backup definitions (all of them, in one snapshot).
pub async fn start_backup(
    shared: &Arc<Shared>,
    req: pb::StartBackupRequest,
    origin: &str,
) -> CoreResult<JobRecord> {
    let plan = plan_backup(shared, req).await?;
    let (shared, origin) = (Arc::clone(shared), origin.to_string());
    detached(async move { launch_backup(&shared, plan, &origin).await }).await
}

/// Runs a job's launch, from its record on, as a task of its own: a caller
/// that goes away (a Ctrl-C, a dropped connection) while the launch waits
/// for the repository lock must not cut it short, which would leave the
/// job's record queued for good (counted against its host's own jobs) and
/// a lock behind. What comes before the record (checks, finding snapshots)
/// stays in the request, so a cancelled one costs nothing more.
async fn detached(
    launch: impl std::future::Future<Output = CoreResult<JobRecord>> + Send + 'static,
) -> CoreResult<JobRecord> {
    tokio::spawn(launch)
        .await
        .map_err(|e| CoreError::Unavailable(format!("the job's launch failed: {e}")))?
}

/// Checks a backup request and finds its parent; records nothing.
pub async fn plan_backup(shared: &Arc<Shared>, req: pb::StartBackupRequest) -> CoreResult<BackupPlan> {
    let client = req.client;
    let (mut paths, mut excludes) = (req.paths, req.excludes);
    let mut retention = req.retention.map(|r| {
        let keep = |n: u32| (n > 0).then_some(n);
        backer_repo::retention::RetentionPolicy {
            keep_last: keep(r.keep_last),
            keep_hourly: keep(r.keep_hourly),
            keep_daily: keep(r.keep_daily),
            keep_weekly: keep(r.keep_weekly),
            keep_monthly: keep(r.keep_monthly),
            keep_yearly: keep(r.keep_yearly),
            ..Default::default()
        }
    });
    let root = match req.root.as_str() {
        "" | "/" => String::new(),
        r => clean_paths(&[r.to_string()], "root")?.remove(0),
    };
    if paths.is_empty() {
        let config = shared.config();
        let def = config.clients.get(&client).ok_or_else(|| {
            CoreError::Invalid(format!(
                "no path given and client {client} has no backups configured: name the paths to back up"
            ))
        })?;
        for id in &def.backups {
            if let Some(b) = config.backups.get(id) {
                paths.extend(b.paths.iter().cloned());
                excludes.extend(b.excluded.iter().cloned());
                // One snapshot holds all of them; the first policy given rules it.
                if retention.is_none() {
                    retention = b.retention.clone();
                }
            }
        }
        if paths.is_empty() {
            return Err(CoreError::Invalid(format!(
                "no path given and the backups configured for {client} name none"
            )));
        }
    }
    let paths = clean_paths(&paths, "path")?;
    for e in &excludes {
        backer_repo::archiver::Excluder::new(std::slice::from_ref(e)).map_err(CoreError::invalid)?;
    }
    check_client(shared, &client)?;

    let repo = shared.storage.repo();
    let parent_snapshot = repo
        .parent_snapshot(&client, &paths, &req.tags)
        .await
        .map_err(CoreError::repo("list snapshots"))?;
    let parent = parent_snapshot.as_ref().map(|s| (s.id, s.snapshot.tree));
    let parent_totals = parent_snapshot
        .as_ref()
        .map_or((0, 0), |s| (s.snapshot.summary.files, s.snapshot.summary.bytes));
    Ok(BackupPlan {
        client,
        spec: BackupSpec {
            root,
            paths,
            excludes,
            tags: req.tags,
            parent,
            parent_totals,
            retention,
        },
    })
}

/// Records the job, locks the repository and sends the work to the agent.
pub async fn launch_backup(shared: &Arc<Shared>, plan: BackupPlan, origin: &str) -> CoreResult<JobRecord> {
    let BackupPlan { client, mut spec } = plan;
    let repo = shared.storage.repo();
    let record = shared.jobs.create(Kind::Backup, &client, origin, now(shared))?;
    let (lock, repo) = lock_and_refresh(shared, &repo, &format!("backup of {client}"), &record.id).await?;
    // The parent was chosen before the lock: one forgotten and pruned
    // meanwhile would have the agent reuse chunks that are gone.
    // Asked of the store, not the cache, which keeps forgotten snapshots.
    if let Some((id, _)) = spec.parent {
        let gone = match repo
            .backend()
            .head(&format!("{}/{id}", Dir::Snapshots.name()))
            .await
        {
            Ok(found) => found.is_none().then(|| "it was forgotten".to_string()),
            Err(e) => Some(format!("failed to look it up: {}", Chain(&e))),
        };
        if let Some(why) = gone {
            tracing::warn!(job = %record.id, "not using the parent snapshot {} ({why}): every file is read again", id.short());
            spec.parent = None;
            spec.parent_totals = (0, 0);
        }
    }
    let parent = spec.parent;
    let work = pb::BackupWork {
        paths: spec.paths.clone(),
        excludes: spec.excludes.clone(),
        tags: spec.tags.clone(),
        parent_snapshot_id: parent.map(|(s, _)| s.to_hex()).unwrap_or_default(),
        parent_tree_id: parent.map(|(_, t)| t.0.to_vec()).unwrap_or_default().into(),
        root: spec.root.clone(),
        parent_files: spec.parent_totals.0,
        parent_bytes: spec.parent_totals.1,
    };
    let readable = parent.map(|(_, t)| t).into_iter().collect();
    let active = activate(
        shared,
        &record.id,
        &client,
        Spec::Backup(Box::new(spec)),
        repo,
        lock,
        readable,
    )
    .await?;
    let work = pb::WorkItem {
        job_id: record.id.clone(),
        work: Some(pb::work_item::Work::Backup(work)),
    };
    dispatch(shared, &active, work).await?;
    tracing::info!(job = %record.id, %client, %origin, "backup started");
    Ok(shared.jobs.get(&record.id).unwrap_or(record))
}

/// Starts a restore of a snapshot onto its own client or another.
pub async fn start_restore(
    shared: &Arc<Shared>,
    req: pb::StartRestoreRequest,
    origin: &str,
) -> CoreResult<JobRecord> {
    let repo = shared.storage.repo();
    let entry = find_snapshot(&repo, &req.snapshot, &req.client).await?;
    let to = if req.to_client.is_empty() {
        entry.snapshot.hostname.clone()
    } else {
        req.to_client.clone()
    };
    if req.target.is_empty() {
        return Err(CoreError::Invalid(
            "no restore target: give --target DIR (an absolute directory on the client; / restores in place)"
                .into(),
        ));
    }
    let target = clean_paths(std::slice::from_ref(&req.target), "target")?.remove(0);
    for inc in &req.includes {
        clean_paths(std::slice::from_ref(inc), "include")?;
    }
    check_client(shared, &to)?;
    let (shared, origin) = (Arc::clone(shared), origin.to_string());
    detached(async move { launch_restore(&shared, &repo, entry, to, target, req, &origin).await }).await
}

async fn launch_restore(
    shared: &Arc<Shared>,
    repo: &backer_repo::Repository,
    entry: backer_repo::snapshot::SnapshotEntry,
    to: String,
    target: String,
    req: pb::StartRestoreRequest,
    origin: &str,
) -> CoreResult<JobRecord> {
    let record = shared.jobs.create(Kind::Restore, &to, origin, now(shared))?;
    // A restore keeps prune away too: the chunks it reads must stay.
    let (lock, repo) = lock_and_refresh(shared, repo, &format!("restore onto {to}"), &record.id).await?;
    let root = entry.snapshot.tree;
    let spec = Spec::Restore {
        snapshot: entry.id,
        root,
    };
    let active = activate(
        shared,
        &record.id,
        &to,
        spec,
        repo,
        lock,
        [root].into_iter().collect(),
    )
    .await?;
    let whole = req.includes.is_empty();
    let work = pb::WorkItem {
        job_id: record.id.clone(),
        work: Some(pb::work_item::Work::Restore(pb::RestoreWork {
            snapshot_id: entry.id.to_hex(),
            target,
            includes: req.includes,
            overwrite: req.overwrite,
            tree_id: root.0.to_vec().into(),
            files_total: if whole { entry.snapshot.summary.files } else { 0 },
            bytes_total: if whole { entry.snapshot.summary.bytes } else { 0 },
        })),
    };
    dispatch(shared, &active, work).await?;
    tracing::info!(job = %record.id, client = %to, snapshot = %entry.id.short(), %origin, "restore started");
    Ok(shared.jobs.get(&record.id).unwrap_or(record))
}

/// Makes job `id` running for `client`'s current connection, holding `lock`;
/// the agent may read the trees in `readable` (and, in turn, their
/// subtrees). A client gone meanwhile fails the job and frees the lock.
async fn activate(
    shared: &Shared,
    id: &str,
    client: &str,
    spec: Spec,
    repo: Arc<backer_repo::Repository>,
    lock: Lock,
    readable: std::collections::HashSet<backer_repo::id::BlobId>,
) -> CoreResult<Arc<Active>> {
    let Some(conn) = shared.connection_id(client) else {
        let _ = lock.release().await;
        return Err(fail_now(
            shared,
            id,
            format!("client {client} disconnected before the job could start"),
        ));
    };
    Ok(shared.jobs.start(Active {
        id: id.to_string(),
        client: client.to_string(),
        conn,
        finishing: Default::default(),
        spec,
        repo,
        lock: tokio::sync::Mutex::new(Some(lock)),
        readable_trees: Mutex::new(readable),
        new_trees: Mutex::new(Default::default()),
        uploading: Mutex::new(false),
        reads: Default::default(),
    }))
}

/// Takes a shared repository lock for job `id`, then the index as it is now
/// (what a prune removed before the lock must not count as stored). A
/// failure fails the job.
async fn lock_and_refresh(
    shared: &Shared,
    repo: &backer_repo::Repository,
    purpose: &str,
    id: &str,
) -> CoreResult<(Lock, Arc<backer_repo::Repository>)> {
    let lock = Lock::acquire(repo, false, &format!("{purpose} (job {id})"), LOCK_WAIT)
        .await
        .map_err(|e| fail_now(shared, id, format!("failed to lock the repository: {e}")))?;
    match shared.storage.refresh().await {
        Ok(fresh) => Ok((lock, fresh)),
        Err(e) => {
            let _ = lock.release().await;
            Err(fail_now(shared, id, format!("failed to read the index: {e}")))
        }
    }
}

/// A snapshot by id, unique prefix, or `latest` (of `client`); when `client`
/// is given, the snapshot must be that client's. The rule itself is the
/// repository's ([`backer_repo::snapshot::find`]), shared with `backer`.
pub async fn find_snapshot(
    repo: &backer_repo::Repository,
    spec: &str,
    client: &str,
) -> CoreResult<backer_repo::snapshot::SnapshotEntry> {
    if spec.trim() == "latest" && client.is_empty() {
        return Err(CoreError::Invalid(
            "`latest` needs a client: give --client NAME".into(),
        ));
    }
    let filter = if client.is_empty() {
        backer_repo::snapshot::SnapshotFilter::default()
    } else {
        backer_repo::snapshot::SnapshotFilter::host(client)
    };
    let all = repo
        .snapshots()
        .await
        .map_err(CoreError::repo("list snapshots"))?;
    backer_repo::snapshot::find(all, spec, &filter).map_err(|e| match e {
        backer_repo::Error::NoSuchSnapshot(_) | backer_repo::Error::NoLatest(_) => {
            CoreError::NotFound(e.to_string())
        }
        _ => CoreError::invalid(e),
    })
}

/// How long a job waits for room in its agent's queue of work (shorter in
/// this crate's tests, which wait it out).
const DISPATCH_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(500)
} else {
    Duration::from_secs(30)
};

/// Sends the job to the client's agent; a job that cannot be sent fails.
/// Bounded: an agent that stops reading its work must not hold up whoever
/// sends it work (the schedule loop serves every client in turn).
async fn dispatch(shared: &Arc<Shared>, active: &Arc<Active>, work: pb::WorkItem) -> CoreResult<()> {
    let sender = shared.work_sender(&active.client);
    let why = match sender {
        Some(tx) => match tokio::time::timeout(DISPATCH_WAIT, tx.send(work)).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some("disconnected before the job could start".to_string()),
            Err(_) => Some(format!(
                "took no work for {} s (its agent is not reading its queue)",
                DISPATCH_WAIT.as_secs()
            )),
        },
        None => Some("disconnected before the job could start".to_string()),
    };
    if let Some(why) = why {
        let msg = format!("client {} {why}", active.client);
        end(shared, &active.id, JobState::Failed, vec![msg.clone()], None).await;
        return Err(CoreError::Unavailable(msg));
    }
    Ok(())
}

fn fail_now(shared: &Shared, id: &str, msg: String) -> CoreError {
    finish(shared, id, JobState::Failed, vec![msg.clone()], None);
    CoreError::Unavailable(msg)
}

/// Records a job's end, once: a job ended already stays as it ended.
pub(crate) fn finish(
    shared: &Shared,
    id: &str,
    state: JobState,
    messages: Vec<String>,
    snapshot: Option<String>,
) -> Option<JobRecord> {
    let r = shared.jobs.finish(id, state, messages, snapshot, now(shared))?;
    tracing::info!(job = %id, client = %r.client, state = r.state.as_str(), "job ended");
    // A clock set back meanwhile says nothing about how long it took.
    if r.finished >= r.created {
        shared.metrics.job_ended(r.kind, (r.finished - r.created) as f64);
    }
    Some(r)
}

/// Ends a job: releases its lock, records the outcome, wakes watchers.
pub async fn end(
    shared: &Shared,
    id: &str,
    state: JobState,
    messages: Vec<String>,
    snapshot: Option<String>,
) -> Option<JobRecord> {
    let active = shared
        .jobs
        .get(id)
        .and_then(|r| shared.jobs.active_for(id, &r.client).ok());
    if let Some(a) = active {
        let lock = a.lock.lock().await.take();
        release_job_lock(id, lock).await;
    }
    finish(shared, id, state, messages, snapshot)
}

/// Releases job `id`'s repository lock, if it still holds one.
pub(crate) async fn release_job_lock(id: &str, lock: Option<Lock>) {
    if let Some(lock) = lock
        && let Err(e) = lock.release().await
    {
        tracing::warn!(job = %id, "failed to release the repository lock (it will go stale): {e}");
    }
}

/// The agent of `client` went away: its running jobs fail with that reason.
/// `conn`: only the jobs sent over that connection (it ended); `None`: all.
pub async fn client_gone(shared: &Shared, client: &str, conn: Option<u64>, why: &str) {
    for a in shared.jobs.active_of(client, conn) {
        end(
            shared,
            &a.id,
            JobState::Failed,
            vec![format!("the agent of {client} {why}; no snapshot was written")],
            None,
        )
        .await;
    }
}

/// Fires scheduled backups: each minute (of the server's clock), every
/// client whose schedules say so gets a backup of its configured paths.
pub async fn run_schedules(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut last = shared.now();
    while stop
        .run_until_cancelled(tokio::time::sleep(Duration::from_millis(500)))
        .await
        .is_some()
    {
        let now = shared.now();
        let config = shared.config();
        for (name, def) in &config.clients {
            for sid in &def.schedules {
                let Some(s) = config.schedules.get(sid) else {
                    continue;
                };
                // Due when a fire time falls in (last, now].
                let due = s.when.next_after(last).is_some_and(|t| t <= now);
                if !due {
                    continue;
                }
                // Nothing new starts once the server stops (a launch under
                // way is bounded by the server's stop; see server::run).
                if stop.is_cancelled() {
                    return;
                }
                let req = pb::StartBackupRequest {
                    client: name.clone(),
                    ..Default::default()
                };
                let origin = format!("schedule:{sid}");
                match plan_backup(&shared, req).await {
                    // Launch failures are recorded as failed jobs by the launch.
                    Ok(plan) => match launch_backup(&shared, plan, &origin).await {
                        Ok(job) => {
                            tracing::info!(job = %job.id, client = %name, schedule = %sid, "scheduled backup started")
                        }
                        Err(e) => {
                            tracing::warn!(client = %name, schedule = %sid, "scheduled backup failed to start: {}", e.message())
                        }
                    },
                    Err(e) => {
                        // Recorded as a failed job, so `backer jobs` shows the miss.
                        // (A schedule's job is never refused its record.)
                        if let Ok(r) = shared.jobs.create(Kind::Backup, name, &origin, now.timestamp()) {
                            finish(
                                &shared,
                                &r.id,
                                JobState::Failed,
                                vec![format!("scheduled backup could not start: {}", e.message())],
                                None,
                            );
                        }
                        tracing::warn!(client = %name, schedule = %sid, "scheduled backup could not start: {}", e.message());
                    }
                }
            }
        }
        last = now;
    }
}

/// The job rules called directly on a server's core (no sockets, no agent
/// process): planning a backup, finding a snapshot, finishing a backup.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use backer_repo::chunk::{Compressor, blob_id};
    use backer_repo::id::{BlobId, SnapshotId};
    use backer_repo::snapshot::{Snapshot, Summary};
    use backer_repo::tree::{Extent, Node, NodeKind, Time, Tree};
    use tokio::sync::mpsc;

    use super::*;
    use crate::server::{Connection, Options};

    struct Core {
        _dir: tempfile::TempDir,
        shared: Arc<Shared>,
        /// What the server sends to h1's agent.
        work: mpsc::Receiver<pb::WorkItem>,
    }

    /// A server's core on a new directory repository; clients h1 and h2
    /// enrolled, h1's agent connected.
    async fn core() -> Core {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("clients")).unwrap();
        std::fs::write(
            conf.join("server.toml"),
            format!(
                "[server]\nMgmtPort = 0\nDataPort = 0\nRestApiPort = 0\nExternalName = \"localhost\"\n\n\
                 [repository]\nLocalization = \"{}\"\n\n[clients]\nConfigFile = \"clients/\"\n",
                dir.path().join("repo").display()
            ),
        )
        .unwrap();
        let shared = Shared::open(&Options {
            config: conf.join("server.toml"),
            state_dir: dir.path().join("state"),
            pki_dir: None,
            clock_start: None,
            insecure_plaintext: false,
        })
        .await
        .unwrap();
        shared
            .update_registry(|r| {
                for (name, serial) in [("h1", b"s1"), ("h2", b"s2")] {
                    r.add(name, false, 0).unwrap();
                    r.set_certificate(name, serial, i64::MAX, None);
                }
            })
            .unwrap();
        let (tx, work) = mpsc::channel(4);
        shared.connections.lock().insert(
            "h1".into(),
            Connection {
                id: 1,
                since: 0,
                version: String::new(),
                work: tx,
            },
        );
        Core {
            _dir: dir,
            shared,
            work,
        }
    }

    /// Writes a snapshot of `host` taken `age` seconds ago, holding `files`.
    async fn snapshot(
        s: &Shared,
        host: &str,
        paths: &[&str],
        tags: &[&str],
        files: u64,
        age: i64,
    ) -> SnapshotId {
        let snap = Snapshot {
            time: chrono::Utc::now() - chrono::TimeDelta::seconds(age),
            hostname: host.into(),
            username: "root".into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            excludes: vec![],
            parent: None,
            tree: BlobId([files as u8; 32]),
            summary: Summary {
                files,
                bytes: files * 10,
                ..Default::default()
            },
            partial: false,
            errors: vec![],
            program_version: "test".into(),
        };
        let repo = s.storage.repo();
        let lock = Lock::acquire(&repo, false, "test", Duration::ZERO).await.unwrap();
        let id = repo.save_snapshot(&snap, &lock).await.unwrap();
        lock.release().await.unwrap();
        id
    }

    fn request(client: &str, paths: &[&str]) -> pb::StartBackupRequest {
        pb::StartBackupRequest {
            client: client.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_plan_checks_the_request_and_takes_the_parent_of_its_own_series() {
        let c = core().await;
        let s = &c.shared;
        let own = snapshot(s, "h1", &["/data"], &[], 7, 60).await;
        snapshot(s, "h1", &["/data"], &["nightly"], 8, 30).await;
        snapshot(s, "h2", &["/data"], &[], 9, 10).await;
        snapshot(s, "h1", &["/data", "/etc"], &[], 10, 5).await;

        let plan = plan_backup(s, request("h1", &["/data/"])).await.unwrap();
        assert_eq!(plan.spec.paths, vec!["/data".to_string()]);
        // Not another host's newer one, not another tag set's, not other paths'.
        assert_eq!(plan.spec.parent.map(|(id, _)| id), Some(own));
        assert_eq!(plan.spec.parent_totals, (7, 70));
        let tagged = pb::StartBackupRequest {
            tags: vec!["nightly".into()],
            ..request("h1", &["/data"])
        };
        assert_eq!(plan_backup(s, tagged).await.unwrap().spec.parent_totals, (8, 80));

        for (req, what) in [
            (request("h1", &["data"]), "a relative path"),
            (request("h1", &["/a/../b"]), "a path with .."),
            (request("h1", &[]), "no path and none configured"),
            (
                pb::StartBackupRequest {
                    excludes: vec!["a[".into()],
                    ..request("h1", &["/data"])
                },
                "a bad exclude",
            ),
        ] {
            let r = plan_backup(s, req).await;
            assert!(matches!(r, Err(CoreError::Invalid(_))), "{what}: {r:?}");
        }
        let r = plan_backup(s, request("h2", &["/data"])).await;
        assert!(
            matches!(r, Err(CoreError::Unavailable(_))),
            "h2 is not connected: {r:?}"
        );
        let r = plan_backup(s, request("nobody", &["/data"])).await;
        assert!(matches!(r, Err(CoreError::NotFound(_))), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finding_a_snapshot_stays_within_the_client_asked_for() {
        let c = core().await;
        let s = &c.shared;
        let old = snapshot(s, "h1", &["/data"], &[], 1, 60).await;
        let new = snapshot(s, "h1", &["/data"], &[], 2, 30).await;
        let other = snapshot(s, "h2", &["/data"], &[], 3, 10).await;
        let repo = s.storage.repo();
        assert_eq!(find_snapshot(&repo, "latest", "h1").await.unwrap().id, new);
        assert_eq!(
            find_snapshot(&repo, &old.to_hex()[..8], "h1").await.unwrap().id,
            old
        );
        let r = find_snapshot(&repo, &other.to_hex(), "h1").await;
        assert!(
            matches!(r, Err(CoreError::NotFound(_))),
            "h2's snapshot is not h1's: {r:?}"
        );
        assert_eq!(find_snapshot(&repo, &other.to_hex(), "").await.unwrap().id, other);
        let r = find_snapshot(&repo, "latest", "").await;
        assert!(
            matches!(r, Err(CoreError::Invalid(_))),
            "latest needs a client: {r:?}"
        );
    }

    /// A file of `data` in directory `data` under the root: the chunk, the
    /// directory's tree and the root tree, and the root's id.
    fn upload_of(keys: &backer_repo::crypto::ChunkKeys, data: &[u8]) -> (Vec<pb::UploadChunk>, BlobId) {
        let chunk = blob_id(keys, data);
        let file = Node {
            name: b"f".to_vec(),
            kind: NodeKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: data.len() as u64,
            mtime: Time::default(),
            atime: Time::default(),
            ctime: Time::default(),
            inode: 1,
            dev: 1,
            nlink: 1,
            rdev: 0,
            link_target: None,
            xattrs: vec![],
            content: vec![Extent::Data {
                id: chunk,
                len: data.len() as u32,
            }],
            subtree: None,
        };
        let dir = Tree {
            nodes: vec![file.clone()],
        }
        .to_bytes()
        .unwrap();
        let dir_node = Node {
            name: b"data".to_vec(),
            kind: NodeKind::Dir,
            size: 0,
            content: vec![],
            subtree: Some(blob_id(keys, &dir)),
            ..file
        };
        let root = Tree {
            nodes: vec![dir_node],
        }
        .to_bytes()
        .unwrap();
        let mut z = Compressor::new(2).unwrap();
        let mut up = |kind: u32, raw: &[u8]| pb::UploadChunk {
            id: blob_id(keys, raw).0.to_vec().into(),
            kind,
            payload: z.compress(raw).into(),
            raw_len: raw.len() as u32,
        };
        (vec![up(0, data), up(1, &dir), up(1, &root)], blob_id(keys, &root))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finishing_a_backup_checks_its_trees_and_names_the_snapshot_after_the_client() {
        let mut c = core().await;
        let s = Arc::clone(&c.shared);
        let repo = s.storage.repo();
        let (chunks, root) = upload_of(&repo.key().chunk, b"the file's content");
        let agent_says = |root: BlobId| {
            serde_json::to_string(&Snapshot {
                time: chrono::Utc::now(),
                hostname: "not-h1".into(),
                username: "root".into(),
                paths: vec!["/elsewhere".into()],
                tags: vec![],
                excludes: vec![],
                parent: None,
                tree: root,
                summary: Summary::default(),
                partial: false,
                errors: vec![],
                program_version: "test".into(),
            })
            .unwrap()
        };
        let upload = |active: Arc<Active>, chunks: Vec<pb::UploadChunk>| async move {
            let (tx, rx) = mpsc::channel(1);
            tx.send(pb::UploadBatch {
                job_id: active.id.clone(),
                chunks,
            })
            .await
            .unwrap();
            drop(tx);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || crate::datapath::ingest(&active, rx, handle))
                .await
                .unwrap()
                .unwrap()
        };

        // The trees, but not the file's chunk: no snapshot, the job fails.
        let job = start_backup(&s, request("h1", &["/data"]), "admin:test")
            .await
            .unwrap();
        let item = c.work.recv().await.unwrap();
        assert_eq!(item.job_id, job.id);
        assert!(matches!(item.work, Some(pb::work_item::Work::Backup(ref w)) if w.paths == ["/data"]));
        let active = s.jobs.active_for(&job.id, "h1").unwrap();
        upload(Arc::clone(&active), chunks[1..].to_vec()).await;
        let r = crate::datapath::finish_backup(&s, &active, &agent_says(root)).await;
        assert!(
            matches!(&r, Err(CoreError::Refused(m)) if m.contains("never uploaded")),
            "{r:?}"
        );
        assert_eq!(s.jobs.get(&job.id).unwrap().state, JobState::Failed);
        assert!(s.storage.repo().snapshots().await.unwrap().is_empty());

        // Nothing uploaded, the root left by the job above named: it is
        // checked whole, not taken for stored and sound.
        let job = start_backup(&s, request("h1", &["/data"]), "admin:test")
            .await
            .unwrap();
        c.work.recv().await.unwrap();
        let active = s.jobs.active_for(&job.id, "h1").unwrap();
        let r = crate::datapath::finish_backup(&s, &active, &agent_says(root)).await;
        assert!(
            matches!(&r, Err(CoreError::Refused(m)) if m.contains("never uploaded")),
            "{r:?}"
        );
        assert!(s.storage.repo().snapshots().await.unwrap().is_empty());

        // Everything: the snapshot is h1's, of the paths the job asked for.
        let job = start_backup(&s, request("h1", &["/data"]), "admin:test")
            .await
            .unwrap();
        c.work.recv().await.unwrap();
        let active = s.jobs.active_for(&job.id, "h1").unwrap();
        upload(Arc::clone(&active), chunks).await;
        let id = crate::datapath::finish_backup(&s, &active, &agent_says(root))
            .await
            .unwrap();
        let listed = s.storage.repo().snapshots().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id.to_hex(), id);
        assert_eq!(listed[0].snapshot.hostname, "h1");
        assert_eq!(listed[0].snapshot.paths, vec!["/data".to_string()]);
        assert_eq!(listed[0].snapshot.tree, root);
        assert_eq!(s.jobs.get(&job.id).unwrap().state, JobState::Succeeded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_forgotten_before_the_backup_locked_the_repository_is_not_used() {
        let mut c = core().await;
        let s = &c.shared;
        let parent = snapshot(s, "h1", &["/data"], &[], 7, 60).await;
        let plan = plan_backup(s, request("h1", &["/data"])).await.unwrap();
        assert_eq!(plan.spec.parent.map(|(id, _)| id), Some(parent));
        // Forgotten (and maybe pruned) while the job waited for its lock.
        let repo = s.storage.repo();
        let lock = Lock::acquire(&repo, false, "test", Duration::ZERO).await.unwrap();
        repo.forget(&[parent], &lock).await.unwrap();
        lock.release().await.unwrap();

        launch_backup(s, plan, "admin:test").await.unwrap();
        let item = c.work.recv().await.unwrap();
        let Some(pb::work_item::Work::Backup(w)) = item.work else {
            panic!("not a backup: {item:?}");
        };
        assert_eq!(w.parent_snapshot_id, "");
        assert!(w.parent_tree_id.is_empty());
        assert_eq!((w.parent_files, w.parent_bytes), (0, 0));
    }

    /// An agent that stops reading its queue of work fails its new jobs
    /// after a while instead of holding up whoever sends them (the
    /// schedule loop serves every client in turn).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_not_reading_its_work_fails_the_job_instead_of_holding_up_the_sender() {
        let c = core().await;
        let s = &c.shared;
        // h1's queue holds four; nothing reads it.
        for _ in 0..4 {
            start_backup(s, request("h1", &["/data"]), "admin:test")
                .await
                .unwrap();
        }
        let r = start_backup(s, request("h1", &["/data"]), "admin:test").await;
        assert!(
            matches!(&r, Err(CoreError::Unavailable(m)) if m.contains("took no work")),
            "{r:?}"
        );
        drop(c);
    }

    /// A host's request dropped while its launch waits for the repository
    /// lock (its Ctrl-C, a lost connection) does not leave the job queued
    /// for good: the launch goes on, and the host's next request counts it
    /// only while it runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_launch_outlives_the_request_that_asked_for_it() {
        let mut c = core().await;
        let s = Arc::clone(&c.shared);
        let prune = Lock::acquire(&s.storage.repo(), true, "prune", Duration::ZERO)
            .await
            .unwrap();
        let asked = tokio::time::timeout(
            Duration::from_millis(300),
            start_backup(&s, request("h1", &["/data"]), crate::jobs::AGENT_ORIGIN),
        )
        .await;
        assert!(asked.is_err(), "the launch waits for the prune's lock");
        prune.release().await.unwrap();
        let work = tokio::time::timeout(Duration::from_secs(30), c.work.recv())
            .await
            .expect("the launch went on without its caller")
            .unwrap();
        let job = s.jobs.get(&work.job_id).unwrap();
        assert_eq!(job.state, JobState::Running);
        finish(&s, &job.id, JobState::Failed, vec!["test".into()], None);
        for _ in 0..crate::jobs::MAX_AGENT_JOBS {
            start_backup(&s, request("h1", &["/data"]), crate::jobs::AGENT_ORIGIN)
                .await
                .unwrap();
        }
    }

    /// A restore job's ReadChunks streams are bounded: each holds a
    /// blocking thread, shared by every client, until it is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_job_holds_at_most_a_few_chunk_reads_open() {
        let mut c = core().await;
        let s = Arc::clone(&c.shared);
        snapshot(&s, "h1", &["/data"], &[], 1, 60).await;
        let job = start_restore(
            &s,
            pb::StartRestoreRequest {
                snapshot: "latest".into(),
                client: "h1".into(),
                target: "/restore".into(),
                ..Default::default()
            },
            "admin:test",
        )
        .await
        .unwrap();
        c.work.recv().await.unwrap();
        let active = s.jobs.active_for(&job.id, "h1").unwrap();
        // More ids than the stream holds: unread, each read stays open.
        let ids: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 32]).collect();
        let read = || {
            crate::datapath::read_chunks(
                Arc::clone(&active),
                ids.clone(),
                tokio::runtime::Handle::current(),
            )
        };
        let mut open: Vec<_> = (0..crate::datapath::MAX_READS).map(|_| read().unwrap()).collect();
        let r = read();
        assert!(
            matches!(&r, Err(CoreError::Refused(m)) if m.contains("chunk reads open")),
            "{:?}",
            r.map(|_| ())
        );
        // One read given up frees its place.
        drop(open.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match read() {
                Ok(rx) => {
                    open.push(rx);
                    break;
                }
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A tree upload must be exactly a tree's encoding: a data chunk that
    /// happens to decode as a tree (its first byte an empty list, anything
    /// after) stored as one would be taken as stored by every backup of that
    /// data, and every such backup refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tree_upload_with_bytes_after_the_tree_is_refused() {
        let c = core().await;
        let repo = c.shared.storage.repo();
        let keys = &repo.key().chunk;
        let mut raw = Tree { nodes: vec![] }.to_bytes().unwrap();
        let up = |raw: &[u8]| pb::UploadChunk {
            id: blob_id(keys, raw).0.to_vec().into(),
            kind: 1,
            payload: Compressor::new(2).unwrap().compress(raw).into(),
            raw_len: raw.len() as u32,
        };
        crate::datapath::check_upload(keys, &up(&raw)).unwrap();
        raw.extend_from_slice(b"public file bytes");
        let r = crate::datapath::check_upload(keys, &up(&raw));
        assert!(
            matches!(&r, Err(CoreError::Invalid(m)) if m.contains("exact encoding")),
            "{r:?}"
        );
    }

    /// An index file written after a prune overtook the job's lock would
    /// name packs the prune removed, and later backups would reuse chunks
    /// that are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_store_no_index_once_the_jobs_lock_is_gone() {
        let mut c = core().await;
        let s = Arc::clone(&c.shared);
        let repo = s.storage.repo();
        let (chunks, _) = upload_of(&repo.key().chunk, b"uploaded after the lock went");
        let job = start_backup(&s, request("h1", &["/data"]), "admin:test")
            .await
            .unwrap();
        c.work.recv().await.unwrap();
        let active = s.jobs.active_for(&job.id, "h1").unwrap();
        // As `backer unlock --all`, or a prune that found it stale, does.
        assert_eq!(backer_repo::lock::unlock(&repo, true).await.unwrap().len(), 1);

        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::UploadBatch {
            job_id: job.id.clone(),
            chunks,
        })
        .await
        .unwrap();
        drop(tx);
        let handle = tokio::runtime::Handle::current();
        let r = tokio::task::spawn_blocking(move || crate::datapath::ingest(&active, rx, handle))
            .await
            .unwrap();
        assert!(
            matches!(
                &r,
                Err(CoreError::Repo {
                    source: backer_repo::Error::LockExpired(_),
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(
            repo.list(backer_repo::repository::Dir::Index)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
