//! `kubectl backer`: the same binary installed as `kubectl-backer`. It speaks
//! the kubeconfig's context and namespace like any plugin and creates the
//! resources a user would apply by hand (BackupJob, RestoreJob,
//! BackerClient), then follows their status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use backer_k8s_api::{
    BackerClient, BackerClientSpec, BackupJob, BackupJobSpec, OverwritePolicy, RestoreJob, RestoreJobSpec,
    RestoreTarget, Run, Snapshot, SnapshotListing, SnapshotListingSpec,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

/// The namespace Backer runs in (clients, node-path jobs, enrolment bundles).
const SYSTEM_NS: &str = "backer-system";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl backer",
    bin_name = "kubectl backer",
    version,
    about = "Backer from kubectl: back up and restore PVCs and node paths, list snapshots, check health",
    after_help = "Examples:\n  kubectl backer -n apps backup --pvc data --wait\n  kubectl backer -n apps snapshots\n  \
                  kubectl backer -n apps restore data-1a2b3c4d5e --to-pvc data --path /db/table --wait\n  \
                  kubectl backer clients\n  kubectl backer status\n  kubectl backer enroll db-host --out db-host.json"
)]
pub struct KubectlCli {
    /// Namespace (default: the kubeconfig context's)
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Output format of listings
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: KubeCommand,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum KubeCommand {
    /// List BackerClients: nodes and external hosts, enrolment, connection, last backup
    Clients,
    /// Back up a PVC of the namespace, or paths of a client (in backer-system)
    Backup(BackupArgs),
    /// List the namespace's Snapshots
    Snapshots {
        /// All namespaces
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// List the files of a Snapshot of the namespace (at most 1000 entries: name a path inside to see more)
    Ls {
        /// The Snapshot's name (kubectl backer snapshots)
        snapshot: String,
        /// A directory or file inside the snapshot (default: all of it)
        path: Option<String>,
    },
    /// Restore a Snapshot into a PVC of the namespace, or into a client's directory
    Restore(RestoreArgs),
    /// Operator, server, agents and certificate expiry at a glance
    Status,
    /// Register an external host and write its enrolment bundle
    Enroll {
        /// The host's client name (a DNS name)
        host: String,
        /// Where to write the bundle (default HOST.json); hand it to `backer-agent enroll --bundle`
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print shell completions
    Completion { shell: clap_complete::Shell },
}

#[derive(Args, Debug)]
struct BackupArgs {
    /// A client (node or host) to back up paths of
    #[arg(conflicts_with = "pvc", required_unless_present = "pvc")]
    client: Option<String>,
    /// A PersistentVolumeClaim of the namespace
    #[arg(long)]
    pvc: Option<String>,
    /// Absolute path to back up (repeatable; inside the volume with --pvc)
    #[arg(long = "path")]
    paths: Vec<String>,
    /// Leave out files matching this glob (repeatable)
    #[arg(long)]
    exclude: Vec<String>,
    /// Name of the BackupJob (default: generated)
    #[arg(long)]
    name: Option<String>,
    /// Follow the run to its end with a progress bar
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The Snapshot's name (kubectl backer snapshots)
    snapshot: String,
    /// Restore into this PVC of the namespace
    #[arg(long, conflicts_with = "to_client", required_unless_present = "to_client")]
    to_pvc: Option<String>,
    /// A directory inside the PVC (default: in place)
    #[arg(long, requires = "to_pvc")]
    sub_path: Option<String>,
    /// Restore onto this client (backer-system only), with --target
    #[arg(long, requires = "target")]
    to_client: Option<String>,
    /// Absolute directory on the client
    #[arg(long)]
    target: Option<String>,
    /// Only this path of the snapshot (repeatable)
    #[arg(long = "path")]
    paths: Vec<String>,
    /// Replace files that exist
    #[arg(long)]
    overwrite: bool,
    /// Name of the RestoreJob (default: generated)
    #[arg(long)]
    name: Option<String>,
    /// Follow the restore to its end with a progress bar
    #[arg(long)]
    wait: bool,
}

/// Whether this process was started as the kubectl plugin.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("kubectl-backer"))
}

pub async fn run(cli: KubectlCli) -> Result<()> {
    if let KubeCommand::Completion { shell } = cli.command {
        let mut cmd = <KubectlCli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "kubectl-backer", &mut std::io::stdout());
        return Ok(());
    }
    let client = Client::try_default()
        .await
        .context("failed to configure the Kubernetes client from the kubeconfig")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        KubeCommand::Clients => clients(&client, cli.output).await,
        KubeCommand::Backup(a) => backup(&client, &ns, a).await,
        KubeCommand::Snapshots { all_namespaces } => {
            snapshots(&client, &ns, all_namespaces, cli.output).await
        }
        KubeCommand::Ls { snapshot, path } => ls(&client, &ns, snapshot, path, cli.output).await,
        KubeCommand::Restore(a) => restore(&client, &ns, a).await,
        KubeCommand::Status => status(&client, cli.output).await,
        KubeCommand::Enroll { host, out } => enroll(&client, &host, out).await,
        KubeCommand::Completion { .. } => Ok(()),
    }
}

