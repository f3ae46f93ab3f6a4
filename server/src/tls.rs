//! TLS 1.3 for every connection, with rustls. Client certificates are
//! optional at the handshake (enrolment has none yet) but, when present, must
//! chain to our CA; who may do what is decided per call from the verified
//! certificate (see `grpc::auth`).
//!
//! The server's own certificate is a [`ServerCert`]: every handshake takes
//! the one loaded last, and its files are read again when they change. In
//! Kubernetes the operator renews it in the `backer-pki` Secret and the
//! kubelet updates the mounted files; the server picks it up without a
//! restart, so agents never meet an expired certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
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
    #[error("the server certificate and key do not go together: {0}")]
    Key(rustls::Error),
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// The server's certificate and key, as every handshake uses them: the
/// pair loaded last. With files, [`ServerCert::reload`] reads them again
/// and swaps the pair in when they changed and go together.
#[derive(Debug)]
pub struct ServerCert {
    files: Option<(PathBuf, PathBuf)>,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The PEM texts it was made from, to tell a change from a touch.
    pem: (String, String),
    not_after: i64,
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Loaded, TlsError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let key = CertifiedKey::from_der(
        certs(cert_pem, "the server certificate")?,
        key(key_pem, "the server key")?,
        &provider,
    )
    .map_err(TlsError::Key)?;
    Ok(Loaded {
        key: Arc::new(key),
        pem: (cert_pem.to_string(), key_pem.to_string()),
        not_after: backer_proto::ca::describe(cert_pem)
            .map(|(_, t)| t)
            .unwrap_or_default(),
    })
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ServerCert {
    /// The pair given; with `files` (certificate, key), where to read it
    /// again from.
    pub fn new(
        cert_pem: &str,
        key_pem: &str,
        files: Option<(PathBuf, PathBuf)>,
    ) -> Result<Arc<ServerCert>, TlsError> {
        Ok(Arc::new(ServerCert {
            files,
            current: RwLock::new(certified(cert_pem, key_pem)?),
        }))
    }

    /// When the certificate in use ends (unix seconds).
    pub fn not_after(&self) -> i64 {
        self.current.read().not_after
    }

    /// Reads the files again: `Ok(true)` when a new pair was loaded,
    /// `Ok(false)` when nothing changed (or there are no files). A pair
    /// that does not go together (read while the files were being
    /// replaced, or broken) is an error and the old pair stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((cert_path, key_path)) = &self.files else {
            return Ok(false);
        };
        let (cert, key) = (read(cert_path)?, read(key_path)?);
        {
            let now = self.current.read();
            if now.pem.0 == cert && now.pem.1 == key {
                return Ok(false);
            }
        }
        let loaded = certified(&cert, &key)?;
        *self.current.write() = loaded;
        Ok(true)
    }

    /// Calls [`ServerCert::reload`] every `every` until `stop`, logging
    /// what it finds. A failure is logged once until the files are good again.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut failing = false;
        while stop
            .run_until_cancelled(tokio::time::sleep(every))
            .await
            .is_some()
        {
            match self.reload() {
                Ok(true) => {
                    failing = false;
                    let ends = chrono::DateTime::from_timestamp(self.not_after(), 0).unwrap_or_default();
                    tracing::info!(%ends, "loaded the renewed server certificate");
                }
                Ok(false) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("failed to reload the server certificate, keeping the one in use: {e}");
                }
                Err(_) => {}
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().key))
    }
}

/// The server side: our certificate, TLS 1.3 only, client certificates
/// verified against `ca_pem` when offered.
pub fn server_config(ca_pem: &str, cert: Arc<ServerCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
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
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The REST port's side: our certificate, TLS 1.3 only, HTTP/1.1, no client
/// certificates (probes and scrapers have none; the JSON views take the
/// Login/Password, which TLS now keeps out of sight).
pub fn rest_config(cert: Arc<ServerCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_cert_resolver(cert);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use backer_proto::ca::Ca;

    fn serial_in_use(cert: &ServerCert) -> Vec<u8> {
        let key = cert.current.read().key.clone();
        let (_, c) = x509_parser::parse_x509_certificate(key.end_entity_cert().unwrap()).unwrap();
        c.raw_serial().to_vec()
    }

    #[test]
    fn a_renewed_certificate_is_picked_up_from_its_files() {
        let ca = Ca::create("test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("server.pem"), dir.path().join("server-key.pem"));
        let first = ca.issue_server(&["backer-server".into()]).unwrap();
        let first_key = first.key_pem.clone().unwrap();
        std::fs::write(&cert_path, &first.cert_pem).unwrap();
        std::fs::write(&key_path, &first_key).unwrap();
        let cert = ServerCert::new(
            &first.cert_pem,
            &first_key,
            Some((cert_path.clone(), key_path.clone())),
        )
        .unwrap();
        assert_eq!(serial_in_use(&cert), first.serial);
        assert!(!cert.reload().unwrap(), "nothing changed");

        // Half-replaced (the certificate new, the key old): refused, the old pair stays.
        let second = ca
            .issue_server(&["backer-server".into(), "198.18.0.1".into()])
            .unwrap();
        std::fs::write(&cert_path, &second.cert_pem).unwrap();
        let e = cert.reload().unwrap_err();
        assert!(e.to_string().contains("do not go together"), "{e}");
        assert_eq!(serial_in_use(&cert), first.serial);

        std::fs::write(&key_path, second.key_pem.unwrap()).unwrap();
        assert!(cert.reload().unwrap());
        assert_eq!(serial_in_use(&cert), second.serial);
        assert_eq!(cert.not_after(), second.not_after);

        // A file gone: an error, the pair in use stays.
        std::fs::remove_file(&key_path).unwrap();
        assert!(cert.reload().is_err());
        assert_eq!(serial_in_use(&cert), second.serial);
    }
}
