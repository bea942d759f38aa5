//! The real implementation of each job kind, behind [`JobRunner`]. Models are loaded once, when
//! the worker starts, from the paths in its configuration; a kind whose configuration is missing
//! stops the worker at start-up with a message naming what to set.

mod generate;
mod prior;
mod prompt;
mod score;

pub use score::ScoreRunner;

use crate::config::WorkerConfig;
use crate::device::{parse_device, parse_dtype};
use crate::pipelines::flux::TextEncoderPlacement;
use crate::runner::{JobRunner, ModelSetup};
use crate::scoring::scorer::Scorer;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use syncd_models::aesthetic::AestheticHeadKind;
use syncd_proto::lineage::ModelIdentity;
use syncd_proto::messages::{JobKind, ModelFamily};

/// Builds the runner of one job kind from the worker's configuration, loading its models.
pub async fn build_runner(kind: JobKind, config: &WorkerConfig) -> Result<Arc<dyn JobRunner>> {
    Ok(match kind {
        JobKind::Prompt => {
            let settings = config
                .prompt
                .clone()
                .context("prompt jobs need a [prompt.llm] section (base_url, model)")?;
            Arc::new(prompt::PromptRunner::new(settings)?)
        }
        JobKind::Prior => Arc::new(prior::PriorRunner),
        JobKind::Score => {
            let settings = config
                .scoring
                .clone()
                .context(
                    "score jobs need a [scoring] section (dinov2_dir, clip_dir, aesthetic_head)",
                )?
                .on_worker_device(&config.worker.device, &config.worker.dtype);
            let setup = ModelSetup {
                device: settings.device.clone().expect("filled in above"),
                dtype: settings.dtype.clone().expect("filled in above"),
                models: identify(vec![
                    ("dinov2".into(), settings.dinov2_dir.clone()),
                    ("clip-vision".into(), settings.clip_dir.clone()),
                    (
                        match settings.aesthetic_head_kind {
                            AestheticHeadKind::Linear => "aesthetic-linear",
                            AestheticHeadKind::Mlp => "aesthetic-mlp",
                        }
                        .into(),
                        settings.aesthetic_head.clone(),
                    ),
                ])
                .await?,
            };
            let scorer = tokio::task::spawn_blocking(move || Scorer::load(&settings))
                .await
                .context("loading the scoring models panicked")??;
            Arc::new(score::ScoreRunner::new(scorer, setup)?)
        }
        JobKind::Generate => {
            let dev = config.models.flux_dev.clone();
            let depth = config.models.flux_depth.clone();
            let device = parse_device(&config.worker.device)?;
            let kind = parse_dtype(&config.worker.dtype)?;
            let text = TextEncoderPlacement {
                device: match &config.models.text_encoder_device {
                    Some(text_device) => {
                        parse_device(text_device).context("[models] text_encoder_device")?
                    }
                    None => device,
                },
                cache_entries: config.models.text_embedding_cache,
            };
            let named = |name: &str, path: &Option<std::path::PathBuf>| {
                path.clone().map(|path| (name.to_string(), path))
            };
            let setup = ModelSetup {
                device: config.worker.device.clone(),
                dtype: config.worker.dtype.clone(),
                models: identify(
                    [
                        named(ModelFamily::FluxDev.as_str(), &dev),
                        named(ModelFamily::FluxDepthDev.as_str(), &depth),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                )
                .await?,
            };
            let pipeline = tokio::task::spawn_blocking(move || {
                generate::load_pipeline(dev.as_deref(), depth.as_deref(), device, kind, text)
            })
            .await
            .context("loading the FLUX pipelines panicked")??;
            Arc::new(generate::GenerateRunner::new(pipeline, setup)?)
        }
    })
}

/// Each model's identity (name, source, weights' hash), hashed on a blocking thread.
async fn identify(models: Vec<(String, PathBuf)>) -> Result<Vec<ModelIdentity>> {
    tokio::task::spawn_blocking(move || {
        models
            .iter()
            .map(|(name, path)| crate::identity::identify(name, path))
            .collect()
    })
    .await
    .context("hashing the model weights panicked")?
}
