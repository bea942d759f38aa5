//! The `runs` table: every statement on it. A run's state changes only through [`set_state`] and
//! [`finish_dataset`], which check [`RunState::can_become`] and match the state they expect.

use crate::run_config::RunConfig;
use crate::state::RunState;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use syncd_proto::RunId;
use uuid::Uuid;

/// A run's row, without its configuration.
pub struct RunRow {
    pub id: RunId,
    pub name: String,
    pub state: RunState,
    pub dataset_state: String,
    pub dataset_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// Inserts a new, `active` run.
pub async fn insert(conn: &mut PgConnection, run: RunId, config: &RunConfig) -> Result<()> {
    sqlx::query!(
        "INSERT INTO runs (id, name, state, config, seed) VALUES ($1, $2, 'active', $3, $4)",
        run.0,
        config.name,
        serde_json::to_value(config)?,
        config.seed as i64
    )
    .execute(conn)
    .await
    .context("inserting the run")?;
    Ok(())
}

/// The run named `name`, if there is one.
pub async fn by_name(executor: impl PgExecutor<'_>, name: &str) -> Result<Option<RunId>> {
    let id = sqlx::query_scalar!("SELECT id FROM runs WHERE name = $1", name)
        .fetch_optional(executor)
        .await
        .context("looking a run up by name")?;
    Ok(id.map(RunId))
}

/// The run whose name, or id, is `name_or_id`.
pub async fn by_name_or_id(pool: &PgPool, name_or_id: &str) -> Result<Option<RunId>> {
    let id = Uuid::parse_str(name_or_id).ok();
    let found = sqlx::query_scalar!(
        "SELECT id FROM runs WHERE name = $1 OR id = $2",
        name_or_id,
        id
    )
    .fetch_optional(pool)
    .await
    .context("looking a run up")?;
    Ok(found.map(RunId))
}

pub async fn get(pool: &PgPool, run: RunId) -> Result<Option<RunRow>> {
    let row = sqlx::query!(
        "SELECT id, name, state, dataset_state, dataset_error, created_at, completed_at
         FROM runs WHERE id = $1",
        run.0
    )
    .fetch_optional(pool)
    .await
    .context("reading a run")?;
    row.map(|row| {
        Ok(RunRow {
            id: RunId(row.id),
            name: row.name,
            state: row.state.parse()?,
            dataset_state: row.dataset_state,
            dataset_error: row.dataset_error,
            created_at: row.created_at,
            completed_at: row.completed_at,
        })
    })
    .transpose()
}

/// Every run, oldest first.
pub async fn all(pool: &PgPool) -> Result<Vec<RunId>> {
    let ids = sqlx::query_scalar!("SELECT id FROM runs ORDER BY created_at")
        .fetch_all(pool)
        .await
        .context("listing runs")?;
    Ok(ids.into_iter().map(RunId).collect())
}

/// A run's configuration as stored, and its state.
pub async fn config_and_state(
    conn: &mut PgConnection,
    run: RunId,
) -> Result<(RunConfig, RunState)> {
    let row = sqlx::query!("SELECT config, state FROM runs WHERE id = $1", run.0)
        .fetch_one(conn)
        .await
        .with_context(|| format!("reading run {run}"))?;
    let config = serde_json::from_value(row.config)
        .with_context(|| format!("the stored run configuration of run {run} does not parse"))?;
    Ok((config, row.state.parse()?))
}

pub async fn state(pool: &PgPool, run: RunId) -> Result<Option<RunState>> {
    let state = sqlx::query_scalar!("SELECT state FROM runs WHERE id = $1", run.0)
        .fetch_optional(pool)
        .await
        .context("reading a run's state")?;
    state.map(|state| state.parse()).transpose()
}

/// What `syncd run watch` shows of the run itself, read with the database's clock.
pub struct ProgressHeader {
    pub name: String,
    pub state: String,
    pub dataset_state: String,
    pub dataset_error: Option<String>,
    pub config: serde_json::Value,
    pub taken_at: DateTime<Utc>,
}

pub async fn progress_header(pool: &PgPool, run: RunId) -> Result<Option<ProgressHeader>> {
    sqlx::query_as!(
        ProgressHeader,
        r#"SELECT name, state, dataset_state, dataset_error, config, now() AS "taken_at!"
           FROM runs WHERE id = $1"#,
        run.0
    )
    .fetch_optional(pool)
    .await
    .context("reading a run")
}

/// Moves `run` from `from` to `to`, or fails if that is not a legal transition or the run
/// changed underneath. A run made active again is no longer completed.
pub async fn set_state(
    conn: &mut PgConnection,
    run: RunId,
    from: RunState,
    to: RunState,
) -> Result<()> {
    if !from.can_become(to) {
        bail!("a {from} run cannot become {to}");
    }
    let updated = sqlx::query!(
        "UPDATE runs SET state = $3,
             completed_at = CASE WHEN $3 = 'active' THEN NULL ELSE completed_at END,
             updated_at = now()
         WHERE id = $1 AND state = $2",
        run.0,
        from.as_str(),
        to.as_str()
    )
    .execute(conn)
    .await
    .context("changing a run's state")?;
    if updated.rows_affected() != 1 {
        bail!("run {run} changed state concurrently (expected {from})");
    }
    Ok(())
}

/// The run's dataset is complete: written, its error cleared; an active run (every object
/// decided) becomes `completed`, a finalised paused or cancelled one keeps its state.
pub async fn finish_dataset(conn: &mut PgConnection, run: RunId, state: RunState) -> Result<()> {
    let completed = state == RunState::Active;
    if completed && !state.can_become(RunState::Completed) {
        bail!("a {state} run cannot become completed");
    }
    let updated = sqlx::query!(
        "UPDATE runs SET dataset_state = 'written', dataset_error = NULL, updated_at = now(),
             state = CASE WHEN $3 THEN 'completed' ELSE state END,
             completed_at = CASE WHEN $3 THEN now() ELSE completed_at END
         WHERE id = $1 AND state = $2",
        run.0,
        state.as_str(),
        completed
    )
    .execute(conn)
    .await
    .context("recording a finished dataset")?;
    if updated.rows_affected() != 1 {
        bail!("run {run} changed state concurrently (expected {state})");
    }
    Ok(())
}

/// Shows a packing failure on the run (`syncd run status`).
pub async fn set_dataset_error(pool: &PgPool, run: RunId, error: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE runs SET dataset_error = $2, updated_at = now() WHERE id = $1",
        run.0,
        error
    )
    .execute(pool)
    .await
    .context("recording a dataset error")?;
    Ok(())
}

