//! The server's own state, on its disk: the CA, its certificate, the
//! registry of clients (enrolment tokens, the serial of each client's current
//! certificate, revocations) and the record of admin certificates. Written
//! atomically (temporary file, rename).

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

/// An admin certificate `backer-server admin-cert` issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminCert {
    pub name: String,
    /// Hex serial.
    pub serial: String,
    pub issued: i64,
    pub not_after: i64,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked: Option<i64>,
}

/// Every admin certificate issued, so one can be revoked before it expires.
/// Kept in its own file, which both the server and `backer-server
/// admin-cert` (another process, on the same host) write under a lock.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminCerts {
    pub certs: Vec<AdminCert>,
}

/// Records of certificates that expired this long ago are dropped: TLS
/// refuses them anyway.
const ADMIN_RECORD_KEEP_SECS: i64 = 30 * 86_400;

/// Why an admin certificate is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AdminRefusal {
    #[error(
        "the admin certificate of {0} was revoked; an admin can issue a new one with \
         `backer-server admin-cert --name {0}` on the server host"
    )]
    Revoked(String),
    #[error(
        "this admin certificate of {0} is not in the server's record of admin certificates \
         (it was issued before they were recorded, or not by this server's `admin-cert`); \
         issue a new one with `backer-server admin-cert --name {0}` on the server host"
    )]
    Unrecorded(String),
    #[error("admin certificates are refused until the record of them is readable: {0}")]
    Unreadable(String),
}

impl AdminCerts {
    pub fn record(&mut self, name: &str, serial: &[u8], not_after: i64, now: i64) {
        self.certs.push(AdminCert {
            name: name.to_string(),
            serial: hex::encode(serial),
            issued: now,
            not_after,
            revoked: None,
        });
    }

    /// Revokes every certificate of `name` still in force: how many.
    pub fn revoke(&mut self, name: &str, now: i64) -> usize {
        let mut n = 0;
        for c in self
            .certs
            .iter_mut()
            .filter(|c| c.name == name && c.revoked.is_none())
        {
            c.revoked = Some(now);
            n += 1;
        }
        n
    }

    /// May this certificate (verified by TLS against the CA) act as admin `name`?
    pub fn check(&self, name: &str, serial: &[u8]) -> Result<(), AdminRefusal> {
        let serial = hex::encode(serial);
        match self.certs.iter().find(|c| c.serial == serial && c.name == name) {
            Some(c) if c.revoked.is_some() => Err(AdminRefusal::Revoked(name.into())),
            Some(_) => Ok(()),
            None => Err(AdminRefusal::Unrecorded(name.into())),
        }
    }

    fn prune(&mut self, now: i64) {
        self.certs.retain(|c| c.not_after + ADMIN_RECORD_KEEP_SECS > now);
    }
}

/// The record of admin certificates as the running server sees it: read
/// again whenever the file changed, so `backer-server admin-cert` (issue or
/// revoke) takes effect at the next call without a restart.
#[derive(Debug)]
pub struct AdminCertFile {
    state: StateDir,
    cached: parking_lot::Mutex<Option<(Option<FileStamp>, AdminCerts)>>,
}

/// What tells one version of a file from the next: every write is a new
/// file renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> Result<Option<FileStamp>, StateError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(FileStamp {
            inode: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

impl AdminCertFile {
    pub fn new(state: StateDir) -> AdminCertFile {
        AdminCertFile {
            state,
            cached: parking_lot::Mutex::new(None),
        }
    }

    /// The record now.
    pub fn current(&self) -> Result<AdminCerts, StateError> {
        let mut cached = self.cached.lock();
        let now = stamp(&self.state.admin_certs_path())?;
        if let Some((seen, certs)) = cached.as_ref()
            && *seen == now
        {
            return Ok(certs.clone());
        }
        let certs = self.state.load_admin_certs()?;
        *cached = Some((now, certs.clone()));
        Ok(certs)
    }

