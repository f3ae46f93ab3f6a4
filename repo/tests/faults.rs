//! Backup, restore, prune and check against storage that fails: errors, hung
//! calls, slow calls, reads cut short, writes whose reply is lost, listings
//! that break part-way, chosen by a seed. Each operation either succeeds or
//! fails with a message; afterwards, seen through storage that works, the
//! repository checks clean with `--read-data` and every snapshot it lists
//! restores to exactly what was backed up.
//!
//! `BACKER_FAULT_SEEDS=200` runs more seeds than the default.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backer_repo::archiver::{BackupOptions, ParentChoice, Progress, backup};
use backer_repo::backend::faults::{Fault, FaultCounts, FaultPlan};
use backer_repo::check::{CheckOptions, CheckProgress, CheckReport, check};
use backer_repo::crypto::KdfParams;
use backer_repo::id::SnapshotId;
use backer_repo::lock::{Lock, unlock};
use backer_repo::prune::{DEFAULT_MAX_UNUSED, PruneOptions, prune};
use backer_repo::restorer::{RestoreOptions, RestoreOutcome, RestoreProgress, restore, restore_tree};
use backer_repo::snapshot::Snapshot;
use backer_repo::{Backend, Error, Repository};

const PASSWORD: &[u8] = b"faults";
/// Long enough for a real call, short enough that a hung one is noticed soon.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);

type Files = BTreeMap<PathBuf, Vec<u8>>;

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Writes generation `generation` of a source tree: some files change, some
/// appear, some repeat others' content (so chunks are shared).
fn write_source(dir: &Path, seed: u64, generation: u64) {
    let mut next = rng(seed * 1000 + generation);
    for i in 0..12u64 {
        if generation > 0 && !next().is_multiple_of(3) {
            continue;
        }
        let sub = dir.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let len = (next() % 400_000) as usize;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            data.extend_from_slice(&next().to_le_bytes());
        }
        data.truncate(len);
        std::fs::write(sub.join(format!("f{i}")), &data).unwrap();
        if i % 5 == 0 {
            std::fs::write(sub.join(format!("copy{i}")), &data).unwrap();
        }
    }
}

