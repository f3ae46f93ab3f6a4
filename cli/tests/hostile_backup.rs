//! Hostile backup input (issue #8), through the `backer` binary as users run
//! it: files resized while read, files and directories swapped for symlinks
//! or fifos between listing and reading, unreadable files and directories,
//! trees deeper than PATH_MAX, long and non-UTF-8 names and link targets, a
//! 1 TB sparse file and many hard links.
//!
//! Each test asserts what a user must get: every completed snapshot restores
//! byte for byte, nothing crashes or hangs (every run has a deadline), and
//! each problem is reported by path with a partial snapshot and exit code 3.
//! Each test writes its figures (inputs tried, refused or reported, time,
//! memory) as `hostile_backup figures | ...` lines straight to stderr, past
//! the harness's capture, so they show in every run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backer_testkit::{compare_trees, is_root, pseudo_random};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde_json::Value;

/// The exit code of a backup or restore that left something out.
const EXIT_INCOMPLETE: i32 = 3;

fn figures(case: &str, line: String) {
    backer_testkit::figures("hostile_backup", format!("{case} | {line}"));
}

struct Env {
    repo: PathBuf,
    /// Run as `nobody` (root reads everything, so permission tests drop it).
    as_nobody: bool,
}

/// A finished run with its wall time and peak resident memory.
struct Timed {
    out: Output,
    secs: f64,
    peak_rss_mib: f64,
}

impl Timed {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}):\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&self.out.stdout),
                self.stderr()
            )
        })
    }

    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
}

/// Peak resident memory of a running process, from /proc (`VmHWM` only grows).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Env {
    fn new(repo: &Path) -> Env {
        Env {
            repo: repo.to_path_buf(),
            as_nobody: false,
        }
    }

    /// A repository whose key is derived with a cheap KDF: the password
    /// hashing's 64 MiB would otherwise be every run's peak memory and hide
    /// the pipeline's.
    fn cheap(repo: &Path) -> Env {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let kdf = backer_repo::crypto::KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let backend = backer_repo::Backend::open(repo.to_str().unwrap()).unwrap();
        rt.block_on(backer_repo::Repository::init(backend, b"correct horse", kdf))
            .unwrap();
        Env::new(repo)
    }

    fn cmd(&self, args: &[&dyn AsRef<OsStr>]) -> Command {
        let mut c = if self.as_nobody && is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_backer"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_backer"))
        };
        c.env("BACKER_REPO", &self.repo)
            .env("BACKER_PASSWORD", "correct horse")
            .env_remove("BACKER_PASSWORD_FILE")
            .env_remove("BACKER_LOG");
        for a in args {
            c.arg(a.as_ref());
        }
        c
    }

    /// Runs with a deadline: a run that takes longer is killed and the test
    /// fails, so a hang is a failure, not a stuck test run.
    fn timed(&self, args: &[&dyn AsRef<OsStr>], limit: Duration) -> Timed {
        let started = Instant::now();
        let mut child = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            so.read_to_end(&mut v).unwrap();
            v
        });
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            se.read_to_end(&mut v).unwrap();
            v
        });
        let mut peak = 0u64;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            peak = peak.max(peak_rss_kib(pid).unwrap_or(0));
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "backer {:?} did not finish within {limit:?}: it hangs\nstderr: {}",
                    args.iter()
                        .map(|a| a.as_ref().to_string_lossy().into_owned())
                        .collect::<Vec<_>>(),
                    String::from_utf8_lossy(&err_t.join().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let secs = started.elapsed().as_secs_f64();
        Timed {
            out: Output {
                status,
                stdout: out_t.join().unwrap(),
                stderr: err_t.join().unwrap(),
            },
            secs,
            peak_rss_mib: peak as f64 / 1024.0,
        }
    }

    /// Runs (with a generous deadline) and requires success.
    fn ok(&self, args: &[&dyn AsRef<OsStr>]) -> Timed {
        let t = self.timed(args, Duration::from_secs(300));
        assert!(
            t.out.status.success(),
            "backer {:?} failed ({}):\nstdout: {}\nstderr: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            t.out.status,
            String::from_utf8_lossy(&t.out.stdout),
            t.stderr()
        );
        t
    }
}

