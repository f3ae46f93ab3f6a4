//! The running server: its shared context and the listeners.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{CoreError, CoreResult};
use backer_proto::v1::WorkItem;
use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::Jobs;
use crate::state::{AdminCertFile, AdminRefusal, Registry, StateDir};
use crate::storage::Storage;
use backer_proto::ca::Ca;

/// Renew the server's own certificate when it has fewer days left than this.
const SERVER_RENEW_DAYS: i64 = 30;
/// How long a stop waits for calls under way (a Deployment gives 30 s).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the server's own tasks (schedules, reload, certificate watch)
/// get to end after a stop.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
/// How often the certificate's files are read again for a renewed one.
const CERT_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// An agent's open Work stream. Dropping it ends the stream.
#[derive(Debug)]
pub struct Connection {
    /// Tells this connection from a newer one of the same client.
    pub id: u64,
    pub since: i64,
    pub version: String,
    pub work: mpsc::Sender<WorkItem>,
}

pub struct Shared {
    config: RwLock<Config>,
    pub state: StateDir,
    pub ca: Ca,
    registry: Mutex<Registry>,
    pub connections: Mutex<HashMap<String, Connection>>,
    /// The certificate every handshake uses, reloaded when its files change.
    pub server_cert: Arc<crate::tls::ServerCert>,
    /// The data port actually bound (the configured one may be 0 in tests).
    data_port: std::sync::atomic::AtomicU16,
    pub storage: Storage,
    pub jobs: Jobs,
    /// Added to the system clock for schedules (tests start it elsewhere).
    clock_offset: chrono::TimeDelta,
    /// No TLS: agents name themselves (development only).
    pub insecure_plaintext: bool,
    /// Failed Login/Password attempts per peer, for both ports that take them.
    pub logins: crate::login::Throttle,
    /// The admin certificates issued, checked on every management call.
    pub admin_certs: AdminCertFile,
    pub metrics: crate::metrics::Metrics,
}

/// The operator's admin identity. It mints its certificate in memory from
/// the CA it keeps (operator/src/backer.rs, `ADMIN_DAYS`), so the server has
/// no record of it; see [`Shared::check_admin`].
pub const OPERATOR_ADMIN: &str = "backer-operator";
/// The longest an operator's certificate lives: its 2 days and the 5 minutes
/// of clock slack every certificate starts with, and a little more.
const OPERATOR_ADMIN_MAX_SECS: i64 = 2 * 86_400 + 600;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared(..)")
    }
}

impl Shared {
    /// Everything a server holds but its sockets: configuration, state
    /// directory, CA and certificate, repository and job record. `run`
    /// serves it; the core's tests call the job rules on it directly.
    pub async fn open(opts: &Options) -> Result<Arc<Shared>, StartError> {
        let config = Config::load(&opts.config)?;
        let state = StateDir::new(&opts.state_dir)?.with_pki(opts.pki_dir.clone());
        let ca = state.ca()?;
        let (cert, key, files) = server_certificate(&state, &ca, &config)?;
        let registry = state.load_registry()?;
        let server_cert = crate::tls::ServerCert::new(&cert, &key, Some(files))?;
        let storage = Storage::open(&config.repository, &state).await?;
        let jobs = Jobs::load(state.dir.join("jobs.json"), chrono::Utc::now().timestamp())?;
        let clock_offset = opts
            .clock_start
            .map(|t| t - chrono::Utc::now())
            .unwrap_or_default();
        let admin_certs = AdminCertFile::new(state.clone());
        Ok(Arc::new(Shared {
            config: RwLock::new(config),
            state,
            ca,
            registry: Mutex::new(registry),
            connections: Mutex::new(HashMap::new()),
            server_cert,
            data_port: Default::default(),
            storage,
            jobs,
            clock_offset,
            insecure_plaintext: opts.insecure_plaintext,
            logins: crate::login::Throttle::default(),
            admin_certs,
            metrics: Default::default(),
        }))
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock()
    }

    /// Changes the registry and writes it to disk before answering.
    pub fn update_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> CoreResult<R> {
        let mut reg = self.registry();
        let r = f(&mut reg);
        self.state
            .save_registry(&reg)
            .map_err(|source| CoreError::State {
                what: "save the client registry".into(),
                source,
            })?;
        Ok(r)
    }

    pub fn config(&self) -> Config {
        self.config.read().clone()
    }

    pub fn set_config(&self, c: Config) {
        *self.config.write() = c;
    }

    pub fn login(&self) -> Option<(String, String)> {
        self.config().login
    }

