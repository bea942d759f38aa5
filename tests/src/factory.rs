//! A whole factory for end-to-end tests: the real coordinator binary and `syncd-test-worker`
//! processes on a test's private [`TestEnv`], with the CLI to drive it and helpers that count
//! what it made (jobs, dataset shards and records).

use crate::env::{Routes, TestEnv};
use crate::processes::{binary, cli, wait_for, Process};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CATEGORIES: [&str; 4] = ["Cat", "Dog", "Fox", "Parrot"];

/// How a test worker was started.
struct Launch {
    job_delay_ms: u64,
    env: Vec<(String, String)>,
}

/// The run file sections [`Factory::create_run`] ends with.
const DEFAULT_RUN_SECTIONS: &str = "[dataset]\nsamples_per_shard = 4\n";

/// A run's `[filter]` section under which every picture the test workers paint passes on looks
/// (their scorer gives 4.5 to 8) except a black one (0: `SYNCD_TEST_DARK_ON`). Groups are then
/// decided by their pairs, most accepted, and a dark object's group is rejected whatever its id:
/// a run has both decisions.
pub const FILTER_ONLY_DARK_FAILS_ON_LOOKS: &str = "[filter]\nmin_aesthetic = 4.5\n";

/// The description [`Factory::create_run`] gives object `index` of `category`.
fn describe_object(index: usize, category: &str) -> String {
    format!("a {category} with distinctive markings number {index}")
}

/// A running factory: coordinator, workers, and the files they were started with.
pub struct Factory {
    pub env: TestEnv,
    /// The CLI's configuration: it always reaches the services directly.
    pub coordinator_config: PathBuf,
    /// The coordinator's own configuration (through fault proxies when the test routes it).
    coordinator_service_config: PathBuf,
    /// How workers reach the services.
    worker_routes: Routes,
    pub coordinator: Option<Process>,
    pub workers: Vec<Process>,
    /// How each worker was started, to start it again the same way.
    worker_launches: Vec<Launch>,
    /// Environment of the coordinator process from its next start on (`SYNCD_...` overrides).
    pub coordinator_env: Vec<(String, String)>,
}

impl Factory {
    /// A factory reaching every service directly, with `workers` test workers.
    pub async fn start(workers: usize, job_delay_ms: u64) -> Result<Self> {
        Self::start_with_coordinator_env(workers, job_delay_ms, &[]).await
    }

    /// [`Factory::start`] with a coordinator that runs with `coordinator_env` (`SYNCD_...`
    /// overrides of its configuration) from its first start on.
    pub async fn start_with_coordinator_env(
        workers: usize,
        job_delay_ms: u64,
        coordinator_env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut factory = Self::start_in(TestEnv::new().await?, coordinator_env).await?;
        for index in 0..workers {
            factory.start_worker(&format!("worker-{index}"), job_delay_ms)?;
        }
        Ok(factory)
    }

    /// A factory in `env` (set up by the caller: a delivery limit of its own), reaching every
    /// service directly, with no workers yet and a coordinator that runs with `coordinator_env`.
    pub async fn start_in(env: TestEnv, coordinator_env: &[(&str, &str)]) -> Result<Self> {
        let routes = env.direct_routes();
        let coordinator_env = coordinator_env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        Self::launch(env, &routes, &routes, 0, 0, coordinator_env).await
    }

    /// A factory whose coordinator and workers reach the services by the given routes.
    pub async fn start_routed(
        env: TestEnv,
        coordinator_routes: &Routes,
        worker_routes: &Routes,
        workers: usize,
        job_delay_ms: u64,
    ) -> Result<Self> {
        Self::launch(
            env,
            coordinator_routes,
            worker_routes,
            workers,
            job_delay_ms,
            Vec::new(),
        )
        .await
    }

    async fn launch(
        env: TestEnv,
        coordinator_routes: &Routes,
        worker_routes: &Routes,
        workers: usize,
        job_delay_ms: u64,
        coordinator_env: Vec<(String, String)>,
    ) -> Result<Self> {
        let coordinator_config = env.write_coordinator_config()?;
        let coordinator_service_config =
            env.write_coordinator_config_routed("coordinator-service.toml", coordinator_routes)?;
        let mut factory = Self {
            env,
            coordinator_config,
            coordinator_service_config,
            worker_routes: worker_routes.clone(),
            coordinator: None,
            workers: Vec::new(),
            worker_launches: Vec::new(),
            coordinator_env,
        };
        factory.start_coordinator()?;
        for index in 0..workers {
            factory.start_worker(&format!("worker-{index}"), job_delay_ms)?;
        }
        Ok(factory)
    }

