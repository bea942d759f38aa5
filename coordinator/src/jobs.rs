//! The job table: creating jobs, reading them, and changing their state. Every state change
//! checks [`JobState::can_become`], matches on the state it expects (so two concurrent changes
//! cannot both win) and appends to the job's history.

use crate::state::JobState;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use syncd_proto::messages::{JobKind, JobMessage, JobPayload, Service, WIRE_VERSION};
use syncd_proto::{GroupId, JobId, ObjectId, RunId};
use uuid::Uuid;

/// A job as stored.
#[derive(Clone, Debug)]
pub struct JobRow {
    pub id: JobId,
    pub run_id: RunId,
    pub object_id: ObjectId,
    pub group_id: Option<GroupId>,
    pub kind: JobKind,
    pub state: JobState,
    pub payload: JobPayload,
    pub attempts: u32,
    pub max_attempts: u32,
    pub lease_secs: u32,
    pub worker: Option<String>,
    pub last_error: Option<String>,
    pub output: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub const JOB_COLUMNS: &str = "id, run_id, object_id, group_id, kind, state, payload, attempts, \
     max_attempts, lease_secs, worker, last_error, output, created_at, started_at, finished_at";

impl JobRow {
    /// The regeneration a generation job makes (`syncd group regenerate`), if it is one.
    pub fn regeneration(&self) -> Option<u32> {
        match &self.payload {
            JobPayload::Generate(generate) => generate.regeneration,
            _ => None,
        }
    }

    pub fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self> {
        let kind: String = row.try_get("kind")?;
        let state: String = row.try_get("state")?;
        let payload: serde_json::Value = row.try_get("payload")?;
        Ok(Self {
            id: JobId(row.try_get("id")?),
            run_id: RunId(row.try_get("run_id")?),
            object_id: ObjectId(row.try_get("object_id")?),
            group_id: row.try_get::<Option<Uuid>, _>("group_id")?.map(GroupId),
            kind: kind.parse().map_err(anyhow::Error::msg)?,
            state: state.parse()?,
            payload: serde_json::from_value(payload).context("stored job payload")?,
            attempts: row.try_get::<i32, _>("attempts")? as u32,
            max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
            lease_secs: row.try_get::<i32, _>("lease_secs")? as u32,
            worker: row.try_get("worker")?,
            last_error: row.try_get("last_error")?,
            output: row.try_get("output")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }

    /// The message that carries the job's current attempt to a worker.
    pub fn message(&self) -> JobMessage {
        JobMessage {
            version: WIRE_VERSION,
            job_id: self.id,
            attempt: self.attempts,
            run_id: self.run_id,
            object_id: self.object_id,
            heartbeat_secs: heartbeat_secs(self.lease_secs),
            payload: self.payload.clone(),
        }
    }
}

/// How often a worker holding an attempt sends a heartbeat: four per lease, so a single lost or
/// delayed heartbeat never costs an attempt, and at least every 30 s, so `syncd` shows what a
/// worker waits for soon after it starts waiting.
pub fn heartbeat_secs(lease_secs: u32) -> u32 {
    (lease_secs / 4).clamp(1, 30)
}

/// What the planner asks for.
pub struct NewJob {
    pub run_id: RunId,
    pub object_id: ObjectId,
    pub group_id: Option<GroupId>,
    pub payload: JobPayload,
    pub max_attempts: u32,
    pub lease_secs: u64,
}

pub async fn insert(conn: &mut PgConnection, job: NewJob) -> Result<JobId> {
    let ids = insert_many(conn, vec![job]).await?;
    ids.into_iter().next().context("inserting a job")
}

/// Rows of jobs (and their `created` events) written by one statement.
const INSERT_BATCH: usize = 5_000;

/// Inserts `jobs` as `pending`, each with its `created` event, a few thousand per statement;
/// returns their new ids in order.
pub async fn insert_many(conn: &mut PgConnection, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(jobs.len());
    for batch in jobs.chunks(INSERT_BATCH) {
        let new_ids: Vec<Uuid> = batch.iter().map(|_| JobId::new_random().0).collect();
        let mut columns = JobColumns::default();
        for job in batch {
            columns.run.push(job.run_id.0);
            columns.object.push(job.object_id.0);
            columns.group.push(job.group_id.map(|group| group.0));
            columns.kind.push(job.payload.kind().as_str());
            columns.route.push(job.payload.route().as_str());
            columns.payload.push(serde_json::to_value(&job.payload)?);
            columns.max_attempts.push(job.max_attempts as i32);
            columns
                .lease_secs
                .push(job.lease_secs.min(i32::MAX as u64) as i32);
        }
        sqlx::query(
            "WITH new AS (
                 INSERT INTO jobs (id, run_id, object_id, group_id, kind, route, state, payload,
                                   max_attempts, lease_secs)
                 SELECT id, run_id, object_id, group_id, kind, route, 'pending', payload,
                        max_attempts, lease_secs
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[],
                             $6::text[], $7::jsonb[], $8::int[], $9::int[])
                      AS new (id, run_id, object_id, group_id, kind, route, payload,
                              max_attempts, lease_secs)
                 RETURNING id)
             INSERT INTO job_events (job_id, attempt, from_state, to_state, detail)
             SELECT id, 0, NULL, 'pending', 'created' FROM new",
        )
        .bind(&new_ids)
        .bind(&columns.run)
        .bind(&columns.object)
        .bind(&columns.group)
        .bind(&columns.kind)
        .bind(&columns.route)
        .bind(&columns.payload)
        .bind(&columns.max_attempts)
        .bind(&columns.lease_secs)
        .execute(&mut *conn)
        .await
        .context("inserting jobs")?;
        ids.extend(new_ids.into_iter().map(JobId));
    }
    Ok(ids)
}

/// The columns of a batch of new jobs, one array each, for `UNNEST`.
#[derive(Default)]
struct JobColumns {
    run: Vec<Uuid>,
    object: Vec<Uuid>,
    group: Vec<Option<Uuid>>,
    kind: Vec<&'static str>,
    route: Vec<&'static str>,
    payload: Vec<serde_json::Value>,
    max_attempts: Vec<i32>,
    lease_secs: Vec<i32>,
}

/// Reads a job and locks its row until the transaction ends.
pub async fn lock(conn: &mut PgConnection, id: JobId) -> Result<Option<JobRow>> {
    let row = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await
    .context("reading a job")?;
    row.as_ref().map(JobRow::from_row).transpose()
}

pub async fn get(conn: &mut PgConnection, id: JobId) -> Result<Option<JobRow>> {
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await
        .context("reading a job")?;
    row.as_ref().map(JobRow::from_row).transpose()
}

pub async fn record_event(
    conn: &mut PgConnection,
    job: JobId,
    attempt: u32,
    from: Option<JobState>,
    to: JobState,
    worker: Option<&str>,
    detail: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, attempt, from_state, to_state, worker, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(job.0)
    .bind(attempt as i32)
    .bind(from.map(JobState::as_str))
    .bind(to.as_str())
    .bind(worker)
    .bind(detail)
    .execute(conn)
    .await
    .context("recording a job event")?;
    Ok(())
}

/// The columns a transition may set besides the state.
#[derive(Default)]
pub struct Change<'a> {
    pub worker: Option<&'a str>,
    pub error: Option<&'a str>,
    pub output: Option<serde_json::Value>,
    pub not_before: Option<DateTime<Utc>>,
    pub detail: Option<&'a str>,
}