    /// May this admin certificate (verified by TLS against the CA) be used
    /// now? Only if the server recorded it when `backer-server admin-cert`
    /// issued it and it was not revoked since, with one exception: with the
    /// operator's PKI (`--pki-dir`), the operator's own unrecorded
    /// certificate, which lives at most two days. `admin-cert` refuses to
    /// issue that name, so no record ever stands for it.
    pub fn check_admin(&self, name: &str, serial: &[u8], lifetime_secs: i64) -> Result<(), AdminRefusal> {
        match self.admin_certs.check(name, serial) {
            Err(AdminRefusal::Unrecorded(_) | AdminRefusal::Unreadable(_))
                if self.state.pki.is_some()
                    && name == OPERATOR_ADMIN
                    && lifetime_secs <= OPERATOR_ADMIN_MAX_SECS =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// The server's clock, which schedules follow.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + self.clock_offset
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<String, Connection>> {
        self.connections.lock()
    }

    pub fn is_connected(&self, client: &str) -> bool {
        self.connections().contains_key(client)
    }

    /// Names of the connected clients. Lock order: `connections` before
    /// `registry`, never the other way.
    pub fn connected_clients(&self) -> std::collections::HashSet<String> {
        self.connections().keys().cloned().collect()
    }

    /// The id of `client`'s current connection, if any.
    pub fn connection_id(&self, client: &str) -> Option<u64> {
        self.connections().get(client).map(|c| c.id)
    }

    /// Where to send work for `client`'s agent, if it is connected.
    pub fn work_sender(&self, client: &str) -> Option<mpsc::Sender<WorkItem>> {
        self.connections().get(client).map(|c| c.work.clone())
    }

    /// When the server's certificate in use ends (unix seconds).
    pub fn server_not_after(&self) -> i64 {
        self.server_cert.not_after()
    }

    /// `host:port` agents use to reach the data port: the ExternalName and
    /// the ExternalPort when set (a NodePort or a load balancer's port),
    /// else the data port bound.
    pub fn data_address(&self) -> String {
        let c = self.config();
        format!(
            "{}:{}",
            c.external_name,
            c.external_port
                .unwrap_or(self.data_port.load(std::sync::atomic::Ordering::Relaxed))
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Ca(#[from] backer_proto::ca::CaError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// The operator's CA and server certificate (ca.pem, ca-key.pem,
    /// server.pem, server-key.pem), used as they are.
    pub pki_dir: Option<PathBuf>,
    /// Start the schedule clock at this time instead of now (for tests).
    pub clock_start: Option<chrono::DateTime<chrono::Utc>>,
    /// Serve management and data without TLS (development only).
    pub insecure_plaintext: bool,
}

/// What a started server listens on (ports may have been chosen by the OS).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub mgmt: SocketAddr,
    pub data: SocketAddr,
    pub rest: SocketAddr,
}

/// Loads everything, binds the ports, and serves until `shutdown` resolves.
/// `on_bound` learns the addresses once listening.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(Bound),
) -> Result<(), StartError> {
    let shared = Shared::open(&opts).await?;
    let server_cert = Arc::clone(&shared.server_cert);
    let tls = crate::tls::server_config(&shared.ca.cert_pem, Arc::clone(&server_cert))?;
    let rest_tls = crate::tls::rest_config(Arc::clone(&server_cert))?;
    let config = shared.config();
    let bind = |port: u16| {
        let addr = format!("{}:{}", config.listen_address, port);
        let addr2 = addr.clone();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|source| StartError::Listen { addr: addr2, source })
        }
    };
    let mgmt_listener = bind(config.mgmt_port).await?;
    let data_listener = bind(config.data_port).await?;
    let rest_listener = bind(config.rest_api_port).await?;
    let bound = Bound {
        mgmt: mgmt_listener.local_addr().map_err(|source| StartError::Listen {
            addr: "management port".into(),
            source,
        })?,
        data: data_listener.local_addr().map_err(|source| StartError::Listen {
            addr: "data port".into(),
            source,
        })?,
        rest: rest_listener.local_addr().map_err(|source| StartError::Listen {
            addr: "REST port".into(),
            source,
        })?,
    };
    shared
        .data_port
        .store(bound.data.port(), std::sync::atomic::Ordering::Relaxed);
    let config_path = opts.config.clone();
    // The server's own tasks end on `stop` and are joined before `run`
    // returns: no schedule fires, and no reload happens, after a stop.
    let stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    background.spawn(reload_on_hangup(Arc::clone(&shared), config_path, stop.clone()));
    // Kubernetes updates a mounted Secret within a minute or two of a
    // change; checking every few seconds costs two small reads.
    background.spawn(Arc::clone(&server_cert).watch(CERT_CHECK, stop.clone()));
    background.spawn(crate::runner::run_schedules(Arc::clone(&shared), stop.clone()));

    let shutdown = {
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
            // Agents' Work streams never end by themselves, and a graceful
            // stop waits for every call under way: end them (the registry of
            // connections holds their only senders). The agents reconnect
            // to whoever serves next.
            shared.connections().clear();
        }
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let stopped = shutdown.clone();
    let mgmt = tonic::transport::Server::builder()
        .add_service(crate::grpc::management::service(Arc::clone(&shared)));
    // Pings find a peer that vanished (a cut network, a powered-off host)
    // within a minute: its Work stream ends and its jobs fail with the reason.
    let data = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .add_service(crate::grpc::enrollment::service(Arc::clone(&shared)))
        .add_service(crate::grpc::agent::service(Arc::clone(&shared)));
    type Serving =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let (mgmt, data): (Serving, Serving) =
        if shared.insecure_plaintext {
            warn_plaintext();
            (
                Box::pin(mgmt.serve_with_incoming_shutdown(
                    crate::tls::plain_incoming(mgmt_listener),
                    shutdown.clone(),
                )),
                Box::pin(data.serve_with_incoming_shutdown(
                    crate::tls::plain_incoming(data_listener),
                    shutdown.clone(),
                )),
            )
        } else {
            (
                Box::pin(mgmt.serve_with_incoming_shutdown(
                    crate::tls::incoming(mgmt_listener, Arc::clone(&tls)),
                    shutdown.clone(),
                )),
                Box::pin(data.serve_with_incoming_shutdown(
                    crate::tls::incoming(data_listener, tls),
                    shutdown.clone(),
                )),
            )
        };
    if shared.insecure_plaintext {
        // Repeated, so nobody mistakes a development server for a real one.
        let stop = stop.clone();
        background.spawn(async move {
            while stop
                .run_until_cancelled(tokio::time::sleep(std::time::Duration::from_secs(600)))
                .await
                .is_some()
            {
                warn_plaintext();
            }
        });
    }
    let rest = crate::rest::serve(
        Arc::clone(&shared),
        rest_listener,
        (!shared.insecure_plaintext).then_some(rest_tls),
        shutdown,
    );
    on_bound(bound);
    tracing::info!(mgmt = %bound.mgmt, data = %bound.data, rest = %bound.rest, tls = !shared.insecure_plaintext, "backer-server listening");
    // Uploads under way get a moment to end; after that the stop goes on
    // (their jobs are marked failed at the next start, and no snapshot of
    // theirs was written).
    let served = tokio::select! {
        r = async { tokio::join!(mgmt, data, rest) } => Some(r),
        _ = async { stopped.await; tokio::time::sleep(STOP_GRACE).await } => {
            tracing::warn!("calls still under way {} s after the stop: stopping anyway", STOP_GRACE.as_secs());
            None
        }
    };
    // However the listeners ended, the server's own tasks stop with them;
    // one busy past TASKS_GRACE (a scheduled launch waiting for a lock) is
    // abandoned, as the process is about to end.
    stop.cancel();
    let joined = tokio::time::timeout(TASKS_GRACE, async {
        while background.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!(
            "the server's own tasks still busy {} s after the stop: abandoned",
            TASKS_GRACE.as_secs()
        );
        background.abort_all();
    }
    let Some((a, b, c)) = served else {
        return Ok(());
    };
    a?;
    b?;
    c.map_err(|source| StartError::Listen {
        addr: "REST port".into(),
        source,
    })?;
    Ok(())
}

fn warn_plaintext() {
    tracing::warn!(
        "INSECURE: --insecure-plaintext is on. Management, data and the REST port (with the \
         Login/Password its JSON views take) travel in clear text, agents are identified by \
         what they claim, and anyone who can reach these ports can act as any client. For \
         development only; never on a network you do not own."
    );
}

/// The server's certificate from the state directory, issued again when
/// missing, close to expiry, or not naming the configured external name;
/// with the operator's PKI, from there as it is. Returns the certificate,
/// its key and their files (where to read a renewed pair from).
fn server_certificate(
    state: &StateDir,
    ca: &Ca,
    config: &Config,
) -> Result<(String, String, (PathBuf, PathBuf)), StartError> {
    if let Some(pki) = &state.pki {
        // The operator renews it in the Secret; `ServerCert::watch` picks
        // the new one up from the mounted files.
        let cert = StateDir::pki_file(pki, "server.pem")?;
        let key = StateDir::pki_file(pki, "server-key.pem")?;
        return Ok((cert, key, (pki.join("server.pem"), pki.join("server-key.pem"))));
    }
    let cert_path = state.dir.join("server.pem");
    let key_path = state.dir.join("server-key.pem");
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) && let Some((names, not_after)) = backer_proto::ca::describe(&cert)
        && names.contains(&config.external_name)
        && not_after > chrono::Utc::now().timestamp() + SERVER_RENEW_DAYS * 86_400
    {
        return Ok((cert, key, (cert_path, key_path)));
    }
    let issued = ca.issue_server(std::slice::from_ref(&config.external_name))?;
    let key = issued.key_pem.clone().unwrap_or_default();
    state.write("server-key.pem", &key, true)?;
    state.write("server.pem", &issued.cert_pem, false)?;
    Ok((issued.cert_pem, key, (cert_path, key_path)))
}

/// SIGHUP reloads the configuration; a bad one is reported and the old one kept.
async fn reload_on_hangup(shared: Arc<Shared>, path: PathBuf, stop: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("failed to install the SIGHUP handler; reload by restarting");
        return;
    };
    while let Some(Some(())) = stop.run_until_cancelled(hup.recv()).await {
        match Config::load(&path) {
            Ok(c) => {
                tracing::info!(clients = c.clients.len(), "configuration reloaded");
                shared.set_config(c);
            }
            Err(e) => tracing::error!("kept the previous configuration: {e}"),
        }
    }
}
