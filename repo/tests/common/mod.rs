//! Set-up shared by the engine's integration tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use backer_repo::crypto::KdfParams;
use backer_repo::id::BlobId;
use backer_repo::lock::Lock;
use backer_repo::snapshot::{Snapshot, Summary};
use backer_repo::{Backend, Repository};

/// Key derivation cheap enough for tests.
pub fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

/// A snapshot of `/` taken now by `u` on `h`, whose root is `tree`.
pub fn snapshot_of_tree(tree: BlobId) -> Snapshot {
    Snapshot {
        time: chrono::Utc::now(),
        hostname: "h".into(),
        username: "u".into(),
        paths: vec!["/".into()],
        tags: vec![],
        excludes: vec![],
        parent: None,
        tree,
        summary: Summary::default(),
        partial: false,
        errors: vec![],
        program_version: "test".into(),
    }
}

/// An in-memory repository (cheap key derivation) and a lock for backups.
pub async fn fresh_repo() -> (Repository, Lock) {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    (repo, lock)
}
