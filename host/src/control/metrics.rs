//! The Prometheus endpoint (`[pep.metrics] listen`, docs/fleet.md): `GET /metrics` on a loopback port, in
//! OpenMetrics text. Counts only (no host, URL or reason text: see `crate::metrics`), so it needs no token;
//! its `Host` must still be an address of its own, so a web page cannot read it through a name it rebinds
//! to 127.0.0.1. Its address goes into the address guard before it accepts anything, as the dashboard's.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pipeline::Pipeline;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn start(
    pipeline: Arc<Pipeline>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<SocketAddr, String> {
    let failed = |err: std::io::Error| format!("pep.metrics.listen {addr}: {err}");
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    pipeline.add_own_surface(addr);
    tracing::info!(%addr, "metrics listening (GET /metrics)");
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state((pipeline, addr));
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::warn!(%err, "metrics endpoint stopped");
        }
    });
    Ok(addr)
}

async fn metrics(
    State((pipeline, addr)): State<(Arc<Pipeline>, SocketAddr)>,
    headers: HeaderMap,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let own = [addr.to_string(), format!("localhost:{}", addr.port())];
    if !own.iter().any(|name| name == host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "the metrics endpoint answers only to its own address\n",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        pipeline.metrics_text(),
    )
        .into_response()
}
