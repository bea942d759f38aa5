//! The `groups` table: the statements that decide a group. A group's decision changes only
//! here, as [`Decision::can_become`] allows, matching the decision it expects. (The group's
//! other columns, its record and the packing columns, are still written from `crate::planner`,
//! `crate::pictures`, `crate::leftovers` and `crate::dataset::packing`.)

use crate::state::Decision;
use anyhow::{bail, Context, Result};
use sqlx::PgConnection;
use syncd_proto::messages::ScoreOutput;
use syncd_proto::{GroupId, ObjectId};

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

/// Records a pending group's scores and the verdict on them.
///
/// The time is `clock_timestamp()`, not `now()`: reports are applied a batch per transaction,
/// and `now()` is the transaction's start, which would give a batch's decisions one time and
/// lose the order the near-duplicate rule saw them in.
pub async fn decide(
    conn: &mut PgConnection,
    group: GroupId,
    scores: &ScoreOutput,
    verdict: &Verdict,
    scored_by: Option<serde_json::Value>,
) -> Result<()> {
    check(group, Decision::Pending, verdict.decision)?;
    let updated = sqlx::query!(
        "UPDATE groups SET aesthetic = $2, pairs = $3, embeddings = $4, decision = $5,
             valid_images = $6, reason = $7, decided_at = clock_timestamp(), scored_by = $8
         WHERE id = $1 AND decision = 'pending'",
        group.0,
        serde_json::to_value(&scores.aesthetic)?,
        serde_json::to_value(&scores.pairs)?,
        serde_json::to_value(&scores.embeddings)?,
        verdict.decision.as_str(),
        serde_json::to_value(&verdict.valid_images)?,
        verdict.reason,
        scored_by
    )
    .execute(conn)
    .await
    .context("recording a group's decision")?;
    if updated.rows_affected() != 1 {
        bail!("group {group} is no longer pending: its scores cannot decide it");
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

/// How many of an object's groups are still undecided.
pub async fn pending_of_object(conn: &mut PgConnection, object: ObjectId) -> Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "pending!" FROM groups
           WHERE object_id = $1 AND decision = 'pending'"#,
        object.0
    )
    .fetch_one(conn)
    .await
    .context("counting an object's undecided groups")
}
