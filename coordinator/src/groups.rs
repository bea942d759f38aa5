//! What the database knows of a group, in one record: the facts `syncd group show` prints, the
//! gallery shows as JSON and a contact sheet draws. Read-only.

use crate::db;
use crate::state::Decision;
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
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
    fn decision(self) -> Option<Decision> {
        match self {
            Self::All => None,
            Self::Accepted => Some(Decision::Accepted),
            Self::Rejected => Some(Decision::Rejected),
            Self::NearDuplicate => Some(Decision::NearDuplicate),
            Self::Failed => Some(Decision::Failed),
            Self::Pending => Some(Decision::Pending),
        }
    }
}

/// The group `id`, or `None` if there is no such group.
pub async fn load(pool: &PgPool, id: GroupId) -> Result<Option<GroupRecord>> {
    db::groups::record(pool, id)
        .await?
        .map(GroupRecord::try_from)
        .transpose()
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
    let decision = filter.decision();
    let rows = db::groups::records_of_run(pool, run, decision, offset.max(0), limit.max(0)).await?;
    Ok(GroupPage {
        groups: rows
            .into_iter()
            .map(GroupRecord::try_from)
            .collect::<Result<_>>()?,
        total: db::groups::count_of_run(pool, run, decision).await?,
    })
}

/// Parses a stored JSON value that may be NULL; `what` names it in the error.
pub(crate) fn optional_json<T: serde::de::DeserializeOwned>(
    value: Option<serde_json::Value>,
    what: &str,
) -> Result<Option<T>> {
    value
        .map(serde_json::from_value)
        .transpose()
        .with_context(|| format!("the stored {what} does not parse"))
}

impl TryFrom<db::groups::RecordRow> for GroupRecord {
    type Error = anyhow::Error;

    fn try_from(row: db::groups::RecordRow) -> Result<Self> {
        let id = GroupId(row.id);
        Ok(GroupRecord {
            id,
            run_id: RunId(row.run_id),
            run_name: row.run_name,
            object_id: ObjectId(row.object_id),
            object_ordinal: row.ordinal,
            object: serde_json::from_value(row.spec)
                .with_context(|| format!("group {id}: the stored object spec"))?,
            index: row.group_index,
            seed: row.seed as u64,
            decision: row.decision,
            reason: row.reason,
            decided_at: row.decided_at,
            prompts: serde_json::from_value(row.prompts)
                .with_context(|| format!("group {id}: the stored prompts"))?,
            image_prompts: optional_json(row.image_prompts, "image_prompts")?,
            aesthetic: optional_json(row.aesthetic, "aesthetic")?,
            pairs: optional_json(row.pairs, "pairs")?,
            valid_images: optional_json(row.valid_images, "valid_images")?,
            image_keys: optional_json(row.image_keys, "image_keys")?,
            mask_keys: optional_json(row.mask_keys, "mask_keys")?,
            thresholds: optional_json(row.thresholds, "thresholds")?.unwrap_or_default(),
            sheet: SheetState {
                key: row.sheet_key,
                written_at: row.sheet_at,
                error: row.sheet_error,
                retry_at: row.sheet_retry_at,
            },
            lineage: lineage(row.generation, row.generated_by, row.scored_by)?,
            trace_id: row
                .traceparent
                .and_then(|traceparent| Some(traceparent.split('-').nth(1)?.to_string())),
        })
    }
}

/// A group's lineage from its `generation`, `generated_by` and `scored_by` columns: `None` for
/// a group planned before the generation settings were kept.
pub fn lineage(
    generation: Option<serde_json::Value>,
    generated_by: Option<serde_json::Value>,
    scored_by: Option<serde_json::Value>,
) -> Result<Option<Lineage>> {
    let Some(generation) = optional_json(generation, "generation")? else {
        return Ok(None);
    };
    Ok(Some(Lineage {
        generation,
        generated_by: optional_json(generated_by, "generated_by")?,
        scored_by: optional_json(scored_by, "scored_by")?,
    }))
}
