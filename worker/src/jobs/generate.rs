//! Generation jobs: one group of images of one object with FLUX and Masked Shared Attention.
//!
//! Rigid objects run FLUX.1-Depth-dev conditioned on the object's 3D prior (the triplet's depth
//! control images, render masks and pixel correspondences, downloaded from S3); deformable
//! objects run FLUX.1-dev with masks derived from the attention to their category word. The
//! images and the masks used are uploaded as PNGs under the group's keys, so a re-run overwrites
//! them under the attempt's own keys (see `syncd_proto::keys`): an attempt that lost its lease
//! never overwrites the images the current attempt made. The generation itself runs on the
//! pipeline's own thread ([`ModelThread`]): one group at a time per GPU.
//!
//! The runner takes jobs only from the queues of the model families it loaded. Failures that
//! another attempt would repeat (prior files that do not decode or do not match the requested
//! size) are permanent; a libtorch failure (out of memory, a CUDA error) is the device's:
//! transient, and counted by the job loop.

use crate::device::{model_failure, ModelThread};
use crate::pipelines::denoise::TrueCfg;
use crate::pipelines::flux::{
    generate_group, FluxPipeline, GroupImages, GroupRequest, SubjectMasks, TextEncoderPlacement,
};
use crate::pipelines::warping::Correspondences;
use crate::runner::{JobContext, JobError, JobRunner, ModelSetup};
use crate::scoring::scorer::decode_mask;
use anyhow::{anyhow, bail, ensure, Context, Result};
use async_trait::async_trait;
use image::{GrayImage, RgbImage};
use std::path::Path;
use syncd_proto::correspondence::CorrespondenceSet;
use syncd_proto::keys;
use syncd_proto::messages::{
    GenerateJob, GenerateOutput, JobKind, JobMessage, JobOutput, JobPayload, ModelFamily,
    ObjectSpec, PriorTriplet, Route,
};
use syncd_proto::{ObjectId, RunId};
use tch::{Device, Kind, Tensor};
use tracing::Instrument;

/// Loads the configured FLUX models: FLUX.1-dev (deformable objects) and FLUX.1-Depth-dev
/// (rigid objects), either or both. With both, Depth-dev joins the dev pipeline and shares its
/// text encoders and VAE.
pub fn load_pipeline(
    dev: Option<&Path>,
    depth: Option<&Path>,
    device: Device,
    kind: Kind,
    text: TextEncoderPlacement,
) -> Result<FluxPipeline> {
    match (dev, depth) {
        (Some(dev), depth) => {
            let mut pipeline = FluxPipeline::load_with_text(dev, device, kind, text)
                .context("loading FLUX.1-dev ([models] flux_dev)")?;
            ensure!(
                pipeline.takes_text_only(),
                "[models] flux_dev ({}) holds a depth-controlled transformer, not FLUX.1-dev",
                dev.display()
            );
            if let Some(depth) = depth {
                pipeline
                    .add_depth_model(depth, device, kind)
                    .context("loading FLUX.1-Depth-dev ([models] flux_depth)")?;
            }
            Ok(pipeline)
        }
        (None, Some(depth)) => {
            let pipeline =
                FluxPipeline::load_with_text(depth, device, kind, text).with_context(|| {
                    format!(
                    "loading FLUX.1-Depth-dev ([models] flux_depth): without flux_dev it must be a \
                     whole pipeline folder, {} is not",
                    depth.display()
                )
                })?;
            ensure!(
                pipeline.takes_depth(),
                "[models] flux_depth ({}) holds no depth-controlled transformer",
                depth.display()
            );
            Ok(pipeline)
        }
        (None, None) => {
            bail!("generate jobs need [models] flux_dev and/or flux_depth (diffusers pipeline folders)")
        }
    }
}

pub struct GenerateRunner {
    pipeline: ModelThread<FluxPipeline>,
    /// The model families the pipeline can run, hence the queues the runner takes jobs from.
    families: Vec<ModelFamily>,
    setup: ModelSetup,
}

impl GenerateRunner {
    /// `setup` identifies the pipeline's models in the provenance of every group.
    pub fn new(pipeline: FluxPipeline, setup: ModelSetup) -> anyhow::Result<Self> {
        let families = ModelFamily::ALL
            .into_iter()
            .filter(|family| match family {
                ModelFamily::FluxDev => pipeline.takes_text_only(),
                ModelFamily::FluxDepthDev => pipeline.takes_depth(),
            })
            .collect();
        Ok(Self {
            pipeline: ModelThread::spawn("generate", pipeline)?,
            families,
            setup,
        })
    }
}

/// What a rigid group is conditioned on, decoded from the prior job's files.
struct PriorInputs {
    depth: Vec<RgbImage>,
    masks: Vec<GrayImage>,
    correspondences: Correspondences,
}

#[async_trait]
impl JobRunner for GenerateRunner {
    fn kind(&self) -> JobKind {
        JobKind::Generate
    }

    fn routes(&self) -> Vec<Route> {
        self.families.iter().copied().map(Route::Generate).collect()
    }

