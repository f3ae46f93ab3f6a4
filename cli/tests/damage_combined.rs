//! Damage beyond one object at a time, and the repairs' own edges: what an
//! adversarial review found after the single-object suite (damage.rs)
//! passed. Each test states the failure it guards against.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use backer_repo::archiver::{BackupOptions, Progress, backup};
use backer_repo::lock::Lock;
use backer_repo::{Backend, Repository};
use backer_testkit::{compare_trees, is_root, pseudo_random};

struct Repo {
    path: PathBuf,
    password: String,
}

impl Repo {
    fn new(dir: &Path) -> Repo {
        let r = Repo {
            path: dir.join("repo"),
            password: "pw".into(),
        };
        r.ok(&["init"]);
        r
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_backer"))
            .env("BACKER_REPO", &self.path)
            .env("BACKER_PASSWORD", &self.password)
            .env_remove("BACKER_SERVER")
            .env_remove("BACKER_PASSWORD_FILE")
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "backer {args:?}: {}", all(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    fn backup(&self, src: &Path) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["backup", src.to_str().unwrap(), "--json"])).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// Restores `id` and compares it with `src`; the differences.
    fn restore_diffs(&self, id: &str, src: &Path, into: &Path) -> Vec<String> {
        let _ = std::fs::remove_dir_all(into);
        let o = self.run(&["restore", &id[..12], "--target", into.to_str().unwrap()]);
        let at = into.join(src.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&at).unwrap();
        let mut d = compare_trees(src, &at);
        if !o.status.success() {
            d.push(format!("exit {:?}: {}", o.status.code(), all(&o)));
        }
        d
    }
}

fn all(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tree(dir: &Path, seed: u64, big: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..5 {
        std::fs::write(
            dir.join(format!("sub/f{i}")),
            pseudo_random(4_000 + i * 777, seed + i as u64),
        )
        .unwrap();
    }
    std::fs::write(dir.join("big.bin"), pseudo_random(big, seed * 31)).unwrap();
    dir.to_path_buf()
}

fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let Ok(fans) = std::fs::read_dir(repo.join("data")) else {
        return v;
    };
    for d in fans {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

fn flip(path: &Path, at: isize) {
    let mut b = std::fs::read(path).unwrap();
    let i = if at < 0 {
        (b.len() as isize + at) as usize
    } else {
        at as usize
    };
    b[i] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

/// Two packs holding the same blobs: the second backup runs on a handle
/// whose index was read before the first one stored them.
fn twin_packs(repo: &Repo, src: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, String, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let open = || async {
            Repository::open(
                Backend::open(repo.path.to_str().unwrap()).unwrap(),
                repo.password.as_bytes(),
            )
            .await
            .unwrap()
        };
        let (first, stale) = (open().await, open().await);
        let opts = || BackupOptions {
            paths: vec![src.to_path_buf()],
            ..Default::default()
        };
        let lock = Lock::acquire(&first, false, "test", Default::default())
            .await
            .unwrap();
        let before = packs(&repo.path);
        let a = backup(&first, &lock, opts(), Arc::new(Progress::default()))
            .await
            .unwrap();
        let mid = packs(&repo.path);
        let b = backup(&stale, &lock, opts(), Arc::new(Progress::default()))
            .await
            .unwrap();
        lock.release().await.unwrap();
        let after = packs(&repo.path);
        let one: Vec<PathBuf> = mid.iter().filter(|p| !before.contains(p)).cloned().collect();
        let two: Vec<PathBuf> = after.iter().filter(|p| !mid.contains(p)).cloned().collect();
        (one, two, a.id.to_hex(), b.id.to_hex())
    })
}

/// Found: with a blob stored in two packs and one of them lost, prune
/// counted the blob used only where the index happened to place it, and
/// deleted the surviving copy as unused.
#[test]
fn a_lost_pack_with_a_twin_elsewhere_costs_nothing() {
    for lose_first in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repo::new(tmp.path());
        let src = tree(&tmp.path().join("src"), 1, 3 << 20);
        let (one, two, a, b) = twin_packs(&repo, &src);
        assert!(
            !one.is_empty() && !two.is_empty(),
            "the two backups should have stored twins"
        );
        // The data pack: its blobs are the same in both. (The trees differ
        // above the source, with /tmp's times.)
        let data = if lose_first { &one } else { &two }
            .iter()
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        std::fs::remove_file(data).unwrap();
        // Restores read the copy that is still there.
        for id in [&a, &b] {
            assert_eq!(
                repo.restore_diffs(id, &src, &tmp.path().join("r")),
                Vec::<String>::new()
            );
        }
        // Neither prune nor repair snapshots acts on an index naming lost packs.
        let o = repo.run(&["prune"]);
        assert_eq!(o.status.code(), Some(1), "{}", all(&o));
        assert!(all(&o).contains("repair index"), "{}", all(&o));
        let o = repo.run(&["repair", "snapshots"]);
        assert_eq!(o.status.code(), Some(1), "{}", all(&o));
        assert!(all(&o).contains("repair index"), "{}", all(&o));
        let out = repo.ok(&["repair", "index"]);
        assert!(out.contains("0 blobs lost"), "the twin holds them all: {out}");
        repo.ok(&["prune"]);
        repo.ok(&["check", "--read-data"]);
        for id in [&a, &b] {
            assert_eq!(
                repo.restore_diffs(id, &src, &tmp.path().join("r")),
                Vec::<String>::new()
            );
        }
    }
}

