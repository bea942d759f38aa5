//! A run's dataset under `datasets/{run_name}/` (see `syncd_proto::keys`), in two forms of the
//! same samples, shard by shard:
//!
//! - [`webdataset`]: WebDataset tar shards. A sample is one group; its files share the group's
//!   key: `{key}.{i}.png`, `{key}.{i}.mask.png` for each valid image, and `{key}.json` (a
//!   [`DatasetRecord`]).
//! - [`hf`]: one Parquet file per tar shard with fixed columns, and a dataset card, for
//!   Hugging Face `datasets`, which refuses the tar shards because their samples differ in
//!   members (2 or 3 images).
//!
//! The index lists both, and only shards already written. [`packing`] writes the shards while
//! the run runs, as groups are accepted.
//!
//! Both writers take a [`Sample`], a record with its bytes, whatever the bytes came from: here
//! the working bucket, read by [`packing`].

pub mod hf;
pub mod packing;
pub mod webdataset;

use crate::groups::optional_json;
use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use sqlx::PgPool;
use syncd_infra::storage::Storage;
use syncd_proto::dataset::{DatasetRecord, ImagePrompt};
use syncd_proto::lineage::Lineage;
use syncd_proto::messages::{ObjectSpec, PairSimilarity};
use syncd_proto::{GroupId, ObjectId, RunId};

/// `datasets/{run_name}/index.json`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct DatasetIndex {
    pub run_id: RunId,
    pub run_name: String,
    pub samples: u64,
    pub images: u64,
    /// The WebDataset tar shards.
    pub shards: Vec<ShardEntry>,
    /// The Parquet files, one per tar shard with the same samples. Indexes written before
    /// there were any have none.
    #[serde(default)]
    pub parquet_shards: Vec<ShardEntry>,
    /// The dataset card whose `configs` list the Parquet files.
    #[serde(default)]
    pub card: Option<String>,
    /// Every shard the run will have is listed: the run finished, or was finalised. Until
    /// then the index lists the shards written so far, and more are added as groups are
    /// accepted.
    #[serde(default)]
    pub complete: bool,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ShardEntry {
    pub key: String,
    pub samples: u64,
}

/// One sample as the dataset holds it: its record and the bytes of its images and masks (PNG),
/// in sample order (`record.images[i]` is `images[i]`).
pub struct Sample {
    pub record: DatasetRecord,
    pub images: Vec<Bytes>,
    pub masks: Vec<Bytes>,
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
    lineage: Option<Lineage>,
}

/// The accepted groups packed by `shard`, in object order.
async fn shard_groups(pool: &PgPool, run: RunId, shard: i32) -> Result<Vec<AcceptedGroup>> {
    let rows = crate::db::groups::of_shard(pool, run, shard).await?;
    rows.into_iter()
        .map(|row| {
            let id = GroupId(row.id);
            let required = |value: Option<serde_json::Value>, what: &str| {
                value.with_context(|| format!("accepted group {id} has no {what}"))
            };
            Ok(AcceptedGroup {
                group: id,
                object: ObjectId(row.object_id),
                spec: serde_json::from_value(row.spec)?,
                prompts: serde_json::from_value(row.prompts)?,
                image_prompts: optional_json(row.image_prompts, "image_prompts")?,
                image_keys: serde_json::from_value(required(row.image_keys, "image keys")?)?,
                mask_keys: serde_json::from_value(required(row.mask_keys, "mask keys")?)?,
                valid_images: serde_json::from_value(required(row.valid_images, "valid images")?)?,
                aesthetic: serde_json::from_value(required(row.aesthetic, "aesthetic scores")?)?,
                pairs: serde_json::from_value(required(row.pairs, "pair similarities")?)?,
                seed: row.seed as u64,
                lineage: crate::groups::lineage(row.generation, row.generated_by, row.scored_by)?,
            })
        })
        .collect()
}

impl AcceptedGroup {
    /// The group's record: only its valid images enter the sample, renumbered from 0 in group
    /// order, with their prompts, scores and the pairs among them.
    fn record(&self, run: RunId) -> DatasetRecord {
        let key = DatasetRecord::key_for(self.group);
        let mut record = DatasetRecord {
            key: key.clone(),
            run_id: run,
            object_id: self.object,
            group_id: self.group,
            object: self.spec.clone(),
            prompts: Vec::new(),
            backgrounds: Vec::new(),
            descriptions: Vec::new(),
            images: Vec::new(),
            masks: Vec::new(),
            group_indices: self.valid_images.clone(),
            aesthetic: Vec::new(),
            pairs: self
                .pairs
                .iter()
                .filter(|pair| {
                    self.valid_images.contains(&pair.a) && self.valid_images.contains(&pair.b)
                })
                .copied()
                .collect(),
            seed: self.seed,
            lineage: self.lineage.clone(),
        };
        for (sample_index, &image) in self.valid_images.iter().enumerate() {
            let image = image as usize;
            record.images.push(format!("{key}.{sample_index}.png"));
            record.masks.push(format!("{key}.{sample_index}.mask.png"));
            record
                .prompts
                .push(self.prompts.get(image).cloned().unwrap_or_default());
            if let Some(parts) = self.image_prompts.as_ref().and_then(|all| all.get(image)) {
                record.backgrounds.push(parts.background.clone());
                record.descriptions.push(parts.description.clone());
            }
            record
                .aesthetic
                .push(self.aesthetic.get(image).copied().unwrap_or(f32::NAN));
        }
        record
    }

