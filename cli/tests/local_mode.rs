//! The `backer` binary in local mode, as a user runs it: real processes, real
//! directories, and a real S3-compatible server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backer_testkit::{Moto, build_rich_tree, compare_trees, gnu_diff, is_root};
use serde_json::Value;

struct Env {
    repo: String,
    extra: Vec<(String, String)>,
}

impl Env {
    fn dir(path: &Path) -> Env {
        Env {
            repo: path.to_str().unwrap().to_string(),
            extra: vec![],
        }
    }

    fn s3(moto: &Moto, bucket: &str) -> Env {
        moto.create_bucket(bucket);
        Env {
            repo: moto.url(bucket, "repo"),
            extra: Moto::env()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn cmd(&self, args: &[&dyn AsRef<OsStr>]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backer"));
        c.env("BACKER_REPO", &self.repo)
            .env("BACKER_PASSWORD", "correct horse")
            .env_remove("BACKER_PASSWORD_FILE")
            // S3 repositories keep their copies here, not in the user's cache.
            .env("XDG_CACHE_HOME", concat!(env!("CARGO_TARGET_TMPDIR"), "/cache"));
        for (k, v) in &self.extra {
            c.env(k, v);
        }
        for a in args {
            c.arg(a.as_ref());
        }
        c
    }

    fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&dyn AsRef<OsStr>]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "backer {:?} failed ({}):\nstdout: {}\nstderr: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&dyn AsRef<OsStr>]) -> Value {
        let mut a: Vec<&dyn AsRef<OsStr>> = args.to_vec();
        a.push(&"--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Backs up a rich tree, restores it, and compares every byte and every
/// piece of metadata; then an unchanged re-run reads nothing, a change is
/// picked up, and `check --read-data` passes.
fn round_trip(env: &Env, tmp: &Path) {
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    build_rich_tree(&src);
    env.ok(&[&"init"]);

    let first = env.json(&[&"backup", &src]);
    assert_eq!(first["snapshot"]["partial"], false, "{first}");
    assert!(first["snapshot"]["summary"]["files"].as_u64().unwrap() >= 12);

    let out = tmp.join("out");
    env.ok(&[&"restore", &"latest", &"--target", &out]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    let diffs = compare_trees(&src, &restored);
    assert!(diffs.is_empty(), "restore differs:\n{}", diffs.join("\n"));
    let gd = gnu_diff(&src, &restored);
    assert!(gd.is_empty(), "diff -r --no-dereference:\n{}", gd.join("\n"));

    // Unchanged: nothing is read again.
    let second = env.json(&[&"backup", &src]);
    assert_eq!(second["snapshot"]["summary"]["files_read"], 0, "{second}");
    assert_eq!(second["snapshot"]["parent"], first["id"]);

    // One file changed: only it is read.
    std::fs::write(src.join("docs/empty"), b"now with content").unwrap();
    let third = env.json(&[&"backup", &src]);
    assert_eq!(third["snapshot"]["summary"]["files_read"], 1, "{third}");

    let out2 = tmp.join("out2");
    env.ok(&[
        &"restore",
        &&third["id"].as_str().unwrap()[..8],
        &"--target",
        &out2,
    ]);
    let diffs = compare_trees(&src, &out2.join(src.strip_prefix("/").unwrap()));
    assert!(
        diffs.is_empty(),
        "restore of the third snapshot differs:\n{}",
        diffs.join("\n")
    );

    let snaps = env.json(&[&"snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 3);
    let check = env.json(&[&"check", &"--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert!(check["blobs_read"].as_u64().unwrap() > 10);
}

#[test]
fn round_trip_on_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&Env::dir(&tmp.path().join("repo")), tmp.path());
}

#[test]
fn round_trip_on_s3() {
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&Env::s3(&moto, "roundtrip"), tmp.path());
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
fn damaged_pack_is_named_and_other_files_still_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let env = Env::dir(&repo);
    env.ok(&[&"init"]);
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(one.join("safe.txt"), b"unaffected content\n".repeat(5000)).unwrap();
    let first = env.json(&[&"backup", &one]);
    let before = packs(&repo);
    let noise: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(two.join("victim.bin"), &noise).unwrap();
    let second = env.json(&[&"backup", &two]);
    assert_eq!(env.json(&[&"check", &"--read-data"])["ok"], true);

    // Flip one byte in the middle of the new data pack.
    let victim = packs(&repo)
        .into_iter()
        .filter(|p| !before.contains(p))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    let pack_id = victim.file_name().unwrap().to_str().unwrap().to_string();

    // Structure alone does not read data; --read-data names the pack.
    let quick = env.run(&[&"check"]);
    assert!(quick.status.success(), "{}", stderr(&quick));
    let full = env.run(&[&"check", &"--read-data"]);
    assert_eq!(full.status.code(), Some(1));
    assert!(
        stderr(&full).contains(&format!("pack {pack_id}")),
        "{}",
        stderr(&full)
    );

    // The file in the damaged pack fails clearly; the other snapshot restores.
    let bad = env.run(&[
        &"restore",
        &second["id"].as_str().unwrap(),
        &"--target",
        &tmp.path().join("r2"),
    ]);
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("victim.bin"), "{}", stderr(&bad));
    let r1 = tmp.path().join("r1");
    env.ok(&[&"restore", &first["id"].as_str().unwrap(), &"--target", &r1]);
    assert!(compare_trees(&one, &r1.join(one.strip_prefix("/").unwrap())).is_empty());

    // Truncation is named too.
    std::fs::write(&victim, &bytes[..bytes.len() - 100]).unwrap();
    let full = env.run(&[&"check", &"--read-data"]);
    assert_eq!(full.status.code(), Some(1));
    assert!(stderr(&full).contains(&pack_id), "{}", stderr(&full));
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_the_repo_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let env = Env::dir(&repo);

    let missing = env.run(&[&"snapshots"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("run `backer init` first"),
        "{}",
        stderr(&missing)
    );

    let occupied = tmp.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("x"), b"x").unwrap();
    let o = Env::dir(&occupied).run(&[&"init"]);
    assert!(
        !o.status.success() && stderr(&o).contains("is not empty"),
        "{}",
        stderr(&o)
    );

    env.ok(&[&"init"]);
    let again = env.run(&[&"init"]);
    assert!(
        !again.status.success() && stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let wrong = env
        .cmd(&[&"snapshots"])
        .env("BACKER_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("wrong password"), "{}", stderr(&wrong));

    let nopw = env
        .cmd(&[&"snapshots"])
        .env_remove("BACKER_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(stderr(&nopw).contains("no password"), "{}", stderr(&nopw));

    let nopath = env.run(&[&"backup", &"/definitely/not/here"]);
    assert_eq!(nopath.status.code(), Some(1));
    assert!(
        stderr(&nopath).contains("/definitely/not/here"),
        "{}",
        stderr(&nopath)
    );

    let badglob = env.run(&[&"backup", &tmp.path(), &"--exclude", &"a[b"]);
    assert!(
        stderr(&badglob).contains("invalid exclude pattern"),
        "{}",
        stderr(&badglob)
    );

    let nosnap = env.run(&[&"restore", &"deadbeef", &"--target", &tmp.path().join("x")]);
    assert!(
        stderr(&nosnap).contains("no snapshot matches"),
        "{}",
        stderr(&nosnap)
    );

    let badsubset = env.run(&[&"check", &"--read-data-subset", &"3/2"]);
    assert!(!badsubset.status.success() && stderr(&badsubset).contains("1 <= N <= M"));

    let s3down = Env {
        repo: format!(
            "s3://b/p?endpoint=http://127.0.0.1:{}&retries=0",
            backer_testkit::free_port()
        ),
        extra: Moto::env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let down = s3down.run(&[&"snapshots"]);
    assert_eq!(down.status.code(), Some(1));
    assert!(
        stderr(&down).contains("failed to access the storage backend at s3://b/p"),
        "{}",
        stderr(&down)
    );

    // None of that left anything behind.
    assert_eq!(env.json(&[&"snapshots"]).as_array().unwrap().len(), 0);
    assert_eq!(env.json(&[&"check"])["ok"], true);
}

#[test]
fn unreadable_files_make_a_partial_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    // Root reads everything, so drop to `nobody` through setpriv when root.
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = work.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("readable.txt"), b"fine").unwrap();
    std::fs::write(src.join("secret.txt"), b"no").unwrap();
    std::fs::set_permissions(src.join("secret.txt"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::create_dir(src.join("closed")).unwrap();
    std::fs::write(src.join("closed/inner"), b"x").unwrap();
    std::fs::set_permissions(src.join("closed"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = Env::dir(&work.join("repo"));
    let run_as_user = |args: &[&dyn AsRef<OsStr>]| -> Output {
        let mut c = env.cmd(args);
        if is_root() {
            let prog = c.get_program().to_owned();
            let mut wrapped = Command::new("setpriv");
            wrapped
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(prog);
            wrapped.args(c.get_args());
            for (k, v) in c.get_envs() {
                match v {
                    Some(v) => wrapped.env(k, v),
                    None => wrapped.env_remove(k),
                };
            }
            c = wrapped;
        }
        c.output().unwrap()
    };
    let init = run_as_user(&[&"init"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let out = run_as_user(&[&"backup", &src, &"--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot"]["partial"], true);
    let msgs = v["messages"].to_string();
    assert!(msgs.contains("secret.txt") && msgs.contains("closed"), "{msgs}");
    let ls = run_as_user(&[&"ls", &"latest"]);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(listing.contains("readable.txt"), "{listing}");
    assert!(!listing.contains("secret.txt"), "{listing}");
    let table = String::from_utf8_lossy(&run_as_user(&[&"snapshots"]).stdout).into_owned();
    assert!(table.contains("(partial)"), "{table}");
}

#[test]
fn file_changing_while_read_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::dir(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let growing = src.join("growing.log");
    std::fs::write(&growing, vec![b'a'; 64 * 1024 * 1024]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(b"more\n").unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let v = env.json(&[&"backup", &src]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(v["snapshot"]["summary"]["changed_while_read"], 1, "{v}");
    assert!(
        v["messages"].to_string().contains("changed while it was read"),
        "{v}"
    );
    assert_eq!(v["snapshot"]["partial"], false);
    // Said, but not recorded as an error in the snapshot.
    let recorded = v["snapshot"]["errors"].as_array().map_or(0, Vec::len);
    assert_eq!(recorded, 0, "{v}");
}

#[test]
fn excludes_includes_overwrite_and_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::dir(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("keep/cache")).unwrap();
    std::fs::create_dir_all(src.join("skipdir")).unwrap();
    std::fs::write(src.join("keep/a.txt"), b"a").unwrap();
    std::fs::write(src.join("keep/b.tmp"), b"b").unwrap();
    std::fs::write(src.join("keep/cache/c"), b"c").unwrap();
    std::fs::write(src.join("skipdir/d"), b"d").unwrap();
    let skip = format!("{}/skipdir", src.display());
    env.ok(&[
        &"backup",
        &src,
        &"--exclude",
        &"*.tmp",
        &"--exclude",
        &"cache",
        &"--exclude",
        &skip,
        &"--tag",
        &"nightly",
    ]);

    let listing = env.ok(&[&"ls", &"latest", &src]);
    assert!(listing.contains("keep/a.txt"), "{listing}");
    for gone in ["b.tmp", "cache", "skipdir"] {
        assert!(!listing.contains(gone), "{gone} should be excluded:\n{listing}");
    }
    let lines: Vec<Value> = env
        .ok(&[&"ls", &"latest", &"--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "file" && l["path"].as_str().unwrap().ends_with("keep/a.txt"))
    );
    let long = env.ok(&[&"ls", &"latest", &"-l", &format!("{}/keep/a.txt", src.display())]);
    assert!(long.starts_with("-rw"), "{long}");
    let tagged = env.json(&[&"snapshots", &"--tag", &"nightly"]);
    assert_eq!(tagged.as_array().unwrap().len(), 1);
    assert_eq!(
        env.json(&[&"snapshots", &"--tag", &"other"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Include one file only.
    let out = tmp.path().join("out");
    let inc = format!("{}/keep/a.txt", src.display());
    env.ok(&[&"restore", &"latest", &"--target", &out, &"--include", &inc]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(restored.join("keep/a.txt")).unwrap(), b"a");
    assert!(!restored.join("keep/cache").exists());

    // An include that is not in the snapshot is an error.
    let none = env.run(&[
        &"restore",
        &"latest",
        &"--target",
        &out,
        &"--include",
        &"/no/such/path",
    ]);
    assert_eq!(none.status.code(), Some(3));
    assert!(
        stderr(&none).contains("is not in the snapshot"),
        "{}",
        stderr(&none)
    );

    // Existing files are not replaced unless asked.
    std::fs::write(restored.join("keep/a.txt"), b"local edit").unwrap();
    let refused = env.run(&[&"restore", &"latest", &"--target", &out, &"--include", &inc]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(
        stderr(&refused).contains("use --overwrite"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(std::fs::read(restored.join("keep/a.txt")).unwrap(), b"local edit");
    env.ok(&[
        &"restore",
        &"latest",
        &"--target",
        &out,
        &"--include",
        &inc,
        &"--overwrite",
    ]);
    assert_eq!(std::fs::read(restored.join("keep/a.txt")).unwrap(), b"a");

    // A second password opens the same repository.
    let pwfile = tmp.path().join("pw2");
    std::fs::write(&pwfile, "second password\n").unwrap();
    env.ok(&[&"key", &"add", &"--new-password-file", &pwfile]);
    let with_second = env
        .cmd(&[&"snapshots", &"--password-file", &pwfile])
        .output()
        .unwrap();
    assert!(with_second.status.success(), "{}", stderr(&with_second));

    let stats = env.json(&[&"stats"]);
    assert_eq!(stats["snapshots"], 1);
    assert!(stats["stored_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn help_explains_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_backer"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["init", "backup", "snapshots", "ls", "restore", "check", "stats"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_backer"))
        .args(["restore", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.contains("Nothing is written outside it"), "{text}");
}

/// A device node in a snapshot is made again only by root: restored by
/// anyone else it is refused, named, and the rest of the snapshot restores.
#[test]
fn device_nodes_are_restored_by_root_only() {
    if !is_root() {
        eprintln!("device nodes: run as root to make one to back up; the refusal is the only path here");
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = Env::dir(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("plain.txt"), b"plain").unwrap();
    if !is_root() {
        return;
    }
    let made = Command::new("mknod")
        .arg(src.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(made.success());
    env.ok(&[&"backup", &src]);
    // The user who restores takes a lock in the repository.
    Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(tmp.path().join("repo"))
        .status()
        .unwrap();
    let target = tmp.path().join("as-nobody");
    std::fs::create_dir(&target).unwrap();
    Command::new("chown")
        .arg("65534:65534")
        .arg(&target)
        .status()
        .unwrap();
    let c = env.cmd(&[&"restore", &"latest", &"--target", &target]);
    let mut as_nobody = Command::new("setpriv");
    as_nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(c.get_program());
    as_nobody.args(c.get_args());
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            as_nobody.env(k, v);
        }
    }
    let out = as_nobody.output().unwrap();
    assert!(!out.status.success(), "a refused entry makes the restore fail");
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
    let inside = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(inside.join("plain.txt")).unwrap(), b"plain");
    assert!(
        !inside.join("null").exists(),
        "no device made by a non-root restore"
    );
    // As root it is made again.
    let target = tmp.path().join("as-root");
    env.ok(&[&"restore", &"latest", &"--target", &target]);
    let meta = std::fs::symlink_metadata(target.join(src.strip_prefix("/").unwrap()).join("null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()));
    backer_testkit::figures(
        "local_mode",
        "device nodes: refused for a non-root restore with its reason, made again by root",
    );
}
