//! The finished dataset as other programs read it: one end-to-end run (the real coordinator and
//! CLI, test workers, against the real services), then its dataset loaded with Hugging Face
//! `datasets` (the Parquet files, by file and by folder) and `webdataset` (the tar shards), and
//! exported with `syncd run export --format syncd` into the folder the SynCD reference trainer
//! reads, read back by a reader that follows that trainer's layout. The readers are Python
//! scripts (`tests/python/`) run with the set-up's venv; they print what they read, and this
//! test compares it with the records and pixels of the tar shards.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use syncd_proto::dataset::DatasetRecord;
use syncd_proto::filter::{decide, FilterThresholds};
use syncd_proto::messages::PairSimilarity;
use syncd_tests::factory::{dataset_members, download_dataset, Factory};
use syncd_tests::python::run_script;

const RUN: &str = "exports";
/// The run's filter. The test worker scores aesthetics uniformly in [4.5, 8] and similarities
/// in [0.6, 1]: about a third of the groups keep three images, a third two, the rest none, so
/// twenty groups give samples of both sizes (all but certainly), and the `_2` columns are
/// exercised both present and null.
const FILTER: FilterThresholds = FilterThresholds {
    min_aesthetic: 5.5,
    min_similarity: 0.6,
    max_similarity: 0.98,
    min_valid_images: 2,
};

/// What the test compares of an image: its size and channels, the sum of its channel values (a
/// checksum the Python side computes the same way) and how many channel values are above 0.
#[derive(Clone, Debug, PartialEq)]
struct Pixels {
    size: [u64; 2],
    channels: u64,
    sum: u64,
    foreground: u64,
}

impl Pixels {
    fn of_png(bytes: &[u8]) -> Result<Self> {
        let image = image::load_from_memory(bytes)?;
        let raw = image.as_bytes();
        Ok(Self {
            size: [u64::from(image.width()), u64::from(image.height())],
            channels: u64::from(image.color().channel_count()),
            sum: raw.iter().map(|&value| u64::from(value)).sum(),
            foreground: raw.iter().filter(|&&value| value > 0).count() as u64,
        })
    }

    /// What the Python scripts print, `{size, mode, sum, foreground}`; `None` for null. A PIL
    /// mode of 8-bit channels (`L`, `RGB`, `RGBA`) has a letter per channel.
    fn of_json(value: &Value) -> Option<Self> {
        let size = value["size"].as_array()?;
        Some(Self {
            size: [size.first()?.as_u64()?, size.get(1)?.as_u64()?],
            channels: value["mode"].as_str()?.len() as u64,
            sum: value["sum"].as_u64()?,
            foreground: value["foreground"].as_u64()?,
        })
    }

    fn mean(&self) -> f64 {
        self.sum as f64 / (self.size[0] * self.size[1] * self.channels) as f64
    }
}

/// A sample as the tar shards hold it: its record and what its PNGs decode to.
struct Expected {
    record: DatasetRecord,
    images: Vec<Pixels>,
    masks: Vec<Pixels>,
}

/// The samples of the run's dataset, in shard order.
async fn expected_samples(factory: &Factory, index: &Value) -> Result<Vec<Expected>> {
    let members = dataset_members(&factory.env, index).await?;
    let bytes: BTreeMap<&str, &[u8]> = members
        .iter()
        .map(|(name, content)| (name.as_str(), content.as_slice()))
        .collect();
    let pixels = |names: &[String]| -> Result<Vec<Pixels>> {
        names
            .iter()
            .map(|name| Pixels::of_png(bytes.get(name.as_str()).context("a member")?))
            .collect()
    };
    members
        .iter()
        .filter(|(name, _)| name.ends_with(".json"))
        .map(|(_, json)| {
            let record: DatasetRecord = serde_json::from_slice(json)?;
            Ok(Expected {
                images: pixels(&record.images)?,
                masks: pixels(&record.masks)?,
                record,
            })
        })
        .collect()
}

fn f32_of(value: &Value) -> Option<f32> {
    value.as_f64().map(|value| value as f32)
}

fn matrix_of(value: &Value) -> Vec<Vec<Option<f32>>> {
    let rows = value.as_array().map(Vec::as_slice).unwrap_or_default();
    rows.iter()
        .map(|row| {
            let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
            row.iter().map(f32_of).collect()
        })
        .collect()
}