/// Found: a key file from another repository that opens with the same
/// password was taken for this one's (listing order decided), the config
/// then looked damaged, and `repair config` replaced the good config with
/// one sealed by the foreign key: every object then looked damaged.
#[test]
fn a_foreign_key_file_is_never_taken_for_the_repositorys() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 2, 100_000);
    let id = repo.backup(&src);
    let other = Repo::new(&tmp.path().join("other"));
    for k in std::fs::read_dir(other.path.join("keys")).unwrap() {
        let k = k.unwrap();
        std::fs::copy(k.path(), repo.path.join("keys").join(k.file_name())).unwrap();
    }
    assert!(repo.ok(&["snapshots"]).contains(&id[..8]));
    assert!(repo.ok(&["repair", "config"]).contains("sound"));
    assert_eq!(
        repo.restore_diffs(&id, &src, &tmp.path().join("r")),
        Vec::<String>::new()
    );
    // With only the foreign key opening, nothing is rewritten.
    let own: Vec<_> = std::fs::read_dir(repo.path.join("keys"))
        .unwrap()
        .map(|k| k.unwrap().path())
        .filter(|p| !other.path.join("keys").join(p.file_name().unwrap()).exists())
        .collect();
    let kept = tmp.path().join("own-key");
    std::fs::rename(&own[0], &kept).unwrap();
    let o = repo.run(&["repair", "config"]);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    assert!(all(&o).contains("belongs to another repository"), "{}", all(&o));
    std::fs::rename(&kept, &own[0]).unwrap();
    repo.ok(&["check", "--read-data"]);
}

/// Found: `restore --overwrite` removed the file it was to replace before
/// it knew the snapshot's data could be read: with a pack lost, the
/// user's own file was gone too.
#[test]
fn overwrite_keeps_the_existing_file_when_the_snapshot_cannot_replace_it() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("small.txt"), b"from the snapshot").unwrap();
    // small.txt's data in packs of its own, big.bin's in the one that goes.
    repo.backup(&src);
    let before = packs(&repo.path);
    std::fs::write(src.join("big.bin"), pseudo_random(2 << 20, 3)).unwrap();
    let id = repo.backup(&src);
    let target = tmp.path().join("t");
    let at = target.join(src.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(at.join("big.bin"), b"the user's precious file").unwrap();
    std::fs::write(at.join("small.txt"), b"old").unwrap();
    let data = packs(&repo.path)
        .into_iter()
        .filter(|p| !before.contains(p))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::remove_file(data).unwrap();
    let o = repo.run(&[
        "restore",
        &id[..8],
        "--target",
        target.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", all(&o));
    assert!(all(&o).contains("kept as it was"), "{}", all(&o));
    assert_eq!(
        std::fs::read(at.join("big.bin")).unwrap(),
        b"the user's precious file"
    );
    // What could be restored replaced what was there, and no temporary name is left.
    assert_eq!(std::fs::read(at.join("small.txt")).unwrap(), b"from the snapshot");
    let names: Vec<String> = std::fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".backer-restore")),
        "{names:?}"
    );
}