/// Prints `rows` as a table, or `value` as JSON or YAML.
fn print<T: Serialize>(format: Format, value: &T, header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(value)?)?,
        Format::Yaml => crate::output::write_out(format_args!("{}", serde_yaml::to_string(value)?))?,
        Format::Table => {
            let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate() {
                    widths[i] = widths[i].max(c.len());
                }
            }
            let line = |cells: Vec<&str>| {
                let s: Vec<String> = cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect();
                outln!("{}", s.join("   ").trim_end())
            };
            line(header.to_vec())?;
            for r in &rows {
                line(r.iter().map(String::as_str).collect())?;
            }
        }
    }
    Ok(())
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

fn forbidden_hint(e: kube::Error, what: &str) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.is_forbidden() => anyhow!("you may not {what}: {}", s.message),
        _ => anyhow!("failed to {what}: {e}"),
    }
}

/// A watch that failed, with the same hint as a refused read.
fn watch_failed(e: kube::runtime::watcher::Error, what: &str) -> anyhow::Error {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => forbidden_hint(e, what),
        e => anyhow!("failed to {what}: {e}"),
    }
}

async fn clients(client: &Client, format: Format) -> Result<()> {
    let list = Api::<BackerClient>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| forbidden_hint(e, "list BackerClients"))?;
    let rows = list
        .iter()
        .map(|c| {
            let st = c.status.clone().unwrap_or_default();
            vec![
                c.name_any(),
                or_dash(st.phase.as_deref()),
                or_dash(c.spec.node_name.as_deref()),
                if st.connected { "yes".into() } else { "no".into() },
                or_dash(st.agent_version.as_deref()),
                or_dash(st.last_backup.as_deref()),
                or_dash(st.certificate_expiry.as_deref()),
            ]
        })
        .collect();
    print(
        format,
        &list.items,
        &[
            "NAME",
            "PHASE",
            "NODE",
            "CONNECTED",
            "AGENT",
            "LAST BACKUP",
            "CERT EXPIRY",
        ],
        rows,
    )
}

fn meta(name: Option<String>, prefix: &str, ns: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.clone(),
        generate_name: name.is_none().then(|| format!("{prefix}-")),
        namespace: Some(ns.to_string()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/created-by".into(),
            "kubectl-backer".into(),
        )])),
        ..Default::default()
    }
}

async fn backup(client: &Client, ns: &str, a: BackupArgs) -> Result<()> {
    let spec = match (&a.client, &a.pvc) {
        (_, Some(pvc)) => BackupJobSpec {
            pvc: Some(pvc.clone()),
            paths: a.paths,
            exclude: a.exclude,
            history_limit: 5,
            ..Default::default()
        },
        (Some(c), None) => {
            if a.paths.is_empty() {
                bail!("name the paths to back up on {c}: --path /etc --path /home");
            }
            BackupJobSpec {
                clients: vec![c.clone()],
                paths: a.paths,
                exclude: a.exclude,
                history_limit: 5,
                ..Default::default()
            }
        }
        (None, None) => bail!("name a client or --pvc NAME"),
    };
    let ns = if a.client.is_some() && a.pvc.is_none() {
        SYSTEM_NS
    } else {
        ns
    };
    let job = BackupJob {
        metadata: meta(a.name, "backup", ns),
        spec,
        status: None,
    };
    let followed = create_and_follow(client, ns, &job, a.wait, |j: BackupJob| {
        let st = j.status.unwrap_or_default();
        (st.last_run, st.phase)
    })
    .await?;
    let Some(run) = followed else { return Ok(()) };
    finish(&run, "backup")?;
    for j in &run.jobs {
        if let Some(s) = &j.snapshot {
            outln!("{}: snapshot {}", j.client, &s[..s.len().min(10)])?;
        }
    }
    Ok(())
}

