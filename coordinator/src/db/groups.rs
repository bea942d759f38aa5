//! The `groups` table: every statement on it. A group's decision changes only here, as
//! [`Decision::can_become`] allows, matching the decision it expects.

use crate::state::Decision;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use std::collections::HashSet;
use syncd_proto::messages::ScoreOutput;
use syncd_proto::{GroupId, ObjectId, RunId};
use uuid::Uuid;

/// The decision on a scored group, with what it rests on.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// `Accepted`, `Rejected` or `NearDuplicate`.
    pub decision: Decision,
    pub valid_images: Vec<u32>,
    pub reason: String,
}

fn check(group: GroupId, from: Decision, to: Decision) -> Result<()> {
    if !from.can_become(to) {
        bail!("group {group} cannot go from {from} to {to}");
    }
    Ok(())
}

/// A group's embeddings as they travel to and from `groups.embeddings`, a two-dimensional
/// `real[]` with one row per image: flat, images one after another, with the length of each.
/// (The driver reads and writes one-dimensional arrays only; the statements make the rows.)
#[derive(Debug, Default, PartialEq)]
pub struct EmbeddingRows {
    values: Vec<f32>,
    dimension: i32,
}

impl EmbeddingRows {
    /// `None` for embeddings that form no matrix (none, an empty one, or of mixed lengths):
    /// the near-duplicate rule cannot compare them, and they are not kept.
    pub fn of(embeddings: &[Vec<f32>]) -> Option<Self> {
        let dimension = embeddings.first()?.len();
        if dimension == 0 || embeddings.iter().any(|row| row.len() != dimension) {
            return None;
        }
        Some(Self {
            values: embeddings.concat(),
            dimension: i32::try_from(dimension).ok()?,
        })
    }

    fn images(&self) -> i32 {
        match self.dimension {
            0 => 0,
            dimension => (self.values.len() / dimension as usize) as i32,
        }
    }

