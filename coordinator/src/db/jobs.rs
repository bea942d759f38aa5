//! The `jobs` table and its history, `job_events`: every statement on them. Creating jobs,
//! reading them, and changing their state. Every state change checks [`JobState::can_become`],
//! matches on the state it expects (so two concurrent changes cannot both win) and appends to the
//! job's history.

use crate::state::JobState;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use syncd_proto::messages::{JobKind, JobMessage, JobPayload, Route, Service, WIRE_VERSION};
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
    /// Whether the attempt said it waits for a service (`syncd jobs`), a wait that ends, and is
    /// recorded as an outage, when the job changes state.
    pub waiting: bool,
}

/// A job's row as the database returns it, before its columns are read into [`JobRow`]. Every
/// query that reads whole jobs selects exactly these columns.
struct JobRecord {
    id: Uuid,
    run_id: Uuid,
    object_id: Uuid,
    group_id: Option<Uuid>,
    kind: String,
    state: String,
    payload: serde_json::Value,
    attempts: i32,
    max_attempts: i32,
    lease_secs: i32,
    worker: Option<String>,
    last_error: Option<String>,
    output: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    waiting: bool,
}

impl TryFrom<JobRecord> for JobRow {
    type Error = anyhow::Error;

    fn try_from(record: JobRecord) -> Result<Self> {
        Ok(Self {
            id: JobId(record.id),
            run_id: RunId(record.run_id),
            object_id: ObjectId(record.object_id),
            group_id: record.group_id.map(GroupId),
            kind: record.kind.parse().map_err(anyhow::Error::msg)?,
            state: record.state.parse()?,
            payload: serde_json::from_value(record.payload).context("stored job payload")?,
            attempts: record.attempts as u32,
            max_attempts: record.max_attempts as u32,
            lease_secs: record.lease_secs as u32,
            worker: record.worker,
            last_error: record.last_error,
            output: record.output,
            created_at: record.created_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            waiting: record.waiting,
        })
    }
}

fn rows(records: Vec<JobRecord>) -> Result<Vec<JobRow>> {
    records.into_iter().map(JobRow::try_from).collect()
}

impl JobRow {
    /// The regeneration a generation job makes (`syncd group regenerate`), if it is one.
    pub fn regeneration(&self) -> Option<u32> {
        match &self.payload {
            JobPayload::Generate(generate) => generate.regeneration,
            _ => None,
        }
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
        sqlx::query!(
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
            &new_ids,
            &columns.run,
            &columns.object,
            &columns.group as &[Option<Uuid>],
            &columns.kind as &[&str],
            &columns.route as &[&str],
            &columns.payload,
            &columns.max_attempts,
            &columns.lease_secs,
        )
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
    sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE id = $1 FOR UPDATE"#,
        id.0
    )
    .fetch_optional(&mut *conn)
    .await
    .context("reading a job")?
    .map(JobRow::try_from)
    .transpose()
}

/// Reads the jobs `ids` (those that exist) and locks their rows until the transaction ends, in
/// id order: one statement where [`lock`] takes one per job.
pub async fn lock_many(conn: &mut PgConnection, ids: &[JobId]) -> Result<Vec<JobRow>> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let records = sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE"#,
        &ids
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading jobs")?;
    rows(records)
}

