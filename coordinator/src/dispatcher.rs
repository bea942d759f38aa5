//! Moving due jobs into the queue: `pending` jobs of active runs and `retry_wait` jobs whose
//! backoff has passed become `queued` (regenerations of a finished run's groups too, unless the
//! run is paused), and their messages go into the outbox in the same
//! transaction. At most `max_queued_per_route` jobs of a route (a kind, or a generation model
//! family) are queued at once, so the broker's backlog stays bounded and pausing a run takes
//! effect quickly; counting per route means that jobs no worker can take yet (rigid groups
//! while only FLUX.1-dev workers run) never keep other routes' jobs out of the queues.

use crate::jobs::{self, Change, JobRow, JOB_COLUMNS};
use crate::state::JobState;
use anyhow::{Context, Result};
use sqlx::PgPool;
use sqlx::Row;
use syncd_infra::broker::Topology;
use syncd_infra::telemetry;
use syncd_proto::messages::Route;

/// Dispatches one batch per route; returns how many jobs were queued.
pub async fn dispatch_due(
    pool: &PgPool,
    topology: &Topology,
    max_queued_per_route: i64,
) -> Result<usize> {
    let mut queued = 0;
    for route in Route::ALL {
        let mut tx = pool.begin().await?;
        let (in_flight,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE route = $1 AND state IN ('queued', 'running')",
        )
        .bind(route.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let room = (max_queued_per_route - in_flight).max(0);
        if room == 0 {
            continue;
        }
        let rows = sqlx::query(&format!(
            "SELECT {}, COALESCE((SELECT g.traceparent FROM groups g WHERE g.id = j.group_id),
                                j.traceparent) AS trace
             FROM jobs j JOIN runs r ON r.id = j.run_id
             WHERE j.route = $1
               AND (r.state = 'active' OR (r.state <> 'paused' AND j.payload ? 'regeneration'))
               AND (j.state = 'pending' OR (j.state = 'retry_wait' AND j.not_before <= now()))
             ORDER BY j.created_at
             LIMIT $2
             FOR UPDATE OF j SKIP LOCKED",
            JOB_COLUMNS
                .split(", ")
                .map(|column| format!("j.{column}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(route.as_str())
        .bind(room.min(200))
        .fetch_all(&mut *tx)
        .await
        .context("selecting due jobs")?;
        for row in &rows {
            let job = JobRow::from_row(row)?;
            jobs::transition(&mut tx, &job, JobState::Queued, Change::default()).await?;
            let mut message = job.message();
            message.attempt = job.attempts + 1;
            let traceparent = trace_dispatch(&mut tx, &job, row.try_get("trace")?).await?;
            sqlx::query(
                "INSERT INTO outbox (job_id, queue, body, traceparent) VALUES ($1, $2, $3, $4)",
            )
            .bind(job.id.0)
            .bind(topology.job_queue(route))
            .bind(message.encode())
            .bind(traceparent)
            .execute(&mut *tx)
            .await
            .context("writing to the outbox")?;
        }
        tx.commit().await?;
        queued += rows.len();
    }
    Ok(queued)
}

/// The span of one dispatch, in the trace of the job's group (or of the job, for jobs before
/// groups exist), which the first dispatch starts and keeps; returns the `traceparent` the job's
/// message carries to the worker. `None` when spans are not exported.
async fn trace_dispatch(
    conn: &mut sqlx::PgConnection,
    job: &JobRow,
    trace: Option<String>,
) -> Result<Option<String>> {
    let span = tracing::info_span!(
        "dispatch",
        job = %job.id,
        kind = %job.kind,
        group = job.group_id.map(tracing::field::display),
        attempt = job.attempts + 1
    );
    telemetry::follow(&span, trace.as_deref());
    let traceparent = telemetry::traceparent(&span);
    if let (None, Some(started)) = (&trace, &traceparent) {
        let keep = match job.group_id {
            Some(group) => sqlx::query(
                "UPDATE groups SET traceparent = $2 WHERE id = $1 AND traceparent IS NULL",
            )
            .bind(group.0),
            None => sqlx::query("UPDATE jobs SET traceparent = $2 WHERE id = $1").bind(job.id.0),
        };
        keep.bind(started)
            .execute(conn)
            .await
            .context("keeping a trace context")?;
    }
    Ok(traceparent)
}