/// Where a restore into `target` puts the source directory `src`.
fn restored(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

fn messages(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// One byte of the content a resized or appended file always holds at
/// offset `i`, so any read of it, whenever it happens, is checkable.
fn pattern(start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64)
        .map(|i| {
            let x = (i >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8 ^ (i as u8)
        })
        .collect()
}

/// Grows `f` from `from` to `to` with the pattern (never with zeros).
fn grow(f: &std::fs::File, from: u64, to: u64) {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(1 << 20);
        f.write_all_at(&pattern(pos, n as usize), pos).unwrap();
        pos += n;
    }
}

fn first_mismatch(data: &[u8]) -> Option<usize> {
    data.chunks(1 << 20).enumerate().find_map(|(k, c)| {
        let off = k * (1 << 20);
        let want = pattern(off as u64, c.len());
        c.iter().zip(&want).position(|(a, b)| a != b).map(|p| off + p)
    })
}

#[test]
fn files_resized_while_read_are_consistent_or_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::new(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("stable")).unwrap();
    std::fs::create_dir_all(src.join("moving")).unwrap();
    for (i, len) in [0usize, 1, 4096, 3 << 20, 9 << 20].iter().enumerate() {
        std::fs::write(
            src.join(format!("stable/f{i}")),
            pseudo_random(*len, i as u64 + 1),
        )
        .unwrap();
    }
    let resizing = src.join("moving/resizing.bin");
    let appending = src.join("moving/appending.log");
    let f = std::fs::File::create(&resizing).unwrap();
    grow(&f, 0, 32 << 20);
    drop(f);
    std::fs::write(&appending, b"").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let resizes = Arc::new(AtomicU64::new(0));
    let appended = Arc::new(AtomicU64::new(0));
    // Shrinks with truncate and grows with the pattern, so the file always
    // holds a prefix of the pattern, whatever a reader meets.
    let resizer = {
        let (stop, resizes, path) = (stop.clone(), resizes.clone(), resizing.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let sizes = [48u64 << 20, 3 << 20, 0, 24 << 20, (1 << 20) + 17, 40 << 20, 5];
            let mut cur = 32u64 << 20;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let next = sizes[k % sizes.len()];
                k += 1;
                if next < cur {
                    f.set_len(next).unwrap();
                } else {
                    grow(&f, cur, next);
                }
                cur = next;
                resizes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Appends as fast as it can: a reader that reads to the end of a file
    // that grows faster than it reads would never finish. Capped so the
    // disk cannot fill.
    let appender = {
        let (stop, appended, path) = (stop.clone(), appended.clone(), appending.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut pos = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if pos >= 384 << 20 {
                    // Like a rotated log: starts again, and keeps changing.
                    f.set_len(0).unwrap();
                    pos = 0;
                }
                grow(&f, pos, pos + (1 << 20));
                pos += 1 << 20;
                appended.fetch_add(1 << 20, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));

    let rounds = 3;
    let mut reported = 0;
    let mut sizes = Vec::new();
    let mut max_secs = 0f64;
    for round in 0..rounds {
        let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(180));
        assert_eq!(b.code(), Some(0), "{}", b.stderr());
        max_secs = max_secs.max(b.secs);
        let v = b.json();
        // A file changed while read is a warning, not a missing file.
        assert_eq!(v["snapshot"]["partial"], false, "{v}");
        let msgs = messages(&v);
        for m in &msgs {
            assert!(m.contains("changed while it was read"), "unexpected message: {m}");
        }
        let out = tmp.path().join(format!("out{round}"));
        env.ok(&[&"restore", &v["id"].as_str().unwrap(), &"--target", &out]);
        let back = restored(&out, &src);
        let diffs = compare_trees(&src.join("stable"), &back.join("stable"));
        assert!(
            diffs.is_empty(),
            "round {round}: stable files differ:\n{}",
            diffs.join("\n")
        );
        for p in [&resizing, &appending] {
            let name = p.file_name().unwrap();
            let data = std::fs::read(back.join("moving").join(name)).unwrap();
            // Whatever was read is the file's content at those offsets:
            // never zeros, never bytes from somewhere else.
            assert_eq!(
                first_mismatch(&data),
                None,
                "round {round}: {name:?} holds bytes it never had ({} bytes restored)",
                data.len()
            );
            let shown = p.display().to_string();
            if msgs.iter().any(|m| m.contains(&shown)) {
                reported += 1;
            }
            sizes.push(data.len());
        }
    }
    stop.store(true, Ordering::Relaxed);
    resizer.join().unwrap();
    appender.join().unwrap();
    let check = env.ok(&[&"check", &"--read-data", &"--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    figures(
        "resized while read",
        format!(
            "{rounds} backups of 2 moving files: {reported} reads reported as changed, 0 inconsistent; \
             {} resizes, {} MiB appended; restored sizes {sizes:?}; slowest backup {max_secs:.1} s",
            resizes.load(Ordering::Relaxed),
            appended.load(Ordering::Relaxed) >> 20
        ),
    );
    // Both files keep changing: reads see it (how often depends on timing).
    assert!(
        reported >= 1,
        "only {reported} changes reported in {rounds} rounds"
    );
}

/// Swaps two entries atomically, so the name always exists.
fn exchange(a: &Path, b: &Path) {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
}

#[test]
fn entries_swapped_for_symlinks_or_fifos_never_block_or_leak() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::new(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    let side = tmp.path().join("side");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(src.join("stable")).unwrap();
    std::fs::create_dir_all(src.join("race")).unwrap();
    std::fs::create_dir_all(&side).unwrap();
    std::fs::write(src.join("stable/big"), pseudo_random(5 << 20, 9)).unwrap();
    std::fs::write(src.join("stable/small"), b"small and stable").unwrap();
    const FILES: usize = 16;
    const DIRS: usize = 4;
    let content = |i: usize| pseudo_random(64 * 1024 + i, 100 + i as u64);
    for i in 0..FILES {
        std::fs::write(src.join(format!("race/file-{i:02}")), content(i)).unwrap();
        // Where a followed symlink would lead: content that is not the file's.
        symlink("../stable/big", side.join(format!("link-{i:02}"))).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            side.join(format!("fifo-{i:02}")),
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
    }
    // Directories swapped for symlinks to a directory outside the source
    // holding the same names: following one would put its content into
    // the snapshot under the source's names.
    for j in 0..DIRS {
        let inside = src.join(format!("race/dir-{j}"));
        let secret = outside.join(format!("dir-{j}"));
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        for k in 0..8 {
            std::fs::write(
                inside.join(format!("f{k}")),
                format!("inside {j} {k}\n").repeat(100),
            )
            .unwrap();
            std::fs::write(
                secret.join(format!("f{k}")),
                format!("SECRET {j} {k}\n").repeat(100),
            )
            .unwrap();
        }
        symlink(&secret, side.join(format!("dirlink-{j}"))).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let racer = {
        let (stop, swaps, src, side) = (stop.clone(), swaps.clone(), src.clone(), side.clone());
        // All entries change together and each state lasts a little, so
        // a backup meets every state and every transition.
        std::thread::spawn(move || {
            let file = |i: usize| src.join(format!("race/file-{i:02}"));
            let dir = |j: usize| src.join(format!("race/dir-{j}"));
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let other = if k.is_multiple_of(2) { "link" } else { "fifo" };
                k += 1;
                // Swapped out briefly, back (as the file) a little longer.
                for pause in [300, 1000] {
                    for i in 0..FILES {
                        exchange(&file(i), &side.join(format!("{other}-{i:02}")));
                    }
                    for j in 0..DIRS {
                        exchange(&dir(j), &side.join(format!("dirlink-{j}")));
                    }
                    swaps.fetch_add((FILES + DIRS) as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(pause));
                }
            }
        })
    };

    let rounds = 12;
    let (mut as_file, mut as_link, mut as_fifo, mut reported) = (0, 0, 0, 0);
    let (mut dir_files, mut dir_links, mut dir_reported) = (0, 0, 0);
    let mut max_secs = 0f64;
    for round in 0..rounds {
        let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(120));
        max_secs = max_secs.max(b.secs);
        assert!(
            matches!(b.code(), Some(0) | Some(EXIT_INCOMPLETE)),
            "round {round}: {}",
            b.stderr()
        );
        let v = b.json();
        let msgs = messages(&v);
        assert_eq!(
            v["snapshot"]["partial"],
            b.code() == Some(EXIT_INCOMPLETE),
            "partial and exit code disagree: {v}"
        );
        let out = tmp.path().join(format!("out{round}"));
        env.ok(&[&"restore", &v["id"].as_str().unwrap(), &"--target", &out]);
        let back = restored(&out, &src);
        assert!(compare_trees(&src.join("stable"), &back.join("stable")).is_empty());
        let named = |p: &Path| {
            let shown = p.display().to_string();
            msgs.iter().any(|m| m.contains(&shown))
        };
        for i in 0..FILES {
            let rel = format!("race/file-{i:02}");
            let r = back.join(&rel);
            match std::fs::symlink_metadata(&r) {
                Ok(md) if md.is_file() => {
                    assert_eq!(
                        std::fs::read(&r).unwrap(),
                        content(i),
                        "round {round}: {rel} content"
                    );
                    as_file += 1;
                }
                Ok(md) if md.file_type().is_symlink() => {
                    assert_eq!(std::fs::read_link(&r).unwrap(), Path::new("../stable/big"));
                    as_link += 1;
                }
                Ok(md) if md.file_type().is_fifo() => as_fifo += 1,
                Ok(md) => panic!("round {round}: {rel} restored as {:?}", md.file_type()),
                Err(_) => {
                    assert!(
                        named(&src.join(&rel)),
                        "round {round}: {rel} is missing and no message names it: {msgs:?}"
                    );
                    reported += 1;
                }
            }
        }
        for j in 0..DIRS {
            let rel = format!("race/dir-{j}");
            let shown = src.join(&rel).display().to_string();
            let Ok(md) = std::fs::symlink_metadata(back.join(&rel)) else {
                // Replaced between listing and opening: left out, and named.
                assert!(
                    msgs.iter().any(|m| m.contains(&shown)),
                    "round {round}: {rel} is missing and no message names it: {msgs:?}"
                );
                dir_reported += 8;
                continue;
            };
            if md.file_type().is_symlink() {
                // Listed while swapped: recorded as the symlink it was.
                let secret = outside.join(format!("dir-{j}"));
                assert_eq!(std::fs::read_link(back.join(&rel)).unwrap(), secret);
                dir_links += 1;
                continue;
            }
            assert!(
                md.is_dir(),
                "round {round}: {rel} restored as {:?}",
                md.file_type()
            );
            for k in 0..8 {
                let r = back.join(&rel).join(format!("f{k}"));
                match std::fs::symlink_metadata(&r) {
                    Ok(md) => {
                        assert!(md.is_file(), "round {round}: {rel}/f{k} is {:?}", md.file_type());
                        let data = std::fs::read(&r).unwrap();
                        assert!(
                            data == format!("inside {j} {k}\n").repeat(100).as_bytes(),
                            "round {round}: {rel}/f{k} holds what is outside the source: {:?}...",
                            String::from_utf8_lossy(&data[..data.len().min(30)])
                        );
                        dir_files += 1;
                    }
                    Err(_) => {
                        assert!(
                            msgs.iter().any(|m| m.contains(&shown)),
                            "round {round}: {rel}/f{k} is missing and no message names {rel}: {msgs:?}"
                        );
                        dir_reported += 1;
                    }
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    let check = env.ok(&[&"check", &"--read-data", &"--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    let tried = rounds * FILES;
    figures(
        "swapped for symlink/fifo",
        format!(
            "{tried} racing files over {rounds} backups: {as_file} as files (content exact), \
             {as_link} as symlinks, {as_fifo} as fifos, {reported} reported by path; \
             {} racing directories: {dir_links} as symlinks, {dir_files} files with inside content, \
             0 with outside content, {dir_reported} reported; {} swaps; slowest backup {max_secs:.2} s",
            rounds * DIRS,
            swaps.load(Ordering::Relaxed)
        ),
    );
    assert_eq!(as_file + as_link + as_fifo + reported, tried);
    // How the entries split depends on timing (under load most reads meet
    // a swap); that the backup met them other than as plain files shows
    // the race ran.
    assert!(as_link + as_fifo + reported > 0, "the race never happened");
}

#[test]
fn unreadable_files_and_directories_are_reported_by_path() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = work.join("src");
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    std::fs::create_dir_all(src.join("ok/nested")).unwrap();
    std::fs::write(src.join("ok/readable.txt"), b"fine").unwrap();
    std::fs::write(src.join("ok/nested/big.bin"), pseudo_random(3 << 20, 5)).unwrap();
    // Refusals: a file without read permission, a directory that can be
    // neither listed nor entered, one that can be listed but not entered
    // (its entries cannot be examined), one that can be entered but not
    // listed, and an unreadable file deep in a readable tree.
    std::fs::write(src.join("secret.txt"), b"no").unwrap();
    std::fs::create_dir(src.join("closed")).unwrap();
    std::fs::write(src.join("closed/inner"), b"x").unwrap();
    std::fs::create_dir(src.join("list-only")).unwrap();
    std::fs::write(src.join("list-only/a"), b"a").unwrap();
    std::fs::write(src.join("list-only/b"), b"b").unwrap();
    std::fs::create_dir(src.join("enter-only")).unwrap();
    std::fs::write(src.join("enter-only/hidden"), b"h").unwrap();
    std::fs::write(src.join("ok/nested/deep-secret"), b"d").unwrap();
    let entries = fd_tree(&src).len();
    mode(&src.join("secret.txt"), 0o000);
    mode(&src.join("closed"), 0o000);
    mode(&src.join("list-only"), 0o444);
    mode(&src.join("enter-only"), 0o111);
    mode(&src.join("ok/nested/deep-secret"), 0o200);
    let refused = [
        "secret.txt",
        "closed",
        "list-only/a",
        "list-only/b",
        "enter-only",
        "ok/nested/deep-secret",
    ];
    let mut env = Env::new(&work.join("repo"));
    env.as_nobody = true;
    env.ok(&[&"init"]);

    // Only an unreadable directory: its content is missing, so the
    // snapshot is partial too, not only when a file fails.
    let only_dir = env.timed(
        &[&"backup", &src.join("closed"), &"--json"],
        Duration::from_secs(60),
    );
    assert_eq!(only_dir.code(), Some(EXIT_INCOMPLETE), "{}", only_dir.stderr());
    let v = only_dir.json();
    assert_eq!(v["snapshot"]["partial"], true, "{v}");
    assert!(messages(&v).iter().any(|m| m.contains("closed")), "{v}");

    let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(60));
    assert_eq!(b.code(), Some(EXIT_INCOMPLETE), "{}", b.stderr());
    let v = b.json();
    assert_eq!(v["snapshot"]["partial"], true);
    let msgs = messages(&v);
    for r in refused {
        let shown = src.join(r).display().to_string();
        assert!(
            msgs.iter()
                .any(|m| m.contains(&shown) && m.contains("ermission denied")),
            "{shown} is not reported: {msgs:?}"
        );
    }
    assert_eq!(v["snapshot"]["summary"]["errors"], refused.len() as u64, "{v}");
    assert_eq!(msgs.len(), refused.len(), "{msgs:?}");
    // The same, in words, for a user at a terminal.
    let text = env.timed(&[&"backup", &src], Duration::from_secs(60));
    assert_eq!(text.code(), Some(EXIT_INCOMPLETE));
    let stdout = String::from_utf8_lossy(&text.out.stdout);
    assert!(
        stdout.contains(&format!("partial: {} entries could not be read", refused.len())),
        "{stdout}"
    );
    for r in refused {
        let line = "warning: failed to";
        let shown = src.join(r).display().to_string();
        assert!(
            text.stderr()
                .lines()
                .any(|l| l.starts_with(line) && l.contains(&shown)),
            "{shown}: {}",
            text.stderr()
        );
    }

    // Everything readable restores byte for byte.
    let out = work.join("out");
    let r = env.timed(
        &[&"restore", &v["id"].as_str().unwrap(), &"--target", &out],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let back = restored(&out, &src);
    assert_eq!(std::fs::read(back.join("ok/readable.txt")).unwrap(), b"fine");
    assert_eq!(
        std::fs::read(back.join("ok/nested/big.bin")).unwrap(),
        std::fs::read(src.join("ok/nested/big.bin")).unwrap()
    );
    for r in [
        "secret.txt",
        "list-only/a",
        "ok/nested/deep-secret",
        "closed/inner",
    ] {
        assert!(
            std::fs::symlink_metadata(back.join(r)).is_err(),
            "{r} was restored"
        );
    }
    figures(
        "unreadable",
        format!(
            "{} inputs refused and reported by path out of {entries} entries, exit code {}, \
             an unreadable directory alone makes a partial snapshot (exit {})",
            refused.len(),
            b.code().unwrap(),
            only_dir.code().unwrap()
        ),
    );
    // Let the temporary directory be removed.
    for p in ["closed", "list-only", "enter-only"] {
        mode(&src.join(p), 0o755);
    }

    // The other way round: root backs up a directory whose mode closes it,
    // and a user restores it. Its content is written before its mode is set.
    if is_root() {
        let tree = work.join("closed-tree");
        std::fs::create_dir_all(tree.join("shut/sub")).unwrap();
        std::fs::write(tree.join("shut/sub/file"), b"behind two closed doors").unwrap();
        mode(&tree.join("shut/sub"), 0o500);
        mode(&tree.join("shut"), 0o000);
        let root_env = Env::new(&env.repo);
        let b = root_env.ok(&[&"backup", &tree, &"--json"]).json();
        make_world_writable(&env.repo);
        let out = work.join("out-closed");
        let r = env.timed(
            &[&"restore", &b["id"].as_str().unwrap(), &"--target", &out],
            Duration::from_secs(60),
        );
        assert_eq!(r.code(), Some(0), "{}", r.stderr());
        let back = restored(&out, &tree);
        let shut = std::fs::symlink_metadata(back.join("shut")).unwrap();
        assert_eq!(shut.mode() & 0o7777, 0o000);
        mode(&back.join("shut"), 0o700);
        assert_eq!(
            std::fs::metadata(back.join("shut/sub")).unwrap().mode() & 0o7777,
            0o500
        );
        assert_eq!(
            std::fs::read(back.join("shut/sub/file")).unwrap(),
            b"behind two closed doors"
        );
        mode(&tree.join("shut"), 0o700);
    }
}

/// Lets the user the permission tests run as use what root wrote.
fn make_world_writable(dir: &Path) {
    let md = std::fs::symlink_metadata(dir).unwrap();
    let extra = if md.is_dir() { 0o777 } else { 0o666 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(md.mode() | extra)).unwrap();
    if md.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            make_world_writable(&e.unwrap().path());
        }
    }
}

/// Type, permission bits, mtime, size, and content or link target.
type Entry = (char, u32, i64, i64, Vec<u8>);

/// Every entry under `root` (as relative path bytes) with its type, mode,
/// mtime, size and content or link target, read through directory
/// descriptors so that paths longer than PATH_MAX work.
fn fd_tree(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let open_dir = |dir: &OwnedFd, name: &[u8]| {
        rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    };
    let top = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let mut out = BTreeMap::new();
    let mut stack = vec![(top, Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names = Vec::new();
        for e in rustix::fs::Dir::read_from(&dir).unwrap() {
            let name = e.unwrap().file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(name);
            }
        }
        for name in names {
            let st = rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).unwrap();
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
            let (kind, data) = match ft {
                rustix::fs::FileType::Directory => {
                    stack.push((open_dir(&dir, &name), path.clone()));
                    ('d', Vec::new())
                }
                rustix::fs::FileType::RegularFile => {
                    let fd =
                        rustix::fs::openat(&dir, name.as_slice(), OFlags::RDONLY, Mode::empty()).unwrap();
                    let mut v = Vec::new();
                    std::fs::File::from(fd).read_to_end(&mut v).unwrap();
                    ('-', v)
                }
                rustix::fs::FileType::Symlink => (
                    'l',
                    rustix::fs::readlinkat(&dir, name.as_slice(), Vec::new())
                        .unwrap()
                        .into_bytes(),
                ),
                _ => ('?', Vec::new()),
            };
            out.insert(path, (kind, st.st_mode & 0o7777, st.st_mtime, st.st_size, data));
        }
    }
    out
}

/// Builds `depth` nested directories named `name` (or `name-N` when
/// `numbered`) under `root` through descriptors (the paths may get longer
/// than any path call accepts), with a file every `every` levels and at
/// the bottom.
fn build_deep(root: &Path, depth: usize, name: &str, numbered: bool, every: usize) -> usize {
    let mut cur = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let mut files = 0;
    for level in 0..depth {
        if level % every == 0 || level == depth - 1 {
            let fd = rustix::fs::openat(
                &cur,
                "file",
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o640),
            )
            .unwrap();
            std::fs::File::from(fd)
                .write_all(format!("level {level}\n").as_bytes())
                .unwrap();
            files += 1;
        }
        let n = if numbered {
            format!("{name}-{level}")
        } else {
            name.to_string()
        };
        rustix::fs::mkdirat(&cur, n.as_str(), Mode::from_raw_mode(0o750)).unwrap();
        cur = rustix::fs::openat(
            &cur,
            n.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    files
}

#[test]
fn very_deep_trees_round_trip_without_path_max_or_stack_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::cheap(&tmp.path().join("repo"));
    // Two shapes: 1900 levels of one-letter names (deep recursion, paths
    // still under PATH_MAX) and 400 levels of 40-byte names (16 KB paths,
    // four times PATH_MAX).
    for (case, depth, name, numbered) in [
        ("narrow", 1900usize, "d", false),
        ("long", 400, "a-directory-name-of-forty-bytes-or-so", true),
    ] {
        let src = tmp.path().join(case);
        std::fs::create_dir(&src).unwrap();
        let files = build_deep(&src, depth, name, numbered, 100);
        let longest = fd_tree(&src).keys().map(|k| k.len()).max().unwrap() + src.as_os_str().len() + 1;
        let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(300));
        let v = b.json();
        assert_eq!(b.code(), Some(0), "{case}: {}", b.stderr());
        assert_eq!(v["snapshot"]["partial"], false, "{v}");
        assert_eq!(v["snapshot"]["summary"]["files"], files as u64);
        // The levels, the source and the directories above it.
        assert_eq!(
            v["snapshot"]["summary"]["dirs"],
            (depth + src.components().count() - 1) as u64
        );
        let out = tmp.path().join(format!("out-{case}"));
        let r = env.timed(
            &[&"restore", &v["id"].as_str().unwrap(), &"--target", &out],
            Duration::from_secs(300),
        );
        assert_eq!(r.code(), Some(0), "{case}: {}", r.stderr());
        let want = fd_tree(&src);
        let got = fd_tree(&restored(&out, &src));
        assert_eq!(want.len(), got.len(), "{case}: entry count");
        for (k, w) in &want {
            assert_eq!(
                Some(w),
                got.get(k),
                "{case}: {} differs",
                String::from_utf8_lossy(k)
            );
        }
        figures(
            "deep tree",
            format!(
                "{case}: depth {depth}, longest path {longest} bytes, {} entries: all backed up \
                 ({:.1} s, {:.0} MiB peak) and restored identically ({:.1} s)",
                want.len(),
                b.secs,
                b.peak_rss_mib,
                r.secs
            ),
        );
    }

    // Deeper than backer goes (MAX_DEPTH, 4096 levels): the rest is
    // refused by path, the snapshot is partial, nothing crashes.
    let src = tmp.path().join("too-deep");
    std::fs::create_dir(&src).unwrap();
    let depth = 4096 + 20;
    build_deep(&src, depth, "d", false, 1000);
    let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(300));
    assert_eq!(b.code(), Some(EXIT_INCOMPLETE), "{}", b.stderr());
    let v = b.json();
    assert_eq!(v["snapshot"]["partial"], true);
    let msgs = messages(&v);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with(&format!("refused {}/d/d/d/", src.display()))
            && msgs[0].ends_with("/d: deeper than 4096 directory levels"),
        "{}...",
        &msgs[0][..200]
    );
    // The root's own levels count: every level up to the limit is kept.
    let dirs = v["snapshot"]["summary"]["dirs"].as_u64().unwrap();
    assert_eq!(dirs, 4096, "{v}");
    // And a restore at the limit works too.
    let out = tmp.path().join("out-too-deep");
    let r = env.timed(
        &[&"restore", &v["id"].as_str().unwrap(), &"--target", &out],
        Duration::from_secs(300),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let got = fd_tree(&out);
    assert_eq!(got.values().filter(|e| e.0 == 'd').count(), 4096);
    figures(
        "deep tree",
        format!(
            "too deep: depth {depth} ({} byte paths): {dirs} levels kept, the rest refused by path, \
             partial snapshot, exit {} ({:.1} s); restored at the limit in {:.1} s, {:.0} MiB peak",
            depth * 2 + src.as_os_str().len(),
            b.code().unwrap(),
            b.secs,
            r.secs,
            r.peak_rss_mib
        ),
    );
}

#[test]
fn long_and_non_utf8_names_and_link_targets_round_trip_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::new(&tmp.path().join("repo"));
    env.ok(&[&"init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let at = |n: &[u8]| src.join(OsStr::from_bytes(n));
    let mut utf8_255 = "é".repeat(127).into_bytes();
    utf8_255.push(b'x');
    let names: Vec<Vec<u8>> = vec![
        vec![b'a'; 255],
        utf8_255,
        vec![0xff; 255],
        [b"x".as_slice(), &[0x80; 254]].concat(),
        b"latin-1 \xe9t\xe9".to_vec(),
        b"new\nline and\ttab".to_vec(),
        b" leading space".to_vec(),
        b"-starts-with-dash".to_vec(),
        b"back\\slash *?[glob]".to_vec(),
        b"\x1b[31mescape\x1b[0m".to_vec(),
    ];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(at(n), format!("file {i}")).unwrap();
    }
    // A non-UTF-8 directory holding a non-UTF-8 255-byte name.
    let dir = at(b"dir-\xc3\x28-invalid");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(&[0xfe; 255])), b"inside").unwrap();
    // Link targets: non-UTF-8, the longest a symlink can hold, and to a long name.
    let longest_target: Vec<u8> = (0..4095)
        .map(|i| if i % 50 == 49 { b'/' } else { 0x80 + (i % 60) as u8 })
        .collect();
    let links: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"link-binary".to_vec(), b"\xff\xfe/\x80target".to_vec()),
        (vec![0xfd; 255], vec![0xff; 255]),
        (b"link-longest".to_vec(), longest_target),
        (b"link-newline".to_vec(), b"a\nb".to_vec()),
    ];
    for (name, target) in &links {
        symlink(OsStr::from_bytes(target), at(name)).unwrap();
    }
    let tried = names.len() + 2 + links.len();

    let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(60));
    assert_eq!(b.code(), Some(0), "{}", b.stderr());
    let v = b.json();
    assert_eq!(v["snapshot"]["partial"], false);
    let out = tmp.path().join("out");
    env.ok(&[&"restore", &v["id"].as_str().unwrap(), &"--target", &out]);
    let back = restored(&out, &src);
    let diffs = compare_trees(&src, &back);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Byte for byte, independently of the comparer.
    let want = fd_tree(&src);
    let got = fd_tree(&back);
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (name, target) in &links {
        let t = std::fs::read_link(back.join(OsStr::from_bytes(name))).unwrap();
        assert_eq!(t.as_os_str().as_bytes(), target.as_slice());
    }
    // Listing such names neither fails nor panics, in text and in JSON.
    let ls = env.ok(&[&"ls", &"latest"]);
    assert!(String::from_utf8_lossy(&ls.out.stdout).contains("latin-1"));
    let lsj = env.ok(&[&"ls", &"latest", &"--json"]);
    let lines = String::from_utf8_lossy(&lsj.out.stdout).lines().count();
    assert!(lines >= tried, "{lines} lines");
    figures(
        "names",
        format!(
            "{tried} long or non-UTF-8 names and link targets (255-byte names, a 4095-byte target): \
             all round-tripped byte for byte, 0 refused"
        ),
    );
}

