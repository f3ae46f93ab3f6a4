//! The REST port: liveness and readiness for supervisors and Kubernetes
//! probes, Prometheus metrics, and a read-only JSON view of clients, jobs and
//! snapshots. Served over TLS 1.3 with the server's certificate (plain HTTP
//! only under `--insecure-plaintext`), without client certificates since
//! probes and scrapers rarely have one: probes and metrics name nothing; the
//! JSON views name clients and paths, so they answer only to the server's
//! Login/Password (throttled per peer, see `login`), and not at all when none
//! is configured.

use std::fmt::Write;
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

/// Prometheus text format, version 0.0.4.
async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let (mut pending, mut enrolled, mut revoked) = (0, 0, 0);
    let mut soonest_client_expiry: Option<i64> = None;
    for r in s.registry().clients.values() {
        match r.state {
            ClientState::Pending => pending += 1,
            ClientState::Enrolled => {
                enrolled += 1;
                if let Some(t) = r.cert_not_after {
                    soonest_client_expiry = Some(soonest_client_expiry.map_or(t, |s: i64| s.min(t)));
                }
            }
            ClientState::Revoked => revoked += 1,
        }
    }
    let connected = s.connections.lock().len();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP backer_clients Clients known to the server, by enrolment state."
    );
    let _ = writeln!(out, "# TYPE backer_clients gauge");
    for (state, n) in [("pending", pending), ("enrolled", enrolled), ("revoked", revoked)] {
        let _ = writeln!(out, "backer_clients{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP backer_agents_connected Agents with an open work connection."
    );
    let _ = writeln!(out, "# TYPE backer_agents_connected gauge");
    let _ = writeln!(out, "backer_agents_connected {connected}");
    let _ = writeln!(
        out,
        "# HELP backer_certificate_expiry_timestamp_seconds When a certificate expires (Unix time)."
    );
    let _ = writeln!(out, "# TYPE backer_certificate_expiry_timestamp_seconds gauge");
    let _ = writeln!(
        out,
        "backer_certificate_expiry_timestamp_seconds{{kind=\"server\"}} {}",
        s.server_not_after()
    );
    if let Some(t) = soonest_client_expiry {
        let _ = writeln!(
            out,
            "backer_certificate_expiry_timestamp_seconds{{kind=\"client_soonest\"}} {t}"
        );
    }
    job_metrics(&s, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// Counts and durations of the recorded jobs, and what backups read and stored.
fn job_metrics(s: &Shared, out: &mut String) {
    use std::collections::BTreeMap;
    let mut count: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    let mut duration: BTreeMap<&'static str, (f64, u64)> = BTreeMap::new();
    let (mut read, mut new) = (0u64, 0u64);
    for j in s.jobs.list(None) {
        let kind = match j.kind {
            crate::jobs::Kind::Backup => "backup",
            crate::jobs::Kind::Restore => "restore",
        };
        *count.entry((kind, j.state.as_str())).or_default() += 1;
        if j.state.is_final() && j.finished >= j.created {
            let d = duration.entry(kind).or_default();
            d.0 += (j.finished - j.created) as f64;
            d.1 += 1;
        }
        if kind == "backup"
            && matches!(
                j.state,
                crate::jobs::JobState::Succeeded | crate::jobs::JobState::Partial
            )
        {
            read += j.bytes_done;
            new += j.new_bytes;
        }
    }
    let _ = writeln!(
        out,
        "# HELP backer_jobs Jobs in the server's record, by kind and state."
    );
    let _ = writeln!(out, "# TYPE backer_jobs gauge");
    for ((kind, state), n) in &count {
        let _ = writeln!(out, "backer_jobs{{kind=\"{kind}\",state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP backer_job_duration_seconds How long finished jobs took."
    );
    let _ = writeln!(out, "# TYPE backer_job_duration_seconds summary");
    for (kind, (sum, n)) in &duration {
        let _ = writeln!(out, "backer_job_duration_seconds_sum{{kind=\"{kind}\"}} {sum}");
        let _ = writeln!(out, "backer_job_duration_seconds_count{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP backer_backup_bytes Bytes of file content read by recorded backups."
    );
    let _ = writeln!(out, "# TYPE backer_backup_bytes gauge");
    let _ = writeln!(out, "backer_backup_bytes {read}");
    let _ = writeln!(
        out,
        "# HELP backer_backup_new_bytes Of those, bytes new to the repository (before compression)."
    );
    let _ = writeln!(out, "# TYPE backer_backup_new_bytes gauge");
    let _ = writeln!(out, "backer_backup_new_bytes {new}");
    if new > 0 {
        let _ = writeln!(
            out,
            "# HELP backer_dedup_ratio Bytes read per new byte stored, over recorded backups."
        );
        let _ = writeln!(out, "# TYPE backer_dedup_ratio gauge");
        let _ = writeln!(out, "backer_dedup_ratio {:.3}", read as f64 / new as f64);
    }
}
