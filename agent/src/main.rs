//! backer-agent: enrol once with a bundle from `backer clients add`, then run
//! as a daemon that keeps a connection open to the server for work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
mod kubernetes;
mod remote;
mod work;

use backer_proto::v1 as pb;
use backer_proto::v1::agent_client::AgentClient;
use backer_proto::v1::agent_report::Report;
use backer_proto::v1::enrollment_client::EnrollmentClient;
use backer_proto::v1::{AgentReport, EnrollRequest, Hello, RenewRequest};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Renew the certificate when it has less than this fraction of 90 days left.
const RENEW_WITHIN_DAYS: i64 = 30;

/// How often a connected agent looks whether its certificate needs renewing
/// or was renewed.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(5);

/// The first wait before reconnecting, doubled on each failure in a row up
/// to `MAX_RECONNECT_WAIT`.
const FIRST_RECONNECT_WAIT: Duration = Duration::from_millis(500);
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(60);

fn reconnect_waits() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_RECONNECT_WAIT)
        .with_max_delay(MAX_RECONNECT_WAIT)
        .without_max_times()
        .build()
}
/// How long a stopping agent waits for its cancelled jobs to report: well
/// inside Kubernetes' default 30 s grace period.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long, once its jobs ended, a stopping agent waits for the server to
/// have read their last reports.
const LAST_REPORTS: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(
    name = "backer-agent",
    version,
    about = "Backer's agent: runs the backups and restores its server directs"
)]
struct Cli {
    /// Where the agent keeps its key, certificate and the server's CA
    #[arg(
        long,
        env = "BACKER_AGENT_STATE_DIR",
        default_value = "/var/lib/backer-agent",
        global = true
    )]
    state_dir: PathBuf,
    /// DEVELOPMENT ONLY, with `enroll`: talk to a server run with
    /// --insecure-plaintext (no TLS; the agent names itself). Remembered.
    #[arg(long, global = true)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enrol this host with the bundle `backer clients add NAME --bundle-out FILE` wrote
    Enroll {
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Connect to the server and run the work it sends, renewing the certificate as needed
    Run {
        /// Directories restores may write into (repeatable); by default anywhere
        #[arg(
            long = "restore-root",
            env = "BACKER_AGENT_RESTORE_ROOTS",
            value_delimiter = ',',
            default_value = "/"
        )]
        restore_roots: Vec<PathBuf>,
        /// Upload at most this many KiB per second (backups share the link politely)
        #[arg(long, value_name = "KIB_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
        limit_upload: Option<u64>,
        /// Where the host's / is mounted (in a container, e.g. /host read-only):
        /// backups read host paths under it
        #[arg(long, env = "BACKER_AGENT_HOST_ROOT", default_value = "/")]
        host_root: PathBuf,
        /// In Kubernetes: this pod's node. With no identity yet (or a refused
        /// one), the agent files a CertificateSigningRequest that the operator
        /// approves for this node only
        #[arg(long, env = "NODE_NAME", value_name = "NODE")]
        kubernetes_node: Option<String>,
        /// With --kubernetes-node: the server's data address (host:port)
        #[arg(long, env = "BACKER_SERVER_DATA", requires = "kubernetes_node")]
        server: Option<String>,
        /// With --kubernetes-node: the namespace of the operator's ConfigMap backer-ca
        #[arg(long, env = "POD_NAMESPACE", default_value = "backer-system")]
        namespace: String,
    },
    /// Show this agent's identity and certificate expiry
    Status,
    /// Renew the certificate now, with a new key. A running agent reconnects
    /// with it within seconds; backups under way finish on the old one
    Renew,
    /// Back up paths of this host now, through the server (`backer-agent run` must be running)
    Backup {
        /// Absolute paths to back up; none means the backups configured for this client
        paths: Vec<String>,
        /// Leave out files and directories matching this glob (repeatable)
        #[arg(long)]
        exclude: Vec<String>,
        #[arg(long)]
        tag: Vec<String>,
    },
    /// Restore one of this host's snapshots onto it, through the server
    Restore {
        /// Snapshot id (a unique prefix is enough) or `latest`
        snapshot: String,
        /// Absolute directory to restore into (`/` restores in place)
        #[arg(long)]
        target: String,
        /// Restore only these paths of the snapshot (repeatable)
        #[arg(long)]
        include: Vec<String>,
        /// Replace files that exist in the target
        #[arg(long)]
        overwrite: bool,
    },
}