    /// [`AdminCerts::check`] against the record now. An unreadable record
    /// refuses every admin certificate: failing open would undo revocations.
    pub fn check(&self, name: &str, serial: &[u8]) -> Result<(), AdminRefusal> {
        let certs = self.current().map_err(|e| {
            tracing::error!("failed to read the record of admin certificates: {e}");
            AdminRefusal::Unreadable(e.to_string())
        })?;
        certs.check(name, serial)
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

    pub fn admin_certs_path(&self) -> PathBuf {
        self.path("admin-certs.json")
    }

    pub fn load_admin_certs(&self) -> Result<AdminCerts, StateError> {
        let p = self.admin_certs_path();
        let raw = match std::fs::read(&p) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AdminCerts::default()),
            Err(e) => return Err(io("read", &p)(e)),
        };
        serde_json::from_slice(&raw).map_err(|e| StateError::Damaged {
            path: p,
            detail: e.to_string(),
        })
    }

    /// Changes the record of admin certificates under an exclusive lock, so
    /// the server and `backer-server admin-cert` never lose each other's
    /// writes.
    pub fn update_admin_certs<R>(
        &self,
        now: i64,
        f: impl FnOnce(&mut AdminCerts) -> R,
    ) -> Result<R, StateError> {
        let lock_path = self.path("admin-certs.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        // Released when `lock` is dropped, after the rename.
        lock.lock().map_err(io("lock", &lock_path))?;
        let mut certs = self.load_admin_certs()?;
        let r = f(&mut certs);
        certs.prune(now);
        let data = serde_json::to_vec_pretty(&certs).map_err(|e| StateError::Damaged {
            path: self.admin_certs_path(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.admin_certs_path(), &data, false)?;
        Ok(r)
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
    fn admin_certificates_are_recorded_revoked_and_pruned() {
        let mut a = AdminCerts::default();
        a.record("ops", b"s1", 1000, 0);
        a.record("ops", b"s2", 1000, 0);
        a.record("dev", b"s3", 1000, 0);
        assert_eq!(a.check("ops", b"s1"), Ok(()));
        assert_eq!(a.check("ops", b"s9"), Err(AdminRefusal::Unrecorded("ops".into())));
        assert_eq!(
            a.check("dev", b"s1"),
            Err(AdminRefusal::Unrecorded("dev".into())),
            "a serial counts only under the name it was issued to"
        );
        assert_eq!(a.revoke("ops", 10), 2, "every certificate of the name");
        assert_eq!(a.revoke("ops", 11), 0, "once");
        assert_eq!(a.check("ops", b"s2"), Err(AdminRefusal::Revoked("ops".into())));
        assert_eq!(a.check("dev", b"s3"), Ok(()), "others keep working");
        a.prune(1000 + ADMIN_RECORD_KEEP_SECS - 1);
        assert_eq!(a.certs.len(), 3);
        a.prune(1000 + ADMIN_RECORD_KEEP_SECS);
        assert!(a.certs.is_empty());
    }

    #[test]
    fn the_admin_record_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        let file = AdminCertFile::new(state.clone());
        assert_eq!(
            file.check("ops", b"s1"),
            Err(AdminRefusal::Unrecorded("ops".into()))
        );
        state
            .update_admin_certs(0, |a| a.record("ops", b"s1", i64::MAX / 2, 0))
            .unwrap();
        assert_eq!(file.check("ops", b"s1"), Ok(()));
        state.update_admin_certs(0, |a| a.revoke("ops", 1)).unwrap();
        assert_eq!(file.check("ops", b"s1"), Err(AdminRefusal::Revoked("ops".into())));
        std::fs::write(state.admin_certs_path(), b"{ damaged").unwrap();
        assert!(matches!(
            file.check("ops", b"s1"),
            Err(AdminRefusal::Unreadable(_))
        ));
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