fn read_files(dir: &Path) -> Files {
    fn walk(base: &Path, dir: &Path, out: &mut Files) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = Files::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

#[derive(Default)]
struct Tally {
    ops: u64,
    ok: u64,
    failed: u64,
    snapshots_verified: u64,
    leftover_locks: u64,
    /// Snapshots written by a backup that reported failure (reply lost).
    reply_lost_snapshots: u64,
}

/// One operation's result: fine, or an error whose message names what failed.
fn judge<T>(tally: &mut Tally, what: &str, r: Result<T, Error>) -> Option<T> {
    tally.ops += 1;
    match r {
        Ok(v) => {
            tally.ok += 1;
            Some(v)
        }
        Err(e) => {
            tally.failed += 1;
            let msg = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(
                msg.contains("injected fault")
                    || msg.contains("took longer than")
                    || msg.contains("shorter than"),
                "{what} failed with a message that does not say why: {msg}"
            );
            None
        }
    }
}

/// Through storage that works: the repository checks clean, reading every
/// pack, and each snapshot it lists restores to what was backed up. A
/// snapshot from a backup that reported failure (its write landed, the reply
/// was lost) must restore to the tree that backup read, one of `maybe`.
async fn verify(
    clean: &Backend,
    expected: &mut BTreeMap<SnapshotId, Files>,
    maybe: &[Files],
    tmp: &Path,
    tally: &mut Tally,
) {
    let repo = Repository::open(clean.clone(), PASSWORD).await.unwrap();
    tally.leftover_locks += unlock(&repo, true).await.unwrap().len() as u64;
    let report = check_all(&repo).await.unwrap();
    assert!(report.ok(), "check --read-data found damage: {:?}", report.errors);
    for entry in repo.snapshots().await.unwrap() {
        let known = expected.get(&entry.id).cloned();
        let target = tmp.join(format!("verify-{}", entry.id));
        let out = restore_all(&repo, &entry.snapshot, &target).await.unwrap();
        assert!(
            out.errors.is_empty(),
            "snapshot {} lists but does not restore: {:?}",
            entry.id,
            out.errors
        );
        let got = read_files(&target);
        match known {
            Some(want) => assert!(got == want, "snapshot {} restored different content", entry.id),
            None => {
                assert!(
                    maybe.contains(&got),
                    "snapshot {} lists, but no backup finished it and it holds no tree a backup read",
                    entry.id
                );
                tally.reply_lost_snapshots += 1;
                expected.insert(entry.id, got);
            }
        }
        std::fs::remove_dir_all(&target).unwrap();
        tally.snapshots_verified += 1;
    }
}

/// All of `snapshot` into the new directory `target`.
async fn restore_all(repo: &Repository, snapshot: &Snapshot, target: &Path) -> Result<RestoreOutcome, Error> {
    let opts = RestoreOptions {
        target: target.to_path_buf(),
        includes: vec![],
        overwrite: false,
        ..Default::default()
    };
    restore(repo, snapshot, &opts, Arc::new(RestoreProgress::default())).await
}

/// `check --read-data`.
async fn check_all(repo: &Repository) -> Result<CheckReport, Error> {
    let opts = CheckOptions {
        read_data: true,
        subset: None,
    };
    check(repo, &opts, Arc::new(CheckProgress::default())).await
}

/// A new repository under `dir`; the backend that sees it through working storage.
async fn new_repository(dir: &Path) -> Backend {
    let at = dir.join("repo");
    Repository::init(Backend::open(at.to_str().unwrap()).unwrap(), PASSWORD, cheap())
        .await
        .unwrap();
    Backend::open(at.to_str().unwrap()).unwrap()
}

async fn one_seed(seed: u64, rate: f64, tally: &mut Tally, counts: &mut Vec<Arc<FaultCounts>>) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let clean = new_repository(tmp.path()).await;
    let (faulty, c) = clean.with_faults(
        FaultPlan {
            hang: CALL_TIMEOUT * 3,
            ..FaultPlan::new(seed, rate)
        },
        CALL_TIMEOUT,
    );
    counts.push(c);
    let mut expected: BTreeMap<SnapshotId, Files> = BTreeMap::new();
    let mut maybe: Vec<Files> = Vec::new();

    for generation in 0..3 {
        write_source(&src, seed, generation);
        let files = read_files(&src);
        let outcome = match judge(tally, "open", Repository::open(faulty.clone(), PASSWORD).await) {
            Some(repo) => {
                let r = async {
                    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO).await?;
                    let out = backup(
                        &repo,
                        &lock,
                        BackupOptions {
                            root: src.clone(),
                            paths: vec![PathBuf::from("/")],
                            parent: ParentChoice::Auto,
                            threads: 2,
                            ..Default::default()
                        },
                        Arc::new(Progress::default()),
                    )
                    .await?;
                    lock.release().await?;
                    Ok(out)
                }
                .await;
                judge(tally, "backup", r)
            }
            None => None,
        };
        match outcome {
            Some(out) => {
                assert!(out.messages.is_empty(), "backup reported {:?}", out.messages);
                expected.insert(out.id, files.clone());
            }
            // The snapshot's write may have landed with its reply lost:
            // then it lists, and must hold exactly this tree.
            None => maybe.push(files.clone()),
        }
        verify(&clean, &mut expected, &maybe, tmp.path(), tally).await;

        // A restore through failing storage: complete and right, or an error.
        if expected.is_empty() {
            continue;
        }
        if let Some(repo) = judge(tally, "open", Repository::open(faulty.clone(), PASSWORD).await) {
            let target = tmp.path().join(format!("restore-{generation}"));
            let r = async {
                let latest = repo.find_snapshot("latest", &Default::default()).await?;
                let out = restore_all(&repo, &latest.snapshot, &target).await?;
                Ok((latest.id, out))
            }
            .await;
            if let Some((id, out)) = judge(tally, "restore", r) {
                if out.errors.is_empty() {
                    assert!(
                        read_files(&target) == expected[&id],
                        "a restore that reported success restored different content"
                    );
                } else {
                    for e in &out.errors {
                        assert!(
                            e.contains("injected fault")
                                || e.contains("took longer")
                                || e.contains("shorter than"),
                            "restore error does not say why: {e}"
                        );
                    }
                }
            }
        }
    }

    // Forget the oldest snapshot and prune, through failing storage.
    if let Some(mut repo) = judge(tally, "open", Repository::open(faulty.clone(), PASSWORD).await) {
        let r = async {
            let all = repo.snapshots().await?;
            if let Some(oldest) = all.first() {
                repo.backend().delete(&format!("snapshots/{}", oldest.id)).await?;
            }
            let lock = Lock::acquire(&repo, true, "prune", Duration::ZERO).await?;
            let report = prune(
                &mut repo,
                &lock,
                &PruneOptions {
                    max_unused: DEFAULT_MAX_UNUSED,
                    dry_run: false,
                },
            )
            .await?;
            lock.release().await?;
            Ok(report)
        }
        .await;
        judge(tally, "prune", r);
    }
    // A forgotten snapshot is no longer expected; one whose delete failed is.
    let listed = Repository::open(clean.clone(), PASSWORD)
        .await
        .unwrap()
        .snapshots()
        .await
        .unwrap();
    expected.retain(|id, _| listed.iter().any(|s| s.id == *id));
    verify(&clean, &mut expected, &maybe, tmp.path(), tally).await;

    // Check through failing storage: it may fail to read, but never calls a
    // sound repository damaged without saying the storage failed.
    if let Some(repo) = judge(tally, "open", Repository::open(faulty.clone(), PASSWORD).await) {
        let r = check_all(&repo).await;
        if let Some(report) = judge(tally, "check", r) {
            for e in &report.errors {
                assert!(
                    e.contains("injected fault") || e.contains("took longer") || e.contains("shorter than"),
                    "check blamed the repository for a storage fault: {e}"
                );
            }
        }
    }
}

