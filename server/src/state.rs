//! The server's own state, on its disk: the CA, its certificate, and the
//! registry of clients (enrolment tokens, the serial of each client's current
//! certificate, revocations). Written atomically (temporary file, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use backer_proto::ca::{Ca, CaError};

/// Enrolment tokens are valid this long.
pub const TOKEN_SECS: i64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {detail}")]
    Damaged { path: PathBuf, detail: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { what, path, source }
}

/// [`backer_proto::pki::write_atomic`], with the path in the error.
pub fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), StateError> {
    backer_proto::pki::write_atomic(path, data, secret).map_err(io("write", path))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientState {
    Pending,
    Enrolled,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRecord {
    pub state: ClientState,
    /// BLAKE3 of the pending enrolment token (the token itself is never stored).
    pub token_hash: Option<String>,
    pub token_expires: Option<i64>,
    /// Hex serial of the one certificate this client may use now.
    pub serial: Option<String>,
    pub cert_not_after: Option<i64>,
    pub agent_version: Option<String>,
    /// After a renewal, the certificate it replaced stays good until this
    /// time, so work the agent started with it can finish: (hex serial, until).
    #[serde(default)]
    pub previous: Option<(String, i64)>,
}

/// How long a renewed certificate keeps working for the work already under
/// way with it (at most until it would have expired anyway).
pub const RENEWAL_OVERLAP_SECS: i64 = 7 * 86_400;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    pub clients: BTreeMap<String, ClientRecord>,
}

/// Why a caller is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("client {0} is not known to this server")]
    Unknown(String),
    #[error("client {0} has been revoked")]
    Revoked(String),
    #[error("client {0} has not finished enrolling")]
    NotEnrolled(String),
    #[error("this certificate of client {0} was replaced or revoked; re-enrol the host")]
    OldCertificate(String),
    #[error("the enrolment token is unknown, used or expired; ask for a new one with `backer clients add`")]
    BadToken,
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl Registry {
    /// A fresh token for `name`: a new client, or (with `reenroll`) one whose
    /// current certificate is revoked at once, for a host rebuilt after a loss.
    pub fn add(&mut self, name: &str, reenroll: bool, now: i64) -> Result<String, String> {
        match self.clients.get(name) {
            Some(r) if r.state == ClientState::Enrolled && !reenroll => {
                return Err(format!(
                    "client {name} is already enrolled; use `backer clients reenroll {name}` to issue a new token"
                ));
            }
            None if reenroll => return Err(format!("client {name} does not exist; add it first")),
            _ => {}
        }
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| "the system random generator failed".to_string())?;
        let token = format!("bkr1-{}", hex::encode(secret));
        self.clients.insert(
            name.to_string(),
            ClientRecord {
                state: ClientState::Pending,
                token_hash: Some(token_hash(&token)),
                token_expires: Some(now + TOKEN_SECS),
                serial: None,
                cert_not_after: None,
                agent_version: None,
                previous: None,
            },
        );
        Ok(token)
    }

    /// Consumes a token: the client it was issued for.
    pub fn redeem(&mut self, token: &str, now: i64) -> Result<String, Refusal> {
        let h = token_hash(token);
        let name = self
            .clients
            .iter()
            .find(|(_, r)| r.state == ClientState::Pending && r.token_hash.as_deref() == Some(h.as_str()))
            .map(|(n, _)| n.clone())
            .ok_or(Refusal::BadToken)?;
        let rec = self.clients.get_mut(&name).ok_or(Refusal::BadToken)?;
        if rec.token_expires.unwrap_or(0) < now {
            return Err(Refusal::BadToken);
        }
        rec.token_hash = None;
        rec.token_expires = None;
        Ok(name)
    }

    /// Records the one certificate client `name` may use from now on. An
    /// enrolment (`version` given) ends every earlier certificate at once.
    pub fn set_certificate(&mut self, name: &str, serial: &[u8], not_after: i64, version: Option<String>) {
        if let Some(r) = self.clients.get_mut(name) {
            r.state = ClientState::Enrolled;
            r.previous = None;
            r.serial = Some(hex::encode(serial));
            r.cert_not_after = Some(not_after);
            if version.is_some() {
                r.agent_version = version;
            }
        }
    }

    /// A renewal by the certificate's own holder: the new certificate is the
    /// current one, the old one keeps working for a while (see
    /// [`RENEWAL_OVERLAP_SECS`]) so a backup running on it is not cut off.
    pub fn renew_certificate(&mut self, name: &str, serial: &[u8], not_after: i64, now: i64) {
        if let Some(r) = self.clients.get_mut(name) {
            let old = r
                .serial
                .take()
                .map(|s| (s, r.cert_not_after.unwrap_or(now).min(now + RENEWAL_OVERLAP_SECS)));
            r.serial = Some(hex::encode(serial));
            r.cert_not_after = Some(not_after);
            r.previous = old;
        }
    }

    pub fn revoke(&mut self, name: &str) -> bool {
        match self.clients.get_mut(name) {
            Some(r) => {
                r.state = ClientState::Revoked;
                r.previous = None;
                r.serial = None;
                r.token_hash = None;
                true
            }
            None => false,
        }
    }

    /// May this certificate act as client `name` now?
    pub fn check(&self, name: &str, serial: &[u8]) -> Result<(), Refusal> {
        self.check_at(name, serial, chrono::Utc::now().timestamp())
    }

    pub fn check_at(&self, name: &str, serial: &[u8], now: i64) -> Result<(), Refusal> {
        let r = self
            .clients
            .get(name)
            .ok_or_else(|| Refusal::Unknown(name.into()))?;
        match r.state {
            ClientState::Revoked => Err(Refusal::Revoked(name.into())),
            ClientState::Pending => Err(Refusal::NotEnrolled(name.into())),
            ClientState::Enrolled if r.serial.as_deref() == Some(hex::encode(serial).as_str()) => Ok(()),
            ClientState::Enrolled => match &r.previous {
                Some((old, until)) if *old == hex::encode(serial) && now < *until => Ok(()),
                _ => Err(Refusal::OldCertificate(name.into())),
            },
        }
    }
}

