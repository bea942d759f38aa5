//! What the database knows of a group, in one record: the facts `syncd group show` prints, the
//! gallery shows as JSON and a contact sheet draws. Read-only.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use syncd_proto::dataset::ImagePrompt;
use syncd_proto::filter::FilterThresholds;
use syncd_proto::lineage::Lineage;
use syncd_proto::messages::{ObjectSpec, PairSimilarity};
use syncd_proto::{GroupId, ObjectId, RunId};

/// One group: its object, prompts, scores, decision, files and contact sheet.
#[derive(Clone, Debug, Serialize)]
pub struct GroupRecord {
    pub id: GroupId,
    pub run_id: RunId,
    pub run_name: String,
    pub object_id: ObjectId,
    /// The object's place in the run's input.
    pub object_ordinal: i32,
    pub object: ObjectSpec,
    /// The group's index among its object's groups.
    pub index: i32,
    pub seed: u64,
    /// `pending`, `accepted`, `rejected`, `near_duplicate` or `failed`.
    pub decision: String,
    pub reason: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    /// The prompt of each image, in group order.
    pub prompts: Vec<String>,
    /// What each prompt was composed of (`None` for groups planned before this was kept).
    pub image_prompts: Option<Vec<ImagePrompt>>,
    /// Scores, once the group was scored.
    pub aesthetic: Option<Vec<f32>>,
    pub pairs: Option<Vec<PairSimilarity>>,
    pub valid_images: Option<Vec<u32>>,
    /// The images and masks of the attempt that made them, once generated.
    pub image_keys: Option<Vec<String>>,
    pub mask_keys: Option<Vec<String>>,
    /// The run's filter, which the decision applied.
    pub thresholds: FilterThresholds,
    pub sheet: SheetState,
    /// What made the group (`None` for groups planned before lineage was kept).
    pub lineage: Option<Lineage>,
    /// The id of the group's trace (its spans from every process), once a job of it was
    /// dispatched with spans exported.
    pub trace_id: Option<String>,
}

/// Where the group's contact sheet stands.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SheetState {
    /// Its S3 key, once written for the current decision.
    pub key: Option<String>,
    pub written_at: Option<DateTime<Utc>>,
    /// Why the last try to make it failed, and when it is tried again.
    pub error: Option<String>,
    pub retry_at: Option<DateTime<Utc>>,
}

impl GroupRecord {
    /// Whether the sheet in S3 shows the current decision.
    pub fn has_current_sheet(&self) -> bool {
        self.sheet.key.is_some() && self.sheet.written_at.is_some()
    }

    /// Image `index`'s aesthetic score as people read it.
    pub fn aesthetic_text(&self, index: usize) -> String {
        self.aesthetic
            .as_ref()
            .and_then(|scores| scores.get(index))
            .map_or("not scored".to_string(), |score| {
                format!("aesthetic {score:.2}")
            })
    }

    /// Whether image `index` counts for the dataset; `None` before the group was scored.
    pub fn image_valid(&self, index: usize) -> Option<bool> {
        self.valid_images
            .as_ref()
            .map(|valid| valid.contains(&(index as u32)))
    }
}

/// Which groups of a run to list, by decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionFilter {
    #[default]
    All,
    Accepted,
    Rejected,
    NearDuplicate,
    Failed,
    Pending,
}

impl DecisionFilter {
    pub const ALL: [DecisionFilter; 6] = [
        Self::All,
        Self::Accepted,
        Self::Rejected,
        Self::NearDuplicate,
        Self::Failed,
        Self::Pending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::NearDuplicate => "near_duplicate",
            Self::Failed => "failed",
            Self::Pending => "pending",
        }
    }

    /// The decision the groups must have; `None` for all of them.
    fn decision(self) -> Option<&'static str> {
        (self != Self::All).then(|| self.as_str())
    }
}

const RECORD_SELECT: &str = "
    SELECT g.id, g.run_id, r.name AS run_name, g.object_id, o.ordinal, o.spec, g.group_index,
           g.seed, g.decision, g.reason, g.decided_at, g.prompts, g.image_prompts, g.aesthetic,
           g.pairs, g.valid_images, g.image_keys, g.mask_keys, r.config -> 'filter' AS thresholds,
           g.sheet_key, g.sheet_at, g.sheet_error, g.sheet_retry_at, g.generation,
           g.generated_by, g.scored_by, g.traceparent
    FROM groups g JOIN objects o ON o.id = g.object_id JOIN runs r ON r.id = g.run_id";