    /// One embedding per image, as the worker reported them.
    pub fn into_embeddings(self) -> Vec<Vec<f32>> {
        match usize::try_from(self.dimension) {
            Ok(dimension) if dimension > 0 => {
                self.values.chunks(dimension).map(<[f32]>::to_vec).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A pending group's scores and the verdict on them, as [`decide_many`] records them.
pub struct ScoredGroup {
    pub group: GroupId,
    aesthetic: serde_json::Value,
    pairs: serde_json::Value,
    embeddings: EmbeddingRows,
    decision: Decision,
    valid_images: serde_json::Value,
    reason: String,
    scored_by: Option<serde_json::Value>,
}

impl ScoredGroup {
    /// Embeddings that form no matrix are not kept ([`EmbeddingRows::of`]).
    pub fn new(
        group: GroupId,
        scores: &ScoreOutput,
        verdict: &Verdict,
        scored_by: Option<serde_json::Value>,
    ) -> Result<Self> {
        check(group, Decision::Pending, verdict.decision)?;
        let embeddings = EmbeddingRows::of(&scores.embeddings);
        if embeddings.is_none() && !scores.embeddings.is_empty() {
            tracing::warn!(%group, "embeddings of mixed or zero lengths not kept");
        }
        Ok(Self {
            group,
            aesthetic: serde_json::to_value(&scores.aesthetic)?,
            pairs: serde_json::to_value(&scores.pairs)?,
            embeddings: embeddings.unwrap_or_default(),
            decision: verdict.decision,
            valid_images: serde_json::to_value(&verdict.valid_images)?,
            reason: verdict.reason.clone(),
            scored_by,
        })
    }
}

/// Records pending groups' scores and the verdicts on them, in one statement; a group must
/// appear once. Fails, naming one, if a group is no longer pending.
///
/// The groups' `decided_at` follow their order in `decisions`, one microsecond apart from the
/// statement's `clock_timestamp()`: reports are applied a batch per transaction, and `now()` is
/// the transaction's start, which would give a batch's decisions one time and lose the order
/// the near-duplicate rule saw them in (a later batch decides after this one's commit, many
/// microseconds later).
pub async fn decide_many(conn: &mut PgConnection, decisions: &[ScoredGroup]) -> Result<()> {
    if decisions.is_empty() {
        return Ok(());
    }
    let groups: Vec<Uuid> = decisions.iter().map(|d| d.group.0).collect();
    let aesthetic: Vec<&serde_json::Value> = decisions.iter().map(|d| &d.aesthetic).collect();
    let pairs: Vec<&serde_json::Value> = decisions.iter().map(|d| &d.pairs).collect();
    let verdicts: Vec<&str> = decisions.iter().map(|d| d.decision.as_str()).collect();
    let valid_images: Vec<&serde_json::Value> = decisions.iter().map(|d| &d.valid_images).collect();
    let reasons: Vec<&str> = decisions.iter().map(|d| d.reason.as_str()).collect();
    let scored_by: Vec<Option<&serde_json::Value>> =
        decisions.iter().map(|d| d.scored_by.as_ref()).collect();
    // Every group's embeddings in one flat array: each group's start in it, its rows' length
    // and its number of rows.
    let mut values = Vec::new();
    let (mut starts, mut dimensions, mut images) = (Vec::new(), Vec::new(), Vec::new());
    for decision in decisions {
        starts.push(i32::try_from(values.len()).context("too many embeddings for a batch")?);
        dimensions.push(decision.embeddings.dimension);
        images.push(decision.embeddings.images());
        values.extend_from_slice(&decision.embeddings.values);
    }
    // `array_agg` over the images' slices makes the rows; over no image it gives NULL.
    let decided = sqlx::query_scalar!(
        "UPDATE groups g SET aesthetic = d.aesthetic, pairs = d.pairs, decision = d.decision,
             valid_images = d.valid_images, reason = d.reason, scored_by = d.scored_by,
             decided_at = (SELECT clock_timestamp()) + d.position * interval '1 microsecond',
             embeddings = (SELECT array_agg(($5::real[])[d.start + (image - 1) * d.dimension + 1
                                                         : d.start + image * d.dimension]
                                            ORDER BY image)
                           FROM generate_series(1, d.images) AS image)
         FROM UNNEST($1::uuid[], $2::jsonb[], $3::jsonb[], $4::text[], $6::jsonb[], $7::text[],
                     $8::jsonb[], $9::int4[], $10::int4[], $11::int4[])
                  WITH ORDINALITY
              AS d (id, aesthetic, pairs, decision, valid_images, reason, scored_by, start,
                    dimension, images, position)
         WHERE g.id = d.id AND g.decision = 'pending'
         RETURNING g.id",
        &groups,
        &aesthetic as &[&serde_json::Value],
        &pairs as &[&serde_json::Value],
        &verdicts as &[&str],
        &values,
        &valid_images as &[&serde_json::Value],
        &reasons as &[&str],
        &scored_by as &[Option<&serde_json::Value>],
        &starts,
        &dimensions,
        &images
    )
    .fetch_all(conn)
    .await
    .context("recording groups' decisions")?;
    if decided.len() != decisions.len() {
        let decided: HashSet<Uuid> = decided.into_iter().collect();
        match groups.iter().find(|group| !decided.contains(group)) {
            Some(group) => bail!("group {group} is no longer pending: its scores cannot decide it"),
            None => bail!("a group was decided twice at once"),
        }
    }
    Ok(())
}

/// A job of the group failed for good: a pending group fails with `reason`. A group already
/// decided keeps its decision.
pub async fn fail_pending(conn: &mut PgConnection, group: GroupId, reason: &str) -> Result<()> {
    check(group, Decision::Pending, Decision::Failed)?;
    sqlx::query!(
        "UPDATE groups SET decision = 'failed', reason = $2, decided_at = clock_timestamp()
         WHERE id = $1 AND decision = 'pending'",
        group.0,
        reason
    )
    .execute(conn)
    .await
    .context("failing a group")?;
    Ok(())
}

/// An accepted group assigned to `shard` whose images cannot be packed: it fails with `reason`
/// and leaves the shard.
pub async fn fail_unpackable(
    conn: &mut PgConnection,
    group: GroupId,
    shard: i32,
    reason: &str,
) -> Result<()> {
    check(group, Decision::Accepted, Decision::Failed)?;
    sqlx::query!(
        "UPDATE groups SET decision = 'failed', shard = NULL, decided_at = clock_timestamp(),
             reason = 'not packed: ' || $2
         WHERE id = $1 AND shard = $3 AND decision = 'accepted'",
        group.0,
        reason,
        shard
    )
    .execute(conn)
    .await
    .context("failing a group that cannot be packed")?;
    Ok(())
}

/// An admin retried the job that failed the group: it is pending again, and gets a new contact
/// sheet once decided again (the old one showed the failure).
pub async fn reopen_failed(conn: &mut PgConnection, group: GroupId) -> Result<()> {
    check(group, Decision::Failed, Decision::Pending)?;
    sqlx::query!(
        "UPDATE groups SET decision = 'pending', reason = NULL, decided_at = NULL,
             sheet_at = NULL, sheet_error = NULL, sheet_failures = 0, sheet_retry_at = NULL
         WHERE id = $1 AND decision = 'failed'",
        group.0
    )
    .execute(conn)
    .await
    .context("reopening a failed group")?;
    Ok(())
}

/// Those of `objects` with a group still undecided. Called for every batch of scored groups, so
/// it reads the objects' own groups (a few each) through their index and filters them: with
/// `decision = 'pending'` in the WHERE clause, stale statistics let PostgreSQL AND in the
/// `(run_id, decision)` index too, whose every undecided group of the run made this 20 ms at
/// 100K groups.
pub async fn objects_undecided(
    conn: &mut PgConnection,
    objects: &[ObjectId],
) -> Result<Vec<ObjectId>> {
    let ids: Vec<Uuid> = objects.iter().map(|object| object.0).collect();
    let undecided = sqlx::query_scalar!(
        "SELECT object_id FROM groups WHERE object_id = ANY($1)
         GROUP BY object_id HAVING count(*) FILTER (WHERE decision = 'pending') > 0",
        &ids
    )
    .fetch_all(conn)
    .await
    .context("finding objects with undecided groups")?;
    Ok(undecided.into_iter().map(ObjectId).collect())
}

/// Rows of groups written by one statement.
const INSERT_BATCH: usize = 5_000;

/// A new group of an object, planned when its object's prompts (and prior) are known.
pub struct NewGroup {
    pub id: GroupId,
    pub object: ObjectId,
    pub index: i32,
    pub seed: i64,
    pub prompts: serde_json::Value,
    pub image_prompts: serde_json::Value,
    pub prior: Option<serde_json::Value>,
    pub generation: serde_json::Value,
}

/// Inserts `groups` of `run` as `pending`, a few thousand per statement. The rows are moved
/// into the statement's columns, not copied: a run plans groups for 100K objects at once.
pub async fn insert_many(conn: &mut PgConnection, run: RunId, groups: Vec<NewGroup>) -> Result<()> {
    let mut groups = groups.into_iter().peekable();
    while groups.peek().is_some() {
        let mut columns = GroupColumns::default();
        for group in groups.by_ref().take(INSERT_BATCH) {
            columns.ids.push(group.id.0);
            columns.objects.push(group.object.0);
            columns.indices.push(group.index);
            columns.seeds.push(group.seed);
            columns.prompts.push(group.prompts);
            columns.image_prompts.push(group.image_prompts);
            columns.priors.push(group.prior);
            columns.generations.push(group.generation);
        }
        sqlx::query!(
            "INSERT INTO groups (id, run_id, object_id, group_index, seed, prompts,
                                 image_prompts, prior, generation)
             SELECT id, $2, object_id, group_index, seed, prompts, image_prompts, prior,
                    generation
             FROM UNNEST($1::uuid[], $3::uuid[], $4::int[], $5::int8[], $6::jsonb[],
                         $7::jsonb[], $8::jsonb[], $9::jsonb[])
                  AS new (id, object_id, group_index, seed, prompts, image_prompts, prior,
                          generation)",
            &columns.ids,
            run.0,
            &columns.objects,
            &columns.indices,
            &columns.seeds,
            &columns.prompts,
            &columns.image_prompts,
            &columns.priors as &[Option<serde_json::Value>],
            &columns.generations
        )
        .execute(&mut *conn)
        .await
        .context("inserting groups")?;
    }
    Ok(())
}

/// One batch of new groups, a column each, for `UNNEST`.
#[derive(Default)]
struct GroupColumns {
    ids: Vec<Uuid>,
    objects: Vec<Uuid>,
    indices: Vec<i32>,
    seeds: Vec<i64>,
    prompts: Vec<serde_json::Value>,
    image_prompts: Vec<serde_json::Value>,
    priors: Vec<Option<serde_json::Value>>,
    generations: Vec<serde_json::Value>,
}

/// The generation job's images and masks, and what made them.
pub async fn set_images(conn: &mut PgConnection, images: GroupImages) -> Result<()> {
    set_images_many(conn, &[images]).await
}

/// A group's generated images, as [`set_images_many`] records them.
pub struct GroupImages {
    pub group: GroupId,
    pub image_keys: serde_json::Value,
    pub mask_keys: serde_json::Value,
    pub generated_by: Option<serde_json::Value>,
}

/// [`set_images`] for many groups in one statement. A group must appear once.
pub async fn set_images_many(conn: &mut PgConnection, images: &[GroupImages]) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let groups: Vec<Uuid> = images.iter().map(|images| images.group.0).collect();
    let image_keys: Vec<&serde_json::Value> = images.iter().map(|i| &i.image_keys).collect();
    let mask_keys: Vec<&serde_json::Value> = images.iter().map(|i| &i.mask_keys).collect();
    let generated_by: Vec<Option<&serde_json::Value>> =
        images.iter().map(|i| i.generated_by.as_ref()).collect();
    sqlx::query!(
        "UPDATE groups g SET image_keys = new.image_keys, mask_keys = new.mask_keys,
                             generated_by = new.generated_by
         FROM UNNEST($1::uuid[], $2::jsonb[], $3::jsonb[], $4::jsonb[])
              AS new (id, image_keys, mask_keys, generated_by)
         WHERE g.id = new.id",
        &groups,
        &image_keys as &[&serde_json::Value],
        &mask_keys as &[&serde_json::Value],
        &generated_by as &[Option<&serde_json::Value>]
    )
    .execute(conn)
    .await
    .context("recording groups' images")?;
    Ok(())
}

/// Keeps the trace contexts started by the first dispatch of the groups' jobs.
pub async fn keep_trace_contexts(
    conn: &mut PgConnection,
    groups: &[Uuid],
    traceparents: &[String],
) -> Result<()> {
    sqlx::query!(
        "UPDATE groups g SET traceparent = kept.traceparent
         FROM UNNEST($1::uuid[], $2::text[]) AS kept (id, traceparent)
         WHERE g.id = kept.id AND g.traceparent IS NULL",
        groups,
        traceparents
    )
    .execute(conn)
    .await
    .context("keeping the groups' trace contexts")?;
    Ok(())
}

/// A group's row with its object's and run's, as `crate::groups::GroupRecord` reads it.
pub struct RecordRow {
    pub id: Uuid,
    pub run_id: Uuid,
    pub run_name: String,
    pub object_id: Uuid,
    pub ordinal: i32,
    pub spec: serde_json::Value,
    pub group_index: i32,
    pub seed: i64,
    pub decision: String,
    pub reason: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub prompts: serde_json::Value,
    pub image_prompts: Option<serde_json::Value>,
    pub aesthetic: Option<serde_json::Value>,
    pub pairs: Option<serde_json::Value>,
    pub valid_images: Option<serde_json::Value>,
    pub image_keys: Option<serde_json::Value>,
    pub mask_keys: Option<serde_json::Value>,
    pub thresholds: Option<serde_json::Value>,
    pub sheet_key: Option<String>,
    pub sheet_at: Option<DateTime<Utc>>,
    pub sheet_error: Option<String>,
    pub sheet_retry_at: Option<DateTime<Utc>>,
    pub generation: Option<serde_json::Value>,
    pub generated_by: Option<serde_json::Value>,
    pub scored_by: Option<serde_json::Value>,
    pub traceparent: Option<String>,
}

pub async fn record(pool: &PgPool, group: GroupId) -> Result<Option<RecordRow>> {
    sqlx::query_as!(
        RecordRow,
        "SELECT g.id, g.run_id, r.name AS run_name, g.object_id, o.ordinal, o.spec, g.group_index,
                g.seed, g.decision, g.reason, g.decided_at, g.prompts, g.image_prompts,
                g.aesthetic, g.pairs, g.valid_images, g.image_keys, g.mask_keys,
                r.config -> 'filter' AS thresholds, g.sheet_key, g.sheet_at, g.sheet_error,
                g.sheet_retry_at, g.generation, g.generated_by, g.scored_by, g.traceparent
         FROM groups g JOIN objects o ON o.id = g.object_id JOIN runs r ON r.id = g.run_id
         WHERE g.id = $1",
        group.0
    )
    .fetch_optional(pool)
    .await
    .with_context(|| format!("reading group {group}"))
}

/// `limit` of the run's groups with `decision` (all with `None`) from `offset`, in the run's
/// order (object, then group index).
pub async fn records_of_run(
    pool: &PgPool,
    run: RunId,
    decision: Option<Decision>,
    offset: i64,
    limit: i64,
) -> Result<Vec<RecordRow>> {
    sqlx::query_as!(
        RecordRow,
        "SELECT g.id, g.run_id, r.name AS run_name, g.object_id, o.ordinal, o.spec, g.group_index,
                g.seed, g.decision, g.reason, g.decided_at, g.prompts, g.image_prompts,
                g.aesthetic, g.pairs, g.valid_images, g.image_keys, g.mask_keys,
                r.config -> 'filter' AS thresholds, g.sheet_key, g.sheet_at, g.sheet_error,
                g.sheet_retry_at, g.generation, g.generated_by, g.scored_by, g.traceparent
         FROM groups g JOIN objects o ON o.id = g.object_id JOIN runs r ON r.id = g.run_id
         WHERE g.run_id = $1 AND ($2::text IS NULL OR g.decision = $2)
         ORDER BY o.ordinal, g.group_index OFFSET $3 LIMIT $4",
        run.0,
        decision.map(Decision::as_str),
        offset,
        limit
    )
    .fetch_all(pool)
    .await
    .with_context(|| format!("listing the groups of run {run}"))
}

/// How many of the run's groups have `decision` (all with `None`).
pub async fn count_of_run(pool: &PgPool, run: RunId, decision: Option<Decision>) -> Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "groups!" FROM groups
           WHERE run_id = $1 AND ($2::text IS NULL OR decision = $2)"#,
        run.0,
        decision.map(Decision::as_str)
    )
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the groups of run {run}"))
}

