//! Damage at rest: one object of a repository holding three snapshots is
//! damaged at a time (a snapshot, an index file, a key, a lock, a data pack,
//! a tree pack, the config; a flipped byte, cut in half, emptied, deleted,
//! or a stray name beside it), and the real `backer` binary is run as a
//! user would: list, restore each snapshot, check, back up, prune, then the
//! repair the messages point to, and prune again.
//!
//! For every case the suite shows what still works and what repair brings
//! back, and holds these lines:
//! - snapshots whose objects are undamaged always restore byte for byte,
//!   before repair, after it and after a prune;
//! - check never calls a pack unused while it holds what a snapshot uses;
//! - after the repair, `check --read-data` is clean and `prune` runs;
//! - the damaged snapshot restores whole when nothing it needs is lost,
//!   and otherwise every file it restores is whole and the ones it lost
//!   are named.
//!
//! Its table is docs/RELIABILITY.md's "damage at rest".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backer_repo::Repository;
use backer_repo::id::{BlobId, PackId};
use backer_repo::pack::pack_name;
use backer_repo::tree::Extent;
use backer_testkit::{compare_trees, figures, pseudo_random};

const P1: &str = "first password";
const P2: &str = "second password";

/// The fixture: a repository with snapshots A, B and C of three trees, two
/// passwords, and the names of the objects B depends on.
struct Fixture {
    dir: tempfile::TempDir,
    repo: PathBuf,
    src: [PathBuf; 3],
    /// Snapshot ids of A, B, C.
    ids: [String; 3],
    b_index: String,
    b_data_pack: String,
    b_tree_pack: String,
    p1_key: String,
    /// Every pack of the fixture: none may ever be called unused.
    packs: BTreeSet<String>,
}

