//! The chart on a real one-node cluster (tier 4): kubelet, containerd, runc,
//! the CNI bridge, CoreDNS, kube-proxy, kube-router enforcing
//! NetworkPolicies and local-path-provisioner, started by `e2e/cluster`
//! with the images `e2e/build-images` made from the workspace's release
//! binaries. What only a node proves is proven here; `e2e.rs` keeps what a
//! control plane without a kubelet proves well.
//!
//! Volumes are local-path's (hostPath PVs, the default StorageClass of kind
//! and k3s). CSI volumes are not covered here: the Go module proxy refuses
//! csi-driver-host-path and node-driver-registrar (403), so no CSI stack can
//! be built on this machine (e2e/README.md). What remains for CSI volumes
//! is `e2e.rs`, with the kubelet's CSI directory layout made by hand.
//!
//! Never skipped: a missing piece (root, the node's binaries, the images)
//! fails the test with what to run.
//!
//! Needs root, `e2e/install-node` and `e2e/build-images` (scripts/test
//! runs both, and builds the release binaries first). One cluster per
//! machine: the suite is one test, its steps in order, each timed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use backer_testkit::{Running, bin, compare_trees, figures, is_root};

const NS: &str = "backer-system";
const APP: &str = "app";
const NODE: &str = "backer-node";
/// The upgrade's image tag: the same image under a new name, as a release
/// pushed to a registry would be.
const UPGRADE_TAG: &str = "0.1.0-upgrade";
const NODE_PORT: u16 = 30771;
const NODE_IP: &str = "198.18.0.1";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where `e2e/install-node` and `e2e/build-images` keep the node's
/// binaries and images (their BACKER_NODE_DIR).
fn node_dir() -> PathBuf {
    match std::env::var_os("BACKER_NODE_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/backer/node")
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_ok(what: &str, c: &mut Command) -> String {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: failed to start: {e}"));
    assert!(o.status.success(), "{what}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Everything the suite needs, checked first, each with what to run.
fn prerequisites() {
    assert!(
        is_root(),
        "the real-node suite needs root (containerd, the kubelet, iptables and a bridge); run it as root"
    );
    let check = Command::new(root().join("e2e/install-node"))
        .arg("--check")
        .output()
        .expect("failed to run e2e/install-node --check");
    assert!(
        check.status.success(),
        "the node's binaries or packages are missing or stale: run e2e/install-node \
         (about 16 min on a fresh machine, cached in ~/.cache/backer/): {}",
        text(&check)
    );
    let images = node_dir().join("images");
    for a in ["pause", "coredns", "local-path-provisioner", "busybox", "backer"] {
        assert!(
            images.join(format!("{a}.tar")).is_file(),
            "{}/{a}.tar is missing: run e2e/build-images (scripts/test does)",
            images.display()
        );
    }
    // The Backer image must hold the workspace's release binaries, not an
    // older build of them.
    let release = bin("backer").parent().unwrap().parent().unwrap().join("release");
    let bins = std::fs::read_to_string(images.join("backer.bins")).unwrap_or_default();
    for b in ["backer-operator", "backer-server", "backer-agent", "backer"] {
        let path = release.join(b);
        assert!(
            path.is_file(),
            "{} is missing: the node suite runs the chart's images, built from the release binaries: \
             run scripts/test (or `cargo build --release --locked --bins` and \
             `BACKER_BIN_DIR={} e2e/build-images`)",
            path.display(),
            release.display()
        );
        let sum = run_ok("sha256sum", Command::new("sha256sum").arg(&path));
        let sum = sum.split_whitespace().next().unwrap_or_default().to_string();
        assert!(
            bins.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [sum.as_str(), b]),
            "the Backer image in {} was not built from {}: run `BACKER_BIN_DIR={} e2e/build-images` \
             (scripts/test does)",
            images.display(),
            path.display(),
            release.display()
        );
    }
    for tool in ["openssl", "sha256sum", "base64"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing (Debian: openssl, coreutils)"
        );
    }
}

/// The cluster, stopped on drop (`e2e/cluster stop`), with logs and the
/// state of the pods printed first when the test fails.
struct Node {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    kubectl: PathBuf,
    helm: PathBuf,
    /// Holds `kubectl-backer`, first on kubectl's PATH.
    plugins: PathBuf,
    stopped: bool,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let o = Command::new(root().join("e2e/cluster"))
            .arg("start")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let mut node = Node {
            dir: dir.to_path_buf(),
            env: BTreeMap::new(),
            kubectl: PathBuf::new(),
            helm: PathBuf::new(),
            plugins: dir.join("plugins"),
            // A start that failed has stopped what it started (or refused
            // before starting anything, e.g. beside another cluster, which
            // a `stop` from here must not touch): nothing for Drop to do.
            stopped: !o.status.success(),
        };
        assert!(
            o.status.success(),
            "e2e/cluster start {}: {}",
            dir.display(),
            text(&o)
        );
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        node.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        node.kubectl = PathBuf::from(node.get("KUBECTL"));
        node.helm = PathBuf::from(
            run_ok(
                "e2e/install-helm",
                &mut Command::new(root().join("e2e/install-helm")),
            )
            .trim(),
        );
        std::fs::create_dir_all(&node.plugins).unwrap();
        std::os::unix::fs::symlink(bin("backer"), node.plugins.join("kubectl-backer")).unwrap();
        node
    }

    fn get(&self, k: &str) -> String {
        self.env
            .get(k)
            .unwrap_or_else(|| panic!("{k} is missing in {}/env", self.dir.display()))
            .clone()
    }

    fn path_var(&self) -> String {
        format!(
            "{}:{}:{}",
            self.plugins.display(),
            self.kubectl.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("KUBECONFIG", self.get("KUBECONFIG"))
            .env("PATH", self.path_var());
        c
    }

    fn k(&self, args: &[&str]) -> Output {
        self.cmd(&self.kubectl)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.k(args);
        assert!(o.status.success(), "kubectl {}: {}", args.join(" "), text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        let mut c = self
            .cmd(&self.kubectl)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "kubectl apply: {}\n{yaml}", text(&o));
    }

    fn jsonpath(&self, kind: &str, name: &str, ns: &str, path: &str) -> String {
        let jp = format!("jsonpath={path}");
        let mut args = vec!["get", kind, name, "-o", &jp];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        String::from_utf8_lossy(&self.k(&args).stdout).into_owned()
    }

    /// `sh -c SCRIPT` in a pod's container, through the kubelet.
    fn exec(&self, ns: &str, pod: &str, script: &str) -> String {
        self.ok(&["exec", "-n", ns, pod, "--", "sh", "-c", script])
    }

    fn helm(&self, args: &[&str]) -> Output {
        self.cmd(&self.helm)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `kubectl backer ARGS` through the real kubectl, which finds the plugin on PATH.
    fn backer(&self, args: &[&str]) -> String {
        let mut a = vec!["backer"];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    fn restart(&self, component: &str) -> Duration {
        let t = Instant::now();
        run_ok(
            &format!("e2e/cluster restart {component}"),
            Command::new(root().join("e2e/cluster"))
                .arg("restart")
                .arg(&self.dir)
                .arg(component),
        );
        t.elapsed()
    }

    fn diagnose(&self) {
        eprintln!(
            "===== the cluster in {} (logs in {}/logs)",
            self.dir.display(),
            self.dir.display()
        );
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "backerclients,backupjobs,restorejobs,snapshots", "-A"],
            vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            eprintln!("--- kubectl {}\n{}", args.join(" "), text(&self.k(&args)));
        }
        for app in ["backer-operator", "backer-server", "backer-agent"] {
            let sel = format!("app.kubernetes.io/name={app}");
            let o = self.k(&[
                "logs",
                "-n",
                NS,
                "-l",
                &sel,
                "--tail=60",
                "--prefix",
                "--all-containers",
            ]);
            eprintln!("--- logs of {app}\n{}", text(&o));
        }
    }

    /// Stops the cluster and checks that nothing is left on the machine.
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        self.stopped = true;
        let o = Command::new(root().join("e2e/cluster"))
            .arg("stop")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "e2e/cluster stop: {}", text(&o));
        let left = Command::new(root().join("e2e/cluster"))
            .arg("leftovers")
            .output()
            .unwrap();
        assert!(
            left.status.success(),
            "the cluster left things behind: {}",
            text(&left)
        );
        t.elapsed()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if std::thread::panicking() {
            self.diagnose();
        }
        let o = Command::new(root().join("e2e/cluster"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("e2e/cluster stop {} failed: {}", self.dir.display(), text(&o)),
            Err(e) => eprintln!("failed to run e2e/cluster stop {}: {e}", self.dir.display()),
        }
        eprintln!("the cluster's logs are kept in {}/logs", self.dir.display());
    }
}

fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    t.elapsed()
}

/// Waits for a BackupJob's (last) run or a RestoreJob's run to end, and
/// returns its phase and message.
fn settled(node: &Node, kind: &str, name: &str, ns: &str, secs: u64) -> (String, String) {
    let run = if kind == "backupjob" { "lastRun" } else { "run" };
    eventually(&format!("{kind} {ns}/{name} to finish"), secs, || {
        !node
            .jsonpath(kind, name, ns, &format!("{{.status.{run}.finished}}"))
            .is_empty()
            || node.jsonpath(kind, name, ns, "{.status.phase}") == "Invalid"
    });
    let mut message = node.jsonpath(kind, name, ns, &format!("{{.status.{run}.message}}"));
    if message.is_empty() {
        // An Invalid object has no run; the Ready condition says why.
        message = node.jsonpath(kind, name, ns, "{.status.conditions[0].message}");
    }
    (
        node.jsonpath(kind, name, ns, &format!("{{.status.{run}.phase}}")),
        message,
    )
}

fn succeeded(node: &Node, kind: &str, name: &str, ns: &str, secs: u64) {
    let (phase, message) = settled(node, kind, name, ns, secs);
    assert_eq!(phase, "Succeeded", "{kind} {ns}/{name}: {message}");
}

/// The Snapshot object of a BackupJob's last run.
fn snapshot_of(node: &Node, job: &str, ns: &str) -> String {
    let id = node.jsonpath("backupjob", job, ns, "{.status.lastRun.jobs[0].snapshot}");
    assert_eq!(id.len(), 64, "backupjob {ns}/{job}: snapshot id {id:?}");
    let mut name = String::new();
    eventually(&format!("the Snapshot of {ns}/{job}"), 60, || {
        name = node.ok(&[
            "get",
            "snapshots",
            "-n",
            ns,
            "-l",
            &format!("backer.dev/snapshot-id={}", &id[..32]),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        !name.is_empty()
    });
    name
}

fn snapshots_of_pvc(node: &Node, ns: &str, pvc: &str) -> Vec<String> {
    let out = node.ok(&[
        "get",
        "snapshots",
        "-n",
        ns,
        "-o",
        &format!("jsonpath={{range .items[?(@.spec.pvc==\"{pvc}\")]}}{{.spec.id}}{{\"\\n\"}}{{end}}"),
    ]);
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    v
}

fn pods(node: &Node, app: &str) -> Vec<(String, String)> {
    let out = node.ok(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        &format!("app.kubernetes.io/name={app}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn leader(node: &Node) -> String {
    node.jsonpath("lease", "backer-operator", NS, "{.spec.holderIdentity}")
}

fn connected(node: &Node, client: &str) -> bool {
    node.jsonpath("backerclient", client, "", "{.status.phase} {.status.connected}") == "Enrolled true"
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let status = body
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        body.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    )
}

/// Serial and end of the certificate a TLS port serves (openssl's words).
fn served_certificate(addr: &str) -> String {
    let o = Command::new("sh")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect {addr} -servername backer-server </dev/null 2>/dev/null \
                 | openssl x509 -noout -serial -enddate"
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn pem_serial_and_end(pem: &str, dir: &Path) -> String {
    let f = dir.join("cert-to-read.pem");
    std::fs::write(&f, pem).unwrap();
    run_ok(
        "openssl x509",
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-enddate", "-in"])
            .arg(&f),
    )
    .trim()
    .to_string()
}

fn secret_value(node: &Node, name: &str, key: &str) -> String {
    use base64::Engine;
    let b64 = node.jsonpath(
        "secret",
        name,
        NS,
        &format!("{{.data.{}}}", key.replace('.', "\\.")),
    );
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap(),
    )
    .unwrap()
}

/// A manifest of a directory tree in a pod, read there with busybox:
/// type, mode, owner, size, mtime (files) and sha256 (files) or target
/// (symlinks) per entry, and which entries are hard links of each other.
fn manifest(node: &Node, pod: &str, dir: &str) -> BTreeMap<String, String> {
    let script = format!(
        "cd {dir} && find . | sort | while IFS= read -r f; do \
           s=$(stat -c '%F|%a|%u|%g|%i' \"$f\"); \
           case \"$s\" in \
             'regular file'*|'regular empty file'*) x=\"$(stat -c '%s|%Y' \"$f\")|$(sha256sum \"$f\" | cut -d' ' -f1)\" ;; \
             'symbolic link'*) x=\"$(readlink \"$f\")\" ;; \
             *) x=- ;; \
           esac; \
           printf '%s|%s|%s\\n' \"$f\" \"$s\" \"$x\"; \
         done"
    );
    let out = node.exec(APP, pod, &script);
    // Inode numbers differ after a restore; which entries share one must not.
    let mut rows = Vec::new();
    let mut by_inode: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        let parts: Vec<&str> = line.splitn(7, '|').collect();
        assert_eq!(parts.len(), 7, "manifest line {line:?}");
        let (path, inode) = (
            parts[0].trim_start_matches("./").to_string(),
            parts[5].to_string(),
        );
        if path == "." {
            continue;
        }
        if parts[1].starts_with("regular") {
            by_inode.entry(inode.clone()).or_default().push(path.clone());
        }
        rows.push((path, parts, inode));
    }
    rows.into_iter()
        .map(|(path, parts, inode)| {
            let links = by_inode
                .get(&inode)
                .filter(|g| g.len() > 1)
                .map(|g| g.join("+"))
                .unwrap_or_default();
            let value = format!(
                "{} mode={} owner={}:{} {} links={links}",
                parts[1], parts[2], parts[3], parts[4], parts[6]
            );
            (path, value)
        })
        .collect()
}

fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("{k}: missing")),
            Some(w) if w != v => out.push(format!("{k}: {w}, expected {v}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("{k}: unexpected"));
    }
    out
}

/// Entries under `prefix/`, with the prefix taken off (and link groups
/// limited to what is under it).
fn under(m: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    let p = format!("{prefix}/");
    m.iter()
        .filter_map(|(k, v)| {
            let rel = k.strip_prefix(&p)?;
            let v = match v.split_once(" links=") {
                Some((head, links)) => {
                    let inside: Vec<&str> = links.split('+').filter_map(|l| l.strip_prefix(&p)).collect();
                    let links = if inside.len() > 1 {
                        inside.join("+")
                    } else {
                        String::new()
                    };
                    format!("{head} links={links}")
                }
                None => v.clone(),
            };
            Some((rel.to_string(), v))
        })
        .collect()
}

fn busybox_pod(image: &str, ns: &str, name: &str, claim: Option<&str>) -> String {
    let (mounts, volumes) = match claim {
        Some(c) => (
            "      volumeMounts: [{name: data, mountPath: /data}]\n".to_string(),
            format!("  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {c}}}}}]\n"),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  \
         containers:\n    - name: main\n      image: {image}\n      imagePullPolicy: Never\n      \
         command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']\n{mounts}{volumes}"
    )
}

/// The tree the workload writes: modes, an owner other than root, a sticky
/// directory, symlinks (relative, absolute, dangling), hard links, an empty
/// file and directory, a fixed mtime, and 100 MiB of random data.
const WRITE_TREE: &str = "set -e; cd /data; mkdir -p tree/sub/deeper tree/empty-dir tree/sticky; \
    printf 'hello backer\\n' > tree/a.txt; chmod 640 tree/a.txt; \
    head -c 300000 /dev/urandom > tree/sub/b.bin; chmod 600 tree/sub/b.bin; \
    printf '#!/bin/sh\\necho hi\\n' > tree/sub/tool.sh; chmod 755 tree/sub/tool.sh; \
    printf 'deep\\n' > tree/sub/deeper/note.md; touch -d '2020-01-02 03:04:05' tree/sub/deeper/note.md; \
    chmod 400 tree/sub/deeper/note.md; \
    : > tree/empty; printf 'owned\\n' > tree/owned; chown 1234:5678 tree/owned; \
    chmod 1777 tree/sticky; printf 's\\n' > tree/sticky/in-sticky; \
    ln -s a.txt tree/link-rel; ln -s /etc/passwd tree/link-abs; ln -s does/not/exist tree/link-dangling; \
    ln tree/a.txt tree/sub/hard-a; ln tree/sub/b.bin tree/hard-b; \
    head -c 104857600 /dev/urandom > tree/big.bin";

/// Changes and deletions after the first backup.
const DAMAGE_TREE: &str = "set -e; cd /data/tree; printf 'changed\\n' > a.txt; rm sub/b.bin big.bin; \
    chmod 700 sub/tool.sh; rm link-rel; ln -s sub link-rel; rm -r sub/deeper; chown 0:0 owned; rm sticky/in-sticky";

#[test]
fn the_chart_on_a_real_node() {
    let suite = Instant::now();
    prerequisites();
    let dir = PathBuf::from(format!("/tmp/backer-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut times: Vec<(&str, Duration)> = Vec::new();
    let mut step = Instant::now();
    let mut lap = |times: &mut Vec<(&'static str, Duration)>, what: &'static str| {
        times.push((what, step.elapsed()));
        figures("node", format!("{what}: {:.1} s", step.elapsed().as_secs_f64()));
        step = Instant::now();
    };

    let node = Node::start(&dir.join("cluster"));
    lap(&mut times, "cluster start");
    let busybox = node.get("BUSYBOX_IMAGE");

    // --- The chart with its default values (two operator replicas), and
    // meanwhile a workload with a local-path PVC writes its files.
    node.ok(&["create", "namespace", NS]);
    node.ok(&[
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    let chart = root().join("charts/backer");
    let install = node
        .cmd(&node.helm)
        .args(["install", "backer"])
        .arg(&chart)
        .args(["-n", NS, "--wait", "--timeout", "4m"])
        // 25 MiB/s: a 100 MiB file takes the agent at least 4 s to upload,
        // so the steps that stop a leader or the server "during a backup"
        // do, however fast this machine reads and hashes (an unthrottled
        // re-run finished in 0.4 s, before the server's pod was deleted).
        .args(["--set", "agent.uploadLimit=25600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for ns in [APP, "intruder"] {
        node.ok(&["create", "namespace", ns]);
    }
    node.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data, namespace: {APP}}}\n\
         spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 2Gi}}}}}}\n---\n{}---\n{}",
        busybox_pod(&busybox, APP, "writer", Some("data")),
        busybox_pod(&busybox, "intruder", "probe", None),
    ));
    node.ok(&[
        "wait",
        "-n",
        APP,
        "--for=condition=Ready",
        "pod/writer",
        "--timeout=120s",
    ]);
    node.exec(APP, "writer", WRITE_TREE);
    let original = manifest(&node, "writer", "/data");
    assert!(
        original["tree/big.bin"].contains(" 104857600|"),
        "{:?}",
        original["tree/big.bin"]
    );
    assert!(
        original["tree/a.txt"].contains("links=tree/a.txt+tree/sub/hard-a"),
        "{original:?}"
    );
    let pv = node.jsonpath("pvc", "data", APP, "{.spec.volumeName}");
    let host_path = node.jsonpath("pv", &pv, "", "{.spec.hostPath.path}");
    assert!(
        host_path.starts_with(&node.get("LOCAL_PATH_DIR")),
        "a local-path (hostPath) volume: {host_path:?}"
    );
    let o = install.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "helm install --wait (2 operator replicas): {}",
        text(&o)
    );
    lap(
        &mut times,
        "helm install --wait, the workload's 100 MiB tree meanwhile",
    );

    // Fault 1: both replicas Ready, one leading, the other a ready standby.
    assert_eq!(
        node.jsonpath("deploy", "backer-operator", NS, "{.status.readyReplicas}"),
        "2"
    );
    let operators = pods(&node, "backer-operator");
    assert_eq!(operators.len(), 2, "{operators:?}");
    let holder = leader(&node);
    let mut said = Vec::new();
    for (pod, _) in &operators {
        let ip = node.jsonpath("pod", pod, NS, "{.status.podIP}");
        let (code, body) = http_get(&format!("{ip}:8080"), "/readyz");
        assert_eq!(code, 200, "{pod} /readyz: {body}");
        said.push(format!("{pod}: {}", body.trim()));
        let want = if *pod == holder { "leading" } else { "standby" };
        assert!(body.contains(want), "{pod} (leader {holder}) says {body:?}");
    }
    figures("node", format!("operators' /readyz: {}", said.join("; ")));

    // The agent's pod Ready; its node Enrolled through a CSR the operator signed.
    eventually("the agent DaemonSet Ready", 120, || {
        node.jsonpath(
            "ds",
            "backer-agent",
            NS,
            "{.status.numberReady}/{.status.desiredNumberScheduled}",
        ) == "1/1"
    });
    eventually("BackerClient backer-node Enrolled and connected", 120, || {
        connected(&node, NODE)
    });
    let csr = node.ok(&[
        "get",
        "csr",
        "-o",
        "jsonpath={range .items[?(@.spec.signerName==\"backer.dev/agent\")]}{.metadata.name} \
         {.spec.username} {.status.conditions[0].type} {.status.certificate}{\"\\n\"}{end}",
    ]);
    let signed: Vec<&str> = csr
        .lines()
        .filter(|l| l.contains("system:serviceaccount:backer-system:backer-agent Approved LS0t"))
        .collect();
    assert!(!signed.is_empty(), "an approved, signed CSR of the agent: {csr}");
    // Fault 2: enforced, the server's NetworkPolicy let the operator reach
    // the data port, where the CSR was signed.
    node.ok(&["get", "networkpolicy", "backer-server", "-n", NS]);
    lap(&mut times, "agent Ready, node enrolled through a CSR");

    // A schedule that runs all along: the upgrade below happens during it.
    let sched_src = dir.join("sched-src");
    std::fs::create_dir_all(&sched_src).unwrap();
    std::fs::write(sched_src.join("note"), b"scheduled\n").unwrap();
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: every-minute, namespace: {NS}}}\n\
         spec: {{clients: [{NODE}], paths: [\"{}\"], schedule: \"* * * * *\", historyLimit: 3}}\n",
        sched_src.display()
    ));

    // --- A BackupJob of the PVC; files changed and deleted; a RestoreJob
    // brings them back whole, another by paths into a subPath.
    // Meanwhile: NetworkPolicies, from a pod of another namespace.
    node.ok(&[
        "wait",
        "-n",
        "intruder",
        "--for=condition=Ready",
        "pod/probe",
        "--timeout=60s",
    ]);
    let probe = {
        let kubectl = node.kubectl.clone();
        let kubeconfig = node.get("KUBECONFIG");
        std::thread::spawn(move || {
            let reach = |port: u16| {
                Command::new(&kubectl)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["exec", "-n", "intruder", "probe", "--", "sh", "-c"])
                    .arg(format!(
                        "nc -w 3 backer-server.backer-system.svc.cluster.local {port} -e true && echo open || echo closed"
                    ))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default()
            };
            [7070u16, 7071, 7080].map(|p| (p, reach(p)))
        })
    };
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: first, namespace: {APP}}}\nspec: {{pvc: data}}\n"
    ));
    succeeded(&node, "backupjob", "first", APP, 180);
    let first = snapshot_of(&node, "first", APP);
    lap(&mut times, "BackupJob of the PVC (100 MiB)");
    node.exec(APP, "writer", DAMAGE_TREE);
    let damaged = manifest(&node, "writer", "/data");
    assert!(!differences(&original, &damaged).is_empty());
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: whole, namespace: {APP}}}\n\
         spec: {{snapshot: {first}, target: {{pvc: data}}, overwrite: Always}}\n"
    ));
    succeeded(&node, "restorejob", "whole", APP, 180);
    let restored = manifest(&node, "writer", "/data");
    let diffs = differences(&under(&original, "tree"), &under(&restored, "tree"));
    assert!(
        diffs.is_empty(),
        "the whole restore into the local-path volume differs: {diffs:#?}"
    );
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: some, namespace: {APP}}}\n\
         spec: {{snapshot: {first}, paths: [/tree/sub], target: {{pvc: data, subPath: restored}}}}\n"
    ));
    succeeded(&node, "restorejob", "some", APP, 120);
    let aside = manifest(&node, "writer", "/data/restored");
    let diffs = differences(&under(&original, "tree/sub"), &under(&aside, "tree/sub"));
    assert!(
        diffs.is_empty(),
        "the restore of /tree/sub into subPath restored differs: {diffs:#?}"
    );
    assert!(
        !aside
            .keys()
            .any(|k| k.starts_with("tree/a.txt") || k.starts_with("tree/big")),
        "only /tree/sub was restored: {aside:?}"
    );
    lap(
        &mut times,
        "RestoreJobs: whole in place, /tree/sub into a subPath, checksums in the pod",
    );

    // Enforced policies: another namespace reaches neither the management
    // nor the data port (the metrics port is open to scrapers by design).
    let reached = probe.join().unwrap();
    assert_eq!(
        reached.map(|(p, r)| format!("{p} {r}")),
        ["7070 closed", "7071 closed", "7080 open"].map(String::from),
        "a pod in namespace intruder"
    );

    // --- The kubelet and containerd restarted: the pods keep running, the
    // agent stays connected, and the work below runs on them.
    let before: Vec<_> = ["backer-agent", "backer-server"]
        .iter()
        .flat_map(|a| pods(&node, a))
        .collect();
    let restarts = |n: &Node| {
        n.ok(&[
            "get",
            "pods",
            "-n",
            NS,
            "-o",
            "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
        ])
    };
    let restarts_before = restarts(&node);
    let kubelet = node.restart("kubelet");
    let containerd = node.restart("containerd");
    eventually("the node Ready after the restarts", 60, || {
        node.jsonpath(
            "node",
            NODE,
            "",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True"
    });
    eventually("every Backer pod Ready after the restarts", 90, || {
        let ready = node.ok(&[
            "get",
            "pods",
            "-n",
            NS,
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        !ready.is_empty() && ready.split_whitespace().all(|s| s == "True")
    });
    let after: Vec<_> = ["backer-agent", "backer-server"]
        .iter()
        .flat_map(|a| pods(&node, a))
        .collect();
    assert_eq!(before, after, "the pods survived the restarts");
    assert_eq!(restarts_before, restarts(&node), "no container restarted");
    assert!(connected(&node, NODE));
    figures(
        "node",
        format!("kubelet restarted in {kubelet:?}, containerd in {containerd:?}"),
    );
    lap(&mut times, "kubelet and containerd restarted");

    // --- kubectl backer, through the real kubectl.
    let clients = node.backer(&["clients"]);
    assert!(
        clients.contains(NODE) && clients.contains("Enrolled"),
        "{clients}"
    );
    node.exec(APP, "writer", "printf 'second\\n' > /data/tree/second.txt");
    let out = node.backer(&[
        "-n",
        APP,
        "backup",
        "--pvc",
        "data",
        "--name",
        "by-plugin",
        "--wait",
    ]);
    assert!(out.to_lowercase().contains("succeeded"), "{out}");
    let second = snapshot_of(&node, "by-plugin", APP);
    let listed = node.backer(&["-n", APP, "snapshots"]);
    assert!(listed.contains(&first) && listed.contains(&second), "{listed}");
    let files = node.backer(&["-n", APP, "ls", &second, "/tree"]);
    for f in ["a.txt", "big.bin", "second.txt", "link-rel"] {
        assert!(files.contains(f), "{f} in kubectl backer ls: {files}");
    }
    node.exec(APP, "writer", "rm /data/tree/second.txt");
    let out = node.backer(&[
        "-n",
        APP,
        "restore",
        &second,
        "--to-pvc",
        "data",
        "--path",
        "/tree/second.txt",
        "--name",
        "by-plugin",
        "--wait",
    ]);
    assert!(out.to_lowercase().contains("succeeded"), "{out}");
    assert_eq!(node.exec(APP, "writer", "cat /data/tree/second.txt"), "second\n");
    let status = node.backer(&["status"]);
    for want in ["2/2 ready", "1/1 ready", &leader(&node)] {
        assert!(status.contains(want), "{want} in kubectl backer status: {status}");
    }
    lap(
        &mut times,
        "kubectl backer: clients, backup, snapshots, ls, restore, status",
    );

    // --- The leader's pod deleted while a job runs: the other replica
    // takes over within the lease's 15 s and the job still finishes.
    node.exec(
        APP,
        "writer",
        "head -c 104857600 /dev/urandom > /data/tree/big2.bin",
    );
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: failover, namespace: {APP}}}\nspec: {{pvc: data}}\n"
    ));
    eventually("BackupJob failover running", 60, || {
        node.jsonpath("backupjob", "failover", APP, "{.status.lastRun.phase}") == "Running"
    });
    let old_leader = leader(&node);
    let deleted = Instant::now();
    node.ok(&["delete", "pod", "-n", NS, &old_leader, "--wait=false"]);
    let running_at_delete = node.jsonpath("backupjob", "failover", APP, "{.status.lastRun.phase}");
    let mut new_leader = String::new();
    eventually("another replica leading", 30, || {
        new_leader = leader(&node);
        !new_leader.is_empty() && new_leader != old_leader
    });
    let takeover = deleted.elapsed();
    assert!(
        takeover < Duration::from_secs(15),
        "the takeover took {takeover:?}"
    );
    // Usually the standby; but the old leader gives the lease up, so the
    // Deployment's replacement pod may win it when it starts within the
    // standby's 2 s between looks. Either is a correct takeover.
    let who = if operators.iter().any(|(p, _)| *p == new_leader) {
        "the standby"
    } else {
        "the replacement pod"
    };
    succeeded(&node, "backupjob", "failover", APP, 180);
    figures(
        "node",
        format!(
            "leader {old_leader} deleted (job {running_at_delete}); {new_leader} ({who}) led after {takeover:?}"
        ),
    );
    eventually("the operator back to two ready replicas", 120, || {
        node.jsonpath("deploy", "backer-operator", NS, "{.status.readyReplicas}") == "2"
    });
    lap(&mut times, "leader deleted during a backup");

    // --- The server's pod deleted during a backup: the run fails with the
    // reason, nothing half-written is listed, the next run succeeds.
    node.exec(
        APP,
        "writer",
        "head -c 104857600 /dev/urandom > /data/tree/big3.bin",
    );
    let listed_before = snapshots_of_pvc(&node, APP, "data");
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: server-lost, namespace: {APP}}}\nspec: {{pvc: data}}\n"
    ));
    eventually("BackupJob server-lost running", 60, || {
        node.jsonpath("backupjob", "server-lost", APP, "{.status.lastRun.phase}") == "Running"
    });
    let server_pod = pods(&node, "backer-server")[0].0.clone();
    node.ok(&["delete", "pod", "-n", NS, &server_pod, "--wait=false"]);
    let (phase, message) = settled(&node, "backupjob", "server-lost", APP, 180);
    assert_eq!(phase, "Failed", "{message}");
    // Which side noticed first decides the words ("the server stopped
    // while this job ran", or the agent's "the server refused the
    // snapshot"); either way the server is named.
    assert!(message.contains("server"), "a failed run says why: {message:?}");
    eventually("the new server pod Ready", 120, || {
        node.jsonpath("deploy", "backer-server", NS, "{.status.readyReplicas}") == "1"
    });
    eventually("the agent connected to the new server", 120, || {
        connected(&node, NODE)
    });
    assert_eq!(
        listed_before,
        snapshots_of_pvc(&node, APP, "data"),
        "nothing half-written is listed"
    );
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: server-back, namespace: {APP}}}\nspec: {{pvc: data}}\n"
    ));
    succeeded(&node, "backupjob", "server-back", APP, 180);
    snapshot_of(&node, "server-back", APP);
    assert_eq!(
        snapshots_of_pvc(&node, APP, "data").len(),
        listed_before.len() + 1
    );
    figures("node", format!("server pod deleted during a backup: {message}"));
    lap(&mut times, "server deleted during a backup");

    // --- The server's certificate renewed in its Secret, as the operator
    // does 30 days before its end: picked up without a restart.
    let server = pods(&node, "backer-server")[0].clone();
    let server_ip = node.jsonpath("pod", &server.0, NS, "{.status.podIP}");
    let served_before = served_certificate(&format!("{server_ip}:7080"));
    assert!(served_before.contains("serial="), "{served_before}");
    // A certificate 10 days from its end, from the CA: the operator (which
    // watches the Secret) replaces it with a new year-long one at once.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.pem"), secret_value(&node, "backer-pki", "ca.pem")).unwrap();
    std::fs::write(
        pki.join("ca-key.pem"),
        secret_value(&node, "backer-pki", "ca-key.pem"),
    )
    .unwrap();
    std::fs::write(
        pki.join("ext"),
        "subjectAltName=DNS:backer-server,DNS:backer-server.backer-system.svc\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        "a short-lived server certificate",
        Command::new("sh").current_dir(&pki).args([
            "-c",
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout short-key.pem \
             -subj /CN=backer-server -out short.csr 2>/dev/null && \
             openssl x509 -req -in short.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 10 \
             -extfile ext -out short.pem 2>/dev/null",
        ]),
    );
    let b64 = |f: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(pki.join(f)).unwrap())
    };
    node.ok(&[
        "patch",
        "secret",
        "backer-pki",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        &format!(
            "{{\"data\":{{\"server.pem\":\"{}\",\"server-key.pem\":\"{}\"}}}}",
            b64("short.pem"),
            b64("short-key.pem")
        ),
    ]);
    let short = pem_serial_and_end(&std::fs::read_to_string(pki.join("short.pem")).unwrap(), &pki);
    let mut renewed = String::new();
    eventually("the operator to renew the short-lived certificate", 30, || {
        renewed = pem_serial_and_end(&secret_value(&node, "backer-pki", "server.pem"), &pki);
        renewed != short
    });
    assert_ne!(renewed, served_before);
    // The kubelet refreshes a mounted Secret when it next syncs the pod
    // (every minute or so); an annotation makes that sync happen now.
    node.ok(&[
        "annotate",
        "pod",
        "-n",
        NS,
        &server.0,
        "--overwrite",
        &format!("backer.dev/e2e-sync={}", std::process::id()),
    ]);
    let picked_up = eventually("the server serving the renewed certificate", 120, || {
        served_certificate(&format!("{server_ip}:7080")) == renewed
    });
    assert_eq!(
        served_certificate(&format!("{server_ip}:7071")),
        renewed,
        "the data port too"
    );
    assert_eq!(
        pods(&node, "backer-server"),
        vec![server.clone()],
        "the same server pod"
    );
    assert_eq!(
        node.jsonpath(
            "pod",
            &server.0,
            NS,
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0",
        "the server did not restart"
    );
    figures(
        "node",
        format!("renewed certificate served {picked_up:?} after the pod sync: {renewed}"),
    );
    lap(&mut times, "server certificate renewed without a restart");

    // --- helm upgrade to a new image tag while the schedule runs.
    let ctr = |args: &[&str]| {
        run_ok(
            "ctr",
            Command::new("ctr")
                .args(["--address", &node.get("CONTAINERD_ADDRESS"), "-n", "k8s.io"])
                .args(args),
        )
    };
    for c in ["operator", "server", "agent"] {
        ctr(&[
            "images",
            "tag",
            &format!("docker.io/library/backer-{c}:0.1.0"),
            &format!("docker.io/library/backer-{c}:{UPGRADE_TAG}"),
        ]);
    }
    // The schedule runs at the next minute: on a fast run of the steps
    // above it may not have yet.
    eventually("the schedule's first run, before the upgrade", 75, || {
        !node
            .jsonpath("backupjob", "every-minute", NS, "{.status.lastRun.started}")
            .is_empty()
    });
    let o = node.helm(&[
        "upgrade",
        "backer",
        chart.to_str().unwrap(),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        &format!("image.tag={UPGRADE_TAG}"),
        "--wait",
        "--timeout",
        "4m",
    ]);
    assert!(o.status.success(), "helm upgrade: {}", text(&o));
    let upgraded = chrono::Utc::now();
    // `--wait` waits for the new pods; the old ones may still be ending.
    let mut images = String::new();
    eventually("every Backer pod on the new tag", 60, || {
        images = node.ok(&[
            "get",
            "pods",
            "-n",
            NS,
            "-o",
            "jsonpath={.items[*].spec.containers[*].image}",
        ]);
        images
            .split_whitespace()
            .all(|i| i.ends_with(&format!(":{UPGRADE_TAG}")))
    });
    eventually("a scheduled run after the upgrade, succeeded", 150, || {
        let started = node.jsonpath("backupjob", "every-minute", NS, "{.status.lastRun.started}");
        let phase = node.jsonpath("backupjob", "every-minute", NS, "{.status.lastRun.phase}");
        chrono::DateTime::parse_from_rfc3339(&started).is_ok_and(|t| t > upgraded) && phase == "Succeeded"
    });
    eventually("the agent connected after the upgrade", 60, || {
        connected(&node, NODE)
    });
    lap(&mut times, "helm upgrade to a new tag during the schedule");

    // --- An external host: the data port exposed by a NodePort, the
    // server's ExternalName the node's address. And agent.hostPaths that
    // leave the kubelet's root and local-path's directory out: PVC backups
    // and restores still work.
    let o = node.helm(&[
        "upgrade",
        "backer",
        chart.to_str().unwrap(),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        "server.service.type=NodePort",
        "--set",
        &format!("server.service.nodePort={NODE_PORT}"),
        "--set",
        &format!("server.externalName={NODE_IP}"),
        "--set",
        &format!("agent.hostPaths={{{}}}", sched_src.display()),
        "--wait",
        "--timeout",
        "4m",
    ]);
    assert!(
        o.status.success(),
        "helm upgrade (NodePort, narrow hostPaths): {}",
        text(&o)
    );
    let bundle = dir.join("ext-host.json");
    node.backer(&["enroll", "ext-host", "--out", bundle.to_str().unwrap()]);
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    assert_eq!(
        b["server"],
        format!("{NODE_IP}:{NODE_PORT}"),
        "the bundle names the exposed address"
    );
    let ext_state = dir.join("ext-state");
    let mut enrol_out = String::new();
    // The renewed certificate, now naming 198.18.0.1, reaches the server
    // through the mounted Secret: until then the TLS check refuses it.
    eventually("the external host enrolled through the NodePort", 150, || {
        let o = Command::new(bin("backer-agent"))
            .arg("--state-dir")
            .arg(&ext_state)
            .args(["enroll", "--bundle"])
            .arg(&bundle)
            .output()
            .unwrap();
        enrol_out = text(&o);
        o.status.success()
    });
    let ext_src = dir.join("ext-src");
    let ext_restore = dir.join("ext-restore");
    std::fs::create_dir_all(ext_src.join("etc/app")).unwrap();
    std::fs::create_dir_all(&ext_restore).unwrap();
    std::fs::write(ext_src.join("etc/app/config.toml"), b"answer = 42\n").unwrap();
    std::fs::write(
        ext_src.join("data.bin"),
        backer_testkit::pseudo_random(5 << 20, 9),
    )
    .unwrap();
    std::os::unix::fs::symlink("etc/app/config.toml", ext_src.join("config")).unwrap();
    let ext_log = std::fs::File::create(dir.join("ext-agent.log")).unwrap();
    let _ext_agent = Running(
        Command::new(bin("backer-agent"))
            .arg("--state-dir")
            .arg(&ext_state)
            .arg("run")
            .arg("--restore-root")
            .arg(&ext_restore)
            .stderr(Stdio::from(ext_log))
            .spawn()
            .unwrap(),
    );
    eventually("the external host connected", 60, || connected(&node, "ext-host"));
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: ext, namespace: {NS}}}\n\
         spec: {{clients: [ext-host], paths: [\"{}\"]}}\n",
        ext_src.display()
    ));
    succeeded(&node, "backupjob", "ext", NS, 120);
    let ext_snap = snapshot_of(&node, "ext", NS);
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: ext, namespace: {NS}}}\n\
         spec: {{snapshot: {ext_snap}, target: {{client: ext-host, path: \"{}\"}}}}\n",
        ext_restore.display()
    ));
    succeeded(&node, "restorejob", "ext", NS, 120);
    let back = ext_restore.join(ext_src.strip_prefix("/").unwrap());
    let diffs = compare_trees(&ext_src, &back);
    assert!(
        diffs.is_empty(),
        "the external host's files came back different: {diffs:?}"
    );
    // Narrow hostPaths: PVCs are still read (and written) through the
    // mounts the chart adds; a node path outside them fails saying why.
    eventually("the agent connected after the upgrade", 90, || {
        connected(&node, NODE)
    });
    node.exec(APP, "writer", "rm /data/tree/a.txt");
    let out = node.backer(&["-n", APP, "backup", "--pvc", "data", "--name", "narrow", "--wait"]);
    assert!(out.to_lowercase().contains("succeeded"), "{out}");
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: narrow, namespace: {APP}}}\n\
         spec: {{snapshot: {first}, paths: [/tree/a.txt], target: {{pvc: data}}}}\n"
    ));
    succeeded(&node, "restorejob", "narrow", APP, 120);
    assert_eq!(node.exec(APP, "writer", "cat /data/tree/a.txt"), "hello backer\n");
    node.apply(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: outside, namespace: {NS}}}\n\
         spec: {{clients: [{NODE}], paths: [/etc]}}\n"
    ));
    let (phase, message) = settled(&node, "backupjob", "outside", NS, 120);
    assert_eq!(phase, "Failed", "{message}");
    assert!(
        message.contains("agent.hostPaths"),
        "the reason names the value: {message}"
    );
    lap(&mut times, "external host through a NodePort; narrow hostPaths");

    // --- A control-plane node gets no agent and no identity by default.
    node.ok(&["label", "node", NODE, "node-role.kubernetes.io/control-plane="]);
    eventually("no agent on a control-plane node", 60, || {
        node.jsonpath("ds", "backer-agent", NS, "{.status.desiredNumberScheduled}") == "0"
            && pods(&node, "backer-agent").is_empty()
    });
    eventually("the control-plane node's BackerClient removed", 60, || {
        node.k(&["get", "backerclient", NODE]).status.code() == Some(1)
    });
    lap(&mut times, "control-plane node left out");

    drop(_ext_agent);
    let stopped = node.stop();
    times.push(("cluster stop and leftovers check", stopped));
    let _ = std::fs::remove_dir_all(&dir);
    let total = suite.elapsed();
    figures(
        "node",
        format!(
            "suite {:.0} s: {}",
            total.as_secs_f64(),
            times
                .iter()
                .map(|(w, d)| format!("{w} {:.0} s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
}
