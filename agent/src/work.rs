//! Runs the jobs the server sends: a backup reads this host's files through
//! the engine's pipeline into the server; a restore writes them back under a
//! target this agent is allowed to write. Progress goes back every second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backer_proto::v1 as pb;
use backer_proto::v1::agent_report::Report;
use backer_repo::Error;
use backer_repo::archiver::{self, BackupOptions, Progress};
use backer_repo::id::{BlobId, SnapshotId};
use backer_repo::restorer::{self, RestoreOptions, RestoreProgress};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::remote::RemoteStore;

/// What this agent accepts from its server.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Restores may write only below these directories.
    pub restore_roots: Vec<PathBuf>,
    /// Upload limit in bytes per second.
    pub limit_upload: Option<u64>,
    /// Where the host's `/` is seen (a container mounts it read-only at
    /// `/host`): backups read host paths under it. Restores are not
    /// translated: they write only where a restore root is mounted writable.
    pub host_root: PathBuf,
}

impl Policy {
    /// Whether `target` is below a restore root, judged on real paths: no
    /// `..`, and symlinks in the part that exists resolved, so neither can
    /// lead a restore out of its roots.
    ///
    /// Below the root, no existing component may be a symlink either: a
    /// root holds other people's directories (every pod's volumes), and a
    /// link inside one must not lead a restore into another.
    fn allows_restore_to(&self, target: &Path) -> bool {
        let Some(real) = real_path(target) else {
            return false;
        };
        self.restore_roots.iter().any(|r| {
            real_path(r).is_some_and(|root| real.starts_with(&root))
                && target
                    .strip_prefix(r)
                    .is_ok_and(|below| no_symlink_below(r, below))
        })
    }
}

impl Policy {
    /// `Ok` when `seen` (the agent's view of the node's `node_path`) exists.
    /// In a container the agent sees only what its pod mounts under the
    /// host root, so a missing path is named with where to look: a PVC
    /// backup that "finds no path" because the chart's `agent.hostPaths`
    /// leave the volume out must say so, not fail obscurely.
    fn visible(&self, seen: &Path, node_path: &str) -> Result<(), String> {
        if std::fs::symlink_metadata(seen).is_ok() {
            return Ok(());
        }
        if self.host_root == Path::new("/") {
            return Err(format!("failed to read {node_path}: it does not exist"));
        }
        Err(format!(
            "failed to read {node_path}: it does not exist on the node, or this agent cannot see it \
             (it sees the node's files under {}: in Kubernetes only the chart's agent.hostPaths, the \
             kubelet's pods directory and agent.volumeDirs are mounted there)",
            self.host_root.display()
        ))
    }
}

/// Whether every existing component of `root/below` after `root` is a real
/// directory (or the path ends before it exists).
fn no_symlink_below(root: &Path, below: &Path) -> bool {
    let mut at = root.to_path_buf();
    for c in below.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return false,
            Err(_) => return true,
        }
    }
    true
}

/// `p` with symlinks resolved in the part that exists (the rest is
/// appended as given); `None` for a relative path or one with `..`.
fn real_path(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return None;
    }
    let mut existing = p;
    loop {
        if let Ok(real) = existing.canonicalize() {
            return Some(real.join(p.strip_prefix(existing).ok()?));
        }
        existing = existing.parent()?;
    }
}

type Reports = mpsc::Sender<pb::AgentReport>;

async fn report(tx: &Reports, r: Report) {
    let _ = tx.send(pb::AgentReport { report: Some(r) }).await;
}

