//! The `outbox` table: every statement on it. A row is the message of a job's attempt, written in
//! the same transaction as the state change that needs it (`crate::dispatcher`) and deleted once
//! the broker confirmed it (`crate::relay`), so no attempt is lost or published without its state.

use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};
use syncd_proto::RunId;
use uuid::Uuid;

/// A message waiting in the outbox.
pub struct OutboxRow {
    pub id: i64,
    pub job_id: Uuid,
    pub queue: String,
    pub body: Vec<u8>,
    pub traceparent: Option<String>,
}

/// Messages to write at once, a column each (for `UNNEST`).
#[derive(Default)]
pub struct NewMessages {
    pub job: Vec<Uuid>,
    pub queue: Vec<String>,
    pub body: Vec<Vec<u8>>,
    pub traceparent: Vec<Option<String>>,
}

pub async fn insert_many(conn: &mut PgConnection, messages: &NewMessages) -> Result<()> {
    sqlx::query!(
        "INSERT INTO outbox (job_id, queue, body, traceparent)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::text[])",
        &messages.job,
        &messages.queue,
        &messages.body,
        &messages.traceparent as &[Option<String>]
    )
    .execute(conn)
    .await
    .context("writing to the outbox")?;
    Ok(())
}

/// The oldest `limit` messages, in the order they were written.
pub async fn oldest(pool: &PgPool, limit: i64) -> Result<Vec<OutboxRow>> {
    sqlx::query_as!(
        OutboxRow,
        "SELECT id, job_id, queue, body, traceparent FROM outbox ORDER BY id LIMIT $1",
        limit
    )
    .fetch_all(pool)
    .await
    .context("reading the outbox")
}

/// Deletes the messages the broker confirmed.
pub async fn delete(pool: &PgPool, ids: &[i64]) -> Result<()> {
    sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", ids)
        .execute(pool)
        .await
        .context("deleting published outbox rows")?;
    Ok(())
}

/// Deletes the unpublished messages of a run's jobs (the run was cancelled).
pub async fn delete_of_run(conn: &mut PgConnection, run: RunId) -> Result<()> {
    sqlx::query!(
        "DELETE FROM outbox WHERE job_id IN (SELECT id FROM jobs WHERE run_id = $1)",
        run.0
    )
    .execute(conn)
    .await
    .context("deleting a run's unpublished messages")?;
    Ok(())
}

/// Messages not yet confirmed by the broker.
pub async fn pending(pool: &PgPool) -> Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "pending!" FROM outbox"#)
        .fetch_one(pool)
        .await
        .context("counting the outbox")
}
