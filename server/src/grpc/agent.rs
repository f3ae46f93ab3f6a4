//! The agent service: certificate renewal and the work connection. Every
//! call is checked against the caller's certificate and the registry.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use backer_proto::v1::agent_report::Report;
use backer_proto::v1::agent_server::{Agent, AgentServer};
use backer_proto::v1::*;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{auth, now};
use crate::datapath;
use crate::jobs::{AGENT_ORIGIN, JobState};
use crate::runner;
use crate::server::{Connection, Shared};

pub struct Service {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> AgentServer<Service> {
    AgentServer::new(Service { shared })
        .max_decoding_message_size(backer_proto::MAX_MESSAGE)
        .max_encoding_message_size(backer_proto::MAX_MESSAGE)
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// An upload that sends nothing this long is given up: a stalled client
/// must not hold a job (and its repository lock) forever.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn on_progress(shared: &Shared, client: &str, p: JobProgress) {
    if shared.jobs.active_for(&p.job_id, client).is_err() {
        return;
    }
    shared.jobs.update(&p.job_id, |r| {
        r.files_done = p.files_done;
        r.bytes_done = p.bytes_done;
        r.files_total = p.files_total;
        r.bytes_total = p.bytes_total;
    });
}

/// The agent's word on how a job ended. A backup succeeds only by
/// FinishBackup (which checks it); here it can only fail.
async fn on_done(shared: &Shared, client: &str, d: JobDone) {
    let Ok(active) = shared.jobs.active_for(&d.job_id, client) else {
        return;
    };
    let mut messages = d.messages;
    let state = match (&active.spec, d.ok) {
        (_, false) => JobState::Failed,
        (crate::jobs::Spec::Backup(_), true) => {
            messages.push("the agent ended the backup without writing a snapshot".into());
            JobState::Failed
        }
        (crate::jobs::Spec::Restore { .. }, true) if messages.is_empty() => JobState::Succeeded,
        (crate::jobs::Spec::Restore { .. }, true) => JobState::Partial,
    };
    runner::end(shared, &d.job_id, state, messages, None).await;
}

#[tonic::async_trait]
impl Agent for Service {
    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<CertificateResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let issued = self
            .shared
            .ca
            .sign_client(&name, &req.into_inner().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The new certificate is the client's; the old one only finishes
        // the work already under way with it.
        let now = chrono::Utc::now().timestamp();
        self.shared
            .update_registry(|reg| reg.renew_certificate(&name, &issued.serial, issued.not_after, now))?;
        tracing::info!(client = %name, "certificate renewed");
        Ok(Response::new(CertificateResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.shared.ca.cert_pem.clone(),
            client_name: name,
            not_after: issued.not_after,
        }))
    }

    type WorkStream = BoxStream<WorkItem>;