    /// The group's sample: its record, with the images and masks read from `work`. An image or
    /// mask that is missing, or is not a whole PNG, is an error naming it.
    async fn sample(&self, work: &Storage, run: RunId) -> Result<Sample> {
        let mut sample = Sample {
            record: self.record(run),
            images: Vec::new(),
            masks: Vec::new(),
        };
        for &image in &self.valid_images {
            let image = image as usize;
            let (Some(image_key), Some(mask_key)) =
                (self.image_keys.get(image), self.mask_keys.get(image))
            else {
                anyhow::bail!("group {} has no image {image}", self.group);
            };
            sample
                .images
                .push(whole_png(image_key, work.get(image_key).await?)?);
            sample
                .masks
                .push(whole_png(mask_key, work.get(mask_key).await?)?);
        }
        Ok(sample)
    }
}

/// The PNG trailer: the empty `IEND` chunk and its CRC. An upload cut short lacks it.
const PNG_END: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

/// `bytes` if they are a whole PNG: its header parses and its last chunk is the trailer. The
/// pixels are not decoded: the coordinator checks every image of the run, and decoding them all
/// would cost more than the rest of its work.
fn whole_png(key: &str, bytes: Bytes) -> Result<Bytes> {
    let format = image::guess_format(&bytes).ok();
    if format != Some(image::ImageFormat::Png) || !bytes.ends_with(&PNG_END) {
        anyhow::bail!("{key} is not a whole PNG file ({} bytes)", bytes.len());
    }
    image::ImageReader::with_format(std::io::Cursor::new(&bytes), image::ImageFormat::Png)
        .into_dimensions()
        .with_context(|| format!("{key} has a corrupt PNG header"))?;
    Ok(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use uuid::Uuid;

    fn png(image: image::DynamicImage) -> Bytes {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("encoding a PNG");
        bytes.into_inner().into()
    }

    /// A sample of `images` valid images out of a group of three (the first `images`), with
    /// 16x8 gradients and square masks.
    pub(crate) fn sample(group: u128, images: u32) -> Sample {
        let spec = ObjectSpec::Deformable {
            category: "Cat".into(),
            description: "a grey cat".into(),
        };
        let accepted = AcceptedGroup {
            group: GroupId(Uuid::from_u128(group)),
            object: ObjectId(Uuid::from_u128(7)),
            spec,
            prompts: (0..3).map(|i| format!("prompt {i}")).collect(),
            image_prompts: None,
            image_keys: Vec::new(),
            mask_keys: Vec::new(),
            valid_images: (0..images).collect(),
            aesthetic: vec![6.5, 7.0, 7.5],
            pairs: vec![
                PairSimilarity {
                    a: 0,
                    b: 1,
                    similarity: 0.8,
                },
                PairSimilarity {
                    a: 0,
                    b: 2,
                    similarity: 0.75,
                },
                PairSimilarity {
                    a: 1,
                    b: 2,
                    similarity: 0.9,
                },
            ],
            seed: 42,
            lineage: Some(Lineage {
                generation: syncd_proto::lineage::GenerationSettings {
                    width: 16,
                    height: 8,
                    steps: 28,
                    guidance: 3.5,
                    true_cfg: None,
                    subject_word: "cat".into(),
                    prior: None,
                },
                generated_by: None,
                scored_by: None,
            }),
        };
        let record = accepted.record(RunId(Uuid::from_u128(1)));
        let image = |i: u32| {
            png(image::RgbImage::from_fn(16, 8, |x, y| {
                image::Rgb([x as u8 * 16, y as u8 * 32, i as u8])
            })
            .into())
        };
        let mask = |_: u32| {
            png(
                image::GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]))
                    .into(),
            )
        };
        Sample {
            record,
            images: (0..images).map(image).collect(),
            masks: (0..images).map(mask).collect(),
        }
    }

    #[test]
    fn a_record_holds_only_the_valid_images() {
        let record = sample(3, 2).record;
        assert_eq!(
            record.images,
            vec![
                format!("{}.0.png", record.key),
                format!("{}.1.png", record.key)
            ]
        );
        assert_eq!(record.masks[1], format!("{}.1.mask.png", record.key));
        assert_eq!(record.prompts, vec!["prompt 0", "prompt 1"]);
        assert_eq!(record.aesthetic, vec![6.5, 7.0]);
        assert_eq!(
            record.pairs.len(),
            1,
            "only the pair of the two valid images"
        );
    }
}