pub async fn get(conn: &mut PgConnection, id: JobId) -> Result<Option<JobRow>> {
    sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE id = $1"#,
        id.0
    )
    .fetch_optional(&mut *conn)
    .await
    .context("reading a job")?
    .map(JobRow::try_from)
    .transpose()
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
    sqlx::query!(
        "INSERT INTO job_events (job_id, attempt, from_state, to_state, worker, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
        job.0,
        attempt as i32,
        from.map(JobState::as_str),
        to.as_str(),
        worker,
        detail
    )
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
/// row changed underneath. `job` was read under its row lock in this transaction (`lock`,
/// `lock_due`, ...), so what it says of the attempt's wait is current.
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
    if job.waiting {
        crate::outages::end_job_wait(conn, job.id, None).await?;
    }
    // The row and its history in one statement: a report's transition is one round trip.
    let recorded = sqlx::query!(
        "WITH updated AS (
             UPDATE jobs SET
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
             WHERE id = $1 AND state = $2
             RETURNING id
         )
         INSERT INTO job_events (job_id, attempt, from_state, to_state, worker, detail)
         SELECT id, $4, $2, $3, $5, $9 FROM updated",
        job.id.0,
        job.state.as_str(),
        to.as_str(),
        attempts as i32,
        change.worker,
        change.error,
        change.output,
        change.not_before,
        change.detail.or(change.error)
    )
    .execute(&mut *conn)
    .await
    .context("updating a job")?;
    if recorded.rows_affected() != 1 {
        bail!(
            "job {} changed state concurrently (expected {})",
            job.id,
            job.state
        );
    }
    Ok(())
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
    let moved = sqlx::query!(
        "WITH due AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS due (id, state)),
              moved AS (
                 UPDATE jobs j SET state = 'queued', attempts = j.attempts + 1,
                     waiting_for = NULL, waiting_since = NULL, not_before = NULL,
                     lease_expires_at = NULL, finished_at = NULL, updated_at = now()
                 FROM due WHERE j.id = due.id AND j.state = due.state
                 RETURNING j.id, j.attempts, due.state AS from_state)
         INSERT INTO job_events (job_id, attempt, from_state, to_state)
         SELECT id, attempts, from_state, 'queued' FROM moved",
        &ids,
        &states as &[&str]
    )
    .execute(&mut *conn)
    .await
    .context("queueing jobs")?;
    every_job_changed(moved.rows_affected(), jobs.len(), "due jobs")
}

/// Fails unless a statement over `expected` jobs, each matched on the state its caller read,
/// changed every one of them. The caller read them locked, so one that changed meanwhile is a
/// bug; the error rolls the caller's transaction back.
fn every_job_changed(changed: u64, expected: usize, what: &str) -> Result<()> {
    if changed != expected as u64 {
        bail!(
            "{} of {expected} {what} changed state concurrently",
            expected as u64 - changed
        );
    }
    Ok(())
}

/// A worker's word that it started an attempt: the job, the attempt and the worker.
pub struct Start<'a> {
    pub job: JobId,
    pub attempt: u32,
    pub worker: &'a str,
}

/// Moves every job of `starts` that is `queued` at exactly the reported attempt to `running`
/// under that worker, with a fresh lease, and appends its event: one statement for all of them.
/// Returns the jobs it moved; a start it did not apply (another attempt, a job no longer queued,
/// no such job) changed nothing and is the caller's to judge. A job must appear once.
pub async fn start_many(conn: &mut PgConnection, starts: &[Start<'_>]) -> Result<Vec<JobId>> {
    // The statement below hard-codes this step of the machine.
    if !JobState::Queued.can_become(JobState::Running) {
        bail!("jobs cannot go from queued to running");
    }
    let ids: Vec<Uuid> = starts.iter().map(|start| start.job.0).collect();
    let attempts: Vec<i32> = starts.iter().map(|start| start.attempt as i32).collect();
    let workers: Vec<&str> = starts.iter().map(|start| start.worker).collect();
    // A queued attempt waits for nothing (`waiting_for` is cleared on every transition), so no
    // wait ends here.
    let started = sqlx::query_scalar!(
        "WITH reported AS (
             SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[]) AS r (id, attempt, worker)),
              started AS (
                 UPDATE jobs j SET state = 'running', worker = r.worker, not_before = NULL,
                     started_at = now(),
                     lease_expires_at = now() + make_interval(secs => j.lease_secs),
                     finished_at = NULL, updated_at = now()
                 FROM reported r
                 WHERE j.id = r.id AND j.state = 'queued' AND j.attempts = r.attempt
                 RETURNING j.id, j.attempts, r.worker)
         INSERT INTO job_events (job_id, attempt, from_state, to_state, worker)
         SELECT id, attempts, 'queued', 'running', worker FROM started
         RETURNING job_id",
        &ids,
        &attempts,
        &workers as &[&str]
    )
    .fetch_all(&mut *conn)
    .await
    .context("starting jobs")?;
    Ok(started.into_iter().map(JobId).collect())
}

