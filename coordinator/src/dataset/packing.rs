//! The dataset grows while the run runs. Owns the `dataset_shards` table and `groups.shard`.
//!
//! Each pass of the packing loop:
//!
//! 1. **assigns** accepted groups to new shards, a full shard's worth at a time; the remainder
//!    too once the run is *closing*: every object terminal and no job in flight, or a paused or
//!    cancelled run that `syncd run finalize` asked to finish;
//! 2. **packs** the shards not yet written, several at once: each group's images stream from the
//!    working bucket into the shard's tar and Parquet files (staged on disk, one group in memory
//!    at a time), which are then uploaded. A group whose image is missing or corrupt is failed
//!    with the reason and left out; the rest of the shard is packed. An outage leaves the shard
//!    to the next pass;
//! 3. **publishes** the manifest (`index.json`, after the dataset card) of every run that got a
//!    shard: it lists only shards already written, so it is valid at every moment, and is marked
//!    `complete` when a closing run has nothing left to pack. The run is then `completed` (a
//!    finalised paused or cancelled run keeps its state).
//!
//! Only the leader runs the loop, so assignment and manifests have one writer.

use super::{hf, shard_groups, webdataset, DatasetIndex, ShardEntry};
use crate::db::groups;
use crate::db::runs::{self, RunToPack};
use crate::near_duplicates;
use crate::run_config::RunConfig;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeSet;
use std::io::Write;
use syncd_infra::outage;
use syncd_infra::storage::Storage;
use syncd_proto::{keys, GroupId, RunId};

/// Where accepted groups are read from and shards written to.
pub struct Buckets<'a> {
    /// The working bucket: the groups' images and masks.
    pub work: &'a Storage,
    /// The dataset bucket.
    pub datasets: &'a Storage,
}

