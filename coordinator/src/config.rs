//! The coordinator's service configuration: a TOML file merged with `SYNCD_`-prefixed
//! environment variables, `__` separating nested keys (`SYNCD_DATABASE__URL`). Environment
//! variables win, so secrets can stay out of files. Secrets are `SecretString`s: their `Debug`
//! prints `[REDACTED]`, so logging the whole configuration is safe.

use anyhow::{Context, Result};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use syncd_infra::broker::BrokerConfig;
use syncd_infra::storage::StorageConfig;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    pub storage: StorageConfig,
    /// The bucket finished datasets are written to, when it is not `storage.bucket`. Workers
    /// never need it, so their S3 key can be one that cannot touch a finished dataset.
    pub dataset_bucket: Option<String>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub loops: LoopConfig,
    #[serde(default)]
    pub gallery: GalleryConfig,
}

/// The read-only web gallery of runs, groups and contact sheets (`crate::gallery`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GalleryConfig {
    /// Where to serve it, e.g. `127.0.0.1:9480`; none (the default) serves no gallery. It has no
    /// authentication: keep it on the loopback or a private network.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/database`.
    pub url: secrecy::SecretString,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    8
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; none disables it.
    pub listen: Option<SocketAddr>,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <token>`.
    pub token: Option<secrecy::SecretString>,
}

/// How often the background loops look for work. The defaults suit production; tests shorten
/// them.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    pub dispatch_interval_ms: u64,
    pub relay_interval_ms: u64,
    pub reaper_interval_ms: u64,
    /// How often the packing loop assigns accepted groups to shards, packs them and publishes
    /// the manifests (`crate::dataset::packing`). (`completion_interval_ms` is its former name.)
    #[serde(alias = "completion_interval_ms")]
    pub packing_interval_ms: u64,
    /// Shards packed at once (each streams its groups' images through the coordinator).
    pub packing_concurrency: usize,
    /// How long one packing pass (at most `packing_concurrency` shards) may take: a shard of a
    /// thousand 1024x1024 groups moves gigabytes, far longer than `step_timeout_secs`.
    pub packing_timeout_secs: u64,
    /// Most jobs of one route (a queue: a job kind, or a generation model family) queued or
    /// running at once: the rest wait in `pending`, so the broker holds a bounded backlog and
    /// pausing a run takes effect quickly. (`max_queued_per_kind` is its former name.)
    #[serde(alias = "max_queued_per_kind")]
    pub max_queued_per_route: i64,
    /// How long one loop step or one report may take before its database connection is
    /// presumed dead: a connection behind a network partition never fails by itself.
    pub step_timeout_secs: u64,
    /// How often the sheets loop looks for decided groups without a contact sheet.
    pub sheet_interval_ms: u64,
    /// Contact sheets drawn at once (each downloads and decodes a group's images on the
    /// coordinator); 0 draws none.
    pub sheet_concurrency: usize,
    /// How often a standby coordinator tries to take the lead, and a leader checks that it
    /// still holds it (`crate::leadership`).
    pub leadership_interval_ms: u64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            dispatch_interval_ms: 500,
            relay_interval_ms: 200,
            reaper_interval_ms: 5_000,
            packing_interval_ms: 2_000,
            packing_concurrency: 4,
            packing_timeout_secs: 3_600,
            max_queued_per_route: 500,
            step_timeout_secs: 60,
            sheet_interval_ms: 1_000,
            sheet_concurrency: 2,
            leadership_interval_ms: 1_000,
        }
    }
}

impl CoordinatorConfig {
    /// Where finished datasets go: `dataset_bucket`, or the working bucket.
    pub fn dataset_storage(
        &self,
        work: &syncd_infra::storage::Storage,
    ) -> syncd_infra::storage::Storage {
        match &self.dataset_bucket {
            Some(bucket) => work.for_bucket(bucket),
            None => work.clone(),
        }
    }

    /// Loads `file` (if given) and the environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        sources(file)?
            .extract()
            .context("invalid coordinator configuration")
    }

    /// Loads only the `[database]` section: what the admin commands that read or change job
    /// state need, so that they run where the broker and S3 settings are not at hand.
    pub fn load_database(file: Option<&Path>) -> Result<DatabaseConfig> {
        sources(file)?
            .extract_inner("database")
            .context("invalid coordinator configuration ([database])")
    }
}

/// `file` (if given) merged with the environment.
fn sources(file: Option<&Path>) -> Result<Figment> {
    let mut figment = Figment::new();
    if let Some(file) = file {
        if !file.exists() {
            anyhow::bail!("configuration file {} does not exist", file.display());
        }
        figment = figment.merge(Toml::file(file));
    }
    // Only nested keys (`SYNCD_SECTION__KEY`) are configuration: other `SYNCD_` variables
    // (`SYNCD_CONFIG`, `SYNCD_CACHE`, ...) belong to the scripts and the CLI.
    Ok(figment.merge(
        Env::prefixed("SYNCD_")
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type is not ours to change
    fn secrets_are_redacted_in_debug_output() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "coordinator.toml",
                r#"
                [database]
                url = "postgres://syncd:hunter2@db/syncd"
                [broker]
                url = "amqp://guest:rabbitpass@mq:5672/%2f"
                [storage]
                bucket = "syncd"
                access_key_id = "GK0123"
                secret_access_key = "s3cr3t-value"
                "#,
            )?;
            jail.set_env("SYNCD_BROKER__QUEUE_PREFIX", "from-env");
            let config = CoordinatorConfig::load(Some(Path::new("coordinator.toml"))).unwrap();
            assert_eq!(config.broker.queue_prefix, "from-env");
            let printed = format!("{config:?}");
            for secret in ["hunter2", "rabbitpass", "s3cr3t-value"] {
                assert!(!printed.contains(secret), "{secret} leaked: {printed}");
            }
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type is not ours to change
    fn the_database_section_alone_is_enough_for_the_database() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "cli.toml",
                "[database]\nurl = \"postgres://syncd@db/syncd\"\nmax_connections = 2\n",
            )?;
            let database = CoordinatorConfig::load_database(Some(Path::new("cli.toml"))).unwrap();
            assert_eq!(database.max_connections, 2);
            let error = CoordinatorConfig::load(Some(Path::new("cli.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("broker"), "{error:#}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let error =
            CoordinatorConfig::load(Some(Path::new("/nonexistent/syncd.toml"))).unwrap_err();
        assert!(error.to_string().contains("does not exist"));
    }
}
