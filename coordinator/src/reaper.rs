//! Rescuing lost attempts: a running attempt whose lease expired (its worker vanished without the
//! broker noticing, or the job hangs) counts as a transient failure, so it is retried or, with no
//! attempts left, failed. A late report for the abandoned attempt is then ignored.

use crate::jobs::{JobRow, JOB_COLUMNS};
use crate::planner;
use crate::results::fail_attempt;
use anyhow::Result;
use sqlx::PgPool;
use syncd_proto::messages::FailureKind;

pub async fn reap_expired(pool: &PgPool) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'running' AND lease_expires_at < now()
         LIMIT 100 FOR UPDATE SKIP LOCKED"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for row in &rows {
        let job = JobRow::from_row(row)?;
        let (config, _) = planner::load_run_config(&mut tx, job.run_id).await?;
        let error = format!(
            "attempt {} timed out after {} s without a result",
            job.attempts, job.attempt_timeout_secs
        );
        fail_attempt(&mut tx, &config, &job, None, &error, FailureKind::Transient).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}
