//! S3 as a user meets it, on a real S3 implementation (s3s-fs, which checks
//! every signature) behind a proxy that delays and counts requests: a
//! restore, a check and an unchanged re-run read each object about once,
//! and with the local cache an unchanged re-run reads no index, snapshot or
//! tree again; `init` makes a missing bucket, and missing credentials get a
//! clear error without a probe of the cloud metadata service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use backer_testkit::{
    LatencyProxy, Moto, S3sFs, build_rich_tree, compare_trees, figures, pseudo_random, s3_url,
};

fn backer(repo: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backer"));
    c.env("BACKER_REPO", repo)
        .env("BACKER_PASSWORD", "correct horse")
        .env_remove("BACKER_PASSWORD_FILE")
        .env_remove("BACKER_SERVER")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env_remove("BACKER_CACHE_DIR")
        // Never the user's own cache; a test that looks at it names one.
        .env(
            "XDG_CACHE_HOME",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/object-storage-cache"),
        )
        .envs(env.iter().copied())
        .args(args);
    c.output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "backer failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn creds() -> Vec<(&'static str, &'static str)> {
    Moto::env().to_vec()
}

/// A tree worth several packs: many small files and a few large ones.
fn source(root: &Path) {
    build_rich_tree(root);
    for d in 0..20 {
        let dir = root.join(format!("many/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..40 {
            let seed = d * 1000 + f;
            std::fs::write(
                dir.join(format!("f{f}")),
                pseudo_random(1000 + (seed as usize * 37) % 9000, seed),
            )
            .unwrap();
        }
    }
    for i in 0..6 {
        std::fs::write(root.join(format!("big{i}")), pseudo_random(6 << 20, 77 + i)).unwrap();
    }
}

#[test]
fn restore_check_and_rerun_read_each_object_about_once() {
    let s3 = S3sFs::start();
    s3.create_bucket("reads");
    let proxy = LatencyProxy::start(&s3.endpoint(), 5);
    let repo = s3_url(&proxy.endpoint(), "reads", "repo");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut env = creds();
    env.push(("BACKER_CACHE_DIR", cache.to_str().unwrap()));
    let src = tmp.path().join("src");
    source(&src);

    ok(backer(&repo, &env, &["init", "-q"]));
    ok(backer(&repo, &env, &["backup", "-q", src.to_str().unwrap()]));
    let objects = s3.objects("reads", "repo");
    let in_dir = |d: &str| {
        objects
            .iter()
            .filter(|p| p.parent().unwrap().to_string_lossy().contains(&format!("/{d}")))
            .count() as u64
    };
    let packs = in_dir("data");
    let metadata = objects.len() as u64 - packs;
    assert!(packs >= 3, "the test needs several packs, made {packs}");

    // Reading everything once, plus the lock's four calls and a listing per
    // directory (twice for check): a restore that read blob by blob would
    // make thousands of requests.
    let budget = |what: &str, reads: u64, got: u64| {
        let allowed = reads + 14;
        figures(
            "object_storage",
            format!("{what}: {got} requests for {reads} objects read"),
        );
        assert!(
            got <= allowed,
            "{what} made {got} requests; reading each object once takes about {reads}"
        );
    };

    proxy.reset();
    let target = tmp.path().join("restored");
    ok(backer(
        &repo,
        &env,
        &[
            "restore",
            "-q",
            "--no-cache",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ],
    ));
    let differences = compare_trees(&src, &target.join(src.strip_prefix("/").unwrap()));
    assert!(differences.is_empty(), "the restore differs: {differences:?}");
    budget("restore", packs + metadata, proxy.requests());

    // check reads storage as it is, never the cache.
    proxy.reset();
    ok(backer(&repo, &env, &["check", "--read-data", "-q"]));
    // check reads the index and key files a second time to check them.
    budget("check --read-data", packs + 2 * metadata, proxy.requests());
    assert!(
        proxy.reads("index") >= 2 * in_dir("index"),
        "{:?}",
        proxy.counts()
    );

    // Nothing changed: no data pack is read or written; without the cache,
    // the parent's trees (a pack or two) besides the index and snapshots…
    proxy.reset();
    ok(backer(
        &repo,
        &env,
        &["--no-cache", "backup", "-q", src.to_str().unwrap()],
    ));
    budget(
        "unchanged re-run without the cache",
        metadata + 3,
        proxy.requests(),
    );
    assert!(
        proxy.reads("data") >= 1,
        "the parent's trees: {:?}",
        proxy.counts()
    );
    let counts = proxy.counts();
    assert!(
        counts.get("PUT").copied().unwrap_or(0) <= 4,
        "an unchanged re-run writes its snapshot and lock only: {counts:?}"
    );

    // …and with it, none of them: the first backup left its index, snapshot
    // and trees in the cache, and the snapshot just written by the run
    // without the cache is read once and kept.
    proxy.reset();
    ok(backer(&repo, &env, &["backup", "-q", src.to_str().unwrap()]));
    let first = proxy.counts();
    proxy.reset();
    ok(backer(&repo, &env, &["backup", "-q", src.to_str().unwrap()]));
    let counts = proxy.counts();
    figures(
        "object_storage",
        format!("unchanged re-run with the cache: {} requests", counts["requests"]),
    );
    for folder in ["data", "index", "snapshots"] {
        assert_eq!(
            proxy.reads(folder),
            0,
            "an unchanged re-run read {folder} objects the cache holds: {counts:?} (run before: {first:?})"
        );
    }
    assert!(cache.join("CACHEDIR.TAG").is_file());

    // A damaged copy is noticed, dropped and read again from the
    // repository: the restore is still right.
    let cached: Vec<_> = walk(&cache)
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains("/data/") || s.contains("/index/")
        })
        .collect();
    assert!(
        cached.iter().any(|p| p.to_string_lossy().contains("/data/")),
        "{cached:?}"
    );
    for p in &cached {
        let mut bytes = std::fs::read(p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(p, bytes).unwrap();
    }
    proxy.reset();
    let again = tmp.path().join("again");
    let out = backer(
        &repo,
        &env,
        &["restore", "latest", "--target", again.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out);
    let differences = compare_trees(&src, &again.join(src.strip_prefix("/").unwrap()));
    assert!(differences.is_empty(), "the restore differs: {differences:?}");
    assert!(stderr.contains("is damaged; removed"), "{stderr}");
    assert!(proxy.reads("index") >= 1, "{:?}", proxy.counts());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn init_creates_a_missing_bucket_and_says_so() {
    let s3 = S3sFs::start();
    let moto = Moto::start();
    for endpoint in [s3.endpoint(), moto.endpoint()] {
        let repo = s3_url(&endpoint, "fresh-bucket", "repo");
        let out = backer(&repo, &creds(), &["snapshots"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not exist: `backer init` creates it") && err.lines().count() == 1,
            "{endpoint}: a missing bucket is one clear line: {err}"
        );
        let said = ok(backer(&repo, &creds(), &["init"]));
        assert!(
            said.contains("created the bucket of s3://fresh-bucket/repo"),
            "{said}"
        );
        ok(backer(&repo, &creds(), &["snapshots"]));
        ok(backer(&repo, &creds(), &["check", "-q"]));
        // A second repository in the same bucket: nothing to create.
        let other = s3_url(&endpoint, "fresh-bucket", "other");
        let said = ok(backer(&other, &creds(), &["init"]));
        assert!(!said.contains("created the bucket"), "{said}");
    }
    assert!(s3.root.path().join("fresh-bucket/repo/config").is_file());
}

/// A stand-in for the instance metadata service that counts who asks.
fn fake_metadata_service() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&asked);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ =
                conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, asked)
}