    fn models(&self) -> Vec<String> {
        self.families
            .iter()
            .map(|family| family.as_str().to_string())
            .collect()
    }

    fn model_setup(&self) -> Option<ModelSetup> {
        Some(self.setup.clone())
    }

    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Generate(generate) = &job.payload else {
            return Err(JobError::permanent(anyhow!("not a generation job")));
        };
        let prior = match (&generate.object, &generate.prior) {
            (ObjectSpec::Rigid { .. }, Some(triplet)) => Some(
                download_prior(context, job.run_id, job.object_id, triplet, generate)
                    .instrument(tracing::info_span!("download prior"))
                    .await?,
            ),
            (ObjectSpec::Rigid { uid, .. }, None) => {
                return Err(JobError::permanent(anyhow!(
                    "rigid object {uid} has no prior triplet in its generation job"
                )))
            }
            (ObjectSpec::Deformable { .. }, _) => None,
        };
        let request = group_request(generate, prior).map_err(JobError::permanent)?;
        let family = ModelFamily::for_object(&generate.object);
        if !self.families.contains(&family) {
            // Routing keeps such jobs off this worker's queues; one here was misrouted.
            return Err(JobError::permanent(anyhow!(
                "this group needs {family}, which this worker has not loaded ([models])"
            )));
        }
        let group = self
            .pipeline
            .run(move |pipeline| generate_group(pipeline, &request).map_err(model_failure))
            .instrument(tracing::info_span!("generate group"))
            .await?;
        let output = upload_group(context, job, generate, &group)
            .instrument(tracing::info_span!("upload images"))
            .await?;
        Ok(JobOutput::Generate(output))
    }
}

/// The pipeline request of a job (and, for rigid objects, its decoded prior).
fn group_request(job: &GenerateJob, prior: Option<PriorInputs>) -> Result<GroupRequest> {
    let (masks, depth, correspondences) = match (&job.object, prior) {
        (ObjectSpec::Rigid { .. }, Some(prior)) => (
            SubjectMasks::Given(prior.masks),
            Some(prior.depth),
            Some(prior.correspondences),
        ),
        (ObjectSpec::Rigid { uid, .. }, None) => bail!("rigid object {uid} has no prior"),
        (ObjectSpec::Deformable { .. }, _) => {
            ensure!(
                !job.subject_word.trim().is_empty(),
                "a deformable group needs its category word to derive masks from"
            );
            (
                SubjectMasks::FromAttention {
                    category: job.subject_word.clone(),
                },
                None,
                None,
            )
        }
    };
    ensure!(job.steps > 0, "a generation job needs at least one step");
    Ok(GroupRequest {
        prompts: job.prompts.clone(),
        depth,
        masks,
        correspondences,
        seed: job.seed,
        width: job.width,
        height: job.height,
        steps: job.steps as usize,
        guidance: f64::from(job.guidance),
        true_cfg: job.true_cfg.as_ref().map(|cfg| TrueCfg {
            negative_prompt: cfg.negative_prompt.clone(),
            scale: f64::from(cfg.scale),
            from_step: cfg.from_step as usize,
        }),
    })
}

/// Downloads and decodes a triplet's depth control images, masks and correspondences.
async fn download_prior(
    context: &JobContext,
    run: RunId,
    object: ObjectId,
    triplet: &PriorTriplet,
    job: &GenerateJob,
) -> Result<PriorInputs, JobError> {
    let mut depth = Vec::with_capacity(3);
    let mut masks = Vec::with_capacity(3);
    for view in 0..3 {
        let depth_key = keys::prior_depth(run, object, triplet.index, view);
        let bytes = context.storage.get(&depth_key).await?;
        let image = decode_prior_image(&bytes, &depth_key, job).map_err(JobError::permanent)?;
        // The depth control image is grey; the VAE takes it as three equal channels.
        depth.push(image::DynamicImage::ImageLuma8(image).to_rgb8());
        let mask_key = keys::prior_mask(run, object, triplet.index, view);
        let bytes = context.storage.get(&mask_key).await?;
        masks.push(decode_prior_image(&bytes, &mask_key, job).map_err(JobError::permanent)?);
    }
    let key = keys::prior_correspondences(run, object, triplet.index);
    let bytes = context.storage.get(&key).await?;
    let correspondences = decode_correspondences(&bytes)
        .with_context(|| format!("reading {key}"))
        .map_err(JobError::permanent)?;
    Ok(PriorInputs {
        depth,
        masks,
        correspondences,
    })
}

fn decode_prior_image(bytes: &[u8], key: &str, job: &GenerateJob) -> Result<GrayImage> {
    let image = decode_mask(bytes).with_context(|| format!("reading {key}"))?;
    ensure!(
        image.dimensions() == (job.width, job.height),
        "{key} is {}x{}, the group is generated at {}x{}",
        image.width(),
        image.height(),
        job.width,
        job.height
    );
    Ok(image)
}