    pub fn start_coordinator(&mut self) -> Result<()> {
        self.coordinator = Some(self.spawn_coordinator("coordinator")?);
        Ok(())
    }

    /// Starts another coordinator process named `name` with the coordinator's configuration and
    /// environment; the caller owns it (a standby, in the leadership tests).
    pub fn spawn_coordinator(&self, name: &str) -> Result<Process> {
        let config = self
            .coordinator_service_config
            .to_string_lossy()
            .to_string();
        let env: Vec<(&str, &str)> = self
            .coordinator_env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        Process::start(
            name,
            &binary("syncd-coordinator")?,
            &["--config", &config],
            self.env.dir.path(),
            &env,
        )
    }

    pub fn start_worker(&mut self, name: &str, job_delay_ms: u64) -> Result<()> {
        self.start_worker_with(name, job_delay_ms, &["generate", "score"], "")
    }

    /// Starts a worker of `kinds`, with `extra` configuration sections (the prompt stage's
    /// `[prompt.llm]`).
    pub fn start_worker_with(
        &mut self,
        name: &str,
        job_delay_ms: u64,
        kinds: &[&str],
        extra: &str,
    ) -> Result<()> {
        let launch = Launch {
            job_delay_ms,
            env: Vec::new(),
        };
        self.launch_worker(name, kinds, extra, launch)
    }

    /// Starts a worker of `kinds` with environment variables of its own (`SYNCD_...`
    /// overrides, the test worker's `SYNCD_TEST_FAMILIES`).
    pub fn start_worker_env(
        &mut self,
        name: &str,
        job_delay_ms: u64,
        kinds: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let launch = Launch {
            job_delay_ms,
            env: env
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        };
        self.launch_worker(name, kinds, "", launch)
    }

    fn launch_worker(
        &mut self,
        name: &str,
        kinds: &[&str],
        extra: &str,
        launch: Launch,
    ) -> Result<()> {
        let config =
            self.env
                .write_worker_config_routed(name, kinds, extra, &self.worker_routes)?;
        let process = Self::spawn_worker(&self.env, name, &config, &launch)?;
        self.workers.push(process);
        self.worker_launches.push(launch);
        Ok(())
    }

    fn spawn_worker(env: &TestEnv, name: &str, config: &Path, launch: &Launch) -> Result<Process> {
        let config = config.to_string_lossy().to_string();
        let delay = launch.job_delay_ms.to_string();
        let mut variables = vec![("SYNCD_TEST_JOB_DELAY_MS", delay.as_str())];
        variables.extend(
            launch
                .env
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        );
        Process::start(
            name,
            &binary("syncd-test-worker")?,
            &["--config", &config],
            env.dir.path(),
            &variables,
        )
    }

    /// SIGKILLs worker `index` and starts it again with the same configuration.
    pub fn kill_and_restart_worker(&mut self, index: usize) -> Result<()> {
        let worker = &mut self.workers[index];
        worker.kill()?;
        let name = worker.name.clone();
        let config = self.env.path(&format!("{name}.toml"));
        self.workers[index] =
            Self::spawn_worker(&self.env, &name, &config, &self.worker_launches[index])?;
        Ok(())
    }

    /// SIGKILLs the coordinator and starts it again.
    pub fn kill_and_restart_coordinator(&mut self) -> Result<()> {
        if let Some(coordinator) = &mut self.coordinator {
            coordinator.kill()?;
        }
        self.start_coordinator()
    }