/// How many of a run's groups have each decision.
pub async fn count_by_decision_of_run(pool: &PgPool, run: RunId) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT decision, count(*) AS "groups!" FROM groups WHERE run_id = $1
           GROUP BY decision"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("counting a run's groups")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.decision, row.groups))
        .collect())
}

/// An object's groups, each as one JSON object, in group order (for `syncd object show`).
pub async fn summaries_of_object(
    pool: &PgPool,
    object: ObjectId,
) -> Result<Vec<serde_json::Value>> {
    sqlx::query_scalar!(
        r#"SELECT jsonb_build_object('id', id, 'index', group_index, 'seed', seed,
                  'prompts', prompts, 'image_prompts', image_prompts, 'decision', decision,
                  'reason', reason, 'valid_images', valid_images, 'aesthetic', aesthetic,
                  'pairs', pairs, 'image_keys', image_keys, 'mask_keys', mask_keys) AS "group!"
           FROM groups WHERE object_id = $1 ORDER BY group_index"#,
        object.0
    )
    .fetch_all(pool)
    .await
    .context("listing an object's groups")
}

/// An accepted group as a dataset shard takes it, with its object's specification.
pub struct PackedRow {
    pub id: Uuid,
    pub object_id: Uuid,
    pub spec: serde_json::Value,
    pub prompts: serde_json::Value,
    pub image_prompts: Option<serde_json::Value>,
    pub image_keys: Option<serde_json::Value>,
    pub mask_keys: Option<serde_json::Value>,
    pub valid_images: Option<serde_json::Value>,
    pub aesthetic: Option<serde_json::Value>,
    pub pairs: Option<serde_json::Value>,
    pub seed: i64,
    pub generation: Option<serde_json::Value>,
    pub generated_by: Option<serde_json::Value>,
    pub scored_by: Option<serde_json::Value>,
}

