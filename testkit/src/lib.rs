//! Fixtures for Backer's tests: a real S3-compatible server (moto), a file tree
//! holding every kind of entry a backup must keep, and a comparer that checks
//! content and metadata entry by entry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `moto_server` on 127.0.0.1 and a free port, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts the server. Fails loudly, never skips, when it is not installed.
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("failed to start moto_server ({e}); install it with `pip install 'moto[server]'` or run .ci/run")
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts an unsigned request).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "bucket creation failed: {resp}");
    }

    /// An `s3://` repository URL for `bucket/prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&path_style=true",
            self.endpoint()
        )
    }

    /// Environment a client needs: dummy credentials and a region.
    pub fn env() -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(what: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An `s3s-fs` server (a real S3 implementation storing objects as files)
/// on 127.0.0.1, checking signatures with the credentials of
/// [`Moto::env`]; killed on drop. Objects are files under `root/BUCKET/`,
/// so a test can count or damage them directly.
pub struct S3sFs {
    child: Child,
    pub port: u16,
    pub root: tempfile::TempDir,
}

impl S3sFs {
    pub fn start() -> S3sFs {
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(bin("s3s-fs-server"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "testing", "--secret-key", "testing"])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start s3s-fs-server ({e})"));
        wait_listening("s3s-fs", port);
        S3sFs { child, port, root }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A bucket is a directory.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir(self.root.path().join(name)).unwrap();
    }

    /// The files holding the objects under `bucket/prefix`.
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root.path().join(bucket).join(prefix), &mut out);
        out
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `s3://` repository URL for `bucket/prefix` at `endpoint` (path style).
pub fn s3_url(endpoint: &str, bucket: &str, prefix: &str) -> String {
    format!("s3://{bucket}/{prefix}?endpoint={endpoint}&path_style=true")
}

/// The workspace's `s3-latency-proxy` in front of an S3 server: a fixed
/// delay per request, as a network with that round trip adds, and a count
/// of requests by method. Killed on drop.
pub struct LatencyProxy {
    child: Child,
    pub port: u16,
}

impl LatencyProxy {
    pub fn start(upstream: &str, delay_ms: u64) -> LatencyProxy {
        let port = free_port();
        let child = Command::new(bin("s3-latency-proxy"))
            .args(["--upstream", upstream, "--delay-ms", &delay_ms.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening("s3-latency-proxy", port);
        LatencyProxy { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn call(&self, method: &str, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
    }

    /// Requests forwarded since the start or the last reset, by method and
    /// in all (`requests`).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        serde_json::from_str(&self.call("GET", "/__proxy/stats")).unwrap()
    }

    pub fn requests(&self) -> u64 {
        self.counts().get("requests").copied().unwrap_or(0)
    }

    /// GETs of objects in the repository folder `folder` (`data`, `index`,
    /// `snapshots`, `keys`, `locks`) since the start or the last reset.
    pub fn reads(&self, folder: &str) -> u64 {
        self.counts().get(&format!("GET {folder}")).copied().unwrap_or(0)
    }

    pub fn reset(&self) {
        self.call("POST", "/__proxy/reset");
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Deterministic incompressible bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs - 100,
            tv_nsec: nanos,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &ts, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// Builds a tree with every kind of entry a backup must keep: small, empty,
/// multi-chunk and sparse files, compressible and random data, symlinks
/// (relative, absolute, dangling, non-UTF-8 target), hard links, a fifo,
/// non-UTF-8 names, xattrs, odd modes, fixed times, and as root, other owners,
/// setuid bits and device nodes.
pub fn build_rich_tree(root: &Path) {
    let d = |p: &str| {
        let path = root.join(p);
        std::fs::create_dir_all(&path).unwrap();
        path
    };
    d("docs/nested/deeper");
    d("bin");
    d("empty-dir");
    std::fs::write(root.join("docs/readme.txt"), b"hello backer\n".repeat(1000)).unwrap();
    std::fs::write(root.join("docs/empty"), b"").unwrap();
    std::fs::write(root.join("docs/nested/deeper/note.md"), b"# deep\n").unwrap();
    std::fs::write(
        root.join("bin/random.bin"),
        pseudo_random(9 * 1024 * 1024 + 17, 42),
    )
    .unwrap();
    let mut text = Vec::new();
    for i in 0..200_000 {
        text.extend_from_slice(format!("line {i} of a compressible log\n").as_bytes());
    }
    std::fs::write(root.join("docs/log.txt"), &text).unwrap();
    // Sparse: 64 MiB apparent, two small data islands.
    let sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.set_len(64 * 1024 * 1024).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"island one", 10 * 1024 * 1024).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &pseudo_random(300_000, 7), 40 * 1024 * 1024).unwrap();
    drop(sparse);
    symlink("readme.txt", root.join("docs/link-rel")).unwrap();
    symlink("/etc/hostname", root.join("docs/link-abs")).unwrap();
    symlink("does/not/exist", root.join("docs/link-dangling")).unwrap();
    symlink(
        OsStr::from_bytes(b"target-\xff\xfe"),
        root.join("docs/link-binary"),
    )
    .unwrap();
    std::fs::hard_link(root.join("docs/readme.txt"), root.join("bin/hardlink-to-readme")).unwrap();
    std::fs::hard_link(root.join("docs/readme.txt"), root.join("docs/nested/second-link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("docs/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let odd = root.join(OsStr::from_bytes(b"name-\xe9\xff-not-utf8"));
    std::fs::write(&odd, b"latin-1 name").unwrap();
    std::fs::write(root.join("spaces and 'quotes' \"here\""), b"x").unwrap();
    xattr::set(root.join("docs/readme.txt"), "user.backer.test", b"value 1").unwrap();
    xattr::set(root.join("docs"), "user.backer.dir", b"dir value").unwrap();
    let exec = root.join("bin/tool.sh");
    std::fs::write(&exec, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        root.join("docs/nested/deeper/note.md"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    if is_root() {
        let owned = root.join("docs/owned-by-1234");
        std::fs::write(&owned, b"owner test").unwrap();
        rustix::fs::chown(
            &owned,
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
        )
        .unwrap();
        std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o4755)).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("docs/null-device"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
    }
    // Fixed times last, children before parents, so nothing disturbs them.
    let mut all: Vec<PathBuf> = walk(root)
        .into_keys()
        .map(|rel| root.join(OsStr::from_bytes(&rel)))
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(
            p,
            1_600_000_000 + i as i64 * 37,
            (i as i64 * 1_000_003) % 1_000_000_000,
        );
    }
    set_mtime(root, 1_650_000_000, 5);
    // A read-only directory, set last so the tree can be built.
    std::fs::set_permissions(
        root.join("docs/nested/deeper"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
}

/// Relative path (as bytes) → metadata, for every entry under `root`.
pub fn walk(root: &Path) -> BTreeMap<Vec<u8>, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec(), md);
        }
    }
    out
}

/// Compares two trees entry by entry: type, mode, owner (as root), size,
/// mtime to the nanosecond, content, symlink targets, xattrs, device numbers,
/// hard-link groups, and that holes stayed holes. Returns every difference.
pub fn compare_trees(src: &Path, dst: &Path) -> Vec<String> {
    let a = walk(src);
    let b = walk(dst);
    let mut diffs = Vec::new();
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    for k in a.keys() {
        if !b.contains_key(k) {
            diffs.push(format!("missing in restore: {}", show(k)));
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            diffs.push(format!("extra in restore: {}", show(k)));
        }
    }
    let mut links_a: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut links_b: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (k, ma) in &a {
        let Some(mb) = b.get(k) else { continue };
        let name = show(k);
        let pa = src.join(OsStr::from_bytes(k));
        let pb = dst.join(OsStr::from_bytes(k));
        if ma.file_type() != mb.file_type() {
            diffs.push(format!("{name}: type differs"));
            continue;
        }
        if ma.mode() != mb.mode() {
            diffs.push(format!("{name}: mode {:o} != {:o}", ma.mode(), mb.mode()));
        }
        if is_root() && (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            diffs.push(format!(
                "{name}: owner {}:{} != {}:{}",
                ma.uid(),
                ma.gid(),
                mb.uid(),
                mb.gid()
            ));
        }
        if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            diffs.push(format!(
                "{name}: mtime {}.{} != {}.{}",
                ma.mtime(),
                ma.mtime_nsec(),
                mb.mtime(),
                mb.mtime_nsec()
            ));
        }
        let ft = ma.file_type();
        if ft.is_file() {
            if ma.len() != mb.len() {
                diffs.push(format!("{name}: size {} != {}", ma.len(), mb.len()));
            } else if std::fs::read(&pa).unwrap() != std::fs::read(&pb).unwrap() {
                diffs.push(format!("{name}: content differs"));
            }
            if mb.blocks() > ma.blocks() + 64 {
                diffs.push(format!(
                    "{name}: holes were filled ({} blocks, source {})",
                    mb.blocks(),
                    ma.blocks()
                ));
            }
            if ma.nlink() > 1 {
                links_a.entry(ma.ino()).or_default().push(k.clone());
                links_b.entry(mb.ino()).or_default().push(k.clone());
            }
        }
        if ft.is_symlink() && std::fs::read_link(&pa).unwrap() != std::fs::read_link(&pb).unwrap() {
            diffs.push(format!("{name}: symlink target differs"));
        }
        if ma.rdev() != mb.rdev() {
            diffs.push(format!("{name}: device number differs"));
        }
        if !ft.is_symlink() {
            let xa: BTreeMap<_, _> = xattr::list(&pa)
                .unwrap()
                .map(|n| (n.clone(), xattr::get(&pa, &n).unwrap()))
                .collect();
            let xb: BTreeMap<_, _> = xattr::list(&pb)
                .unwrap()
                .map(|n| (n.clone(), xattr::get(&pb, &n).unwrap()))
                .collect();
            if xa != xb {
                diffs.push(format!("{name}: xattrs differ: {xa:?} != {xb:?}"));
            }
        }
    }
    let groups = |m: BTreeMap<u64, Vec<Vec<u8>>>| {
        let mut g: Vec<Vec<Vec<u8>>> = m
            .into_values()
            .map(|mut v| {
                v.sort();
                v
            })
            .collect();
        g.sort();
        g
    };
    if groups(links_a) != groups(links_b) {
        diffs.push("hard-link groups differ".into());
    }
    diffs
}

/// Runs `diff -r --no-dereference` and returns its complaints, leaving out
/// the lines it prints for special files it cannot compare (fifos, devices).
pub fn gnu_diff(src: &Path, dst: &Path) -> Vec<String> {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src)
        .arg(dst)
        .output()
        .expect("failed to run diff");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !(l.starts_with("File ")
                && (l.contains(" is a fifo while ") || l.contains(" is a character special file while ")))
        })
        .map(String::from)
        .collect()
}

