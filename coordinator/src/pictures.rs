//! Pictures of groups made by the coordinator: contact sheets of decided groups, written to S3
//! beside each group's images (`runs/{run}/groups/{group}/sheet.png`) by the sheets loop
//! ([`write_missing_sheets`]); a group's sheet for `syncd group show --sheet` and the gallery
//! ([`sheet`]); grids of a run's groups for `syncd run sheet` ([`run_grid`]). The drawing itself
//! is [`crate::sheets`].
//!
//! This moves image bytes through the coordinator: every sheet downloads its group's images and
//! masks (a few MB at 1024x1024) and decodes, scales and encodes them on the coordinator's CPU,
//! off the async threads. `loops.sheet_concurrency` bounds how many at once. Should that ever
//! weigh on the coordinator, sheets could become a job kind of their own for CPU workers: the
//! inputs are in S3 and the record fits in a job message.
//!
//! Sheets never hold a run up and never fail a group. An outage of S3 or the database is waited
//! out like in every loop; a sheet that cannot be made (an image missing from S3, or undecodable)
//! is logged as an error with its cause and tried again later, after 1 minute, then twice as long
//! after every failure, up to a day.

use crate::db;
use crate::groups::{self, DecisionFilter, GroupRecord};
use crate::sheets::{self, Picture};
use anyhow::{bail, Context, Result};
use bytes::Bytes;

use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use syncd_infra::outage;
use syncd_infra::storage::Storage;
use syncd_proto::{keys, GroupId, RunId};

/// How many groups' files a grid downloads at once.
const GRID_DOWNLOADS: usize = 8;
/// The wait before a failed sheet is tried again, doubled after each failure...
const RETRY_FIRST_SECS: f64 = 60.0;
/// ...up to this.
const RETRY_MAX_SECS: f64 = 86_400.0;

/// The files of one image: the image and, when the group recorded one, its mask.
struct Files {
    image: Bytes,
    mask: Option<Bytes>,
}

/// Downloads the images and masks `record` refers to.
async fn download(storage: &Storage, record: &GroupRecord) -> Result<Vec<Files>> {
    let Some(image_keys) = &record.image_keys else {
        bail!(
            "group {} has no images (it is {}): its generation never succeeded",
            record.id,
            record.decision
        );
    };
    let mask_keys = record.mask_keys.clone().unwrap_or_default();
    let downloads = image_keys.iter().enumerate().map(|(index, key)| {
        let mask_key = mask_keys.get(index);
        async move {
            let image = storage
                .get(key)
                .await
                .with_context(|| format!("image {index} of group {} ({key})", record.id))?;
            let mask = match mask_key {
                Some(mask_key) => Some(storage.get(mask_key).await.with_context(|| {
                    format!("mask {index} of group {} ({mask_key})", record.id)
                })?),
                None => None,
            };
            anyhow::Ok(Files { image, mask })
        }
    });
    futures::future::try_join_all(downloads).await
}

/// Decodes downloaded files, naming the image that does not decode.
fn decode(record: &GroupRecord, files: &[Files]) -> Result<Vec<Picture>> {
    files
        .iter()
        .enumerate()
        .map(|(index, files)| {
            Picture::decode(&files.image, files.mask.as_deref())
                .with_context(|| format!("image {index} of group {}", record.id))
        })
        .collect()
}

/// Draws the contact sheet of `record` from its files in S3.
pub async fn render(storage: &Storage, record: &GroupRecord) -> Result<Vec<u8>> {
    let files = download(storage, record).await?;
    let record = record.clone();
    // Decoding and encoding take a CPU for a while: not on the async threads.
    tokio::task::spawn_blocking(move || {
        let pictures = decode(&record, &files)?;
        sheets::render_sheet(&record, &pictures)
    })
    .await
    .context("the sheet's drawing thread")?
}

/// Where a sheet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SheetSource {
    /// The one the sheets loop wrote to S3.
    Stored,
    /// Drawn now, because none is stored for the group's decision (yet); not stored.
    Drawn,
}

/// The contact sheet of `record`: the stored one, or one drawn now.
pub async fn sheet(storage: &Storage, record: &GroupRecord) -> Result<(Bytes, SheetSource)> {
    if let (true, Some(key)) = (record.has_current_sheet(), &record.sheet.key) {
        match storage.get(key).await {
            Ok(bytes) => return Ok((bytes, SheetSource::Stored)),
            Err(error) if outage::classify(&error).is_some() => return Err(error),
            // Deleted behind the factory's back: draw it again.
            Err(error) => tracing::warn!(
                group = %record.id,
                error = format!("{error:#}"),
                "the stored contact sheet cannot be read; drawing it"
            ),
        }
    }
    Ok((render(storage, record).await?.into(), SheetSource::Drawn))
}

