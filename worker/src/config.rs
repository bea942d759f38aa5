//! The worker's configuration: a TOML file merged with `SYNCD_`-prefixed environment variables
//! (`__` separates nested keys: `SYNCD_BROKER__URL`). Secrets are `SecretString`s and never
//! printed.

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use syncd_infra::broker::BrokerConfig;
use syncd_infra::storage::StorageConfig;
use syncd_proto::messages::JobKind;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub worker: WorkerSettings,
    pub broker: BrokerConfig,
    pub storage: StorageConfig,
    /// The LLM of the prompt stage (needed by workers that take prompt jobs).
    pub prompt: Option<crate::prompt::PromptConfig>,
    /// The scoring models (needed by workers that take score jobs).
    pub scoring: Option<crate::scoring::scorer::ScorerConfig>,
    #[serde(default)]
    pub models: ModelPaths,
    #[serde(default)]
    pub metrics: Option<MetricsSettings>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Shown in job histories; defaults to the host name.
    pub name: Option<String>,
    /// The job kinds this worker takes.
    pub kinds: Vec<JobKind>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `bf16` or `fp32`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// On shutdown, how long the current job may run on before it is handed back to the queue.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Jobs in a row that may fail on the device (libtorch out of memory, a CUDA error) before
    /// the worker stops taking jobs and exits with status 3, for its supervisor to restart it.
    #[serde(default = "default_device_failure_limit")]
    pub device_failure_limit: u32,
    /// Seconds between the worker's announcements (`syncd workers`).
    #[serde(default = "default_announce_secs")]
    pub announce_secs: u32,
}

fn default_device() -> String {
    "cuda".into()
}
fn default_dtype() -> String {
    "bf16".into()
}
fn default_grace() -> u64 {
    600
}
fn default_device_failure_limit() -> u32 {
    3
}
fn default_announce_secs() -> u32 {
    15
}
fn default_text_embedding_cache() -> usize {
    crate::pipelines::flux::TextEncoderPlacement::on(tch::Device::Cpu).cache_entries
}

/// Where the models are. Each is needed only by the job kinds that use it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// Diffusers folder of FLUX.1-dev (deformable objects).
    pub flux_dev: Option<PathBuf>,
    /// FLUX.1-Depth-dev (rigid objects): its diffusers pipeline folder or, next to `flux_dev`
    /// (whose text encoders and VAE it then shares), just its `transformer/` folder or its BFL
    /// single file `flux1-depth-dev.safetensors`.
    pub flux_depth: Option<PathBuf>,
    /// Where the text encoders (T5-XXL, CLIP) run: `cpu` keeps their ~10 GB (bf16) off the GPU,
    /// which then holds the transformers and the VAE. Defaults to the worker's device.
    pub text_encoder_device: Option<String>,
    /// Prompts whose text embeddings are kept (on the transformer's device, 4 MiB each in
    /// bf16), so that a prompt seen before, above all the run's negative prompt, is not
    /// encoded again.
    #[serde(default = "default_text_embedding_cache")]
    pub text_embedding_cache: usize,
}

impl Default for ModelPaths {
    fn default() -> Self {
        Self {
            flux_dev: None,
            flux_depth: None,
            text_encoder_device: None,
            text_embedding_cache: default_text_embedding_cache(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <token>`.
    pub token: Option<secrecy::SecretString>,
}

impl WorkerConfig {
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Self = figment
            // Only nested keys (`SYNCD_SECTION__KEY`) are configuration: other `SYNCD_` variables
            // (`SYNCD_CONFIG`, `SYNCD_CACHE`, ...) belong to the scripts and the CLI.
            .merge(
                Env::prefixed("SYNCD_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .extract()
            .context("invalid worker configuration")?;
        if config.worker.kinds.is_empty() {
            bail!("worker.kinds is empty: name the job kinds this worker takes");
        }
        Ok(config)
    }

    pub fn name(&self) -> String {
        self.worker.name.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME").unwrap_or_else(|_| format!("worker-{}", std::process::id()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the deployments pass through the environment.
    const CONNECTIONS: &str = r#"
        [broker]
        url = "amqp://guest:guest@127.0.0.1:5672/%2f"
        [storage]
        endpoint = "http://127.0.0.1:3900"
        access_key_id = "key"
        secret_access_key = "secret"
    "#;

    fn shipped(path: &str) -> WorkerConfig {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        Figment::new()
            .merge(Toml::file(&file))
            .merge(Toml::string(CONNECTIONS))
            .extract()
            .unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    #[test]
    fn the_shipped_worker_configurations_load() {
        let demo = shipped("deploy/demo/worker.toml");
        assert_eq!(
            demo.worker.kinds,
            [JobKind::Prior, JobKind::Generate, JobKind::Score]
        );
        // The demo's model paths are relative to the checkout and must exist there.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for path in [
            demo.models.flux_dev.unwrap(),
            demo.models.flux_depth.unwrap(),
        ] {
            assert!(root.join(&path).is_dir(), "{}", path.display());
        }
        let compose = shipped("deploy/config/worker.toml");
        assert_eq!(compose.worker.kinds.len(), JobKind::ALL.len());
        assert!(compose.scoring.is_some() && compose.prompt.is_some());
    }
}