/// The accepted groups assigned to `shard`, in object order.
pub async fn of_shard(pool: &PgPool, run: RunId, shard: i32) -> Result<Vec<PackedRow>> {
    sqlx::query_as!(
        PackedRow,
        "SELECT g.id, g.object_id, o.spec, g.prompts, g.image_prompts, g.image_keys,
                g.mask_keys, g.valid_images, g.aesthetic, g.pairs, g.seed, g.generation,
                g.generated_by, g.scored_by
         FROM groups g JOIN objects o ON o.id = g.object_id
         WHERE g.run_id = $1 AND g.shard = $2 AND g.decision = 'accepted'
         ORDER BY o.ordinal, g.group_index",
        run.0,
        shard
    )
    .fetch_all(pool)
    .await
    .context("listing accepted groups")
}

/// How many of the run's accepted groups wait for a shard, counted up to `at_most`: the packer
/// asks whether a shard's worth waits, every pass, and counting them all grew with the run.
pub async fn unassigned_of_run(conn: &mut PgConnection, run: RunId, at_most: i64) -> Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "groups!" FROM (
               SELECT 1 FROM groups
               WHERE run_id = $1 AND decision = 'accepted' AND shard IS NULL
               LIMIT $2) AS unassigned"#,
        run.0,
        at_most
    )
    .fetch_one(conn)
    .await
    .context("counting unassigned groups")
}

