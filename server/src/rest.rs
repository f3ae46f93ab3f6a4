//! The REST port: liveness and readiness for supervisors and Kubernetes
//! probes, Prometheus metrics, and a read-only JSON view of clients, jobs and
//! snapshots. Served over TLS 1.3 with the server's certificate (plain HTTP
//! only under `--insecure-plaintext`), without client certificates since
//! probes and scrapers rarely have one: probes and metrics name nothing; the
//! JSON views name clients and paths, so they answer only to the server's
//! Login/Password (throttled per peer, see `login`), and not at all when none
//! is configured.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::login::LoginError;
use crate::server::Shared;
use crate::state::ClientState;

/// Who is calling: the peer's address, for the login throttle and the log.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// The REST port's connections after their TLS handshake.
pub struct TlsListener {
    connections: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            connections: crate::tls::accept(listener, config),
            local,
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(c) => c,
            // The accept loop ends only with the runtime: wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves the REST port until `shutdown`: over TLS with `tls`, or in plain
/// HTTP when it is `None` (`--insecure-plaintext`).
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(shared).into_make_service_with_connect_info::<Peer>();
    match tls {
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/snapshots", get(snapshots))
        .with_state(shared)
}

/// Ready once the state is loaded and the certificates are in date.
async fn ready(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.server_not_after() <= chrono::Utc::now().timestamp() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server certificate has expired\n",
        );
    }
    (StatusCode::OK, "ready\n")
}

/// The JSON views' gate: HTTP basic with the server's Login/Password,
/// throttled per peer like the management port. The answer to give instead
/// of the view, or `None` when the caller may see it.
fn refusal(s: &Shared, peer: SocketAddr, headers: &HeaderMap) -> Option<axum::response::Response> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let e = crate::login::check(&s.logins, s.login().as_ref(), Some(peer), header, "rest").err()?;
    Some(match e {
        LoginError::NotConfigured => (
            StatusCode::NOT_FOUND,
            "the JSON views need [server] Login and Password in the configuration\n",
        )
            .into_response(),
        LoginError::Throttled { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.as_secs().max(1).to_string())],
            format!("{e}\n"),
        )
            .into_response(),
        LoginError::Missing | LoginError::Malformed | LoginError::Wrong => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"backer\"")],
            "the server's Login and Password are required\n",
        )
            .into_response(),
    })
}

async fn clients(
    State(s): State<Arc<Shared>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(no) = refusal(&s, peer, &headers) {
        return no;
    }
    // Connections first, then the registry: the order every other reader
    // takes them in, so two readers never wait on each other.
    let connected = s.connected_clients();
    let reg = s.registry();
    let list: Vec<_> = reg
        .clients
        .iter()
        .map(|(name, r)| {
            serde_json::json!({
                "name": name,
                "state": r.state,
                "connected": connected.contains(name),
                "cert_not_after": r.cert_not_after,
            })
        })
        .collect();
    json(&list)
}

async fn jobs(
    State(s): State<Arc<Shared>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(no) = refusal(&s, peer, &headers) {
        return no;
    }
    json(&s.jobs.list(None))
}

async fn snapshots(
    State(s): State<Arc<Shared>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(no) = refusal(&s, peer, &headers) {
        return no;
    }
    match s.storage.repo().snapshots().await {
        Ok(list) => json(&list),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed to list snapshots: {e}\n"),
        )
            .into_response(),
    }
}

fn json<T: serde::Serialize>(v: &T) -> axum::response::Response {
    match serde_json::to_string(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to encode: {e}\n"),
        )
            .into_response(),
    }
}

/// The state at this scrape, for [`crate::metrics::Metrics::render`].
async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut o = crate::metrics::Observed {
        server_not_after: s.server_not_after(),
        ..Default::default()
    };
    for r in s.registry().clients.values() {
        match r.state {
            ClientState::Pending => o.pending += 1,
            ClientState::Enrolled => {
                o.enrolled += 1;
                if let Some(t) = r.cert_not_after {
                    o.soonest_client_expiry = Some(o.soonest_client_expiry.map_or(t, |s: i64| s.min(t)));
                }
            }
            ClientState::Revoked => o.revoked += 1,
        }
    }
    o.connected = s.connections.lock().len() as i64;
    for j in s.jobs.list(None) {
        o.jobs.push((j.kind, j.state));
        if j.kind == crate::jobs::Kind::Backup
            && matches!(
                j.state,
                crate::jobs::JobState::Succeeded | crate::jobs::JobState::Partial
            )
        {
            o.backup_bytes += j.bytes_done;
            o.backup_new_bytes += j.new_bytes;
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(&o),
    )
}
