//! Keys and authenticated encryption.
//!
//! A repository has one master secret, generated at `init`. It is stored only
//! wrapped, in `keys/<id>` files, each by a key derived from one password with
//! argon2id, so several passwords can open the same repository.
//!
//! The master secret splits in two on purpose: [`ChunkKeys`] (content-id key and
//! chunker seed) is what whoever cuts and names chunks needs, and [`DataKey`]
//! (AES-256-GCM) is what whoever stores them needs. A backup agent can be given
//! the first without the second.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Bytes added to every sealed message: the nonce in front, the tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// Encrypts and authenticates everything the repository stores.
pub struct DataKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| Error::Invalid("data key has the wrong length".into()))?;
        Ok(DataKey {
            key: LessSafeKey::new(unbound),
        })
    }

    /// `nonce || ciphertext || tag`. The nonce is random: at 2^32 messages per
    /// key the collision risk stays below 2^-32, far beyond a repository's life.
    /// `aad` binds the message to where it belongs (a blob id, an object kind),
    /// so a valid message moved elsewhere fails to open.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// [`DataKey::seal`] appending to `out`, encrypting where the bytes land:
    /// a pack is built without copying each blob more than once.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        // Sealing only fails for messages beyond GCM's 64 GiB limit; ours are
        // at most a pack's size.
        #[allow(clippy::expect_used)]
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start..],
            )
            .expect("AES-GCM seal of a message under 64 GiB cannot fail");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens what [`DataKey::seal`] produced with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(what()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut nonce_arr = [0u8; NONCE_LEN];
        nonce_arr.copy_from_slice(nonce);
        let mut buf = body.to_vec();
        let len = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce_arr), Aad::from(aad), &mut buf)
            .map_err(|_| Error::corrupt(what()))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// What cutting and naming chunks needs: the key of the content-id hash and the
/// seed of the chunker's gear table (so chunk boundaries do not fingerprint
/// known files either).
#[derive(Clone)]
pub struct ChunkKeys {
    pub(crate) id_key: [u8; 32],
    pub(crate) chunker_seed: u64,
}

impl ChunkKeys {
    /// The id key and chunker seed, for a server to hand to its agents: they
    /// cut and name chunks exactly as the repository does, and can open nothing.
    pub fn to_parts(&self) -> ([u8; 32], u64) {
        (self.id_key, self.chunker_seed)
    }

    pub fn from_parts(id_key: [u8; 32], chunker_seed: u64) -> ChunkKeys {
        ChunkKeys { id_key, chunker_seed }
    }
}

impl std::fmt::Debug for ChunkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKeys(..)")
    }
}

/// The repository's master secret, unwrapped.
#[derive(Debug)]
pub struct MasterKey {
    pub data: DataKey,
    pub chunk: ChunkKeys,
    secret: Zeroizing<[u8; MASTER_LEN]>,
}

const MASTER_LEN: usize = 72;

impl MasterKey {
    pub fn generate() -> Result<Self> {
        let mut secret = Zeroizing::new([0u8; MASTER_LEN]);
        random_fill(secret.as_mut());
        Self::from_secret(secret)
    }

    fn from_secret(secret: Zeroizing<[u8; MASTER_LEN]>) -> Result<Self> {
        let data = DataKey::from_bytes(&secret[..32])?;
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&secret[32..64]);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&secret[64..72]);
        Ok(MasterKey {
            data,
            chunk: ChunkKeys {
                id_key,
                chunker_seed: u64::from_le_bytes(seed),
            },
            secret,
        })
    }

    /// Wraps the master secret under `password` for a new `keys/` file.
    pub fn wrap(&self, password: &[u8], params: KdfParams) -> Result<KeyFile> {
        let mut salt = [0u8; 16];
        random_fill(&mut salt);
        let kek = params.derive(password, &salt)?;
        let sealed = kek.seal(KEY_AAD, self.secret.as_ref());
        Ok(KeyFile {
            kdf: "argon2id".into(),
            params,
            salt: hex::encode(salt),
            sealed: hex::encode(sealed),
            created: chrono::Utc::now(),
            hostname: crate::snapshot::hostname(),
        })
    }
}

const KEY_AAD: &[u8] = b"backer key v1";

/// Argon2id cost. The defaults take about a quarter of a second here: slow for
/// a guesser, quick for a user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// Bounds on what a key file may ask of key derivation. Key files are read
/// before anything can be authenticated, so their parameters are untrusted:
/// unbounded, one planted in `keys/` made `open` fill gigabytes of memory
/// (`memory_kib`) or run for ever (`iterations`). The defaults sit far
/// below: 64 MiB, 3 passes, 1 lane.
const MAX_KDF_MEMORY_KIB: u32 = 1024 * 1024;
/// Memory times passes, in KiB: a few seconds of work at most.
const MAX_KDF_WORK_KIB: u64 = 4 * 1024 * 1024;
const MAX_KDF_PARALLELISM: u32 = 16;

