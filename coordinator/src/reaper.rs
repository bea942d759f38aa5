//! Rescuing lost attempts: a running attempt whose lease expired (no start, heartbeat or result
//! for `lease_secs`: its worker vanished without the broker noticing, or hangs) counts as a
//! transient failure, so it is retried or, with no attempts left, failed. A late report for the
//! abandoned attempt is then ignored.
//!
//! A lease is only judged once the coordinator has heard from workers for a whole lease: right
//! after its own start or an outage of the database or the broker, heartbeats sent meanwhile are
//! still on their way, and silence proves nothing.

use crate::db::jobs;
use crate::results::fail_attempt;
use anyhow::Result;
use sqlx::PgPool;
use std::time::Duration;
use syncd_proto::messages::FailureKind;

/// Expired attempts failed per transaction.
const BATCH: i64 = 100;

/// Fails the attempts whose lease expired, among jobs whose lease is shorter than `listening`,
/// the time since the coordinator has been hearing from workers without interruption.
pub async fn reap_expired(pool: &PgPool, listening: Duration) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let expired = jobs::lock_expired(&mut tx, listening.as_secs_f64(), BATCH).await?;
    for job in &expired {
        let (config, _) = crate::db::runs::config_and_state(&mut tx, job.run_id).await?;
        let error = format!(
            "attempt {} lost: nothing heard of it for {} s (no heartbeat or result)",
            job.attempts, job.lease_secs
        );
        fail_attempt(&mut tx, &config, job, None, &error, FailureKind::Transient).await?;
    }
    tx.commit().await?;
    Ok(expired.len())
}