/// Checks the rows one `datasets` load returned against the samples.
fn check_rows(reader: &str, rows: &Value, expected: &[Expected]) -> Result<()> {
    let rows = rows.as_array().context("rows")?;
    assert_eq!(rows.len(), expected.len(), "{reader}: one row per sample");
    for (row, sample) in rows.iter().zip(expected) {
        let record = &sample.record;
        let key = &record.key;
        let count = record.images.len();
        assert_eq!(row["key"], key.as_str(), "{reader}: rows in shard order");
        assert_eq!(
            row["record_key"],
            key.as_str(),
            "{reader}: the record column"
        );
        assert_eq!(row["group_id"], record.group_id.to_string().as_str());
        assert_eq!(
            row["num_images"].as_u64(),
            Some(count as u64),
            "{reader}: {key}"
        );
        assert_eq!(row["object_type"], "deformable");
        assert_eq!(row["category"], record_category(record));
        for i in 0..3 {
            let (image, mask) = (&row["images"][i], &row["masks"][i]);
            if i < count {
                let image = Pixels::of_json(image);
                assert_eq!(
                    image.as_ref(),
                    Some(&sample.images[i]),
                    "{reader}: {key} image {i}"
                );
                let mask = Pixels::of_json(mask);
                assert_eq!(
                    mask.as_ref(),
                    Some(&sample.masks[i]),
                    "{reader}: {key} mask {i}"
                );
                assert_eq!(row["prompts"][i], record.prompts[i].as_str());
                assert_eq!(f32_of(&row["aesthetic"][i]), Some(record.aesthetic[i]));
            } else {
                for column in ["images", "masks", "prompts", "aesthetic"] {
                    let value = &row[column][i];
                    assert!(
                        value.is_null(),
                        "{reader}: {key} has {count} images, but its {column}[{i}] is {value}"
                    );
                }
            }
        }
        assert_eq!(
            matrix_of(&row["dino_scores"]),
            record.similarity_matrix(),
            "{reader}: {key}"
        );
        assert_eq!(row["seed"].as_u64(), Some(record.seed), "{reader}: {key}");
    }
    Ok(())
}

fn record_category(record: &DatasetRecord) -> &str {
    match &record.object {
        syncd_proto::messages::ObjectSpec::Deformable { category, .. } => category,
        syncd_proto::messages::ObjectSpec::Rigid { caption, .. } => caption,
    }
}

/// Checks what the SynCD-layout reader read against the samples.
fn check_export(items: &[Value], expected: &[Expected]) {
    assert_eq!(items.len(), expected.len(), "one item per sample");
    for (item, sample) in items.iter().zip(expected) {
        let record = &sample.record;
        let key = &record.key;
        let count = record.images.len();
        let stems: Vec<String> = (0..count).map(|i| format!("{key}_{i}")).collect();
        let filenames: Vec<String> = stems.iter().map(|stem| format!("{stem}.jpg")).collect();
        assert_eq!(item["filenames"], serde_json::json!(filenames));
        assert_eq!(item["prompts"], serde_json::json!(record.prompts));
        assert_eq!(item["group_id"], record.group_id.to_string().as_str());
        assert_eq!(item["category"], record_category(record));
        assert!(item["objaverse_id"].is_null(), "a deformable object");
        let dino: Vec<Vec<Option<f32>>> = matrix_of(&item["dino_scores"]);
        assert_eq!(dino, record.similarity_matrix(), "{key}");
        for (i, stem) in stems.iter().enumerate() {
            assert_eq!(
                f32_of(&item["aesthetics_scores"][stem]),
                Some(record.aesthetic[i]),
                "{key}: aesthetic of {stem}"
            );
            // JPEG is lossy: the image keeps its size and, nearly, its mean; the mask, read as
            // the trainer reads it (> 0), keeps its foreground.
            let image = &item["images"][i];
            let want = &sample.images[i];
            assert_eq!(
                image["size"],
                serde_json::json!(want.size),
                "{key} image {i}"
            );
            let mean = image["mean"].as_f64().unwrap_or(f64::NAN);
            assert!(
                (mean - want.mean()).abs() < 2.0,
                "{key} image {i}: mean {mean} after JPEG, {} before",
                want.mean()
            );
            let mask = &sample.masks[i];
            assert_eq!(
                item["masks"][i]["foreground"].as_u64(),
                Some(mask.foreground),
                "{key} mask {i}: foreground pixels (> 0) after JPEG"
            );
        }
    }
}

