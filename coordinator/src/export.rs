//! `syncd run export`: a finished dataset written into a local folder in a layout other code
//! reads. The tar shards are the source (any dataset has them); they are read one at a time
//! from a temporary file, so an export needs memory for one sample, not one shard.
//!
//! [`ExportFormat::Syncd`] is the folder the SynCD reference trainer reads (its
//! `method/data/data.py`):
//!
//! ```text
//! DIR/{key}_{i}.jpg                 image i of a sample
//! DIR/masks/{key}_{i}.jpg           its foreground mask (the trainer thresholds it > 0)
//! DIR/metadata.json                 a JSON list, one item per sample
//! DIR/metadata_with_scores.json     the same list (the name the trainer reads when it filters by score)
//! ```
//!
//! An item has `filenames` (relative to DIR, one per image), `prompts` (same length),
//! `dino_scores` (N x N pair similarities, 1.0 on the diagonal), `aesthetics_scores` (by each
//! image's file stem), `objaverse_id` and `category` as the reference's generator writes them
//! (a rigid object's Objaverse uid and Cap3D caption; a deformable object's category, no uid),
//! and the sample's `key` and `group_id` to trace it back to the dataset.
//!
//! The metadata is written last, each file under a temporary name renamed when complete: a
//! folder whose export failed has no metadata, so no trainer takes it for a dataset.

use crate::dataset::{webdataset, DatasetIndex, Sample};
use anyhow::{bail, ensure, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use syncd_infra::storage::Storage;
use syncd_proto::messages::ObjectSpec;
use syncd_proto::GroupId;

/// JPEG quality of the images: close to the PNGs, at a fraction of their size.
const IMAGE_QUALITY: u8 = 95;
/// JPEG quality of the masks: the trainer counts any value above 0 as foreground, so the
/// compression ringing around a mask's edges must stay as small as JPEG allows.
const MASK_QUALITY: u8 = 100;
/// The metadata files, both with the same items: the trainer reads `*metadata.json`, or
/// `*metadata_with_scores.json` when it filters by score.
const METADATA_FILES: [&str; 2] = ["metadata.json", "metadata_with_scores.json"];

/// The layouts `syncd run export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The SynCD reference trainer's folder: JPEG images and masks, metadata with scores.
    Syncd,
}

/// What an export wrote.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub run_name: String,
    pub format: ExportFormat,
    pub out: PathBuf,
    pub samples: u64,
    pub images: u64,
    /// The metadata files, written last.
    pub metadata: Vec<PathBuf>,
}

/// One sample in the SynCD trainer's metadata.
#[derive(Debug, Serialize)]
struct SyncdItem {
    filenames: Vec<String>,
    prompts: Vec<String>,
    dino_scores: Vec<Vec<f32>>,
    aesthetics_scores: BTreeMap<String, f32>,
    objaverse_id: Option<String>,
    category: String,
    key: String,
    group_id: GroupId,
}

/// Exports the dataset `index` lists from `datasets` into `out`, which must be empty or missing
/// unless `force` (then files of the same names are replaced, others left).
pub async fn export(
    datasets: &Storage,
    index: &DatasetIndex,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> Result<ExportReport> {
    match format {
        ExportFormat::Syncd => export_syncd(datasets, index, out, force).await,
    }
}

async fn export_syncd(
    datasets: &Storage,
    index: &DatasetIndex,
    out: &Path,
    force: bool,
) -> Result<ExportReport> {
    prepare_folder(out, force)?;
    let mut items = Vec::new();
    for shard in &index.shards {
        let staging = tempfile::NamedTempFile::new().context("creating a staging file")?;
        datasets.get_file(&shard.key, staging.path()).await?;
        // Decoding and encoding images is CPU work: off the async threads.
        let folder = out.to_path_buf();
        let (read, shard_items) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut items = Vec::new();
            let file = std::fs::File::open(staging.path())?;
            let read = webdataset::read_samples(std::io::BufReader::new(file), |sample| {
                items.push(write_sample(&folder, &sample)?);
                Ok(())
            })?;
            Ok((read, items))
        })
        .await?
        .with_context(|| format!("exporting shard {}", shard.key))?;
        ensure!(
            read == shard.samples,
            "shard {} holds {read} samples, the index says {}",
            shard.key,
            shard.samples
        );
        items.extend(shard_items);
    }
    ensure!(
        items.len() as u64 == index.samples,
        "the shards hold {} samples, the index says {}",
        items.len(),
        index.samples
    );
    let metadata = serde_json::to_vec(&items).context("encoding the metadata")?;
    let mut written = Vec::new();
    for name in METADATA_FILES {
        let path = out.join(name);
        let partial = out.join(format!("{name}.partial"));
        std::fs::write(&partial, &metadata)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("renaming {} to {name}", partial.display()))?;
        written.push(path);
    }
    Ok(ExportReport {
        run_name: index.run_name.clone(),
        format: ExportFormat::Syncd,
        out: out.to_path_buf(),
        samples: items.len() as u64,
        images: items.iter().map(|item| item.filenames.len() as u64).sum(),
        metadata: written,
    })
}