/// Runs `seeds` seeds at `rate`; prints and returns what happened.
async fn campaign(seeds: std::ops::Range<u64>, rate: f64) -> (Tally, [u64; 6]) {
    let mut tally = Tally::default();
    let mut counts = Vec::new();
    let n = seeds.end - seeds.start;
    for seed in seeds {
        one_seed(seed, rate, &mut tally, &mut counts).await;
    }
    let sum = |f: fn(&FaultCounts) -> &std::sync::atomic::AtomicU64| {
        counts.iter().map(|c| f(c).load(Ordering::Relaxed)).sum::<u64>()
    };
    let kinds = [
        sum(|c| &c.errors),
        sum(|c| &c.hangs),
        sum(|c| &c.slow),
        sum(|c| &c.short_reads),
        sum(|c| &c.lost_replies),
        sum(|c| &c.broken_listings),
    ];
    backer_testkit::figures(
        "faults",
        format!(
            "faults at rate {rate}: {n} seeds, {} faults injected ({} errors, {} hung calls, {} slow calls, {} short reads, {} lost write replies, {} listings broken part-way); {} operations: {} succeeded, {} failed with a reason; {} snapshots verified byte for byte ({} of them from a backup whose last reply was lost); {} locks left for `unlock`",
            kinds.iter().sum::<u64>(),
            kinds[0],
            kinds[1],
            kinds[2],
            kinds[3],
            kinds[4],
            kinds[5],
            tally.ops,
            tally.ok,
            tally.failed,
            tally.snapshots_verified,
            tally.reply_lost_snapshots,
            tally.leftover_locks,
        ),
    );
    (tally, kinds)
}

fn seeds_from_env(default: u64) -> u64 {
    std::env::var("BACKER_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Faults as a flaky network gives them: retries carry operations through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_ride_out_transient_faults() {
    let seeds = seeds_from_env(8);
    let (tally, kinds) = campaign(0..seeds, 0.12).await;
    for (kind, n) in [
        "errors",
        "hangs",
        "slow calls",
        "short reads",
        "lost replies",
        "broken listings",
    ]
    .iter()
    .zip(kinds)
    {
        assert!(n > 0, "no {kind} were injected");
    }
    assert!(
        tally.ok * 10 >= tally.ops * 9,
        "retries should carry nearly every operation through: {} of {}",
        tally.ok,
        tally.ops
    );
    assert!(
        tally.snapshots_verified > seeds,
        "too few snapshots were verified"
    );
}

/// Storage failing so often (60 % of calls) that retries run out: operations fail, saying
/// why, and never leave a snapshot that lists but does not restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_that_run_out_of_retries_fail_cleanly() {
    let seeds = seeds_from_env(3);
    let (tally, kinds) = campaign(1000..1000 + seeds, 0.6).await;
    assert!(kinds.iter().sum::<u64>() > 100, "too few faults injected");
    assert!(
        tally.failed > 0,
        "at this rate some operations must run out of retries"
    );
    assert!(tally.ok > 0, "some operations should still get through");
}