/// A binary of this workspace, next to the running test (`cargo test
/// --workspace` builds every binary before running any test).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built; run `cargo build --workspace` (or scripts/test)",
        p.display()
    );
    p
}

/// A running `backer-server` on 127.0.0.1 with OS-chosen ports, killed on drop.
pub struct Server {
    pub child: Child,
    pub mgmt: String,
    pub data: String,
    /// REST port, `127.0.0.1:port`: HTTPS with the server's certificate, or
    /// plain HTTP when the server runs with `--insecure-plaintext`.
    pub rest: String,
    pub dir: PathBuf,
    /// The CA the REST port's certificate chains to; `None` for plain HTTP.
    pub rest_ca: Option<PathBuf>,
}

/// How to start a server beyond the defaults.
#[derive(Debug, Default, Clone)]
pub struct ServerSetup {
    pub clients_toml: String,
    pub backups_toml: Option<String>,
    pub schedules_toml: Option<String>,
    /// Repository location; default `DIR/repo`.
    pub repository: Option<String>,
    /// Extra environment (S3 credentials).
    pub env: Vec<(String, String)>,
    /// Extra arguments (`--clock-start`).
    pub args: Vec<String>,
    /// Where the server's log goes (default: the test's stderr).
    pub log: Option<PathBuf>,
    /// The management port (0: chosen by the OS), for a caller that must
    /// know it before the server starts (the operator).
    pub mgmt_port: u16,
}