/// Assigns up to `limit` of the run's accepted groups without a shard to `shard`, in object
/// order; returns how many it assigned.
pub async fn assign_to_shard(
    conn: &mut PgConnection,
    run: RunId,
    shard: i32,
    limit: i64,
) -> Result<u64> {
    let assigned = sqlx::query!(
        "UPDATE groups SET shard = $2 WHERE id IN (
             SELECT g.id FROM groups g JOIN objects o ON o.id = g.object_id
             WHERE g.run_id = $1 AND g.decision = 'accepted' AND g.shard IS NULL
             ORDER BY o.ordinal, g.group_index LIMIT $3)",
        run.0,
        shard,
        limit
    )
    .execute(conn)
    .await
    .context("assigning groups to a shard")?;
    Ok(assigned.rows_affected())
}

/// The groups of a dataset assembled whole, before shards were recorded (shard -1), wait to be
/// packed again.
pub async fn unassign_whole_dataset(conn: &mut PgConnection, run: RunId) -> Result<()> {
    sqlx::query!(
        "UPDATE groups SET shard = NULL WHERE run_id = $1 AND shard = -1",
        run.0
    )
    .execute(conn)
    .await
    .context("reopening a whole dataset's groups")?;
    Ok(())
}

/// Up to `limit` decided groups with images whose contact sheet is due, oldest decision first.
pub async fn due_for_sheet(pool: &PgPool, limit: i64) -> Result<Vec<GroupId>> {
    let ids = sqlx::query_scalar!(
        "SELECT id FROM groups
         WHERE sheet_at IS NULL AND decision <> 'pending' AND image_keys IS NOT NULL
           AND (sheet_retry_at IS NULL OR sheet_retry_at <= now())
         ORDER BY decided_at LIMIT $1",
        limit
    )
    .fetch_all(pool)
    .await
    .context("listing groups without a contact sheet")?;
    Ok(ids.into_iter().map(GroupId).collect())
}