fn run_with(repo: &Path, password: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backer"))
        .env("BACKER_REPO", repo)
        .env("BACKER_PASSWORD", password)
        .env("BACKER_LOCK_STALE_SECS", "600")
        .env_remove("BACKER_PASSWORD_FILE")
        .env_remove("BACKER_SERVER")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn write_tree(root: &Path, seed: u64, files: usize, big: usize) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    for i in 0..files {
        let place = match i % 3 {
            0 => format!("f{i}.txt"),
            1 => format!("sub/f{i}.dat"),
            _ => format!("sub/deeper/f{i}.bin"),
        };
        std::fs::write(
            root.join(place),
            pseudo_random(1_000 + i * 3_000, seed * 100 + i as u64),
        )
        .unwrap();
    }
    if big > 0 {
        std::fs::write(root.join("big.bin"), pseudo_random(big, seed * 7 + 1)).unwrap();
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let src = [dir.path().join("a"), dir.path().join("b"), dir.path().join("c")];
    write_tree(&src[0], 1, 12, 0);
    write_tree(&src[1], 2, 12, 20 << 20);
    write_tree(&src[2], 3, 12, 0);
    let ok = |args: &[&str]| {
        let o = run_with(&repo, P1, args);
        assert!(o.status.success(), "backer {args:?}: {}", text(&o));
        o
    };
    ok(&["init"]);
    let p2 = dir.path().join("p2");
    std::fs::write(&p2, P2).unwrap();
    ok(&["key", "add", "--new-password-file", p2.to_str().unwrap()]);
    let mut ids: Vec<String> = Vec::new();
    for s in &src {
        let o = ok(&["backup", s.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }

    // Which objects B depends on, read through the engine.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (b_index, b_data_pack, b_tree_pack, p1_key, packs) = rt.block_on(async {
        let r = Repository::open(
            backer_repo::Backend::open(repo.to_str().unwrap()).unwrap(),
            P1.as_bytes(),
        )
        .await
        .unwrap();
        let b = r.load_snapshot(&ids[1].parse().unwrap()).await.unwrap();
        // Down the backed-up path (snapshots record absolute paths) to b/.
        let mut tree = r.load_tree(&b.tree).await.unwrap();
        for comp in src[1].components().skip(1) {
            let name = comp.as_os_str().as_encoded_bytes();
            let sub = tree.find(name).and_then(|n| n.subtree).unwrap();
            tree = r.load_tree(&sub).await.unwrap();
        }
        let first: BlobId = match tree.find(b"big.bin").unwrap().content[0] {
            Extent::Data { id, .. } => id,
            Extent::Hole { .. } => panic!("big.bin starts with a hole"),
        };
        let data_pack: PackId = r.index().get(&first).unwrap().pack;
        let tree_pack: PackId = r.index().get(&b.tree).unwrap().pack;
        let (files, damaged) = r.load_index_files().await.unwrap();
        assert!(damaged.is_empty());
        let b_index = files
            .iter()
            .find(|(_, f)| f.packs.iter().any(|p| p.id == data_pack))
            .map(|(id, _)| id.to_hex())
            .unwrap();
        let packs = r.index().packs().map(|(id, _)| id.to_hex()).collect();
        (
            b_index,
            pack_name(&data_pack),
            pack_name(&tree_pack),
            r.key_id().unwrap().to_hex(),
            packs,
        )
    });
    Fixture {
        dir,
        repo,
        src,
        ids: [ids[0].clone(), ids[1].clone(), ids[2].clone()],
        b_index,
        b_data_pack,
        b_tree_pack,
        p1_key,
        packs,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Object {
    Snapshot,
    Index,
    Key,
    Lock,
    DataPack,
    TreePack,
    Config,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    Flip,
    Truncate,
    Empty,
    Delete,
    Stray,
}

impl Fixture {
    /// The object's name in the repository, and the folder a stray goes in.
    fn target(&self, o: Object) -> (String, &'static str) {
        match o {
            Object::Snapshot => (format!("snapshots/{}", self.ids[1]), "snapshots"),
            Object::Index => (format!("index/{}", self.b_index), "index"),
            Object::Key => (format!("keys/{}", self.p1_key), "keys"),
            Object::Lock => (String::new(), "locks"),
            Object::DataPack => (self.b_data_pack.clone(), "data"),
            Object::TreePack => (self.b_tree_pack.clone(), "data/00"),
            Object::Config => ("config".into(), ""),
        }
    }
}

/// What one restore gave: whole, or which files are missing or wrong.
fn restore(repo: &Path, password: &str, id: &str, src: &Path, into: &Path) -> (i32, Vec<String>) {
    let _ = std::fs::remove_dir_all(into);
    let o = run_with(
        repo,
        password,
        &["restore", &id[..12], "--target", into.to_str().unwrap()],
    );
    let restored = into.join(src.strip_prefix("/").unwrap());
    // Nothing restored: every entry is missing.
    std::fs::create_dir_all(&restored).unwrap();
    (code(&o), compare_trees(src, &restored))
}

/// Differences that are only files missing from the restore (lost, and
/// named), not files restored wrong; directories emptied by a repair leave
/// their entries missing too.
fn only_missing(diffs: &[String]) -> bool {
    diffs
        .iter()
        .all(|d| d.starts_with("missing in restore: ") || d.ends_with(": mtime differs"))
}

struct Row {
    case: String,
    cells: Vec<String>,
}

fn cell(o: &Output) -> String {
    match code(o) {
        0 => "ok".into(),
        3 => "partial".into(),
        c => format!("fails({c})"),
    }
}

fn restore_cell((c, diffs): &(i32, Vec<String>)) -> String {
    match (c, diffs.is_empty()) {
        (0, true) => "whole".into(),
        (_, true) => format!("whole({c})"),
        (_, false) if only_missing(diffs) => format!("{} lost", diffs.len()),
        _ => format!("WRONG({c})"),
    }
}

fn damage(f: &Fixture, repo: &Path, object: Object, how: Damage) {
    if object == Object::Lock && how != Damage::Stray {
        // A lock left by a process that is still alive (this one): only
        // damage makes it stale.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = Repository::open(
                backer_repo::Backend::open(repo.to_str().unwrap()).unwrap(),
                P1.as_bytes(),
            )
            .await
            .unwrap();
            let lock = backer_repo::lock::Lock::acquire(&r, true, "damage test", Default::default())
                .await
                .unwrap();
            drop(lock); // left behind, as by a process that hangs
        });
    }
    let (name, folder) = if object == Object::Lock {
        let lock = std::fs::read_dir(repo.join("locks"))
            .ok()
            .and_then(|mut d| d.next());
        (
            lock.map(|e| format!("locks/{}", e.unwrap().file_name().to_string_lossy()))
                .unwrap_or_default(),
            "locks",
        )
    } else {
        f.target(object)
    };
    let path = repo.join(&name);
    match how {
        Damage::Flip => {
            let mut b = std::fs::read(&path).unwrap();
            let at = b.len() / 3;
            b[at] ^= 0x55;
            std::fs::write(&path, b).unwrap();
        }
        Damage::Truncate => {
            let b = std::fs::read(&path).unwrap();
            std::fs::write(&path, &b[..b.len() / 2]).unwrap();
        }
        Damage::Empty => std::fs::write(&path, b"").unwrap(),
        Damage::Delete => std::fs::remove_file(&path).unwrap(),
        Damage::Stray => {
            let dir = repo.join(folder);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
            std::fs::write(dir.join("README"), b"do not touch\n").unwrap();
            std::fs::write(dir.join(format!("{}.sync-conflict", "ab".repeat(32))), b"x").unwrap();
        }
    }
}

