//! Set-up shared by the engine's integration tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use backer_repo::crypto::KdfParams;
use backer_repo::lock::Lock;
use backer_repo::{Backend, Repository};

/// An in-memory repository (cheap key derivation) and a lock for backups.
pub async fn fresh_repo() -> (Repository, Lock) {
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let repo = Repository::init(Backend::in_memory(), b"pw", kdf).await.unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    (repo, lock)
}
