//! The `workers` table: the latest announcement of each worker, for `syncd workers`.
//!
//! Announcements are snapshots, and only the newest matters: recording one replaces what was
//! known of its worker. A worker is alive while its announcements keep coming; after three
//! missed ones (or a `stopped` announcement) it is gone: the `worker_liveness` view says which. Nothing here changes a job: leases
//! follow the jobs' own heartbeats (`jobs::heartbeat`).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use syncd_proto::messages::WorkerAnnouncement;
use syncd_proto::RunId;
use uuid::Uuid;

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
    sqlx::query!(
        "INSERT INTO workers (name, host, device, models, routes, state, current_job, interval_secs)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                              $6::text[], $7::uuid[], $8::int[])
         ON CONFLICT (name) DO UPDATE SET
             host = EXCLUDED.host, device = EXCLUDED.device, models = EXCLUDED.models,
             routes = EXCLUDED.routes, state = EXCLUDED.state,
             current_job = EXCLUDED.current_job, interval_secs = EXCLUDED.interval_secs,
             last_seen = now()",
        &columns.name as &[&str],
        &columns.host as &[&str],
        &columns.device as &[&str],
        &columns.models,
        &columns.routes,
        &columns.state as &[&str],
        &columns.current_job as &[Option<Uuid>],
        &columns.interval_secs
    )
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
    let rows = sqlx::query!(
        r#"SELECT state AS "state!", count(*) AS "workers!" FROM worker_liveness
           WHERE alive GROUP BY state"#
    )
    .fetch_all(pool)
    .await
    .context("counting workers")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.state, row.workers))
        .collect())
}

/// Workers gone without saying goodbye (announcements overdue, no `stopped`) in the last day,
/// for the `syncd_workers_lost` gauge and its alert: a worker that crashed or lost its host.
pub async fn lost(pool: &PgPool) -> Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "lost!" FROM worker_liveness
           WHERE state <> 'stopped' AND NOT alive AND last_seen > now() - interval '1 day'"#
    )
    .fetch_one(pool)
    .await
    .context("counting lost workers")
}

/// Workers alive now, and how many of them are running a job of `run`.
pub async fn alive_and_busy_on(pool: &PgPool, run: RunId) -> Result<(i64, i64)> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "alive!", count(*) FILTER (WHERE j.run_id = $1) AS "busy!"
           FROM worker_liveness w LEFT JOIN jobs j ON j.id = w.current_job WHERE w.alive"#,
        run.0
    )
    .fetch_one(pool)
    .await
    .context("counting workers")?;
    Ok((row.alive, row.busy))
}

/// A worker as `syncd workers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
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
    sqlx::query_as!(
        WorkerRow,
        r#"SELECT w.name, w.host, w.device, w.models, w.routes, w.state, w.current_job,
                  j.kind AS "current_kind?", w.first_seen, w.last_seen, l.alive AS "alive!"
           FROM workers w JOIN worker_liveness l ON l.name = w.name
           LEFT JOIN jobs j ON j.id = w.current_job
           WHERE l.alive OR $1
           ORDER BY w.name"#,
        include_gone
    )
    .fetch_all(pool)
    .await
    .context("listing workers")
}
