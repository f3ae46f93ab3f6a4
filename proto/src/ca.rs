//! Where certificates are minted: the server's own CA (standalone mode; the
//! operator owns it in Kubernetes), the server's TLS certificate, client
//! certificates signed from the host's CSR (the key never leaves the host),
//! and admin certificates. Every certificate has an explicit lifetime.
//!
//! Identities are DNS SANs: `<name>.client.backer` for agents,
//! `<name>.admin.backer` for administrators. The serial of each client's
//! current certificate is recorded, so a revoked or superseded certificate is
//! refused even while it is cryptographically valid.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub use crate::pki::{ADMIN_SUFFIX, CLIENT_SUFFIX, PeerIdentity as Identity, identity_of, new_csr};

/// Lifetimes.
pub const CA_DAYS: i64 = 3650;
pub const SERVER_DAYS: i64 = 365;
pub const CLIENT_DAYS: i64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("failed to {what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

/// A certificate and (when we made the key) its key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Option<String>,
    pub serial: Vec<u8>,
    pub not_after: i64,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(..)")
    }
}

fn random_serial() -> (SerialNumber, Vec<u8>) {
    let mut b = [0u8; 16];
    // A positive serial: top bit clear.
    aws_lc_rs::rand::fill(&mut b).ok();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    (SerialNumber::from_slice(&b), b.to_vec())
}

fn validity(params: &mut CertificateParams, days: i64) -> i64 {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that run behind.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
    params.not_after.unix_timestamp()
}

impl Ca {
    /// A new CA.
    pub fn create(name: &str) -> Result<Ca, CaError> {
        let key = KeyPair::generate().map_err(rc("generate the CA key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(rc("prepare the CA certificate"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial().0);
        validity(&mut params, CA_DAYS);
        let cert = params.self_signed(&key).map_err(rc("sign the CA certificate"))?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA saved with [`Ca::key_pem`] and its certificate.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("read the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(rc("read the CA certificate"))?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The server's certificate: its external name, plus localhost for local tools.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(rc("generate the server key"))?;
        let mut sans: Vec<String> = names.to_vec();
        sans.push("localhost".into());
        let mut params = CertificateParams::new(sans).map_err(rc("prepare the server certificate"))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (serial, raw) = random_serial();
        params.serial_number = Some(serial);
        let not_after = validity(&mut params, SERVER_DAYS);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("sign the server certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            serial: raw,
            not_after,
        })
    }

    /// A client certificate for `name` from the host's CSR. Only the CSR's
    /// public key is used: the name comes from the server, not the request.
    pub fn sign_client(&self, name: &str, csr_pem: &str) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Invalid(format!("the certificate signing request is not valid: {e}")))?;
        self.sign_identity(&format!("{name}{CLIENT_SUFFIX}"), &csr.public_key, CLIENT_DAYS)
    }

    /// An admin certificate and key (for the `backer` CLI).
    pub fn issue_admin(&self, name: &str, days: i64) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(rc("generate the admin key"))?;
        let mut issued = self.sign_identity(&format!("{name}{ADMIN_SUFFIX}"), &key, days)?;
        issued.key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    /// An admin certificate valid from `not_before` to `not_after`: tests use
    /// it for certificates that expired or are not valid yet.
    pub fn issue_admin_between(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(rc("generate the admin key"))?;
        let mut issued =
            self.sign_identity_between(&format!("{name}{ADMIN_SUFFIX}"), &key, not_before, not_after)?;
        issued.key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    fn sign_identity(
        &self,
        san: &str,
        public_key: &impl rcgen::PublicKeyData,
        days: i64,
    ) -> Result<Issued, CaError> {
        let now = OffsetDateTime::now_utc();
        // A little slack for clocks that run behind.
        self.sign_identity_between(
            san,
            public_key,
            now - Duration::minutes(5),
            now + Duration::days(days),
        )
    }

    fn sign_identity_between(
        &self,
        san: &str,
        public_key: &impl rcgen::PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let mut params =
            CertificateParams::new(vec![san.to_string()]).map_err(rc("prepare a certificate"))?;
        params.distinguished_name.push(DnType::CommonName, san);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (serial, raw) = random_serial();
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rc("sign a certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: None,
            serial: raw,
            not_after: not_after.unix_timestamp(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn mint_and_read_identities() {
        let ca = Ca::create("test").unwrap();
        let (key_pem, csr) = new_csr().unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let client = ca.sign_client("web-1", &csr).unwrap();
        assert!(client.key_pem.is_none(), "the server never sees the client's key");
        let (id, serial, not_after) = identity_of(&der_of(&client.cert_pem)).unwrap();
        assert_eq!(id, Identity::Client("web-1".into()));
        assert_eq!(serial, client.serial);
        assert!(not_after > time::OffsetDateTime::now_utc().unix_timestamp() + 80 * 86_400);
        let admin = ca.issue_admin("ops", 30).unwrap();
        assert_eq!(
            identity_of(&der_of(&admin.cert_pem)).unwrap().0,
            Identity::Admin("ops".into())
        );
        // A server certificate names no client or admin.
        let server = ca.issue_server(&["backup.example.test".into()]).unwrap();
        assert!(identity_of(&der_of(&server.cert_pem)).is_err());
        // Reloading the CA keeps signing under the same certificate.
        let again = Ca::load(&ca.cert_pem, ca.key_pem()).unwrap();
        let c2 = again.sign_client("web-2", &new_csr().unwrap().1).unwrap();
        assert_ne!(c2.serial, client.serial);
        assert!(ca.sign_client("x", "not a csr").is_err());
    }

    #[test]
    fn a_server_certificate_names_ip_addresses_as_such() {
        let ca = Ca::create("test").unwrap();
        let names = vec!["backer-server".to_string(), "198.18.0.1".to_string()];
        let server = ca.issue_server(&names).unwrap();
        let (got, _) = super::describe(&server.cert_pem).unwrap();
        for n in &names {
            assert!(got.contains(n), "{n} missing in {got:?}");
        }
        assert!(got.contains(&"127.0.0.1".to_string()), "{got:?}");
    }
}

/// The names (DNS names and IP addresses) a certificate (PEM) carries and
/// when it ends (unix seconds).
pub fn describe(cert_pem: &str) -> Option<(Vec<String>, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|e| {
            e.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    // An IP name (an external host may reach the server by
                    // its address) as its usual text, so a check of the
                    // names finds it.
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((names, cert.validity().not_after.timestamp()))
}
