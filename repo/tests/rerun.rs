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

/// The names and sizes the directory `path` (below the snapshot's root)
/// records.
async fn listing(repo: &Repository, snap: &Snapshot, path: &[&str]) -> Vec<(String, u64)> {
    let mut tree = repo.load_tree(&snap.tree).await.unwrap();
    for name in path {
        let id = tree
            .find(name.as_bytes())
            .and_then(|n| n.subtree)
            .expect("a directory");
        tree = repo.load_tree(&id).await.unwrap();
    }
    tree.nodes
        .iter()
        .map(|n| (String::from_utf8(n.name.clone()).unwrap(), n.size))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_of_large_listings_stated_on_two_threads_sees_every_change() {
    // Listings long enough to be stated in windows, each in two parts on
    // two threads, with directories in both parts (walked while the other
    // part's answer waits) and excluded names among them.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path().join("data");
    let big = dir.join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..3000 {
        let content = format!("v1 {i}");
        let name = format!("f{i:04}");
        if i % 97 == 0 {
            std::fs::write(big.join(format!("{name}.skip")), &content).unwrap();
        } else {
            std::fs::write(big.join(&name), &content).unwrap();
            expected.insert(name, content.len() as u64);
        }
    }
    for sub in ["f0100d", "f1000d"] {
        std::fs::create_dir(big.join(sub)).unwrap();
        for j in 0..50 {
            std::fs::write(big.join(sub).join(format!("s{j:02}")), b"sub").unwrap();
        }
        expected.insert(sub.to_string(), 0);
    }
    let opts = || BackupOptions {
        root: dir.clone(),
        paths: vec![PathBuf::from("/")],
        excludes: vec!["*.skip".into()],
        threads: 2,
        ..Default::default()
    };
    let (repo, lock) = fresh_repo().await;
    let first = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(first.snapshot.summary.files, 2969 + 100);
    let repo = repo.refreshed().await.unwrap();
    let listed: std::collections::BTreeMap<_, _> = listing(&repo, &first.snapshot, &["big"])
        .await
        .into_iter()
        .collect();
    assert_eq!(listed, expected);

    std::thread::sleep(Duration::from_millis(50));
    for (name, content) in [
        ("f0005", "v2, first part of the first window"),
        ("f0800", "v2, second part of the first window"),
        ("f2500", "v2, the third window"),
        ("f1500a", "new"),
    ] {
        std::fs::write(big.join(name), content).unwrap();
        expected.insert(name.into(), content.len() as u64);
    }
    let changed_below = "v2, in a directory of the second part";
    std::fs::write(big.join("f1000d/s10"), changed_below).unwrap();
    std::fs::remove_file(big.join("f1500")).unwrap();
    expected.remove("f1500");

    let second = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    let repo = repo.refreshed().await.unwrap();
    assert_eq!(second.snapshot.parent, Some(first.id));
    assert_eq!(second.snapshot.summary.errors, 0);
    assert_eq!(
        second.snapshot.summary.files_read, 5,
        "the four changed files and the new one are read, nothing else"
    );
    assert_eq!(second.snapshot.summary.files, 2969 + 100);
    let listed: std::collections::BTreeMap<_, _> = listing(&repo, &second.snapshot, &["big"])
        .await
        .into_iter()
        .collect();
    assert_eq!(listed, expected);
    let sub = listing(&repo, &second.snapshot, &["big", "f1000d"]).await;
    assert_eq!(sub[10], ("s10".into(), changed_below.len() as u64));
    assert_eq!(sub[11], ("s11".into(), 3));
}
