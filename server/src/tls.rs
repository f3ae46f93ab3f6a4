//! TLS 1.3 for every connection, with rustls. Client certificates are
//! optional at the handshake (enrolment has none yet) but, when present, must
//! chain to our CA; who may do what is decided per call from the verified
//! certificate (see `grpc::auth`).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM in {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("failed to build the TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("failed to build the client certificate verifier: {0}")]
    Verifier(String),
}

pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })
}

pub fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

/// The server side: our certificate, TLS 1.3 only, client certificates
/// verified against `ca_pem` when offered.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "the CA certificate")? {
        roots.add(c)?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "the server certificate")?,
            key(key_pem, "the server key")?,
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The REST port's side: our certificate, TLS 1.3 only, HTTP/1.1, no client
/// certificates (probes and scrapers have none; the JSON views take the
/// Login/Password, which TLS now keeps out of sight).
pub fn rest_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(
            certs(cert_pem, "the server certificate")?,
            key(key_pem, "the server key")?,
        )?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts TLS connections on `listener`, each handshake in its own task so
/// a slow or silent peer holds up nobody else. A failed handshake (wrong CA,
/// expired certificate, plain TCP) is logged and dropped; it never stops the
/// server. Ends when the receiver is dropped.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("failed to accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            // gRPC is request/response: Nagle's algorithm would hold each
            // small answer back until the peer's delayed ACK, some 40 ms.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, "failed to set TCP_NODELAY: {e}");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "refused a TLS handshake: {e}"),
                    Err(_) => tracing::info!(%peer, "a TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// [`accept`] as the stream of connections tonic serves.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = Result<TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    futures::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(accept(listener, config)),
        |(tls, _)| Ok(tls),
    )
}

/// Plain TCP connections, for `--insecure-plaintext` (development only).
pub fn plain_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(tcp, _)| {
            let _ = tcp.set_nodelay(true);
            tcp
        });
        Some((conn, listener))
    })
}
