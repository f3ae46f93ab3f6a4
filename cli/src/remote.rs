//! Commands against a backer-server's management interface (mutual TLS with
//! an admin certificate, or TLS with the server's Login/Password).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use backer_proto::v1::management_client::ManagementClient;
use backer_proto::v1::{
    AddClientRequest, CertStatusRequest, Client, Job, JobState, ListAdminCertsRequest, ListClientsRequest,
    ListFilesRequest, ListJobsRequest, ListSnapshotsRequest, RemoveClientRequest, RevokeAdminCertRequest,
    StartBackupRequest, StartRestoreRequest, WatchJobRequest,
};
use base64::Engine;
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::{Global, output};

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's management address, host:port
    #[arg(long, env = "BACKER_SERVER", global = true)]
    pub server: Option<String>,
    /// CA certificate that signed the server's certificate
    #[arg(long, env = "BACKER_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Admin certificate (from `backer-server admin-cert`)
    #[arg(long, env = "BACKER_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Admin certificate's key
    #[arg(long, env = "BACKER_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The server's Login (its Password comes from BACKER_SERVER_PASSWORD)
    #[arg(long, env = "BACKER_LOGIN", global = true)]
    pub login: Option<String>,
    /// DEVELOPMENT ONLY: talk to a server run with --insecure-plaintext (no TLS;
    /// the login travels in clear text)
    #[arg(long, global = true, requires = "login", conflicts_with_all = ["ca", "cert"])]
    pub insecure_plaintext: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// List the clients, their enrolment and connection
    List,
    /// Add a client; prints its one-time enrolment token
    Add(AddArgs),
    /// Issue a new token for an existing client (a rebuilt host); its current certificate stops working
    Reenroll(AddArgs),
    /// Remove a client: its certificate is refused from now on
    Remove { name: String },
}

#[derive(Args, Debug)]
pub struct AddArgs {
    name: String,
    /// Write an enrolment bundle (server address, CA, token) for `backer-agent enroll --bundle`
    #[arg(long, value_name = "FILE")]
    bundle_out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Expiry of the CA, the server's and every client's certificate
    Status,
    /// The admin certificates the server issued (`backer-server admin-cert`), revoked or not
    Admins,
    /// Revoke every certificate of an admin: the server refuses them from their next call
    RevokeAdmin {
        /// The admin's name, as `backer cert admins` lists it
        name: String,
    },
}

#[derive(Clone)]
struct BasicAuth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BasicAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Mgmt = ManagementClient<tonic::service::interceptor::InterceptedService<Channel, BasicAuth>>;

fn server_address(s: &ServerArgs) -> Result<&str> {
    s.server
        .as_deref()
        .ok_or_else(|| anyhow!("no server given: use --server HOST:PORT or set BACKER_SERVER"))
}

async fn connect(s: &ServerArgs) -> Result<Mgmt> {
    let server = server_address(s)?;
    if s.insecure_plaintext {
        eprintln!("warning: INSECURE plain-text connection (--insecure-plaintext); development only");
        let channel = backer_proto::connect_plain(server)
            .await
            .with_context(|| format!("failed to connect to {server}"))?;
        return Ok(ManagementClient::with_interceptor(channel, basic_auth(s)?));
    }
    let ca_path =
        s.ca.as_ref()
            .ok_or_else(|| anyhow!("no CA given: use --ca FILE (the server's ca.pem) or set BACKER_CA"))?;
    let ca =
        std::fs::read_to_string(ca_path).with_context(|| format!("failed to read {}", ca_path.display()))?;
    let identity = match (&s.cert, &s.key) {
        (Some(c), Some(k)) => Some((
            std::fs::read_to_string(c).with_context(|| format!("failed to read {}", c.display()))?,
            std::fs::read_to_string(k).with_context(|| format!("failed to read {}", k.display()))?,
        )),
        _ => None,
    };
    let auth = match &identity {
        Some(_) => BasicAuth(None),
        None => basic_auth(s)?,
    };
    let channel = backer_proto::connect(
        server,
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
    )
    .await
    .with_context(|| format!("failed to connect to {server}"))?;
    Ok(ManagementClient::with_interceptor(channel, auth))
}

/// The server's Login/Password as an authorization header.
fn basic_auth(s: &ServerArgs) -> Result<BasicAuth> {
    let Some(login) = &s.login else {
        bail!("no credentials: give --cert/--key (admin certificate) or --login");
    };
    let pw = std::env::var("BACKER_SERVER_PASSWORD")
        .map_err(|_| anyhow!("--login needs the password in BACKER_SERVER_PASSWORD"))?;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{pw}"));
    Ok(BasicAuth(Some(format!("Basic {token}").parse().map_err(
        |_| anyhow!("the login contains characters a header cannot hold"),
    )?)))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    if lost_connection(&s) {
        return anyhow!("lost the connection to the server ({})", s.message());
    }
    anyhow!("the server said: {}", s.message())
}

