//! Connections to the services syncd runs on, shared by the coordinator and the worker.
//!
//! - [`broker`]: the RabbitMQ topology (queue names, arguments, dead-lettering) and publishing
//!   with publisher confirms. Both sides declare the whole topology idempotently, so either may
//!   start first.
//! - [`storage`]: S3 access (any S3-compatible endpoint, path-style).
//! - [`metrics`]: the Prometheus endpoint.
//! - [`telemetry`]: tracing to stderr, and to an OTLP collector when one is configured.
//!
//! **Architecture invariant:** nothing here knows about jobs beyond their kinds; what a message
//! means is decided by the coordinator and the worker.

pub mod broker;
pub mod metrics;
pub mod outage;
pub mod storage;
pub mod telemetry;

/// Resolves on SIGINT or SIGTERM: how every syncd process learns it should stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
