//! Recording dead-lettered messages. The broker dead-letters a message that could not be decoded
//! (rejected by its consumer) or that was delivered `delivery_limit` times without an ack (it
//! crashes every worker). Each is stored with the broker's reason, and a job it belongs to is
//! marked `dead_lettered`, which ends its group or object; an admin can retry it. A report the
//! coordinator cannot apply, for a reason other than an outage, is recorded the same way.

use crate::db::dead_letters;
use crate::db::jobs::{self, Change};
use crate::planner;
use crate::state::JobState;
use anyhow::Result;
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use syncd_proto::messages::{JobMessage, WorkerReport};
use syncd_proto::JobId;

/// The broker's account of why a message was dead-lettered, from its `x-death` header.
pub fn death_reason(headers: Option<&FieldTable>) -> (Option<String>, String) {
    let text = |value: &AMQPValue| match value {
        AMQPValue::LongString(text) => Some(text.to_string()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    };
    let first = |name: &str| {
        headers
            .and_then(|headers| headers.inner().get(name))
            .and_then(text)
    };
    let queue = first("x-first-death-queue");
    let reason = first("x-first-death-reason").unwrap_or_else(|| "unknown".into());
    (queue, reason)
}

/// Records a message the broker dead-lettered.
pub async fn record(pool: &PgPool, queue: Option<String>, reason: &str, body: &[u8]) -> Result<()> {
    let job = JobMessage::decode(body).ok();
    let report = WorkerReport::decode(body).ok();
    let explanation = match (reason, &job, &report) {
        ("rejected", None, Some(_)) => "the coordinator could not apply this report".to_string(),
        ("rejected", None, None) => "the message could not be decoded".to_string(),
        ("rejected", Some(_), _) => "a worker rejected the message".to_string(),
        ("delivery_limit", ..) => {
            "delivered too many times without an ack (it crashes workers?)".to_string()
        }
        (other, ..) => format!("dead-lettered by the broker ({other})"),
    };
    let attempt = job.as_ref().map(|job| (job.job_id, job.attempt)).or(report
        .as_ref()
        .map(|report| (report.job_id, report.attempt)));
    store(pool, queue.as_deref(), attempt, &explanation, body).await
}

/// Records a report that decoded but can never be applied (an output the planner refuses, a
/// stored run configuration that no longer parses): handing it back would only bring it back
/// forever, so it is kept here with the reason and its job ends `dead_lettered`.
pub async fn record_report(
    pool: &PgPool,
    queue: &str,
    report: &WorkerReport,
    body: &[u8],
    error: &str,
) -> Result<()> {
    let explanation = format!("the coordinator could not apply this report: {error}");
    store(
        pool,
        Some(queue),
        Some((report.job_id, report.attempt)),
        &explanation,
        body,
    )
    .await
}

/// Inserts the dead letter and ends the attempt it belongs to, if that attempt is still awaited.
async fn store(
    pool: &PgPool,
    queue: Option<&str>,
    attempt: Option<(JobId, u32)>,
    explanation: &str,
    body: &[u8],
) -> Result<()> {
    let mut tx = pool.begin().await?;
    dead_letters::insert(
        &mut tx,
        attempt.map(|(job, _)| job),
        queue,
        explanation,
        body,
    )
    .await?;
    let mut dead_lettered = None;
    if let Some((job_id, attempt)) = attempt {
        if let Some(job) = jobs::lock(&mut tx, job_id).await? {
            if job.state.is_in_flight() && job.attempts == attempt {
                dead_lettered = Some(job.kind);
                let change = Change {
                    error: Some(explanation),
                    ..Default::default()
                };
                jobs::transition(&mut tx, &job, JobState::DeadLettered, change).await?;
                planner::on_failure(&mut tx, &job, explanation, false).await?;
            }
        }
    }
    tx.commit().await?;
    metrics::counter!("syncd_dead_letters_total").increment(1);
    if let Some(kind) = dead_lettered {
        metrics::counter!("syncd_jobs_total", "kind" => kind.as_str(), "outcome" => "dead_lettered")
            .increment(1);
    }
    Ok(())
}
