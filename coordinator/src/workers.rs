//! The `workers` table: the latest announcement of each worker, for `syncd workers`.
//!
//! Announcements are snapshots, and only the newest matters: recording one replaces what was
//! known of its worker. A worker is alive while its announcements keep coming; after three
//! missed ones (or a `stopped` announcement) it is gone. Nothing here changes a job: leases
//! follow the jobs' own heartbeats (`jobs::heartbeat`).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use syncd_proto::messages::WorkerAnnouncement;
use syncd_proto::RunId;
use uuid::Uuid;

/// Missed announcements after which a worker that never said goodbye is presumed gone.
const MISSED_ANNOUNCEMENTS: i32 = 3;

/// Whether a `workers` row is alive, `$1` being [`MISSED_ANNOUNCEMENTS`].
const ALIVE: &str = "w.state <> 'stopped'
    AND w.last_seen > now() - make_interval(secs => w.interval_secs * $1)";

/// Replaces what is known of the announcing worker.
pub async fn record(pool: &PgPool, announcement: &WorkerAnnouncement) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (name, host, device, models, routes, state, current_job, interval_secs)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (name) DO UPDATE SET
             host = EXCLUDED.host, device = EXCLUDED.device, models = EXCLUDED.models,
             routes = EXCLUDED.routes, state = EXCLUDED.state,
             current_job = EXCLUDED.current_job, interval_secs = EXCLUDED.interval_secs,
             last_seen = now()",
    )
    .bind(&announcement.worker)
    .bind(&announcement.host)
    .bind(&announcement.device)
    .bind(serde_json::to_value(&announcement.models)?)
    .bind(serde_json::to_value(&announcement.routes)?)
    .bind(announcement.state.as_str())
    .bind(announcement.current_job.map(|job| job.0))
    .bind(announcement.interval_secs.min(i32::MAX as u32) as i32)
    .execute(pool)
    .await
    .context("recording a worker announcement")?;
    Ok(())
}

/// How many workers are alive in each state, for the `syncd_workers_alive` gauge.
pub async fn alive_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    let counts = sqlx::query_as(&format!(
        "SELECT w.state, count(*) FROM workers w WHERE {ALIVE} GROUP BY w.state"
    ))
    .bind(MISSED_ANNOUNCEMENTS)
    .fetch_all(pool)
    .await
    .context("counting workers")?;
    Ok(counts)
}

/// Workers gone without saying goodbye (announcements overdue, no `stopped`) in the last day,
/// for the `syncd_workers_lost` gauge and its alert: a worker that crashed or lost its host.
pub async fn lost(pool: &PgPool) -> Result<i64> {
    let (lost,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM workers w
         WHERE w.state <> 'stopped' AND NOT ({ALIVE}) AND w.last_seen > now() - interval '1 day'"
    ))
    .bind(MISSED_ANNOUNCEMENTS)
    .fetch_one(pool)
    .await
    .context("counting lost workers")?;
    Ok(lost)
}

/// Workers alive now, and how many of them are running a job of `run`.
pub async fn alive_and_busy_on(pool: &PgPool, run: RunId) -> Result<(i64, i64)> {
    let counts = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE j.run_id = $2)
         FROM workers w LEFT JOIN jobs j ON j.id = w.current_job WHERE {ALIVE}"
    ))
    .bind(MISSED_ANNOUNCEMENTS)
    .bind(run.0)
    .fetch_one(pool)
    .await
    .context("counting workers")?;
    Ok(counts)
}

/// A worker as `syncd workers` shows it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct WorkerRow {
    pub name: String,
    pub host: String,
    pub device: String,
    pub models: serde_json::Value,
    pub routes: serde_json::Value,
    pub state: String,
    pub current_job: Option<Uuid>,
    /// The kind of the job it holds.
    pub current_kind: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Whether it is alive: announcing, and not stopped.
    pub alive: bool,
}

/// The workers alive now (or every worker ever seen, with `include_gone`), by name.
pub async fn list(pool: &PgPool, include_gone: bool) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query_as::<_, WorkerRow>(&format!(
        "SELECT * FROM (
             SELECT w.name, w.host, w.device, w.models, w.routes, w.state, w.current_job,
                    j.kind AS current_kind, w.first_seen, w.last_seen, {ALIVE} AS alive
             FROM workers w LEFT JOIN jobs j ON j.id = w.current_job
         ) listed
         WHERE alive OR $2
         ORDER BY name"
    ))
    .bind(MISSED_ANNOUNCEMENTS)
    .bind(include_gone)
    .fetch_all(pool)
    .await
    .context("listing workers")?;
    Ok(rows)
}
