//! The agent service: certificate renewal and the work connection. Every
//! call is checked against the caller's certificate and the registry.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use backer_proto::v1::agent_report::Report;
use backer_proto::v1::agent_server::{Agent, AgentServer};
use backer_proto::v1::*;
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{auth, now};
use crate::server::{Connection, Shared};

pub struct Service {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> AgentServer<Service> {
    AgentServer::new(Service { shared })
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const DATA_PATH: &str =
    "the data path (backups and restores through the server) is not available in this version yet";

#[tonic::async_trait]
impl Agent for Service {
    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<CertificateResponse>, Status> {
        let name = auth::client(&self.shared, &req)?;
        let issued = self
            .shared
            .ca
            .sign_client(&name, &req.into_inner().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // From here on only the new certificate is accepted.
        self.shared
            .update_registry(|reg| reg.set_certificate(&name, &issued.serial, issued.not_after, None))?;
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
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
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
                if let Some(Report::Hello(h)) = report.report {
                    if let Some(c) = shared
                        .connections
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&name)
                        && c.id == id
                    {
                        c.version = h.agent_version;
                    }
                    tracing::info!(client = %name, hostname = %h.hostname, "agent connected");
                }
            }
            let mut conns = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
            if conns.get(&name).is_some_and(|c| c.id == id) {
                conns.remove(&name);
            }
            tracing::info!(client = %name, "agent disconnected");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn chunk_keys(
        &self,
        req: Request<ChunkKeysRequest>,
    ) -> Result<Response<ChunkKeysResponse>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }

    async fn missing(&self, req: Request<MissingRequest>) -> Result<Response<MissingResponse>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }

    async fn upload(&self, req: Request<Streaming<UploadChunk>>) -> Result<Response<UploadResponse>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }

    async fn read_tree(&self, req: Request<ReadTreeRequest>) -> Result<Response<ReadTreeResponse>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }

    async fn finish_backup(
        &self,
        req: Request<FinishBackupRequest>,
    ) -> Result<Response<FinishBackupResponse>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }

    type ReadChunksStream = BoxStream<ChunkData>;

    async fn read_chunks(
        &self,
        req: Request<ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        auth::client(&self.shared, &req)?;
        Err(Status::unimplemented(DATA_PATH))
    }
}
