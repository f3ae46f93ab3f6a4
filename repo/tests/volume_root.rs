//! A backup read under a root records paths as if the root were `/`: a
//! volume's snapshot looks the same whichever pod directory it was read
//! from, excludes match inside it, and a restore puts it into any target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use backer_repo::archiver::{BackupOptions, Progress, backup};
use backer_repo::restorer::{RestoreOptions, RestoreProgress, restore};

mod common;
use common::fresh_repo;

#[tokio::test(flavor = "multi_thread")]
async fn paths_are_recorded_relative_to_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("pods/uid-1/volumes/kubernetes.io~csi/pv/mount");
    std::fs::create_dir_all(vol.join("db")).unwrap();
    std::fs::create_dir_all(vol.join("cache")).unwrap();
    std::fs::write(vol.join("db/table"), b"rows").unwrap();
    std::fs::write(vol.join("cache/junk"), b"junk").unwrap();
    let (repo, lock) = fresh_repo().await;
    let opts = BackupOptions {
        root: vol.clone(),
        paths: vec![PathBuf::from("/")],
        excludes: vec!["/cache".into()],
        threads: 1,
        ..Default::default()
    };
    let out = backup(&repo, &lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(out.snapshot.paths, vec!["/".to_string()]);
    assert_eq!(out.snapshot.summary.files, 1, "the excluded /cache is left out");

    let target = tmp.path().join("elsewhere");
    let repo = repo.refreshed().await.unwrap();
    restore(
        &repo,
        &out.snapshot,
        &RestoreOptions {
            target: target.clone(),
            includes: vec![],
            overwrite: false,
            ..Default::default()
        },
        Arc::new(RestoreProgress::default()),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(target.join("db/table")).unwrap(), b"rows");
    assert!(!target.join("cache").exists());
    assert!(
        !target.join("pods").exists(),
        "nothing of the root's own path is recorded"
    );

    // A symlink inside the volume does not lead a backup out of it.
    std::fs::write(tmp.path().join("node-secret"), b"key").unwrap();
    std::os::unix::fs::symlink(tmp.path(), vol.join("esc")).unwrap();
    let opts = BackupOptions {
        root: vol.clone(),
        paths: vec![PathBuf::from("/esc/node-secret")],
        threads: 1,
        ..Default::default()
    };
    let out = backup(&repo, &lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(out.snapshot.summary.files, 0, "nothing read through the link");
    assert!(
        out.messages.iter().any(|m| m.contains("refused")),
        "{:?}",
        out.messages
    );

    // A root that is not there is a clear error, not an empty snapshot.
    let opts = BackupOptions {
        root: tmp.path().join("gone"),
        paths: vec![PathBuf::from("/")],
        ..Default::default()
    };
    let err = backup(&repo, &lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

/// A re-run's progress totals come from its parent, and the tree is not
/// walked a second time only to count it (a counting walk would add every
/// file on top of the totals given). Without a parent, the walk counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_takes_its_totals_from_the_parent_instead_of_counting() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..20 {
        std::fs::write(data.join(format!("f{i}")), vec![b'x'; 100]).unwrap();
    }
    let (repo, lock) = fresh_repo().await;
    let opts = || BackupOptions {
        root: data.clone(),
        paths: vec![PathBuf::from("/")],
        threads: 1,
        scan: true,
        ..Default::default()
    };
    let first = Arc::new(Progress::default());
    let out = backup(&repo, &lock, opts(), Arc::clone(&first)).await.unwrap();
    assert_eq!(out.snapshot.summary.files, 20);
    let counted = first.files_total.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted, 20, "without a parent the tree is counted");

    // Three more files since: the parent's 20 are the estimate, not 23 and
    // not 20 + 23.
    for i in 20..23 {
        std::fs::write(data.join(format!("f{i}")), vec![b'y'; 100]).unwrap();
    }
    let repo = repo.refreshed().await.unwrap();
    let again = Arc::new(Progress::default());
    let out = backup(&repo, &lock, opts(), Arc::clone(&again)).await.unwrap();
    assert_eq!(out.snapshot.summary.files, 23);
    assert_eq!(again.files_total.load(std::sync::atomic::Ordering::Relaxed), 20);
    assert_eq!(again.bytes_total.load(std::sync::atomic::Ordering::Relaxed), 2000);
    assert!(again.scan_done.load(std::sync::atomic::Ordering::Relaxed));
}
