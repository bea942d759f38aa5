//! Moving due jobs into the queue: `pending` jobs of active runs and `retry_wait` jobs whose
//! backoff has passed become `queued` (regenerations of a finished run's groups too, unless the
//! run is paused), and their messages go into the outbox in the same
//! transaction, in a few statements per batch whatever its size. At most `max_queued_per_route` jobs of a route (a kind, or a generation model
//! family) are queued at once, so the broker's backlog stays bounded and pausing a run takes
//! effect quickly; counting per route means that jobs no worker can take yet (rigid groups
//! while only FLUX.1-dev workers run) never keep other routes' jobs out of the queues.

use crate::jobs::{self, JobRow, JOB_COLUMNS};
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
        .bind(room)
        .fetch_all(&mut *tx)
        .await
        .context("selecting due jobs")?;
        if rows.is_empty() {
            continue;
        }
        let jobs = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<Result<Vec<_>>>()?;
        jobs::queue_many(&mut tx, &jobs).await?;
        let mut outbox = OutboxRows::default();
        let mut traces = TraceStarts::default();
        let queue = topology.job_queue(route);
        for (job, row) in jobs.iter().zip(&rows) {
            let mut message = job.message();
            message.attempt = job.attempts + 1;
            outbox.job.push(job.id.0);
            outbox.queue.push(queue.clone());
            outbox.body.push(message.encode());
            outbox
                .traceparent
                .push(trace_dispatch(&mut traces, job, row.try_get("trace")?));
        }
        traces.keep(&mut tx).await?;
        sqlx::query(
            "INSERT INTO outbox (job_id, queue, body, traceparent)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::text[])",
        )
        .bind(&outbox.job)
        .bind(&outbox.queue)
        .bind(&outbox.body)
        .bind(&outbox.traceparent)
        .execute(&mut *tx)
        .await
        .context("writing to the outbox")?;
        tx.commit().await?;
        queued += rows.len();
    }
    Ok(queued)
}

/// The outbox rows of one batch, a column each, for `UNNEST`.
#[derive(Default)]
struct OutboxRows {
    job: Vec<uuid::Uuid>,
    queue: Vec<String>,
    body: Vec<Vec<u8>>,
    traceparent: Vec<Option<String>>,
}

/// Traces started by a batch's first dispatches, kept on their groups (or jobs) in two
/// statements.
#[derive(Default)]
struct TraceStarts {
    groups: Vec<uuid::Uuid>,
    group_traces: Vec<String>,
    jobs: Vec<uuid::Uuid>,
    job_traces: Vec<String>,
}

impl TraceStarts {
    async fn keep(&self, conn: &mut sqlx::PgConnection) -> Result<()> {
        if !self.groups.is_empty() {
            sqlx::query(
                "UPDATE groups g SET traceparent = kept.traceparent
                 FROM UNNEST($1::uuid[], $2::text[]) AS kept (id, traceparent)
                 WHERE g.id = kept.id AND g.traceparent IS NULL",
            )
            .bind(&self.groups)
            .bind(&self.group_traces)
            .execute(&mut *conn)
            .await
            .context("keeping the groups' trace contexts")?;
        }
        if !self.jobs.is_empty() {
            sqlx::query(
                "UPDATE jobs j SET traceparent = kept.traceparent
                 FROM UNNEST($1::uuid[], $2::text[]) AS kept (id, traceparent)
                 WHERE j.id = kept.id",
            )
            .bind(&self.jobs)
            .bind(&self.job_traces)
            .execute(&mut *conn)
            .await
            .context("keeping the jobs' trace contexts")?;
        }
        Ok(())
    }
}

/// The span of one dispatch, in the trace of the job's group (or of the job, for jobs before
/// groups exist), which the first dispatch starts (kept by `traces`); returns the `traceparent`
/// the job's message carries to the worker. `None` when spans are not exported.
fn trace_dispatch(traces: &mut TraceStarts, job: &JobRow, trace: Option<String>) -> Option<String> {
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
        match job.group_id {
            Some(group) => {
                traces.groups.push(group.0);
                traces.group_traces.push(started.clone());
            }
            None => {
                traces.jobs.push(job.id.0);
                traces.job_traces.push(started.clone());
            }
        }
    }
    traceparent
}
