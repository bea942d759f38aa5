//! Assembling the finished dataset: WebDataset tar shards of the accepted groups, plus an index,
//! under `datasets/{run_name}/` (see `syncd_proto::keys`). A sample is one group; its files share
//! the group's key: `{key}.{i}.png`, `{key}.{i}.mask.png` for each valid image, and `{key}.json`
//! (a [`DatasetRecord`]). Shards are written in a fixed order (object ordinal, group index), so
//! assembling again overwrites the same keys with the same content.

use crate::run_config::RunConfig;
use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::{PgPool, Row};
use std::io::Write;
use syncd_infra::storage::Storage;
use syncd_proto::dataset::{DatasetRecord, ImagePrompt};
use syncd_proto::messages::{ObjectSpec, PairSimilarity};
use syncd_proto::{keys, GroupId, ObjectId, RunId};

/// `datasets/{run_name}/index.json`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct DatasetIndex {
    pub run_id: RunId,
    pub run_name: String,
    pub samples: u64,
    pub images: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ShardEntry {
    pub key: String,
    pub samples: u64,
}

struct AcceptedGroup {
    group: GroupId,
    object: ObjectId,
    spec: ObjectSpec,
    prompts: Vec<String>,
    /// `None` for groups planned before image prompts were stored.
    image_prompts: Option<Vec<ImagePrompt>>,
    image_keys: Vec<String>,
    mask_keys: Vec<String>,
    valid_images: Vec<u32>,
    aesthetic: Vec<f32>,
    pairs: Vec<PairSimilarity>,
    seed: u64,
}

async fn accepted_groups(pool: &PgPool, run: RunId) -> Result<Vec<AcceptedGroup>> {
    let rows = sqlx::query(
        "SELECT g.id, g.object_id, o.spec, g.prompts, g.image_prompts, g.image_keys, g.mask_keys, g.valid_images,
                g.aesthetic, g.pairs, g.seed
         FROM groups g JOIN objects o ON o.id = g.object_id
         WHERE g.run_id = $1 AND g.decision = 'accepted'
         ORDER BY o.ordinal, g.group_index",
    )
    .bind(run.0)
    .fetch_all(pool)
    .await
    .context("listing accepted groups")?;
    rows.iter()
        .map(|row| {
            let json = |column: &str| -> Result<serde_json::Value> { Ok(row.try_get(column)?) };
            Ok(AcceptedGroup {
                group: GroupId(row.try_get("id")?),
                object: ObjectId(row.try_get("object_id")?),
                spec: serde_json::from_value(json("spec")?)?,
                prompts: serde_json::from_value(json("prompts")?)?,
                image_prompts: row
                    .try_get::<Option<serde_json::Value>, _>("image_prompts")?
                    .map(serde_json::from_value)
                    .transpose()?,
                image_keys: serde_json::from_value(json("image_keys")?)?,
                mask_keys: serde_json::from_value(json("mask_keys")?)?,
                valid_images: serde_json::from_value(json("valid_images")?)?,
                aesthetic: serde_json::from_value(json("aesthetic")?)?,
                pairs: serde_json::from_value(json("pairs")?)?,
                seed: row.try_get::<i64, _>("seed")? as u64,
            })
        })
        .collect()
}

fn append(builder: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, name, bytes)?;
    Ok(())
}

/// Writes the run's shards and index to `datasets`, reading the images from `work`; returns the
/// index.
pub async fn assemble(
    pool: &PgPool,
    work: &Storage,
    datasets: &Storage,
    run: RunId,
    config: &RunConfig,
) -> Result<DatasetIndex> {
    let groups = accepted_groups(pool, run).await?;
    let mut index = DatasetIndex {
        run_id: run,
        run_name: config.name.clone(),
        samples: 0,
        images: 0,
        shards: Vec::new(),
    };
    for (shard_number, chunk) in groups
        .chunks(config.dataset.samples_per_shard as usize)
        .enumerate()
    {
        // Shards are staged on disk, not in memory: a shard of 1024x1024 groups is gigabytes.
        let staging = tempfile::NamedTempFile::new().context("creating a staging file")?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(staging.reopen()?));
        for group in chunk {
            let key = DatasetRecord::key_for(group.group);
            let mut record = DatasetRecord {
                key: key.clone(),
                run_id: run,
                object_id: group.object,
                group_id: group.group,
                object: group.spec.clone(),
                prompts: Vec::new(),
                backgrounds: Vec::new(),
                descriptions: Vec::new(),
                images: Vec::new(),
                masks: Vec::new(),
                group_indices: group.valid_images.clone(),
                aesthetic: Vec::new(),
                pairs: group
                    .pairs
                    .iter()
                    .filter(|pair| {
                        group.valid_images.contains(&pair.a) && group.valid_images.contains(&pair.b)
                    })
                    .copied()
                    .collect(),
                seed: group.seed,
            };
            for (sample_index, &image) in group.valid_images.iter().enumerate() {
                let image = image as usize;
                let (Some(image_key), Some(mask_key)) =
                    (group.image_keys.get(image), group.mask_keys.get(image))
                else {
                    anyhow::bail!("group {} has no image {image}", group.group);
                };
                let image_name = format!("{key}.{sample_index}.png");
                let mask_name = format!("{key}.{sample_index}.mask.png");
                append(&mut builder, &image_name, &work.get(image_key).await?)?;
                append(&mut builder, &mask_name, &work.get(mask_key).await?)?;
                record.images.push(image_name);
                record.masks.push(mask_name);
                record
                    .prompts
                    .push(group.prompts.get(image).cloned().unwrap_or_default());
                if let Some(parts) = group.image_prompts.as_ref().and_then(|all| all.get(image)) {
                    record.backgrounds.push(parts.background.clone());
                    record.descriptions.push(parts.description.clone());
                }
                record
                    .aesthetic
                    .push(group.aesthetic.get(image).copied().unwrap_or(f32::NAN));
                index.images += 1;
            }
            append(
                &mut builder,
                &format!("{key}.json"),
                &serde_json::to_vec_pretty(&record)?,
            )?;
            index.samples += 1;
        }
        builder.into_inner()?.flush()?;
        let shard_key = keys::dataset_shard(&config.name, shard_number as u32);
        datasets
            .put_file(&shard_key, staging.path(), "application/x-tar")
            .await?;
        index.shards.push(ShardEntry {
            key: shard_key,
            samples: chunk.len() as u64,
        });
    }
    datasets
        .put(
            &keys::dataset_index(&config.name),
            serde_json::to_vec_pretty(&index)?,
            "application/json",
        )
        .await?;
    Ok(index)
}
