//! The REST port: liveness and readiness for supervisors and Kubernetes
//! probes, and Prometheus metrics. Plain HTTP on purpose (probes and scrapers
//! rarely speak mTLS); it serves nothing secret: no names, no tokens.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::server::Shared;
use crate::state::ClientState;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Ready once the state is loaded and the certificates are in date.
async fn ready(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.server_not_after <= chrono::Utc::now().timestamp() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server certificate has expired\n",
        );
    }
    (StatusCode::OK, "ready\n")
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
    let connected = s.connections.lock().unwrap_or_else(|p| p.into_inner()).len();
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
        s.server_not_after
    );
    if let Some(t) = soonest_client_expiry {
        let _ = writeln!(
            out,
            "backer_certificate_expiry_timestamp_seconds{{kind=\"client_soonest\"}} {t}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