/// A correspondence file -> the warping's rows in the pair order (0,1), (0,2), (1,2).
fn decode_correspondences(bytes: &[u8]) -> Result<Correspondences> {
    let set = CorrespondenceSet::decode(bytes)?;
    ensure!(
        i64::from(set.grid) == crate::pipelines::warping::CORRESPONDENCE_GRID,
        "correspondences are on a {0}x{0} grid, warping works on {1}x{1}",
        set.grid,
        crate::pipelines::warping::CORRESPONDENCE_GRID
    );
    let mut rows = Vec::new();
    let mut counts = [0i64; 3];
    for (slot, (a, b)) in [(0, 1), (0, 2), (1, 2)].into_iter().enumerate() {
        let pair = set
            .pairs
            .iter()
            .find(|pair| (pair.a, pair.b) == (a, b))
            .with_context(|| format!("no correspondences for the views ({a}, {b})"))?;
        counts[slot] = pair.rows.len() as i64;
        rows.extend(pair.rows.iter().flatten().copied());
    }
    let total: i64 = counts.iter().sum();
    Correspondences::new(Tensor::from_slice(&rows).reshape([total, 4]), counts)
}

/// Uploads the images and masks as PNGs under the attempt's keys (the regeneration's, for a
/// regeneration).
async fn upload_group(
    context: &JobContext,
    message: &JobMessage,
    job: &GenerateJob,
    group: &GroupImages,
) -> Result<GenerateOutput, JobError> {
    let prefix = keys::generation_attempt_prefix(
        message.run_id,
        job.group_id,
        job.regeneration,
        message.attempt,
    );
    let mut output = GenerateOutput {
        image_keys: Vec::with_capacity(group.images.len()),
        mask_keys: Vec::with_capacity(group.masks.len()),
    };
    for (index, (image, mask)) in group.images.iter().zip(&group.masks).enumerate() {
        let index = index as u32;
        let image_key = keys::generated_image(&prefix, index);
        let png = syncd_prior::images::encode_png(image, "generated image")
            .map_err(|error| JobError::permanent(anyhow!(error)))?;
        context.storage.put(&image_key, png, "image/png").await?;
        let mask_key = keys::generated_mask(&prefix, index);
        let png = syncd_prior::images::encode_png(mask, "group mask")
            .map_err(|error| JobError::permanent(anyhow!(error)))?;
        context.storage.put(&mask_key, png, "image/png").await?;
        output.image_keys.push(image_key);
        output.mask_keys.push(mask_key);
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncd_proto::correspondence::PairCorrespondences;

    fn pair(a: u32, b: u32, rows: usize) -> PairCorrespondences {
        PairCorrespondences {
            a,
            b,
            rows: (0..rows)
                .map(|row| [row as f32 / 100.0, 0.1, -0.2, 0.3])
                .collect(),
        }
    }

    #[test]
    fn correspondences_are_put_in_pair_order_whatever_the_file_order() {
        let set = CorrespondenceSet {
            grid: 128,
            pairs: vec![pair(1, 2, 3), pair(0, 1, 2), pair(0, 2, 1)],
        };
        let decoded = decode_correspondences(&set.encode()).unwrap();
        assert_eq!(decoded.counts, [2, 1, 3]);
        let first: Vec<f32> = Vec::try_from(decoded.rows.get(0)).unwrap();
        assert_eq!(first, vec![0.0, 0.1, -0.2, 0.3]);
    }

    #[test]
    fn the_runner_takes_jobs_only_of_the_families_it_loaded() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let dev = fixtures.join("tiny-flux-pipeline");
        let depth = fixtures.join("flux/tiny-depth");
        let load = |depth: Option<&Path>| {
            let text = TextEncoderPlacement::on(Device::Cpu);
            let setup = ModelSetup {
                device: "cpu".into(),
                dtype: "fp32".into(),
                models: Vec::new(),
            };
            GenerateRunner::new(
                load_pipeline(Some(&dev), depth, Device::Cpu, Kind::Float, text).unwrap(),
                setup,
            )
            .unwrap()
        };
        let dev_only = load(None);
        assert_eq!(
            dev_only.routes(),
            vec![Route::Generate(ModelFamily::FluxDev)]
        );
        assert_eq!(dev_only.models(), vec!["flux-dev".to_string()]);
        assert_eq!(
            load(Some(&depth)).routes(),
            Route::of_kind(JobKind::Generate).collect::<Vec<_>>()
        );
    }

    #[test]
    fn missing_pairs_and_other_grids_are_refused() {
        let set = CorrespondenceSet {
            grid: 128,
            pairs: vec![pair(0, 1, 2), pair(0, 2, 1)],
        };
        let error = decode_correspondences(&set.encode()).unwrap_err();
        assert!(format!("{error:#}").contains("(1, 2)"), "{error:#}");
        let set = CorrespondenceSet {
            grid: 64,
            pairs: vec![pair(0, 1, 2), pair(0, 2, 1), pair(1, 2, 1)],
        };
        assert!(decode_correspondences(&set.encode()).is_err());
        assert!(decode_correspondences(b"not a correspondence file").is_err());
    }
}
