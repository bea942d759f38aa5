//! The `objects` table: every statement on it. An object's state changes only through
//! [`finish`], [`finish_many`], [`cancel_active_of_run`] and [`reopen`], which allow only what
//! [`ObjectState::can_become`] allows and match the state they expect.

use crate::state::ObjectState;
use anyhow::{bail, Context, Result};
use sqlx::{PgConnection, PgPool};
use syncd_proto::{ObjectId, RunId};

/// Rows of objects written by one statement.
const INSERT_BATCH: usize = 5_000;

/// A new object of a run being created.
pub struct NewObject {
    pub id: ObjectId,
    pub ordinal: i32,
    pub spec: serde_json::Value,
    pub backgrounds: Option<serde_json::Value>,
    pub descriptions: Option<serde_json::Value>,
}

/// Inserts `objects` of `run` as `active`, a few thousand per statement. The rows are moved
/// into the statement's columns, not copied: a run's objects can be 100K.
pub async fn insert_many(
    conn: &mut PgConnection,
    run: RunId,
    objects: Vec<NewObject>,
) -> Result<()> {
    let mut objects = objects.into_iter().peekable();
    while objects.peek().is_some() {
        let (mut ids, mut ordinals, mut specs, mut backgrounds, mut descriptions) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for object in objects.by_ref().take(INSERT_BATCH) {
            ids.push(object.id.0);
            ordinals.push(object.ordinal);
            specs.push(object.spec);
            backgrounds.push(object.backgrounds);
            descriptions.push(object.descriptions);
        }
        sqlx::query!(
            "INSERT INTO objects (id, run_id, ordinal, spec, state, backgrounds, descriptions)
             SELECT id, $2, ordinal, spec, 'active', backgrounds, descriptions
             FROM UNNEST($1::uuid[], $3::int[], $4::jsonb[], $5::jsonb[], $6::jsonb[])
                  AS new (id, ordinal, spec, backgrounds, descriptions)",
            &ids,
            run.0,
            &ordinals,
            &specs,
            &backgrounds as &[Option<serde_json::Value>],
            &descriptions as &[Option<serde_json::Value>]
        )
        .execute(&mut *conn)
        .await
        .context("inserting objects")?;
    }
    Ok(())
}

/// An object's specification and backgrounds, as stored.
pub async fn spec_and_backgrounds(
    conn: &mut PgConnection,
    object: ObjectId,
) -> Result<(serde_json::Value, Option<serde_json::Value>)> {
    let row = sqlx::query!(
        "SELECT spec, backgrounds FROM objects WHERE id = $1",
        object.0
    )
    .fetch_one(conn)
    .await
    .context("reading an object")?;
    Ok((row.spec, row.backgrounds))
}

fn state_names(states: &[ObjectState]) -> Vec<&'static str> {
    states.iter().map(|state| state.as_str()).collect()
}

/// The object `object` with its specification, if it is in one of `states`.
pub async fn in_states(
    conn: &mut PgConnection,
    object: ObjectId,
    states: &[ObjectState],
) -> Result<Vec<(ObjectId, serde_json::Value)>> {
    let rows = sqlx::query!(
        "SELECT id, spec FROM objects WHERE id = $1 AND state = ANY($2)",
        object.0,
        &state_names(states) as &[&str]
    )
    .fetch_all(conn)
    .await
    .context("reading an object")?;
    Ok(rows
        .into_iter()
        .map(|row| (ObjectId(row.id), row.spec))
        .collect())
}

/// A run's objects of a deformable category that still wait for their prompts, in ordinal
/// order, with their specifications, among those in `states`.
pub async fn of_category_awaiting_prompts(
    conn: &mut PgConnection,
    run: RunId,
    category: &str,
    states: &[ObjectState],
) -> Result<Vec<(ObjectId, serde_json::Value)>> {
    let rows = sqlx::query!(
        "SELECT id, spec FROM objects
         WHERE run_id = $1 AND state = ANY($2) AND backgrounds IS NULL
           AND spec->>'type' = 'deformable' AND spec->>'category' = $3
         ORDER BY ordinal",
        run.0,
        &state_names(states) as &[&str],
        category
    )
    .fetch_all(conn)
    .await
    .context("reading a category's objects")?;
    Ok(rows
        .into_iter()
        .map(|row| (ObjectId(row.id), row.spec))
        .collect())
}

/// The prompt stage's answer for an object: its backgrounds, descriptions and the specification
/// they completed.
pub async fn set_prompts(
    conn: &mut PgConnection,
    object: ObjectId,
    backgrounds: serde_json::Value,
    descriptions: Option<serde_json::Value>,
    spec: serde_json::Value,
) -> Result<()> {
    sqlx::query!(
        "UPDATE objects SET backgrounds = $2, descriptions = $3, spec = $4, updated_at = now()
         WHERE id = $1",
        object.0,
        backgrounds,
        descriptions,
        spec
    )
    .execute(conn)
    .await
    .context("recording an object's prompts")?;
    Ok(())
}

