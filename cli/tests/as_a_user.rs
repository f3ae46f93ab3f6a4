//! `backer` tried as a new user would, where it used to surprise: which
//! snapshot `latest` means, which place a command goes to, output into a
//! closed pipe, names that could forge output, file modes, read-only
//! storage, a prune that waited for a backup, locks left by failed
//! commands, and a restore missing data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use backer_testkit::{compare_trees, figures, is_root, pseudo_random};
use serde_json::Value;

struct Repo {
    path: PathBuf,
}

impl Repo {
    fn new(dir: &Path) -> Repo {
        let r = Repo {
            path: dir.join("repo"),
        };
        r.ok(&["init"]);
        r
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backer"));
        c.env("BACKER_REPO", &self.path)
            .env("BACKER_PASSWORD", "pw")
            .env_remove("BACKER_SERVER")
            .env_remove("BACKER_PASSWORD_FILE")
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "backer {args:?}: {}", all(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Backs up `src` recording `host`; returns the snapshot id.
    fn backup_as(&self, src: &Path, host: Option<&str>) -> String {
        let mut args = vec!["backup", src.to_str().unwrap()];
        if let Some(h) = host {
            args.extend(["--host", h]);
        }
        self.json(&args)["id"].as_str().unwrap().to_string()
    }
}

fn all(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tree(dir: &Path, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..6 {
        std::fs::write(
            dir.join(format!("sub/f{i}")),
            pseudo_random(5_000 + i * 999, seed + i as u64),
        )
        .unwrap();
    }
    dir.to_path_buf()
}

fn restored_id(out: &str) -> String {
    let v: Value = serde_json::from_str(out).unwrap();
    v["snapshot"].as_str().unwrap().to_string()
}

#[test]
fn latest_is_this_hosts_snapshot_and_client_means_host() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let mine = repo.backup_as(&tree(&tmp.path().join("mine"), 1), None);
    // Another machine backs up later into the same repository.
    let theirs = repo.backup_as(&tree(&tmp.path().join("theirs"), 2), Some("elsewhere"));
    let target = tmp.path().join("r");
    let out = repo.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        restored_id(&out),
        mine,
        "latest must be this host's snapshot, not the newest of any host"
    );
    let out = repo.ok(&[
        "restore",
        "latest",
        "--host",
        "elsewhere",
        "--target",
        tmp.path().join("r2").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(restored_id(&out), theirs);
    // --client works in a repository too (a server's clients are its hosts).
    let listed = repo.ok(&["ls", "latest", "--client", "elsewhere"]);
    assert!(listed.contains("theirs"), "{listed}");
    assert!(!listed.contains("/mine"), "{listed}");

    // Only other hosts' snapshots, of several hosts: refused, naming them.
    let other = Repo::new(&tmp.path().join("o"));
    other.backup_as(&tree(&tmp.path().join("a"), 3), Some("host-a"));
    other.backup_as(&tree(&tmp.path().join("b"), 4), Some("host-b"));
    let o = other.run(&[
        "restore",
        "latest",
        "--target",
        tmp.path().join("r3").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        all(&o).contains("host-a, host-b") && all(&o).contains("--host"),
        "{}",
        all(&o)
    );
    assert!(
        !tmp.path().join("r3").exists(),
        "nothing may be restored on an ambiguous latest"
    );
    let o = other.run(&["ls", "latest", "--host", "nobody"]);
    assert!(all(&o).contains("no snapshot of host nobody"), "{}", all(&o));
}

#[test]
fn an_explicit_repo_wins_over_an_exported_server() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let id = repo.backup_as(&tree(&tmp.path().join("src"), 1), None);
    // Nothing listens there: a command sent to it would fail.
    let server = "127.0.0.1:9";
    let mut c = repo.cmd(&["snapshots", "--repo", repo.path.to_str().unwrap(), "--json"]);
    let o = c.env("BACKER_SERVER", server).output().unwrap();
    assert!(o.status.success(), "{}", all(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id));
    for args in [
        vec!["ls", "latest", "--repo", repo.path.to_str().unwrap()],
        vec![
            "restore",
            "latest",
            "--repo",
            repo.path.to_str().unwrap(),
            "--target",
            tmp.path().join("r").to_str().unwrap(),
        ],
    ] {
        let o = repo.cmd(&args).env("BACKER_SERVER", server).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", all(&o));
    }
    // Both only exported: the user says which.
    let o = repo
        .cmd(&["snapshots"])
        .env("BACKER_SERVER", server)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        all(&o).contains("both BACKER_REPO and BACKER_SERVER are set"),
        "{}",
        all(&o)
    );
    // --server on the command line means the server.
    let o = repo.cmd(&["snapshots", "--server", server]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(&id),
        "went to the repository: {}",
        all(&o)
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    for i in 0..3 {
        repo.backup_as(&tree(&tmp.path().join(format!("s{i}")), i), None);
    }
    for args in [
        vec!["snapshots"],
        vec!["ls", "latest"],
        vec!["ls", "latest", "--json"],
    ] {
        let mut child = repo
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before a line is written, as `| head -0` does.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        // Quietly and successfully: the reader wanted no more. Not by
        // SIGPIPE either, which would also kill a client whose server hung up.
        assert!(o.status.success(), "{args:?}: ended with {:?}: {err}", o.status);
    }
}

#[test]
fn names_that_could_forge_output_are_escaped_in_text() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let evil = "x\nforged line\u{1b}[2J\u{202e}gpj.exe";
    std::fs::write(src.join(evil), b"hello").unwrap();
    repo.backup_as(&src, None);
    let text = repo.ok(&["ls", "latest", "-l"]);
    assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'), "{text:?}");
    assert!(text.lines().all(|l| !l.starts_with("forged line")), "{text:?}");
    assert!(
        text.contains("x\\nforged line\\x1b[2J\\u{202e}gpj.exe"),
        "{text:?}"
    );
    // JSON carries the name as it is.
    let json = repo.ok(&["ls", "latest", "--json"]);
    let names: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(names.iter().any(|n| n.ends_with(evil)), "{names:?}");
}

#[test]
fn keys_are_private_and_nothing_is_group_writable() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_path = tmp.path().join("repo");
    // Whatever the umask.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 000; exec '{}' init", env!("CARGO_BIN_EXE_backer")))
        .env("BACKER_REPO", &repo_path)
        .env("BACKER_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", all(&o));
    let repo = Repo {
        path: repo_path.clone(),
    };
    let pwfile = tmp.path().join("p2");
    std::fs::write(&pwfile, "second").unwrap();
    repo.ok(&["key", "add", "--new-password-file", pwfile.to_str().unwrap()]);
    repo.backup_as(&tree(&tmp.path().join("src"), 1), None);
    let mut files = 0;
    let mut stack = vec![repo_path.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o777;
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            files += 1;
            assert_eq!(
                mode & 0o022,
                0,
                "{} is writable by group or others ({mode:o})",
                p.display()
            );
            if p.parent().unwrap().ends_with("keys") {
                assert_eq!(mode, 0o600, "key file {} is {mode:o}", p.display());
            }
        }
    }
    // Key management: list marks the key in use; remove refuses it, takes another.
    let list = repo.json(&["key", "list"]);
    let keys: Vec<&Value> = list.as_array().unwrap().iter().collect();
    assert_eq!(keys.len(), 2);
    let in_use = keys.iter().find(|k| k["state"] == "in use").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = keys.iter().find(|k| k["state"] != "in use").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = repo.run(&["key", "remove", &in_use[..8]]);
    assert!(
        !o.status.success() && all(&o).contains("opened with"),
        "{}",
        all(&o)
    );
    repo.ok(&["key", "remove", &other[..8]]);
    let o = repo
        .cmd(&["snapshots", "--password-file", pwfile.to_str().unwrap()])
        .env_remove("BACKER_PASSWORD")
        .output()
        .unwrap();
    assert!(
        all(&o).contains("wrong password"),
        "a removed key still opens: {}",
        all(&o)
    );
    figures(
        "as_a_user",
        format!("{files} repository files: keys 0600, none group- or other-writable under umask 000"),
    );
}

