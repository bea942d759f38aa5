//! Moving due jobs into the queue: `pending` jobs of active runs and `retry_wait` jobs whose
//! backoff has passed become `queued` (regenerations of a finished run's groups too, unless the
//! run is paused), and their messages go into the outbox in the same
//! transaction, in a few statements per batch whatever its size. At most `max_queued_per_route` jobs of a route (a kind, or a generation model
//! family) are queued at once, so the broker's backlog stays bounded and pausing a run takes
//! effect quickly; counting per route means that jobs no worker can take yet (rigid groups
//! while only FLUX.1-dev workers run) never keep other routes' jobs out of the queues.

use crate::db::jobs::{self, JobRow};
use crate::db::{outbox, run_tallies};
use anyhow::Result;
use sqlx::PgPool;
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
    // Counted once for every route, outside the routes' transactions, from the run tallies (a
    // few rows, where counting the jobs table reads an entry for each dead row version too).
    // Only this loop (on the leader) queues jobs, and its last pass's changes are committed and
    // folded here; the changes not yet committed or folded only take jobs out of flight. So the
    // room it sees is never more than there is.
    run_tallies::fold(pool).await?;
    let in_flight = run_tallies::in_flight_by_route(pool).await?;
    for route in Route::ALL {
        let in_flight = in_flight.get(&route).copied().unwrap_or(0);
        let room = (max_queued_per_route - in_flight).max(0);
        if room == 0 {
            continue;
        }
        let mut tx = pool.begin().await?;
        let due = jobs::lock_due(&mut tx, route, room).await?;
        if due.is_empty() {
            continue;
        }
        jobs::queue_many(&mut tx, &due).await?;
        let ids: Vec<uuid::Uuid> = due.iter().map(|job| job.id.0).collect();
        let known_traces = jobs::trace_contexts(&mut tx, &ids).await?;
        let mut messages = outbox::NewMessages::default();
        let mut traces = TraceStarts::default();
        let queue = topology.job_queue(route);
        for (job, trace) in due.iter().zip(known_traces) {
            let mut message = job.message();
            message.attempt = job.attempts + 1;
            messages.job.push(job.id.0);
            messages.queue.push(queue.clone());
            messages.body.push(message.encode());
            messages
                .traceparent
                .push(trace_dispatch(&mut traces, job, trace));
        }
        traces.keep(&mut tx).await?;
        outbox::insert_many(&mut tx, &messages).await?;
        tx.commit().await?;
        queued += due.len();
    }
    Ok(queued)
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
            crate::db::groups::keep_trace_contexts(conn, &self.groups, &self.group_traces).await?;
        }
        if !self.jobs.is_empty() {
            jobs::keep_trace_contexts(conn, &self.jobs, &self.job_traces).await?;
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
