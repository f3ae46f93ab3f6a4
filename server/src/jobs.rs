//! Every backup and restore the server runs, wherever it came from (the CLI,
//! a schedule, the host itself): their records, kept on disk so a restart
//! reports what it interrupted, and the live state of the running ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{CoreError, CoreResult};
use backer_proto::v1 as pb;
use backer_repo::Repository;
use backer_repo::id::{BlobId, SnapshotId};
use backer_repo::lock::Lock;
use backer_repo::snapshot::{MAX_ERROR_BYTES, bounded_message};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{StateError, write_atomic};

/// Finished jobs kept in the record (the oldest go first).
const KEEP_FINISHED: usize = 1000;

/// Messages kept per job (the rest are counted).
const MAX_MESSAGES: usize = 100;

/// Jobs a host may have asked for itself that have not ended, per client:
/// each holds a shared repository lock, so a node taken over could
/// otherwise keep prune out with as many as it liked. Two: a backup and a
/// restore at once.
pub const MAX_AGENT_JOBS: usize = 2;

/// Who asked for a job when its host did (`backer-agent backup|restore`).
pub const AGENT_ORIGIN: &str = "agent";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Backup,
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Partial,
    Failed,
}

impl JobState {
    pub fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Partial => pb::JobState::Partial,
            JobState::Failed => pb::JobState::Failed,
        }
    }

    /// The word users see, from the one list of them (the protocol's).
    pub fn as_str(self) -> &'static str {
        self.to_proto().label()
    }

    pub fn is_final(self) -> bool {
        self.to_proto().is_final()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: Kind,
    pub client: String,
    pub state: JobState,
    /// Who asked: "admin:NAME", "schedule:ID", "agent".
    pub origin: String,
    pub created: i64,
    pub finished: i64,
    pub files_done: u64,
    pub bytes_done: u64,
    pub files_total: u64,
    pub bytes_total: u64,
    pub snapshot_id: String,
    pub messages: Vec<String>,
    /// For a backup: chunk bytes new to the repository (before compression).
    #[serde(default)]
    pub new_bytes: u64,
}