#[test]
fn read_only_storage_is_read_with_no_lock() {
    if !is_root() {
        panic!("this test makes storage read-only by running backer as another user: run it as root");
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tree(&tmp.path().join("src"), 7);
    repo.backup_as(&src, None);
    // The repository stays root's: to `nobody` it is readable, not writable
    // (as a mounted backup disk or a read-only bucket policy).
    let keys = repo.path.join("keys");
    for k in std::fs::read_dir(&keys).unwrap() {
        std::fs::set_permissions(k.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_backer"))
            .args(args)
            .env("BACKER_REPO", &repo.path)
            .env("BACKER_PASSWORD", "pw")
            .env("HOME", &out)
            .env_remove("BACKER_SERVER")
            .output()
            .unwrap()
    };
    let target = out.join("r");
    let t = target.to_str().unwrap();
    let locked = as_nobody(&["restore", "latest", "--target", t]);
    assert_eq!(locked.status.code(), Some(1));
    assert!(
        all(&locked).contains("--no-lock"),
        "the error should point at --no-lock: {}",
        all(&locked)
    );
    let o = as_nobody(&["restore", "latest", "--target", t, "--no-lock"]);
    assert!(o.status.success(), "{}", all(&o));
    assert!(
        compare_trees(&src, &target.join(src.strip_prefix("/").unwrap()))
            .iter()
            .all(|d| d.contains("owner"))
    );
    let o = as_nobody(&["check", "--read-data", "--no-lock"]);
    assert!(o.status.success(), "{}", all(&o));
    let o = as_nobody(&["backup", src.to_str().unwrap(), "--no-lock"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        all(&o).contains("--no-lock is only for commands that read"),
        "{}",
        all(&o)
    );
    assert_eq!(
        std::fs::read_dir(repo.path.join("locks"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// Starts `backer ARGS`, waits until it holds a lock, and sends it `signal`;
/// returns its output.
fn interrupted(repo: &Repo, args: &[&str], signal: rustix::process::Signal) -> Output {
    let child = repo
        .cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let locks = repo.path.join("locks");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&locks).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "backer {args:?} never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, signal).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        std::fs::read_dir(&locks).unwrap().count(),
        0,
        "the lock is gone: {}",
        all(&o)
    );
    o
}

#[test]
fn an_interrupted_command_releases_its_lock_and_says_what_it_left() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("big{i}")), pseudo_random(48 << 20, 500 + i)).unwrap();
    }
    let o = interrupted(
        &repo,
        &["backup", src.to_str().unwrap()],
        rustix::process::Signal::INT,
    );
    assert_eq!(o.status.code(), Some(130), "{:?}: {}", o.status, all(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("interrupted: no snapshot was saved")
            && said.contains("the repository lock is released"),
        "{said}"
    );
    assert_eq!(repo.json(&["snapshots"]).as_array().unwrap().len(), 0);
    // Staging files as a killed writer leaves them (a pack is written to
    // one as it fills): prune, alone in the repository, removes them all.
    std::fs::create_dir_all(repo.path.join("data")).unwrap();
    std::fs::write(repo.path.join("data/spool#123"), b"half a pack").unwrap();
    std::fs::write(repo.path.join("keys/almost#9"), b"x").unwrap();
    let staged = |dir: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().map(|e| e.unwrap()) {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().contains('#') {
                    out.push(e.path());
                }
            }
        }
        out
    };
    let left = staged(&repo.path);
    assert!(left.len() >= 2, "{left:?}");
    let dry = repo.ok(&["prune", "--dry-run"]);
    assert!(
        dry.contains(&format!("would: remove {} staging files", left.len())),
        "{dry}"
    );
    assert_eq!(staged(&repo.path).len(), left.len(), "a dry run removes nothing");
    // Nothing waits on a lock left behind: an exclusive one is free at once.
    let pruned = repo.ok(&["prune"]);
    assert!(pruned.contains("staging files"), "{pruned}");
    assert_eq!(staged(&repo.path), Vec::<PathBuf>::new());
    assert_eq!(repo.json(&["check", "--read-data"])["ok"], true);

    repo.ok(&["backup", "-q", src.to_str().unwrap()]);
    let target = tmp.path().join("r");
    let o = interrupted(
        &repo,
        &["restore", "latest", "--target", target.to_str().unwrap()],
        rustix::process::Signal::TERM,
    );
    assert_eq!(o.status.code(), Some(143), "{:?}: {}", o.status, all(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("interrupted: the restore is incomplete"),
        "{}",
        all(&o)
    );
}

/// Ctrl-C at the password prompt ends the command there, and Ctrl-D says
/// the input ended; either way the terminal echoes again. Run with one
/// worker thread (as on one CPU), which the prompt must not hold.
#[test]
fn the_password_prompt_ends_on_ctrl_c_and_ctrl_d() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    // `script` runs backer on a terminal of its own, where it asks for the
    // password; `-e` gives back backer's exit code.
    let shell = format!(
        "'{}' snapshots; code=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\?echo' | sed 's/^/echo flag: /'; exit $code",
        env!("CARGO_BIN_EXE_backer")
    );
    for ctrl_c in [true, false] {
        let mut script = Command::new("script")
            .args(["-qefc", &shell, "/dev/null"])
            .env("TOKIO_WORKER_THREADS", "1")
            .env("BACKER_REPO", &repo.path)
            .env_remove("BACKER_PASSWORD")
            .env_remove("BACKER_PASSWORD_FILE")
            .env_remove("BACKER_SERVER")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = script.stdout.take().unwrap();
        let mut said = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&said).contains("repository password:") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "no prompt: {}", String::from_utf8_lossy(&said));
            said.extend_from_slice(&buf[..n]);
        }
        if ctrl_c {
            // backer runs under `script`'s shell.
            let children = |pid: u32| -> Vec<u32> {
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect()
            };
            let mut stack = vec![script.id()];
            let backer = loop {
                let pid = stack.pop().expect("backer runs under script");
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "backer" {
                    break pid as i32;
                }
                stack.extend(children(pid));
            };
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(backer).unwrap(),
                rustix::process::Signal::INT,
            )
            .unwrap();
        } else {
            // Ctrl-D, typed on script's terminal.
            script.stdin.as_mut().unwrap().write_all(b"\x04").unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = script.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backer went on at the prompt (ctrl-c: {ctrl_c})"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        stdout.read_to_end(&mut said).unwrap();
        let said = String::from_utf8_lossy(&said);
        if ctrl_c {
            assert_eq!(status.code(), Some(130), "{said}");
            assert!(said.contains("interrupted: nothing more was written"), "{said}");
        } else {
            assert_eq!(status.code(), Some(1), "{said}");
            assert!(
                said.contains("failed to read the password: the input ended"),
                "{said}"
            );
        }
        assert!(
            said.contains("echo flag: echo"),
            "the terminal echoes again: {said}"
        );
    }
}

