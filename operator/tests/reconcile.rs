//! The reconcilers' pure steps from YAML fixtures, and the API call sequences
//! that matter against a mocked Kubernetes API (tower-test): what the CSR
//! signer does with an impostor, and that a BackupJob's own status write does
//! not wake it into another write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use backer_operator::backer::Backer;
use backer_operator::context::{Context, Settings};
use backer_operator::controller::backupjob::{Schedule, summarize, validate};
use backer_operator::controller::csr::judge;
use backer_operator::controller::snapshot::mirror;
use backer_operator::crd::{BackupJob, Run, ServerJob};
use backer_operator::metrics::Metrics;
use backer_operator::volume::{restorable, volume_dir};
use backer_proto::v1 as pb;
use base64::Engine;
use http::{Request, Response};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};

fn csr_asking(client: &str) -> CertificateSigningRequest {
    let (_, pem) = backer_proto::pki::new_client_csr(client).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
    serde_yaml::from_str(&include_str!("fixtures/csr-agent-node-a.yaml").replace("REQUEST", &b64)).unwrap()
}

fn agent_pod() -> Pod {
    serde_yaml::from_str(include_str!("fixtures/pod-agent-node-a.yaml")).unwrap()
}

#[test]
fn the_signer_accepts_an_agent_asking_for_its_own_node() {
    assert_eq!(
        judge(
            &csr_asking("node-a"),
            Some(&agent_pod()),
            "backer-system",
            "backer-agent"
        ),
        Ok("node-a".to_string())
    );
}

#[test]
fn the_signer_denies_every_other_request_and_says_why() {
    let pod = agent_pod();
    let deny = |csr: &CertificateSigningRequest, pod: Option<&Pod>| {
        judge(csr, pod, "backer-system", "backer-agent").unwrap_err()
    };
    assert!(deny(&csr_asking("node-b"), Some(&pod)).contains("asks to be node-b"));

    let mut other_user = csr_asking("node-a");
    other_user.spec.username = Some("system:serviceaccount:default:default".into());
    assert!(deny(&other_user, Some(&pod)).contains("not by the agents' ServiceAccount"));

    let mut unbound = csr_asking("node-a");
    unbound.spec.extra = None;
    assert!(deny(&unbound, Some(&pod)).contains("not bound to a pod"));

    let mut replaced = pod.clone();
    replaced.metadata.uid = Some("uid-2".into());
    assert!(deny(&csr_asking("node-a"), Some(&replaced)).contains("not the pod the token was issued to"));

    let mut other_sa = pod.clone();
    other_sa.spec.as_mut().unwrap().service_account_name = Some("default".into());
    assert!(deny(&csr_asking("node-a"), Some(&other_sa)).contains("does not run as backer-agent"));

    assert!(deny(&csr_asking("node-a"), None).contains("no longer exists"));
}

fn job(yaml: &str) -> BackupJob {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn namespaces_other_than_the_operators_may_not_name_clients() {
    let named = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {clients: [node-a], paths: [/etc]}\n",
    );
    let err = validate(&named, "backer-system").unwrap_err();
    assert!(err.contains("only in the operator's namespace"), "{err}");
    let pvc = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {pvc: data}\n",
    );
    assert!(validate(&pvc, "backer-system").unwrap().is_none());
    let tz = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {pvc: data, schedule: \"0 3 * * *\", timeZone: Mars/Olympus}\n",
    );
    assert!(
        validate(&tz, "backer-system")
            .unwrap_err()
            .contains("not a known IANA time zone")
    );
    let glob = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {pvc: data, exclude: [\"a[\"]}\n",
    );
    let e = validate(&glob, "backer-system").unwrap_err();
    assert!(
        e.contains("invalid exclude pattern \"a[\"") && e.contains("unclosed"),
        "{e}"
    );
    // `/` is a valid glob, but the engine refuses it as matching nothing:
    // the BackupJob is refused when applied, not at its first backup.
    let root = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {pvc: data, exclude: [\"/\"]}\n",
    );
    let e = validate(&root, "backer-system").unwrap_err();
    assert!(e.contains("matches nothing"), "{e}");
}

#[test]
fn schedules_follow_their_time_zone() {
    let j = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: j, namespace: apps}\nspec: {pvc: data, schedule: \"0 3 * * *\", timeZone: Europe/Berlin}\n",
    );
    let s = Schedule::parse(&j.spec).unwrap().unwrap();
    let at = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    // 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
    assert_eq!(
        s.next_after(at("2026-11-26T00:00:00Z")),
        Some(at("2026-11-26T02:00:00Z"))
    );
    assert_eq!(
        s.next_after(at("2026-07-01T00:00:00Z")),
        Some(at("2026-07-01T01:00:00Z"))
    );
}

