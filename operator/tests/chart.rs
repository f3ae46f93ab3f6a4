//! The helm chart against a real kube-apiserver: `helm lint`, every CI value
//! set rendered and validated by the API server (server-side dry run, so the
//! Kubernetes schemas and our CRDs judge every object), then a real `helm
//! install` and `helm upgrade` that upgrades the CRDs too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backer_testkit::ControlPlane;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn helm() -> PathBuf {
    let o = Command::new(root().join("e2e/install-helm")).output().unwrap();
    assert!(
        o.status.success(),
        "e2e/install-helm: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A stand-in for the Prometheus operator's CRD, so a rendering with the
/// ServiceMonitor enabled can be validated too.
const SERVICE_MONITOR_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

#[test]
fn the_chart_installs_upgrades_and_validates_with_every_value_set() {
    let helm = helm();
    let chart = root().join("charts/backer");
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"));
    let kubectl = |args: &[&str], stdin: Option<&str>| cp.kubectl_with_input(args, stdin.unwrap_or(""));
    let h = |args: &[&str]| {
        Command::new(&helm)
            .args(args)
            .env("KUBECONFIG", &cp.kubeconfig)
            .output()
            .unwrap()
    };
    ok(
        "stub CRD",
        kubectl(&["apply", "-f", "-"], Some(SERVICE_MONITOR_CRD)),
    );
    ok(
        "CRDs established",
        kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "--all",
            ],
            None,
        ),
    );

    // A dry run creates nothing, so the namespaced objects need it to exist.
    ok(
        "namespace",
        kubectl(&["create", "namespace", "backer-system"], None),
    );
    let mut value_sets = vec![None];
    for e in std::fs::read_dir(chart.join("ci")).unwrap() {
        value_sets.push(Some(e.unwrap().path()));
    }
    assert!(value_sets.len() >= 3, "CI value sets in charts/backer/ci");
    for values in &value_sets {
        let mut args = vec!["lint".to_string(), chart.display().to_string(), "--strict".into()];
        if let Some(v) = values {
            args.extend(["-f".into(), v.display().to_string()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&format!("helm lint {values:?}"), h(&a));
        args[0] = "template".into();
        args.remove(2);
        args.insert(1, "backer".into());
        args.extend([
            "--namespace".into(),
            "backer-system".into(),
            "--set".into(),
            "namespace.create=true".into(),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let rendered = ok(&format!("helm template {values:?}"), h(&a));
        // The API server judges every object: built-in schemas and our CRDs.
        let out = ok(
            &format!("server-side validation of {values:?}"),
            kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered)),
        );
        assert!(out.contains("deployment.apps/backer-operator"), "{out}");
        // Operator and server: non-root, read-only root, no capabilities, seccomp.
        for d in ["backer-operator", "backer-server"] {
            let doc = rendered
                .split("\n---\n")
                .find(|d2| d2.contains("kind: Deployment") && d2.contains(&format!("name: {d}\n")))
                .unwrap();
            for needle in [
                "runAsNonRoot: true",
                "readOnlyRootFilesystem: true",
                "drop: [ALL]",
                "RuntimeDefault",
            ] {
                assert!(doc.contains(needle), "{d} lacks {needle}");
            }
        }
    }
    // A bad value is refused by the schema, with the field named.
    let bad = h(&[
        "template",
        "backer",
        chart.to_str().unwrap(),
        "--set",
        "agent.hostPaths[0]=relative",
    ]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("/agent/hostPaths/0"));
    // An exposed server without the name external hosts reach it at, or a
    // NodePort outside the node port range, is refused before anything is
    // installed: the enrolment bundles would name an unreachable server.
    for (set, field) in [
        (
            vec!["server.service.type=NodePort", "server.service.nodePort=30771"],
            "/server/externalName",
        ),
        (vec!["server.service.type=LoadBalancer"], "/server/externalName"),
        (
            vec![
                "server.service.type=NodePort",
                "server.externalName=b.example.com",
                "server.service.nodePort=7071",
            ],
            "/server/service/nodePort",
        ),
    ] {
        let mut args = vec!["template", "backer", chart.to_str().unwrap()];
        for s in &set {
            args.extend(["--set", s]);
        }
        let o = h(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(field), "{set:?}: {err}");
    }
    rendered_values_hold_the_node_fixes(&h, &chart);

    // A real install, then an upgrade that changes a CRD and a workload.
    ok(
        "helm install",
        h(&[
            "install",
            "backer",
            chart.to_str().unwrap(),
            "--namespace",
            "backer-system",
            "--create-namespace",
        ]),
    );
    let installed = ok(
        "ns",
        kubectl(
            &[
                "get",
                "deploy",
                "backer-operator",
                "-n",
                "backer-system",
                "-o",
                "name",
            ],
            None,
        ),
    );
    assert!(installed.contains("backer-operator"));
    let patched = tmp.path().join("chart");
    copy_dir(&chart, &patched);
    let crds = std::fs::read_to_string(patched.join("files/crds.yaml")).unwrap();
    assert!(
        crds.contains("shortNames:\n    - bj\n"),
        "the CRD layout the upgrade edits"
    );
    std::fs::write(
        patched.join("files/crds.yaml"),
        crds.replace(
            "shortNames:\n    - bj\n",
            "shortNames:\n    - bj\n    - backups\n",
        ),
    )
    .unwrap();
    ok(
        "helm upgrade",
        h(&[
            "upgrade",
            "backer",
            patched.to_str().unwrap(),
            "--namespace",
            "backer-system",
            "--set",
            "operator.replicas=3",
        ]),
    );
    let short = ok(
        "crd",
        kubectl(
            &[
                "get",
                "crd",
                "backupjobs.backer.dev",
                "-o",
                "jsonpath={.spec.names.shortNames}",
            ],
            None,
        ),
    );
    assert!(short.contains("backups"), "the upgrade upgraded the CRD: {short}");
    let replicas = ok(
        "replicas",
        kubectl(
            &[
                "get",
                "deploy",
                "backer-operator",
                "-n",
                "backer-system",
                "-o",
                "jsonpath={.spec.replicas}",
            ],
            None,
        ),
    );
    assert_eq!(replicas, "3");
    let policy = ok(
        "keep",
        kubectl(
            &[
                "get",
                "crd",
                "backupjobs.backer.dev",
                "-o",
                "jsonpath={.metadata.annotations}",
            ],
            None,
        ),
    );
    assert!(
        policy.contains("helm.sh/resource-policy"),
        "CRDs are kept on uninstall: {policy}"
    );
    ok(
        "helm uninstall",
        h(&["uninstall", "backer", "--namespace", "backer-system"]),
    );
    ok(
        "CRDs survive",
        kubectl(&["get", "crd", "backupjobs.backer.dev"], None),
    );
}

/// The chart's share of the faults a real node showed (issue #16), read from
/// what it renders; `node.rs` proves each on a real node.
fn rendered_values_hold_the_node_fixes(h: &dyn Fn(&[&str]) -> Output, chart: &Path) {
    let render = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "backer",
            chart.to_str().unwrap(),
            "-n",
            "backer-system",
        ];
        args.extend_from_slice(extra);
        ok(&format!("helm template {extra:?}"), h(&args))
    };
    let doc = |all: &str, kind: &str, name: &str| -> String {
        all.split("\n---\n")
            .find(|d| d.contains(&format!("kind: {kind}\n")) && d.contains(&format!("name: {name}\n")))
            .unwrap_or_else(|| panic!("{kind} {name} is not rendered"))
            .to_string()
    };
    let defaults = render(&[]);
    // The operator signs agents' CSRs on the server's data port.
    let policy = doc(&defaults, "NetworkPolicy", "backer-server");
    assert!(
        policy.contains("backer-operator}}}]\n      ports: [{port: 7070}, {port: 7071}]"),
        "{policy}"
    );
    // No agent, and no BackerClient, on control-plane nodes by default.
    let agent = doc(&defaults, "DaemonSet", "backer-agent");
    assert!(
        agent.contains("{key: node-role.kubernetes.io/control-plane, operator: DoesNotExist}"),
        "{agent}"
    );
    let operator = doc(&defaults, "Deployment", "backer-operator");
    assert!(
        operator.contains("--node-selector=!node-role.kubernetes.io/control-plane"),
        "{operator}"
    );
    assert!(
        operator.contains("--server-data=backer-server:7071"),
        "{operator}"
    );
    // Restores into local-path's hostPath volumes: their directory is
    // mounted writable and is a restore root.
    assert!(
        agent.contains(
            "--restore-root=/var/lib/kubelet/pods,/var/lib/backer-restore,/opt/local-path-provisioner"
        ),
        "{agent}"
    );
    assert!(
        !defaults.contains("backer-server-external"),
        "not exposed by default"
    );
    // hostPaths that leave the kubelet's root out: the pods directory is
    // still mounted where backups read.
    let narrow = render(&["-f", chart.join("ci/monitoring-values.yaml").to_str().unwrap()]);
    let agent = doc(&narrow, "DaemonSet", "backer-agent");
    assert!(
        agent.contains("mountPath: \"/host/var/lib/kubelet/pods\", readOnly: true"),
        "{agent}"
    );
    // Exposed: a NodePort Service of the data port alone, the ExternalName
    // and the node port in server.toml, the control plane asked for, and
    // another kubelet root followed by every path.
    let exposed = render(&["-f", chart.join("ci/exposed-values.yaml").to_str().unwrap()]);
    let service = doc(&exposed, "Service", "backer-server-external");
    assert!(
        service.contains("type: NodePort") && service.contains("nodePort: 30771"),
        "{service}"
    );
    assert!(!service.contains("7070"), "management stays inside: {service}");
    let config = doc(&exposed, "ConfigMap", "backer-server");
    assert!(
        config.contains("ExternalName = \"backup.example.com\"") && config.contains("ExternalPort = 30771"),
        "{config}"
    );
    let policy = doc(&exposed, "NetworkPolicy", "backer-server");
    assert!(policy.contains("cidr: \"192.0.2.0/24\""), "{policy}");
    let agent = doc(&exposed, "DaemonSet", "backer-agent");
    assert!(!agent.contains("control-plane"), "{agent}");
    assert!(
        agent.contains("--restore-root=/var/lib/k0s/kubelet/pods,"),
        "{agent}"
    );
    assert!(
        agent.contains("hostPath: {path: /var/lib/k0s/kubelet/pods}"),
        "{agent}"
    );
    let operator = doc(&exposed, "Deployment", "backer-operator");
    assert!(
        operator.contains("--server-name=backer-server,backer-server.backer-system.svc,backup.example.com"),
        "{operator}"
    );
    assert!(
        operator.contains("--kubelet-root=/var/lib/k0s/kubelet"),
        "{operator}"
    );

    // S3 without a key Secret: the server's identity (IRSA) gives the
    // credentials, so no Secret is referenced and the role is annotated.
    let irsa = render(&[
        "--set",
        "repository.type=s3",
        "--set",
        "repository.s3.bucket=backups",
        "--set",
        "server.serviceAccountAnnotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/backer",
    ]);
    let server = doc(&irsa, "Deployment", "backer-server");
    assert!(!server.contains("envFrom"), "{server}");
    let account = doc(&irsa, "ServiceAccount", "backer-server");
    assert!(
        account.contains("eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/backer"),
        "{account}"
    );
    let keyed = render(&["-f", chart.join("ci/s3-values.yaml").to_str().unwrap()]);
    assert!(
        doc(&keyed, "Deployment", "backer-server").contains("secretRef: {name: backer-s3}"),
        "the key Secret is used when named"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
