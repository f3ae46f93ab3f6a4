//! Backups, forgets and prunes running at the same time as separate
//! processes, some killed with SIGKILL at random moments. Afterwards the
//! repository checks clean and every listed snapshot restores byte-identical
//! to what was backed up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backer_testkit::{Moto, compare_trees};
use serde_json::Value;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| (r.next() >> 32) as u8).collect()
}

/// Iteration `i`'s tree: 24 files, each rewritten every few iterations, so
/// consecutive snapshots share most chunks and prune has real work.
fn write_tree(dir: &Path, i: u64) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for j in 0..24u64 {
        let version = if j % 4 == i % 4 { i } else { 0 };
        let len = 20_000 + (j as usize * 97_000) % 900_000;
        let name = if j % 3 == 0 {
            format!("sub/f{j}")
        } else {
            format!("f{j}")
        };
        std::fs::write(dir.join(name), bytes(j * 1000 + version, len)).unwrap();
    }
}

struct Repo {
    url: String,
    env: Vec<(String, String)>,
}

impl Repo {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backer"));
        c.env("BACKER_REPO", &self.url)
            .env("BACKER_PASSWORD", "pw")
            // S3 repositories keep their copies here, not in the user's cache.
            .env("XDG_CACHE_HOME", concat!(env!("CARGO_TARGET_TMPDIR"), "/cache"))
            .args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "backer {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn torture(repo: &Repo, tmp: &Path, seed: u64) {
    repo.ok(&["init", "-q"]);
    let mut rng = Rng(seed);
    let mut kills = 0;
    let rounds = 14u64;
    for i in 0..rounds {
        let dir = tmp.join(format!("data/iter-{i}"));
        write_tree(&dir, i);
        let tag = format!("iter-{i}");
        let mut procs = vec![repo.spawn(&[
            "backup",
            "-q",
            "--retry-lock",
            "2m",
            "--tag",
            &tag,
            dir.to_str().unwrap(),
        ])];
        if i > 0 {
            let prev = tmp.join(format!("data/iter-{}", i - 1));
            procs.push(repo.spawn(&[
                "backup",
                "-q",
                "--retry-lock",
                "2m",
                "--tag",
                &format!("iter-{}", i - 1),
                prev.to_str().unwrap(),
            ]));
        }
        match rng.below(3) {
            0 => procs.push(repo.spawn(&["prune", "-q", "--retry-lock", "2m", "--max-unused", "0%"])),
            1 => procs.push(repo.spawn(&[
                "forget",
                "-q",
                "--retry-lock",
                "2m",
                "--keep-last",
                "4",
                "--group-by",
                "",
                "--prune",
                "--max-unused",
                "0%",
            ])),
            _ => {}
        }
        // Kill one of them at a random moment (or none).
        if rng.below(4) != 0 {
            let victim = rng.below(procs.len() as u64) as usize;
            std::thread::sleep(Duration::from_millis(rng.below(250)));
            if procs[victim].try_wait().unwrap().is_none() {
                procs[victim].kill().unwrap();
                kills += 1;
            }
        }
        for mut p in procs {
            p.wait().unwrap();
        }
    }
    eprintln!("torture (seed {seed:#x}): {rounds} rounds, {kills} processes killed with SIGKILL");

    // Killed processes left locks; they are recognised as stale and removed.
    repo.ok(&["unlock"]);
    let check: Value = serde_json::from_str(&repo.ok(&["check", "--read-data", "--json"])).unwrap();
    assert_eq!(check["ok"], true, "{check}");
    // A last prune after the kills still leaves everything consistent.
    repo.ok(&["prune", "-q", "--max-unused", "0%"]);
    let check: Value = serde_json::from_str(&repo.ok(&["check", "--read-data", "--json"])).unwrap();
    assert_eq!(check["ok"], true, "{check}");
    assert!(
        check["warnings"].as_array().unwrap().is_empty(),
        "prune leaves no orphan: {check}"
    );

    let snaps: Value = serde_json::from_str(&repo.ok(&["snapshots", "--json"])).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert!(!snaps.is_empty());
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        let tag = s["tags"][0].as_str().unwrap();
        let src = tmp.join("data").join(tag);
        let out = tmp.join("restored").join(id);
        repo.ok(&["restore", "-q", id, "--target", out.to_str().unwrap()]);
        let diffs = compare_trees(&src, &out.join(src.strip_prefix("/").unwrap()));
        assert!(
            diffs.is_empty(),
            "snapshot {id} ({tag}) differs:\n{}",
            diffs.join("\n")
        );
    }
    eprintln!("torture: {} snapshots restored byte-identical", snaps.len());
}

#[test]
fn concurrent_backups_and_prunes_with_kills_on_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo {
        url: tmp.path().join("repo").to_str().unwrap().into(),
        env: vec![],
    };
    torture(&repo, tmp.path(), 0x5eed_0001);
}

#[test]
fn concurrent_backups_and_prunes_with_kills_on_s3() {
    let moto = Moto::start();
    moto.create_bucket("torture");
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo {
        url: moto.url("torture", "r"),
        env: Moto::env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    torture(&repo, tmp.path(), 0x5eed_0002);
}

#[test]
fn a_paused_backup_whose_lock_expired_stops_instead_of_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for j in 0..40u64 {
        std::fs::write(src.join(format!("f{j}")), bytes(j, 4_000_000)).unwrap();
    }
    let kill = |signal: &str, pid: &str| {
        assert!(
            Command::new("kill")
                .args([signal, pid])
                .status()
                .unwrap()
                .success()
        );
    };
    // The pause must land before the backup wrote its snapshot: on a busy
    // machine a fast backup can be done first. Then it is tried again.
    for attempt in 0..5 {
        let repo_dir = tmp.path().join(format!("repo{attempt}"));
        let repo = Repo {
            url: repo_dir.to_str().unwrap().into(),
            // Locks go stale after 3 s (refresh 0.5 s, valid 2 s) instead of 30 min.
            env: vec![("BACKER_LOCK_STALE_SECS".into(), "3".into())],
        };
        repo.ok(&["init", "-q"]);
        let backup = repo
            .cmd(&["backup", "-q", src.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Pause it as soon as it holds its lock: named, not still being
        // written (`NAME#DIGITS`). A pause in the middle of that write
        // would leave a lock that is fresh once written, after the prune.
        let locks = repo_dir.join("locks");
        let named = || {
            std::fs::read_dir(&locks).is_ok_and(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| !e.file_name().to_string_lossy().contains('#'))
            })
        };
        while !named() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = backup.id().to_string();
        kill("-STOP", &pid);
        let saved = std::fs::read_dir(repo_dir.join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| !e.file_name().to_string_lossy().contains('#'))
            })
            .unwrap_or(false);
        if saved {
            kill("-CONT", &pid);
            assert!(backup.wait_with_output().unwrap().status.success());
            continue;
        }
        std::thread::sleep(Duration::from_secs(4));
        // Its lock is stale now: a prune runs (and removes the paused backup's packs).
        repo.ok(&["prune", "-q"]);
        kill("-CONT", &pid);
        let out = backup.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("stopped before writing"), "{err}");
        let snaps: Value = serde_json::from_str(&repo.ok(&["snapshots", "--json"])).unwrap();
        assert_eq!(
            snaps.as_array().unwrap().len(),
            0,
            "no snapshot from the paused backup"
        );
        let check: Value = serde_json::from_str(&repo.ok(&["check", "--read-data", "--json"])).unwrap();
        assert_eq!(check["ok"], true, "{check}");
        return;
    }
    panic!("the backup wrote its snapshot before it could be paused, five times");
}
