//! `syncd-test-worker`: the real worker job loop (`syncd_worker::service::Worker`) with TEST-ONLY
//! generation and scoring. It exists so the end-to-end tests can drive the whole factory on a
//! machine without a GPU or model weights; it is never shipped.
//!
//! What is fake, and only here: the "generated" images are deterministic gradients drawn from the
//! group seed and the attempt, and the "scores" are deterministic numbers derived from the group id, spread so
//! that some groups pass the filter and some do not. Everything around them is real: the queues,
//! the reports, the S3 uploads under the documented keys, the downloads the scorer does.
//!
//! Environment: `SYNCD_TEST_JOB_DELAY_MS` makes every generation job take that long, so tests can
//! kill a worker while it holds a job; `SYNCD_TEST_FAMILIES` (`flux-dev`, `flux-depth-dev`,
//! comma-separated) says which generation queues it takes jobs from, as a worker with only those
//! FLUX models loaded would; `SYNCD_TEST_CRASH_ON` makes the process abort, as a worker crashing
//! inside a model would, when it generates an object whose description contains that text;
//! `SYNCD_TEST_FAIL_ON` makes such a generation fail as transient instead, on every attempt;
//! `SYNCD_TEST_DARK_ON` paints such an object's images black, and the scorer gives a black image
//! an aesthetic score of 0, so a test can have a group rejected whatever its id;
//! `SYNCD_TEST_EMBEDDING_CLASSES=K` gives every group the embeddings of one of K classes (by its
//! id) plus a little noise of its own, so groups of one class are near duplicates of each other;
//! `SYNCD_TEST_EMBEDDING_DIM` sets the embeddings' size (16 by default; DINOv2-L's is 1024);
//! `SYNCD_TEST_SKIP_S3=1` uploads and reads no image, for benchmarks of the control plane alone
//! (the keys are still reported, so such a run's dataset cannot be assembled).

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Parser;
use std::sync::Arc;
use std::time::Duration;
use syncd_proto::keys;
use syncd_proto::messages::{
    GenerateOutput, JobKind, JobMessage, JobOutput, JobPayload, ModelFamily, ObjectSpec,
    PairSimilarity, Route, ScoreOutput,
};
use syncd_worker::config::WorkerConfig;
use syncd_worker::runner::{JobContext, JobError, JobRunner};
use syncd_worker::service::{Worker, WorkerStatus};

#[derive(Parser)]
struct Args {
    /// The worker configuration file.
    #[arg(long)]
    config: std::path::PathBuf,
}

/// SplitMix64: a deterministic stream of numbers from one seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unit(seed: u64) -> f32 {
    (mix(seed) >> 40) as f32 / (1u64 << 24) as f32
}

fn png(image: &image::DynamicImage) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// TEST-ONLY generation: gradients and centred square masks, keyed like real outputs.
struct GradientGenerator {
    delay: Duration,
    /// The model families it pretends to have loaded (`SYNCD_TEST_FAMILIES`, default both).
    families: Vec<ModelFamily>,
    /// Aborts the process on objects whose description contains this (`SYNCD_TEST_CRASH_ON`).
    crash_on: Option<String>,
    /// Fails the generation of such objects, as transient (`SYNCD_TEST_FAIL_ON`).
    fail_on: Option<String>,
    /// Paints the images of such objects black (`SYNCD_TEST_DARK_ON`).
    dark_on: Option<String>,
    /// Uploads nothing (`SYNCD_TEST_SKIP_S3`).
    skip_s3: bool,
}

#[async_trait]
impl JobRunner for GradientGenerator {
    fn kind(&self) -> JobKind {
        JobKind::Generate
    }

    fn routes(&self) -> Vec<Route> {
        self.families.iter().copied().map(Route::Generate).collect()
    }