fn server_job(id: &str, state: &str, snapshot: &str, done: u64) -> pb::Job {
    pb::Job {
        id: id.into(),
        state: pb::JobState::from_str_name(&format!("JOB_STATE_{}", state.to_uppercase()))
            .unwrap_or_else(|| panic!("no job state {state}"))
            .into(),
        snapshot_id: snapshot.into(),
        files_done: done,
        bytes_done: done * 10,
        messages: if state == "failed" {
            vec!["disk on fire".into()]
        } else {
            vec![]
        },
        ..Default::default()
    }
}

fn run_of(ids: &[&str]) -> Run {
    Run {
        started: "2026-11-26T10:00:00Z".into(),
        phase: "Running".into(),
        jobs: ids
            .iter()
            .map(|id| ServerJob {
                id: id.to_string(),
                client: format!("c-{id}"),
                state: "running".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn a_run_ends_only_when_every_job_has_and_says_how() {
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T10:00:10Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut run = run_of(&["1", "2"]);
    summarize(
        &mut run,
        &[
            server_job("1", "succeeded", "s1", 5),
            server_job("2", "running", "", 3),
        ],
        now,
    );
    assert!(run.finished.is_none());
    assert_eq!((run.files, run.bytes, run.rate), (8, 80, 8));
    summarize(
        &mut run,
        &[
            server_job("1", "succeeded", "s1", 5),
            server_job("2", "failed", "", 3),
        ],
        now,
    );
    assert_eq!(run.phase, "Partial");
    assert_eq!(run.message.as_deref(), Some("c-2: disk on fire"));

    // A job the server forgot (it was reset) fails the run instead of hanging it.
    let mut lost = run_of(&["9"]);
    summarize(&mut lost, &[], now);
    assert_eq!(lost.phase, "Failed");
    assert!(lost.jobs[0].messages[0].contains("no longer knows"));
}

#[test]
fn snapshots_are_mirrored_where_they_belong() {
    let snap = |tags: &[&str]| pb::Snapshot {
        id: "ab".repeat(32),
        client: "node-b".into(),
        time: 1_790_000_000,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let (ns, name, spec) = mirror(
        &snap(&["backupjob=apps/data-once", "pvc=apps/data"]),
        "backer-system",
    );
    assert_eq!((ns.as_str(), name.as_str()), ("apps", "data-ababababab"));
    assert_eq!(spec.pvc.as_deref(), Some("data"));
    let (ns, name, _) = mirror(&snap(&["backupjob=backer-system/etc"]), "backer-system");
    assert_eq!((ns.as_str(), name.as_str()), ("backer-system", "etc-ababababab"));
    let (ns, name, _) = mirror(&snap(&["weekly"]), "backer-system");
    assert_eq!(
        (ns.as_str(), name.as_str()),
        ("backer-system", "node-b-ababababab")
    );
}

#[test]
fn volumes_are_found_where_the_kubelet_mounts_them() {
    let pv = |spec: &str| -> PersistentVolume {
        serde_yaml::from_str(&format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: pv-1}}\nspec: {spec}\n"
        ))
        .unwrap()
    };
    assert_eq!(
        volume_dir(
            "/var/lib/kubelet",
            "u1",
            &pv("{csi: {driver: d, volumeHandle: h}}")
        )
        .unwrap(),
        "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv-1/mount"
    );
    assert_eq!(
        volume_dir("/k", "u1", &pv("{hostPath: {path: /srv/data}}")).unwrap(),
        "/srv/data"
    );
    let err = volume_dir("/k", "u1", &pv("{iscsi: {targetPortal: p, iqn: q, lun: 0}}")).unwrap_err();
    assert!(err.contains("cannot read yet"), "{err}");
}

#[test]
fn restores_go_only_where_the_agents_may_write() {
    let dirs = vec!["/opt/local-path-provisioner".to_string(), "/var/lp/".to_string()];
    let csi = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv-1/mount";
    assert!(restorable(csi, "/var/lib/kubelet", &dirs).is_ok());
    assert!(restorable("/opt/local-path-provisioner/pvc-1_a_b", "/var/lib/kubelet", &dirs).is_ok());
    assert!(restorable("/var/lp/pvc-2", "/var/lib/kubelet", &dirs).is_ok());
    // A sibling with the same prefix is not below it.
    let err = restorable("/opt/local-path-provisioner-2/pvc-1", "/var/lib/kubelet", &dirs).unwrap_err();
    assert!(err.contains("agent.volumeDirs"), "{err}");
    assert!(restorable("/srv/data", "/var/lib/kubelet", &dirs).is_err());
    // Not known: the agent decides.
    assert!(restorable("/srv/data", "/var/lib/kubelet", &[]).is_ok());
}

// ------------------------------------------------------------ mocked API

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ca = backer_proto::ca::Ca::create("test").unwrap();
    let ctx = Context {
        client: client.clone(),
        // Never dialled by these paths: they must not need the server.
        backer: Backer::new("localhost:1".into(), Arc::new(ca)),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "backer-operator".into(),
                instance: None,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        settings: Settings {
            namespace: "backer-system".into(),
            agent_service_account: "backer-agent".into(),
            kubelet_root: "/var/lib/kubelet".into(),
            node_selector: String::new(),
            host_volume_dirs: Vec::new(),
        },
        snapshots_changed: tokio::sync::Notify::new(),
        failures: Default::default(),
        signing: Default::default(),
        shutdown: Default::default(),
    };
    (Arc::new(ctx), handle)
}

async fn expect(handle: &mut Handle, method: &str, path_part: &str, reply: serde_json::Value) -> String {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method().as_str(), method, "{}", req.uri());
    assert!(
        req.uri().path().contains(path_part),
        "{} {} should touch {path_part}",
        req.method(),
        req.uri()
    );
    let body = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn an_impostors_request_is_denied_without_touching_the_server() {
    let (ctx, mut handle) = context();
    let csr = csr_asking("node-b");
    let csr_json = serde_json::to_value(&csr).unwrap();
    let pod_json = serde_json::to_value(agent_pod()).unwrap();
    let api = tokio::spawn(async move {
        expect(
            &mut handle,
            "GET",
            "/certificatesigningrequests/backer-agent-node-a-1",
            csr_json.clone(),
        )
        .await;
        expect(
            &mut handle,
            "GET",
            "/namespaces/backer-system/pods/backer-agent-x1",
            pod_json,
        )
        .await;
        let body = expect(
            &mut handle,
            "PATCH",
            "/certificatesigningrequests/backer-agent-node-a-1/approval",
            csr_json,
        )
        .await;
        assert!(handle.next_request().await.is_none(), "nothing after the denial");
        body
    });
    let action = backer_operator::controller::csr::reconcile(Arc::new(csr), Arc::clone(&ctx))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    drop(ctx);
    let body = api.await.unwrap();
    assert!(
        body.contains("\"Denied\"") && body.contains("asks to be node-b"),
        "{body}"
    );
}

#[tokio::test]
async fn an_invalid_backupjob_is_reported_once_then_left_alone() {
    let (ctx, mut handle) = context();
    let j = job(
        "apiVersion: backer.dev/v1alpha1\nkind: BackupJob\nmetadata: {name: sneaky, namespace: apps, generation: 1}\nspec: {clients: [node-a], paths: [/etc]}\n",
    );
    let reply = serde_json::to_value(&j).unwrap();
    let api = tokio::spawn(async move {
        let event = expect(
            &mut handle,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/apps/events",
            serde_json::json!({}),
        )
        .await;
        let status = expect(
            &mut handle,
            "PATCH",
            "/namespaces/apps/backupjobs/sneaky/status",
            reply,
        )
        .await;
        (event, status, handle)
    });
    let action = backer_operator::controller::backupjob::reconcile(Arc::new(j.clone()), Arc::clone(&ctx))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let (event, status, mut handle) = api.await.unwrap();
    assert!(event.contains("Invalid"), "{event}");
    assert!(
        status.contains("\"phase\":\"Invalid\"") && status.contains("only in the operator's namespace"),
        "{status}"
    );

    // Woken by its own write: the same status, so no write and no event.
    let written: serde_json::Value = serde_json::from_str(&status).unwrap();
    let mut again = j;
    again.status = Some(serde_json::from_value(written["status"].clone()).unwrap());
    let action = backer_operator::controller::backupjob::reconcile(Arc::new(again), Arc::clone(&ctx))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    drop(ctx);
    assert!(
        handle.next_request().await.is_none(),
        "an unchanged status is not written again"
    );
}

#[tokio::test]
async fn a_failing_object_backs_off_alone_and_recovers() {
    let (ctx, _handle) = context();
    let secs = |d: std::time::Duration| d.as_secs();
    assert_eq!(secs(ctx.backoff("backupjob/a/x".into())), 5);
    assert_eq!(secs(ctx.backoff("backupjob/a/x".into())), 10);
    assert_eq!(
        secs(ctx.backoff("backupjob/a/y".into())),
        5,
        "another object is not slowed"
    );
    for _ in 0..10 {
        ctx.backoff("backupjob/a/x".into());
    }
    assert_eq!(
        secs(ctx.backoff("backupjob/a/x".into())),
        300,
        "capped at 5 minutes"
    );
    ctx.succeeded("backupjob/a/x");
    assert_eq!(secs(ctx.backoff("backupjob/a/x".into())), 5);
}