    async fn work(&self, req: Request<Streaming<AgentReport>>) -> Result<Response<Self::WorkStream>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let mut reports = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        // The registry of connections holds the only sender: removing the
        // entry (revocation, re-enrolment) ends the agent's stream.
        self.shared.connections.lock().insert(
            name.clone(),
            Connection {
                id,
                since: now(),
                version: String::new(),
                work: tx,
            },
        );
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            while let Ok(Some(report)) = reports.message().await {
                match report.report {
                    Some(Report::Progress(p)) => on_progress(&shared, &name, p),
                    Some(Report::Done(d)) => on_done(&shared, &name, d).await,
                    Some(Report::Hello(h)) => {
                        if let Some(c) = shared.connections.lock().get_mut(&name)
                            && c.id == id
                        {
                            c.version = h.agent_version;
                        }
                        tracing::info!(client = %name, hostname = %h.hostname, "agent connected");
                    }
                    None => {}
                }
            }
            {
                let mut conns = shared.connections.lock();
                if conns.get(&name).is_some_and(|c| c.id == id) {
                    conns.remove(&name);
                }
            }
            // The jobs sent over this connection cannot report any more;
            // those sent over a newer one carry on.
            runner::client_gone(&shared, &name, Some(id), "disconnected").await;
            tracing::info!(client = %name, "agent disconnected");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        )))
    }

    async fn chunk_keys(
        &self,
        req: Request<ChunkKeysRequest>,
    ) -> Result<Response<ChunkKeysResponse>, Status> {
        auth::client(&self.shared, &req)?;
        let repo = self.shared.storage.repo();
        let (id_key, chunker_seed) = repo.key().chunk.to_parts();
        Ok(Response::new(ChunkKeysResponse {
            id_key: id_key.to_vec().into(),
            chunker_seed,
            zstd_level: repo.config().zstd_level,
        }))
    }

    async fn missing(&self, req: Request<MissingRequest>) -> Result<Response<MissingResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let r = req.into_inner();
        let active = self.shared.jobs.active_for(&r.job_id, &name)?;
        let ids: Vec<Vec<u8>> = r.ids.iter().map(|b| b.to_vec()).collect();
        Ok(Response::new(MissingResponse {
            missing: datapath::missing(&active, &ids)?,
        }))
    }

    async fn upload(&self, req: Request<Streaming<UploadBatch>>) -> Result<Response<UploadResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Ok(Response::new(UploadResponse { stored: 0 }));
        };
        let active = self.shared.jobs.active_for(&first.job_id, &name)?;
        datapath::backup_spec(&active)?;
        {
            let mut open = active.uploading.lock();
            if *open {
                return Err(Status::failed_precondition("this job already has an upload open"));
            }
            *open = true;
        }
        // Bounded: a client faster than the server waits on flow control,
        // and a stalled one holds a few chunks, never more.
        let (tx, rx) = mpsc::channel(8);
        let worker = {
            let active = Arc::clone(&active);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || datapath::ingest(&active, rx, handle))
        };
        let job = first.job_id.clone();
        let mut next = Some(first);
        let mut failure = None;
        while let Some(m) = next.take() {
            if m.job_id != job {
                failure = Some(Status::invalid_argument(
                    "one upload carries the chunks of one job",
                ));
                break;
            }
            if tx.send(m).await.is_err() {
                break; // the worker stopped; its error is reported below
            }
            match tokio::time::timeout(UPLOAD_IDLE, stream.message()).await {
                Ok(Ok(m)) => next = m,
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(_) => {
                    failure = Some(Status::deadline_exceeded(format!(
                        "the upload sent nothing for {} s",
                        UPLOAD_IDLE.as_secs()
                    )));
                    break;
                }
            }
        }
        drop(tx);
        let result = worker
            .await
            .map_err(|e| Status::internal(format!("the upload worker failed: {e}")));
        *active.uploading.lock() = false;
        if let Some(f) = &failure
            && f.code() == tonic::Code::DeadlineExceeded
        {
            let msg = format!("the backup stalled: {}", f.message());
            runner::end(&self.shared, &job, JobState::Failed, vec![msg], None).await;
        }
        let stored = result??;
        if let Some(f) = failure {
            return Err(f);
        }
        Ok(Response::new(UploadResponse { stored }))
    }

    async fn read_tree(&self, req: Request<ReadTreeRequest>) -> Result<Response<ReadTreeResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let r = req.into_inner();
        let active = self.shared.jobs.active_for(&r.job_id, &name)?;
        let tree = datapath::read_tree(&active, datapath::blob_id(&r.id)?).await?;
        Ok(Response::new(ReadTreeResponse { tree: tree.into() }))
    }

    async fn finish_backup(
        &self,
        req: Request<FinishBackupRequest>,
    ) -> Result<Response<FinishBackupResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let r = req.into_inner();
        let active = self.shared.jobs.active_for(&r.job_id, &name)?;
        let snapshot_id = datapath::finish_backup(&self.shared, &active, &r.snapshot_json).await?;
        Ok(Response::new(FinishBackupResponse { snapshot_id }))
    }

    type ReadChunksStream = BoxStream<ChunkData>;

    async fn read_chunks(
        &self,
        req: Request<ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let r = req.into_inner();
        let active = self.shared.jobs.active_for(&r.job_id, &name)?;
        let ids = r.ids.iter().map(|b| b.to_vec()).collect();
        let rx = datapath::read_chunks(active, ids, tokio::runtime::Handle::current())?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        )))
    }

    type RequestJobStream = BoxStream<Job>;

    async fn request_job(
        &self,
        req: Request<RequestJobRequest>,
    ) -> Result<Response<Self::RequestJobStream>, Status> {
        let name = auth::client(&self.shared, &req)?;
        // A host may only ask for its own backups and restores onto itself.
        let job = match req.into_inner().job {
            Some(request_job_request::Job::Backup(b)) => {
                runner::start_backup(&self.shared, own_backup(&name, b), AGENT_ORIGIN).await?
            }
            Some(request_job_request::Job::Restore(mut r)) => {
                if !r.to_client.is_empty() && r.to_client != name {
                    return Err(Status::permission_denied(
                        "an agent may only restore onto its own host",
                    ));
                }
                r.client = name.clone();
                r.to_client = name.clone();
                runner::start_restore(&self.shared, r, AGENT_ORIGIN).await?
            }
            None => return Err(Status::invalid_argument("no job in the request")),
        };
        Ok(Response::new(super::watch_stream(&self.shared, &job.id)?))
    }
}

/// The backup an agent may ask for: of its own host, and with no retention
/// policy of its own. Only the configured one applies: a node taken over
/// must not be able to forget its history (a backup of nothing with
/// `keep_last = 1` would forget every earlier snapshot of the series).
fn own_backup(client: &str, mut b: StartBackupRequest) -> StartBackupRequest {
    b.client = client.to_string();
    b.retention = None;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_asks_only_for_its_own_backups_and_never_for_retention() {
        let asked = StartBackupRequest {
            client: "other".into(),
            paths: vec!["/data".into()],
            retention: Some(Retention {
                keep_last: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = own_backup("h1", asked);
        assert_eq!(b.client, "h1");
        assert_eq!(b.paths, vec!["/data".to_string()]);
        assert!(b.retention.is_none());
    }
}