/// The state directory's files.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
    /// Where the operator mounts the CA and the server's certificate (read
    /// only; in Kubernetes they live in a Secret, not on the server's disk).
    pub pki: Option<PathBuf>,
}

impl StateDir {
    pub fn new(dir: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
            pki: None,
        })
    }

    /// Reads the CA and the server's certificate from `pki` instead.
    pub fn with_pki(self, pki: Option<PathBuf>) -> StateDir {
        StateDir { pki, ..self }
    }

    /// A file of the operator's PKI directory, which must be there.
    pub fn pki_file(pki: &Path, name: &str) -> Result<String, StateError> {
        let p = pki.join(name);
        std::fs::read_to_string(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StateError::Damaged {
                path: p.clone(),
                detail:
                    "missing: the operator writes it into the backer-pki Secret; is that Secret mounted here?"
                        .into(),
            },
            _ => StateError::Io {
                what: "read",
                path: p.clone(),
                source: e,
            },
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA: the operator's when a PKI directory is given, else created on
    /// first start.
    pub fn ca(&self) -> Result<Ca, StateError> {
        if let Some(pki) = &self.pki {
            return Ok(Ca::load(
                &Self::pki_file(pki, "ca.pem")?,
                &Self::pki_file(pki, "ca-key.pem")?,
            )?);
        }
        let (cert, key) = (self.path("ca.pem"), self.path("ca-key.pem"));
        if cert.exists() && key.exists() {
            let c = std::fs::read_to_string(&cert).map_err(io("read", &cert))?;
            let k = std::fs::read_to_string(&key).map_err(io("read", &key))?;
            return Ok(Ca::load(&c, &k)?);
        }
        if cert.exists() != key.exists() {
            return Err(StateError::Damaged {
                path: self.dir.clone(),
                detail: "one of ca.pem and ca-key.pem is missing; restore both from backup rather than minting a new CA".into(),
            });
        }
        let ca = Ca::create("Backer")?;
        write_atomic(&key, ca.key_pem().as_bytes(), true)?;
        write_atomic(&cert, ca.cert_pem.as_bytes(), false)?;
        Ok(ca)
    }

    pub fn load_registry(&self) -> Result<Registry, StateError> {
        let p = self.path("clients.json");
        if !p.exists() {
            return Ok(Registry::default());
        }
        let raw = std::fs::read(&p).map_err(io("read", &p))?;
        serde_json::from_slice(&raw).map_err(|e| StateError::Damaged {
            path: p,
            detail: e.to_string(),
        })
    }

    pub fn save_registry(&self, r: &Registry) -> Result<(), StateError> {
        let data = serde_json::to_vec_pretty(r).map_err(|e| StateError::Damaged {
            path: self.path("clients.json"),
            detail: e.to_string(),
        })?;
        write_atomic(&self.path("clients.json"), &data, true)
    }

    pub fn write(&self, name: &str, data: &str, secret: bool) -> Result<PathBuf, StateError> {
        let p = self.path(name);
        write_atomic(&p, data.as_bytes(), secret)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_expire() {
        let mut r = Registry::default();
        let t = r.add("web-1", false, 1000).unwrap();
        assert_eq!(r.redeem("bkr1-wrong", 1000), Err(Refusal::BadToken));
        assert_eq!(r.redeem(&t, 1000).unwrap(), "web-1");
        assert_eq!(r.redeem(&t, 1000), Err(Refusal::BadToken), "single use");
        let t2 = r.add("web-2", false, 1000).unwrap();
        assert_eq!(
            r.redeem(&t2, 1000 + TOKEN_SECS + 1),
            Err(Refusal::BadToken),
            "expired"
        );
    }

    #[test]
    fn serials_revocation_and_reenrolment() {
        let mut r = Registry::default();
        let t = r.add("db", false, 0).unwrap();
        r.redeem(&t, 0).unwrap();
        assert_eq!(r.check("db", b"s1"), Err(Refusal::NotEnrolled("db".into())));
        r.set_certificate("db", b"s1", 99, None);
        assert_eq!(r.check("db", b"s1"), Ok(()));
        assert_eq!(r.check("db", b"s0"), Err(Refusal::OldCertificate("db".into())));
        assert_eq!(r.check("nobody", b"s1"), Err(Refusal::Unknown("nobody".into())));
        assert!(r.add("db", false, 0).is_err(), "enrolled clients need reenroll");
        let t = r.add("db", true, 0).unwrap();
        assert_eq!(
            r.check("db", b"s1"),
            Err(Refusal::NotEnrolled("db".into())),
            "old cert refused at once"
        );
        r.redeem(&t, 0).unwrap();
        r.set_certificate("db", b"s2", 99, None);
        assert!(r.revoke("db"));
        assert_eq!(r.check("db", b"s2"), Err(Refusal::Revoked("db".into())));
    }

    #[test]
    fn a_renewed_certificate_overlaps_its_successor_for_a_while() {
        let mut r = Registry::default();
        let t = r.add("db", false, 0).unwrap();
        r.redeem(&t, 0).unwrap();
        let week = RENEWAL_OVERLAP_SECS;
        r.set_certificate("db", b"s1", 90 * 86_400, Some("v".into()));
        r.renew_certificate("db", b"s2", 150 * 86_400, 60 * 86_400);
        let now = 60 * 86_400;
        assert_eq!(r.check_at("db", b"s2", now), Ok(()));
        assert_eq!(
            r.check_at("db", b"s1", now + week - 1),
            Ok(()),
            "work under way finishes"
        );
        assert_eq!(
            r.check_at("db", b"s1", now + week),
            Err(Refusal::OldCertificate("db".into())),
            "not for ever"
        );
        // Never past the old certificate's own end.
        r.renew_certificate("db", b"s3", 200 * 86_400, 149 * 86_400);
        assert_eq!(
            r.check_at("db", b"s1", 149 * 86_400),
            Err(Refusal::OldCertificate("db".into()))
        );
        assert_eq!(r.check_at("db", b"s2", 150 * 86_400 - 1), Ok(()));
        assert_eq!(
            r.check_at("db", b"s2", 150 * 86_400),
            Err(Refusal::OldCertificate("db".into()))
        );
        // Re-enrolment and revocation end the overlap at once.
        let t = r.add("db", true, 0).unwrap();
        r.redeem(&t, 0).unwrap();
        r.set_certificate("db", b"s4", 300 * 86_400, Some("v".into()));
        assert!(r.check_at("db", b"s3", 150 * 86_400).is_err());
        r.renew_certificate("db", b"s5", 300 * 86_400, 150 * 86_400);
        assert!(r.revoke("db"));
        assert!(r.check_at("db", b"s4", 150 * 86_400).is_err());
    }
}