#[test]
fn a_one_terabyte_sparse_file_costs_its_data_only() {
    const TB: u64 = 1 << 40;
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::cheap(&tmp.path().join("repo"));
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let path = src.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(TB).unwrap();
    let islands: Vec<(u64, Vec<u8>)> = vec![
        (0, pseudo_random(1 << 20, 1)),
        (300 << 30, pseudo_random(64 * 1024, 2)),
        (TB / 2 + 12345, b"an unaligned island in the middle".to_vec()),
        (TB - 4096, pseudo_random(4096, 3)),
    ];
    for (off, data) in &islands {
        f.write_all_at(data, *off).unwrap();
    }
    drop(f);
    let data_bytes: usize = islands.iter().map(|(_, d)| d.len()).sum();
    let src_blocks = std::fs::metadata(&path).unwrap().blocks();

    let b = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(120));
    assert_eq!(b.code(), Some(0), "{}", b.stderr());
    let v = b.json();
    assert_eq!(v["snapshot"]["summary"]["bytes"], TB);
    // Only the data is chunked: a few MiB, not a terabyte of zeros.
    let new_bytes = v["snapshot"]["summary"]["new_bytes"].as_u64().unwrap();
    assert!(new_bytes < 16 << 20, "{new_bytes} new bytes");
    assert!(b.secs < 60.0, "backup of a 1 TB sparse file took {:.1} s", b.secs);

    let out = tmp.path().join("out");
    let r = env.timed(
        &[&"restore", &v["id"].as_str().unwrap(), &"--target", &out],
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let back = restored(&out, &src).join("disk.img");
    let md = std::fs::metadata(&back).unwrap();
    assert_eq!(md.len(), TB);
    assert!(
        md.blocks() * 512 < 32 << 20,
        "restore filled the holes: {} bytes allocated",
        md.blocks() * 512
    );
    let g = std::fs::File::open(&back).unwrap();
    for (off, data) in &islands {
        let mut buf = vec![0u8; data.len()];
        g.read_exact_at(&mut buf, *off).unwrap();
        assert_eq!(&buf, data, "island at {off}");
    }
    // Holes read back as zeros, including next to the islands.
    for off in [(1u64 << 20) + 1, 200 << 30, TB / 2 + 12345 - 100, TB - 4096 - 64] {
        let mut buf = [1u8; 64];
        g.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, [0u8; 64], "hole at {off}");
    }
    let again = env.timed(&[&"backup", &src, &"--json"], Duration::from_secs(60));
    assert_eq!(again.json()["snapshot"]["summary"]["files_read"], 0);
    figures(
        "sparse 1 TB",
        format!(
            "apparent {TB} bytes, {data_bytes} bytes of data in 4 islands ({} KiB allocated): \
             backup {:.2} s ({} new bytes chunked, {:.0} MiB peak), restore {:.2} s, \
             restored allocation {} KiB, holes kept",
            src_blocks / 2,
            b.secs,
            new_bytes,
            b.peak_rss_mib,
            r.secs,
            md.blocks() / 2
        ),
    );
}