/// One pass of the sheets loop: draws and stores the sheets of up to `4 x concurrency` decided
/// groups that have none, `concurrency` at once; returns how many it wrote. Fails only on an
/// outage (or a database error), after the other sheets of the pass are done.
pub async fn write_missing_sheets(
    pool: &PgPool,
    storage: &Storage,
    concurrency: usize,
) -> Result<usize> {
    if concurrency == 0 {
        return Ok(0);
    }
    let due = db::groups::due_for_sheet(pool, (concurrency * 4) as i64).await?;
    let results: Vec<Result<bool>> = futures::stream::iter(due)
        .map(|id| write_sheet(pool, storage, id))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut written = 0;
    for result in results {
        written += usize::from(result?);
    }
    Ok(written)
}

/// Draws and stores one group's sheet; true when it was written for the group's decision.
async fn write_sheet(pool: &PgPool, storage: &Storage, id: GroupId) -> Result<bool> {
    let Some(record) = groups::load(pool, id).await? else {
        return Ok(false);
    };
    let key = keys::group_sheet(record.run_id, record.id);
    let stored = async {
        let png = render(storage, &record).await?;
        storage.put(&key, png, "image/png").await
    };
    match stored.await {
        Ok(()) => {
            // Only for the decision it shows: a group sent back to pending meanwhile (an admin
            // retry) keeps no sheet, and gets a new one once decided again.
            let updated =
                db::groups::set_sheet(pool, id, &key, &record.decision, record.decided_at).await?;
            metrics::counter!("syncd_sheets_total", "outcome" => "written").increment(1);
            Ok(updated)
        }
        Err(error) if outage::classify(&error).is_some() => Err(error),
        Err(error) => {
            record_failure(pool, &record, &error).await?;
            Ok(false)
        }
    }
}

/// Keeps why a sheet could not be made and when to try again, and says so in the log.
async fn record_failure(pool: &PgPool, record: &GroupRecord, error: &anyhow::Error) -> Result<()> {
    let message = format!("{error:#}");
    let (failures, retry_at) =
        db::groups::sheet_failed(pool, record.id, &message, RETRY_FIRST_SECS, RETRY_MAX_SECS)
            .await?;
    metrics::counter!("syncd_sheets_total", "outcome" => "failed").increment(1);
    tracing::error!(
        group = %record.id,
        run = %record.run_name,
        failures,
        retry_at = %retry_at.format("%Y-%m-%d %H:%M:%S UTC"),
        error = %message,
        "cannot make the contact sheet of group {}: {message}",
        record.id
    );
    Ok(())
}

/// A grid of the first `limit` groups of `run` that pass `filter`, as PNG bytes, with how many
/// groups it shows and how many pass the filter in all.
pub async fn run_grid(
    pool: &PgPool,
    storage: &Storage,
    run: RunId,
    filter: DecisionFilter,
    limit: i64,
) -> Result<(Vec<u8>, usize, i64)> {
    let page = groups::list(pool, run, filter, 0, limit).await?;
    let Some(first) = page.groups.first() else {
        bail!("run {run} has no {} groups", filter.as_str());
    };
    let title = format!(
        "run {}: {} groups, {} of {}",
        first.run_name,
        filter.as_str(),
        page.groups.len(),
        page.total
    );
    let shown = page.groups.len();
    let cells: Vec<(GroupRecord, Vec<Files>)> = futures::stream::iter(page.groups)
        .map(|record| async move {
            // A group without images (failed before generation) is shown by its label alone.
            let files = match record.image_keys {
                Some(_) => download(storage, &record).await?,
                None => Vec::new(),
            };
            anyhow::Ok((record, files))
        })
        .buffered(GRID_DOWNLOADS)
        .try_collect()
        .await?;
    let png = tokio::task::spawn_blocking(move || {
        let cells = cells
            .into_iter()
            .map(|(record, files)| {
                let pictures = decode(&record, &files)?;
                Ok((record, pictures))
            })
            .collect::<Result<Vec<_>>>()?;
        sheets::render_grid(&title, &cells)
    })
    .await
    .context("the grid's drawing thread")??;
    Ok((png, shown, page.total))
}
