//! Commands against a backer-server's management interface (mutual TLS with
//! an admin certificate, or TLS with the server's Login/Password).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use backer_proto::v1::management_client::ManagementClient;
use backer_proto::v1::{
    AddClientRequest, CertStatusRequest, Client, ListClientsRequest, RemoveClientRequest,
};
use base64::Engine;
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::Global;

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

async fn connect(s: &ServerArgs) -> Result<Mgmt> {
    let server = s
        .server
        .as_deref()
        .ok_or_else(|| anyhow!("no server given: use --server HOST:PORT or set BACKER_SERVER"))?;
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
    let auth = match (&identity, &s.login) {
        (Some(_), _) => BasicAuth(None),
        (None, Some(login)) => {
            let pw = std::env::var("BACKER_SERVER_PASSWORD")
                .map_err(|_| anyhow!("--login needs the password in BACKER_SERVER_PASSWORD"))?;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{pw}"));
            BasicAuth(Some(format!("Basic {token}").parse().map_err(|_| {
                anyhow!("the login contains characters a header cannot hold")
            })?))
        }
        (None, None) => bail!("no credentials: give --cert/--key (admin certificate) or --login"),
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

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("the server said: {}", s.message())
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
                state: &c.state,
                connected: c.connected,
                cert_not_after: c.cert_not_after,
                agent_version: &c.agent_version,
            })
            .collect();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<11} {:<10} {:<17} version",
        "client", "state", "connected", "cert expires"
    );
    for c in clients {
        println!(
            "{:<24} {:<11} {:<10} {:<17} {}",
            c.name,
            c.state,
            if c.connected { "yes" } else { "no" },
            when(c.cert_not_after),
            c.agent_version
        );
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
            println!("removed {name}: its certificate is refused from now on");
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
        println!(
            "{}",
            serde_json::json!({"client": a.name, "token": r.token, "server": r.server_address, "expires": r.token_expires})
        );
    } else {
        println!(
            "enrolment token for {} (single use, expires {}):",
            a.name,
            when(r.token_expires)
        );
        println!("{}", r.token);
        match &a.bundle_out {
            Some(p) => println!(
                "bundle written to {}; on the host: backer-agent enroll --bundle {}",
                p.display(),
                p.display()
            ),
            None => println!(
                "server: {} (use --bundle-out FILE for a file the agent reads)",
                r.server_address
            ),
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

pub async fn cert(g: &Global, s: &ServerArgs, _cmd: CertCommand) -> Result<u8> {
    let mut m = connect(s).await?;
    let r = m
        .cert_status(CertStatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if g.json {
        println!(
            "{}",
            serde_json::json!({"ca_not_after": r.ca_not_after, "server_not_after": r.server_not_after})
        );
        return Ok(0);
    }
    println!("CA certificate expires:     {}", when(r.ca_not_after));
    println!("server certificate expires: {}", when(r.server_not_after));
    print_clients(g, &r.clients)?;
    Ok(0)
}
