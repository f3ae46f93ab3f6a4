//! The operator's side of `backer-server`'s management API. The operator
//! calls it as an administrator, with a short-lived admin certificate it
//! mints from the CA it keeps in the `backer-pki` Secret.

use std::sync::Arc;

use backer_proto::ca::Ca;
use backer_proto::v1::enrollment_client::EnrollmentClient;
use backer_proto::v1::management_client::ManagementClient;
use backer_proto::v1::{self as pb};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::error::Error;

/// How long the operator's own admin certificate lives; it is minted again
/// well before that.
const ADMIN_DAYS: i64 = 2;

pub struct Backer {
    address: String,
    /// The data port as seen from here (the Service inside the cluster):
    /// where CSRs are signed. `None`: the address the server advertises,
    /// which is its ExternalName and may be reachable only from outside.
    data_address: Option<String>,
    ca: Arc<Ca>,
    channel: Mutex<Option<(Channel, i64)>>,
}

impl std::fmt::Debug for Backer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backer").field("address", &self.address).finish()
    }
}

fn unavailable(address: &str) -> impl FnOnce(tonic::transport::Error) -> Error + '_ {
    move |e| Error::Server(format!("failed to reach backer-server at {address}: {e}"))
}

impl Backer {
    pub fn new(address: String, ca: Arc<Ca>) -> Backer {
        Backer {
            address,
            data_address: None,
            ca,
            channel: Mutex::new(None),
        }
    }

    /// Signs CSRs through `data_address` (`host:port` of the data port)
    /// rather than the address the server advertises to external hosts.
    pub fn with_data_address(mut self, data_address: Option<String>) -> Backer {
        self.data_address = data_address.filter(|a| !a.is_empty());
        self
    }

    /// The management client, on a channel reused until its certificate is
    /// a day from its end.
    pub async fn mgmt(&self) -> Result<ManagementClient<Channel>, Error> {
        let mut slot = self.channel.lock().await;
        let now = chrono::Utc::now().timestamp();
        if let Some((ch, not_after)) = slot.as_ref()
            && *not_after - now > 86_400
        {
            return Ok(ManagementClient::new(ch.clone()).max_decoding_message_size(backer_proto::MAX_MESSAGE));
        }
        let issued = self
            .ca
            .issue_admin("backer-operator", ADMIN_DAYS)
            .map_err(|e| Error::Pki(format!("failed to mint the operator's admin certificate: {e}")))?;
        let key = issued.key_pem.clone().unwrap_or_default();
        let ch = backer_proto::connect(&self.address, &self.ca.cert_pem, Some((&issued.cert_pem, &key)))
            .await
            .map_err(unavailable(&self.address))?;
        *slot = Some((ch.clone(), issued.not_after));
        Ok(ManagementClient::new(ch).max_decoding_message_size(backer_proto::MAX_MESSAGE))
    }

    /// What the server knows of client `name`, if anything.
    pub async fn client(&self, name: &str) -> Result<Option<pb::Client>, Error> {
        Ok(self
            .mgmt()
            .await?
            .list_clients(pb::ListClientsRequest {})
            .await
            .map_err(status("list clients"))?
            .into_inner()
            .clients
            .into_iter()
            .find(|c| c.name == name))
    }

    /// Has the server sign `csr_pem` for client `name`: a fresh one-time
    /// token, redeemed at once with the agent's CSR. The agent's key never
    /// leaves its node; the operator only relays the request.
    pub async fn sign_client(&self, name: &str, csr_pem: &str) -> Result<pb::CertificateResponse, Error> {
        let enrolled = self
            .client(name)
            .await?
            .is_some_and(|c| c.state() != pb::ClientState::Pending);
        let token = self
            .mgmt()
            .await?
            .add_client(pb::AddClientRequest {
                name: name.to_string(),
                reenroll: enrolled,
            })
            .await
            .map_err(status("register the client"))?
            .into_inner();
        let dial = self.data_address.as_deref().unwrap_or(&token.server_address);
        let ch = backer_proto::connect(dial, &self.ca.cert_pem, None)
            .await
            .map_err(unavailable(dial))?;
        let cert = EnrollmentClient::new(ch)
            .enroll(pb::EnrollRequest {
                token: token.token,
                csr_pem: csr_pem.to_string(),
                agent_version: String::new(),
            })
            .await
            .map_err(status("enrol the client"))?
            .into_inner();
        Ok(cert)
    }
}

/// A refusal or failure of the server, named by what we were doing.
pub fn status(what: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            Error::Refused(format!("failed to {what}: {}", s.message()))
        }
        _ => Error::Server(format!("failed to {what}: {}", s.message())),
    }
}