/// Runs one job to its end, or until `stop` cancels it, and reports how it
/// ended.
pub async fn run(
    client: crate::Client,
    item: pb::WorkItem,
    reports: Reports,
    policy: Policy,
    stop: CancellationToken,
) {
    let job = item.job_id.clone();
    let outcome = match item.work {
        Some(pb::work_item::Work::Backup(b)) => backup(client, &job, b, &reports, &policy, &stop).await,
        Some(pb::work_item::Work::Restore(r)) => restore(client, &job, r, &reports, &policy, &stop).await,
        None => Err("the server sent an empty job; is this agent older than the server?".into()),
    };
    let done = match outcome {
        Ok((messages, snapshot_id)) => pb::JobDone {
            job_id: job.clone(),
            ok: true,
            messages,
            snapshot_id,
        },
        Err(e) => {
            tracing::warn!(%job, "job failed: {e}");
            pb::JobDone {
                job_id: job.clone(),
                ok: false,
                messages: vec![e],
                snapshot_id: String::new(),
            }
        }
    };
    tracing::info!(%job, ok = done.ok, "job ended");
    report(&reports, Report::Done(done)).await;
}

/// Files done, bytes done, files total, bytes total, from a backup's or a
/// restore's progress counters.
/// Done and total files and bytes; a total known beforehand (the parent's,
/// the snapshot's) is an estimate the work may pass.
fn counters(c: [&std::sync::atomic::AtomicU64; 4]) -> (u64, u64, u64, u64) {
    let [files, bytes, files_total, bytes_total] = c.map(|x| x.load(Ordering::Relaxed));
    (files, bytes, files_total.max(files), bytes_total.max(bytes))
}