/// The run's dataset is no longer complete (the run goes on): new shards will be added.
pub async fn reopen_dataset(conn: &mut PgConnection, run: RunId) -> Result<()> {
    sqlx::query!(
        "UPDATE runs SET dataset_state = 'pending', finalize_requested_at = NULL WHERE id = $1",
        run.0
    )
    .execute(conn)
    .await
    .context("reopening a run's dataset")?;
    Ok(())
}

/// `syncd run finalize`: the packing loop finishes the dataset with what was accepted so far.
pub async fn request_finalize(conn: &mut PgConnection, run: RunId) -> Result<()> {
    sqlx::query!(
        "UPDATE runs SET finalize_requested_at = COALESCE(finalize_requested_at, now()),
             updated_at = now()
         WHERE id = $1",
        run.0
    )
    .execute(conn)
    .await
    .context("requesting a run's finalisation")?;
    Ok(())
}

/// A run with packing to do, and whether it is closing: every object decided and no job left
/// (an active run), or finalised (a paused or cancelled one). Only a closing run gets a last,
/// smaller shard and a complete manifest.
pub struct RunToPack {
    pub run: RunId,
    pub closing: bool,
}

/// Runs with accepted groups to assign to shards, shards being packed, or a closing run whose
/// dataset is not written yet. Every pass asks this, so each question is a scalar subquery that
/// stops at its first row through an index: as `EXISTS`, PostgreSQL may turn it into a join
/// that hashes every accepted group of the run (24 ms at 100K groups).
pub async fn to_pack(pool: &PgPool) -> Result<Vec<RunToPack>> {
    let rows = sqlx::query!(
        r#"WITH candidates AS (
               SELECT r.id, r.state, r.finalize_requested_at FROM runs r
               WHERE r.state <> 'completed' AND r.dataset_state <> 'written'),
           judged AS (
               SELECT c.id,
                      (c.state = 'active'
                       AND (SELECT 1 FROM objects o
                            WHERE o.run_id = c.id AND o.state = 'active' LIMIT 1) IS NULL
                       AND (SELECT 1 FROM jobs j WHERE j.run_id = c.id
                            AND j.state IN ('pending', 'queued', 'running', 'retry_wait')
                            LIMIT 1) IS NULL)
                      OR (c.state IN ('paused', 'cancelled')
                          AND c.finalize_requested_at IS NOT NULL) AS closing
               FROM candidates c)
           SELECT id AS "id!", closing AS "closing!" FROM judged
           WHERE closing
              OR (SELECT 1 FROM groups g WHERE g.run_id = judged.id
                  AND g.decision = 'accepted' AND g.shard IS NULL LIMIT 1) IS NOT NULL
              OR (SELECT 1 FROM dataset_shards s WHERE s.run_id = judged.id
                  AND s.state = 'packing' LIMIT 1) IS NOT NULL"#
    )
    .fetch_all(pool)
    .await
    .context("listing runs with packing to do")?;
    Ok(rows
        .into_iter()
        .map(|row| RunToPack {
            run: RunId(row.id),
            closing: row.closing,
        })
        .collect())
}

/// The watched runs' latest progress: the latest job that finished, or the run's creation, as
/// Unix seconds.
pub async fn watched_last_progress(pool: &PgPool) -> Result<Vec<(String, f64)>> {
    let rows = sqlx::query!(
        r#"SELECT r.name AS run,
                  extract(epoch FROM GREATEST(r.created_at,
                      (SELECT max(j.finished_at) FROM jobs j WHERE j.run_id = r.id)))::float8
                  AS "at!"
           FROM runs r
           WHERE r.state IN ('active', 'paused') OR r.updated_at > now() - interval '10 minutes'"#
    )
    .fetch_all(pool)
    .await
    .context("reading the watched runs' progress")?;
    Ok(rows.into_iter().map(|row| (row.run, row.at)).collect())
}