/// Makes `out` (and `out/masks`), refusing a folder with files in it unless `force`. A forced
/// export first removes the metadata an earlier export left, so that if this one fails the
/// folder is not presented as a finished dataset of half old, half new files.
fn prepare_folder(out: &Path, force: bool) -> Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                bail!(
                    "{} is not empty: export into a new or empty folder, or pass --force to \
                     write into it",
                    out.display()
                );
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("reading the folder {}", out.display()))
        }
    }
    for name in METADATA_FILES {
        match std::fs::remove_file(out.join(name)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("removing {name}"))
            }
            _ => {}
        }
    }
    std::fs::create_dir_all(out.join("masks"))
        .with_context(|| format!("creating {}", out.join("masks").display()))
}

/// Writes the sample's images and masks as JPEG and returns its metadata item.
fn write_sample(out: &Path, sample: &Sample) -> Result<SyncdItem> {
    let record = &sample.record;
    let stems: Vec<String> = (0..record.images.len())
        .map(|i| format!("{}_{i}", record.key))
        .collect();
    let mut filenames = Vec::new();
    let mut aesthetics_scores = BTreeMap::new();
    for (i, stem) in stems.iter().enumerate() {
        let filename = format!("{stem}.jpg");
        let image = image::load_from_memory(&sample.images[i])
            .with_context(|| format!("decoding {}", record.images[i]))?;
        write_jpeg(&out.join(&filename), &image.to_rgb8(), IMAGE_QUALITY)?;
        let mask = image::load_from_memory(&sample.masks[i])
            .with_context(|| format!("decoding {}", record.masks[i]))?;
        write_jpeg(
            &out.join("masks").join(&filename),
            &mask.to_luma8(),
            MASK_QUALITY,
        )?;
        // The trainer compares every score with its thresholds: a sample without one cannot
        // be exported faithfully.
        let score = record
            .aesthetic
            .get(i)
            .copied()
            .filter(|score| !score.is_nan())
            .with_context(|| {
                format!("sample {} has no aesthetic score for image {i}", record.key)
            })?;
        aesthetics_scores.insert(stem.clone(), score);
        filenames.push(filename);
    }
    ensure!(
        record.prompts.len() == filenames.len(),
        "sample {} has {} prompts for {} images",
        record.key,
        record.prompts.len(),
        filenames.len()
    );
    let dino_scores = record
        .similarity_matrix()
        .into_iter()
        .map(|row| row.into_iter().collect::<Option<Vec<f32>>>())
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("sample {} lacks the similarity of a pair", record.key))?;
    let (objaverse_id, category) = match &record.object {
        ObjectSpec::Rigid { uid, caption, .. } => (Some(uid.clone()), caption.clone()),
        ObjectSpec::Deformable { category, .. } => (None, category.clone()),
    };
    Ok(SyncdItem {
        filenames,
        prompts: record.prompts.clone(),
        dino_scores,
        aesthetics_scores,
        objaverse_id,
        category,
        key: record.key.clone(),
        group_id: record.group_id,
    })
}

fn write_jpeg<P>(path: &Path, image: &image::ImageBuffer<P, Vec<u8>>, quality: u8) -> Result<()>
where
    P: image::Pixel<Subpixel = u8> + image::PixelWithColorType,
{
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = BufWriter::new(file);
    JpegEncoder::new_with_quality(&mut writer, quality)
        .encode_image(image)
        .with_context(|| format!("encoding {}", path.display()))?;
    writer
        .flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::tests::sample;

    #[test]
    fn a_sample_becomes_jpeg_files_and_a_metadata_item() {
        let folder = tempfile::tempdir().unwrap();
        prepare_folder(folder.path(), false).unwrap();
        let sample = sample(5, 2);
        let item = write_sample(folder.path(), &sample).unwrap();
        let key = &sample.record.key;
        assert_eq!(
            item.filenames,
            vec![format!("{key}_0.jpg"), format!("{key}_1.jpg")]
        );
        assert_eq!(item.prompts, vec!["prompt 0", "prompt 1"]);
        assert_eq!(item.dino_scores, vec![vec![1.0, 0.8], vec![0.8, 1.0]]);
        assert_eq!(item.aesthetics_scores[&format!("{key}_1")], 7.0);
        assert_eq!(
            (item.objaverse_id.as_deref(), item.category.as_str()),
            (None, "Cat")
        );
        for name in &item.filenames {
            let image = image::open(folder.path().join(name)).unwrap();
            assert_eq!((image.width(), image.height()), (16, 8));
            // The trainer's view of the mask: > 0 is foreground; the left half here.
            let mask = image::open(folder.path().join("masks").join(name))
                .unwrap()
                .to_luma8();
            let foreground: Vec<bool> = mask.pixels().map(|pixel| pixel.0[0] > 0).collect();
            let expected: Vec<bool> = (0..8).flat_map(|_| (0..16).map(|x| x < 8)).collect();
            assert_eq!(foreground, expected);
        }
    }

    #[test]
    fn a_folder_with_files_is_refused_unless_forced() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("metadata.json"), "[]").unwrap();
        let error = prepare_folder(folder.path(), false).unwrap_err();
        assert!(error.to_string().contains("--force"), "{error}");
        prepare_folder(folder.path(), true).unwrap();
        assert!(
            !folder.path().join("metadata.json").exists(),
            "old metadata removed first"
        );
        assert!(folder.path().join("masks").is_dir());
    }
}