#[test]
fn credentials_come_from_the_usual_places_and_never_from_an_unasked_metadata_service() {
    let s3 = S3sFs::start();
    s3.create_bucket("creds");
    let repo = s3_url(&s3.endpoint(), "creds", "repo");
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let (metadata, asked) = fake_metadata_service();
    let bare = [("HOME", home_s), ("AWS_METADATA_ENDPOINT", metadata.as_str())];

    // None set: one line naming what to set; the metadata service untouched.
    let out = backer(&repo, &bare, &["init"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "credentials=instance",
    ] {
        assert!(err.contains(name), "the error names {name}: {err}");
    }
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "nothing asked the metadata service"
    );

    // Half a pair is a mistake, said as such.
    let out = backer(
        &repo,
        &[bare[0], bare[1], ("AWS_ACCESS_KEY_ID", "testing")],
        &["init"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    );

    // A profile file, as `aws configure` writes it.
    std::fs::create_dir_all(home.path().join(".aws")).unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        "[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n[backup]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let with_profile = [bare[0], bare[1], ("AWS_PROFILE", "backup")];
    ok(backer(&repo, &with_profile, &["init", "-q"]));
    ok(backer(&repo, &with_profile, &["snapshots"]));
    // The default profile's keys are wrong: the server says so, and the
    // message names the credentials rather than dumping the reply.
    let out = backer(&repo, &bare, &["snapshots"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the credentials") && err.lines().count() == 1,
        "{err}"
    );
    let out = backer(
        &repo,
        &[bare[0], bare[1], ("AWS_PROFILE", "missing")],
        &["snapshots"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("profile missing"));
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "nothing asked the metadata service"
    );

    // Asked for explicitly, the metadata service is used (here: refused).
    std::fs::remove_dir_all(home.path().join(".aws")).unwrap();
    let out = backer(
        &format!("{repo}&credentials=instance&retries=0"),
        &bare,
        &["snapshots"],
    );
    assert!(!out.status.success());
    assert!(
        asked.load(Ordering::SeqCst) > 0,
        "credentials=instance asks the metadata service"
    );
}
