//! Gauges computed from the database for Prometheus (counters are incremented where things
//! happen). Names follow Prometheus conventions: `syncd_` prefix, `_total` counters, base units.

use crate::state::JobState;
use anyhow::Result;
use sqlx::PgPool;
use syncd_proto::messages::Service;

pub async fn update_gauges(pool: &PgPool) -> Result<()> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(pool)
            .await?;
    for state in JobState::ALL {
        let count = counts
            .iter()
            .find(|(name, _)| name == state.as_str())
            .map_or(0, |(_, count)| *count);
        metrics::gauge!("syncd_jobs", "state" => state.as_str()).set(count as f64);
    }
    let waiting: Vec<(String, i64)> = sqlx::query_as(
        "SELECT waiting_for, count(*) FROM jobs
         WHERE state = 'running' AND waiting_for IS NOT NULL GROUP BY waiting_for",
    )
    .fetch_all(pool)
    .await?;
    for service in Service::ALL {
        let count = waiting
            .iter()
            .find(|(name, _)| name == service.as_str())
            .map_or(0, |(_, count)| *count);
        metrics::gauge!("syncd_jobs_waiting", "service" => service.as_str()).set(count as f64);
    }
    let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?;
    metrics::gauge!("syncd_outbox_pending").set(outbox as f64);
    Ok(())
}