/// Storage that refuses every write: the backup fails, saying so, and the
/// repository is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_never_writes_fails_the_backup_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_source(&src, 7, 0);
    let clean = new_repository(tmp.path()).await;
    let (faulty, counts) = clean.with_faults(
        FaultPlan {
            only: "data/".into(),
            kinds: vec![Fault::Error],
            ..FaultPlan::new(1, 1.0)
        },
        CALL_TIMEOUT,
    );
    let repo = Repository::open(faulty, PASSWORD).await.unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    let err = backup(
        &repo,
        &lock,
        BackupOptions {
            root: src.clone(),
            paths: vec![PathBuf::from("/")],
            threads: 2,
            ..Default::default()
        },
        Arc::new(Progress::default()),
    )
    .await
    .expect_err("a backup whose packs cannot be stored must fail");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains("failed to access the storage backend"), "{chain}");
    assert!(
        counts.total() >= 5,
        "each pack write should have been tried five times: {counts}"
    );
    drop(lock);
    let mut tally = Tally::default();
    verify(&clean, &mut BTreeMap::new(), &[], tmp.path(), &mut tally).await;
    assert_eq!(
        tally.snapshots_verified, 0,
        "no snapshot may list after a failed backup"
    );
}

/// A local source that cancels `token` once its first chunk is handed on, or
/// (with `trees`) when it loads that many trees.
struct CancelAt<'a> {
    inner: backer_repo::store::LocalStore<'a>,
    token: tokio_util::sync::CancellationToken,
    trees: Option<u64>,
    loaded: std::sync::atomic::AtomicU64,
}

impl<'a> CancelAt<'a> {
    fn new(repo: &'a Repository, token: tokio_util::sync::CancellationToken, trees: Option<u64>) -> Self {
        CancelAt {
            inner: backer_repo::store::LocalStore {
                repo,
                lock: None,
                handle: tokio::runtime::Handle::current(),
            },
            token,
            trees,
            loaded: Default::default(),
        }
    }
}

impl backer_repo::store::RestoreSource for CancelAt<'_> {
    fn load_tree(&self, id: &backer_repo::id::BlobId) -> backer_repo::Result<backer_repo::tree::Tree> {
        if self.trees == Some(self.loaded.fetch_add(1, Ordering::SeqCst) + 1) {
            self.token.cancel();
        }
        self.inner.load_tree(id)
    }

    fn fetch_chunks(
        &self,
        ids: &[backer_repo::id::BlobId],
        cancel: &tokio_util::sync::CancellationToken,
        each: &backer_repo::store::ChunkSink<'_>,
    ) -> Vec<(backer_repo::id::BlobId, String)> {
        self.inner.fetch_chunks(ids, cancel, &|id, data| {
            each(id, data);
            if self.trees.is_none() {
                self.token.cancel();
            }
        })
    }
}

/// Cancels `token` once `done` counts a first file, from another thread.
fn cancel_after_first(token: tokio_util::sync::CancellationToken, done: impl Fn() -> u64 + Send + 'static) {
    std::thread::spawn(move || {
        while done() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        token.cancel();
    });
}

