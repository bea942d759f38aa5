//! `syncd group regenerate`: a group generated again from its lineage, and compared with the
//! images it holds. Owns the `regenerations` table.
//!
//! A regeneration is an ordinary generation job (dispatched, leased, retried and fenced like any
//! other) whose payload is a copy of the group's own generation job with `regeneration` set. The
//! worker writes its outputs under the regeneration's prefix
//! (`runs/{run}/groups/{group}/regenerations/{n}/attempt-{a}/`), and the coordinator records
//! them here instead of on the group: the group's images, scores, decision and dataset sample
//! never change. Regeneration jobs are dispatched whatever the run's state, except while the run
//! is paused, so a finished run's groups can be regenerated.
//!
//! FLUX on one device and one set of weights is deterministic here (the noise is drawn on the
//! CPU from the group's seed), so a regeneration on the same setup as the original must give the
//! same pixels; on other weights, code or devices it need not, and the comparison says which of
//! them differed.

use crate::db::jobs::{self, NewJob};
use crate::groups::optional_json;
use crate::state::JobState;
use anyhow::{bail, Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use std::time::{Duration, Instant};
use syncd_infra::outage;
use syncd_infra::storage::Storage;
use syncd_proto::lineage::Provenance;
use syncd_proto::messages::{GenerateOutput, JobPayload};
use syncd_proto::{GroupId, JobId};

/// One regeneration and where its job stands.
#[derive(Clone, Debug)]
pub struct Regeneration {
    pub group: GroupId,
    pub number: u32,
    pub job: JobId,
    pub job_state: JobState,
    /// The job's last error, once it failed.
    pub error: Option<String>,
    pub image_keys: Option<Vec<String>>,
    pub mask_keys: Option<Vec<String>>,
    pub generated_by: Option<Provenance>,
}

/// Starts regeneration of `group`: a copy of its generation job, numbered after the group's
/// earlier regenerations. The group must have images to compare with.
pub async fn request(pool: &PgPool, group: GroupId) -> Result<Regeneration> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    // Locking the group numbers concurrent requests one after the other.
    let row = crate::db::groups::lock_to_regenerate(&mut tx, group)
        .await?
        .ok_or_else(|| crate::admin::NotFound(format!("no group {group}")))?;
    if !row.generated {
        bail!(crate::admin::InvalidInput(anyhow::anyhow!(
            "group {group} has no images yet: there is nothing to regenerate and compare with"
        )));
    }
    if row.reclaimed {
        bail!(crate::admin::InvalidInput(anyhow::anyhow!(
            "group {group}'s images were deleted once packed into the dataset (`syncd run \
             reclaim`): there is nothing to compare a regeneration with"
        )));
    }
    let run = syncd_proto::RunId(row.run_id);
    let object = syncd_proto::ObjectId(row.object_id);
    let original = jobs::first_generation_payload(&mut tx, group).await?;
    let Some(JobPayload::Generate(mut generate)) =
        original.map(serde_json::from_value).transpose()?
    else {
        bail!("group {group} has no generation job to regenerate it from");
    };
    let number = sqlx::query_scalar!(
        r#"SELECT COALESCE(max(number), 0) + 1 AS "number!" FROM regenerations
           WHERE group_id = $1"#,
        group.0
    )
    .fetch_one(&mut *tx)
    .await
    .context("numbering a regeneration")?;
    generate.regeneration = Some(number as u32);
    let (config, _) = crate::db::runs::config_and_state(&mut tx, run).await?;
    let job = jobs::insert(
        &mut tx,
        NewJob {
            run_id: run,
            object_id: object,
            group_id: Some(group),
            payload: JobPayload::Generate(generate),
            max_attempts: config.jobs.max_attempts,
            lease_secs: config.jobs.lease_secs,
        },
    )
    .await?;
    sqlx::query!(
        "INSERT INTO regenerations (group_id, number, job_id) VALUES ($1, $2, $3)",
        group.0,
        number,
        job.0
    )
    .execute(&mut *tx)
    .await
    .context("recording the regeneration")?;
    tx.commit().await.context("committing the regeneration")?;
    load(pool, group, number as u32).await
}