#[test]
fn prune_that_waited_for_a_backup_sees_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    repo.backup_as(&tree(&tmp.path().join("first"), 1), None);
    // A shared lock held as by a long backup.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let r = backer_repo::Repository::open(
            backer_repo::Backend::open(repo.path.to_str().unwrap()).unwrap(),
            b"pw",
        )
        .await
        .unwrap();
        backer_repo::lock::Lock::acquire(&r, false, "a long backup", Duration::ZERO)
            .await
            .unwrap()
    });
    // prune opens the repository now, then waits for the lock.
    let prune = repo
        .cmd(&["prune", "--retry-lock", "2m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Meanwhile a backup adds data prune has not seen.
    let second = tree(&tmp.path().join("second"), 99);
    let id = repo.json(&["backup", second.to_str().unwrap(), "--retry-lock", "1m"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    rt.block_on(held.release()).unwrap();
    let o = prune.wait_with_output().unwrap();
    assert!(o.status.success(), "prune after waiting: {}", all(&o));
    let target = tmp.path().join("r");
    repo.ok(&["restore", &id[..8], "--target", target.to_str().unwrap()]);
    assert!(compare_trees(&second, &target.join(second.strip_prefix("/").unwrap())).is_empty());
    assert_eq!(repo.json(&["check", "--read-data"])["ok"], true);
}

#[test]
fn failed_commands_leave_no_lock_and_damaged_restores_say_which_files() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("keep")).unwrap();
    std::fs::write(src.join("keep/small.txt"), b"small and safe").unwrap();
    repo.backup_as(&src, None);
    let before: Vec<PathBuf> = packs(&repo.path);
    std::fs::write(src.join("lost.bin"), pseudo_random(3 << 20, 11)).unwrap();
    std::fs::hard_link(src.join("lost.bin"), src.join("keep/link-to-lost.bin")).unwrap();
    let id = repo.backup_as(&src, None);
    let locks = |r: &Repo| {
        std::fs::read_dir(r.path.join("locks"))
            .map(|d| d.count())
            .unwrap_or(0)
    };

    let o = repo.run(&["backup", tmp.path().join("no-such-dir").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    assert_eq!(locks(&repo), 0, "a failed backup left its lock");

    // The pack holding lost.bin goes missing.
    let gone: Vec<PathBuf> = packs(&repo.path)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let data = gone
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::remove_file(data).unwrap();
    let target = tmp.path().join("r");
    let o = repo.run(&[
        "restore",
        &id[..8],
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", all(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut incomplete: Vec<&str> = v["incomplete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    incomplete.sort();
    assert_eq!(incomplete.len(), 2, "{v}");
    assert!(incomplete[0].ends_with("/keep/link-to-lost.bin"), "{v}");
    assert!(incomplete[1].ends_with("/lost.bin"), "{v}");
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        errors.len(),
        2,
        "one line per damaged file and per link to it, not per chunk: {v}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("failed to restore") && e.contains("lost.bin")),
        "{v}"
    );
    assert!(errors.iter().any(|e| e.contains("hard link")), "{v}");
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert!(
        !restored.join("lost.bin").exists(),
        "an incomplete file was left looking whole"
    );
    assert!(
        !restored.join("keep/link-to-lost.bin").exists(),
        "a link to an incomplete file was left"
    );
    assert_eq!(
        std::fs::read(restored.join("keep/small.txt")).unwrap(),
        b"small and safe"
    );
    assert_eq!(v["files"], 1, "the summary counts only files restored whole: {v}");

    // A prune refused for damage, and a check that fails, leave no lock either.
    let snap = std::fs::read_dir(repo.path.join("snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&snap, b"").unwrap();
    let o = repo.run(&["prune"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(all(&o).contains("the repository needs repair"), "{}", all(&o));
    let o = repo.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(locks(&repo), 0, "a failed prune or check left its lock");
}

fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

#[test]
fn a_hard_link_is_never_made_to_a_file_the_restore_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"from the snapshot").unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    let id = repo.backup_as(&src, None);
    // The target already holds an `a` of the user's.
    let target = tmp.path().join("r");
    let at = target.join(src.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(at.join("a"), b"the user's own file").unwrap();
    let o = repo.run(&["restore", &id[..8], "--target", target.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "refusing to overwrite `a` is partial: {}",
        all(&o)
    );
    assert_eq!(std::fs::read(at.join("a")).unwrap(), b"the user's own file");
    // `b` holds the snapshot's content, not a link to the user's file.
    assert_eq!(std::fs::read(at.join("b")).unwrap(), b"from the snapshot");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        std::fs::metadata(at.join("a")).unwrap().ino(),
        std::fs::metadata(at.join("b")).unwrap().ino()
    );
}

/// A restore keeps one descriptor per file of each batch in flight: with a
/// low limit (a container's, a service's) it must size its batches to fit,
/// not fail with "too many open files".
#[test]
fn a_restore_fits_a_low_descriptor_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let src = tmp.path().join("src");
    for d in 0..8 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..250 {
            std::fs::write(
                dir.join(format!("f{f}")),
                pseudo_random(100 + f, (d * 1000 + f) as u64),
            )
            .unwrap();
        }
    }
    repo.ok(&["backup", "-q", src.to_str().unwrap()]);
    let target = tmp.path().join("out");
    // prlimit sets both the soft and the hard limit, so backer cannot raise it.
    let mut c = Command::new("prlimit");
    c.args(["--nofile=1000:1000", "--", env!("CARGO_BIN_EXE_backer")])
        .args(["restore", "latest", "--target", target.to_str().unwrap()])
        .env("BACKER_REPO", &repo.path)
        .env("BACKER_PASSWORD", "pw")
        .env_remove("BACKER_SERVER");
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "restore under a limit of 1000 descriptors: {}",
        all(&o)
    );
    let diffs = compare_trees(&src, &target.join(src.strip_prefix("/").unwrap()));
    assert!(diffs.is_empty(), "{diffs:?}");
}
