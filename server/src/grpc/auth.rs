//! Who is calling, decided on every call from the TLS peer certificate (or,
//! for management, the configured Login/Password): never from anything the
//! caller merely claims.

use tonic::{Request, Status};

use crate::login::LoginError;
use crate::server::Shared;
use backer_proto::ca::{Identity, identity_of};

/// The identity a verified peer certificate names, its raw serial and its
/// whole lifetime in seconds (not after minus not before).
type Peer = (Identity, Vec<u8>, i64);

fn peer_identity<T>(req: &Request<T>) -> Option<Result<Peer, Status>> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    Some(
        identity_of(leaf.as_ref())
            .map(|(id, serial, _)| (id, serial, lifetime(leaf.as_ref())))
            .map_err(|e| Status::unauthenticated(e.to_string())),
    )
}

/// Seconds from a certificate's not-before to its not-after; `i64::MAX`
/// when unreadable, so nothing that depends on a short life is granted.
fn lifetime(der: &[u8]) -> i64 {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.validity().not_after.timestamp() - c.validity().not_before.timestamp())
        .unwrap_or(i64::MAX)
}

/// Where an agent names itself when the server runs with `--insecure-plaintext`.
pub const CLAIMED_CLIENT: &str = "x-backer-client";

/// The enrolled client behind this call, or a refusal that says why.
pub fn client<T>(shared: &Shared, req: &Request<T>) -> Result<String, Status> {
    match peer_identity(req) {
        // Development only: without TLS a client can only name itself.
        None if shared.insecure_plaintext => {
            let name = req
                .metadata()
                .get(CLAIMED_CLIENT)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Status::unauthenticated(format!("plaintext mode: no {CLAIMED_CLIENT} header"))
                })?
                .to_string();
            match shared.registry().clients.get(&name).map(|r| r.state) {
                Some(crate::state::ClientState::Enrolled) => Ok(name),
                _ => Err(Status::permission_denied(format!(
                    "client {name} is not enrolled"
                ))),
            }
        }
        None => Err(Status::unauthenticated(
            "no client certificate: enrol this host first (backer-agent enroll)",
        )),
        Some(Err(e)) => Err(e),
        Some(Ok((Identity::Admin(_), _, _))) => Err(Status::permission_denied(
            "an admin certificate cannot act as an agent",
        )),
        Some(Ok((Identity::Client(name), serial, _))) => {
            shared
                .registry()
                .check(&name, &serial)
                .map_err(|r| Status::permission_denied(r.to_string()))?;
            Ok(name)
        }
    }
}

/// An administrator: an admin certificate the server recorded and did not
/// revoke, or the server's Login/Password as HTTP basic authorization.
/// Client certificates are refused.
pub fn admin<T>(shared: &Shared, req: &Request<T>) -> Result<String, Status> {
    match peer_identity(req) {
        Some(Ok((Identity::Admin(name), serial, lifetime))) => {
            return match shared.check_admin(&name, &serial, lifetime) {
                Ok(()) => Ok(name),
                Err(r) => {
                    let peer = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                    tracing::warn!(admin = %name, serial = %hex::encode(&serial), %peer, "refused an admin certificate: {r}");
                    Err(Status::permission_denied(r.to_string()))
                }
            };
        }
        Some(Ok((Identity::Client(name), _, _))) => {
            return Err(Status::permission_denied(format!(
                "client {name} may not call management methods"
            )));
        }
        Some(Err(e)) => return Err(e),
        None => {}
    }
    let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    crate::login::check(
        &shared.logins,
        shared.login().as_ref(),
        req.remote_addr(),
        header,
        "management",
    )
    .map_err(|e| match e {
        LoginError::NotConfigured => Status::unauthenticated(
            "management needs an admin certificate (this server has no Login/Password configured)",
        ),
        LoginError::Missing => {
            Status::unauthenticated("management needs an admin certificate or the server's login")
        }
        LoginError::Throttled { .. } => Status::resource_exhausted(e.to_string()),
        LoginError::Malformed | LoginError::Wrong => Status::unauthenticated(e.to_string()),
    })
}
