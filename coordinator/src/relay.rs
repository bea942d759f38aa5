//! The outbox relay: publishes outbox rows to RabbitMQ with publisher confirms, then deletes
//! them. A crash between the confirm and the delete publishes a message twice; that is safe
//! because a job's report counts only once (see `results`), and workers write deterministic keys.
//!
//! A batch is read without a transaction, sent at once and confirmed together
//! ([`Publisher::publish_all`]), and the confirmed rows are then deleted: no database
//! transaction or row lock waits on the broker. Only the leading coordinator relays
//! (`crate::leadership`), so no other relay reads the same rows meanwhile.

use crate::db::outbox;
use anyhow::Result;
use sqlx::PgPool;
use std::time::Duration;
use syncd_infra::broker::{Outgoing, Publisher};

/// Rows read and published at once.
const BATCH: i64 = 500;
/// How long the broker has to confirm a whole batch before the relay counts it as unreachable.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes one batch; returns how many messages went out. Messages the broker confirmed are
/// deleted even when others of the batch failed; the rest stay for the next batch.
pub async fn relay_batch(pool: &PgPool, publisher: &Publisher) -> Result<usize> {
    let rows = outbox::oldest(pool, BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let message_ids: Vec<String> = rows.iter().map(|row| row.job_id.to_string()).collect();
    let messages: Vec<Outgoing> = rows
        .iter()
        .zip(&message_ids)
        .map(|(row, message_id)| Outgoing {
            queue: &row.queue,
            message_id,
            body: &row.body,
            traceparent: row.traceparent.as_deref(),
        })
        .collect();
    let outcomes = publisher.publish_all(&messages, CONFIRM_TIMEOUT).await?;
    let mut sent = Vec::with_capacity(rows.len());
    let mut first_error = None;
    for (row, outcome) in rows.iter().zip(outcomes) {
        match outcome {
            Ok(()) => sent.push(row.id),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    if !sent.is_empty() {
        outbox::delete(pool, &sent).await?;
    }
    match first_error {
        Some(error) => Err(error.context(format!(
            "{} of {} outbox messages were not confirmed",
            rows.len() - sent.len(),
            rows.len()
        ))),
        None => Ok(sent.len()),
    }
}
