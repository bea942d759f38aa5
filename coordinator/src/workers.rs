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

/// Records the latest of `announcements` of each worker (they are in the order the broker
/// delivered them, which is each worker's own order), in one statement.
pub async fn record_latest(pool: &PgPool, announcements: &[WorkerAnnouncement]) -> Result<()> {
    let mut latest: std::collections::BTreeMap<&str, &WorkerAnnouncement> = Default::default();
    for announcement in announcements {
        latest.insert(&announcement.worker, announcement);
    }
    let mut columns = AnnouncementColumns::default();
    for announcement in latest.values() {
        columns.name.push(&announcement.worker);
        columns.host.push(&announcement.host);
        columns.device.push(&announcement.device);
        columns
            .models
            .push(serde_json::to_value(&announcement.models)?);
        columns
            .routes
            .push(serde_json::to_value(&announcement.routes)?);
        columns.state.push(announcement.state.as_str());
        columns
            .current_job
            .push(announcement.current_job.map(|job| job.0));
        columns
            .interval_secs
            .push(announcement.interval_secs.min(i32::MAX as u32) as i32);
    }
    sqlx::query(
        "INSERT INTO workers (name, host, device, models, routes, state, current_job, interval_secs)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                              $6::text[], $7::uuid[], $8::int[])
         ON CONFLICT (name) DO UPDATE SET
             host = EXCLUDED.host, device = EXCLUDED.device, models = EXCLUDED.models,
             routes = EXCLUDED.routes, state = EXCLUDED.state,
             current_job = EXCLUDED.current_job, interval_secs = EXCLUDED.interval_secs,
             last_seen = now()",
    )
    .bind(&columns.name)
    .bind(&columns.host)
    .bind(&columns.device)
    .bind(&columns.models)
    .bind(&columns.routes)
    .bind(&columns.state)
    .bind(&columns.current_job)
    .bind(&columns.interval_secs)
    .execute(pool)
    .await
    .context("recording worker announcements")?;
    Ok(())
}

/// The columns of a batch of announcements, one array each, for `UNNEST`.
#[derive(Default)]
struct AnnouncementColumns<'a> {
    name: Vec<&'a str>,
    host: Vec<&'a str>,
    device: Vec<&'a str>,
    models: Vec<serde_json::Value>,
    routes: Vec<serde_json::Value>,
    state: Vec<&'static str>,
    current_job: Vec<Option<uuid::Uuid>>,
    interval_secs: Vec<i32>,
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