/// The group `id`, or `None` if there is no such group.
pub async fn load(pool: &PgPool, id: GroupId) -> Result<Option<GroupRecord>> {
    let row = sqlx::query(&format!("{RECORD_SELECT} WHERE g.id = $1"))
        .bind(id.0)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("reading group {id}"))?;
    row.as_ref().map(from_row).transpose()
}

/// The group `id`, or an error that names it.
pub async fn get(pool: &PgPool, id: GroupId) -> Result<GroupRecord> {
    load(pool, id)
        .await?
        .ok_or_else(|| crate::admin::NotFound(format!("no group {id}")).into())
}

/// One page of a run's groups, in the run's order (object, then group index).
#[derive(Debug, Serialize)]
pub struct GroupPage {
    pub groups: Vec<GroupRecord>,
    /// How many groups pass the filter in all.
    pub total: i64,
}

/// The groups of `run` that pass `filter`, `limit` from `offset`.
pub async fn list(
    pool: &PgPool,
    run: RunId,
    filter: DecisionFilter,
    offset: i64,
    limit: i64,
) -> Result<GroupPage> {
    let rows = sqlx::query(&format!(
        "{RECORD_SELECT} WHERE g.run_id = $1 AND ($2::text IS NULL OR g.decision = $2)
         ORDER BY o.ordinal, g.group_index OFFSET $3 LIMIT $4"
    ))
    .bind(run.0)
    .bind(filter.decision())
    .bind(offset.max(0))
    .bind(limit.max(0))
    .fetch_all(pool)
    .await
    .with_context(|| format!("listing the groups of run {run}"))?;
    let (total,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM groups WHERE run_id = $1 AND ($2::text IS NULL OR decision = $2)",
    )
    .bind(run.0)
    .bind(filter.decision())
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the groups of run {run}"))?;
    Ok(GroupPage {
        groups: rows.iter().map(from_row).collect::<Result<_>>()?,
        total,
    })
}

/// Parses a JSONB column that may be NULL.
pub(crate) fn optional_json<T: serde::de::DeserializeOwned>(
    row: &PgRow,
    column: &str,
) -> Result<Option<T>> {
    row.try_get::<Option<serde_json::Value>, _>(column)?
        .map(serde_json::from_value)
        .transpose()
        .with_context(|| format!("the stored {column} does not parse"))
}

fn from_row(row: &PgRow) -> Result<GroupRecord> {
    let id = GroupId(row.try_get("id")?);
    let required = |column: &str| -> Result<serde_json::Value> {
        row.try_get(column)
            .with_context(|| format!("group {id}: reading {column}"))
    };
    Ok(GroupRecord {
        id,
        run_id: RunId(row.try_get("run_id")?),
        run_name: row.try_get("run_name")?,
        object_id: ObjectId(row.try_get("object_id")?),
        object_ordinal: row.try_get("ordinal")?,
        object: serde_json::from_value(required("spec")?).context("the stored object spec")?,
        index: row.try_get("group_index")?,
        seed: row.try_get::<i64, _>("seed")? as u64,
        decision: row.try_get("decision")?,
        reason: row.try_get("reason")?,
        decided_at: row.try_get("decided_at")?,
        prompts: serde_json::from_value(required("prompts")?).context("the stored prompts")?,
        image_prompts: optional_json(row, "image_prompts")?,
        aesthetic: optional_json(row, "aesthetic")?,
        pairs: optional_json(row, "pairs")?,
        valid_images: optional_json(row, "valid_images")?,
        image_keys: optional_json(row, "image_keys")?,
        mask_keys: optional_json(row, "mask_keys")?,
        thresholds: optional_json(row, "thresholds")?.unwrap_or_default(),
        sheet: SheetState {
            key: row.try_get("sheet_key")?,
            written_at: row.try_get("sheet_at")?,
            error: row.try_get("sheet_error")?,
            retry_at: row.try_get("sheet_retry_at")?,
        },
        lineage: lineage(row)?,
        trace_id: row
            .try_get::<Option<String>, _>("traceparent")?
            .and_then(|traceparent| Some(traceparent.split('-').nth(1)?.to_string())),
    })
}

/// A group's lineage from its `generation`, `generated_by` and `scored_by` columns: `None` for
/// a group planned before the generation settings were kept.
pub fn lineage(row: &PgRow) -> Result<Option<Lineage>> {
    let Some(generation) = optional_json(row, "generation")? else {
        return Ok(None);
    };
    Ok(Some(Lineage {
        generation,
        generated_by: optional_json(row, "generated_by")?,
        scored_by: optional_json(row, "scored_by")?,
    }))
}