/// A worker's word that an attempt succeeded, as [`succeed_many`] applies it: the job's state
/// and attempt when it was locked, the worker, the output kept and the event's detail.
pub struct Success {
    pub job: JobId,
    pub from: JobState,
    pub attempt: u32,
    pub worker: Option<String>,
    pub output: serde_json::Value,
    pub detail: Option<String>,
}

/// Moves every job of `successes` from the state it was locked in to `succeeded`, as
/// [`transition`] does one at a time, and appends each one's event: one statement for all of
/// them. Fails, changing nothing the caller keeps, unless every job was still in its state at
/// its attempt: the caller held their locks, so one that was not is a bug. No job may be waiting
/// for a service (a wait that ends is [`transition`]'s to record). A job must appear once.
pub async fn succeed_many(conn: &mut PgConnection, successes: &[Success]) -> Result<()> {
    if successes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(successes.len());
    let mut from_states = Vec::with_capacity(successes.len());
    let mut attempts = Vec::with_capacity(successes.len());
    let mut workers = Vec::with_capacity(successes.len());
    let mut outputs = Vec::with_capacity(successes.len());
    let mut details = Vec::with_capacity(successes.len());
    for success in successes {
        if !success.from.can_become(JobState::Succeeded) {
            bail!(
                "job {} cannot go from {} to succeeded",
                success.job,
                success.from
            );
        }
        ids.push(success.job.0);
        from_states.push(success.from.as_str());
        attempts.push(success.attempt as i32);
        workers.push(success.worker.as_deref());
        outputs.push(&success.output);
        details.push(success.detail.as_deref());
    }
    // The columns as `transition` sets them for a success (no error, no retry time, no lease).
    let recorded = sqlx::query!(
        "WITH reported AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::jsonb[],
                                  $6::text[])
                 AS r (id, from_state, attempt, worker, output, detail)),
              succeeded AS (
                 UPDATE jobs j SET state = 'succeeded', waiting_for = NULL, waiting_since = NULL,
                     worker = COALESCE(r.worker, j.worker), output = r.output, not_before = NULL,
                     lease_expires_at = NULL, finished_at = now(), updated_at = now()
                 FROM reported r
                 WHERE j.id = r.id AND j.state = r.from_state AND j.attempts = r.attempt
                 RETURNING j.id, j.attempts, r.from_state, r.worker, r.detail)
         INSERT INTO job_events (job_id, attempt, from_state, to_state, worker, detail)
         SELECT id, attempts, from_state, 'succeeded', worker, detail FROM succeeded",
        &ids,
        &from_states as &[&str],
        &attempts,
        &workers as &[Option<&str>],
        &outputs as &[&serde_json::Value],
        &details as &[Option<&str>]
    )
    .execute(&mut *conn)
    .await
    .context("recording jobs' successes")?;
    every_job_changed(recorded.rows_affected(), successes.len(), "succeeded jobs")
}

/// A heartbeat of `job`'s running attempt: its lease starts again, and it waits for `waiting_for`
/// (since the first heartbeat that named it). A wait that ends is recorded in `outages`.
pub async fn heartbeat(
    conn: &mut PgConnection,
    job: &JobRow,
    waiting_for: Option<Service>,
) -> Result<()> {
    if job.waiting {
        crate::outages::end_job_wait(conn, job.id, waiting_for).await?;
    }
    let waiting_for = waiting_for.map(|service| service.as_str());
    sqlx::query!(
        "UPDATE jobs SET
             lease_expires_at = now() + make_interval(secs => lease_secs),
             waiting_since = CASE WHEN $2::text IS NULL THEN NULL
                                  WHEN waiting_for IS NOT DISTINCT FROM $2 THEN waiting_since
                                  ELSE now() END,
             waiting_for = $2,
             updated_at = now()
         WHERE id = $1 AND state = 'running'",
        job.id.0,
        waiting_for
    )
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
    let records = sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE run_id = $1 AND state = ANY($2) ORDER BY created_at FOR UPDATE"#,
        run.0,
        &states as &[&str]
    )
    .fetch_all(&mut *conn)
    .await
    .context("listing jobs")?;
    rows(records)
}