/// Builds `n` hard links to a few small files, spread over directories of
/// 1000 (ext4 allows 65000 links to one inode).
fn build_hardlinks(src: &Path, n: usize) -> Vec<PathBuf> {
    let bases_n = (n / 50_000 + 1).max(4);
    std::fs::create_dir_all(src.join("base")).unwrap();
    let bases: Vec<PathBuf> = (0..bases_n)
        .map(|i| {
            let p = src.join(format!("base/file-{i}"));
            std::fs::write(&p, pseudo_random(4096 + i, 50 + i as u64)).unwrap();
            p
        })
        .collect();
    for i in 0..n {
        let dir = src.join(format!("links/d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::hard_link(&bases[i % bases_n], dir.join(format!("l{i:07}"))).unwrap();
    }
    bases
}

/// Backs up and restores `n` hard links; checks that every restored link
/// shares its inode with its base file. Returns (backup, restore).
fn hardlinks_round_trip(tmp: &Path, n: usize, limit: Duration) -> (Timed, Timed) {
    let env = Env::cheap(&tmp.join("repo"));
    let src = tmp.join("src");
    let built = Instant::now();
    let bases = build_hardlinks(&src, n);
    let build_secs = built.elapsed().as_secs_f64();
    let b = env.timed(&[&"backup", &src, &"--json", &"--quiet"], limit);
    assert_eq!(b.code(), Some(0), "{}", b.stderr());
    let v = b.json();
    assert_eq!(v["snapshot"]["summary"]["files"], (n + bases.len()) as u64);
    let out = tmp.join("out");
    let r = env.timed(
        &[
            &"restore",
            &v["id"].as_str().unwrap(),
            &"--target",
            &out,
            &"--quiet",
        ],
        limit,
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let back = restored(&out, &src);
    let base_inodes: Vec<(u64, u64)> = bases
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap();
            let md = std::fs::metadata(back.join(rel)).unwrap();
            assert_eq!(std::fs::read(back.join(rel)).unwrap(), std::fs::read(p).unwrap());
            assert_eq!(
                md.nlink(),
                std::fs::metadata(p).unwrap().nlink(),
                "{}",
                p.display()
            );
            (md.dev(), md.ino())
        })
        .collect();
    for i in 0..n {
        let p = back.join(format!("links/d{:04}/l{i:07}", i / 1000));
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            (md.dev(), md.ino()),
            base_inodes[i % bases.len()],
            "{}",
            p.display()
        );
    }
    figures(
        "hard links",
        format!(
            "{n} links to {} files (built in {build_secs:.1} s): backup {:.1} s, {:.0} MiB peak; \
             restore {:.1} s, {:.0} MiB peak; every link restored as a link",
            bases.len(),
            b.secs,
            b.peak_rss_mib,
            r.secs,
            r.peak_rss_mib
        ),
    );
    (b, r)
}