impl JobRecord {
    pub fn to_proto(&self) -> pb::Job {
        pb::Job {
            id: self.id.clone(),
            kind: match self.kind {
                Kind::Backup => "backup",
                Kind::Restore => "restore",
            }
            .into(),
            client: self.client.clone(),
            state: self.state.to_proto().into(),
            created: self.created,
            finished: self.finished,
            files_done: self.files_done,
            bytes_done: self.bytes_done,
            files_total: self.files_total,
            bytes_total: self.bytes_total,
            snapshot_id: self.snapshot_id.clone(),
            messages: self.messages.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// What a running backup was asked to do.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The directory on the client the paths are read under ("" is `/`).
    pub root: String,
    pub paths: Vec<String>,
    pub excludes: Vec<String>,
    pub tags: Vec<String>,
    pub parent: Option<(SnapshotId, BlobId)>,
    /// The parent's files and bytes (0 without one): progress totals.
    pub parent_totals: (u64, u64),
    /// The requested or configured retention, applied after it succeeds.
    pub retention: Option<backer_repo::retention::RetentionPolicy>,
}

#[derive(Debug, Clone)]
pub enum Spec {
    Backup(Box<BackupSpec>),
    Restore { snapshot: SnapshotId, root: BlobId },
}

/// A running job's live state: what its agent may read and what it wrote.
pub struct Active {
    pub id: String,
    pub client: String,
    /// The agent connection the job was sent over: when it ends, the job
    /// fails, even if the agent has reconnected since.
    pub conn: u64,
    /// FinishBackup has begun: it runs once.
    pub finishing: std::sync::atomic::AtomicBool,
    pub spec: Spec,
    /// The repository handle the job started with (its index answers dedup).
    pub repo: Arc<Repository>,
    /// Keeps prune from deleting chunks this job reuses.
    pub lock: tokio::sync::Mutex<Option<Lock>>,
    /// Trees the agent may read: the root it was given and, as it reads
    /// them, their subtrees. Nothing else of the repository is reachable.
    pub readable_trees: Mutex<HashSet<BlobId>>,
    /// Trees this backup uploaded, checked before its snapshot is written.
    pub new_trees: Mutex<HashSet<BlobId>>,
    /// An upload stream is open (one at a time per job).
    pub uploading: Mutex<bool>,
    /// ReadChunks streams open (see [`crate::datapath::MAX_READS`]).
    pub reads: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Active({} of {})", self.id, self.client)
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Stored {
    jobs: Vec<JobRecord>,
}

struct Inner {
    records: BTreeMap<String, JobRecord>,
    watchers: HashMap<String, watch::Sender<JobRecord>>,
    active: HashMap<String, Arc<Active>>,
    next: u32,
}

pub struct Jobs {
    inner: Mutex<Inner>,
    path: PathBuf,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jobs(..)")
    }
}

impl Jobs {
    /// Loads the record from `path`. Jobs that were queued or running when
    /// the server stopped are marked failed with that reason: a job never
    /// stays "running" across a restart.
    pub fn load(path: PathBuf, now: i64) -> Result<Jobs, StateError> {
        let stored: Stored = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Damaged {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(source) => {
                return Err(StateError::Io {
                    what: "read",
                    path,
                    source,
                });
            }
        };
        let mut records = BTreeMap::new();
        let mut changed = false;
        for mut r in stored.jobs {
            if !r.state.is_final() {
                r.state = JobState::Failed;
                r.finished = now;
                r.messages
                    .push("the server stopped while this job ran; no snapshot was written".into());
                changed = true;
            }
            records.insert(r.id.clone(), r);
        }
        let jobs = Jobs {
            inner: Mutex::new(Inner {
                records,
                watchers: HashMap::new(),
                active: HashMap::new(),
                next: 0,
            }),
            path,
        };
        if changed {
            jobs.save(&jobs.inner.lock())?;
        }
        Ok(jobs)
    }

    fn save(&self, inner: &Inner) -> Result<(), StateError> {
        let stored = Stored {
            jobs: inner.records.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&stored).map_err(|e| StateError::Damaged {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.path, &bytes, false)
    }

    fn save_or_log(&self, inner: &Inner) {
        if let Err(e) = self.save(inner) {
            tracing::error!("failed to save the job record: {e}");
        }
    }

    /// Records a new job, queued; one its host asked for only while fewer
    /// than [`MAX_AGENT_JOBS`] of the host's own have not ended (counted
    /// and recorded at once, so requests that race cannot pass together).
    pub fn create(&self, kind: Kind, client: &str, origin: &str, now: i64) -> CoreResult<JobRecord> {
        let mut inner = self.inner.lock();
        if origin == AGENT_ORIGIN {
            let own: Vec<&str> = inner
                .records
                .values()
                .filter(|r| r.client == client && r.origin == AGENT_ORIGIN && !r.state.is_final())
                .map(|r| r.id.as_str())
                .collect();
            if own.len() >= MAX_AGENT_JOBS {
                return Err(CoreError::Unavailable(format!(
                    "client {client} already runs {} jobs it asked for ({}): wait for one to end",
                    own.len(),
                    own.join(", ")
                )));
            }
        }
        inner.next = inner.next.wrapping_add(1);
        // Sorts by creation time; the counter tells apart jobs of one second.
        let id = format!(
            "{}-{:04}",
            chrono::DateTime::from_timestamp(now, 0)
                .unwrap_or_default()
                .format("%Y%m%d-%H%M%S"),
            inner.next % 10_000
        );
        let record = JobRecord {
            id: id.clone(),
            kind,
            client: client.to_string(),
            state: JobState::Queued,
            origin: origin.to_string(),
            created: now,
            finished: 0,
            files_done: 0,
            bytes_done: 0,
            files_total: 0,
            bytes_total: 0,
            snapshot_id: String::new(),
            messages: Vec::new(),
            new_bytes: 0,
        };
        inner.records.insert(id.clone(), record.clone());
        while inner.records.len() > KEEP_FINISHED {
            let oldest_final = inner
                .records
                .iter()
                .find(|(_, r)| r.state.is_final())
                .map(|(k, _)| k.clone());
            match oldest_final {
                Some(k) => {
                    inner.records.remove(&k);
                }
                None => break,
            }
        }
        self.save_or_log(&inner);
        Ok(record)
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.inner.lock().records.get(id).cloned()
    }

    pub fn list(&self, client: Option<&str>) -> Vec<JobRecord> {
        self.inner
            .lock()
            .records
            .values()
            .filter(|r| client.is_none_or(|c| r.client == c))
            .cloned()
            .collect()
    }

    /// A receiver that sees the job now and every change after.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<JobRecord>> {
        let mut inner = self.inner.lock();
        let record = inner.records.get(id)?.clone();
        if record.state.is_final() {
            // Nothing will change: a receiver that holds the final record.
            return Some(watch::channel(record).1);
        }
        Some(
            inner
                .watchers
                .entry(id.to_string())
                .or_insert_with(|| watch::channel(record).0)
                .subscribe(),
        )
    }

    /// Changes a job's record; saved to disk when its state changed.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
        let mut inner = self.inner.lock();
        let r = inner.records.get_mut(id)?;
        if r.state.is_final() {
            return Some(r.clone());
        }
        let before = r.state;
        f(r);
        let after = r.clone();
        if let Some(w) = inner.watchers.get(id) {
            w.send_replace(after.clone());
        }
        if before != after.state {
            self.save_or_log(&inner);
        }
        if after.state.is_final() {
            inner.watchers.remove(id);
            inner.active.remove(id);
        }
        Some(after)
    }

    /// Ends a job; its live state is dropped. The record, when this call
    /// ended it (`None` for an unknown job or one that had ended already).
    pub fn finish(
        &self,
        id: &str,
        state: JobState,
        messages: Vec<String>,
        snapshot: Option<String>,
        now: i64,
    ) -> Option<JobRecord> {
        let mut ended = false;
        let r = self.update(id, |r| {
            ended = true;
            r.state = state;
            r.finished = now;
            // The record is rewritten whole on each change: keep it small.
            let room = MAX_MESSAGES.saturating_sub(r.messages.len());
            let extra = messages.len().saturating_sub(room);
            r.messages.extend(
                messages
                    .into_iter()
                    .take(room)
                    .map(|m| bounded_message(m, MAX_ERROR_BYTES)),
            );
            if extra > 0 {
                r.messages.push(format!("… and {extra} more"));
            }
            if let Some(s) = snapshot {
                r.snapshot_id = s;
            }
        })?;
        ended.then_some(r)
    }

    pub fn start(&self, active: Active) -> Arc<Active> {
        let active = Arc::new(active);
        self.inner
            .lock()
            .active
            .insert(active.id.clone(), Arc::clone(&active));
        self.update(&active.id, |r| r.state = JobState::Running);
        active
    }

    /// The running job `id`, if it belongs to `client`; what an agent's
    /// data calls are checked against.
    pub fn active_for(&self, id: &str, client: &str) -> CoreResult<Arc<Active>> {
        let inner = self.inner.lock();
        match inner.active.get(id) {
            Some(a) if a.client == client => Ok(Arc::clone(a)),
            // Another client's job looks the same as none at all.
            _ => Err(CoreError::Refused(format!(
                "job {id} is not a running job of client {client}"
            ))),
        }
    }

    /// The running jobs of `client`, all or those sent over connection `conn`.
    pub fn active_of(&self, client: &str, conn: Option<u64>) -> Vec<Arc<Active>> {
        self.inner
            .lock()
            .active
            .values()
            .filter(|a| a.client == client && conn.is_none_or(|c| a.conn == c))
            .cloned()
            .collect()
    }

    pub fn running(&self) -> usize {
        self.inner.lock().active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_ends_once_and_stays_as_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path().join("jobs.json"), 100).unwrap();
        let r = jobs.create(Kind::Backup, "h1", "admin:ops", 100).unwrap();
        let ended = jobs.finish(&r.id, JobState::Failed, vec!["disconnected".into()], None, 130);
        assert_eq!(
            ended.map(|r| (r.state, r.finished)),
            Some((JobState::Failed, 130))
        );
        // A second end (another path noticing the same loss) changes nothing
        // and says so, so the job is counted once.
        assert!(
            jobs.finish(&r.id, JobState::Succeeded, vec![], None, 140)
                .is_none()
        );
        let kept = jobs.get(&r.id).unwrap();
        assert_eq!((kept.state, kept.finished), (JobState::Failed, 130));
        assert!(
            jobs.finish("no-such-job", JobState::Failed, vec![], None, 140)
                .is_none()
        );
    }

