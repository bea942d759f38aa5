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

/// Where the models are. Each is needed only by the job kinds that use it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// Diffusers folder of FLUX.1-dev (deformable objects).
    pub flux_dev: Option<PathBuf>,
    /// FLUX.1-Depth-dev (rigid objects): its diffusers pipeline folder or, next to `flux_dev`
    /// (whose text encoders and VAE it then shares), just its `transformer/` folder or its BFL
    /// single file `flux1-depth-dev.safetensors`.
    pub flux_depth: Option<PathBuf>,
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