impl Server {
    /// Writes a configuration (login `admin` / `s3cret`) under `dir` and starts the server.
    pub fn start(dir: &Path, clients_toml: &str) -> Server {
        Server::start_with(
            dir,
            ServerSetup {
                clients_toml: clients_toml.to_string(),
                ..Default::default()
            },
        )
    }

    pub fn start_with(dir: &Path, setup: ServerSetup) -> Server {
        let conf = dir.join("conf");
        std::fs::create_dir_all(conf.join("clients")).unwrap();
        let repository = setup
            .repository
            .clone()
            .unwrap_or_else(|| dir.join("repo").display().to_string());
        std::fs::write(
            conf.join("server.toml"),
            format!(
                "[server]\nMgmtPort = {mgmt_port}\nDataPort = 0\nRestApiPort = 0\nExternalName = \"localhost\"\n\
                 DataTransferInterface = \"127.0.0.1\"\nLogin = \"admin\"\nPassword = \"s3cret\"\n\n\
                 [repository]\nLocalization = \"{repository}\"\n\n[clients]\nConfigFile = \"clients/\"\n",
                mgmt_port = setup.mgmt_port,
            ),
        )
        .unwrap();
        std::fs::write(conf.join("clients/clients.toml"), &setup.clients_toml).unwrap();
        if let Some(b) = &setup.backups_toml {
            std::fs::write(conf.join("clients/backups.toml"), b).unwrap();
        }
        if let Some(s) = &setup.schedules_toml {
            std::fs::write(conf.join("clients/schedules.toml"), s).unwrap();
        }
        Server::launch(dir, &setup)
    }

