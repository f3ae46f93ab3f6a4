//! The operator against a real kube-apiserver and etcd on 127.0.0.1 (built by
//! `e2e/install-control-plane`, started by `e2e/control-plane`). There is no
//! kubelet, so this harness plays the kubelet's part: it creates the pods
//! the DaemonSet and the Deployment would run, issues their projected
//! ServiceAccount tokens (TokenRequest), starts `backer-operator`,
//! `backer-server` and one `backer-agent` per node as processes, and lays
//! out a kubelet-style pod volume directory for the PVC. Everything the
//! operator and the agents do goes through the API server as their own
//! ServiceAccounts, under the RBAC of the chart (`deploy/backer.yaml` is it rendered).
//!
//! Needs the control-plane binaries: `e2e/install-control-plane` (CI runs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use backer_testkit::{
    ControlPlane, Running, Server, ServerSetup, bin, build_rich_tree, compare_trees, free_port,
};

const NS: &str = "backer-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// What the suite does with the cluster, as its admin.
trait Cluster {
    fn ok(&self, args: &[&str]) -> String;
    fn apply(&self, yaml: &str) -> Output;
    fn apply_ok(&self, yaml: &str);
    fn jsonpath(&self, kind: &str, name: &str, ns: Option<&str>, path: &str) -> String;
    fn pod(&self, ns: &str, name: &str, sa: &str, node: &str, volume_claim: Option<&str>) -> String;
    fn token_kubeconfig(&self, sa: &str, pod: &str, out: &Path) -> PathBuf;
}

impl Cluster for ControlPlane {
    fn ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            o.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn apply(&self, yaml: &str) -> Output {
        self.kubectl_with_input(&["apply", "-f", "-"], yaml)
    }

    fn apply_ok(&self, yaml: &str) {
        let o = self.apply(yaml);
        assert!(
            o.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn jsonpath(&self, kind: &str, name: &str, ns: Option<&str>, path: &str) -> String {
        let mut args = vec!["get", kind, name, "-o"];
        let jp = format!("jsonpath={path}");
        args.push(&jp);
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let o = self.kubectl(&args);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A pod as the DaemonSet or Deployment would make it, marked running.
    fn pod(&self, ns: &str, name: &str, sa: &str, node: &str, volume_claim: Option<&str>) -> String {
        let volumes = volume_claim
            .map(|c| format!("  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {c}}}}}]\n"))
            .unwrap_or_default();
        self.apply_ok(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: main, image: backer:e2e}}]\n{volumes}"
        ));
        self.ok(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"phase":"Running"}}"#,
        ]);
        self.jsonpath("pod", name, Some(ns), "{.metadata.uid}")
    }

    /// A kubeconfig for `sa`, with a token bound to pod `pod` as the kubelet
    /// would project it.
    fn token_kubeconfig(&self, sa: &str, pod: &str, out: &Path) -> PathBuf {
        let token = self.ok(&[
            "create",
            "token",
            sa,
            "-n",
            NS,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
            "--duration",
            "2h",
        ]);
        let path = out.join(format!("{pod}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: e2e, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: {sa}, user: {{token: \"{}\"}}}}]\n\
                 contexts: [{{name: e2e, context: {{cluster: e2e, user: {sa}, namespace: {NS}}}}}]\ncurrent-context: e2e\n",
                self.url,
                self.dir.join("pki/ca.crt").display(),
                token.trim()
            ),
        )
        .unwrap();
        path
    }
}

fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

struct Operator {
    kubeconfig: PathBuf,
    mgmt: String,
    kubelet: PathBuf,
    http: String,
    log: PathBuf,
}

impl Operator {
    fn start(&self) -> Running {
        Running(
            Command::new(bin("backer-operator"))
                .args([
                    "run",
                    "--namespace",
                    NS,
                    "--server",
                    &self.mgmt,
                    "--server-name",
                    "localhost",
                ])
                .arg("--kubelet-root")
                .arg(&self.kubelet)
                .args(["--http", &self.http, "--identity", "backer-operator-0"])
                .env("KUBECONFIG", &self.kubeconfig)
                .env("BACKER_LOG", "info,kube=warn")
                .stderr(Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.log)
                        .unwrap(),
                ))
                .spawn()
                .unwrap(),
        )
    }
}

fn agent(state: &Path, kubeconfig: &Path, node: &str, data: &str, extra: &[&str], log: &Path) -> Child {
    Command::new(bin("backer-agent"))
        .arg("--state-dir")
        .arg(state)
        .args([
            "run",
            "--kubernetes-node",
            node,
            "--server",
            data,
            "--namespace",
            NS,
        ])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("BACKER_LOG", "info,kube=warn")
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let who = format!("system:serviceaccount:{NS}:{sa}");
    let mut a = vec!["auth", "can-i"];
    a.extend_from_slice(args);
    a.extend(["--as", &who]);
    let o = cp.kubectl(&a);
    String::from_utf8_lossy(&o.stdout).trim() == "yes"
}