/// One pass: assign, pack up to `concurrency` shards (at once), publish. Returns how many
/// shards were written.
pub async fn pack(pool: &PgPool, buckets: &Buckets<'_>, concurrency: usize) -> Result<usize> {
    let runs = runs::to_pack(pool).await?;
    for run in &runs {
        // One run's failure (a stored configuration that no longer parses) holds up no other.
        if let Err(error) = assign_shards(pool, run).await {
            isolate(pool, run.run, error).await?;
        }
    }
    let packing = sqlx::query!(
        "SELECT run_id, shard FROM dataset_shards WHERE state = 'packing'
         ORDER BY created_at, shard LIMIT $1",
        concurrency.max(1) as i64
    )
    .fetch_all(pool)
    .await
    .context("listing shards to pack")?;
    let results: Vec<(RunId, Result<()>)> = futures::stream::iter(packing)
        .map(|row| async move {
            let run = RunId(row.run_id);
            (run, pack_shard(pool, buckets, run, row.shard).await)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut written = 0;
    let mut grown = BTreeSet::new();
    let mut failure = None;
    for (run, result) in results {
        match result {
            Ok(()) => {
                written += 1;
                grown.insert(run);
            }
            Err(error) => {
                if outage::classify(&error).is_none() {
                    record_error(pool, run, &error).await?;
                }
                failure = Some(error);
            }
        }
    }
    for run in &runs {
        if run.closing || grown.contains(&run.run) {
            if let Err(error) = publish(pool, buckets.datasets, run.run, run.closing).await {
                isolate(pool, run.run, error).await?;
            }
        }
    }
    match failure {
        // What was written is published above; the failed shards stay `packing` for the next
        // pass (an outage is waited out by the loop).
        Some(error) => Err(error),
        None => Ok(written),
    }
}

/// An outage ends the pass (the loop waits it out); any other failure is the run's own: shown
/// on it, and the pass goes on with the other runs.
async fn isolate(pool: &PgPool, run: RunId, error: anyhow::Error) -> Result<()> {
    if outage::classify(&error).is_some() {
        return Err(error);
    }
    record_error(pool, run, &error).await
}

/// Shows a packing failure that is not an outage on the run (`syncd run status`); the work is
/// tried again on the next pass, and the error is cleared when the dataset is complete.
async fn record_error(pool: &PgPool, run: RunId, error: &anyhow::Error) -> Result<()> {
    tracing::error!(%run, error = format!("{error:#}"), "packing the run's dataset failed; will retry");
    runs::set_dataset_error(pool, run, &format!("packing: {error:#}")).await
}

/// Gives the run's unassigned accepted groups shards of `samples_per_shard`, in object order;
/// a last, smaller shard only when the run is closing.
async fn assign_shards(pool: &PgPool, run: &RunToPack) -> Result<()> {
    let mut tx = pool.begin().await?;
    let (config, _) = runs::config_and_state(&mut tx, run.run).await?;
    let per_shard = i64::from(config.dataset.samples_per_shard.max(1));
    loop {
        let unassigned = groups::unassigned_of_run(&mut tx, run.run, per_shard).await?;
        let shard_due = unassigned == per_shard || (run.closing && unassigned > 0);
        if !shard_due {
            break;
        }
        let shard = sqlx::query_scalar!(
            "INSERT INTO dataset_shards (run_id, shard)
             SELECT $1, COALESCE(max(shard) + 1, 0) FROM dataset_shards WHERE run_id = $1
             RETURNING shard",
            run.run.0
        )
        .fetch_one(&mut *tx)
        .await
        .context("creating a shard")?;
        if groups::assign_to_shard(&mut tx, run.run, shard, per_shard).await? == 0 {
            // Counted but not assignable: stop rather than make empty shards forever.
            bail!("shard {shard}: the groups counted as waiting could not be assigned");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Writes one shard's tar and Parquet files, then records it written. Groups whose images
/// cannot be read (for a reason of their own, not an outage) are failed and left out.
async fn pack_shard(pool: &PgPool, buckets: &Buckets<'_>, run: RunId, shard: i32) -> Result<()> {
    let (config, _) = runs::config_and_state(&mut *pool.acquire().await?, run).await?;
    let groups = shard_groups(pool, run, shard).await?;
    // Shards are staged on disk, not in memory: a shard of 1024x1024 groups is gigabytes.
    let tar_staging = tempfile::NamedTempFile::new().context("creating a staging file")?;
    let parquet_staging = tempfile::NamedTempFile::new().context("creating a staging file")?;
    let mut tar = webdataset::TarShardWriter::new(std::io::BufWriter::new(tar_staging.reopen()?));
    let mut parquet = hf::ParquetShardWriter::new(
        parquet_staging.reopen()?,
        config.generation.images_per_group as usize,
    );
    let (mut samples, mut images) = (0, 0);
    for group in &groups {
        let sample = match group.sample(buckets.work, run).await {
            Ok(sample) => sample,
            Err(error) if outage::classify(&error).is_some() => return Err(error),
            Err(error) => {
                fail_group(pool, group.group, shard, &format!("{error:#}")).await?;
                continue;
            }
        };
        tar.append(&sample)?;
        parquet.append(&sample)?;
        samples += 1;
        images += sample.images.len() as i32;
    }
    tar.finish()?.flush()?;
    parquet.finish()?;
    if samples > 0 {
        upload_shard(
            buckets.datasets,
            &config,
            shard,
            &tar_staging,
            &parquet_staging,
        )
        .await?;
    }
    sqlx::query!(
        "UPDATE dataset_shards SET state = 'written', samples = $3, images = $4, written_at = now()
         WHERE run_id = $1 AND shard = $2",
        run.0,
        shard,
        samples,
        images
    )
    .execute(pool)
    .await
    .context("recording a written shard")?;
    tracing::info!(%run, shard, samples, images, "shard written");
    Ok(())
}

async fn upload_shard(
    datasets: &Storage,
    config: &RunConfig,
    shard: i32,
    tar: &tempfile::NamedTempFile,
    parquet: &tempfile::NamedTempFile,
) -> Result<()> {
    let number = shard as u32;
    datasets
        .put_file(
            &keys::dataset_shard(&config.name, number),
            tar.path(),
            "application/x-tar",
        )
        .await?;
    datasets
        .put_file(
            &keys::dataset_parquet_shard(&config.name, number),
            parquet.path(),
            "application/vnd.apache.parquet",
        )
        .await
}

/// An accepted group that cannot enter the dataset: failed with `reason`, out of its shard and
/// out of the near-duplicate index (no later group is measured against what the dataset lacks).
async fn fail_group(pool: &PgPool, group: GroupId, shard: i32, reason: &str) -> Result<()> {
    tracing::warn!(%group, shard, reason, "group failed while packing its shard");
    let mut tx = pool.begin().await?;
    groups::fail_unpackable(&mut tx, group, shard, reason).await?;
    near_duplicates::remove(&mut tx, group).await?;
    tx.commit().await?;
    Ok(())
}

/// Writes the run's dataset card and then its manifest, listing every written shard; when the
/// run is closing and nothing is left to pack, marks the manifest complete and the dataset
/// written (and an active run completed).
async fn publish(pool: &PgPool, datasets: &Storage, run: RunId, closing: bool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let (config, state) = runs::config_and_state(&mut conn, run).await?;
    let complete = closing && nothing_left(&mut conn, run).await?;
    let index = manifest(&mut conn, run, &config, complete).await?;
    datasets
        .put(
            index.card.as_deref().unwrap_or_default(),
            hf::card(&index),
            "text/markdown",
        )
        .await?;
    datasets
        .put(
            &keys::dataset_index(&config.name),
            serde_json::to_vec_pretty(&index)?,
            "application/json",
        )
        .await?;
    if complete {
        runs::finish_dataset(&mut conn, run, state).await?;
        tracing::info!(%run, samples = index.samples, shards = index.shards.len(), "dataset complete");
    }
    Ok(())
}

/// The run's written shards with samples, and their samples: what its manifest lists.
pub async fn written(conn: &mut PgConnection, run: RunId) -> Result<(i64, i64)> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "shards!", COALESCE(sum(samples), 0)::int8 AS "samples!"
           FROM dataset_shards WHERE run_id = $1 AND state = 'written' AND samples > 0"#,
        run.0
    )
    .fetch_one(conn)
    .await
    .context("counting written shards")?;
    Ok((row.shards, row.samples))
}

/// No accepted group without a shard, and no shard still packing.
async fn nothing_left(conn: &mut PgConnection, run: RunId) -> Result<bool> {
    let left = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM groups WHERE run_id = $1
                          AND decision = 'accepted' AND shard IS NULL)
               OR EXISTS (SELECT 1 FROM dataset_shards WHERE run_id = $1 AND state = 'packing')
               AS "left!""#,
        run.0
    )
    .fetch_one(conn)
    .await
    .context("looking for packing left to do")?;
    Ok(!left)
}

/// The manifest of the run's written shards (those with samples), in shard order.
async fn manifest(
    conn: &mut PgConnection,
    run: RunId,
    config: &RunConfig,
    complete: bool,
) -> Result<DatasetIndex> {
    let shards: Vec<(i32, i32, i32)> = sqlx::query!(
        "SELECT shard, samples, images FROM dataset_shards
         WHERE run_id = $1 AND state = 'written' AND samples > 0 ORDER BY shard",
        run.0
    )
    .fetch_all(conn)
    .await
    .context("listing written shards")?
    .into_iter()
    .map(|row| (row.shard, row.samples, row.images))
    .collect();
    let entry = |key: String, samples: i32| ShardEntry {
        key,
        samples: samples as u64,
    };
    Ok(DatasetIndex {
        run_id: run,
        run_name: config.name.clone(),
        samples: shards.iter().map(|(_, samples, _)| *samples as u64).sum(),
        images: shards.iter().map(|(_, _, images)| *images as u64).sum(),
        shards: shards
            .iter()
            .map(|&(shard, samples, _)| {
                entry(keys::dataset_shard(&config.name, shard as u32), samples)
            })
            .collect(),
        parquet_shards: shards
            .iter()
            .map(|&(shard, samples, _)| {
                entry(
                    keys::dataset_parquet_shard(&config.name, shard as u32),
                    samples,
                )
            })
            .collect(),
        card: Some(keys::dataset_card(&config.name)),
        complete,
    })
}

/// A run going on after its dataset was finished: the manifest is no longer complete, and new
/// shards are added to it. The groups of a dataset assembled whole, before shards were recorded
/// (shard -1), are packed again from the first shard.
pub async fn reopen(conn: &mut sqlx::PgConnection, run: RunId) -> Result<()> {
    runs::reopen_dataset(&mut *conn, run).await?;
    groups::unassign_whole_dataset(conn, run).await?;
    Ok(())
}

/// `syncd run finalize` on a paused or cancelled run (the caller checks): its dataset is
/// finished with the groups accepted so far, by the packing loop.
pub async fn request_finalize(conn: &mut PgConnection, run: RunId) -> Result<()> {
    runs::request_finalize(conn, run).await
}
