//! The outbox relay: publishes outbox rows to RabbitMQ with publisher confirms, then deletes
//! them. A crash between the confirm and the delete publishes a message twice; that is safe
//! because a job's report counts only once (see `results`), and workers write deterministic keys.

use anyhow::{Context, Result};
use sqlx::{PgPool, Row};
use syncd_infra::broker::Publisher;

/// Publishes one batch; returns how many messages went out.
pub async fn relay_batch(pool: &PgPool, publisher: &Publisher) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, job_id, queue, body, traceparent FROM outbox ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading the outbox")?;
    let mut sent = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.try_get("id")?;
        let job: uuid::Uuid = row.try_get("job_id")?;
        let queue: String = row.try_get("queue")?;
        let body: Vec<u8> = row.try_get("body")?;
        let traceparent: Option<String> = row.try_get("traceparent")?;
        publisher
            .publish(&queue, &job.to_string(), &body, traceparent.as_deref())
            .await?;
        sent.push(id);
    }
    if !sent.is_empty() {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(sent.len())
}