/// Moves `job` from its current state to `to`, or fails if that is not a legal transition or the
/// row changed underneath.
pub async fn transition(
    conn: &mut PgConnection,
    job: &JobRow,
    to: JobState,
    change: Change<'_>,
) -> Result<()> {
    if !job.state.can_become(to) {
        bail!("job {} cannot go from {} to {to}", job.id, job.state);
    }
    let attempts = match (job.state, to) {
        (JobState::Pending | JobState::RetryWait, JobState::Queued) => job.attempts + 1,
        (_, JobState::Pending) => 0,
        _ => job.attempts,
    };
    // Whatever the attempt was waiting for, it waits no more.
    crate::outages::end_job_wait(conn, job.id, None).await?;
    let updated = sqlx::query(
        "UPDATE jobs SET
             state = $3,
             waiting_for = NULL,
             waiting_since = NULL,
             attempts = $4,
             worker = COALESCE($5, worker),
             last_error = COALESCE($6, last_error),
             output = COALESCE($7, output),
             not_before = $8,
             started_at = CASE WHEN $3 = 'running' THEN now() ELSE started_at END,
             lease_expires_at = CASE WHEN $3 = 'running'
                                     THEN now() + make_interval(secs => lease_secs)
                                     ELSE NULL END,
             finished_at = CASE WHEN $3 IN ('succeeded', 'failed', 'dead_lettered', 'cancelled')
                                THEN now() ELSE NULL END,
             updated_at = now()
         WHERE id = $1 AND state = $2",
    )
    .bind(job.id.0)
    .bind(job.state.as_str())
    .bind(to.as_str())
    .bind(attempts as i32)
    .bind(change.worker)
    .bind(change.error)
    .bind(change.output)
    .bind(change.not_before)
    .execute(&mut *conn)
    .await
    .context("updating a job")?;
    if updated.rows_affected() != 1 {
        bail!(
            "job {} changed state concurrently (expected {})",
            job.id,
            job.state
        );
    }
    let detail = change.detail.or(change.error);
    record_event(
        conn,
        job.id,
        attempts,
        Some(job.state),
        to,
        change.worker,
        detail,
    )
    .await
}