/// Found: one name object_store cannot represent (a control character,
/// bytes that are not UTF-8) made its listing, and so every command, fail.
#[test]
fn odd_names_anywhere_in_the_repository_are_skipped() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 4, 50_000);
    let id = repo.backup(&src);
    let names: [&[u8]; 4] = [
        b"esc\x1b[31mred",
        b"new\nline",
        b"not-utf8-\xff\xfe",
        b"tab\there",
    ];
    let fan = packs(&repo.path)[0].parent().unwrap().to_path_buf();
    for dir in [
        "keys",
        "index",
        "locks",
        "snapshots",
        "data",
        fan.to_str().unwrap(),
    ] {
        let d = repo.path.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        for n in names {
            std::fs::write(d.join(std::ffi::OsStr::from_bytes(n)), b"junk").unwrap();
        }
    }
    // A symlink loop is not followed either.
    std::os::unix::fs::symlink(".", repo.path.join("snapshots/loop")).unwrap();
    for args in [
        vec!["snapshots"],
        vec!["check", "--read-data"],
        vec!["prune", "--dry-run"],
        vec!["repair", "index", "--dry-run"],
        vec!["unlock", "--remove-all"],
    ] {
        let o = repo.run(&args);
        assert!(o.status.success(), "{args:?}: {}", all(&o));
        assert!(
            !all(&o).contains('\u{1b}'),
            "{args:?} printed a raw escape: {}",
            all(&o)
        );
    }
    assert_eq!(
        repo.restore_diffs(&id, &src, &tmp.path().join("r")),
        Vec::<String>::new()
    );
    repo.backup(&src);
}

