//! backer-operator: `crdgen` prints the CRDs; `run` reconciles.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::runtime::events::{Recorder, Reporter};

use backer_operator::backer::Backer;
use backer_operator::context::{Context, Settings};
use backer_operator::controller;
use backer_operator::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Backer's Kubernetes operator: BackerClients, BackupJobs, RestoreJobs and Snapshots, \
             the CA in Secrets, and node agents' certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write them to --out)
    Crdgen {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Reconcile until SIGTERM (boxed: the arguments dwarf the other command's)
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The namespace the operator, the server and the agents run in
    #[arg(long, env = "BACKER_NAMESPACE", default_value = "backer-system")]
    namespace: String,
    /// backer-server's management address (host:port)
    #[arg(long, env = "BACKER_SERVER", default_value = "backer-server:7070")]
    server: String,
    /// backer-server's data address (host:port) as the operator reaches it,
    /// for signing agents' certificates; default: the address the server
    /// advertises (its ExternalName), which is wrong once that names the
    /// server's outside address
    #[arg(long, env = "BACKER_SERVER_DATA")]
    server_data: Option<String>,
    /// Names the server's certificate must carry (the Service's DNS names);
    /// the first is the name clients use
    #[arg(
        long = "server-name",
        env = "BACKER_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "backer-server,backer-server.backer-system.svc"
    )]
    server_names: Vec<String>,
    /// The agents' ServiceAccount: only its pods get node certificates
    #[arg(long, default_value = "backer-agent")]
    agent_service_account: String,
    /// The kubelets' root directory on the nodes
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_root: String,
    /// Only nodes with these labels get a BackerClient (e.g. `backer.dev/backup=true`)
    #[arg(long, default_value = "")]
    node_selector: String,
    /// Directories of the nodes holding hostPath volumes (local-path's) that
    /// the agents may restore into (the chart's agent.volumeDirs); a
    /// restore into a hostPath volume elsewhere is refused with the reason
    #[arg(long, value_delimiter = ',')]
    host_volume_dirs: Vec<String>,
    /// Address of /healthz, /readyz and /metrics
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: String,
    /// This replica's name in the leader election (the pod name)
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crdgen { out } => crdgen(out),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")
            .and_then(|rt| rt.block_on(run(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn crdgen(out: Option<PathBuf>) -> anyhow::Result<()> {
    let yaml = backer_operator::crds_yaml().context("failed to render the CRDs")?;
    match out {
        Some(p) => std::fs::write(&p, yaml).with_context(|| format!("failed to write {}", p.display())),
        None => {
            print!("{yaml}");
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let role = Arc::new(backer_operator::leader::Role::default());
    let listener = tokio::net::TcpListener::bind(&args.http)
        .await
        .with_context(|| format!("failed to listen on {}", args.http))?;
    tracing::info!(http = %listener.local_addr()?, "backer-operator serving health and metrics");
    tokio::spawn(backer_operator::http::serve(
        listener,
        backer_operator::http::Health {
            role: Arc::clone(&role),
            metrics: Arc::clone(&metrics),
        },
    ));
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("backer-operator-{}", std::process::id()));
    // SIGTERM (a pod deleted, a rolling update) stops a waiting replica at
    // once and a leading one after its reconciles end, giving the lease up.
    // Without a handler the signal would be ignored (PID 1 in a container)
    // and the kubelet would wait out the grace period.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            backer_proto::terminated().await;
            shutdown.cancel();
            std::future::pending::<()>().await
        }
    };
    let mut signal = std::pin::pin!(signal);
    let stop = shutdown.clone();
    let mut leadership = tokio::select! {
        l = backer_operator::leader::lead(
            client.clone(),
            &args.namespace,
            identity.clone(),
            Arc::clone(&metrics),
            Arc::clone(&role),
        ) => l?,
        _ = &mut signal => unreachable!("the signal future never ends"),
        _ = stop.cancelled() => {
            tracing::info!("stopped while waiting for the lease");
            return Ok(());
        }
    };

    // From here on a lost lease stops everything at once, whatever is under
    // way: another replica may lead already.
    let ca = tokio::select! {
        ca = backer_operator::pki::ensure(&client, &args.namespace, &args.server_names) => ca?,
        why = leadership.lost() => return Err(lost_lease(&why)),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        backer: Backer::new(args.server.clone(), Arc::new(ca)).with_data_address(args.server_data.clone()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "backer-operator".into(),
                instance: Some(identity),
            },
        ),
        metrics,
        settings: Settings {
            namespace: args.namespace.clone(),
            agent_service_account: args.agent_service_account,
            kubelet_root: args.kubelet_root.trim_end_matches('/').to_string(),
            node_selector: args.node_selector,
            host_volume_dirs: args
                .host_volume_dirs
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect(),
        },
        snapshots_changed: tokio::sync::Notify::new(),
        failures: Default::default(),
        signing: Default::default(),
        shutdown: shutdown.clone(),
    });
    role.set_leading();
    tracing::info!(namespace = %args.namespace, server = %args.server, "reconciling");
    let renew =
        backer_operator::pki::keep_current(client.clone(), args.namespace.clone(), args.server_names.clone());
    let controllers = async {
        tokio::select! {
            _ = futures::future::join5(
                controller::client::run(Arc::clone(&ctx)),
                controller::csr::run(Arc::clone(&ctx)),
                controller::backupjob::run(Arc::clone(&ctx)),
                controller::restorejob::run(Arc::clone(&ctx)),
                controller::listing::run(Arc::clone(&ctx)),
            ) => {}
            _ = controller::snapshot::run(Arc::clone(&ctx)) => {}
            _ = renew => {}
        }
    };
    let mut controllers = std::pin::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {}
        _ = &mut signal => unreachable!("the signal future never ends"),
        // Stop reconciling at once (the controllers are dropped) and exit
        // non-zero, so the pod is restarted and waits for the lease again.
        why = leadership.lost() => return Err(lost_lease(&why)),
        _ = stop.cancelled() => {
            // The controllers end on the same token once their reconciles
            // under way are done; bounded, so the lease is given up in time.
            tokio::select! {
                done = tokio::time::timeout(Duration::from_secs(10), &mut controllers) => {
                    if done.is_err() {
                        tracing::warn!("reconciles still under way after 10 s: stopping anyway");
                    }
                }
                why = leadership.lost() => return Err(lost_lease(&why)),
            }
        }
    }
    leadership.release().await;
    tracing::info!("stopped");
    Ok(())
}

/// The error `run` ends with when the lease is lost (logged too, as the
/// operator's last line at error level).
fn lost_lease(why: &str) -> anyhow::Error {
    tracing::error!("stopped leading: {why}");
    anyhow::anyhow!("stopped leading: {why}")
}
