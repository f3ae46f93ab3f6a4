//! Enrolment: a one-time token and a CSR in, a certificate out.

use std::sync::Arc;

use backer_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use backer_proto::v1::{CertificateResponse, EnrollRequest};
use tonic::{Request, Response, Status};

use super::now;
use crate::server::Shared;

pub struct Service {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> EnrollmentServer<Service> {
    EnrollmentServer::new(Service { shared })
}

#[tonic::async_trait]
impl Enrollment for Service {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<CertificateResponse>, Status> {
        let r = req.into_inner();
        // Redeem first: a token is spent even if the CSR turns out bad, so it
        // cannot be probed repeatedly.
        let name = self
            .shared
            .update_registry(|reg| reg.redeem(&r.token, now()))?
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let issued = self
            .shared
            .ca
            .sign_client(&name, &r.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let version = (!r.agent_version.is_empty()).then_some(r.agent_version);
        self.shared
            .update_registry(|reg| reg.set_certificate(&name, &issued.serial, issued.not_after, version))?;
        tracing::info!(client = %name, "client enrolled");
        Ok(Response::new(CertificateResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.shared.ca.cert_pem.clone(),
            client_name: name,
            not_after: issued.not_after,
        }))
    }
}