/// Writes Secret backer-pki's files into `dir`, as its volume mount would.
fn copy_pki(cp: &ControlPlane, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, file) in [
        ("ca\\.pem", "ca.pem"),
        ("ca-key\\.pem", "ca-key.pem"),
        ("server\\.pem", "server.pem"),
        ("server-key\\.pem", "server-key.pem"),
    ] {
        let b64 = cp.jsonpath("secret", "backer-pki", Some(NS), &format!("{{.data.{key}}}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

/// A SubjectAccessReview for `verb` on signer `signer`.
fn signer_access(cp: &ControlPlane, sa: &str, signer: &str, verb: &str) -> bool {
    let review = format!(
        "apiVersion: authorization.k8s.io/v1\nkind: SubjectAccessReview\nspec:\n  user: system:serviceaccount:{NS}:{sa}\n  \
         groups: [system:serviceaccounts, \"system:serviceaccounts:{NS}\", system:authenticated]\n  \
         resourceAttributes: {{group: certificates.k8s.io, resource: signers, name: \"{signer}\", verb: {verb}}}\n"
    );
    let o = cp.kubectl_with_input(
        &["create", "-o", "jsonpath={.status.allowed}", "-f", "-"],
        &review,
    );
    assert!(
        o.status.success(),
        "SubjectAccessReview: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim() == "true"
}

/// Waits for a BackupJob's or RestoreJob's phase to leave Running/Pending and returns it.
fn settled_phase(cp: &ControlPlane, kind: &str, name: &str, ns: &str, secs: u64) -> String {
    let mut phase = String::new();
    eventually(&format!("{kind} {ns}/{name} to finish"), secs, || {
        phase = cp.jsonpath(kind, name, Some(ns), "{.status.phase}");
        let run = if kind == "backupjob" { "lastRun" } else { "run" };
        let finished = cp.jsonpath(kind, name, Some(ns), &format!("{{.status.{run}.finished}}"));
        !finished.is_empty() || phase == "Invalid"
    });
    cp.jsonpath(
        kind,
        name,
        Some(ns),
        &format!(
            "{{.status.{}.phase}}",
            if kind == "backupjob" { "lastRun" } else { "run" }
        ),
    )
}

#[test]
fn operator_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cp = ControlPlane::start(&t.join("cp"));
    let logs = t.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let dump = Dump(logs.clone());

    // --- CRDs and RBAC, as the chart installs them.
    cp.ok(&[
        "apply",
        "-f",
        root().join("crds/backer.dev.yaml").to_str().unwrap(),
    ]);
    // The chart, rendered: namespace, CRDs, RBAC and the (here inert) workloads.
    cp.ok(&["apply", "-f", root().join("deploy/backer.yaml").to_str().unwrap()]);
    cp.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/backupjobs.backer.dev",
        "crd/restorejobs.backer.dev",
        "crd/backerclients.backer.dev",
        "crd/snapshots.backer.dev",
    ]);

    // --- Exactly the access each ServiceAccount needs.
    let may = [
        (
            "backer-operator",
            vec!["update", "certificatesigningrequests", "--subresource=approval"],
        ),
        (
            "backer-operator",
            vec![
                "patch",
                "backupjobs.backer.dev",
                "--subresource=status",
                "-n",
                "apps",
            ],
        ),
        (
            "backer-operator",
            vec!["create", "snapshots.backer.dev", "-n", "apps"],
        ),
        ("backer-operator", vec!["get", "secrets/backer-pki", "-n", NS]),
        ("backer-operator", vec!["watch", "secrets/backer-pki", "-n", NS]),
        (
            "backer-operator",
            vec!["update", "leases/backer-operator", "-n", NS],
        ),
        ("backer-agent", vec!["create", "certificatesigningrequests"]),
        ("backer-agent", vec!["get", "configmaps/backer-ca", "-n", NS]),
    ];
    for (sa, args) in &may {
        assert!(can_i(&cp, sa, args), "{sa} should be allowed: {args:?}");
    }
    let may_not = [
        ("backer-operator", vec!["get", "secrets", "-n", "default"]),
        ("backer-operator", vec!["get", "secrets/other", "-n", NS]),
        ("backer-operator", vec!["watch", "secrets/backer-enrol", "-n", NS]),
        ("backer-operator", vec!["list", "secrets", "-n", NS]),
        ("backer-operator", vec!["watch", "pods", "-n", "apps"]),
        ("backer-operator", vec!["create", "pods", "-n", NS]),
        ("backer-operator", vec!["delete", "nodes"]),
        (
            "backer-operator",
            vec!["update", "backupjobs.backer.dev", "-n", "apps"],
        ),
        (
            "backer-operator",
            vec!["update", "leases/kube-scheduler", "-n", NS],
        ),
        ("backer-agent", vec!["get", "secrets/backer-pki", "-n", NS]),
        (
            "backer-agent",
            vec!["update", "certificatesigningrequests", "--subresource=approval"],
        ),
        ("backer-agent", vec!["get", "configmaps/other", "-n", NS]),
        ("backer-agent", vec!["list", "backerclients.backer.dev"]),
        ("backer-agent", vec!["list", "pods", "-n", NS]),
        ("backer-server", vec!["get", "secrets/backer-pki", "-n", NS]),
        ("backer-server", vec!["list", "backupjobs.backer.dev", "-A"]),
    ];
    for (sa, args) in &may_not {
        assert!(!can_i(&cp, sa, args), "{sa} must not be allowed: {args:?}");
    }
    // Signers are not an API resource kubectl can discover: ask directly.
    for (sa, signer, verb, allowed) in [
        ("backer-operator", "backer.dev/agent", "approve", true),
        ("backer-operator", "backer.dev/agent", "sign", true),
        (
            "backer-operator",
            "kubernetes.io/kube-apiserver-client",
            "sign",
            false,
        ),
        (
            "backer-operator",
            "kubernetes.io/kube-apiserver-client",
            "approve",
            false,
        ),
        ("backer-agent", "backer.dev/agent", "approve", false),
        ("backer-agent", "backer.dev/agent", "sign", false),
    ] {
        assert_eq!(
            signer_access(&cp, sa, signer, verb),
            allowed,
            "{sa} {verb} {signer}"
        );
    }

    // --- Invalid objects are refused by the API server, with the reason.
    cp.ok(&["create", "namespace", "apps"]);

    // --- A namespace's user, given the chart's backer-user role there, may
    // back up, list and restore in it, and nothing more.
    cp.ok(&[
        "create",
        "rolebinding",
        "alice-backer",
        "-n",
        "apps",
        "--clusterrole=backer-user",
        "--user=alice",
    ]);
    let alice = |args: &[&str]| {
        let mut a = vec!["auth", "can-i"];
        a.extend_from_slice(args);
        a.extend(["--as", "alice"]);
        String::from_utf8_lossy(&cp.kubectl(&a).stdout).trim() == "yes"
    };
    for args in [
        vec!["create", "backupjobs.backer.dev", "-n", "apps"],
        vec!["create", "restorejobs.backer.dev", "-n", "apps"],
        vec!["create", "snapshotlistings.backer.dev", "-n", "apps"],
        vec!["list", "snapshots.backer.dev", "-n", "apps"],
    ] {
        assert!(alice(&args), "alice should be allowed: {args:?}");
    }
    for args in [
        vec!["create", "snapshots.backer.dev", "-n", "apps"],
        vec![
            "patch",
            "snapshotlistings.backer.dev",
            "--subresource=status",
            "-n",
            "apps",
        ],
        vec!["create", "snapshotlistings.backer.dev", "-n", NS],
        vec!["list", "backerclients.backer.dev"],
        vec!["get", "secrets", "-n", "apps"],
    ] {
        assert!(!alice(&args), "alice must not be allowed: {args:?}");
    }
    let refused = [
        (
            "spec: {pvc: data, clients: [node-a], paths: [/x]}",
            "set exactly one source",
        ),
        (
            "spec: {clients: [node-a], paths: [etc]}",
            "paths must be absolute",
        ),
        (
            "spec: {clients: [node-a], paths: [/srv/../etc]}",
            "must not contain `..`",
        ),
        (
            "spec: {pvc: data, schedule: \"every night\"}",
            "schedule must be a cron expression",
        ),
        (
            "spec: {pvc: data, timeZone: Europe/Berlin}",
            "timeZone needs a schedule",
        ),
        ("spec: {clients: [node-a]}", "name at least one path"),
        (
            "spec: {pvc: data, retention: {keepLast: 0}}",
            "must keep something",
        ),
    ];
    for (spec, message) in refused {
        let o = cp.apply(&format!(
            "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: bad, namespace: apps}}\n{spec}\n"
        ));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(message),
            "{spec}: expected {message:?}, got {stderr}"
        );
    }
    let o = cp.apply(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {name: bad, namespace: apps}\n\
         spec: {snapshot: s, target: {pvc: data, subPath: /abs}}\n",
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("subPath must be relative"),
        "{o:?}"
    );

    // --- Nodes, and the pods the chart's Deployment and DaemonSet would run.
    for n in ["node-a", "node-b", "node-c"] {
        cp.apply_ok(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {n}, labels: {{backer.dev/e2e: \"yes\"}}}}\n"
        ));
    }
    cp.pod(NS, "backer-operator-0", "backer-operator", "node-a", None);
    let op_kc = cp.token_kubeconfig("backer-operator", "backer-operator-0", t);
    let kubelet = t.join("kubelet");
    let mgmt_port = free_port();
    let operator = Operator {
        kubeconfig: op_kc,
        mgmt: format!("localhost:{mgmt_port}"),
        kubelet: kubelet.clone(),
        http: format!("127.0.0.1:{}", free_port()),
        log: logs.join("operator.log"),
    };
    let mut op = operator.start();

    // The operator mints the CA and the server's certificate into backer-pki;
    // the server mounts that Secret (here: the harness copies it out).
    eventually("Secret backer-pki", 60, || {
        !cp.jsonpath("secret", "backer-pki", Some(NS), "{.data}")
            .is_empty()
    });
    let pki = t.join("pki");
    copy_pki(&cp, &pki);
    let setup = ServerSetup {
        mgmt_port,
        args: vec!["--pki-dir".into(), pki.display().to_string()],
        log: Some(logs.join("server.log")),
        ..Default::default()
    };
    let server = Server::start_with(&t.join("server"), setup.clone());

    // --- Nodes become enrolled BackerClients, each agent proving its node.
    let restore_root = t.join("restore");
    std::fs::create_dir_all(&restore_root).unwrap();
    std::fs::create_dir_all(kubelet.join("pods")).unwrap();
    let roots = format!("{},{}", restore_root.display(), kubelet.join("pods").display());
    let mut agents = Vec::new();
    for n in ["node-a", "node-b"] {
        let pod = format!("backer-agent-{n}");
        cp.pod(NS, &pod, "backer-agent", n, None);
        let kc = cp.token_kubeconfig("backer-agent", &pod, t);
        agents.push(Running(agent(
            &t.join(format!("agent-{n}")),
            &kc,
            n,
            &server.data,
            &["--restore-root", &roots],
            &logs.join(format!("agent-{n}.log")),
        )));
    }
    for n in ["node-a", "node-b"] {
        eventually(&format!("BackerClient {n} enrolled and connected"), 90, || {
            cp.jsonpath("backerclient", n, None, "{.status.phase}") == "Enrolled"
                && cp.jsonpath("backerclient", n, None, "{.status.connected}") == "true"
        });
    }
    let listing = cp.ok(&["get", "backerclients"]);
    assert!(
        listing.contains("node-a") && listing.contains("Enrolled"),
        "{listing}"
    );

    // An agent pod on node-b cannot become node-a: the signer denies it.
    let kc_b = t.join("backer-agent-node-b.kubeconfig");
    let o = Command::new(bin("backer-agent"))
        .arg("--state-dir")
        .arg(t.join("impostor"))
        .args([
            "run",
            "--kubernetes-node",
            "node-a",
            "--server",
            &server.data,
            "--namespace",
            NS,
        ])
        .env("KUBECONFIG", &kc_b)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("denied") && stderr.contains("asks to be node-a"),
        "{stderr}"
    );

    // --- A one-off BackupJob of node paths makes a Snapshot.
    let src = t.join("src");
    build_rich_tree(&src);
    std::fs::write(src.join("skip.tmp"), b"left out").unwrap();
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: node-files, namespace: {NS}}}\n\
         spec: {{clients: [node-a], paths: [\"{}\"], exclude: [\"*.tmp\"], tags: [e2e]}}\n",
        src.display()
    ));
    assert_eq!(
        settled_phase(&cp, "backupjob", "node-files", NS, 120),
        "Succeeded"
    );
    let snap_id = cp.jsonpath(
        "backupjob",
        "node-files",
        Some(NS),
        "{.status.lastRun.jobs[0].snapshot}",
    );
    assert_eq!(snap_id.len(), 64, "snapshot id in the status: {snap_id:?}");
    let mut snap_name = String::new();
    eventually("the node snapshot mirrored", 60, || {
        snap_name = cp.ok(&[
            "get",
            "snapshots",
            "-n",
            NS,
            "-l",
            &format!("backer.dev/snapshot-id={}", &snap_id[..32]),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        !snap_name.is_empty()
    });

    // --- A BackupJob of a PVC, read where its pod mounts it.
    cp.apply_ok(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: pv-data}\nspec:\n  capacity: {storage: 1Gi}\n  accessModes: [ReadWriteOnce]\n  csi: {driver: e2e.csi.example.com, volumeHandle: vol-1}\n  claimRef: {namespace: apps, name: data}\n",
    );
    cp.apply_ok(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data, namespace: apps}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n  volumeName: pv-data\n  storageClassName: \"\"\n",
    );
    let app_uid = cp.pod("apps", "app", "default-sa", "node-b", Some("data"));
    let vol = kubelet.join(format!("pods/{app_uid}/volumes/kubernetes.io~csi/pv-data/mount"));
    std::fs::create_dir_all(vol.join("db")).unwrap();
    let table = backer_testkit::pseudo_random(3 << 20, 7);
    std::fs::write(vol.join("db/table.bin"), &table).unwrap();
    std::fs::write(vol.join("README"), b"app data\n").unwrap();
    cp.apply_ok(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: data-once, namespace: apps}\nspec: {pvc: data}\n",
    );
    assert_eq!(
        settled_phase(&cp, "backupjob", "data-once", "apps", 120),
        "Succeeded"
    );
    let mut pvc_snap = String::new();
    eventually("the PVC snapshot in namespace apps", 60, || {
        pvc_snap = cp.ok(&[
            "get",
            "snapshots",
            "-n",
            "apps",
            "-o",
            "jsonpath={.items[?(@.spec.pvc==\"data\")].metadata.name}",
        ]);
        !pvc_snap.is_empty()
    });
    assert_eq!(
        cp.jsonpath("snapshot", &pvc_snap, Some("apps"), "{.spec.paths[0]}"),
        "/"
    );

    // Naming clients is refused outside the operator's namespace.
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: sneaky, namespace: apps}}\nspec: {{clients: [node-a], paths: [\"{}\"]}}\n",
        src.display()
    ));
    eventually("BackupJob apps/sneaky marked Invalid", 30, || {
        cp.jsonpath("backupjob", "sneaky", Some("apps"), "{.status.phase}") == "Invalid"
    });
    assert!(
        cp.jsonpath(
            "backupjob",
            "sneaky",
            Some("apps"),
            "{.status.conditions[0].message}"
        )
        .contains("only in the operator's namespace")
    );

    // --- Scheduled BackupJobs, of a PVC and of node paths, fire on their own.
    cp.apply_ok(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: data-nightly, namespace: apps}\n\
         spec: {pvc: data, schedule: \"* * * * *\", timeZone: Europe/Berlin, retention: {keepLast: 1}}\n",
    );
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: node-nightly, namespace: {NS}}}\n\
         spec: {{clientSelector: {{matchLabels: {{backer.dev/e2e-node: a}}}}, paths: [\"{}\"], schedule: \"* * * * *\"}}\n",
        src.display()
    ));
    cp.ok(&["label", "backerclient", "node-a", "backer.dev/e2e-node=a"]);
    for (ns, name) in [("apps", "data-nightly"), (NS, "node-nightly")] {
        eventually(&format!("the scheduled run of {name}"), 100, || {
            cp.jsonpath("backupjob", name, Some(ns), "{.status.lastRun.phase}") == "Succeeded"
        });
    }
    assert!(
        !cp.jsonpath("backupjob", "data-nightly", Some("apps"), "{.status.nextRun}")
            .is_empty()
    );
    for (ns, name) in [("apps", "data-nightly"), (NS, "node-nightly")] {
        cp.ok(&[
            "patch",
            "backupjob",
            name,
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"suspend":true}}"#,
        ]);
    }

    // --- Restore chosen files into another directory of node-a, byte-identical.
    let out_dir = restore_root.join("node-files");
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: node-files-back, namespace: {NS}}}\n\
         spec: {{snapshot: {snap_name}, target: {{client: node-a, path: \"{}\"}}}}\n",
        out_dir.display()
    ));
    assert_eq!(
        settled_phase(&cp, "restorejob", "node-files-back", NS, 120),
        "Succeeded"
    );
    let restored = out_dir.join(src.strip_prefix("/").unwrap());
    std::fs::remove_file(src.join("skip.tmp")).unwrap();
    let diffs = compare_trees(&src, &restored);
    assert!(diffs.is_empty(), "restored tree differs: {diffs:?}");

    // --- Restore one file into the PVC, in place, after it was lost.
    std::fs::remove_file(vol.join("db/table.bin")).unwrap();
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: table-back, namespace: apps}}\n\
         spec: {{snapshot: {pvc_snap}, paths: [/db/table.bin], target: {{pvc: data}}}}\n"
    ));
    assert_eq!(
        settled_phase(&cp, "restorejob", "table-back", "apps", 120),
        "Succeeded"
    );
    assert_eq!(
        std::fs::read(vol.join("db/table.bin")).unwrap(),
        table,
        "the restored file is byte-identical"
    );
    // And the whole volume into a sub-directory of it.
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: all-aside, namespace: apps}}\n\
         spec: {{snapshot: {pvc_snap}, target: {{pvc: data, subPath: restored}}}}\n"
    ));
    assert_eq!(
        settled_phase(&cp, "restorejob", "all-aside", "apps", 120),
        "Succeeded"
    );
    assert_eq!(std::fs::read(vol.join("restored/db/table.bin")).unwrap(), table);
    assert_eq!(std::fs::read(vol.join("restored/README")).unwrap(), b"app data\n");
    // A namespace cannot restore onto a node directory.
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {{name: escape, namespace: apps}}\n\
         spec: {{snapshot: {pvc_snap}, target: {{client: node-a, path: /etc}}}}\n"
    ));
    eventually("RestoreJob apps/escape marked Invalid", 30, || {
        cp.jsonpath("restorejob", "escape", Some("apps"), "{.status.phase}") == "Invalid"
    });

    // A Snapshot object made by hand cannot point a namespace at another's data.
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: Snapshot\nmetadata: {{name: forged, namespace: apps}}\n\
         spec: {{id: \"{snap_id}\", client: node-a, time: \"2026-01-01T00:00:00Z\"}}\n"
    ));
    cp.apply_ok(
        "apiVersion: backer.dev/v1alpha1\nkind: RestoreJob\nmetadata: {name: forged-back, namespace: apps}\n\
         spec: {snapshot: forged, target: {pvc: data, subPath: stolen}}\n",
    );
    eventually("RestoreJob apps/forged-back refused", 30, || {
        cp.jsonpath("restorejob", "forged-back", Some("apps"), "{.status.phase}") == "Invalid"
    });
    assert!(
        cp.jsonpath(
            "restorejob",
            "forged-back",
            Some("apps"),
            "{.status.conditions[0].message}"
        )
        .contains("not of this namespace")
    );
    assert!(!vol.join("stolen").exists());

    // --- The kubectl plugin, through the real kubectl: the same binary as
    // `backer`, installed under the plugin's name.
    let plugin_dir = t.join("plugin-bin");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(bin("backer"), plugin_dir.join("kubectl-backer")).unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plugin = |args: &[&str]| {
        Command::new("kubectl")
            .arg("backer")
            .args(args)
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let help = plugin(&["--help"]);
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
    assert!(String::from_utf8_lossy(&help.stdout).contains("kubectl backer"));
    let out = backer_testkit::ok(plugin(&["clients"]));
    assert!(out.contains("node-a") && out.contains("Enrolled"), "{out}");
    std::fs::write(vol.join("plugin.txt"), b"via kubectl backer\n").unwrap();
    let out = backer_testkit::ok(plugin(&[
        "-n",
        "apps",
        "backup",
        "--pvc",
        "data",
        "--name",
        "via-plugin",
        "--wait",
    ]));
    assert!(out.contains("backup succeeded"), "{out}");
    let plugin_snap = cp.jsonpath(
        "backupjob",
        "via-plugin",
        Some("apps"),
        "{.status.lastRun.jobs[0].snapshot}",
    );
    let mut listed = String::new();
    eventually("the plugin's snapshot listed", 60, || {
        listed = backer_testkit::ok(plugin(&["-n", "apps", "snapshots", "-o", "json"]));
        listed.contains(&plugin_snap)
    });
    let snaps: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let plugin_snap_name = snaps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spec"]["id"] == plugin_snap.as_str())
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_string())
        .unwrap();
    let out = backer_testkit::ok(plugin(&[
        "-n",
        "apps",
        "restore",
        &plugin_snap_name,
        "--to-pvc",
        "data",
        "--sub-path",
        "from-plugin",
        "--path",
        "/plugin.txt",
        "--wait",
    ]));
    assert!(out.contains("restore succeeded"), "{out}");
    assert_eq!(
        std::fs::read(vol.join("from-plugin/plugin.txt")).unwrap(),
        b"via kubectl backer\n"
    );
    // ls: answered by the operator through a SnapshotListing, which the
    // plugin deletes once read.
    let out = backer_testkit::ok(plugin(&["-n", "apps", "ls", &plugin_snap_name]));
    assert!(out.contains("/plugin.txt") && out.contains("MODE"), "{out}");
    let out = backer_testkit::ok(plugin(&[
        "-n",
        "apps",
        "ls",
        &plugin_snap_name,
        "/plugin.txt",
        "-o",
        "json",
    ]));
    let entries: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entries[0]["path"], "/plugin.txt", "{entries}");
    assert_eq!(entries[0]["size"], 19, "{entries}");
    let bad = plugin(&["-n", "apps", "ls", &plugin_snap_name, "/nothing-here"]);
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("is not in Snapshot"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = plugin(&["-n", "apps", "ls", "forged"]);
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not of this namespace"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let left = backer_testkit::ok(cp.kubectl(&["get", "snapshotlistings", "-n", "apps", "-o", "name"]));
    assert!(left.trim().is_empty(), "the plugin deletes its requests: {left}");
    // Refusals come back in the API server's words.
    let bad = plugin(&["-n", "apps", "backup", "--pvc", "data", "--path", "relative"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("paths must be absolute"));
    let out = backer_testkit::ok(plugin(&["status"]));
    assert!(
        out.contains("backer-operator-0") && out.contains("enrolled"),
        "{out}"
    );
    // The chart's workloads are there; with no kubelet, none is ready.
    assert!(out.contains("server pods") && out.contains("0/1 ready"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&backer_testkit::ok(plugin(&["status", "-o", "json"]))).unwrap();
    assert!(status["enrolled"].as_u64().unwrap() >= 2, "{status}");
    // An external host: registered, bundle written, enrolled with it, connected.
    let bundle = t.join("ext-host.json");
    backer_testkit::ok(plugin(&["enroll", "ext-host", "--out", bundle.to_str().unwrap()]));
    backer_testkit::ok(
        backer_testkit::agent(
            &t.join("ext-host"),
            &["enroll", "--bundle", bundle.to_str().unwrap()],
        )
        .output()
        .unwrap(),
    );
    let ext = Running(
        backer_testkit::agent(&t.join("ext-host"), &["run"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("external host ext-host connected", 60, || {
        cp.jsonpath("backerclient", "ext-host", None, "{.status.connected}") == "true"
    });
    drop(ext);
    let completion = backer_testkit::ok(plugin(&["completion", "bash"]));
    assert!(completion.contains("kubectl-backer"));

    // --- A restarted operator picks a running job up again and sees it end.
    cp.pod(NS, "backer-agent-node-c", "backer-agent", "node-c", None);
    let kc_c = cp.token_kubeconfig("backer-agent", "backer-agent-node-c", t);
    let slow = Running(agent(
        &t.join("agent-node-c"),
        &kc_c,
        "node-c",
        &server.data,
        &["--limit-upload", "512", "--host-root", t.to_str().unwrap()],
        &logs.join("agent-node-c.log"),
    ));
    eventually("BackerClient node-c connected", 90, || {
        cp.jsonpath("backerclient", "node-c", None, "{.status.connected}") == "true"
    });
    let big = t.join("big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(big.join("a.bin"), backer_testkit::pseudo_random(6 << 20, 11)).unwrap();
    // node-c's agent sees the host under --host-root, as the DaemonSet's /host.
    let slow_job = |name: &str| {
        format!(
            "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec: {{clients: [node-c], paths: [/big]}}\n"
        )
    };
    cp.apply_ok(&slow_job("slow-1"));
    eventually("slow-1 running", 30, || {
        cp.jsonpath("backupjob", "slow-1", Some(NS), "{.status.phase}") == "Running"
    });
    let metrics = http_get(&operator.http, "/metrics");
    assert!(
        metrics.contains("backer_operator_certificates_signed_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backer_operator_certificates_denied_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("backer_operator_leader 1"), "{metrics}");
    drop(op);
    std::thread::sleep(Duration::from_secs(2));
    op = operator.start();
    assert_eq!(settled_phase(&cp, "backupjob", "slow-1", NS, 120), "Succeeded");

    // --- The lease taken by another replica: the operator stops leading at
    // once and exits non-zero saying why (its main returns; no task ends
    // the process behind its back); once the lease is free a restart leads.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    cp.ok(&[
        "patch",
        "lease",
        "backer-operator",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        &format!(
            r#"{{"spec":{{"holderIdentity":"intruder","renewTime":"{now}","leaseDurationSeconds":15}}}}"#
        ),
    ]);
    let taken = Instant::now();
    let status = loop {
        if let Some(s) = op.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            taken.elapsed() < Duration::from_secs(20),
            "the operator still runs 20 s after its lease was taken"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.code(), Some(1), "{status}");
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(
        log.contains("stopped leading: lost the lease to another replica"),
        "{log}"
    );
    backer_testkit::figures(
        "e2e",
        format!(
            "lease taken by another replica: the operator stopped in {:.1} s, exit 1",
            taken.elapsed().as_secs_f64()
        ),
    );
    cp.ok(&["delete", "lease", "backer-operator", "-n", NS]);
    op = operator.start();
    eventually("the restarted operator to lead", 30, || {
        cp.jsonpath("lease", "backer-operator", Some(NS), "{.spec.holderIdentity}") == "backer-operator-0"
    });

    // --- The API server crashes mid-job and comes back: the operator's
    // watches resume and the job still ends Succeeded. An operator that lost
    // its lease meanwhile stops (as client-go's leader election does) and,
    // restarted as the kubelet would, takes over.
    std::fs::write(big.join("c.bin"), backer_testkit::pseudo_random(6 << 20, 20)).unwrap();
    cp.apply_ok(&slow_job("slow-api"));
    eventually("slow-api running", 30, || {
        cp.jsonpath("backupjob", "slow-api", Some(NS), "{.status.phase}") == "Running"
    });
    let away = cp.restart_apiserver();
    let mut operator_restarted = false;
    eventually("slow-api to finish after the API server's restart", 180, || {
        if !operator_restarted && op.0.try_wait().unwrap().is_some() {
            op = operator.start();
            operator_restarted = true;
        }
        !cp.jsonpath("backupjob", "slow-api", Some(NS), "{.status.lastRun.finished}")
            .is_empty()
    });
    assert_eq!(settled_phase(&cp, "backupjob", "slow-api", NS, 30), "Succeeded");
    backer_testkit::figures(
        "e2e",
        format!(
            "kube-apiserver away {:.1} s mid-job; operator {}; the job succeeded",
            away.as_secs_f64(),
            if operator_restarted {
                "stopped on its lost lease and was restarted"
            } else {
                "rode it out"
            }
        ),
    );

    // --- A server restart mid-job: the job ends failed, with the reason.
    std::fs::write(big.join("b.bin"), backer_testkit::pseudo_random(16 << 20, 12)).unwrap();
    cp.apply_ok(&slow_job("slow-2"));
    eventually("slow-2 running", 30, || {
        cp.jsonpath("backupjob", "slow-2", Some(NS), "{.status.phase}") == "Running"
    });
    let server = Server::restart(server, &setup);
    assert_eq!(settled_phase(&cp, "backupjob", "slow-2", NS, 120), "Failed");
    let why = cp.jsonpath("backupjob", "slow-2", Some(NS), "{.status.lastRun.message}");
    assert!(!why.is_empty(), "the failed run says why");

    // --- A node deleted while its backup runs: its client goes, its
    // certificate is revoked, and the run ends failed with the reason.
    eventually("node-c connected again", 90, || {
        cp.jsonpath("backerclient", "node-c", None, "{.status.connected}") == "true"
    });
    std::fs::write(big.join("d.bin"), backer_testkit::pseudo_random(16 << 20, 24)).unwrap();
    cp.apply_ok(&slow_job("slow-3"));
    eventually("slow-3 running", 30, || {
        cp.jsonpath("backupjob", "slow-3", Some(NS), "{.status.phase}") == "Running"
    });
    cp.ok(&["delete", "node", "node-c"]);
    eventually("BackerClient node-c removed with its node", 60, || {
        !cp.kubectl(&["get", "backerclient", "node-c"]).status.success()
    });
    assert_eq!(settled_phase(&cp, "backupjob", "slow-3", NS, 120), "Failed");
    drop(slow);

    // --- Deleting a BackerClient revokes its certificate at once. (A copy
    // of the agent's identity: the agent drops a refused one.)
    let copy = t.join("agent-node-b-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["agent.json", "cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(t.join("agent-node-b").join(f), copy.join(f)).unwrap();
    }
    let o = backer_testkit::agent(&copy, &["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "before: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    cp.ok(&["delete", "backerclient", "node-b", "--timeout=60s"]);
    let o = backer_testkit::agent(&copy, &["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("revoked"), "{stderr}");

    // --- CA rotation (docs/KUBERNETES.md): a new CA in backer-pki, the
    // server restarted on it, an agent with its old identity dropped asks
    // again and is signed under the new CA; backups work again.
    let old_ca = std::fs::read(pki.join("ca.pem")).unwrap();
    cp.ok(&["delete", "secret", "backer-pki", "-n", NS]);
    drop(op);
    // The Secret alone lost (by mistake): refused, and said why.
    let mut refused = operator.start();
    let status = backer_testkit::wait_exit(&mut refused.0, "the operator minted a new CA silently");
    assert!(!status.success());
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(log.contains("shows a CA existed"), "the refusal says why");
    // Rotation on purpose: the ConfigMap goes too.
    cp.ok(&["delete", "configmap", "backer-ca", "-n", NS]);
    op = operator.start();
    eventually("a new CA in backer-pki", 60, || {
        !cp.jsonpath("secret", "backer-pki", Some(NS), "{.data}")
            .is_empty()
    });
    copy_pki(&cp, &pki);
    assert_ne!(std::fs::read(pki.join("ca.pem")).unwrap(), old_ca, "a new CA");
    let server = Server::restart(server, &setup);
    drop(agents.remove(0));
    std::fs::remove_dir_all(t.join("agent-node-a")).unwrap();
    let kc_a = t.join("backer-agent-node-a.kubeconfig");
    agents.push(Running(agent(
        &t.join("agent-node-a"),
        &kc_a,
        "node-a",
        &server.data,
        &["--restore-root", &roots],
        &logs.join("agent-node-a-rotated.log"),
    )));
    eventually("node-a connected under the new CA", 90, || {
        cp.jsonpath("backerclient", "node-a", None, "{.status.connected}") == "true"
    });
    cp.apply_ok(&format!(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {{name: after-rotation, namespace: {NS}}}\n\
         spec: {{clients: [node-a], paths: [\"{}\"]}}\n",
        src.display()
    ));
    assert_eq!(
        settled_phase(&cp, "backupjob", "after-rotation", NS, 120),
        "Succeeded"
    );

    // --- Health and metrics.
    // Counted since the operator's last restart.
    let metrics = http_get(&operator.http, "/metrics");
    assert!(
        metrics.contains("backer_operator_certificates_signed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backer_operator_runs_started_total 1"),
        "{metrics}"
    );
    assert!(http_get(&operator.http, "/readyz").contains("ready"));

    drop(agents);
    drop(op);
    drop(server);
    dump.disarm();
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Prints the processes' logs when the test fails.
struct Dump(PathBuf);

impl Dump {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("===== {} (last lines)", e.path().display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