/// The API server's refusal, as it worded it (CEL messages name the field).
fn refusal(e: kube::Error, what: &str) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.is_invalid() || s.is_forbidden() || s.is_already_exists() => {
            anyhow!("failed to {what}: {}", s.message)
        }
        _ => anyhow!("failed to {what}: {e}"),
    }
}

/// Watch failures in a row (each retried after a growing wait) before
/// `--wait` gives up.
const WATCH_FAILURES: u32 = 10;

/// Creates `obj` in `ns` and, with `wait`, watches the run that `run_of`
/// finds in it (and its phase) until it ends, with a progress bar on a
/// terminal.
async fn create_and_follow<K>(
    client: &Client,
    ns: &str,
    obj: &K,
    wait: bool,
    run_of: impl Fn(K) -> (Option<Run>, Option<String>),
) -> Result<Option<Run>>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let kind = K::kind(&());
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = api
        .create(&PostParams::default(), obj)
        .await
        .map_err(|e| refusal(e, &format!("create the {kind}")))?
        .name_any();
    eprintln!("{}.{}/{name} created in {ns}", kind.to_lowercase(), K::group(&()));
    if !wait {
        return Ok(None);
    }
    let bar = crate::output::terminal_bar(&kind.to_lowercase());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
    // The watcher starts again by itself after a lost connection or an
    // expired watch (an API server restarting during a long backup); only a
    // refusal, or failures without end, end the wait.
    let mut updates = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(
        kube::runtime::watcher::watch_object(api, &name)
    ));
    let mut failures = 0;
    loop {
        let obj = match tokio::time::timeout_at(deadline, updates.try_next()).await {
            Err(_) => bail!("gave up waiting after a day; the job goes on"),
            Ok(Err(e)) => {
                let refused = matches!(&e, kube::runtime::watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | kube::runtime::watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.is_forbidden() || s.code == 404);
                failures += 1;
                if refused || failures >= WATCH_FAILURES {
                    return Err(watch_failed(e, &format!("watch {kind} {name}")));
                }
                continue;
            }
            Ok(Ok(None)) => bail!("the watch of {kind} {name} ended"),
            Ok(Ok(Some(None))) => bail!("{kind} {name} was deleted while waiting for it"),
            Ok(Ok(Some(Some(obj)))) => {
                failures = 0;
                obj
            }
        };
        let (run, phase) = run_of(obj);
        if phase.as_deref() == Some("Invalid") {
            bar.finish_and_clear();
            bail!("the operator refused the job (kubectl describe it for the reason)");
        }
        if let Some(run) = run {
            bar.set_length(run.bytes_total.max(run.bytes));
            bar.set_position(run.bytes);
            bar.set_message(format!("{} files", run.files));
            if run.finished.is_some() {
                bar.finish_and_clear();
                return Ok(Some(run));
            }
        }
    }
}

fn finish(run: &Run, what: &str) -> Result<()> {
    let line = format!("{what} {}", run.summary());
    if run.phase == "Succeeded" {
        outln!("{line}")?;
        Ok(())
    } else {
        bail!("{line}")
    }
}

async fn snapshots(client: &Client, ns: &str, all: bool, format: Format) -> Result<()> {
    let api: Api<Snapshot> = if all {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    };
    let mut list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| forbidden_hint(e, "list Snapshots"))?
        .items;
    list.sort_by(|a, b| a.spec.time.cmp(&b.spec.time));
    let rows = list
        .iter()
        .map(|s| {
            let mut r = vec![];
            if all {
                r.push(s.namespace().unwrap_or_default());
            }
            r.extend([
                s.name_any(),
                s.spec.client.clone(),
                or_dash(s.spec.pvc.as_deref()),
                s.spec.time.clone(),
                s.spec.files.to_string(),
                s.spec.bytes.to_string(),
                s.spec.paths.join(","),
            ]);
            r
        })
        .collect();
    let mut header = vec![];
    if all {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "CLIENT", "PVC", "TIME", "FILES", "BYTES", "PATHS"]);
    print(format, &list, &header, rows)
}