/// Whether a failed call means the connection broke (the server restarted
/// or the network failed) rather than that the server refused: a status the
/// server sends carries no source error, one made here from a broken
/// connection carries the transport's error.
fn lost_connection(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some()
        || s.message().starts_with("h2 protocol error")
        || s.message().starts_with("transport error")
}

/// What to say when the connection breaks while a job is followed: the job
/// itself goes on (or was failed by a restart), so say where to look.
fn lost_job(server: &str, job: &str) -> anyhow::Error {
    anyhow!(
        "lost the connection to the server at {server} while following job {job} (it may have restarted); \
         `backer jobs` shows how the job ended"
    )
}

/// Why a job did not succeed, from its record.
fn failure(j: &Job) -> anyhow::Error {
    match j.messages.as_slice() {
        [] => anyhow!(
            "job {} {}: the server recorded no reason (`backer jobs --json` shows the job)",
            j.id,
            j.state().label()
        ),
        [one] => anyhow!("job {} {}: {one}", j.id, j.state().label()),
        many => anyhow!("job {} {}:\n  {}", j.id, j.state().label(), many.join("\n  ")),
    }
}

fn when(t: i64) -> String {
    if t == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct ClientJson<'a> {
    name: &'a str,
    state: &'a str,
    connected: bool,
    cert_not_after: i64,
    agent_version: &'a str,
}

fn print_clients(g: &Global, clients: &[Client]) -> Result<()> {
    if g.json {
        let v: Vec<ClientJson> = clients
            .iter()
            .map(|c| ClientJson {
                name: &c.name,
                state: c.state().label(),
                connected: c.connected,
                cert_not_after: c.cert_not_after,
                agent_version: &c.agent_version,
            })
            .collect();
        outln!("{}", serde_json::to_string(&v)?)?;
        return Ok(());
    }
    outln!(
        "{:<24} {:<11} {:<10} {:<17} version",
        "client",
        "state",
        "connected",
        "cert expires"
    )?;
    for c in clients {
        outln!(
            "{:<24} {:<11} {:<10} {:<17} {}",
            c.name,
            c.state().label(),
            if c.connected { "yes" } else { "no" },
            when(c.cert_not_after),
            c.agent_version
        )?;
    }
    Ok(())
}

