//! `/healthz`, `/readyz` and `/metrics`. Ready means able to serve: a
//! replica waiting for the lease is ready (it takes over when the leader
//! goes), a leading one once the PKI is in place and it reconciles. Were
//! only the leader ready, a Deployment of two replicas would never be
//! Available: `helm install --wait` and every rolling update would stall.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::leader::Role;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Health {
    pub role: Arc<Role>,
    pub metrics: Arc<Metrics>,
}

pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                match h.role.readiness() {
                    Ok(what) => (StatusCode::OK, what),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                    h.metrics.render(),
                )
            }),
        )
        .with_state(health);
    axum::serve(listener, app).await
}