/// The repair a user is pointed to, as commands.
fn repairs(f: &Fixture, object: Object, how: Damage) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if how == Damage::Stray {
        return vec![];
    }
    match object {
        Object::Snapshot => vec![v(&["repair", "snapshots"])],
        Object::Index => vec![v(&["repair", "index"])],
        Object::Key if how == Damage::Delete => vec![],
        Object::Key => vec![v(&["key", "remove", &f.p1_key[..8]])],
        Object::Lock => vec![v(&["unlock"])],
        Object::DataPack | Object::TreePack => {
            vec![
                v(&["repair", "index", "--read-data"]),
                v(&["repair", "snapshots"]),
            ]
        }
        Object::Config => vec![v(&["repair", "config"])],
    }
}

#[test]
fn damage_at_rest_is_reported_skipped_and_repaired() {
    let f = fixture();
    let work = f.dir.path().join("work");
    let objects = [
        Object::Snapshot,
        Object::Index,
        Object::Key,
        Object::Lock,
        Object::DataPack,
        Object::TreePack,
        Object::Config,
    ];
    let damages = [
        Damage::Flip,
        Damage::Truncate,
        Damage::Empty,
        Damage::Delete,
        Damage::Stray,
    ];
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for object in objects {
        for how in damages {
            let case = format!("{object:?} {how:?}");
            let repo = work.join("repo");
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
            let cp = Command::new("cp")
                .arg("-a")
                .arg(&f.repo)
                .arg(&repo)
                .status()
                .unwrap();
            assert!(cp.success());
            damage(&f, &repo, object, how);
            // With the first password's key damaged, the second opens.
            let pw = if object == Object::Key { P2 } else { P1 };
            let run = |args: &[&str]| run_with(&repo, pw, args);
            let mut fail = |what: String| failures.push(format!("{case}: {what}"));

            let listed = run(&["snapshots", "--json"]);
            let restores: Vec<(i32, Vec<String>)> = (0..3)
                .map(|i| restore(&repo, pw, &f.ids[i], &f.src[i], &work.join(format!("r{i}"))))
                .collect();
            let check = run(&["check"]);
            let read = run(&["check", "--read-data"]);
            let d = work.join("d");
            write_tree(&d, 9, 3, 0);
            let backup = run(&["backup", d.to_str().unwrap()]);
            let prune_n = run(&["prune", "--dry-run"]);

            // Undamaged snapshots restore whole, whatever else is damaged;
            // only a lost config closes the repository (and says how to mend it).
            for i in [0, 2] {
                if object == Object::Config && how != Damage::Stray {
                    if !text(&listed).contains("repair config") {
                        fail(format!("no hint at `repair config`: {}", text(&listed)));
                    }
                } else if restores[i].0 != 0 || !restores[i].1.is_empty() {
                    fail(format!("snapshot {i} did not restore whole: {:?}", restores[i]));
                }
            }
            for out in [&check, &read] {
                for line in text(out)
                    .lines()
                    .filter(|l| l.contains("holds nothing a snapshot uses"))
                {
                    if f.packs.iter().any(|p| line.contains(p.as_str())) {
                        fail(format!("check called a used pack unused: {line}"));
                    }
                }
            }
            // Damage that loses something is reported by check, naming the object.
            // A lock is stale once unreadable; a deleted key or snapshot
            // file leaves nothing behind to report.
            let harmless = how == Damage::Stray
                || matches!(object, Object::Lock | Object::Config)
                || (how == Damage::Delete && matches!(object, Object::Key | Object::Snapshot));
            let lossy = !harmless;
            let (name, _) = f.target(object);
            let seen = |o: &Output| code(o) != 0;
            if lossy && !seen(&read) {
                fail(format!("check --read-data found nothing: {}", text(&read)));
            }
            if lossy && object != Object::DataPack && !seen(&check) {
                fail(format!("check found nothing: {}", text(&check)));
            }
            if lossy
                && how != Damage::Delete
                && matches!(object, Object::Snapshot | Object::Index | Object::Key)
                && !text(&read).contains(name.rsplit('/').next().unwrap())
            {
                fail(format!("check does not name {name}: {}", text(&read)));
            }
            // A password whose key file is damaged says so.
            if object == Object::Key && lossy {
                let p1 = run_with(&repo, P1, &["snapshots"]);
                if code(&p1) == 0 || !text(&p1).contains(&f.p1_key) {
                    fail(format!("the damaged key's password: {}", text(&p1)));
                }
            }

            // The repair the messages point to, then everything checks clean.
            let mut repair_out = String::new();
            let mut repair_ok = true;
            for cmd in repairs(&f, object, how) {
                let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                let o = run(&args);
                repair_ok &= o.status.success();
                repair_out.push_str(&text(&o));
                if !o.status.success() {
                    fail(format!("{cmd:?} failed: {}", text(&o)));
                }
            }
            let after = run(&["check", "--read-data"]);
            if code(&after) != 0 {
                fail(format!("check --read-data after repair: {}", text(&after)));
            }
            // B again, under whatever id repair gave it.
            let list: serde_json::Value =
                serde_json::from_slice(&run(&["snapshots", "--json"]).stdout).unwrap_or_default();
            let b_now = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["paths"][0].as_str() == f.src[1].to_str());
            let b_after = match b_now {
                Some(s) => {
                    let id = s["id"].as_str().unwrap().to_string();
                    let r = restore(&repo, pw, &id, &f.src[1], &work.join("rb"));
                    if r.0 != 0 || !only_missing(&r.1) {
                        fail(format!("repaired B restored wrong: {r:?}"));
                    }
                    restore_cell(&r)
                }
                None => "gone".into(),
            };
            if b_now.is_none() && !(object == Object::Snapshot && how != Damage::Stray) {
                fail("B is gone although its snapshot file was whole".into());
            }
            let prune = run(&["prune"]);
            if !prune.status.success() {
                fail(format!("prune after repair: {}", text(&prune)));
            }
            for i in [0, 2] {
                let r = restore(&repo, pw, &f.ids[i], &f.src[i], &work.join(format!("p{i}")));
                if r.0 != 0 || !r.1.is_empty() {
                    fail(format!("snapshot {i} after repair and prune: {r:?}"));
                }
            }
            let clean = run(&["check", "--read-data"]);
            if code(&clean) != 0 {
                fail(format!("check after prune: {}", text(&clean)));
            }

            rows.push(Row {
                case,
                cells: vec![
                    cell(&listed),
                    restore_cell(&restores[0]),
                    restore_cell(&restores[1]),
                    restore_cell(&restores[2]),
                    cell(&check),
                    cell(&read),
                    cell(&backup),
                    cell(&prune_n),
                    if repairs(&f, object, how).is_empty() {
                        "none needed".into()
                    } else if repair_ok {
                        "ok".into()
                    } else {
                        "FAILED".into()
                    },
                    b_after,
                    cell(&clean),
                ],
            });
            let _ = repair_out;
        }
    }
    let header = [
        "case",
        "snapshots",
        "restore A",
        "restore B",
        "restore C",
        "check",
        "check -r",
        "backup",
        "prune -n",
        "repair",
        "B after",
        "clean",
    ];
    figures("damage", header.join(" | "));
    for r in &rows {
        figures("damage", format!("{} | {}", r.case, r.cells.join(" | ")));
    }
    figures(
        "damage",
        format!("{} cases, {} failures", rows.len(), failures.len()),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
