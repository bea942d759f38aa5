//! The `outages` table: every outage the factory waited out, so a run's status says how long it
//! waited and for what. Rows are written when a wait ends: by the coordinator for its own waits
//! (a database outage can only be written down once the database is back), and for a worker's
//! wait when its heartbeats stop naming the service or its attempt ends.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use syncd_infra::outage::{EndedOutage, Outages, Service};
use syncd_proto::{JobId, RunId};

/// Records the end of the wait of `job`'s worker, if it was waiting for anything other than
/// `still_waiting_for`. Called in the transaction that changes what the job waits for, before
/// the change.
pub async fn end_job_wait(
    conn: &mut PgConnection,
    job: JobId,
    still_waiting_for: Option<Service>,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO outages (service, observer, run_id, job_id, started_at, ended_at)
         SELECT waiting_for, COALESCE(worker, 'a worker'), run_id, id, waiting_since, now()
         FROM jobs WHERE id = $1 AND waiting_for IS NOT NULL AND waiting_since IS NOT NULL
           AND waiting_for IS DISTINCT FROM $2",
        job.0,
        still_waiting_for.map(|service| service.as_str())
    )
    .execute(conn)
    .await
    .context("recording the end of a job's wait")?;
    Ok(())
}

/// Marks `services` as answering the coordinator again, and writes down the outages this ends.
pub async fn answered(pool: &PgPool, outages: &Outages, services: &[Service]) {
    for service in services {
        if let Some(ended) = outages.up(*service) {
            if let Err(error) = record_coordinator_outage(pool, ended).await {
                tracing::warn!(error = format!("{error:#}"), "outage not recorded");
            }
        }
    }
}

/// Records one of the coordinator's own outages, which ended just now.
pub async fn record_coordinator_outage(pool: &PgPool, ended: EndedOutage) -> Result<()> {
    let ended_at = Utc::now();
    let started_at = ended_at
        - chrono::Duration::from_std(ended.lasted).unwrap_or_else(|_| chrono::Duration::zero());
    sqlx::query!(
        "INSERT INTO outages (service, observer, started_at, ended_at)
         VALUES ($1, 'coordinator', $2, $3)",
        ended.service.as_str(),
        started_at,
        ended_at
    )
    .execute(pool)
    .await
    .context("recording an outage")?;
    Ok(())
}

/// What a run waited for: ended outages of its jobs and of the coordinator during the run, and the
/// jobs waiting now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WaitSummary {
    pub service: Service,
    /// Outages of this service that ended, seen by the coordinator or by a job of the run.
    pub outages: i64,
    /// Wall time during which someone waited for it (overlapping waits counted once).
    pub waited_secs: f64,
    /// Jobs of the run waiting for it now.
    pub jobs_waiting: i64,
    /// When the longest current wait began.
    pub waiting_since: Option<DateTime<Utc>>,
}

pub async fn run_summary(conn: &mut PgConnection, run: RunId) -> Result<Vec<WaitSummary>> {
    // Waits of the run's jobs and the coordinator's waits since the run was created, merged into
    // disjoint intervals per service so that fifty workers waiting out one outage count it once.
    let ended = sqlx::query!(
        r#"WITH waits AS (
             SELECT service, started_at, ended_at FROM outages WHERE run_id = $1
             UNION ALL
             SELECT o.service, o.started_at, o.ended_at FROM outages o, runs r
             WHERE r.id = $1 AND o.observer = 'coordinator' AND o.ended_at >= r.created_at
               AND (r.completed_at IS NULL OR o.started_at <= r.completed_at)
         ), ordered AS (
             SELECT service, started_at, ended_at,
                    max(ended_at) OVER (PARTITION BY service ORDER BY started_at, ended_at
                                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
             FROM waits
         ), grouped AS (
             SELECT service, started_at, ended_at,
                    sum(CASE WHEN reach IS NULL OR started_at > reach THEN 1 ELSE 0 END)
                        OVER (PARTITION BY service ORDER BY started_at, ended_at) AS outage
             FROM ordered
         ), merged AS (
             SELECT service, outage, min(started_at) AS started_at, max(ended_at) AS ended_at
             FROM grouped GROUP BY service, outage
         )
         SELECT service AS "service!", count(*) AS "outages!",
                COALESCE(sum(extract(epoch FROM ended_at - started_at)), 0)::float8 AS "secs!"
         FROM merged GROUP BY service"#,
        run.0
    )
    .fetch_all(&mut *conn)
    .await
    .context("summing a run's outages")?;
    let current = crate::db::jobs::waiting_by_service_of_run(&mut *conn, run).await?;
    let mut summary = Vec::new();
    for service in Service::ALL {
        let (outages, waited_secs) = ended
            .iter()
            .find(|row| row.service == service.as_str())
            .map_or((0, 0.0), |row| (row.outages, row.secs));
        let (jobs_waiting, waiting_since) = current
            .iter()
            .find(|(name, ..)| name == service.as_str())
            .map_or((0, None), |(_, count, since)| (*count, *since));
        if outages > 0 || jobs_waiting > 0 {
            summary.push(WaitSummary {
                service,
                outages,
                waited_secs,
                jobs_waiting,
                waiting_since,
            });
        }
    }
    Ok(summary)
}

/// `12m 5s`, `3.2 s`: how long a wait lasted, for people.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..=59 => format!("{:.1} s", duration.as_secs_f64()),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}