/// Records the group's contact sheet, if the group still has the decision it shows (made at
/// `decided_at`); returns whether it did.
pub async fn set_sheet(
    pool: &PgPool,
    group: GroupId,
    key: &str,
    decision: &str,
    decided_at: Option<DateTime<Utc>>,
) -> Result<bool> {
    let updated = sqlx::query!(
        "UPDATE groups SET sheet_key = $2, sheet_at = now(), sheet_error = NULL,
             sheet_failures = 0, sheet_retry_at = NULL
         WHERE id = $1 AND decision = $3 AND decided_at IS NOT DISTINCT FROM $4",
        group.0,
        key,
        decision,
        decided_at
    )
    .execute(pool)
    .await
    .context("recording a contact sheet")?;
    Ok(updated.rows_affected() == 1)
}

/// Records why the group's sheet could not be made; the next try waits `first_secs` doubled
/// per failure so far, at most `max_secs`. Returns the failures so far and the next try's time.
pub async fn sheet_failed(
    pool: &PgPool,
    group: GroupId,
    error: &str,
    first_secs: f64,
    max_secs: f64,
) -> Result<(i32, DateTime<Utc>)> {
    let row = sqlx::query!(
        r#"UPDATE groups SET sheet_error = $2, sheet_failures = sheet_failures + 1,
               sheet_retry_at = now() + make_interval(
                   secs => LEAST($4::float8, $3::float8 * power(2, sheet_failures)))
           WHERE id = $1 RETURNING sheet_failures, sheet_retry_at AS "retry_at!""#,
        group.0,
        error,
        first_secs,
        max_secs
    )
    .fetch_one(pool)
    .await
    .context("recording a contact sheet that failed")?;
    Ok((row.sheet_failures, row.retry_at))
}

