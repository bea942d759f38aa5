//! Recording dead-lettered messages. The broker dead-letters a message that could not be decoded
//! (rejected by its consumer) or that was delivered `delivery_limit` times without an ack (it
//! crashes every worker). Each is stored with the broker's reason, and a job it belongs to is
//! marked `dead_lettered`, which ends its group or object; an admin can retry it.

use crate::jobs::{self, Change};
use crate::planner;
use crate::state::JobState;
use anyhow::Result;
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use syncd_proto::messages::JobMessage;

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

pub async fn record(pool: &PgPool, queue: Option<String>, reason: &str, body: &[u8]) -> Result<()> {
    let mut tx = pool.begin().await?;
    let message = JobMessage::decode(body).ok();
    let explanation = match (reason, &message) {
        ("rejected", None) => "the message could not be decoded".to_string(),
        ("rejected", Some(_)) => "a worker rejected the message".to_string(),
        ("delivery_limit", _) => {
            "delivered too many times without an ack (it crashes workers?)".to_string()
        }
        (other, _) => format!("dead-lettered by the broker ({other})"),
    };
    sqlx::query("INSERT INTO dead_letters (job_id, queue, reason, body) VALUES ($1, $2, $3, $4)")
        .bind(message.as_ref().map(|message| message.job_id.0))
        .bind(&queue)
        .bind(&explanation)
        .bind(body)
        .execute(&mut *tx)
        .await?;
    if let Some(message) = message {
        if let Some(job) = jobs::lock(&mut tx, message.job_id).await? {
            if job.state.is_in_flight() && job.attempts == message.attempt {
                let change = Change {
                    error: Some(&explanation),
                    ..Default::default()
                };
                jobs::transition(&mut tx, &job, JobState::DeadLettered, change).await?;
                planner::on_failure(&mut tx, &job, &explanation, false).await?;
            }
        }
    }
    tx.commit().await?;
    metrics::counter!("syncd_dead_letters_total").increment(1);
    Ok(())
}
