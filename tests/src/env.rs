//! A test's private slice of the services: a fresh database, a queue prefix and a bucket, all
//! named after a random id so that tests run in parallel and re-run on a dirty machine.

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection, PgPool};
use std::path::{Path, PathBuf};
use syncd_infra::broker::BrokerConfig;
use syncd_infra::storage::{Storage, StorageConfig};
use syncd_proto::messages::Route;
use uuid::Uuid;

/// The set-up script's cache (`SYNCD_CACHE`, by default `~/.cache/syncd`): the services'
/// settings, Garage's data and credentials.
pub fn cache_dir() -> PathBuf {
    std::env::var("SYNCD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/syncd")
        })
}

/// Reads `KEY=value` lines of the credentials file the set-up script writes, for settings not in
/// the environment.
fn from_services_file(name: &str) -> Option<String> {
    let text = std::fs::read_to_string(cache_dir().join("services.env")).ok()?;
    text.lines().find_map(|line| {
        let line = line.trim().trim_start_matches("export ");
        let (key, value) = line.split_once('=')?;
        (key == name).then(|| value.trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

fn service_setting(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .or_else(|| from_services_file(name))
        .unwrap_or_else(|| default.to_string())
}

/// Where a process reaches the services: directly, or through fault proxies.
#[derive(Clone, Debug)]
pub struct Routes {
    pub database_url: String,
    pub amqp_url: String,
    pub s3_endpoint: String,
    /// The S3 key the process uses.
    pub s3_access_key: String,
    pub s3_secret_key: String,
}

/// One test's isolated environment.
pub struct TestEnv {
    pub id: String,
    pub database_url: String,
    pub amqp_url: String,
    pub queue_prefix: String,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub bucket: String,
    /// Where the coordinator writes datasets, when not in `bucket`.
    pub dataset_bucket: Option<String>,
    /// The job queues' delivery limit, when not the shipped default; set before any process
    /// starts (every process declares the queues, with the same arguments).
    pub delivery_limit: Option<u32>,
    /// Scratch folder for configuration files, inputs and logs; kept if the test fails.
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub async fn new() -> Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let admin_url = admin_database_url();
        let database = format!("syncd_test_{id}");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .context("creating the test database")?;
        let database_url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{database}"),
            None => anyhow::bail!("unexpected database url {admin_url}"),
        };
        let env = Self {
            database_url,
            amqp_url: service_setting(
                "SYNCD_TEST_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            queue_prefix: format!("test-{id}"),
            s3_endpoint: service_setting("SYNCD_TEST_S3_ENDPOINT", "http://127.0.0.1:3900"),
            s3_region: service_setting("SYNCD_TEST_S3_REGION", "garage"),
            s3_access_key: service_setting("SYNCD_TEST_S3_ACCESS_KEY_ID", ""),
            s3_secret_key: service_setting("SYNCD_TEST_S3_SECRET_ACCESS_KEY", ""),
            bucket: format!("test-{id}"),
            dataset_bucket: None,
            delivery_limit: None,
            dir: tempfile::Builder::new().prefix("syncd-test-").tempdir()?,
            id,
        };
        env.storage()
            .ensure_bucket()
            .await
            .context("creating the test bucket")?;
        Ok(env)
    }

    pub fn storage_config(&self) -> StorageConfig {
        StorageConfig {
            endpoint: Some(self.s3_endpoint.clone()),
            region: self.s3_region.clone(),
            bucket: self.bucket.clone(),
            access_key_id: self.s3_access_key.clone(),
            secret_access_key: self.s3_secret_key.clone().into(),
        }
    }

    /// The broker settings every process of this test uses (its queue prefix, its limit).
    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            url: self.amqp_url.clone().into(),
            queue_prefix: self.queue_prefix.clone(),
            delivery_limit: self
                .delivery_limit
                .unwrap_or_else(syncd_infra::broker::default_delivery_limit),
        }
    }

    pub fn storage(&self) -> Storage {
        Storage::new(&self.storage_config())
    }

    /// Drops this test's database (tests keep theirs for inspection; a benchmark's is large).
    pub async fn drop_database(&self) -> Result<()> {
        let admin_url = admin_database_url();
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE syncd_test_{} WITH (FORCE)",
            self.id
        ))
        .execute(&mut admin)
        .await
        .context("dropping the test database")?;
        Ok(())
    }

    /// Where this test's datasets are: `dataset_bucket`, or the test's bucket.
    pub fn dataset_storage(&self) -> Storage {
        match &self.dataset_bucket {
            Some(bucket) => self.storage().for_bucket(bucket),
            None => self.storage(),
        }
    }

    pub async fn pool(&self) -> Result<PgPool> {
        Ok(PgPool::connect(&self.database_url).await?)
    }

    /// A pool on this test's database with the coordinator's migrations applied, for tests of
    /// the coordinator's database code without a coordinator process.
    pub async fn migrated_pool(&self) -> Result<PgPool> {
        syncd_coordinator::db::connect(&syncd_coordinator::config::DatabaseConfig {
            url: self.database_url.clone().into(),
            max_connections: 4,
        })
        .await
    }

    /// The services reached directly.
    pub fn direct_routes(&self) -> Routes {
        Routes {
            database_url: self.database_url.clone(),
            amqp_url: self.amqp_url.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            s3_access_key: self.s3_access_key.clone(),
            s3_secret_key: self.s3_secret_key.clone(),
        }
    }

    /// The `[broker]` and `[storage]` sections every configuration file shares.
    fn shared_sections(&self, routes: &Routes) -> String {
        format!(
            "[broker]\nurl = \"{amqp}\"\nqueue_prefix = \"{prefix}\"\n{limit}\n\
             [storage]\nendpoint = \"{endpoint}\"\nregion = \"{region}\"\nbucket = \"{bucket}\"\n\
             access_key_id = \"{key}\"\nsecret_access_key = \"{secret}\"\n",
            amqp = routes.amqp_url,
            prefix = self.queue_prefix,
            limit = self
                .delivery_limit
                .map(|limit| format!("delivery_limit = {limit}\n"))
                .unwrap_or_default(),
            endpoint = routes.s3_endpoint,
            region = self.s3_region,
            bucket = self.bucket,
            key = routes.s3_access_key,
            secret = routes.s3_secret_key,
        )
    }

    /// Writes the coordinator's configuration, with short loop intervals.
    pub fn write_coordinator_config(&self) -> Result<PathBuf> {
        self.write_coordinator_config_routed("coordinator.toml", &self.direct_routes())
    }

    /// Writes a coordinator configuration file `name` reaching the services by `routes`.
    pub fn write_coordinator_config_routed(&self, name: &str, routes: &Routes) -> Result<PathBuf> {
        let dataset_bucket = self
            .dataset_bucket
            .as_ref()
            .map(|bucket| format!("dataset_bucket = \"{bucket}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "{dataset_bucket}[database]\nurl = \"{db}\"\n\n{shared}\n[loops]\ndispatch_interval_ms = 100\n\
             relay_interval_ms = 50\nreaper_interval_ms = 500\npacking_interval_ms = 300\n\
             step_timeout_secs = 10\nleadership_interval_ms = 300\n",
            db = routes.database_url,
            shared = self.shared_sections(routes)
        );
        self.write(name, &text)
    }

    /// Writes a worker's configuration; `extra` holds further sections (`[llm]`, `[models]`).
    pub fn write_worker_config(&self, name: &str, kinds: &[&str], extra: &str) -> Result<PathBuf> {
        self.write_worker_config_routed(name, kinds, extra, &self.direct_routes())
    }

    /// [`TestEnv::write_worker_config`] reaching the services by `routes`.
    pub fn write_worker_config_routed(
        &self,
        name: &str,
        kinds: &[&str],
        extra: &str,
        routes: &Routes,
    ) -> Result<PathBuf> {
        let kinds: Vec<String> = kinds.iter().map(|kind| format!("\"{kind}\"")).collect();
        let text = format!(
            "[worker]\nname = \"{name}\"\nkinds = [{kinds}]\ndevice = \"cpu\"\ndtype = \"fp32\"\n\
             shutdown_grace_secs = 30\n\n{shared}\n{extra}\n",
            kinds = kinds.join(", "),
            shared = self.shared_sections(routes)
        );
        self.write(&format!("{name}.toml"), &text)
    }

    /// The `SYNCD_` environment that points a worker started with a shipped configuration
    /// file (`deploy/demo/worker.toml`) at this test's services, queues and bucket.
    pub fn worker_connection_env(&self, name: &str) -> Vec<(String, String)> {
        let limit = self.delivery_limit.map(|limit| {
            // The queues' arguments must match the coordinator's, which declares them too.
            (
                "SYNCD_BROKER__DELIVERY_LIMIT".to_string(),
                limit.to_string(),
            )
        });
        [
            ("SYNCD_WORKER__NAME", name.to_string()),
            ("SYNCD_BROKER__URL", self.amqp_url.clone()),
            ("SYNCD_BROKER__QUEUE_PREFIX", self.queue_prefix.clone()),
            ("SYNCD_STORAGE__ENDPOINT", self.s3_endpoint.clone()),
            ("SYNCD_STORAGE__REGION", self.s3_region.clone()),
            ("SYNCD_STORAGE__BUCKET", self.bucket.clone()),
            ("SYNCD_STORAGE__ACCESS_KEY_ID", self.s3_access_key.clone()),
            (
                "SYNCD_STORAGE__SECRET_ACCESS_KEY",
                self.s3_secret_key.clone(),
            ),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .chain(limit)
        .collect()
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A broker channel on this test's queues, for publishing or inspecting messages directly.
    pub async fn broker_channel(&self) -> Result<lapin::Channel> {
        let connection =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        Ok(connection.create_channel().await?)
    }

    /// Deletes the test's queues, so a passing test leaves the broker as it found it.
    pub async fn cleanup(&self) -> Result<()> {
        let channel = self.broker_channel().await?;
        let routes = Route::ALL.map(|route| format!("jobs.{route}"));
        let others = ["results", "dead-letter", "workers"].map(String::from);
        for suffix in routes.iter().chain(&others) {
            let _ = channel
                .queue_delete(
                    format!("{}.{suffix}", self.queue_prefix).as_str().into(),
                    Default::default(),
                )
                .await;
        }
        let _ = channel
            .exchange_delete(
                format!("{}.dead-letter", self.queue_prefix).as_str().into(),
                Default::default(),
            )
            .await;
        Ok(())
    }
}

/// The database tests create their own databases from.
fn admin_database_url() -> String {
    service_setting(
        "SYNCD_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// Where a data file of the tests lives.
pub fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}