/// Asks the operator for the listing through a SnapshotListing (the user
/// needs no access to the server), prints it and deletes the request.
async fn ls(client: &Client, ns: &str, snapshot: String, path: Option<String>, format: Format) -> Result<()> {
    let api: Api<SnapshotListing> = Api::namespaced(client.clone(), ns);
    let req = SnapshotListing {
        metadata: meta(None, "ls", ns),
        spec: SnapshotListingSpec { snapshot, path },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(|e| refusal(e, "ask for the listing"))?;
    let name = created.name_any();
    // Answered, or gone (deleted by someone else).
    let answered_by =
        |l: Option<&SnapshotListing>| l.is_none_or(|l| l.status.as_ref().is_some_and(|s| s.phase.is_some()));
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(api.clone(), &name, answered_by),
    )
    .await;
    let answered = match waited {
        Ok(Ok(Some(got))) => got,
        Ok(Ok(None)) => bail!("the listing request was deleted before the operator answered"),
        Ok(Err(kube::runtime::wait::Error::ProbeFailed(e))) => {
            let _ = api.delete(&name, &Default::default()).await;
            return Err(watch_failed(e, "watch the listing"));
        }
        Err(_) => {
            let _ = api.delete(&name, &Default::default()).await;
            bail!("the operator did not answer within 60 s (is it running? kubectl backer status)");
        }
    };
    // Read: the request has done its job.
    let _ = api.delete(&name, &Default::default()).await;
    let st = answered.status.unwrap_or_default();
    if st.phase.as_deref() != Some("Ready") {
        bail!("{}", st.message.unwrap_or_else(|| "the listing failed".into()));
    }
    let rows = st
        .entries
        .iter()
        .map(|e| {
            vec![
                format!("{:o}", e.mode & 0o7777),
                e.kind.clone(),
                e.size.to_string(),
                chrono::DateTime::from_timestamp(e.mtime, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
                e.path.clone(),
            ]
        })
        .collect();
    print(
        format,
        &st.entries,
        &["MODE", "KIND", "SIZE", "MODIFIED", "PATH"],
        rows,
    )?;
    if st.truncated {
        eprintln!("{}", st.message.unwrap_or_default());
    }
    Ok(())
}

async fn restore(client: &Client, ns: &str, a: RestoreArgs) -> Result<()> {
    let target = match (&a.to_pvc, &a.to_client) {
        (Some(pvc), _) => RestoreTarget {
            pvc: Some(pvc.clone()),
            sub_path: a.sub_path.clone(),
            ..Default::default()
        },
        (None, Some(c)) => RestoreTarget {
            client: Some(c.clone()),
            path: a.target.clone(),
            ..Default::default()
        },
        (None, None) => bail!("name where to restore: --to-pvc NAME, or --to-client C --target DIR"),
    };
    let job = RestoreJob {
        metadata: meta(a.name, "restore", ns),
        spec: RestoreJobSpec {
            snapshot: a.snapshot,
            paths: a.paths,
            target,
            overwrite: if a.overwrite {
                OverwritePolicy::Always
            } else {
                OverwritePolicy::Never
            },
        },
        status: None,
    };
    let followed = create_and_follow(client, ns, &job, a.wait, |j: RestoreJob| {
        let st = j.status.unwrap_or_default();
        (st.run, st.phase)
    })
    .await?;
    match followed {
        Some(run) => finish(&run, "restore"),
        None => Ok(()),
    }
}

#[derive(Serialize, Debug)]
struct Health {
    /// Ready replicas over wanted, per workload (what the API says; "-" when
    /// the workload is not there or not readable).
    operator_pods: String,
    server_pods: String,
    agent_pods: String,
    operator_leader: Option<String>,
    operator_renewed: Option<String>,
    clients: usize,
    enrolled: usize,
    connected: usize,
    earliest_client_certificate_expiry: Option<String>,
    ca_expiry: Option<String>,
    running_backups: usize,
}

/// `ready/wanted` of a Deployment or DaemonSet in backer-system.
async fn readiness(client: &Client, kind: &str, name: &str) -> String {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    let got = match kind {
        "deployment" => Api::<Deployment>::namespaced(client.clone(), SYSTEM_NS)
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .map(|d| {
                let st = d.status.unwrap_or_default();
                let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
                (st.ready_replicas.unwrap_or(0), want)
            }),
        _ => Api::<DaemonSet>::namespaced(client.clone(), SYSTEM_NS)
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .map(|d| {
                let st = d.status.unwrap_or_default();
                (st.number_ready, st.desired_number_scheduled)
            }),
    };
    got.map(|(ready, want)| format!("{ready}/{want} ready"))
        .unwrap_or_else(|| "-".into())
}

async fn status(client: &Client, format: Format) -> Result<()> {
    let lease = Api::<Lease>::namespaced(client.clone(), SYSTEM_NS)
        .get_opt("backer-operator")
        .await
        .map_err(|e| forbidden_hint(e, "read the operator's Lease"))?;
    let spec = lease.and_then(|l| l.spec).unwrap_or_default();
    let clients = Api::<BackerClient>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| forbidden_hint(e, "list BackerClients"))?;
    let phase = |c: &BackerClient, p: &str| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(p);
    let ca_expiry = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM_NS)
        .get_opt("backer-ca")
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data?.get("ca.pem").cloned())
        .and_then(|pem| backer_proto::ca::describe(&pem))
        .and_then(|(_, t)| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.to_rfc3339());
    let running = Api::<BackupJob>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.iter()
                .filter(|j| j.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count()
        })
        .unwrap_or(0);
    let health = Health {
        operator_pods: readiness(client, "deployment", "backer-operator").await,
        server_pods: readiness(client, "deployment", "backer-server").await,
        agent_pods: readiness(client, "daemonset", "backer-agent").await,
        operator_leader: spec.holder_identity,
        operator_renewed: spec.renew_time.map(|t| t.0.to_string()),
        clients: clients.items.len(),
        enrolled: clients.iter().filter(|c| phase(c, "Enrolled")).count(),
        connected: clients
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.connected))
            .count(),
        earliest_client_certificate_expiry: clients
            .iter()
            .filter_map(|c| c.status.as_ref()?.certificate_expiry.clone())
            .min(),
        ca_expiry,
        running_backups: running,
    };
    let rows = vec![
        vec!["operator pods".into(), health.operator_pods.clone()],
        vec!["server pods".into(), health.server_pods.clone()],
        vec!["agent pods".into(), health.agent_pods.clone()],
        vec![
            "operator leader".into(),
            or_dash(health.operator_leader.as_deref()),
        ],
        vec![
            "operator renewed".into(),
            or_dash(health.operator_renewed.as_deref()),
        ],
        vec![
            "clients".into(),
            format!(
                "{} ({} enrolled, {} connected)",
                health.clients, health.enrolled, health.connected
            ),
        ],
        vec![
            "first client cert expiry".into(),
            or_dash(health.earliest_client_certificate_expiry.as_deref()),
        ],
        vec!["CA expiry".into(), or_dash(health.ca_expiry.as_deref())],
        vec!["running backups".into(), health.running_backups.to_string()],
    ];
    print(format, &health, &["WHAT", "STATE"], rows)
}