    /// SIGTERMs the coordinator and waits up to `patience` for it to exit; an error if it does
    /// not. [`Factory::start_coordinator`] starts it again.
    pub fn stop_coordinator(&mut self, patience: Duration) -> Result<std::process::ExitStatus> {
        let coordinator = self
            .coordinator
            .as_mut()
            .context("no coordinator is running")?;
        let status = coordinator.terminate(patience)?;
        self.coordinator = None;
        Ok(status)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        cli(&self.coordinator_config, args)
    }

    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.cli(&all)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `syncd {}` output: {text}", args.join(" ")))
    }

    /// Writes a run of `objects` deformable objects with ready-made prompts and creates it.
    pub fn create_run(&self, name: &str, objects: usize) -> Result<Value> {
        self.create_run_with(name, objects, DEFAULT_RUN_SECTIONS)
    }

    /// [`Factory::create_run`] with the run file's `sections` after its generation and job
    /// settings (`[dataset]`, `[filter]`).
    pub fn create_run_with(&self, name: &str, objects: usize, sections: &str) -> Result<Value> {
        self.write_and_create_run(name, objects, sections, describe_object)
    }

    /// [`Factory::create_run_with`] with the description of object `index` of `category`
    /// (lower case) given by `describe`.
    pub fn create_run_described(
        &self,
        name: &str,
        objects: usize,
        sections: &str,
        describe: impl Fn(usize, &str) -> String,
    ) -> Result<Value> {
        self.write_and_create_run(name, objects, sections, describe)
    }

    fn write_and_create_run(
        &self,
        name: &str,
        objects: usize,
        sections: &str,
        describe: impl Fn(usize, &str) -> String,
    ) -> Result<Value> {
        let mut lines = Vec::new();
        for index in 0..objects {
            let category = CATEGORIES[index % CATEGORIES.len()];
            lines.push(serde_json::json!({
                "type": "deformable",
                "category": category,
                "description": describe(index, &category.to_lowercase()),
                "backgrounds": ["on a wooden table", "in a sunny garden", "on a snowy street", "next to a red chair"],
            }).to_string());
        }
        self.env.write("objects.jsonl", &lines.join("\n"))?;
        let run = format!(
            "name = \"{name}\"\nseed = 7\n[input]\nobjects_file = \"objects.jsonl\"\n\
             [generation.deformable]\nresolution = 64\nsteps = 2\nguidance = 3.5\n\
             [jobs]\nmax_attempts = 3\nbackoff_base_secs = 0.2\n{sections}"
        );
        let path = self.env.write("run.toml", &run)?;
        self.cli_json(&["run", "create", &path.to_string_lossy()])
    }

    pub async fn wait_until_completed(&self, name: &str, timeout: Duration) -> Result<Value> {
        wait_for(&format!("run {name} to complete"), timeout, || async {
            let status = self.cli_json(&["run", "status", name])?;
            Ok((status["state"] == "completed").then_some(status))
        })
        .await
        .with_context(|| self.logs())
    }

    /// Waits until `syncd dead-letters` lists at least one dead letter; returns the list.
    pub async fn wait_for_dead_letters(&self) -> Result<Value> {
        wait_for(
            "a dead letter in the CLI",
            Duration::from_secs(30),
            || async {
                let letters = self.cli_json(&["dead-letters"])?;
                Ok((letters
                    .as_array()
                    .is_some_and(|letters| !letters.is_empty()))
                .then_some(letters))
            },
        )
        .await
    }

    pub fn logs(&self) -> String {
        let mut text = String::new();
        for process in self.coordinator.iter().chain(&self.workers) {
            let log = process.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            text.push_str(&format!("\n--- {} (last lines) ---\n", process.name));
            text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        text
    }

    /// Waits until at least `count` jobs have succeeded.
    pub async fn wait_for_succeeded_jobs(&self, count: i64, timeout: Duration) -> Result<()> {
        let pool = self.env.pool().await?;
        wait_for(&format!("{count} succeeded jobs"), timeout, || async {
            let (done,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
                    .fetch_one(&pool)
                    .await?;
            Ok((done >= count).then_some(()))
        })
        .await
    }

    /// The whole log of every process, by process name.
    pub fn full_logs(&self) -> Vec<(String, String)> {
        self.coordinator
            .iter()
            .chain(&self.workers)
            .map(|process| (process.name.clone(), process.log_text()))
            .collect()
    }

    /// Stops every process, checks that the run tallies counted every change the test made
    /// (see [`assert_tallies_match`]) and deletes the test's queues; the database stays for
    /// inspection.
    pub async fn finish(mut self) -> Result<()> {
        self.stop_processes()?;
        let pool = self.env.pool().await?;
        assert_tallies_match(&pool).await?;
        pool.close().await;
        self.env.cleanup().await
    }

    /// [`Factory::finish`], and drops the database too: a benchmark's holds every job's history
    /// (gigabytes at 100K objects) and is read before this.
    pub async fn finish_and_drop_database(mut self) -> Result<()> {
        self.stop_processes()?;
        self.env.cleanup().await?;
        self.env.drop_database().await
    }

    fn stop_processes(&mut self) -> Result<()> {
        for worker in &mut self.workers {
            worker.terminate(Duration::from_secs(20))?;
        }
        if let Some(coordinator) = &mut self.coordinator {
            let status = coordinator.terminate(Duration::from_secs(20))?;
            assert!(status.success(), "coordinator exited with {status}");
        }
        Ok(())
    }
}

/// Counts rows per value of one column.
pub async fn counts(pool: &sqlx::PgPool, sql: &str) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

pub fn json_counts(value: &Value) -> BTreeMap<String, i64> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(key, count)| (key.clone(), count.as_i64().unwrap_or(-1)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every job succeeded exactly once: one `succeeded` event per job, and nothing left in flight.
pub async fn assert_exactly_once(pool: &sqlx::PgPool) -> Result<()> {
    let duplicates: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM job_events WHERE to_state = 'succeeded' AND from_state <> 'succeeded'
         GROUP BY job_id HAVING count(*) <> 1",
    )
    .fetch_all(pool)
    .await?;
    assert!(
        duplicates.is_empty(),
        "jobs that succeeded more than once: {duplicates:?}"
    );
    let unfinished: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT kind, state, last_error FROM jobs WHERE state <> 'succeeded'")
            .fetch_all(pool)
            .await?;
    assert!(unfinished.is_empty(), "every job succeeds: {unfinished:?}");
    let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?;
    assert_eq!(outbox, 0, "the outbox is drained");
    Ok(())
}

/// The run tallies the gauges read, once their pending changes are folded, equal the jobs and
/// groups counted row by row: the tables' triggers counted every change, whichever statement
/// made it.
pub async fn assert_tallies_match(pool: &sqlx::PgPool) -> Result<()> {
    syncd_coordinator::db::run_tallies::fold(pool).await?;
    let tallied: Vec<(uuid::Uuid, String, String, i64)> =
        sqlx::query_as("SELECT run_id, subject, state, count FROM run_tallies WHERE count <> 0")
            .fetch_all(pool)
            .await?;
    let counted: Vec<(uuid::Uuid, String, String, i64)> = sqlx::query_as(
        "SELECT run_id, route, state, count(*) FROM jobs GROUP BY run_id, route, state
         UNION ALL
         SELECT run_id, $1, decision, count(*) FROM groups GROUP BY run_id, decision",
    )
    .bind(syncd_coordinator::db::run_tallies::GROUPS)
    .fetch_all(pool)
    .await?;
    let sorted = |mut rows: Vec<_>| {
        rows.sort();
        rows
    };
    assert_eq!(
        sorted(tallied),
        sorted(counted),
        "run tallies against the rows"
    );
    Ok(())
}

/// Every member of the shards a dataset index lists, name and bytes, in shard order.
pub async fn dataset_members(env: &TestEnv, index: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    let storage = env.dataset_storage();
    let mut members = Vec::new();
    for shard in index["shards"].as_array().context("shards")? {
        let bytes = storage
            .get(shard["key"].as_str().context("shard key")?)
            .await?;
        let mut archive = tar::Archive::new(bytes.as_ref());
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().to_string();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content)?;
            members.push((name, content));
        }
    }
    Ok(members)
}