/// Sends the counters every second until dropped.
fn progress_reporter(
    reports: Reports,
    job: String,
    read: impl Fn() -> (u64, u64, u64, u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (files_done, bytes_done, files_total, bytes_total) = read();
            let p = pb::JobProgress {
                job_id: job.clone(),
                files_done,
                bytes_done,
                files_total,
                bytes_total,
            };
            if reports
                .send(pb::AgentReport {
                    report: Some(Report::Progress(p)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

type Outcome = Result<(Vec<String>, String), String>;

async fn backup(
    client: crate::Client,
    job: &str,
    work: pb::BackupWork,
    reports: &Reports,
    policy: &Policy,
    stop: &CancellationToken,
) -> Outcome {
    let store = RemoteStore::new(client.clone(), job.to_string(), policy.limit_upload)
        .await
        .map_err(|e| e.to_string())?;
    let parent = if work.parent_tree_id.is_empty() {
        None
    } else {
        let id: SnapshotId = work
            .parent_snapshot_id
            .parse()
            .map_err(|_| "the server sent a malformed parent snapshot id".to_string())?;
        let root = BlobId::from_slice(&work.parent_tree_id)
            .ok_or_else(|| "the server sent a malformed parent tree id".to_string())?;
        match store.read_tree(&root).await {
            Ok(t) => Some((id, t)),
            Err(e) => {
                tracing::warn!("failed to read the parent snapshot, reading every file: {e}");
                None
            }
        }
    };
    let root = policy.host_root.join(work.root.trim_start_matches('/'));
    policy.visible(&root, &work.root)?;
    // (A path with `..` is left to the archiver, which refuses it.)
    for p in work.paths.iter().filter(|p| !p.split('/').any(|c| c == "..")) {
        policy.visible(&root.join(p.trim_start_matches('/')), p)?;
    }
    let opts = BackupOptions {
        root,
        paths: work.paths.iter().map(PathBuf::from).collect(),
        excludes: work.excludes,
        tags: work.tags,
        scan: true,
        // With a parent its totals are the progress's: no second walk.
        // (The engine ignores totals of 0: an old server's, or an empty parent.)
        expected: parent.is_some().then_some((work.parent_files, work.parent_bytes)),
        cancel: stop.clone(),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    let ticker = progress_reporter(reports.clone(), job.to_string(), move || {
        counters([&p.files_done, &p.bytes_done, &p.files_total, &p.bytes_total])
    });
    let archived = tokio::task::spawn_blocking(move || {
        let r = archiver::archive(&store, &opts, parent, progress);
        (r, store)
    })
    .await;
    ticker.abort();
    let (result, _store) = archived.map_err(|e| format!("the backup thread failed: {e}"))?;
    let (snapshot, messages) = result.map_err(|e| match e {
        Error::Cancelled => {
            "cancelled: the agent was stopped (SIGTERM or Ctrl-C) during the backup; no snapshot was saved, \
             and what it had sent is reused by the next backup"
                .to_string()
        }
        e => format!("backup failed: {e}"),
    })?;
    tracing::info!(%job, files = snapshot.summary.files, "files read and sent; asking the server to finish");
    let snapshot_json = serde_json::to_string(&snapshot).map_err(|e| e.to_string())?;
    let id = client
        .clone()
        .finish_backup(pb::FinishBackupRequest {
            job_id: job.to_string(),
            snapshot_json,
        })
        .await
        .map_err(|s| format!("the server refused the snapshot: {}", s.message()))?
        .into_inner()
        .snapshot_id;
    Ok((messages, id))
}

async fn restore(
    client: crate::Client,
    job: &str,
    work: pb::RestoreWork,
    reports: &Reports,
    policy: &Policy,
    stop: &CancellationToken,
) -> Outcome {
    let target = PathBuf::from(&work.target);
    if !target.is_absolute() || !policy.allows_restore_to(&target) {
        return Err(format!(
            "refused to restore into {}: this agent may restore only below {} (backer-agent run --restore-root)",
            target.display(),
            policy
                .restore_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let root =
        BlobId::from_slice(&work.tree_id).ok_or_else(|| "the server sent a malformed tree id".to_string())?;
    let store = RemoteStore::new(client, job.to_string(), None)
        .await
        .map_err(|e| e.to_string())?;
    let opts = RestoreOptions {
        target,
        includes: work.includes,
        overwrite: work.overwrite,
        cancel: stop.clone(),
    };
    let progress = Arc::new(RestoreProgress::default());
    progress.files_total.store(work.files_total, Ordering::Relaxed);
    progress.bytes_total.store(work.bytes_total, Ordering::Relaxed);
    let p = Arc::clone(&progress);
    let ticker = progress_reporter(reports.clone(), job.to_string(), move || {
        counters([&p.files_done, &p.bytes_done, &p.files_total, &p.bytes_total])
    });
    let restored =
        tokio::task::spawn_blocking(move || restorer::restore_tree(&store, root, &opts, progress)).await;
    ticker.abort();
    let outcome = restored
        .map_err(|e| format!("the restore thread failed: {e}"))?
        .map_err(|e| match e {
            Error::Cancelled => format!(
                "cancelled: the agent was stopped (SIGTERM or Ctrl-C) during the restore; {} holds a partial \
                 restore: restore again with --overwrite",
                work.target
            ),
            e => format!("restore failed: {e}"),
        })?;
    let last = pb::JobProgress {
        job_id: job.to_string(),
        files_done: outcome.files,
        bytes_done: outcome.bytes,
        files_total: work.files_total.max(outcome.files),
        bytes_total: work.bytes_total.max(outcome.bytes),
    };
    report(reports, Report::Progress(last)).await;
    Ok((outcome.errors, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_never_pass_through_a_symlink_below_their_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("pods");
        std::fs::create_dir_all(root.join("mine/vol")).unwrap();
        std::fs::create_dir_all(tmp.path().join("theirs/vol")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("theirs/vol"), root.join("mine/vol/esc")).unwrap();
        let policy = Policy {
            restore_roots: vec![root.clone()],
            limit_upload: None,
            host_root: PathBuf::from("/"),
        };
        assert!(policy.allows_restore_to(&root.join("mine/vol")));
        assert!(policy.allows_restore_to(&root.join("mine/vol/new/dir")));
        assert!(!policy.allows_restore_to(&root.join("mine/vol/esc")));
        assert!(!policy.allows_restore_to(&root.join("mine/vol/esc/deeper")));
        assert!(!policy.allows_restore_to(&tmp.path().join("theirs/vol")));
    }
}