pub async fn clients(g: &Global, s: &ServerArgs, cmd: Option<ClientsCommand>) -> Result<u8> {
    let mut m = connect(s).await?;
    match cmd.unwrap_or(ClientsCommand::List) {
        ClientsCommand::List => {
            let r = m
                .list_clients(ListClientsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print_clients(g, &r.clients)?;
        }
        ClientsCommand::Add(a) => add(g, &mut m, a, false).await?,
        ClientsCommand::Reenroll(a) => add(g, &mut m, a, true).await?,
        ClientsCommand::Remove { name } => {
            m.remove_client(RemoveClientRequest { name: name.clone() })
                .await
                .map_err(status_err)?;
            outln!("removed {name}: its certificate is refused from now on")?;
        }
    }
    Ok(0)
}

async fn add(g: &Global, m: &mut Mgmt, a: AddArgs, reenroll: bool) -> Result<()> {
    let r = m
        .add_client(AddClientRequest {
            name: a.name.clone(),
            reenroll,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if let Some(path) = &a.bundle_out {
        let bundle = serde_json::json!({
            "server": r.server_address,
            "client": a.name,
            "token": r.token,
            "ca_pem": r.ca_pem,
        });
        let data = serde_json::to_vec_pretty(&bundle)?;
        write_secret(path, &data)?;
    }
    if g.json {
        outln!(
            "{}",
            serde_json::json!({"client": a.name, "token": r.token, "server": r.server_address, "expires": r.token_expires})
        )?;
    } else {
        outln!(
            "enrolment token for {} (single use, expires {}):",
            a.name,
            when(r.token_expires)
        )?;
        outln!("{}", r.token)?;
        match &a.bundle_out {
            Some(p) => outln!(
                "bundle written to {}; on the host: backer-agent enroll --bundle {}",
                p.display(),
                p.display()
            )?,
            None => outln!(
                "server: {} (use --bundle-out FILE for a file the agent reads)",
                r.server_address
            )?,
        }
    }
    Ok(())
}

fn write_secret(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

pub async fn cert(g: &Global, s: &ServerArgs, cmd: CertCommand) -> Result<u8> {
    let mut m = connect(s).await?;
    match cmd {
        CertCommand::Status => cert_status(g, &mut m).await,
        CertCommand::Admins => admin_certs(g, &mut m).await,
        CertCommand::RevokeAdmin { name } => {
            let r = m
                .revoke_admin_cert(RevokeAdminCertRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if g.json {
                outln!("{}", serde_json::json!({"admin": name, "revoked": r.revoked}))?;
            } else {
                outln!(
                    "revoked {} admin certificate(s) of {name}: the server refuses them from their next call",
                    r.revoked
                )?;
            }
            Ok(0)
        }
    }
}

async fn cert_status(g: &Global, m: &mut Mgmt) -> Result<u8> {
    let r = m
        .cert_status(CertStatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if g.json {
        outln!(
            "{}",
            serde_json::json!({"ca_not_after": r.ca_not_after, "server_not_after": r.server_not_after})
        )?;
        return Ok(0);
    }
    outln!("CA certificate expires:     {}", when(r.ca_not_after))?;
    outln!("server certificate expires: {}", when(r.server_not_after))?;
    print_clients(g, &r.clients)?;
    Ok(0)
}

async fn admin_certs(g: &Global, m: &mut Mgmt) -> Result<u8> {
    let r = m
        .list_admin_certs(ListAdminCertsRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if g.json {
        let v: Vec<_> = r
            .certs
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name, "serial": c.serial, "issued": c.issued,
                    "not_after": c.not_after, "revoked": (c.revoked != 0).then_some(c.revoked),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string(&v)?)?;
        return Ok(0);
    }
    outln!(
        "{:<24} {:<34} {:<17} {:<17} revoked",
        "admin",
        "serial",
        "issued",
        "expires"
    )?;
    for c in &r.certs {
        outln!(
            "{:<24} {:<34} {:<17} {:<17} {}",
            c.name,
            c.serial,
            when(c.issued),
            when(c.not_after),
            when(c.revoked)
        )?;
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs of this client
    client: Option<String>,
}

fn print_job_line(j: &Job) -> std::io::Result<()> {
    let progress = if j.bytes_total > 0 {
        format!(
            "{} files, {} of {}",
            j.files_done,
            output::size(j.bytes_done),
            output::size(j.bytes_total)
        )
    } else {
        format!("{} files, {}", j.files_done, output::size(j.bytes_done))
    };
    outln!(
        "{:<20} {:<8} {:<16} {:<10} {:<17} {:<10} {}",
        j.id,
        j.kind,
        j.client,
        j.state().label(),
        when(j.created),
        short(&j.snapshot_id),
        progress
    )
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn job_json(j: &Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id, "kind": j.kind, "client": j.client, "state": j.state().label(),
        "created": j.created, "finished": j.finished,
        "files_done": j.files_done, "bytes_done": j.bytes_done,
        "files_total": j.files_total, "bytes_total": j.bytes_total,
        "snapshot": j.snapshot_id, "messages": j.messages, "origin": j.origin,
    })
}

pub async fn jobs(g: &Global, s: &ServerArgs, a: JobsArgs) -> Result<u8> {
    let mut m = connect(s).await?;
    let r = m
        .list_jobs(ListJobsRequest {
            client: a.client.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if g.json {
        let v: Vec<_> = r.jobs.iter().map(job_json).collect();
        outln!("{}", serde_json::to_string(&v)?)?;
        return Ok(0);
    }
    outln!(
        "{:<20} {:<8} {:<16} {:<10} {:<17} {:<10} progress",
        "job",
        "kind",
        "client",
        "state",
        "created",
        "snapshot"
    )?;
    for j in &r.jobs {
        print_job_line(j)?;
    }
    Ok(0)
}

/// Prints a started job, or follows it to its end with a progress bar.
/// Exit code: 0 succeeded, EXIT_INCOMPLETE partial, an error that gives the
/// reason when failed or when the connection to `server` broke.
async fn follow(g: &Global, server: &str, m: &mut Mgmt, job: Job, wait: bool) -> Result<u8> {
    if !wait {
        if g.json {
            outln!("{}", job_json(&job))?;
        } else {
            outln!(
                "job {} started: {} of {} (follow it with `backer jobs` or use --wait)",
                job.id,
                job.kind,
                job.client
            )?;
        }
        return Ok(0);
    }
    let pb = output::bar(g, &job.kind);
    let id = job.id.clone();
    let lost = |s: tonic::Status| {
        if lost_connection(&s) {
            lost_job(server, &id)
        } else {
            status_err(s)
        }
    };
    let mut updates = m
        .watch_job(WatchJobRequest { id: job.id.clone() })
        .await
        .map_err(lost)?
        .into_inner();
    let mut last = job;
    loop {
        let next = updates.message().await;
        let j = match next {
            Ok(Some(j)) => j,
            Ok(None) => break,
            Err(s) => {
                pb.finish_and_clear();
                return Err(lost(s));
            }
        };
        pb.set_length(j.bytes_total.max(j.bytes_done));
        pb.set_position(j.bytes_done);
        pb.set_message(format!("{} files", j.files_done));
        last = j;
    }
    pb.finish_and_clear();
    if !last.state().is_final() {
        // The stream ended before the job did: the server went away cleanly.
        return Err(lost_job(server, &last.id));
    }
    if g.json {
        outln!("{}", job_json(&last))?;
    } else {
        // A failure's reasons are the error itself, below.
        if last.state() != JobState::Failed {
            for msg in &last.messages {
                eprintln!("  {msg}");
            }
        }
        outln!(
            "job {} {}: {} files, {}{}",
            last.id,
            last.state().label(),
            last.files_done,
            output::size(last.bytes_done),
            if last.snapshot_id.is_empty() {
                String::new()
            } else {
                format!(", snapshot {}", short(&last.snapshot_id))
            }
        )?;
    }
    match last.state() {
        JobState::Succeeded => Ok(0),
        JobState::Partial => Ok(crate::EXIT_INCOMPLETE),
        _ => Err(failure(&last)),
    }
}

pub async fn backup(g: &Global, s: &ServerArgs, a: crate::local::BackupArgs) -> Result<u8> {
    let mut m = connect(s).await?;
    let mut args = a.paths.into_iter().map(|p| p.to_string_lossy().into_owned());
    let client = args
        .next()
        .ok_or_else(|| anyhow!("name the client to back up: backer backup CLIENT [PATH]..."))?;
    let job = m
        .start_backup(StartBackupRequest {
            client,
            paths: args.collect(),
            excludes: a.excludes,
            tags: a.tags,
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    follow(g, server_address(s)?, &mut m, job, a.wait).await
}

pub async fn restore(g: &Global, s: &ServerArgs, a: crate::local::RestoreArgs) -> Result<u8> {
    let mut m = connect(s).await?;
    let job = m
        .start_restore(StartRestoreRequest {
            snapshot: a.snapshot,
            client: a.client.unwrap_or_default(),
            to_client: a.to_client.unwrap_or_default(),
            target: a.target.to_string_lossy().into_owned(),
            includes: a.includes,
            overwrite: a.overwrite,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    follow(g, server_address(s)?, &mut m, job, a.wait).await
}

pub async fn snapshots(g: &Global, s: &ServerArgs, a: crate::local::SnapshotsArgs) -> Result<u8> {
    let mut m = connect(s).await?;
    let r = m
        .list_snapshots(ListSnapshotsRequest {
            client: a.client.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if g.json {
        let v: Vec<_> = r
            .snapshots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "client": s.client, "time": s.time, "paths": s.paths,
                    "tags": s.tags, "files": s.files, "bytes": s.bytes, "partial": s.partial,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string(&v)?)?;
        return Ok(0);
    }
    outln!(
        "{:<10} {:<17} {:<16} {:>8} {:>11}  paths",
        "id",
        "time",
        "client",
        "files",
        "size"
    )?;
    for s in &r.snapshots {
        outln!(
            "{:<10} {:<17} {:<16} {:>8} {:>11}  {}{}",
            short(&s.id),
            when(s.time),
            s.client,
            s.files,
            output::size(s.bytes),
            s.paths.join(" "),
            if s.partial { " (partial)" } else { "" }
        )?;
    }
    Ok(0)
}

pub async fn ls(g: &Global, s: &ServerArgs, a: crate::local::LsArgs) -> Result<u8> {
    let mut m = connect(s).await?;
    let mut entries = m
        .list_files(ListFilesRequest {
            snapshot: a.snapshot,
            client: a.client.unwrap_or_default(),
            path: a.path.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    use std::io::Write;
    // Not a `StdoutLock`: that would hold stdout across the stream's awaits.
    let mut out = std::io::BufWriter::new(std::io::stdout());
    while let Some(e) = entries.message().await.map_err(status_err)? {
        if g.json {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({"path": e.path, "kind": e.kind, "mode": e.mode, "size": e.size, "mtime": e.mtime}),
            )?;
            writeln!(out)?;
        } else if a.long {
            writeln!(
                out,
                "{:<8} {:o} {:>12} {} {}",
                e.kind,
                e.mode,
                e.size,
                when(e.mtime),
                e.path
            )?;
        } else {
            writeln!(out, "{}", e.path)?;
        }
    }
    out.flush()?;
    Ok(0)
}