/// What `backer clients add` hands to a host.
#[derive(Debug, Serialize, Deserialize)]
pub struct Bundle {
    pub server: String,
    pub client: String,
    pub token: String,
    pub ca_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AgentState {
    pub server: String,
    pub client: String,
    pub not_after: i64,
    /// Enrolled with a development server without TLS.
    #[serde(default)]
    pub plaintext: bool,
}

fn main() -> ExitCode {
    backer_repo::memory::limit_arenas();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Enroll { bundle } => enroll(&cli.state_dir, &bundle, cli.insecure_plaintext).await,
            Command::Run {
                restore_roots,
                limit_upload,
                host_root,
                kubernetes_node,
                server,
                namespace,
            } => {
                let policy = work::Policy {
                    restore_roots,
                    limit_upload: limit_upload.map(|k| k * 1024),
                    host_root,
                };
                let kube = match (kubernetes_node, server) {
                    (Some(node), Some(server)) => Some(kubernetes::Identity {
                        node,
                        namespace,
                        server,
                    }),
                    (Some(_), None) => {
                        return Err(anyhow::anyhow!(
                            "--kubernetes-node needs --server (the server's data address)"
                        ));
                    }
                    _ => None,
                };
                // SIGTERM (the pod deleted, a rolling update) cancels the
                // jobs under way, which tell the server why they ended, and
                // stops the agent. As PID 1 in a container the signal would
                // otherwise be ignored until the kubelet's grace period ran out.
                let stop = CancellationToken::new();
                let agent = run(&cli.state_dir, policy, kube, stop.clone());
                tokio::pin!(agent);
                tokio::select! {
                    r = &mut agent => r,
                    _ = backer_proto::terminated() => {
                        stop.cancel();
                        tokio::time::timeout(STOP_GRACE, agent).await.unwrap_or_else(|_| {
                            tracing::warn!("jobs did not end within {} s of the stop; exiting", STOP_GRACE.as_secs());
                            Ok(())
                        })
                    }
                }
            }
            Command::Status => status(&cli.state_dir),
            Command::Renew => {
                let mut st = load_state(&cli.state_dir)?;
                renew(&cli.state_dir, &mut st).await?;
                println!(
                    "certificate of client {} renewed, valid until {}",
                    st.client,
                    chrono::DateTime::from_timestamp(st.not_after, 0).unwrap_or_default()
                );
                Ok(())
            }
            Command::Backup { paths, exclude, tag } => {
                let req = pb::request_job_request::Job::Backup(pb::StartBackupRequest {
                    client: String::new(),
                    paths,
                    excludes: exclude,
                    tags: tag,
                    ..Default::default()
                });
                own_job(&cli.state_dir, req).await
            }
            Command::Restore {
                snapshot,
                target,
                include,
                overwrite,
            } => {
                let req = pb::request_job_request::Job::Restore(pb::StartRestoreRequest {
                    snapshot,
                    target,
                    includes: include,
                    overwrite,
                    ..Default::default()
                });
                own_job(&cli.state_dir, req).await
            }
        }
    });
    // A backup or restore thread may still run after a stop: it must not
    // hold the exit up.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn write(dir: &Path, name: &str, data: &str, secret: bool) -> Result<()> {
    backer_proto::pki::write_atomic(&dir.join(name), data.as_bytes(), secret)
        .with_context(|| format!("failed to write {}", dir.join(name).display()))
}