/// The records of the accepted groups in the run's dataset shards, by group key.
pub async fn dataset_records(env: &TestEnv, run_name: &str) -> Result<BTreeMap<String, Value>> {
    let index: Value = serde_json::from_slice(
        &env.dataset_storage()
            .get(&format!("datasets/{run_name}/index.json"))
            .await?,
    )?;
    let mut records = BTreeMap::new();
    for (name, content) in dataset_members(env, &index).await? {
        if let Some(key) = name.strip_suffix(".json") {
            records.insert(key.to_string(), serde_json::from_slice(&content)?);
        }
    }
    Ok(records)
}

/// Downloads every file of the run's dataset folder (`datasets/{run_name}/`) into `dir`, as a
/// user copies it to read it locally.
pub async fn download_dataset(env: &TestEnv, run_name: &str, dir: &Path) -> Result<()> {
    let storage = env.dataset_storage();
    std::fs::create_dir_all(dir)?;
    for key in storage.list(&format!("datasets/{run_name}/")).await? {
        let name = key.rsplit('/').next().context("a key with a name")?;
        storage.get_file(&key, &dir.join(name)).await?;
    }
    Ok(())
}

/// The `[prompt]` sections of a worker that asks the LLM at `base_url` (one request at a time),
/// with `extra` settings of `[prompt.llm]`.
pub fn llm_section(base_url: &str, extra: &str) -> String {
    format!(
        "[prompt]\nconcurrency = 1\n[prompt.llm]\nbase_url = \"{base_url}\"\nmodel = \"llama\"\n{extra}"
    )
}