    #[test]
    fn a_host_has_at_most_a_few_jobs_of_its_own_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path().join("jobs.json"), 100).unwrap();
        let own: Vec<JobRecord> = (0..MAX_AGENT_JOBS)
            .map(|_| jobs.create(Kind::Backup, "h1", AGENT_ORIGIN, 100).unwrap())
            .collect();
        let refused = jobs.create(Kind::Restore, "h1", AGENT_ORIGIN, 100).unwrap_err();
        let said = refused.message();
        assert!(matches!(refused, CoreError::Unavailable(_)), "{said}");
        assert!(
            said.contains("client h1 already runs 2 jobs it asked for"),
            "{said}"
        );
        assert!(own.iter().all(|r| said.contains(&r.id)), "names the jobs: {said}");
        assert_eq!(
            jobs.list(Some("h1")).len(),
            MAX_AGENT_JOBS,
            "a refused job leaves no record"
        );
        // Other hosts, the admin and schedules are not counted against it.
        jobs.create(Kind::Backup, "h2", AGENT_ORIGIN, 100).unwrap();
        jobs.create(Kind::Backup, "h1", "admin:ops", 100).unwrap();
        jobs.create(Kind::Backup, "h1", "schedule:nightly", 100).unwrap();
        // Once one has ended, the host may ask again.
        jobs.finish(&own[0].id, JobState::Succeeded, vec![], None, 110)
            .unwrap();
        jobs.create(Kind::Restore, "h1", AGENT_ORIGIN, 120).unwrap();
    }

    #[test]
    fn an_agents_messages_are_kept_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path().join("jobs.json"), 100).unwrap();
        let r = jobs.create(Kind::Backup, "h1", "agent:h1", 100).unwrap();
        let huge = "é".repeat(1 << 20);
        let many = vec![huge; 500];
        let ended = jobs.finish(&r.id, JobState::Failed, many, None, 130).unwrap();
        assert_eq!(ended.messages.len(), MAX_MESSAGES + 1);
        assert!(ended.messages[0].len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(ended.messages[0].ends_with('…'));
        assert_eq!(ended.messages[MAX_MESSAGES], "… and 400 more");
    }
}