/// Records the outputs of regeneration `number` (already fenced to the awaited attempt by the
/// caller), in the report's transaction.
pub async fn record_output(
    conn: &mut PgConnection,
    group: GroupId,
    number: u32,
    output: &GenerateOutput,
    generated_by: Option<&Provenance>,
) -> Result<()> {
    sqlx::query!(
        "UPDATE regenerations SET image_keys = $3, mask_keys = $4, generated_by = $5,
             generated_at = now()
         WHERE group_id = $1 AND number = $2",
        group.0,
        number as i32,
        serde_json::to_value(&output.image_keys)?,
        serde_json::to_value(&output.mask_keys)?,
        generated_by.map(serde_json::to_value).transpose()?
    )
    .execute(conn)
    .await
    .context("recording a regeneration's images")?;
    Ok(())
}

/// The image and mask keys (JSON lists, each `None` until made) of every regeneration of the
/// run's groups.
pub async fn stored_keys_of_run(
    pool: &PgPool,
    run: syncd_proto::RunId,
) -> Result<Vec<Option<serde_json::Value>>> {
    let rows = sqlx::query!(
        "SELECT x.image_keys, x.mask_keys FROM regenerations x JOIN groups g ON g.id = x.group_id
         WHERE g.run_id = $1 AND x.image_keys IS NOT NULL",
        run.0
    )
    .fetch_all(pool)
    .await
    .context("listing regenerated images")?;
    Ok(rows
        .into_iter()
        .flat_map(|row| [row.image_keys, row.mask_keys])
        .collect())
}

pub async fn load(pool: &PgPool, group: GroupId, number: u32) -> Result<Regeneration> {
    let row = sqlx::query!(
        "SELECT r.job_id, j.state, j.last_error, r.image_keys, r.mask_keys, r.generated_by
         FROM regenerations r JOIN jobs j ON j.id = r.job_id
         WHERE r.group_id = $1 AND r.number = $2",
        group.0,
        number as i32
    )
    .fetch_optional(pool)
    .await
    .context("reading a regeneration")?
    .ok_or_else(|| crate::admin::NotFound(format!("no regeneration {number} of group {group}")))?;
    Ok(Regeneration {
        group,
        number,
        job: JobId(row.job_id),
        job_state: row.state.parse().map_err(anyhow::Error::msg)?,
        error: row.last_error,
        image_keys: optional_json(row.image_keys, "image_keys")?,
        mask_keys: optional_json(row.mask_keys, "mask_keys")?,
        generated_by: optional_json(row.generated_by, "generated_by")?,
    })
}