/// Mean wall time of a run's succeeded attempts of one kind, per object family (`rigid`,
/// `deformable`), with how many jobs each mean is over. From the last start to the finish, so a
/// retried job counts its successful attempt only.
pub async fn mean_seconds_by_family(
    conn: &mut PgConnection,
    run: RunId,
    kind: JobKind,
) -> Result<Vec<(String, f64, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT o.spec->>'type' AS family,
                  avg(extract(epoch FROM j.finished_at - j.started_at))::float8 AS mean_secs,
                  count(*) AS "jobs!"
           FROM jobs j JOIN objects o ON o.id = j.object_id
           WHERE j.run_id = $1 AND j.kind = $2 AND j.state = 'succeeded'
             AND j.started_at IS NOT NULL AND j.finished_at IS NOT NULL
           GROUP BY 1 ORDER BY 1"#,
        run.0,
        kind.as_str()
    )
    .fetch_all(&mut *conn)
    .await
    .context("measuring job durations")?;
    Ok(rows
        .into_iter()
        .filter_map(|row| Some((row.family?, row.mean_secs?, row.jobs)))
        .collect())
}

/// One entry of a job's history.
#[derive(Debug, Serialize)]
pub struct JobEvent {
    pub at: DateTime<Utc>,
    pub attempt: i32,
    pub from_state: Option<String>,
    pub to_state: String,
    pub worker: Option<String>,
    pub detail: Option<String>,
}

/// A job's history, oldest first.
pub async fn history(pool: &PgPool, job: JobId) -> Result<Vec<JobEvent>> {
    sqlx::query_as!(
        JobEvent,
        "SELECT at, attempt, from_state, to_state, worker, detail FROM job_events
         WHERE job_id = $1 ORDER BY id",
        job.0
    )
    .fetch_all(pool)
    .await
    .context("reading a job's history")
}

/// An object's jobs, oldest first.
pub async fn of_object(pool: &PgPool, object: ObjectId) -> Result<Vec<JobRow>> {
    let records = sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE object_id = $1 ORDER BY created_at"#,
        object.0
    )
    .fetch_all(pool)
    .await
    .context("listing an object's jobs")?;
    rows(records)
}

pub async fn exists(pool: &PgPool, job: JobId) -> Result<bool> {
    let found = sqlx::query_scalar!("SELECT id FROM jobs WHERE id = $1", job.0)
        .fetch_optional(pool)
        .await
        .context("looking a job up")?;
    Ok(found.is_some())
}

/// A job in a listing: what it is, where it stands, and what went wrong last.
#[derive(Debug, Serialize)]
pub struct JobListing {
    pub id: Uuid,
    pub run_id: Uuid,
    pub kind: String,
    pub route: String,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub worker: Option<String>,
    pub object_id: Uuid,
    pub group_id: Option<Uuid>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Which jobs a listing shows: every filter that is set must match.
pub struct ListingFilter<'a> {
    pub run: Option<RunId>,
    pub state: Option<JobState>,
    pub kind: Option<&'a str>,
    /// The last job of the previous page: the listing starts after it.
    pub after: Option<JobId>,
}