fn read(dir: &Path, name: &str) -> Result<String> {
    std::fs::read_to_string(dir.join(name)).with_context(|| {
        format!(
            "failed to read {} (has this host been enrolled? run `backer-agent enroll --bundle FILE`)",
            dir.join(name).display()
        )
    })
}

async fn enroll(state_dir: &Path, bundle_path: &Path, plaintext: bool) -> Result<()> {
    let raw =
        std::fs::read(bundle_path).with_context(|| format!("failed to read {}", bundle_path.display()))?;
    let bundle: Bundle = serde_json::from_slice(&raw)
        .with_context(|| format!("{} is not an enrolment bundle", bundle_path.display()))?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("failed to create {}", state_dir.display()))?;
    // The key is made here and never leaves this host.
    let (key_pem, csr_pem) = backer_proto::pki::new_csr()?;
    let channel = if plaintext {
        tracing::warn!("INSECURE: enrolling over plain text (--insecure-plaintext); development only");
        backer_proto::connect_plain(&bundle.server).await
    } else {
        backer_proto::connect(&bundle.server, &bundle.ca_pem, None).await
    }
    .with_context(|| format!("failed to reach the server at {}", bundle.server))?;
    let resp = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: bundle.token.clone(),
            csr_pem,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the server refused the enrolment: {}", s.message()))?
        .into_inner();
    write(state_dir, "key.pem", &key_pem, true)?;
    write(state_dir, "cert.pem", &resp.certificate_pem, false)?;
    write(state_dir, "ca.pem", &resp.ca_pem, false)?;
    let st = AgentState {
        server: bundle.server,
        client: resp.client_name.clone(),
        not_after: resp.not_after,
        plaintext,
    };
    save_state(state_dir, &st)?;
    println!(
        "enrolled as {} (certificate valid until {})",
        resp.client_name,
        rfc3339(resp.not_after)
    );
    Ok(())
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

pub(crate) fn save_state(state_dir: &Path, st: &AgentState) -> Result<()> {
    write(state_dir, "agent.json", &serde_json::to_string_pretty(st)?, false)
}

fn load_state(state_dir: &Path) -> Result<AgentState> {
    serde_json::from_str(&read(state_dir, "agent.json")?).context("agent.json is damaged; enrol again")
}

fn status(state_dir: &Path) -> Result<()> {
    let st = load_state(state_dir)?;
    println!(
        "client {} of server {}, certificate valid until {}",
        st.client,
        st.server,
        rfc3339(st.not_after)
    );
    Ok(())
}

/// The agent's gRPC client: mutual TLS with its certificate, or (for a
/// development server without TLS) plain text with its name in a header.
pub type Client =
    AgentClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Claim>>;

#[derive(Clone)]
pub struct Claim(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Claim {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(name) = &self.0 {
            req.metadata_mut().insert("x-backer-client", name.clone());
        }
        Ok(req)
    }
}

async fn client(state_dir: &Path, st: &AgentState) -> Result<Client> {
    let (channel, claim) = if st.plaintext {
        tracing::warn!("INSECURE: talking to the server in plain text (enrolled with --insecure-plaintext)");
        let name = st
            .client
            .parse()
            .map_err(|_| anyhow::anyhow!("client name {:?} cannot travel in a header", st.client))?;
        (backer_proto::connect_plain(&st.server).await, Claim(Some(name)))
    } else {
        let (ca, cert, key) = (
            read(state_dir, "ca.pem")?,
            read(state_dir, "cert.pem")?,
            read(state_dir, "key.pem")?,
        );
        (
            backer_proto::connect(&st.server, &ca, Some((&cert, &key))).await,
            Claim(None),
        )
    };
    let channel = channel.with_context(|| format!("failed to reach the server at {}", st.server))?;
    Ok(AgentClient::with_interceptor(channel, claim)
        .max_decoding_message_size(backer_proto::MAX_MESSAGE)
        .max_encoding_message_size(backer_proto::MAX_MESSAGE))
}