/// Moves due jobs (each `pending` or `retry_wait`, locked by the caller) to `queued` with their
/// next attempt, and appends their events: two statements for the whole batch. Fails, changing
/// nothing the caller commits, if any job is not in the state read.
pub async fn queue_many(conn: &mut PgConnection, jobs: &[JobRow]) -> Result<()> {
    if let Some(job) = jobs
        .iter()
        .find(|job| !job.state.can_become(JobState::Queued))
    {
        bail!("job {} cannot go from {} to queued", job.id, job.state);
    }
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id.0).collect();
    let states: Vec<&str> = jobs.iter().map(|job| job.state.as_str()).collect();
    let moved = sqlx::query(
        "WITH due AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS due (id, state)),
              moved AS (
                 UPDATE jobs j SET state = 'queued', attempts = j.attempts + 1,
                     waiting_for = NULL, waiting_since = NULL, not_before = NULL,
                     lease_expires_at = NULL, finished_at = NULL, updated_at = now()
                 FROM due WHERE j.id = due.id AND j.state = due.state
                 RETURNING j.id, j.attempts, due.state AS from_state)
         INSERT INTO job_events (job_id, attempt, from_state, to_state)
         SELECT id, attempts, from_state, 'queued' FROM moved",
    )
    .bind(&ids)
    .bind(&states)
    .execute(&mut *conn)
    .await
    .context("queueing jobs")?;
    if moved.rows_affected() != jobs.len() as u64 {
        bail!(
            "{} of {} due jobs changed state concurrently",
            jobs.len() as u64 - moved.rows_affected(),
            jobs.len()
        );
    }
    Ok(())
}

/// A heartbeat of `job`'s running attempt: its lease starts again, and it waits for `waiting_for`
/// (since the first heartbeat that named it). A wait that ends is recorded in `outages`.
pub async fn heartbeat(
    conn: &mut PgConnection,
    job: &JobRow,
    waiting_for: Option<Service>,
) -> Result<()> {
    crate::outages::end_job_wait(conn, job.id, waiting_for).await?;
    let waiting_for = waiting_for.map(|service| service.as_str());
    sqlx::query(
        "UPDATE jobs SET
             lease_expires_at = now() + make_interval(secs => lease_secs),
             waiting_since = CASE WHEN $2::text IS NULL THEN NULL
                                  WHEN waiting_for IS NOT DISTINCT FROM $2 THEN waiting_since
                                  ELSE now() END,
             waiting_for = $2,
             updated_at = now()
         WHERE id = $1 AND state = 'running'",
    )
    .bind(job.id.0)
    .bind(waiting_for)
    .execute(&mut *conn)
    .await
    .context("recording a heartbeat")?;
    Ok(())
}

/// Jobs of a run in the given states, oldest first.
pub async fn of_run_in_states(
    conn: &mut PgConnection,
    run: RunId,
    states: &[JobState],
) -> Result<Vec<JobRow>> {
    let states: Vec<&str> = states.iter().map(|state| state.as_str()).collect();
    let rows = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE run_id = $1 AND state = ANY($2) ORDER BY created_at FOR UPDATE"
    ))
    .bind(run.0)
    .bind(&states)
    .fetch_all(&mut *conn)
    .await
    .context("listing jobs")?;
    rows.iter().map(JobRow::from_row).collect()
}

/// Mean wall time of a run's succeeded attempts of one kind, per object family (`rigid`,
/// `deformable`), with how many jobs each mean is over. From the last start to the finish, so a
/// retried job counts its successful attempt only.
pub async fn mean_seconds_by_family(
    conn: &mut PgConnection,
    run: RunId,
    kind: JobKind,
) -> Result<Vec<(String, f64, i64)>> {
    let rows: Vec<(Option<String>, Option<f64>, i64)> = sqlx::query_as(
        "SELECT o.spec->>'type',
                avg(extract(epoch FROM j.finished_at - j.started_at))::float8, count(*)
         FROM jobs j JOIN objects o ON o.id = j.object_id
         WHERE j.run_id = $1 AND j.kind = $2 AND j.state = 'succeeded'
           AND j.started_at IS NOT NULL AND j.finished_at IS NOT NULL
         GROUP BY 1 ORDER BY 1",
    )
    .bind(run.0)
    .bind(kind.as_str())
    .fetch_all(&mut *conn)
    .await
    .context("measuring job durations")?;
    Ok(rows
        .into_iter()
        .filter_map(|(family, mean, count)| Some((family?, mean?, count)))
        .collect())
}
