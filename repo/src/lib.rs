//! Backer's storage engine.
//!
//! Where things happen, one guess each:
//! - a chunk is cut, hashed and compressed: [`chunk`]
//! - a blob is encrypted, a key derived or wrapped: [`crypto`]
//! - blobs are gathered into packs: [`pack`], and stored by [`packer`]
//! - which pack holds a blob: [`index`]
//! - directories and file metadata: [`tree`], read from disk by [`fsmeta`]
//! - a backup runs: [`archiver`]; a restore: [`restorer`]; a check: [`check`];
//!   a damaged repository is mended: [`repair`]
//! - objects reach storage: [`backend`] (object_store); copies of what is
//!   re-read from a remote repository are kept by [`cache`]
//!
//! The on-disk format and the order of writes are in `docs/FORMAT.md`.

pub mod archiver;
pub mod backend;
pub mod cache;
pub mod check;
pub mod chunk;
pub mod crypto;
pub mod error;
pub mod fsmeta;
pub mod id;
pub mod index;
pub mod listing;
pub mod lock;
pub mod memory;
pub mod pack;
pub mod packer;
pub mod prune;
pub mod repair;
pub mod repository;
pub mod restorer;
pub mod retention;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod text;
pub mod tree;

pub use backend::Backend;
pub use error::{Error, Result};
pub use repository::Repository;