fn renewal_due(st: &AgentState) -> bool {
    st.not_after - chrono::Utc::now().timestamp() <= RENEW_WITHIN_DAYS * 86_400
}

/// Replaces the key and certificate when the certificate nears its end.
async fn renew_if_due(state_dir: &Path, st: &mut AgentState) -> Result<()> {
    if renewal_due(st) {
        renew(state_dir, st).await?;
    }
    Ok(())
}

/// Replaces the key and certificate. The server keeps the old certificate
/// working for a while, for the work already under way with it.
async fn renew(state_dir: &Path, st: &mut AgentState) -> Result<()> {
    let (key_pem, csr_pem) = backer_proto::pki::new_csr()?;
    let resp = client(state_dir, st)
        .await?
        .renew(RenewRequest { csr_pem })
        .await
        .map_err(|s| anyhow::anyhow!("the server refused to renew the certificate: {}", s.message()))?
        .into_inner();
    write(state_dir, "key.pem", &key_pem, true)?;
    write(state_dir, "cert.pem", &resp.certificate_pem, false)?;
    st.not_after = resp.not_after;
    save_state(state_dir, st)?;
    tracing::info!("certificate renewed");
    Ok(())
}

/// Asks the server for a job of this host and follows it to its end.
async fn own_job(state_dir: &Path, job: pb::request_job_request::Job) -> Result<()> {
    let st = load_state(state_dir)?;
    let mut c = client(state_dir, &st).await?;
    let mut updates = c
        .request_job(pb::RequestJobRequest { job: Some(job) })
        .await
        .map_err(|s| anyhow::anyhow!("the server refused the job: {}", s.message()))?
        .into_inner();
    let mut last = None;
    while let Some(j) = updates
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("lost the job's progress: {}", s.message()))?
    {
        if last.is_none() {
            eprintln!("job {} ({} of {}) {}", j.id, j.kind, j.client, j.state().label());
        }
        if j.state() == pb::JobState::Running && j.bytes_done > 0 {
            eprintln!("  {} files, {} bytes", j.files_done, j.bytes_done);
        }
        last = Some(j);
    }
    let Some(j) = last else {
        bail!("the server ended the job's stream without a word");
    };
    for m in &j.messages {
        eprintln!("  {m}");
    }
    match j.state() {
        pb::JobState::Succeeded | pb::JobState::Partial => {
            println!(
                "job {} {}: {} files, {} bytes{}",
                j.id,
                j.state().label(),
                j.files_done,
                j.bytes_done,
                if j.snapshot_id.is_empty() {
                    String::new()
                } else {
                    format!(", snapshot {}", &j.snapshot_id[..j.snapshot_id.len().min(8)])
                }
            );
            Ok(())
        }
        s => bail!("job {} {}", j.id, s.label()),
    }
}