/// Up to `limit` jobs in the order they were created. Keyed by the last job shown rather than by
/// an offset, so a page costs the same deep into a million jobs.
pub async fn listing(
    pool: &PgPool,
    filter: &ListingFilter<'_>,
    limit: i64,
) -> Result<Vec<JobListing>> {
    sqlx::query_as!(
        JobListing,
        "SELECT id, run_id, kind, route, state, attempts, max_attempts, worker, object_id,
                group_id, last_error, created_at, finished_at
         FROM jobs
         WHERE ($1::uuid IS NULL OR run_id = $1)
           AND ($2::text IS NULL OR state = $2)
           AND ($3::text IS NULL OR kind = $3)
           AND ($4::uuid IS NULL OR (created_at, id) > (SELECT created_at, id FROM jobs WHERE id = $4))
         ORDER BY created_at, id
         LIMIT $5",
        filter.run.map(|run| run.0),
        filter.state.map(JobState::as_str),
        filter.kind,
        filter.after.map(|job| job.0),
        limit
    )
    .fetch_all(pool)
    .await
    .context("listing jobs")
}

/// How many of a run's jobs are in each state.
pub async fn count_by_state_of_run(pool: &PgPool, run: RunId) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT state, count(*) AS "jobs!" FROM jobs WHERE run_id = $1 GROUP BY state"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("counting a run's jobs")?;
    Ok(rows.into_iter().map(|row| (row.state, row.jobs)).collect())
}

/// Running jobs whose workers wait for a service, per service, over all runs.
pub async fn waiting_by_service(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT waiting_for AS "service!", count(*) AS "jobs!" FROM jobs
           WHERE state = 'running' AND waiting_for IS NOT NULL GROUP BY waiting_for"#
    )
    .fetch_all(pool)
    .await
    .context("counting waiting jobs")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.service, row.jobs))
        .collect())
}

/// A run's running jobs whose workers wait for a service, per service: how many, and since when.
pub async fn waiting_by_service_of_run(
    conn: &mut PgConnection,
    run: RunId,
) -> Result<Vec<(String, i64, Option<DateTime<Utc>>)>> {
    let rows = sqlx::query!(
        r#"SELECT waiting_for AS "service!", count(*) AS "jobs!", min(waiting_since) AS since
           FROM jobs WHERE run_id = $1 AND state = 'running' AND waiting_for IS NOT NULL
           GROUP BY waiting_for"#,
        run.0
    )
    .fetch_all(conn)
    .await
    .context("listing waiting jobs")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.service, row.jobs, row.since))
        .collect())
}

/// Locks up to `limit` jobs of `route` that are due, oldest first: `pending` jobs of active runs
/// (regenerations also of finished runs, unless paused) and `retry_wait` jobs whose backoff has
/// passed. Rows another transaction holds are skipped, not waited for.
pub async fn lock_due(conn: &mut PgConnection, route: Route, limit: i64) -> Result<Vec<JobRow>> {
    let records = sqlx::query_as!(
        JobRecord,
        r#"SELECT j.id, j.run_id, j.object_id, j.group_id, j.kind, j.state, j.payload, j.attempts,
                j.max_attempts, j.lease_secs, j.worker, j.last_error, j.output, j.created_at,
                j.started_at, j.finished_at, j.waiting_for IS NOT NULL AS "waiting!"
         FROM jobs j JOIN runs r ON r.id = j.run_id
         WHERE j.route = $1
           AND (r.state = 'active' OR (r.state <> 'paused' AND j.payload ? 'regeneration'))
           AND (j.state = 'pending' OR (j.state = 'retry_wait' AND j.not_before <= now()))
         ORDER BY j.created_at
         LIMIT $2
         FOR UPDATE OF j SKIP LOCKED"#,
        route.as_str(),
        limit
    )
    .fetch_all(conn)
    .await
    .context("selecting due jobs")?;
    rows(records)
}