/// Found: a key file or lock this user may not read (a key another user
/// added, written 0600) failed every command as a storage error.
#[test]
fn a_key_or_lock_this_user_cannot_read_is_passed_over() {
    assert!(is_root(), "this test runs backer as another user: run it as root");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 5, 50_000);
    let id = repo.backup(&src);
    let p2 = tmp.path().join("p2");
    std::fs::write(&p2, "second").unwrap();
    repo.ok(&["key", "add", "--new-password-file", p2.to_str().unwrap()]);
    // A lock of a live process (this one), left unreadable to nobody.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let r = Repository::open(Backend::open(repo.path.to_str().unwrap()).unwrap(), b"pw")
            .await
            .unwrap();
        Lock::acquire(&r, false, "test", Default::default())
            .await
            .unwrap()
    });
    // Everything is nobody's, but the key of the first password and the lock.
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&repo.path)
        .status()
        .unwrap();
    assert!(chown.success());
    let first_key = std::fs::read_dir(repo.path.join("keys"))
        .unwrap()
        .map(|k| k.unwrap().path())
        .min_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let lock = std::fs::read_dir(repo.path.join("locks"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for p in [&first_key, &lock] {
        Command::new("chown").args(["0:0"]).arg(p).status().unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_backer"))
            .args(args)
            .env("BACKER_REPO", &repo.path)
            .env("BACKER_PASSWORD", "second")
            .env("HOME", &out)
            .env_remove("BACKER_SERVER")
            .output()
            .unwrap()
    };
    for args in [
        vec!["snapshots"],
        vec!["check"],
        vec!["restore", &id[..8], "--target", out.join("r").to_str().unwrap()],
    ] {
        let o = as_nobody(&args);
        assert!(o.status.success(), "{args:?}: {}", all(&o));
    }
    let o = as_nobody(&["check"]);
    assert!(
        all(&o).contains("cannot be read") || all(&o).contains("unreadable"),
        "{}",
        all(&o)
    );
    drop(held);
}

/// Found: with B's index file and the header of its tree pack both damaged,
/// check called B's data pack "holds nothing a snapshot uses" (it cannot
/// know while B's trees are unreadable), and repair index deleted the tree
/// pack it could not parse.
#[test]
fn unreadable_trees_make_check_careful_and_repair_keeps_what_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let a = repo.backup(&tree(&tmp.path().join("a"), 6, 50_000));
    let before_b = packs(&repo.path);
    let index_before: Vec<_> = std::fs::read_dir(repo.path.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    repo.backup(&tree(&tmp.path().join("b"), 7, 2 << 20));
    let b_packs: Vec<PathBuf> = packs(&repo.path)
        .into_iter()
        .filter(|p| !before_b.contains(p))
        .collect();
    let b_index = std::fs::read_dir(repo.path.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !index_before.contains(p))
        .unwrap();
    let tree_pack = b_packs
        .iter()
        .min_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    flip(&b_index, 40);
    flip(&tree_pack, -10);
    let check = repo.run(&["check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(
        !all(&check).contains("holds nothing a snapshot uses"),
        "check cannot know what unreadable trees use: {}",
        all(&check)
    );
    let out = repo.ok(&["repair", "index"]);
    assert!(out.contains("lost+found"), "{out}");
    let kept = repo.path.join("lost+found").join(tree_pack.file_name().unwrap());
    assert!(
        kept.exists(),
        "the unreadable pack must be kept aside, not deleted"
    );
    repo.ok(&["repair", "snapshots"]);
    repo.ok(&["check", "--read-data"]);
    repo.ok(&["prune"]);
    assert_eq!(
        repo.restore_diffs(&a, &tmp.path().join("a"), &tmp.path().join("r")),
        Vec::<String>::new()
    );
}

/// Found: a backup after a pack was lost reused the blobs the index still
/// named and saved a snapshot that could not be restored; one with an
/// index file damaged could not read its parent and failed outright.
#[test]
fn backups_after_damage_heal_instead_of_failing_or_lying() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 8, 2 << 20);
    let before = packs(&repo.path);
    repo.backup(&src);
    for p in packs(&repo.path).into_iter().filter(|p| !before.contains(p)) {
        std::fs::remove_file(p).unwrap();
    }
    let again = repo.backup(&src);
    assert_eq!(
        repo.restore_diffs(&again, &src, &tmp.path().join("r")),
        Vec::<String>::new(),
        "the backup after the loss must store the lost data again"
    );
    // An index file damaged: the backup reads every file and succeeds.
    let index = std::fs::read_dir(repo.path.join("index"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    flip(&index, 30);
    let third = repo.backup(&src);
    assert_eq!(
        repo.restore_diffs(&third, &src, &tmp.path().join("r")),
        Vec::<String>::new()
    );
    repo.ok(&["repair", "index"]);
    repo.ok(&["repair", "snapshots"]);
    repo.ok(&["prune"]);
    repo.ok(&["check", "--read-data"]);
    assert_eq!(
        repo.restore_diffs(&third, &src, &tmp.path().join("r")),
        Vec::<String>::new()
    );
}

/// Found: a snapshot sharing a damaged tree with one repaired before it was
/// rewritten with no record of what it lost, and a repair killed between
/// writing a snapshot and removing the original left two copies on rerun.
#[test]
fn repaired_snapshots_sharing_trees_each_say_what_they_lost_and_reruns_do_not_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 9, 2 << 20);
    let before = packs(&repo.path);
    repo.backup(&src);
    let data = packs(&repo.path)
        .into_iter()
        .filter(|p| !before.contains(p))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    repo.ok(&["backup", src.to_str().unwrap(), "--force"]);
    flip(&data, 1000);
    repo.ok(&["repair", "index", "--read-data"]);
    let originals: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(repo.path.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let out = repo.ok(&["repair", "snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rewritten = v["rewritten"].as_array().unwrap();
    assert_eq!(rewritten.len(), 2, "{v}");
    for r in rewritten {
        assert!(
            !r["dropped"].as_array().unwrap().is_empty(),
            "each says what it lost: {v}"
        );
    }
    // As if killed before an original went: put it back, repair again.
    std::fs::write(&originals[0].0, &originals[0].1).unwrap();
    std::fs::set_permissions(&originals[0].0, std::fs::Permissions::from_mode(0o644)).unwrap();
    repo.ok(&["repair", "snapshots"]);
    let list: serde_json::Value = serde_json::from_str(&repo.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "a rerun must not repair twice: {list}"
    );
    for s in list.as_array().unwrap() {
        let files = s["summary"]["files"].as_u64().unwrap();
        assert_eq!(files, 5, "the summary counts what is left: {s}");
    }
}
