//! The management service, for administrators only.

use std::pin::Pin;
use std::sync::Arc;

use backer_proto::v1 as pb;
use backer_proto::v1::management_server::{Management, ManagementServer};
use backer_proto::v1::*;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{auth, now};
use crate::config::valid_client_name;
use crate::runner;
use crate::server::Shared;
use crate::state::ClientState;

pub struct Service {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> ManagementServer<Service> {
    ManagementServer::new(Service { shared })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Service {
    fn clients(&self) -> Vec<Client> {
        let conns = self.shared.connections.lock();
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
                        Some(ClientState::Pending) => pb::ClientState::Pending,
                        Some(ClientState::Enrolled) => pb::ClientState::Enrolled,
                        Some(ClientState::Revoked) => pb::ClientState::Revoked,
                        None => pb::ClientState::Configured,
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
                "{:?} is not a valid client name: use a DNS name (lower-case letters, digits, '-' and '.'), at most 253 characters",
                r.name
            )));
        }
        let token = self
            .shared
            .update_registry(|reg| reg.add(&r.name, r.reenroll, now()))?
            .map_err(Status::failed_precondition)?;
        if r.reenroll {
            // Its open connection belonged to the old certificate, and so did its jobs.
            self.shared.connections.lock().remove(&r.name);
            runner::client_gone(&self.shared, &r.name, None, "was re-enrolled").await;
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
        self.shared.connections.lock().remove(&name);
        runner::client_gone(&self.shared, &name, None, "was revoked").await;
        tracing::info!(client = %name, by = %admin, "client revoked");
        Ok(Response::new(RemoveClientResponse {}))
    }

    async fn start_backup(&self, req: Request<StartBackupRequest>) -> Result<Response<Job>, Status> {
        let admin = auth::admin(&self.shared, &req)?;
        let job = runner::start_backup(&self.shared, req.into_inner(), &format!("admin:{admin}")).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn start_restore(&self, req: Request<StartRestoreRequest>) -> Result<Response<Job>, Status> {
        let admin = auth::admin(&self.shared, &req)?;
        let job = runner::start_restore(&self.shared, req.into_inner(), &format!("admin:{admin}")).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let client = req.into_inner().client;
        let jobs = self
            .shared
            .jobs
            .list((!client.is_empty()).then_some(client.as_str()))
            .iter()
            .map(|j| j.to_proto())
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    type WatchJobStream = BoxStream<Job>;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        auth::admin(&self.shared, &req)?;
        Ok(Response::new(super::watch_stream(
            &self.shared,
            &req.into_inner().id,
        )?))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let client = req.into_inner().client;
        let snapshots = self
            .shared
            .storage
            .repo()
            .snapshots()
            .await
            .map_err(|e| Status::internal(format!("failed to list snapshots: {e}")))?
            .into_iter()
            .filter(|s| client.is_empty() || s.snapshot.hostname == client)
            .map(|s| Snapshot {
                id: s.id.to_hex(),
                client: s.snapshot.hostname,
                time: s.snapshot.time.timestamp(),
                paths: s.snapshot.paths,
                tags: s.snapshot.tags,
                files: s.snapshot.summary.files,
                bytes: s.snapshot.summary.bytes,
                partial: s.snapshot.partial,
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }

    type ListFilesStream = BoxStream<FileEntry>;

    async fn list_files(
        &self,
        req: Request<ListFilesRequest>,
    ) -> Result<Response<Self::ListFilesStream>, Status> {
        auth::admin(&self.shared, &req)?;
        let r = req.into_inner();
        let repo = self.shared.storage.repo();
        let snap = runner::find_snapshot(&repo, &r.snapshot, &r.client).await?;
        let path = (!r.path.is_empty()).then_some(r.path.as_str());
        let lister = backer_repo::listing::Lister::new(repo, snap.snapshot.tree, path)
            .await
            .map_err(|e| match e {
                backer_repo::Error::NoSuchPath(_) | backer_repo::Error::Invalid(_) => {
                    Status::not_found(e.to_string())
                }
                e => Status::internal(e.to_string()),
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut lister = lister;
            loop {
                let batch = match lister.next_batch().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                };
                for (path, n) in batch {
                    let entry = FileEntry {
                        path,
                        kind: format!("{:?}", n.kind).to_lowercase(),
                        mode: n.mode,
                        size: n.size,
                        mtime: n.mtime.secs,
                    };
                    // A full channel waits for the reader; a gone one ends the walk.
                    if tx.send(Ok(entry)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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
            server_not_after: self.shared.server_not_after(),
            clients: self.clients(),
        }))
    }

    async fn list_admin_certs(
        &self,
        req: Request<ListAdminCertsRequest>,
    ) -> Result<Response<ListAdminCertsResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let certs = self
            .shared
            .admin_certs
            .current()
            .map_err(|e| Status::internal(format!("failed to read the record of admin certificates: {e}")))?
            .certs
            .into_iter()
            .map(|c| AdminCert {
                name: c.name,
                serial: c.serial,
                issued: c.issued,
                not_after: c.not_after,
                revoked: c.revoked.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(ListAdminCertsResponse { certs }))
    }

    async fn revoke_admin_cert(
        &self,
        req: Request<RevokeAdminCertRequest>,
    ) -> Result<Response<RevokeAdminCertResponse>, Status> {
        let admin = auth::admin(&self.shared, &req)?;
        let name = req.into_inner().name;
        let (known, revoked) = self
            .shared
            .state
            .update_admin_certs(now(), |a| {
                (a.certs.iter().any(|c| c.name == name), a.revoke(&name, now()))
            })
            .map_err(|e| Status::internal(format!("failed to revoke: {e}")))?;
        if !known {
            return Err(Status::not_found(format!(
                "no admin certificate of {name} is recorded (`backer cert admins` lists them)"
            )));
        }
        tracing::warn!(admin = %name, by = %admin, revoked, "admin certificates revoked");
        Ok(Response::new(RevokeAdminCertResponse {
            revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }
}