/// Up to `limit` failed groups without recorded images whose files were not reclaimed yet,
/// with their runs.
pub async fn failed_unreclaimed(pool: &PgPool, limit: i64) -> Result<Vec<(GroupId, RunId)>> {
    let rows = sqlx::query!(
        "SELECT id, run_id FROM groups
         WHERE decision = 'failed' AND reclaimed_at IS NULL AND image_keys IS NULL
         LIMIT $1",
        limit
    )
    .fetch_all(pool)
    .await
    .context("listing failed groups")?;
    Ok(rows
        .into_iter()
        .map(|row| (GroupId(row.id), RunId(row.run_id)))
        .collect())
}

/// Up to `limit` of the run's accepted groups packed into written shards whose files were not
/// reclaimed yet, with their image and mask keys.
pub async fn packed_unreclaimed(
    pool: &PgPool,
    run: RunId,
    limit: i64,
) -> Result<Vec<(GroupId, serde_json::Value, serde_json::Value)>> {
    let rows = sqlx::query!(
        r#"SELECT g.id, COALESCE(g.image_keys, '[]') AS "image_keys!",
                  COALESCE(g.mask_keys, '[]') AS "mask_keys!"
           FROM groups g JOIN dataset_shards s ON s.run_id = g.run_id AND s.shard = g.shard
           WHERE g.run_id = $1 AND g.decision = 'accepted' AND s.state = 'written'
             AND g.reclaimed_at IS NULL
           LIMIT $2"#,
        run.0,
        limit
    )
    .fetch_all(pool)
    .await
    .context("listing packed groups")?;
    Ok(rows
        .into_iter()
        .map(|row| (GroupId(row.id), row.image_keys, row.mask_keys))
        .collect())
}

/// The groups' files are deleted.
pub async fn mark_reclaimed(pool: &PgPool, groups: &[Uuid]) -> Result<()> {
    sqlx::query!(
        "UPDATE groups SET reclaimed_at = now() WHERE id = ANY($1)",
        groups
    )
    .execute(pool)
    .await
    .context("marking groups reclaimed")?;
    Ok(())
}