/// The trace context each job's spans join, in the order of `jobs`: its group's, or for jobs
/// before groups exist its own; `None` where no dispatch started one yet.
pub async fn trace_contexts(conn: &mut PgConnection, jobs: &[Uuid]) -> Result<Vec<Option<String>>> {
    sqlx::query_scalar!(
        "SELECT COALESCE(g.traceparent, j.traceparent)
         FROM UNNEST($1::uuid[]) WITH ORDINALITY AS asked (id, n)
         JOIN jobs j ON j.id = asked.id LEFT JOIN groups g ON g.id = j.group_id
         ORDER BY asked.n",
        jobs
    )
    .fetch_all(conn)
    .await
    .context("reading the jobs' trace contexts")
}

/// Keeps the trace contexts started for jobs that have no group.
pub async fn keep_trace_contexts(
    conn: &mut PgConnection,
    jobs: &[Uuid],
    traceparents: &[String],
) -> Result<()> {
    sqlx::query!(
        "UPDATE jobs j SET traceparent = kept.traceparent
         FROM UNNEST($1::uuid[], $2::text[]) AS kept (id, traceparent)
         WHERE j.id = kept.id",
        jobs,
        traceparents
    )
    .execute(conn)
    .await
    .context("keeping the jobs' trace contexts")?;
    Ok(())
}

/// Locks up to `limit` running jobs whose lease expired, among jobs whose lease is shorter than
/// `listening_secs` (see `crate::reaper`).
pub async fn lock_expired(
    conn: &mut PgConnection,
    listening_secs: f64,
    limit: i64,
) -> Result<Vec<JobRow>> {
    let records = sqlx::query_as!(
        JobRecord,
        r#"SELECT id, run_id, object_id, group_id, kind, state, payload, attempts, max_attempts,
                lease_secs, worker, last_error, output, created_at, started_at, finished_at,
                waiting_for IS NOT NULL AS "waiting!"
         FROM jobs WHERE state = 'running' AND lease_expires_at < now() AND lease_secs < $1::float8
         LIMIT $2 FOR UPDATE SKIP LOCKED"#,
        listening_secs,
        limit
    )
    .fetch_all(conn)
    .await
    .context("selecting expired leases")?;
    rows(records)
}

/// How many of a run's jobs are in each (kind, state).
pub async fn count_by_kind_and_state_of_run(
    pool: &PgPool,
    run: RunId,
) -> Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT kind, state, count(*) AS "jobs!" FROM jobs WHERE run_id = $1
           GROUP BY kind, state"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("counting a run's jobs")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.kind, row.state, row.jobs))
        .collect())
}

/// The payload of the job that first generated `group` (not a regeneration of it).
pub async fn first_generation_payload(
    conn: &mut PgConnection,
    group: GroupId,
) -> Result<Option<serde_json::Value>> {
    sqlx::query_scalar!(
        "SELECT payload FROM jobs
         WHERE group_id = $1 AND kind = 'generate' AND NOT payload ? 'regeneration'
         ORDER BY created_at LIMIT 1",
        group.0
    )
    .fetch_optional(conn)
    .await
    .context("reading a group's generation job")
}

/// The outputs of a run's succeeded prior jobs, with their objects.
pub async fn succeeded_prior_outputs(
    pool: &PgPool,
    run: RunId,
) -> Result<Vec<(ObjectId, Option<serde_json::Value>)>> {
    let rows = sqlx::query!(
        "SELECT object_id, output FROM jobs
         WHERE run_id = $1 AND kind = 'prior' AND state = 'succeeded'",
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing prior outputs")?;
    Ok(rows
        .into_iter()
        .map(|row| (ObjectId(row.object_id), row.output))
        .collect())
}

/// The objects of a run whose prior job has not ended.
pub async fn objects_with_prior_in_flight(pool: &PgPool, run: RunId) -> Result<Vec<ObjectId>> {
    let objects = sqlx::query_scalar!(
        "SELECT object_id FROM jobs WHERE run_id = $1 AND kind = 'prior'
           AND state IN ('pending', 'queued', 'running', 'retry_wait')",
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing prior jobs in flight")?;
    Ok(objects.into_iter().map(ObjectId).collect())
}
