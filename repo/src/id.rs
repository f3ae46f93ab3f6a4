//! Typed 32-byte identifiers. Blob ids are keyed BLAKE3 of the plaintext (so the
//! bucket does not reveal which well-known files it holds); ids of stored
//! objects (packs, index files, snapshots, keys) are plain BLAKE3 of their stored
//! bytes, so anyone can verify a download without the key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        /// Hex in human-readable formats (JSON), 32 raw bytes in binary ones.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(d).map($name)
                }
            }
        }

        impl $name {
            /// From 32 raw bytes, as the wire carries ids.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(b).ok().map($name)
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 8 hex characters, as shown in listings.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| Error::Invalid(format!("{s:?} is not a 64-character hex id")))?;
                Ok($name(out))
            }
        }
    };
}

id_type!(
    /// A chunk of file data or a tree, named by the keyed hash of its plaintext.
    BlobId
);
id_type!(
    /// A pack file, named by the hash of its stored bytes.
    PackId
);
id_type!(
    /// An index file, named by the hash of its stored bytes.
    IndexId
);
id_type!(
    /// A snapshot, named by the hash of its stored bytes.
    SnapshotId
);
id_type!(
    /// A key file, named by the hash of its stored bytes.
    KeyId
);

/// Plain BLAKE3 of stored bytes: the name of a stored object.
pub(crate) fn storage_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_in_json_and_bytes_in_postcard() {
        let id = BlobId([7u8; 32]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "07".repeat(32)));
        assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), id);
        let bin = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<BlobId>(&bin).unwrap(), id);
        assert!("zz".parse::<BlobId>().is_err());
    }
}
