//! The management service, for administrators only.

use std::pin::Pin;
use std::sync::Arc;

use backer_proto::v1::management_server::{Management, ManagementServer};
use backer_proto::v1::*;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{auth, now};
use crate::config::valid_client_name;
use crate::server::Shared;
use crate::state::ClientState;

pub struct Service {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> ManagementServer<Service> {
    ManagementServer::new(Service { shared })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const JOBS: &str = "jobs (backups and restores through the server) are not available in this version yet";

impl Service {
    fn clients(&self) -> Vec<Client> {
        let conns = self.shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.shared.config();
        let reg = self.shared.registry();
        let mut names: Vec<String> = reg.clients.keys().cloned().collect();
        // Configured clients that have not been added yet are listed too.
        for n in config.clients.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let rec = reg.clients.get(&name);
                let conn = conns.get(&name);
                Client {
                    state: match rec.map(|r| r.state) {
                        Some(ClientState::Pending) => "pending",
                        Some(ClientState::Enrolled) => "enrolled",
                        Some(ClientState::Revoked) => "revoked",
                        None => "configured",
                    }
                    .into(),
                    cert_not_after: rec.and_then(|r| r.cert_not_after).unwrap_or(0),
                    connected: conn.is_some(),
                    last_seen: conn.map(|c| c.since).unwrap_or(0),
                    agent_version: conn
                        .map(|c| c.version.clone())
                        .or_else(|| rec.and_then(|r| r.agent_version.clone()))
                        .unwrap_or_default(),
                    name,
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Management for Service {
    async fn list_clients(
        &self,
        req: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        Ok(Response::new(ListClientsResponse {
            clients: self.clients(),
        }))
    }

    async fn add_client(
        &self,
        req: Request<AddClientRequest>,
    ) -> Result<Response<AddClientResponse>, Status> {
        let admin = auth::admin(&self.shared, &req)?;
        let r = req.into_inner();
        if !valid_client_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a valid client name: use lower-case letters, digits and '-', at most 63 characters",
                r.name
            )));
        }
        let token = self
            .shared
            .update_registry(|reg| reg.add(&r.name, r.reenroll, now()))?
            .map_err(Status::failed_precondition)?;
        if r.reenroll {
            // Its open connection belonged to the old certificate.
            self.shared
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&r.name);
        }
        tracing::info!(client = %r.name, by = %admin, reenroll = r.reenroll, "enrolment token issued");
        Ok(Response::new(AddClientResponse {
            token,
            token_expires: now() + crate::state::TOKEN_SECS,
            server_address: self.shared.data_address(),
            ca_pem: self.shared.ca.cert_pem.clone(),
        }))
    }

    async fn remove_client(
        &self,
        req: Request<RemoveClientRequest>,
    ) -> Result<Response<RemoveClientResponse>, Status> {
        let admin = auth::admin(&self.shared, &req)?;
        let name = req.into_inner().name;
        if !self.shared.update_registry(|reg| reg.revoke(&name))? {
            return Err(Status::not_found(format!("no client named {name}")));
        }
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        tracing::info!(client = %name, by = %admin, "client revoked");
        Ok(Response::new(RemoveClientResponse {}))
    }

    async fn start_backup(&self, req: Request<StartBackupRequest>) -> Result<Response<Job>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    async fn start_restore(&self, req: Request<StartRestoreRequest>) -> Result<Response<Job>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    type WatchJobStream = BoxStream<Job>;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    type ListFilesStream = BoxStream<FileEntry>;

    async fn list_files(
        &self,
        req: Request<ListFilesRequest>,
    ) -> Result<Response<Self::ListFilesStream>, Status> {
        auth::admin(&self.shared, &req)?;
        Err(Status::unimplemented(JOBS))
    }

    async fn cert_status(
        &self,
        req: Request<CertStatusRequest>,
    ) -> Result<Response<CertStatusResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let ca_not_after = x509_parser::pem::parse_x509_pem(self.shared.ca.cert_pem.as_bytes())
            .ok()
            .and_then(|(_, p)| {
                x509_parser::parse_x509_certificate(&p.contents)
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            })
            .unwrap_or(0);
        Ok(Response::new(CertStatusResponse {
            ca_not_after,
            server_not_after: self.shared.server_not_after,
            clients: self.clients(),
        }))
    }
}
