//! The checks behind Backer's fuzz targets, one public function per target
//! (`fuzz_targets/<name>.rs` only calls it), and what they share: the fixed
//! repository key they seal and open with, and how an input's first byte
//! picks the layer of a stored object it is fed to.
//!
//! Every check asserts that nothing panics, and where a value decodes, that
//! encoding it and decoding again gives it back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod server;
pub mod storage;

use std::sync::OnceLock;

use backer_repo::crypto::{KeyFile, MasterKey};
use backer_repo::repository::{Kind, seal_object};

/// The password of `fixtures/key.json`, the key file of the seed repository.
pub const PASSWORD: &[u8] = b"fuzz";

/// A cheap key file (argon2id at 8 KiB, one pass) made by `src/bin/seeds.rs`
/// with the repository the seeds come from, so the seeds' sealed objects
/// open and a crash input reproduces on any machine.
const KEY_FILE: &str = include_str!("../fixtures/key.json");
/// That repository's sealed `config`, to check [`CONFIG_AAD`] still matches.
const CONFIG: &[u8] = include_bytes!("../fixtures/config");

/// Associated data of the sealed layers, as docs/FORMAT.md gives them. The
/// engine keeps them private; [`key`] checks them against it at start, so a
/// format change fails loudly instead of leaving the targets testing only
/// the authentication failure.
pub const PACK_HEADER_AAD: &[u8] = b"backer pack header v1";
pub const CONFIG_AAD: &[u8] = b"backer config v1";

pub fn kind_aad(kind: Kind) -> &'static [u8] {
    match kind {
        Kind::Index => b"backer index v1",
        Kind::Snapshot => b"backer snapshot v1",
        Kind::Lock => b"backer lock v1",
    }
}

/// The master key of the seed repository.
pub fn key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let kf: KeyFile = serde_json::from_str(KEY_FILE)
            .expect("fuzz/fixtures/key.json is not a key file: run `fuzz/run --seeds`");
        let key = kf
            .unwrap_with(PASSWORD)
            .expect("fuzz/fixtures/key.json does not unwrap")
            .expect("the fuzz password does not open fuzz/fixtures/key.json");
        check_aads(&key);
        key
    })
}

fn check_aads(key: &MasterKey) {
    let pack = backer_repo::pack::PackWriter::default()
        .finish(&key.data)
        .unwrap();
    let bytes = pack.bytes().unwrap();
    let header = &bytes[..bytes.len() - 4];
    key.data
        .open(PACK_HEADER_AAD, header, &|| "pack header".into())
        .expect("PACK_HEADER_AAD no longer matches repo/src/pack.rs");
    for kind in [Kind::Index, Kind::Snapshot, Kind::Lock] {
        let (_, sealed) = seal_object(key, kind, &0u8).unwrap();
        key.data
            .open(kind_aad(kind), &sealed, &|| "object".into())
            .unwrap_or_else(|_| panic!("kind_aad({kind:?}) no longer matches repo/src/repository.rs"));
    }
    key.data
        .open(CONFIG_AAD, CONFIG, &|| "config".into())
        .expect("CONFIG_AAD no longer matches repo/src/repository.rs, or fixtures/config is stale");
}

/// Where an input enters a stored object, chosen by its first byte:
/// the stored bytes as they are (so the authentication and the name check
/// see them), or the bytes under the encryption (compressed, or plain for
/// objects that are compressed), sealed here with [`key`] so the decoders
/// behind the authentication see hostile input too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Stored,
    Compressed,
    Plain,
}

impl Layer {
    pub fn split(data: &[u8]) -> Option<(Layer, &[u8])> {
        let (&first, rest) = data.split_first()?;
        let layer = match first % 3 {
            0 => Layer::Stored,
            1 => Layer::Compressed,
            _ => Layer::Plain,
        };
        Some((layer, rest))
    }

    pub fn byte(self) -> u8 {
        match self {
            Layer::Stored => 0,
            Layer::Compressed => 1,
            Layer::Plain => 2,
        }
    }
}

/// `label` and `der` as PEM, lines of 64 characters.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block of `pem`.
pub fn der_of(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, p)| p.contents)
}