impl KdfParams {
    /// Refuses parameters beyond the bounds above, before any work is done.
    pub fn check(&self) -> Result<()> {
        let work = u64::from(self.memory_kib) * u64::from(self.iterations);
        if self.memory_kib > MAX_KDF_MEMORY_KIB
            || work > MAX_KDF_WORK_KIB
            || self.parallelism > MAX_KDF_PARALLELISM
        {
            return Err(Error::Invalid(format!(
                "key derivation parameters are out of range ({} KiB, {} iterations, parallelism {}; \
                 at most 1 GiB, 4 GiB of memory times iterations, parallelism 16): \
                 the key file is corrupt or was not written by backer",
                self.memory_kib, self.iterations, self.parallelism
            )));
        }
        Ok(())
    }

    fn derive(&self, password: &[u8], salt: &[u8]) -> Result<DataKey> {
        self.check()?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::Invalid(format!("bad key derivation parameters: {e}")))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(password, salt, out.as_mut())
            .map_err(|e| Error::Invalid(format!("failed to derive a key from the password: {e}")))?;
        DataKey::from_bytes(out.as_ref())
    }
}

/// A `keys/<id>` file: the master secret wrapped by one password. JSON, so an
/// operator can see which KDF and which host created it without the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub kdf: String,
    pub params: KdfParams,
    pub salt: String,
    pub sealed: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
}

impl KeyFile {
    /// `Ok(None)` when the password does not open this key file.
    pub fn unwrap_with(&self, password: &[u8]) -> Result<Option<MasterKey>> {
        if self.kdf != "argon2id" {
            return Err(Error::Invalid(format!("unknown key derivation {:?}", self.kdf)));
        }
        let salt = hex::decode(&self.salt).map_err(|_| Error::corrupt("key file salt"))?;
        let sealed = hex::decode(&self.sealed).map_err(|_| Error::corrupt("key file body"))?;
        let kek = self.params.derive(password, &salt)?;
        match kek.open(KEY_AAD, &sealed, &|| "key file".into()) {
            Ok(plain) => {
                let mut secret = Zeroizing::new([0u8; MASTER_LEN]);
                if plain.len() != MASTER_LEN {
                    return Err(Error::corrupt("key file length"));
                }
                secret.copy_from_slice(&plain);
                let mut plain = plain;
                zeroize::Zeroize::zeroize(&mut plain);
                MasterKey::from_secret(secret).map(Some)
            }
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub fn random_fill(buf: &mut [u8]) {
    // The system RNG failing leaves no safe way to continue; aws-lc aborts
    // internally in that case, so this error path is unreachable in practice.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(buf).expect("system random number generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let mk = MasterKey::generate().unwrap();
        let sealed = mk.data.seal(b"a", b"hello");
        assert_eq!(mk.data.open(b"a", &sealed, &|| "x".into()).unwrap(), b"hello");
        assert!(mk.data.open(b"b", &sealed, &|| "x".into()).is_err());
        let mut flipped = sealed.clone();
        flipped[15] ^= 1;
        assert!(mk.data.open(b"a", &flipped, &|| "x".into()).is_err());
    }

    #[test]
    fn hostile_kdf_parameters_are_refused_before_any_work() {
        let kf = MasterKey::generate().unwrap().wrap(b"pw", cheap()).unwrap();
        for params in [
            KdfParams {
                memory_kib: 8 * 1024 * 1024,
                ..cheap()
            },
            KdfParams {
                iterations: u32::MAX,
                ..cheap()
            },
            KdfParams {
                parallelism: 0xFF_FFFF,
                ..cheap()
            },
        ] {
            let hostile = KeyFile { params, ..kf.clone() };
            let err = hostile.unwrap_with(b"pw").unwrap_err().to_string();
            assert!(err.contains("out of range"), "{err}");
        }
        assert!(KdfParams::default().check().is_ok());
    }

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let mk = MasterKey::generate().unwrap();
        let kf = mk.wrap(b"pw", cheap()).unwrap();
        let back = kf.unwrap_with(b"pw").unwrap().unwrap();
        assert_eq!(back.chunk.id_key, mk.chunk.id_key);
        assert!(kf.unwrap_with(b"wrong").unwrap().is_none());
    }
}
