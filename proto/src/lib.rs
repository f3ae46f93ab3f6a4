//! Backer's wire protocol. See `proto/backer/v1/backer.proto` for every
//! message and field.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod ca;
pub mod pki;

pub mod v1 {
    tonic::include_proto!("backer.v1");
}

impl v1::JobState {
    /// The word users see (CLI, `kubectl get`, JSON output).
    pub fn label(self) -> &'static str {
        match self {
            v1::JobState::Unspecified => "unknown",
            v1::JobState::Queued => "queued",
            v1::JobState::Running => "running",
            v1::JobState::Succeeded => "succeeded",
            v1::JobState::Partial => "partial",
            v1::JobState::Failed => "failed",
        }
    }

    /// Succeeded, partial or failed: nothing more will change.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            v1::JobState::Succeeded | v1::JobState::Partial | v1::JobState::Failed
        )
    }
}

impl v1::ClientState {
    /// The word users see.
    pub fn label(self) -> &'static str {
        match self {
            v1::ClientState::Unspecified => "unknown",
            v1::ClientState::Configured => "configured",
            v1::ClientState::Pending => "pending",
            v1::ClientState::Enrolled => "enrolled",
            v1::ClientState::Revoked => "revoked",
        }
    }
}

/// The largest message either side accepts: a 64 MiB tree blob and room
/// around it (chunks are at most 4 MiB). tonic's default of 4 MiB would
/// refuse a full-size chunk with its framing.
pub const MAX_MESSAGE: usize = 72 * 1024 * 1024;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Resolves on SIGTERM or SIGINT: the shutdown future each Backer process
/// (server, agent, operator) passes to its main loop.
pub async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("failed to install the SIGTERM handler: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("asked to stop");
}

/// Opens a TLS channel to a Backer server at `host:port`, trusting only
/// `ca_pem`, presenting `identity` (certificate and key PEM) when given.
pub async fn connect(
    address: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host.to_string());
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
}

/// Opens a plain-text channel (a server run with `--insecure-plaintext`,
/// for development only).
pub async fn connect_plain(address: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
}