/// The run's groups with images: their ids and image and mask keys.
pub async fn with_images_of_run(
    pool: &PgPool,
    run: RunId,
) -> Result<
    Vec<(
        GroupId,
        Option<serde_json::Value>,
        Option<serde_json::Value>,
    )>,
> {
    let rows = sqlx::query!(
        "SELECT id, image_keys, mask_keys FROM groups WHERE run_id = $1 AND image_keys IS NOT NULL",
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing group images")?;
    Ok(rows
        .into_iter()
        .map(|row| (GroupId(row.id), row.image_keys, row.mask_keys))
        .collect())
}

/// The run's undecided groups, and those being regenerated.
pub async fn in_flight_of_run(pool: &PgPool, run: RunId) -> Result<Vec<GroupId>> {
    let ids = sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM groups WHERE run_id = $1 AND decision = 'pending'
           UNION
           SELECT j.group_id FROM jobs j JOIN regenerations x ON x.job_id = j.id
           WHERE j.run_id = $1 AND j.state IN ('pending', 'queued', 'running', 'retry_wait')"#,
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing groups in flight")?;
    Ok(ids.into_iter().map(GroupId).collect())
}

/// The run's accepted groups with their embeddings (none where none were kept).
pub async fn accepted_embeddings_of_run(
    conn: &mut PgConnection,
    run: RunId,
) -> Result<Vec<(GroupId, Vec<Vec<f32>>)>> {
    let rows = sqlx::query!(
        r#"SELECT id,
                  ARRAY(SELECT value FROM unnest(embeddings) WITH ORDINALITY AS e (value, position)
                        ORDER BY position) AS "values!",
                  coalesce(array_length(embeddings, 2), 0) AS "dimension!"
           FROM groups WHERE run_id = $1 AND decision = 'accepted'"#,
        run.0
    )
    .fetch_all(conn)
    .await
    .context("reading accepted groups' embeddings")?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let rows = EmbeddingRows {
                values: row.values,
                dimension: row.dimension,
            };
            (GroupId(row.id), rows.into_embeddings())
        })
        .collect())
}

/// What a regeneration request needs of its group, read and locked (so concurrent requests are
/// numbered one after the other).
pub struct ToRegenerate {
    pub run_id: Uuid,
    pub object_id: Uuid,
    pub generated: bool,
    pub reclaimed: bool,
}

pub async fn lock_to_regenerate(
    conn: &mut PgConnection,
    group: GroupId,
) -> Result<Option<ToRegenerate>> {
    sqlx::query_as!(
        ToRegenerate,
        r#"SELECT run_id, object_id, image_keys IS NOT NULL AS "generated!",
                  reclaimed_at IS NOT NULL AS "reclaimed!"
           FROM groups WHERE id = $1 FOR UPDATE"#,
        group.0
    )
    .fetch_optional(conn)
    .await
    .with_context(|| format!("reading group {group}"))
}

#[cfg(test)]
mod tests {
    use super::EmbeddingRows;

    #[test]
    fn embedding_rows_keep_a_matrix_and_only_a_matrix() {
        let embeddings = vec![vec![1.0, 0.5, f32::NAN], vec![-0.0, 2.0, 3.0]];
        let rows = EmbeddingRows::of(&embeddings).expect("a 2 x 3 matrix");
        assert_eq!((rows.images(), rows.dimension), (2, 3));
        let back = rows.into_embeddings();
        let bits = |rows: &[Vec<f32>]| -> Vec<Vec<u32>> {
            rows.iter()
                .map(|row| row.iter().map(|value| value.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&back), bits(&embeddings));

        for no_matrix in [vec![], vec![vec![]], vec![vec![1.0, 0.0], vec![1.0]]] {
            assert_eq!(EmbeddingRows::of(&no_matrix), None, "{no_matrix:?}");
        }
        let nothing = EmbeddingRows::default();
        assert_eq!(nothing.images(), 0);
        assert!(nothing.into_embeddings().is_empty());
    }
}