#[test]
fn many_hard_links_restore_as_links_in_bounded_memory() {
    let small_tmp = tempfile::tempdir().unwrap();
    let (small_b, small_r) = hardlinks_round_trip(small_tmp.path(), 10_000, Duration::from_secs(120));
    drop(small_tmp);
    let tmp = tempfile::tempdir().unwrap();
    let (b, r) = hardlinks_round_trip(tmp.path(), 100_000, Duration::from_secs(300));
    // Ten times the links, about the same memory: nothing is kept per file.
    assert!(
        b.peak_rss_mib < small_b.peak_rss_mib + 24.0,
        "backup memory grows with links: {:.0} MiB for 10k, {:.0} MiB for 100k",
        small_b.peak_rss_mib,
        b.peak_rss_mib
    );
    assert!(
        r.peak_rss_mib < small_r.peak_rss_mib + 24.0,
        "restore memory grows with links: {:.0} MiB for 10k, {:.0} MiB for 100k",
        small_r.peak_rss_mib,
        r.peak_rss_mib
    );
}

/// Millions of hard links, nightly: `scripts/stress-hardlinks N`.
#[test]
#[ignore = "minutes long; run by scripts/stress-hardlinks"]
fn stress_hard_links() {
    let n: usize = std::env::var("BACKER_STRESS_HARDLINKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let (b, r) = hardlinks_round_trip(tmp.path(), n, Duration::from_secs(6 * 3600));
    let cap: f64 = std::env::var("BACKER_STRESS_RSS_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512.0);
    assert!(b.peak_rss_mib < cap, "backup peak {:.0} MiB", b.peak_rss_mib);
    assert!(r.peak_rss_mib < cap, "restore peak {:.0} MiB", r.peak_rss_mib);
}
