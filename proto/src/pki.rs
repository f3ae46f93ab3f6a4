//! Identity conventions both ends of the protocol share: how a certificate
//! names a client or an admin, how a host makes its key and CSR, and how
//! key material is written to disk.

use std::path::Path;

/// DNS SAN of an agent's certificate: `<name>.client.backer`.
pub const CLIENT_SUFFIX: &str = ".client.backer";
/// The Kubernetes signer name of node agents' certificate requests: the
/// agent files for it, the operator approves for it.
pub const AGENT_SIGNER: &str = "backer.dev/agent";
/// DNS SAN of an admin's certificate: `<name>.admin.backer`.
pub const ADMIN_SUFFIX: &str = ".admin.backer";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to {what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("unreadable peer certificate: {0}")]
    Unreadable(String),
    #[error("the certificate names no Backer client or admin")]
    NoIdentity,
}

/// Who a verified certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    Client(String),
    Admin(String),
}

/// Reads the identity, raw serial and expiry (Unix seconds) from a DER
/// certificate that TLS has already verified against the CA.
pub fn identity_of(der: &[u8]) -> Result<(PeerIdentity, Vec<u8>, i64), PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Unreadable(e.to_string()))?;
    let serial = cert.tbs_certificate.raw_serial().to_vec();
    let not_after = cert.validity().not_after.timestamp();
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let mut found = None;
    for gn in sans {
        if let x509_parser::extensions::GeneralName::DNSName(d) = gn {
            if let Some(n) = d.strip_suffix(CLIENT_SUFFIX) {
                found = Some(PeerIdentity::Client(n.to_string()));
            } else if let Some(n) = d.strip_suffix(ADMIN_SUFFIX) {
                found = Some(PeerIdentity::Admin(n.to_string()));
            }
        }
    }
    Ok((found.ok_or(PkiError::NoIdentity)?, serial, not_after))
}

/// A new key and a CSR for it, made on the host that will use them: the key
/// never leaves it. Returns (key PEM, CSR PEM).
pub fn new_csr() -> Result<(String, String), PkiError> {
    new_csr_with(Vec::new())
}

/// A key and a CSR that names the client identity asked for, so a signer
/// that knows who is asking can check the request matches (the Kubernetes
/// path: the operator compares it with the node of the requesting pod).
pub fn new_client_csr(client: &str) -> Result<(String, String), PkiError> {
    new_csr_with(vec![format!("{client}{CLIENT_SUFFIX}")])
}

/// The client a CSR asks to be (its one DNS name `<client>.client.backer`).
pub fn requested_client(csr_pem: &str) -> Option<String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).ok()?;
    match csr.params.subject_alt_names.as_slice() {
        [rcgen::SanType::DnsName(n)] => n.as_str().strip_suffix(CLIENT_SUFFIX).map(str::to_string),
        _ => None,
    }
}

fn new_csr_with(names: Vec<String>) -> Result<(String, String), PkiError> {
    let rc = |what| move |source| PkiError::Rcgen { what, source };
    let key = rcgen::KeyPair::generate().map_err(rc("generate a key"))?;
    let params = rcgen::CertificateParams::new(names).map_err(rc("prepare a request"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(rc("write a certificate request"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(rc("encode a certificate request"))?,
    ))
}

/// Writes `data` through a temporary file and a rename, so a crash never
/// leaves half a file; mode 0600 when `secret`.
pub fn write_atomic(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
