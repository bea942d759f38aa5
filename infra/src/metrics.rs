//! The HTTP endpoint every syncd process can serve: Prometheus `/metrics` (the process's own
//! metrics, and its memory, CPU, threads and open files), optionally behind a bearer token
//! (`Authorization: Bearer ...`), so that a port reachable from other hosts does not hand out
//! what the factory is doing to anyone who asks; and, without a token, the probes of
//! supervisors (docker compose, Kubernetes): `/healthz` answers while the process runs, `/readyz`
//! only while it can do its work (connected, no outage of the services it needs).

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Bucket bounds of duration histograms, in seconds: from a quick scoring batch to a long
/// 1024x1024 generation on a busy GPU. Without buckets the exporter writes summaries, which
/// cannot be aggregated across workers.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Whether the process can do its work now, asked by each `/readyz` request.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

struct Endpoint {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    token: Option<SecretString>,
    ready: Readiness,
}

/// Installs the global metrics recorder and serves it, the health probe and the readiness
/// probe on `listen`; with a `token`, metrics only to requests that present it.
pub async fn serve(
    listen: SocketAddr,
    token: Option<SecretString>,
    ready: Readiness,
) -> Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // The standard process metrics under syncd's prefix (`syncd_process_resident_memory_bytes`,
    // `syncd_process_cpu_seconds_total`, ...): RabbitMQ and Prometheus report `process_*` of
    // their own, and the prefix tells syncd's processes apart whatever the scrape jobs are
    // called (compose names them, a Kubernetes Prometheus names them otherwise).
    let process = metrics_process::Collector::new("syncd_");
    process.describe();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("serving metrics on {listen}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        // Histograms keep a window of samples that needs draining now and then.
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let protected = token.is_some();
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readiness))
        .with_state(Arc::new(Endpoint {
            handle,
            process,
            token,
            ready,
        }));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%listen, protected, "serving /metrics, /healthz and /readyz");
    Ok(())
}

async fn readiness(State(endpoint): State<Arc<Endpoint>>) -> Response {
    if (endpoint.ready)() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn render(State(endpoint): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    if let Some(token) = &endpoint.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let expected = token.expose_secret().as_bytes();
        if !bool::from(presented.as_bytes().ct_eq(expected)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required\n",
            )
                .into_response();
        }
    }
    // Read from /proc at each scrape, so the figures are those of the scrape's moment.
    endpoint.process.collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        endpoint.handle.render(),
    )
        .into_response()
}