    fn models(&self) -> Vec<String> {
        self.families
            .iter()
            .map(|family| format!("test-{family}"))
            .collect()
    }

    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Generate(generate) = &job.payload else {
            return Err(JobError::permanent(anyhow::anyhow!("not a generation job")));
        };
        // The markers match the description of a deformable object (what the tests create).
        let description = match &generate.object {
            ObjectSpec::Deformable { description, .. } => description.as_str(),
            _ => "",
        };
        let marked = |marker: &Option<String>| {
            !description.is_empty()
                && marker
                    .as_deref()
                    .is_some_and(|marker| description.contains(marker))
        };
        if marked(&self.crash_on) {
            eprintln!("TEST-ONLY crash on {description:?} (SYNCD_TEST_CRASH_ON)");
            std::process::abort();
        }
        if marked(&self.fail_on) {
            return Err(JobError::transient(anyhow::anyhow!(
                "TEST-ONLY failure on {description:?} (SYNCD_TEST_FAIL_ON)"
            )));
        }
        tokio::time::sleep(self.delay).await;
        let dark = marked(&self.dark_on);
        let mut output = GenerateOutput {
            image_keys: Vec::new(),
            mask_keys: Vec::new(),
        };
        for (index, _prompt) in generate.prompts.iter().enumerate() {
            let prefix = keys::generation_attempt_prefix(
                job.run_id,
                generate.group_id,
                generate.regeneration,
                job.attempt,
            );
            let image_key = keys::generated_image(&prefix, index as u32);
            let mask_key = keys::generated_mask(&prefix, index as u32);
            if !self.skip_s3 {
                // Each attempt paints its own pixels, as two GPUs may: an attempt that overwrote
                // another's images would show.
                let seed =
                    generate.seed.wrapping_add(index as u64) ^ (u64::from(job.attempt) << 32);
                let tint = [
                    (mix(seed) % 255) as u8,
                    (mix(seed + 1) % 255) as u8,
                    (mix(seed + 2) % 255) as u8,
                ];
                let image = image::RgbImage::from_fn(64, 64, |x, y| match dark {
                    true => image::Rgb([0, 0, 0]),
                    false => image::Rgb([
                        tint[0].wrapping_add(x as u8),
                        tint[1].wrapping_add(y as u8),
                        tint[2],
                    ]),
                });
                let mask = image::GrayImage::from_fn(64, 64, |x, y| {
                    image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) {
                        255
                    } else {
                        0
                    }])
                });
                context
                    .storage
                    .put(&image_key, png(&image.into())?, "image/png")
                    .await?;
                context
                    .storage
                    .put(&mask_key, png(&mask.into())?, "image/png")
                    .await?;
            }
            output.image_keys.push(image_key);
            output.mask_keys.push(mask_key);
        }
        Ok(JobOutput::Generate(output))
    }
}

/// TEST-ONLY scoring: reads every image back (so missing uploads fail the job) and derives
/// scores from the group id; a wholly black image scores 0 on looks.
struct HashScorer {
    /// Embedding size (`SYNCD_TEST_EMBEDDING_DIM`).
    dimension: usize,
    /// Reads nothing (`SYNCD_TEST_SKIP_S3`).
    skip_s3: bool,
}

