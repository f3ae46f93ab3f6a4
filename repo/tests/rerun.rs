//! An unchanged re-run keeps what the parent recorded and reads what
//! changed: extended attributes included, which it does not read again for
//! an entry whose inode state (kind, size, mtime, ctime, inode) is the
//! parent's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backer_repo::Repository;
use backer_repo::archiver::{BackupOptions, Progress, backup};
use backer_repo::id::SnapshotId;
use backer_repo::lock::Lock;
use backer_repo::snapshot::Snapshot;

mod common;
use common::fresh_repo;

async fn back_up(repo: &Repository, lock: &Lock, dir: &Path) -> (SnapshotId, Snapshot) {
    let opts = BackupOptions {
        root: dir.to_path_buf(),
        paths: vec![PathBuf::from("/")],
        threads: 1,
        ..Default::default()
    };
    let out = backup(repo, lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap();
    (out.id, out.snapshot)
}

async fn xattrs_of(repo: &Repository, snap: &Snapshot, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let root = repo.load_tree(&snap.tree).await.unwrap();
    let node = root.find(name.as_bytes()).expect("the file is in the snapshot");
    node.xattrs
        .iter()
        .map(|x| (x.name.clone(), x.value.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_sees_extended_attributes_that_changed_and_keeps_the_others() {
    // In the build directory: a real file system with user xattrs.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    for name in ["kept", "changed", "added", "removed"] {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
    }
    xattr::set(dir.join("kept"), "user.k", b"1").expect("this file system takes user xattrs");
    xattr::set(dir.join("changed"), "user.k", b"1").unwrap();
    xattr::set(dir.join("removed"), "user.k", b"1").unwrap();

    let (repo, lock) = fresh_repo().await;
    let (first_id, first) = back_up(&repo, &lock, &dir).await;
    assert!(!first.partial);
    let repo = repo.refreshed().await.unwrap();
    let one = vec![(b"user.k".to_vec(), b"1".to_vec())];
    assert_eq!(xattrs_of(&repo, &first, "kept").await, one);

    // Past the timestamp granularity, so each change moves the ctime.
    std::thread::sleep(Duration::from_millis(50));
    xattr::set(dir.join("changed"), "user.k", b"2").unwrap();
    xattr::set(dir.join("added"), "user.new", b"x").unwrap();
    xattr::remove(dir.join("removed"), "user.k").unwrap();

    let (_, second) = back_up(&repo, &lock, &dir).await;
    let repo = repo.refreshed().await.unwrap();
    assert_eq!(
        second.parent,
        Some(first_id),
        "the re-run has the first as parent"
    );
    assert_eq!(
        xattrs_of(&repo, &second, "kept").await,
        one,
        "kept from the parent"
    );
    assert_eq!(
        xattrs_of(&repo, &second, "changed").await,
        vec![(b"user.k".to_vec(), b"2".to_vec())]
    );
    assert_eq!(
        xattrs_of(&repo, &second, "added").await,
        vec![(b"user.new".to_vec(), b"x".to_vec())]
    );
    assert_eq!(xattrs_of(&repo, &second, "removed").await, vec![]);
}