async fn enroll(client: &Client, host: &str, out: Option<PathBuf>) -> Result<()> {
    let api: Api<BackerClient> = Api::all(client.clone());
    let bc = BackerClient::new(host, BackerClientSpec { node_name: None });
    match api.create(&PostParams::default(), &bc).await {
        Ok(_) => eprintln!("backerclient.backer.dev/{host} created"),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            eprintln!("backerclient.backer.dev/{host} exists; fetching its bundle")
        }
        Err(e) => return Err(refusal(e, "create the BackerClient")),
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NS);
    let key = format!("{host}.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let bundle = loop {
        let found = secrets
            .get_opt("backer-enrol")
            .await
            .map_err(|e| forbidden_hint(e, "read Secret backer-system/backer-enrol"))?
            .and_then(|s| s.data)
            .and_then(|d| d.get(&key).cloned());
        if let Some(b) = found {
            break b.0;
        }
        if std::time::Instant::now() > deadline {
            bail!("the operator did not write {host}'s bundle within 60 s: is backer-operator running?");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{host}.json")));
    backer_proto::pki::write_atomic(&out, &bundle, true)
        .with_context(|| format!("failed to write {}", out.display()))?;
    outln!(
        "wrote {} (secret: a one-time token): on the host run `backer-agent enroll --bundle {}`",
        out.display(),
        out.display()
    )?;
    Ok(())
}