/// Ends an `active` object in `to` (done, failed, skipped) with the reason, if any. An object no
/// longer active (cancelled meanwhile, or ended by another of its jobs) keeps its state.
pub async fn finish(
    conn: &mut PgConnection,
    object: ObjectId,
    to: ObjectState,
    error: Option<&str>,
) -> Result<()> {
    finish_many(conn, &[object], to, error).await
}

/// [`finish`] for many objects in one statement.
pub async fn finish_many(
    conn: &mut PgConnection,
    objects: &[ObjectId],
    to: ObjectState,
    error: Option<&str>,
) -> Result<()> {
    if objects.is_empty() {
        return Ok(());
    }
    if !ObjectState::Active.can_become(to) {
        bail!("an active object cannot become {}", to.as_str());
    }
    let ids: Vec<uuid::Uuid> = objects.iter().map(|object| object.0).collect();
    sqlx::query!(
        "UPDATE objects SET state = $2, error = COALESCE($3, error), updated_at = now()
         WHERE id = ANY($1) AND state = 'active'",
        &ids,
        to.as_str(),
        error
    )
    .execute(conn)
    .await
    .context("finishing objects")?;
    Ok(())
}

/// The run was cancelled: its active objects are too.
pub async fn cancel_active_of_run(conn: &mut PgConnection, run: RunId) -> Result<()> {
    debug_assert!(ObjectState::Active.can_become(ObjectState::Cancelled));
    sqlx::query!(
        "UPDATE objects SET state = 'cancelled', updated_at = now()
         WHERE run_id = $1 AND state = 'active'",
        run.0
    )
    .execute(conn)
    .await
    .context("cancelling a run's objects")?;
    Ok(())
}

/// An admin retried a job of an ended object: it is active again, if its state allows
/// (a cancelled object stays cancelled).
pub async fn reopen(conn: &mut PgConnection, object: ObjectId) -> Result<()> {
    let reopenable: Vec<&str> = ObjectState::ALL
        .into_iter()
        .filter(|state| state.can_become(ObjectState::Active))
        .map(ObjectState::as_str)
        .collect();
    sqlx::query!(
        "UPDATE objects SET state = 'active', error = NULL, updated_at = now()
         WHERE id = $1 AND state = ANY($2)",
        object.0,
        &reopenable as &[&str]
    )
    .execute(conn)
    .await
    .context("reopening an object")?;
    Ok(())
}

/// How many of a run's objects are in each state.
pub async fn count_by_state_of_run(pool: &PgPool, run: RunId) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT state, count(*) AS "objects!" FROM objects WHERE run_id = $1 GROUP BY state"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("counting a run's objects")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.state, row.objects))
        .collect())
}

/// An object's row, for `syncd object show`.
pub struct ObjectRow {
    pub run_id: uuid::Uuid,
    pub state: String,
    pub spec: serde_json::Value,
    pub backgrounds: Option<serde_json::Value>,
    pub descriptions: Option<serde_json::Value>,
    pub error: Option<String>,
}

pub async fn get(pool: &PgPool, object: ObjectId) -> Result<Option<ObjectRow>> {
    sqlx::query_as!(
        ObjectRow,
        "SELECT run_id, state, spec, backgrounds, descriptions, error FROM objects WHERE id = $1",
        object.0
    )
    .fetch_optional(pool)
    .await
    .context("reading an object")
}

/// The S3 keys of a run's uploaded assets.
pub async fn asset_keys(pool: &PgPool, run: RunId) -> Result<Vec<String>> {
    let keys = sqlx::query_scalar!(
        "SELECT spec->>'asset_key' FROM objects WHERE run_id = $1",
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing assets")?;
    Ok(keys.into_iter().flatten().collect())
}

/// A run's active objects of one family (`rigid`, `deformable`) that have no groups yet, and
/// that have no prior job yet.
pub struct Unplanned {
    pub family: Option<String>,
    pub without_groups: i64,
    pub without_prior: i64,
}

pub async fn unplanned_of_run(pool: &PgPool, run: RunId) -> Result<Vec<Unplanned>> {
    sqlx::query_as!(
        Unplanned,
        r#"SELECT o.spec->>'type' AS family,
                  count(*) FILTER (WHERE NOT EXISTS (
                      SELECT 1 FROM groups g WHERE g.object_id = o.id)) AS "without_groups!",
                  count(*) FILTER (WHERE NOT EXISTS (
                      SELECT 1 FROM jobs j WHERE j.object_id = o.id AND j.kind = 'prior'))
                      AS "without_prior!"
           FROM objects o WHERE o.run_id = $1 AND o.state = 'active' GROUP BY 1"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("counting a run's unplanned objects")
}
