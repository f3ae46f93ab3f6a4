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
    // A listing long enough to be stated in windows (one cut at 1,024
    // names), each in two parts on two threads, changed files in both
    // parts; windows ending at directories, listed ahead by the stat helper
    // (ones holding only files, one holding another directory); a chain
    // deeper than anything is listed ahead for; excluded names in listings
    // made by either thread.
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
    for sub in ["f0100d", "f1400d", "f2000d/inner"] {
        std::fs::create_dir_all(big.join(sub)).unwrap();
        for j in 0..50 {
            std::fs::write(big.join(sub).join(format!("s{j:02}")), b"sub").unwrap();
        }
        std::fs::write(big.join(sub).join("x.skip"), b"excluded").unwrap();
    }
    for sub in ["f0100d", "f1400d", "f2000d"] {
        expected.insert(sub.to_string(), 0);
    }
    let mut deep = big.join("f2500d");
    for _ in 0..70 {
        deep.push("l");
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf"), b"v1").unwrap();
    expected.insert("f2500d".into(), 0);
    let opts = || BackupOptions {
        root: dir.clone(),
        paths: vec![PathBuf::from("/")],
        excludes: vec!["*.skip".into()],
        threads: 2,
        ..Default::default()
    };
    let files = 2969 + 150 + 1;
    let (repo, lock) = fresh_repo().await;
    let first = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(first.snapshot.summary.files, files);
    let repo = repo.refreshed().await.unwrap();
    let listed: std::collections::BTreeMap<_, _> = listing(&repo, &first.snapshot, &["big"])
        .await
        .into_iter()
        .collect();
    assert_eq!(listed, expected);

    std::thread::sleep(Duration::from_millis(50));
    for (name, content) in [
        ("f0005", "v2, in the window that ends at the first directory"),
        ("f0300", "v2, in the walker's part of a window of 1,024"),
        ("f0800", "v2, in the helper's part of that window"),
        ("f1200", "v2, in the window after it"),
        ("f2999", "v2, in the last window"),
        ("f1500a", "new"),
    ] {
        std::fs::write(big.join(name), content).unwrap();
        expected.insert(name.into(), content.len() as u64);
    }
    let changed_below = "v2, in a directory listed ahead";
    std::fs::write(big.join("f1400d/s10"), changed_below).unwrap();
    std::fs::write(big.join("f2000d/inner/s20"), "v2, two levels down").unwrap();
    std::fs::write(deep.join("leaf"), b"v2, below the depth of listing ahead").unwrap();
    std::fs::remove_file(big.join("f1500")).unwrap();
    expected.remove("f1500");

    let second = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    let repo = repo.refreshed().await.unwrap();
    assert_eq!(second.snapshot.parent, Some(first.id));
    assert_eq!(second.snapshot.summary.errors, 0);
    assert_eq!(
        second.snapshot.summary.files_read, 9,
        "the eight changed files and the new one are read, nothing else"
    );
    assert_eq!(second.snapshot.summary.files, files);
    let listed: std::collections::BTreeMap<_, _> = listing(&repo, &second.snapshot, &["big"])
        .await
        .into_iter()
        .collect();
    assert_eq!(listed, expected);
    let sub = listing(&repo, &second.snapshot, &["big", "f1400d"]).await;
    assert_eq!(sub.len(), 50, "without the excluded name");
    assert_eq!(sub[10], ("s10".into(), changed_below.len() as u64));
    assert_eq!(sub[11], ("s11".into(), 3));
    let inner = listing(&repo, &second.snapshot, &["big", "f2000d", "inner"]).await;
    assert_eq!(inner.len(), 50);
    assert_eq!(inner[20].1, "v2, two levels down".len() as u64);
    let mut path = vec!["big", "f2500d"];
    path.extend(std::iter::repeat_n("l", 70));
    assert_eq!(
        listing(&repo, &second.snapshot, &path).await,
        vec![("leaf".to_string(), 36)]
    );
}
