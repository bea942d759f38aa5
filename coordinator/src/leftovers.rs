//! Nothing left behind in S3. Keys are deterministic, so a retried attempt overwrites what the
//! failed one wrote; what no attempt overwrites is what a job wrote before it failed for good.
//!
//! - [`reclaim_failed_groups`] (a coordinator loop) removes the files of groups that failed before
//!   their images were recorded: partial uploads of a generation that never succeeded. A group
//!   that failed later (in scoring) keeps its recorded images, so that a retry can score them.
//! - [`find`] (`syncd run leftovers RUN`) compares everything under `runs/{run}/` with what the
//!   database refers to: the run's assets, the files of its succeeded prior jobs and the images,
//!   masks and contact sheets of its groups. Files of work still in flight are counted apart,
//!   never as leftovers; [`reclaim`] (`--delete`) removes the leftovers of a run that is no longer
//!   active.
//! - [`reclaim_packed`] (`syncd run reclaim RUN`) removes the working copies of the images and
//!   masks of groups packed into written dataset shards.

use crate::db::{groups, jobs};
use crate::state::RunState;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeSet;
use syncd_infra::storage::Storage;
use syncd_proto::messages::PriorOutput;
use syncd_proto::{keys, RunId};

/// Groups whose files one pass of [`reclaim_failed_groups`] removes at most.
const RECLAIM_BATCH: i64 = 100;

/// Removes the files of failed groups that have no recorded images; returns how many groups.
pub async fn reclaim_failed_groups(pool: &PgPool, storage: &Storage) -> Result<usize> {
    let failed = groups::failed_unreclaimed(pool, RECLAIM_BATCH).await?;
    for (group, run) in &failed {
        let prefix = keys::group_prefix(*run, *group);
        let found = storage.list(&prefix).await?;
        storage.delete(&found).await?;
        groups::mark_reclaimed(pool, &[group.0]).await?;
        if !found.is_empty() {
            tracing::info!(%group, files = found.len(), "removed the files of a failed group");
        }
    }
    Ok(failed.len())
}

/// What `syncd run leftovers` found.
#[derive(Debug, Serialize)]
pub struct Leftovers {
    pub run: RunId,
    pub run_state: String,
    /// Files under `runs/{run}/`.
    pub scanned: usize,
    /// Files the database refers to.
    pub referred: usize,
    /// Files of groups and priors still being made (only while the run is active).
    pub in_flight: usize,
    /// Files nothing refers to.
    pub leftovers: Vec<String>,
    /// Whether the leftovers were deleted.
    pub deleted: bool,
}

/// Lists the files of `run` nothing refers to.
pub async fn find(pool: &PgPool, storage: &Storage, run: RunId) -> Result<Leftovers> {
    let state = crate::db::runs::state(pool, run)
        .await?
        .with_context(|| format!("no run {run}"))?;
    let referred = referred_keys(pool, run).await?;
    let in_flight = in_flight_prefixes(pool, run).await?;
    let scanned = storage.list(&keys::run_prefix(run)).await?;
    let mut result = Leftovers {
        run,
        run_state: state.to_string(),
        scanned: scanned.len(),
        referred: 0,
        in_flight: 0,
        leftovers: Vec::new(),
        deleted: false,
    };
    for key in scanned {
        if referred.contains(&key) {
            result.referred += 1;
        } else if in_flight.iter().any(|prefix| key.starts_with(prefix)) {
            result.in_flight += 1;
        } else {
            result.leftovers.push(key);
        }
    }
    Ok(result)
}

/// What `syncd run reclaim` removed.
#[derive(Debug, Serialize)]
pub struct Reclaimed {
    pub run: RunId,
    /// Packed groups whose working copies were deleted by this call.
    pub groups: usize,
    pub files: usize,
}

/// Deletes the images and masks of the run's groups that are packed into written dataset
/// shards: the dataset holds them now. Their records and contact sheets stay. In batches, each
/// marked reclaimed once its files are gone, so an interrupted call is simply run again.
pub async fn reclaim_packed(pool: &PgPool, storage: &Storage, run: RunId) -> Result<Reclaimed> {
    let mut reclaimed = Reclaimed {
        run,
        groups: 0,
        files: 0,
    };
    loop {
        let packed = groups::packed_unreclaimed(pool, run, RECLAIM_BATCH).await?;
        if packed.is_empty() {
            return Ok(reclaimed);
        }
        let mut files = Vec::new();
        for (_, images, masks) in &packed {
            files.extend(serde_json::from_value::<Vec<String>>(images.clone())?);
            files.extend(serde_json::from_value::<Vec<String>>(masks.clone())?);
        }
        storage.delete(&files).await?;
        let ids: Vec<uuid::Uuid> = packed.iter().map(|(id, _, _)| id.0).collect();
        groups::mark_reclaimed(pool, &ids).await?;
        reclaimed.groups += packed.len();
        reclaimed.files += files.len();
    }
}

/// Deletes the leftovers of a run that is no longer active.
pub async fn reclaim(pool: &PgPool, storage: &Storage, run: RunId) -> Result<Leftovers> {
    let mut found = find(pool, storage, run).await?;
    if found.run_state == RunState::Active.as_str() {
        bail!(
            "run {run} is active: its files are still being written; delete leftovers once it is \
             paused, cancelled or completed"
        );
    }
    storage.delete(&found.leftovers).await?;
    found.deleted = true;
    Ok(found)
}

/// Every key of `run` the database refers to.
async fn referred_keys(pool: &PgPool, run: RunId) -> Result<BTreeSet<String>> {
    let mut referred = BTreeSet::new();
    referred.extend(crate::db::objects::asset_keys(pool, run).await?);

    let mut stored_keys = Vec::new();
    for (group, images, masks) in groups::with_images_of_run(pool, run).await? {
        // A group with images has (or will have, once decided) its contact sheet beside them.
        referred.insert(keys::group_sheet(run, group));
        stored_keys.extend([images, masks]);
    }

    // The images of each regeneration (`syncd group regenerate`), kept to compare again.
    stored_keys.extend(crate::regenerations::stored_keys_of_run(pool, run).await?);
    for stored in stored_keys {
        let keys: Option<Vec<String>> = crate::groups::optional_json(stored, "image or mask keys")?;
        referred.extend(keys.unwrap_or_default());
    }

    for (object, output) in jobs::succeeded_prior_outputs(pool, run).await? {
        let Some(output) = output else { continue };
        let output: syncd_proto::messages::JobOutput =
            serde_json::from_value(output).context("stored prior output")?;
        if let syncd_proto::messages::JobOutput::Prior(PriorOutput { triplets }) = output {
            for triplet in triplets {
                referred.extend(keys::prior_triplet_keys(run, object, triplet.index));
            }
        }
    }
    Ok(referred)
}

/// Prefixes of work still in progress: pending groups, and the priors of objects whose prior job
/// has not finished.
async fn in_flight_prefixes(pool: &PgPool, run: RunId) -> Result<Vec<String>> {
    // Pending groups, and groups being regenerated.
    let in_flight = groups::in_flight_of_run(pool, run).await?;
    let priors = jobs::objects_with_prior_in_flight(pool, run).await?;
    Ok(in_flight
        .into_iter()
        .map(|group| keys::group_prefix(run, group))
        .chain(
            priors
                .into_iter()
                .map(|object| keys::prior_prefix(run, object)),
        )
        .collect())
}
