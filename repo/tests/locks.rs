//! Locks: shared and exclusive conflict as they should, a dead holder's lock
//! is stale at once, and a paused holder stops before writing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use backer_repo::backend::faults::{Fault, FaultPlan};
use backer_repo::error::Error;
use backer_repo::id::BlobId;
use backer_repo::lock::{Lock, LockInfo, Timing, list_locks, pid_space, unlock};
use backer_repo::repository::{Kind, seal_object};
use backer_repo::{Backend, Repository};

mod common;
use common::{cheap, snapshot_of_tree};

/// `clean`'s repository opened again through a store where every call on
/// an object whose name contains `only` takes `slow` longer.
async fn slowed(clean: &Backend, only: &str, slow: Duration, seed: u64) -> Repository {
    let mut plan = FaultPlan::new(seed, 1.0);
    plan.only = only.into();
    plan.kinds = vec![Fault::Slow];
    plan.slow = slow;
    let (slow, _) = clean.with_faults(plan, Duration::from_secs(60));
    Repository::open(slow, b"pw").await.unwrap()
}

fn short() -> Timing {
    Timing {
        refresh: Duration::from_millis(300),
        valid: Duration::from_secs(2),
        stale: Duration::from_secs(3),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_and_exclusive_conflict() {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let a = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    let b = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    let err = Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");
    assert!(err.to_string().contains("a shared lock held by"), "{err}");
    assert!(err.to_string().contains("backer unlock"), "{err}");
    // The refused attempt left no lock behind.
    assert_eq!(list_locks(&repo, None, short()).await.unwrap().len(), 2);
    a.release().await.unwrap();
    b.release().await.unwrap();
    let x = Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
        .await
        .unwrap();
    assert!(
        Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
            .await
            .is_err()
    );
    x.check_fresh().await.unwrap();
    x.release().await.unwrap();
    assert!(list_locks(&repo, None, short()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_lock_succeeds_once_it_goes() {
    let repo = std::sync::Arc::new(
        Repository::init(Backend::in_memory(), b"pw", cheap())
            .await
            .unwrap(),
    );
    let held = Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
        .await
        .unwrap();
    let r2 = repo.clone();
    let waiter = tokio::spawn(async move {
        Lock::acquire_with(&r2, false, "backup", Duration::from_secs(20), short())
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    held.release().await.unwrap();
    waiter.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn refreshed_locks_stay_and_paused_ones_expire() {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let live = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    let mut paused = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    paused.stop_refreshing_for_tests();
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // The live holder kept refreshing and may write; the paused one may not.
    live.check_fresh().await.unwrap();
    let err = paused.check_fresh().await.unwrap_err();
    assert!(matches!(err, Error::LockExpired(_)), "{err}");

    // To others the paused lock is stale: a prune may start, the live lock still blocks it.
    let locks = list_locks(&repo, None, short()).await.unwrap();
    assert_eq!(locks.iter().filter(|l| l.stale.is_some()).count(), 1);
    assert!(
        Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
            .await
            .is_err()
    );
    live.release().await.unwrap();
    let prune = Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
        .await
        .unwrap();
    prune.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unlock_removes_stale_and_removed_lock_stops_its_holder() {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let mut paused = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    paused.stop_refreshing_for_tests();
    let live = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    // Nothing is stale yet.
    assert!(unlock(&repo, false).await.unwrap().is_empty());
    // With the default (30 min) timing, the real `unlock` finds nothing stale
    // either; --remove-all removes everything and the holders notice.
    let removed = unlock(&repo, true).await.unwrap();
    assert_eq!(removed.len(), 2);
    let err = live.check_fresh().await.unwrap_err();
    assert!(err.to_string().contains("removed by someone else"), "{err}");
    // Its refresher does not write it back: a prune that started meanwhile
    // would run beside a holder that thinks it is covered again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(list_locks(&repo, None, short()).await.unwrap().is_empty());
    let err = live.check_fresh().await.unwrap_err();
    assert!(matches!(err, Error::LockExpired(_)), "{err}");
}

/// Writes a lock object for `info` as another process would.
async fn plant<T: serde::Serialize>(repo: &Repository, info: &T) {
    let (name, bytes) = seal_object(repo.key(), Kind::Lock, info).unwrap();
    repo.backend().put_new(&name, bytes).await.unwrap();
}

fn info(pid: u32, pid_space: String) -> LockInfo {
    LockInfo {
        exclusive: false,
        hostname: backer_repo::snapshot::hostname(),
        pid,
        username: "u".into(),
        purpose: "backup".into(),
        created: chrono::Utc::now(),
        nonce: rand_nonce(),
        pid_space,
    }
}

fn rand_nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A holder's PID says it is gone only when it ran in this PID namespace
/// and boot: a container sharing the host's name, or another machine of
/// the same name, has PIDs of its own, and its live backup must still
/// keep a prune away.
#[tokio::test(flavor = "multi_thread")]
async fn a_pid_judges_a_holder_gone_only_in_the_same_pid_namespace_and_boot() {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!pid_space().is_empty());

    plant(&repo, &info(dead, pid_space().to_string())).await;
    let locks = list_locks(&repo, None, short()).await.unwrap();
    assert!(
        locks[0].stale.as_deref().unwrap_or("").contains("is gone"),
        "{locks:?}"
    );
    unlock(&repo, true).await.unwrap();

    for elsewhere in ["pid:[1] another-boot".to_string(), String::new()] {
        plant(&repo, &info(dead, elsewhere.clone())).await;
        let locks = list_locks(&repo, None, short()).await.unwrap();
        assert_eq!(locks[0].stale, None, "{elsewhere:?}: {locks:?}");
        assert!(
            Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
                .await
                .is_err()
        );
        unlock(&repo, true).await.unwrap();
    }
}

/// A lock an older version wrote (without the PID namespace) is read, and
/// counts: were it taken for unreadable, hence stale, a new prune would
/// run beside an old version's backup.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_versions_lock_still_counts() {
    #[derive(serde::Serialize)]
    struct V1 {
        exclusive: bool,
        hostname: String,
        pid: u32,
        username: String,
        purpose: String,
        created: chrono::DateTime<chrono::Utc>,
        nonce: u64,
    }
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    plant(
        &repo,
        &V1 {
            exclusive: false,
            hostname: "another-host".into(),
            pid: 7,
            username: "u".into(),
            purpose: "backup".into(),
            created: chrono::Utc::now(),
            nonce: 1,
        },
    )
    .await;
    let locks = list_locks(&repo, None, short()).await.unwrap();
    assert_eq!(locks.len(), 1);
    let found = locks[0].info.as_ref().expect("read");
    assert_eq!((found.pid, found.pid_space.as_str()), (7, ""));
    assert_eq!(locks[0].stale, None);
    let err = Lock::acquire_with(&repo, true, "prune", Duration::ZERO, short())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another-host"), "{err}");
}

/// Work that checks a lock it does not hold (a server's upload for a job)
/// hears that the job ended once the lock is released, not that someone
/// else removed it.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_lock_says_so_to_who_still_checks_it() {
    let repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let lock = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    let check = lock.check();
    check.check_fresh().await.unwrap();
    lock.release().await.unwrap();
    let err = check.check_fresh().await.unwrap_err();
    assert!(matches!(err, Error::LockExpired(_)), "{err}");
    assert!(err.to_string().contains("released"), "{err}");
}

/// A refresh writes the lock under a new name and removes the old: one who
/// lists the locks while that happens must still see it, or a prune would
/// start beside a running backup.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_renamed_by_its_refresh_while_being_read_is_still_seen() {
    let clean = Backend::in_memory();
    Repository::init(clean.clone(), b"pw", cheap()).await.unwrap();
    let repo = Repository::open(clean.clone(), b"pw").await.unwrap();
    let timing = Timing {
        refresh: Duration::from_millis(500),
        valid: Duration::from_secs(20),
        stale: Duration::from_secs(30),
    };
    let backup = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, timing)
        .await
        .unwrap();
    // Reading a lock here takes about as long as a refresh period: the one
    // listed has often been replaced by the time it is read.
    let slow = slowed(&clean, "locks/", Duration::from_millis(400), 3).await;
    let mut seen = 0;
    for _ in 0..4 {
        match list_locks(&slow, None, timing).await {
            Ok(locks) => {
                assert_eq!(locks.len(), 1, "{locks:?}");
                seen += 1;
            }
            Err(e) => assert!(matches!(e, Error::Locked(_)), "{e}"),
        }
        let err = Lock::acquire_with(&slow, true, "prune", Duration::ZERO, timing)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
    }
    assert!(seen > 0, "the listing never settled");
    backup.check_fresh().await.unwrap();
    backup.release().await.unwrap();
}

/// A holder paused between its last check and the end of its snapshot's
/// write (SIGSTOP, a suspended VM) may have been overtaken by a prune: the
/// snapshot it wrote is taken back, and it hears its lock expired.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_written_while_the_lock_expired_is_taken_back() {
    let clean = Backend::in_memory();
    Repository::init(clean.clone(), b"pw", cheap()).await.unwrap();
    // Every call on a snapshot takes longer than the lock stays valid.
    let repo = slowed(&clean, "snapshots/", Duration::from_millis(2500), 1).await;
    let mut lock = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, short())
        .await
        .unwrap();
    // Paused: no refresh while the write is under way.
    lock.stop_refreshing_for_tests();
    let snap = snapshot_of_tree(BlobId([0; 32]));
    let err = repo.save_snapshot(&snap, &lock).await.unwrap_err();
    assert!(matches!(err, Error::LockExpired(_)), "{err}");
    let clean = Repository::open(clean, b"pw").await.unwrap();
    assert!(clean.load_snapshots().await.unwrap().snapshots.is_empty());
}

/// A refresh that lands more than `valid` after the lock it replaces was
/// written (a pause while writing it, slow storage) cannot undo that others
/// may have judged the lock stale in between: the lock has expired.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_that_lands_late_does_not_make_the_lock_fresh() {
    let clean = Backend::in_memory();
    Repository::init(clean.clone(), b"pw", cheap()).await.unwrap();
    // Every read and write of a lock takes 3 s.
    let repo = slowed(&clean, "locks/", Duration::from_secs(3), 2).await;
    let timing = Timing {
        refresh: Duration::from_millis(100),
        valid: Duration::from_secs(4),
        stale: Duration::from_secs(6),
    };
    // Written at T; reading the locks back takes until T+3, the refresh
    // starts at T+3.1 and lands at T+6.1, more than `valid` after T.
    let lock = Lock::acquire_with(&repo, false, "backup", Duration::ZERO, timing)
        .await
        .unwrap();
    // T+6.6: counted from the refresh's start (T+3.1) it would look fresh.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let err = lock.check_fresh().await.unwrap_err();
    assert!(matches!(err, Error::LockExpired(_)), "{err}");
}