/// Takes work from the server until `stop` is cancelled; then cancels the
/// jobs under way and returns once they have reported how they ended.
async fn run(
    state_dir: &Path,
    policy: work::Policy,
    kube: Option<kubernetes::Identity>,
    stop: CancellationToken,
) -> Result<()> {
    if let Some(id) = &kube {
        let now = chrono::Utc::now().timestamp();
        match load_state(state_dir) {
            Ok(st) if st.client == id.node && st.not_after > now => {}
            _ => kubernetes::enrol(state_dir, id).await?,
        }
    }
    let mut waits = reconnect_waits();
    // Jobs outlive the connection that brought them (see `session`).
    let jobs = TaskTracker::new();
    loop {
        if stop.is_cancelled() {
            jobs.close();
            jobs.wait().await;
            return Ok(());
        }
        // Read again each time: `backer-agent renew` may have replaced it.
        let mut st = load_state(state_dir)?;
        renew_if_due(state_dir, &mut st).await?;
        let mut registered = false;
        let ended = session(state_dir, &st, &policy, &mut registered, &jobs, &stop).await;
        // The server took this agent's connection: whatever ended it is a
        // new outage (a restart, say), not more of the last one, so the wait
        // starts again from the shortest. Without this, an agent whose server
        // restarted a few times waited half a minute to come back.
        if registered {
            waits = reconnect_waits();
        }
        let wait = waits.next().unwrap_or(MAX_RECONNECT_WAIT);
        if let Err(e) = ended {
            // Refusals are final: a revoked client must not hammer the server.
            if let Some(s) = e.downcast_ref::<tonic::Status>()
                && matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                )
            {
                if kube.is_some() {
                    // A refused identity is dead: the next start asks for a new one.
                    let _ = std::fs::remove_file(state_dir.join("agent.json"));
                }
                bail!("the server refused this agent: {}", s.message());
            }
            tracing::warn!(
                "connection to the server lost: {e:#}; retrying in {:.1} s",
                wait.as_secs_f32()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// One connection: say hello, then take work until the server hangs up.
/// `registered` turns true once the server has accepted the connection.
/// On `stop`, takes no more work, waits for `jobs` to end (they are
/// cancelled by the same token) and for the server to read their reports.
async fn session(
    state_dir: &Path,
    st: &AgentState,
    policy: &work::Policy,
    registered: &mut bool,
    jobs: &TaskTracker,
    stop: &CancellationToken,
) -> Result<()> {
    let mut c = client(state_dir, st).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(AgentReport {
        report: Some(Report::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            hostname: std::env::var("HOSTNAME").unwrap_or_default(),
        })),
    })
    .await
    .ok();
    let mut work = c
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(anyhow::Error::from)?
        .into_inner();
    *registered = true;
    tracing::info!(client = %st.client, server = %st.server, "connected");
    // A connection may last months: it ends, to be made again with a new
    // certificate, when renewal is due or the certificate was renewed by
    // `backer-agent renew`. Jobs under way carry on over the old connection.
    let cert = read(state_dir, "cert.pem").unwrap_or_default();
    let mut tick = tokio::time::interval(CERTIFICATE_CHECK);
    loop {
        tokio::select! {
            item = work.message() => match item.map_err(anyhow::Error::from)? {
                Some(item) => {
                    tracing::info!(job = %item.job_id, "job received");
                    jobs.spawn(work::run(c.clone(), item, tx.clone(), policy.clone(), stop.clone()));
                }
                None => break,
            },
            _ = tick.tick() => {
                if renewal_due(st) || read(state_dir, "cert.pem").is_ok_and(|now| now != cert) {
                    tracing::info!("reconnecting with a new certificate");
                    break;
                }
            }
            _ = stop.cancelled() => {
                tracing::info!("stopping: jobs under way are cancelled");
                jobs.close();
                // Work sent meanwhile is refused with the reason.
                let mut ended = std::pin::pin!(jobs.wait());
                loop {
                    tokio::select! {
                        _ = &mut ended => break,
                        item = work.message() => match item {
                            Ok(Some(item)) => {
                                let done = pb::JobDone {
                                    job_id: item.job_id,
                                    ok: false,
                                    messages: vec!["the agent is stopping (SIGTERM or Ctrl-C); run the job again".into()],
                                    snapshot_id: String::new(),
                                };
                                let _ = tx.send(AgentReport { report: Some(Report::Done(done)) }).await;
                            }
                            // The server went away: the jobs end on their own.
                            _ => {
                                ended.as_mut().await;
                                break;
                            }
                        },
                    }
                }
                // Our stream ends with the last job's sender; the server
                // reads every report before that end, then ends its own.
                drop(tx);
                let drained = async { while let Ok(Some(_)) = work.message().await {} };
                let _ = tokio::time::timeout(LAST_REPORTS, drained).await;
                return Ok(());
            }
        }
    }
    drop(tx);
    Ok(())
}
