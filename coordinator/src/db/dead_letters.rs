//! The `dead_letters` table: every statement on it. What the broker dead-lettered, and reports
//! the coordinator could never apply, each with the reason (`crate::dead_letters` decides what to
//! record; `syncd dead-letters` lists them).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use syncd_proto::{JobId, RunId};
use uuid::Uuid;

/// How much of a body a listing shows: enough to recognise the message, not a whole payload.
const BODY_SHOWN_CHARS: usize = 2000;

#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub job_id: Option<Uuid>,
    pub queue: Option<String>,
    pub reason: String,
    /// The message body as text (lossy for binary garbage), for a person to read.
    pub body: String,
    pub received_at: DateTime<Utc>,
}

pub async fn insert(
    conn: &mut PgConnection,
    job: Option<JobId>,
    queue: Option<&str>,
    reason: &str,
    body: &[u8],
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO dead_letters (job_id, queue, reason, body) VALUES ($1, $2, $3, $4)",
        job.map(|job| job.0),
        queue,
        reason,
        body
    )
    .execute(conn)
    .await
    .context("recording a dead letter")?;
    Ok(())
}

/// Every dead letter, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<DeadLetter>> {
    let rows = sqlx::query!(
        "SELECT id, job_id, queue, reason, body, received_at FROM dead_letters ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .context("listing dead letters")?;
    Ok(rows
        .into_iter()
        .map(|row| DeadLetter {
            id: row.id,
            job_id: row.job_id,
            queue: row.queue,
            reason: row.reason,
            body: String::from_utf8_lossy(&row.body)
                .chars()
                .take(BODY_SHOWN_CHARS)
                .collect(),
            received_at: row.received_at,
        })
        .collect())
}

/// How many dead letters belong to a run's jobs.
pub async fn count_of_run(pool: &PgPool, run: RunId) -> Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM dead_letters d JOIN jobs j ON j.id = d.job_id
           WHERE j.run_id = $1"#,
        run.0
    )
    .fetch_one(pool)
    .await
    .context("counting a run's dead letters")
}
