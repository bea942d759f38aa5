//! The Prometheus `/metrics` endpoint every syncd process can serve.

use anyhow::{Context, Result};
use std::net::SocketAddr;

/// Bucket bounds of duration histograms, in seconds: from a quick scoring batch to a long
/// 1024x1024 generation on a busy GPU. Without buckets the exporter writes summaries, which
/// cannot be aggregated across workers.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Installs the global metrics recorder and serves it on `listen`.
pub fn serve(listen: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(DURATION_BUCKETS)
        .context("configuring histogram buckets")?
        .install()
        .with_context(|| format!("serving metrics on {listen}"))?;
    tracing::info!(%listen, "serving /metrics");
    Ok(())
}