    /// Kills `old` (as a crash would) and starts it again on the same
    /// configuration, state and ports, so its agents can find it again.
    pub fn restart(mut old: Server, setup: &ServerSetup) -> Server {
        let _ = old.child.kill();
        let _ = old.child.wait();
        let port = |a: &str| a.rsplit(':').next().unwrap().to_string();
        let conf = old.dir.join("conf/server.toml");
        let text = std::fs::read_to_string(&conf)
            .unwrap()
            .replace("MgmtPort = 0\n", &format!("MgmtPort = {}\n", port(&old.mgmt)))
            .replace("DataPort = 0", &format!("DataPort = {}", port(&old.data)))
            .replace("RestApiPort = 0", &format!("RestApiPort = {}", port(&old.rest)));
        std::fs::write(&conf, text).unwrap();
        Server::launch(&old.dir, setup)
    }

    fn launch(dir: &Path, setup: &ServerSetup) -> Server {
        let conf = dir.join("conf");
        let mut child = Command::new(bin("backer-server"))
            .arg("--config")
            .arg(conf.join("server.toml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(&setup.args)
            .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BACKER_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(match &setup.log {
                Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let (mut mgmt, mut data, mut rest) = (String::new(), String::new(), String::new());
        for part in line.split_whitespace() {
            if let Some(v) = part.strip_prefix("mgmt=") {
                mgmt = v.replace("127.0.0.1", "localhost");
            } else if let Some(v) = part.strip_prefix("data=") {
                data = v.replace("127.0.0.1", "localhost");
            } else if let Some(v) = part.strip_prefix("rest=") {
                rest = v.to_string();
            }
        }
        assert!(!mgmt.is_empty(), "backer-server did not start: {line:?}");
        let arg_after = |flag: &str| {
            let i = setup.args.iter().position(|a| a == flag)?;
            setup.args.get(i + 1).map(PathBuf::from)
        };
        let rest_ca = if setup.args.iter().any(|a| a == "--insecure-plaintext") {
            None
        } else {
            Some(
                arg_after("--pki-dir")
                    .unwrap_or_else(|| dir.join("state"))
                    .join("ca.pem"),
            )
        };
        Server {
            child,
            mgmt,
            data,
            rest,
            dir: dir.to_path_buf(),
            rest_ca,
        }
    }

    /// `backer --server … ARGS` with the admin certificate from [`Server::admin_cert`].
    pub fn cli(&self, args: &[&str]) -> Output {
        let admin = self.dir.join("admin");
        Command::new(bin("backer"))
            .args(["--server", &self.mgmt])
            .arg("--ca")
            .arg(admin.join("ca.pem"))
            .arg("--cert")
            .arg(admin.join("admin.pem"))
            .arg("--key")
            .arg(admin.join("admin-key.pem"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Adds client `name` and enrols an agent for it with state in `state`.
    pub fn enrol(&self, name: &str, state: &Path) {
        let bundle = self.dir.join(format!("{name}.bundle.json"));
        ok(self.cli(&["clients", "add", name, "--bundle-out", bundle.to_str().unwrap()]));
        let out = ok(agent(state, &["enroll", "--bundle", bundle.to_str().unwrap()])
            .output()
            .unwrap());
        assert!(out.contains(&format!("enrolled as {name}")), "{out}");
    }

    /// Waits until the server lists `name` as connected.
    pub fn wait_connected(&self, name: &str) {
        wait_for(&format!("{name} to connect"), || {
            let out = self.cli(&["clients", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v.as_array()
                .is_some_and(|l| l.iter().any(|c| c["name"] == name && c["connected"] == true))
        });
    }

    /// GETs `path` from the REST port: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        self.http_request(None, path, "")
    }

    /// GETs `path` with HTTP basic authorization.
    pub fn http_get_auth(&self, path: &str, login: &str, password: &str) -> (u16, String) {
        self.http_get_auth_from(None, path, login, password)
    }

    /// [`Server::http_get_auth`] from the local address `source` (another
    /// loopback address, e.g. 127.0.0.2, is another peer to the server).
    pub fn http_get_auth_from(
        &self,
        source: Option<std::net::Ipv4Addr>,
        path: &str,
        login: &str,
        password: &str,
    ) -> (u16, String) {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
        self.http_request(source, path, &format!("Authorization: Basic {token}\r\n"))
    }

    fn http_request(&self, source: Option<std::net::Ipv4Addr>, path: &str, headers: &str) -> (u16, String) {
        let tcp = connect_from(source, &self.rest);
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
        let mut resp = Vec::new();
        match &self.rest_ca {
            None => {
                let mut s = tcp;
                s.write_all(request.as_bytes()).unwrap();
                s.read_to_end(&mut resp).unwrap();
            }
            Some(ca) => {
                let mut s = rustls::StreamOwned::new(tls_client(ca), tcp);
                s.write_all(request.as_bytes()).unwrap();
                // A peer that closes without close_notify still said all it had to.
                if let Err(e) = s.read_to_end(&mut resp) {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
                }
            }
        }
        let resp = String::from_utf8_lossy(&resp);
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// Issues an admin certificate into `dir/admin`.
    pub fn admin_cert(&self) -> PathBuf {
        let out = self.dir.join("admin");
        let st = Command::new(bin("backer-server"))
            .args(["--state-dir"])
            .arg(self.dir.join("state"))
            .args(["admin-cert", "--name", "ops", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        out
    }
}

/// A TCP connection to `address`, from `source` when given.
fn connect_from(source: Option<std::net::Ipv4Addr>, address: &str) -> TcpStream {
    let Some(source) = source else {
        return TcpStream::connect(address).unwrap();
    };
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let target: std::net::SocketAddr = address.parse().unwrap();
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &std::net::SocketAddr::from((source, 0))).unwrap();
    connect(&fd, &target).unwrap();
    TcpStream::from(fd)
}

/// A TLS 1.3 client that trusts only the CA in `ca` and expects the name
/// `localhost`, as the server's certificate has it.
fn tls_client(ca: &Path) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `backer-agent --state-dir STATE ARGS`.
pub fn agent(state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("backer-agent"));
    c.arg("--state-dir").arg(state).args(args);
    c
}

/// A command's output parsed as JSON; not JSON fails the test, showing it.
pub fn json(out: String) -> serde_json::Value {
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The stdout of a command that must succeed.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The stderr of a command that must fail.
pub fn err(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `f` every 100 ms for up to 30 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints a test's figures (faults injected, kills survived, inputs
/// refused) so that every run shows them: to the real stderr, which the test
/// harness does not capture, unlike `eprintln!`.
pub fn figures(suite: &str, line: impl std::fmt::Display) {
    use std::io::Write;
    let text = format!("{suite} figures | {line}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Waits up to 30 s for `child` to exit; `what` says what it means if it
/// does not (the test fails with it).
pub fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real etcd and kube-apiserver on 127.0.0.1, started by
/// `e2e/control-plane` (binaries from `e2e/install-control-plane`), stopped
/// on drop (SIGTERM, so the script stops both).
pub struct ControlPlane {
    child: Child,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub url: String,
}

impl ControlPlane {
    pub fn start(dir: &Path) -> ControlPlane {
        let bins = std::env::var("BACKER_CP_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/backer/control-plane/bin")
            });
        assert!(
            bins.join("kube-apiserver").is_file() && bins.join("etcd").is_file(),
            "kube-apiserver and etcd are not installed: run e2e/install-control-plane first"
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let child = Command::new(root.join("e2e/control-plane"))
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.with_extension("log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let env = dir.join("env");
        let deadline = Instant::now() + Duration::from_secs(180);
        while !env.exists() {
            assert!(
                Instant::now() < deadline,
                "the control plane did not start (see {})",
                dir.with_extension("log").display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let text = std::fs::read_to_string(&env).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {}", env.display()))
                .trim_matches(|c| c == '"' || c == '\'')
                .to_string()
        };
        ControlPlane {
            child,
            dir: dir.to_path_buf(),
            kubeconfig: PathBuf::from(get("KUBECONFIG")),
            url: get("KUBE_APISERVER_URL"),
        }
    }

    /// Kills the kube-apiserver as a crash would and starts it again on the
    /// same port and etcd; returns once it is ready, with how long it was away.
    pub fn restart_apiserver(&self) -> Duration {
        let counter = self.dir.join("apiserver-restarts");
        let count = || {
            std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let before = count();
        let started = Instant::now();
        let status = Command::new("kill")
            .arg("-USR1")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "failed to signal e2e/control-plane");
        let deadline = started + Duration::from_secs(180);
        while count() == before {
            assert!(
                Instant::now() < deadline,
                "the kube-apiserver did not come back (see {})",
                self.dir.with_extension("log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        started.elapsed()
    }

    /// `kubectl ARGS` as the cluster's admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, "")
    }

    /// `kubectl ARGS` as the cluster's admin, with `input` on its stdin.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut c = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