/// Waits until the regeneration's job ends (database outages waited out), or `timeout` passes.
pub async fn wait(
    pool: &PgPool,
    group: GroupId,
    number: u32,
    timeout: Duration,
) -> Result<Regeneration> {
    let deadline = Instant::now() + timeout;
    let mut delays = outage::backoff();
    loop {
        match load(pool, group, number).await {
            Ok(regeneration) if regeneration.job_state.is_terminal() => return Ok(regeneration),
            Ok(regeneration) => {
                if Instant::now() >= deadline {
                    bail!(
                        "regeneration {number} of group {group} is still {} after {}s (job {}): \
                         are generation workers running?",
                        regeneration.job_state,
                        timeout.as_secs(),
                        regeneration.job
                    );
                }
                delays = outage::backoff();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) if outage::classify(&error).is_some() => {
                tracing::warn!("database unreachable, retrying: {error:#}");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How one regenerated file compares with the group's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileComparison {
    /// "image" or "mask", and its index in the group.
    pub what: String,
    pub index: usize,
    pub original: String,
    pub regenerated: String,
    /// Same size and every pixel value equal.
    pub identical: bool,
    /// Pixel values (8-bit channels) that differ, and the largest difference; `None` when the
    /// sizes differ.
    pub differing_values: Option<u64>,
    pub max_difference: Option<u8>,
    pub detail: Option<String>,
}

/// What `syncd group regenerate` found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub group: GroupId,
    pub number: u32,
    /// Every image and mask bit-identical to the group's.
    pub identical: bool,
    pub files: Vec<FileComparison>,
    /// What made the group's images and the regenerated ones.
    pub original_setup: Option<Provenance>,
    pub regenerated_setup: Option<Provenance>,
    /// Whether both ran the same models (by weights' hash), code and device kind; `None` when
    /// either is unknown.
    pub same_setup: Option<bool>,
}

/// Compares a finished regeneration's images and masks with the group's, pixel by pixel, and
/// keeps the result with the regeneration.
pub async fn compare(
    pool: &PgPool,
    storage: &Storage,
    regeneration: &Regeneration,
) -> Result<Comparison> {
    let group = crate::groups::get(pool, regeneration.group).await?;
    let (Some(regenerated_images), Some(regenerated_masks)) =
        (&regeneration.image_keys, &regeneration.mask_keys)
    else {
        bail!(
            "regeneration {} of group {} has no images (its job is {})",
            regeneration.number,
            group.id,
            regeneration.job_state
        );
    };
    let (Some(images), Some(masks)) = (&group.image_keys, &group.mask_keys) else {
        bail!("group {} has no images to compare with", group.id);
    };
    let mut files = Vec::new();
    for (what, originals, regenerated) in [
        ("image", images, regenerated_images),
        ("mask", masks, regenerated_masks),
    ] {
        if originals.len() != regenerated.len() {
            bail!(
                "group {} has {} {what}s, its regeneration {}",
                group.id,
                originals.len(),
                regenerated.len()
            );
        }
        for (index, (original, again)) in originals.iter().zip(regenerated).enumerate() {
            let before = storage.get(original).await?;
            let after = storage.get(again).await?;
            let mut file = compare_pngs(&before, &after);
            file.what = what.to_string();
            file.index = index;
            file.original.clone_from(original);
            file.regenerated.clone_from(again);
            files.push(file);
        }
    }
    let original_setup = group
        .lineage
        .as_ref()
        .and_then(|lineage| lineage.generated_by.clone());
    let same_setup = match (&original_setup, &regeneration.generated_by) {
        (Some(original), Some(again)) => Some(original.same_setup(again)),
        _ => None,
    };
    let comparison = Comparison {
        group: group.id,
        number: regeneration.number,
        identical: files.iter().all(|file| file.identical),
        files,
        original_setup,
        regenerated_setup: regeneration.generated_by.clone(),
        same_setup,
    };
    sqlx::query!(
        "UPDATE regenerations SET comparison = $3, compared_at = now()
         WHERE group_id = $1 AND number = $2",
        group.id.0,
        regeneration.number as i32,
        serde_json::to_value(&comparison)?
    )
    .execute(pool)
    .await
    .context("keeping the comparison")?;
    Ok(comparison)
}

/// Two PNG files compared by their decoded pixels (8-bit channels as stored: RGB images, grey
/// masks). The caller fills in what they are.
fn compare_pngs(before: &[u8], after: &[u8]) -> FileComparison {
    let mut file = FileComparison {
        what: String::new(),
        index: 0,
        original: String::new(),
        regenerated: String::new(),
        identical: false,
        differing_values: None,
        max_difference: None,
        detail: None,
    };
    let decoded = |bytes: &[u8]| image::load_from_memory(bytes).map(DynamicImage::into_rgba8);
    match (decoded(before), decoded(after)) {
        (Ok(before), Ok(after)) if before.dimensions() != after.dimensions() => {
            file.detail = Some(format!(
                "sizes differ: {:?} and {:?}",
                before.dimensions(),
                after.dimensions()
            ));
        }
        (Ok(before), Ok(after)) => {
            let (mut differing, mut largest) = (0u64, 0u8);
            for (a, b) in before.as_raw().iter().zip(after.as_raw()) {
                if a != b {
                    differing += 1;
                    largest = largest.max(a.abs_diff(*b));
                }
            }
            file.identical = differing == 0;
            file.differing_values = Some(differing);
            file.max_difference = Some(largest);
        }
        (Err(error), _) | (_, Err(error)) => {
            file.detail = Some(format!("does not decode: {error}"));
        }
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, pixels: impl Fn(u32, u32) -> u8) -> Vec<u8> {
        let image = image::GrayImage::from_fn(width, 4, |x, y| image::Luma([pixels(x, y)]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageLuma8(image)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    }

    #[test]
    fn pixels_are_compared_value_by_value() {
        let original = png(4, |x, y| (x * 10 + y) as u8);
        let same = compare_pngs(&original, &png(4, |x, y| (x * 10 + y) as u8));
        assert!(same.identical);
        assert_eq!(same.differing_values, Some(0));
        // One pixel off by 3: grey is expanded to R, G and B, so three values differ.
        let changed = png(4, |x, y| {
            (x * 10 + y) as u8 + u8::from((x, y) == (1, 2)) * 3
        });
        let differs = compare_pngs(&original, &changed);
        assert!(!differs.identical);
        assert_eq!(differs.differing_values, Some(3));
        assert_eq!(differs.max_difference, Some(3));
        let resized = compare_pngs(&original, &png(5, |_, _| 0));
        assert!(!resized.identical);
        assert!(resized.detail.unwrap().contains("sizes differ"));
        let broken = compare_pngs(&original, b"not a png");
        assert!(!broken.identical);
        assert!(broken.detail.unwrap().contains("does not decode"));
    }
}
