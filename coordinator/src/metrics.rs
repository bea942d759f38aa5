//! Gauges computed from the database for Prometheus (counters are incremented where things
//! happen). Names follow Prometheus conventions: `syncd_` prefix, `_total` counters, base units.

use crate::state::JobState;
use anyhow::Result;
use sqlx::PgPool;
use syncd_proto::messages::{Service, WorkerState};

pub async fn update_gauges(pool: &PgPool) -> Result<()> {
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(pool)
            .await?;
    set_counts(
        "syncd_jobs",
        "state",
        JobState::ALL.map(JobState::as_str),
        &states,
    );
    let waiting: Vec<(String, i64)> = sqlx::query_as(
        "SELECT waiting_for, count(*) FROM jobs
         WHERE state = 'running' AND waiting_for IS NOT NULL GROUP BY waiting_for",
    )
    .fetch_all(pool)
    .await?;
    set_counts(
        "syncd_jobs_waiting",
        "service",
        Service::ALL.map(|service| service.as_str()),
        &waiting,
    );
    let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?;
    metrics::gauge!("syncd_outbox_pending").set(outbox as f64);
    let workers = crate::workers::alive_by_state(pool).await?;
    set_counts(
        "syncd_workers_alive",
        "state",
        [WorkerState::Idle, WorkerState::Busy].map(|state| state.as_str()),
        &workers,
    );
    Ok(())
}

/// Sets `gauge{label=value}` for every value: its count in `counts`, or 0 when it has none, so
/// that a state that empties shows 0 rather than its last count.
fn set_counts(
    gauge: &'static str,
    label: &'static str,
    values: impl IntoIterator<Item = &'static str>,
    counts: &[(String, i64)],
) {
    for value in values {
        let count = counts
            .iter()
            .find(|(name, _)| name == value)
            .map_or(0, |(_, count)| *count);
        metrics::gauge!(gauge, label => value).set(count as f64);
    }
}