/// A backup or a restore cancelled part-way (an agent's SIGTERM) stops at
/// once with `Cancelled`: no snapshot, the repository checks clean, and the
/// next backup and restore are whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_backup_or_restore_stops_early_and_leaves_the_repository_clean() {
    const FILES: u64 = 48;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut next = rng(99);
    for i in 0..FILES {
        let data: Vec<u8> = (0..(1 << 17)).flat_map(|_| next().to_le_bytes()).collect();
        std::fs::write(src.join(format!("f{i:02}")), data).unwrap();
    }
    let backend = new_repository(tmp.path()).await;
    let repo = Repository::open(backend.clone(), PASSWORD).await.unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    let opts = || BackupOptions {
        root: src.clone(),
        paths: vec![PathBuf::from("/")],
        threads: 1,
        ..Default::default()
    };

    let cancelled = opts();
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    cancel_after_first(cancelled.cancel.clone(), move || {
        p.files_done.load(Ordering::Relaxed)
    });
    let err = backup(&repo, &lock, cancelled, Arc::clone(&progress))
        .await
        .expect_err("a cancelled backup must not succeed");
    assert!(matches!(err, Error::Cancelled), "{err}");
    let read = progress.files_done.load(Ordering::Relaxed);
    assert!(
        read < FILES,
        "the backup stopped early, not after all {FILES} files ({read})"
    );
    let repo = repo.refreshed().await.unwrap();
    assert!(
        repo.snapshots().await.unwrap().is_empty(),
        "no snapshot after a cancel"
    );
    let report = check_all(&repo).await.unwrap();
    assert!(
        report.ok(),
        "the repository checks clean after a cancel: {:?}",
        report.errors
    );

    let whole = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(whole.snapshot.summary.files, FILES);
    drop(lock);
    let repo = repo.refreshed().await.unwrap();

    // Cancelled once the first chunk is written: the restore stops, and
    // what it leaves is whole (a file begun and not finished is removed).
    let progress = Arc::new(RestoreProgress::default());
    let cancelled = RestoreOptions {
        target: tmp.path().join("cancelled"),
        ..Default::default()
    };
    let source = CancelAt::new(&repo, cancelled.cancel.clone(), None);
    let err = tokio::task::block_in_place(|| {
        restore_tree(&source, whole.snapshot.tree, &cancelled, Arc::clone(&progress))
    })
    .expect_err("a cancelled restore must not succeed");
    assert!(matches!(err, Error::Cancelled), "{err}");
    let written = progress.files_done.load(Ordering::Relaxed);
    assert!(
        written < FILES,
        "the restore stopped early ({written} of {FILES})"
    );
    let src_files = read_files(&src);
    let left = read_files(&tmp.path().join("cancelled"));
    assert!(left.len() < FILES as usize, "{} files left", left.len());
    for (path, data) in &left {
        assert_eq!(Some(data), src_files.get(path), "{} is whole", path.display());
    }

    let target = tmp.path().join("whole");
    let out = restore_all(&repo, &whole.snapshot, &target).await.unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(read_files(&target), read_files(&src));
}

/// A restore with --overwrite cancelled during its walk: every file in the
/// target is either what it held before or whole from the snapshot, none
/// is left empty or under a temporary name, and hard links written under
/// temporary names never replace what they were to replace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cancelled_during_its_walk_leaves_no_empty_or_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut next = rng(5);
    for d in 0..6 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..20 {
            let data: Vec<u8> = (0..(256 + f * 97)).flat_map(|_| next().to_le_bytes()).collect();
            std::fs::write(dir.join(format!("f{f:02}")), data).unwrap();
        }
        std::fs::hard_link(dir.join("f00"), dir.join("link")).unwrap();
    }
    let backend = new_repository(tmp.path()).await;
    let repo = Repository::open(backend, PASSWORD).await.unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    let opts = BackupOptions {
        root: src.clone(),
        paths: vec![PathBuf::from("/")],
        ..Default::default()
    };
    let snap = backup(&repo, &lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap()
        .snapshot;
    drop(lock);
    let repo = repo.refreshed().await.unwrap();
    let src_files = read_files(&src);

    for trees in 2..=5 {
        // The target holds other versions of every file, to be overwritten.
        let target = tmp.path().join(format!("target-{trees}"));
        for path in src_files.keys() {
            let at = target.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            if !at.exists() {
                std::fs::write(&at, format!("ORIGINAL {}", path.display())).unwrap();
            }
        }
        let before = read_files(&target);
        let cancelled = RestoreOptions {
            target: target.clone(),
            overwrite: true,
            ..Default::default()
        };
        let source = CancelAt::new(&repo, cancelled.cancel.clone(), Some(trees));
        let err = tokio::task::block_in_place(|| {
            restore_tree(
                &source,
                snap.tree,
                &cancelled,
                Arc::new(RestoreProgress::default()),
            )
        })
        .expect_err("a cancelled restore must not succeed");
        assert!(matches!(err, Error::Cancelled), "{err}");
        let after = read_files(&target);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "no file is added (a temporary one) or lost (cancelled after {trees} trees)"
        );
        for (path, data) in &after {
            assert!(
                data == &before[path] || Some(data) == src_files.get(path),
                "{} holds neither what it held nor the snapshot's ({} bytes; cancelled after {trees} trees)",
                path.display(),
                data.len()
            );
        }
    }
}