#[async_trait]
impl JobRunner for HashScorer {
    fn kind(&self) -> JobKind {
        JobKind::Score
    }

    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Score(score) = &job.payload else {
            return Err(JobError::permanent(anyhow::anyhow!("not a scoring job")));
        };
        let mut black = vec![false; score.image_keys.len()];
        for (index, key) in score.image_keys.iter().chain(&score.mask_keys).enumerate() {
            if self.skip_s3 {
                break;
            }
            let bytes = context.storage.get(key).await?;
            let picture =
                image::load_from_memory(&bytes).with_context(|| format!("decoding {key}"))?;
            // The masks come after the images: only the images are judged on looks.
            if let Some(black) = black.get_mut(index) {
                *black = picture.as_bytes().iter().all(|&byte| byte == 0);
            }
        }
        let base = score.group_id.0.as_u64_pair().0;
        let images = score.image_keys.len();
        let aesthetic = (0..images)
            .map(|i| match black[i] {
                true => 0.0,
                false => 4.5 + 3.5 * unit(base ^ (i as u64 + 1)),
            })
            .collect();
        let mut pairs = Vec::new();
        for a in 0..images {
            for b in a + 1..images {
                let similarity = 0.6 + 0.4 * unit(base ^ ((a * 7 + b) as u64 + 100));
                pairs.push(PairSimilarity {
                    a: a as u32,
                    b: b as u32,
                    similarity,
                });
            }
        }
        // Without classes every group has embeddings of its own; with them, the class's plus a
        // noise about 1/400 of their size (cosines near 0.99999 within a class).
        let (source, noise) = match embedding_classes() {
            Some(classes) => (mix(mix(base) % classes), 0.005),
            None => (base, 0.0),
        };
        let embeddings = (0..images)
            .map(|i| {
                let raw: Vec<f32> = (0..self.dimension)
                    .map(|d| {
                        let seed = (i * self.dimension + d) as u64 + 1000;
                        unit(source ^ seed) - 0.5 + noise * (unit(base ^ seed) - 0.5)
                    })
                    .collect();
                let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
                raw.into_iter().map(|v| v / norm).collect()
            })
            .collect();
        Ok(JobOutput::Score(ScoreOutput {
            aesthetic,
            pairs,
            embeddings,
        }))
    }
}

/// `SYNCD_TEST_EMBEDDING_CLASSES`: how many embedding classes the scorer draws groups from.
fn embedding_classes() -> Option<u64> {
    std::env::var("SYNCD_TEST_EMBEDDING_CLASSES")
        .ok()
        .and_then(|classes| classes.parse().ok())
        .filter(|&classes| classes > 0)
}

/// `SYNCD_TEST_FAMILIES`: the generation model families, comma-separated (default all).
fn families() -> Result<Vec<ModelFamily>> {
    let Ok(names) = std::env::var("SYNCD_TEST_FAMILIES") else {
        return Ok(ModelFamily::ALL.to_vec());
    };
    names
        .split(',')
        .map(|name| {
            ModelFamily::ALL
                .into_iter()
                .find(|family| family.as_str() == name.trim())
                .with_context(|| format!("unknown model family {name:?} in SYNCD_TEST_FAMILIES"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _telemetry = syncd_infra::telemetry::init("syncd-test-worker")?;
    let config = WorkerConfig::load(Some(&args.config))?;
    let delay = std::env::var("SYNCD_TEST_JOB_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    let status = WorkerStatus::new(&config.name());
    // `/metrics`, `/healthz` and `/readyz`, as the shipped worker serves them.
    if let Some(metrics) = &config.metrics {
        let ready = status.readiness();
        syncd_infra::metrics::serve(metrics.listen, metrics.token.clone(), ready).await?;
    }
    let skip_s3 = std::env::var("SYNCD_TEST_SKIP_S3").is_ok_and(|skip| skip == "1");
    let mut runners: Vec<Arc<dyn JobRunner>> = Vec::new();
    for kind in &config.worker.kinds {
        match kind {
            JobKind::Generate => runners.push(Arc::new(GradientGenerator {
                delay,
                families: families()?,
                crash_on: std::env::var("SYNCD_TEST_CRASH_ON").ok(),
                fail_on: std::env::var("SYNCD_TEST_FAIL_ON").ok(),
                dark_on: std::env::var("SYNCD_TEST_DARK_ON").ok(),
                skip_s3,
            })),
            JobKind::Score => runners.push(Arc::new(HashScorer {
                dimension: std::env::var("SYNCD_TEST_EMBEDDING_DIM")
                    .ok()
                    .and_then(|dimension| dimension.parse().ok())
                    .unwrap_or(16),
                skip_s3,
            })),
            other => runners.push(syncd_worker::jobs::build_runner(*other, &config).await?),
        }
    }
    let worker = Worker::new(&config, runners, status);
    worker.run(syncd_infra::shutdown_signal()).await
}