/// The images of a sample the SynCD trainer keeps when it filters by score with `thresholds`:
/// the factory's rule applied to the sample alone (pairs renumbered to sample order).
fn trainer_keeps(record: &DatasetRecord, thresholds: &FilterThresholds) -> Option<Vec<u32>> {
    let sample_index = |group_index: u32| {
        record
            .group_indices
            .iter()
            .position(|&index| index == group_index)
            .map(|index| index as u32)
    };
    let pairs: Vec<PairSimilarity> = record
        .pairs
        .iter()
        .filter_map(|pair| {
            Some(PairSimilarity {
                a: sample_index(pair.a)?,
                b: sample_index(pair.b)?,
                similarity: pair.similarity,
            })
        })
        .collect();
    let decision = decide(&record.aesthetic, &pairs, thresholds);
    decision.accepted.then_some(decision.valid_images)
}

fn export(factory: &Factory, out: &Path, extra: &[&str]) -> Result<Value> {
    let out = out.to_string_lossy();
    let mut args = vec!["run", "export", RUN, "--format", "syncd", "--out", &out];
    args.extend_from_slice(extra);
    factory.cli_json(&args)
}

fn export_error(factory: &Factory, out: &Path, extra: &[&str]) -> String {
    match export(factory, out, extra) {
        Ok(report) => panic!("the export succeeded: {report}"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_loads_in_datasets_and_webdataset_and_exports_to_the_syncd_layout() -> Result<()>
{
    let factory = Factory::start(2, 0).await?;
    let filter = format!(
        "[dataset]\nsamples_per_shard = 6\n[filter]\nmin_aesthetic = {}\nmin_similarity = {}\n\
         max_similarity = {}\nmin_valid_images = {}\n",
        FILTER.min_aesthetic, FILTER.min_similarity, FILTER.max_similarity, FILTER.min_valid_images
    );
    factory.create_run_with(RUN, 20, &filter)?;
    let scratch = factory.env.path("scratch");
    // Twenty groups take seconds: the run is still active, its dataset not written.
    let error = export_error(&factory, &scratch.join("too-early"), &[]);
    assert!(error.contains("has no finished dataset"), "{error}");
    let unknown = factory
        .cli(&[
            "run",
            "export",
            "no-such-run",
            "--format",
            "syncd",
            "--out",
            "x",
        ])
        .expect_err("an unknown run");
    assert!(
        format!("{unknown:#}").contains("no run named \"no-such-run\""),
        "{unknown:#}"
    );
    let format = factory
        .cli(&["run", "export", RUN, "--format", "tfrecord", "--out", "x"])
        .expect_err("an unknown format");
    assert!(
        format!("{format:#}").contains("possible values: syncd"),
        "{format:#}"
    );
    factory
        .wait_until_completed(RUN, Duration::from_secs(180))
        .await?;

    // The index lists a Parquet file beside each tar shard, and the card.
    let storage = factory.env.dataset_storage();
    let index: Value =
        serde_json::from_slice(&storage.get(&format!("datasets/{RUN}/index.json")).await?)?;
    let shards = index["shards"].as_array().context("shards")?;
    let parquet = index["parquet_shards"]
        .as_array()
        .context("parquet shards")?;
    assert!(shards.len() > 1, "several shards: {index}");
    assert_eq!(parquet.len(), shards.len());
    for (tar, parquet) in shards.iter().zip(parquet) {
        let tar_key = tar["key"].as_str().context("key")?;
        assert_eq!(
            parquet["key"].as_str(),
            Some(tar_key.replace(".tar", ".parquet").as_str())
        );
        assert_eq!(parquet["samples"], tar["samples"]);
    }
    assert_eq!(index["card"], format!("datasets/{RUN}/README.md").as_str());
    let expected = expected_samples(&factory, &index).await?;
    assert_eq!(index["samples"].as_u64(), Some(expected.len() as u64));
    let sizes: Vec<usize> = expected.iter().map(|sample| sample.images.len()).collect();
    assert!(
        sizes.contains(&2) && sizes.contains(&3),
        "samples of both 2 and 3 images (the run's filter makes both likely): {sizes:?}"
    );

    // `datasets` by files and by folder, and `webdataset`, on a local copy of the folder.
    let folder = scratch.join("dataset");
    download_dataset(&factory.env, RUN, &folder).await?;
    let loaded = run_script(
        "load_dataset.py",
        &[
            folder.as_os_str(),
            "--cache-dir".as_ref(),
            scratch.join("hf-cache").as_os_str(),
        ],
    )?;
    for column in ["image_0", "image_2", "mask_0", "mask_2"] {
        assert_eq!(
            loaded["features"][column], "Image",
            "{column}: {}",
            loaded["features"]
        );
    }
    check_rows("load_dataset(parquet files)", &loaded["parquet"], &expected)?;
    check_rows("load_dataset(folder)", &loaded["folder"], &expected)?;
    let samples = loaded["webdataset"].as_array().context("webdataset")?;
    assert_eq!(samples.len(), expected.len(), "webdataset: every sample");
    for (sample, want) in samples.iter().zip(&expected) {
        assert_eq!(
            sample["key"],
            want.record.key.as_str(),
            "webdataset: shard order"
        );
        let images: Vec<Option<Pixels>> = sample["images"]
            .as_array()
            .context("images")?
            .iter()
            .map(Pixels::of_json)
            .collect();
        let want_images: Vec<Option<Pixels>> = want.images.iter().cloned().map(Some).collect();
        assert_eq!(images, want_images, "webdataset: {}", want.record.key);
        assert_eq!(sample["prompts"], serde_json::json!(want.record.prompts));
    }

    // The SynCD layout, read as its trainer reads it: every item, then filtered by score.
    let out = scratch.join("syncd");
    let report = export(&factory, &out, &[])?;
    assert_eq!(
        report["samples"].as_u64(),
        Some(expected.len() as u64),
        "{report}"
    );
    let read = run_script("syncd_layout_reader.py", &[out.as_os_str()])?;
    assert_eq!(read["metadata_files"], serde_json::json!(["metadata.json"]));
    check_export(read["items"].as_array().context("items")?, &expected);
    let (aesthetic, dino) = (
        FILTER.min_aesthetic.to_string(),
        FILTER.min_similarity.to_string(),
    );
    let filtered = run_script(
        "syncd_layout_reader.py",
        &[
            out.to_string_lossy().as_ref(),
            "--filter-by-score",
            "--min-aesthetic",
            aesthetic.as_str(),
            "--min-dino",
            dino.as_str(),
        ],
    )?;
    let kept: Vec<(String, Vec<u32>)> = filtered["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|item| {
            let valid = item["valid"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            (
                item["group_id"].as_str().unwrap_or_default().to_string(),
                valid
                    .iter()
                    .filter_map(|index| index.as_u64().map(|i| i as u32))
                    .collect(),
            )
        })
        .collect();
    let want_kept: Vec<(String, Vec<u32>)> = expected
        .iter()
        .filter_map(|sample| {
            let valid = trainer_keeps(&sample.record, &FILTER)?;
            Some((sample.record.group_id.to_string(), valid))
        })
        .collect();
    assert_eq!(kept, want_kept, "what the trainer keeps filtering by score");

    // A folder with files is refused, unless forced; a forced export that fails leaves no
    // metadata to present the folder as a dataset.
    let error = export_error(&factory, &out, &[]);
    assert!(
        error.contains("is not empty") && error.contains("--force"),
        "{error}"
    );
    export(&factory, &out, &["--force"])?;
    run_script("syncd_layout_reader.py", &[out.as_os_str()])?;
    let last_shard = shards.last().context("a shard")?["key"]
        .as_str()
        .context("key")?;
    storage.delete(&[last_shard.to_string()]).await?;
    let error = export_error(&factory, &out, &["--force"]);
    assert!(error.contains(last_shard), "{error}");
    for name in ["metadata.json", "metadata_with_scores.json"] {
        assert!(
            !out.join(name).exists(),
            "{name} left after a failed export"
        );
    }
    factory.finish().await
}
