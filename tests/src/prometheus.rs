//! A real Prometheus (Debian's `prometheus` package, installed by `scripts/setup.sh`) scraping a
//! test's factory every second, with the deployment's alert rules loaded, and queried through its
//! HTTP API as Grafana queries it.

use crate::env::TestEnv;
use crate::processes::{free_address, Process};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The Prometheus binary: `SYNCD_TEST_PROMETHEUS`, else Debian's.
fn binary() -> String {
    std::env::var("SYNCD_TEST_PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into())
}

/// What to scrape: a job name, its targets (`host:port`), and the metrics path with its query.
pub struct ScrapeJob {
    pub name: String,
    pub targets: Vec<String>,
    pub path: String,
    /// Query parameters, each with its values (`family` may be given several times).
    pub params: Vec<(String, Vec<String>)>,
}

impl ScrapeJob {
    pub fn new(name: &str, targets: &[String]) -> Self {
        Self {
            name: name.to_string(),
            targets: targets.to_vec(),
            path: "/metrics".into(),
            params: Vec::new(),
        }
    }
}

pub struct Prometheus {
    pub address: String,
    pub process: Process,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus in the test's folder: every job scraped and `rules` evaluated every
    /// second.
    pub fn start(env: &TestEnv, jobs: &[ScrapeJob], rules: &Path) -> Result<Self> {
        if !Path::new(&binary()).exists() {
            bail!(
                "{} not found: scripts/setup.sh installs Debian's prometheus package",
                binary()
            );
        }
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{:?}]\nscrape_configs:\n",
            rules.display().to_string()
        );
        for job in jobs {
            config.push_str(&format!(
                "  - job_name: {:?}\n    metrics_path: {:?}\n    static_configs:\n      - targets: {:?}\n",
                job.name, job.path, job.targets
            ));
            if !job.params.is_empty() {
                config.push_str("    params:\n");
                for (key, values) in &job.params {
                    config.push_str(&format!("      {key:?}: {values:?}\n"));
                }
            }
        }
        let config = env.write("prometheus.yml", &config)?;
        let address = free_address()?;
        let data = env.path("prometheus-data");
        let process = Process::start(
            "prometheus",
            Path::new(&binary()),
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", data.display()),
                &format!("--web.listen-address={address}"),
            ],
            env.dir.path(),
            &[],
        )?;
        Ok(Self {
            address,
            process,
            client: reqwest::Client::new(),
        })
    }

    /// Waits until Prometheus answers `/-/ready` (it has loaded its configuration and rules).
    pub async fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ready = self
                .client
                .get(format!("http://{}/-/ready", self.address))
                .send()
                .await
                .is_ok_and(|answer| answer.status().is_success());
            if ready {
                return Ok(());
            }
            if !self.process.is_running() || std::time::Instant::now() > deadline {
                bail!(
                    "Prometheus did not become ready:\n{}",
                    self.process.log_text()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let answer: Value = self
            .client
            .get(format!("http://{}{path}", self.address))
            .query(query)
            .send()
            .await
            .with_context(|| format!("asking Prometheus for {path}"))?
            .json()
            .await
            .with_context(|| format!("Prometheus' answer to {path}"))?;
        if answer["status"] != "success" {
            bail!("Prometheus refused {path} {query:?}: {answer}");
        }
        Ok(answer["data"].clone())
    }

    /// The result of an instant query (`data.result`).
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Every rule group as Prometheus evaluates it (`/api/v1/rules`).
    pub async fn rule_groups(&self) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/rules", &[]).await?;
        Ok(data["groups"].as_array().cloned().unwrap_or_default())
    }

    /// The scrape targets and their health (`/api/v1/targets`).
    pub async fn targets(&self) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/targets", &[]).await?;
        Ok(data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}
