//! Workers in a Slurm allocation, on a real single-node Slurm cluster (`scripts/slurm-cluster.sh`
//! starts munged, slurmctld and slurmd on this machine's loopback for this test).
//!
//! `deploy/slurm/syncd-workers.sbatch` is submitted with `sbatch` and starts two real
//! `syncd-worker`s on the CPU with the demo's tiny models (`deploy/demo/worker.toml`, pointed at
//! this test's queues and bucket through the env file). The demo run completes through them and
//! its dataset is written. Then the allocation is cancelled while a worker holds a generation
//! job: Slurm sends SIGTERM, the worker's grace runs out before the job does, it hands the job
//! back and exits before KillWait's SIGKILL; a second allocation of the same script redoes the
//! job, and the run completes with no job failed and no attempt spent. Last, a worker whose
//! device keeps failing exits with status 3 and the script restarts it, a bounded number of
//! times.
//!
//! Without Slurm (not installed, not root) the test fails when `CI=true` and is skipped, saying
//! why, otherwise.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use syncd_tests::env::TestEnv;
use syncd_tests::factory::assert_exactly_once;
use syncd_tests::processes::{binary, cli, wait_for, Process};
use syncd_tests::shipped::{
    converted_aesthetic_head, create_cat_run, repository, start_coordinator,
};

/// The workers' shutdown grace: shorter than the preempted generation job, so that the worker
/// holding it must hand it back, and far inside the cluster's KillWait (30 s).
const GRACE_SECS: u64 = 1;
/// What `scripts/slurm-cluster.sh` configures.
const KILL_WAIT_SECS: u64 = 30;

/// `assert_eq!` that returns an error, so that a failure carries the logs.
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {
        ensure_eq!($left, $right, "")
    };
    ($left:expr, $right:expr, $($message:tt)+) => {{
        let (left, right) = (&$left, &$right);
        ensure!(
            left == right,
            "{} != {}: {left:?} != {right:?} {}",
            stringify!($left),
            stringify!($right),
            format!($($message)+)
        );
    }};
}

/// A row of a job's history: from state (none when created), to state, worker, detail.
type Event = (Option<String>, String, Option<String>, Option<String>);

/// The single-node cluster, stopped again when dropped if this test started it.
struct Cluster {
    /// `SLURM_CONF` for the Slurm commands.
    conf: String,
    started_here: bool,
}

impl Cluster {
    /// Starts the cluster, or says why it cannot be.
    fn start() -> std::result::Result<Self, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|error| format!("running id -u: {error}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err(
                "not root: the cluster's daemons need root (scripts/slurm-cluster.sh)".into(),
            );
        }
        let script = |command: &str| {
            Command::new(repository().join("scripts/slurm-cluster.sh"))
                .arg(command)
                .output()
                .map_err(|error| format!("running scripts/slurm-cluster.sh {command}: {error}"))
        };
        let running = script("status")?.status.success();
        let started = script("start")?;
        if !started.status.success() {
            if !running {
                // Whatever did start (munged, say) is stopped again.
                let _ = script("stop");
            }
            return Err(format!(
                "scripts/slurm-cluster.sh start failed (scripts/setup.sh installs slurm-wlm and \
                 munge):\n{}{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr)
            ));
        }
        let env = script("env")?;
        let conf = String::from_utf8_lossy(&env.stdout)
            .trim()
            .strip_prefix("export SLURM_CONF=")
            .ok_or("scripts/slurm-cluster.sh env printed no SLURM_CONF")?
            .to_string();
        Ok(Self {
            conf,
            started_here: !running,
        })
    }

    /// Runs a Slurm command against this cluster; its stdout, or an error with its stderr.
    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Submits the worker script with `env_file`; the job is cancelled when the handle drops.
    fn submit(&self, env: &TestEnv, env_file: &Path) -> Result<BatchJob> {
        let output = env.path("slurm-%j.out");
        let id = self
            .run(
                "sbatch",
                &[
                    "--parsable",
                    "--job-name=syncd-test-workers",
                    // The whole node: its CPUs are shared out among the workers.
                    "--nodes=1",
                    "--exclusive",
                    // A bound, should the test die without cancelling it.
                    "--time=20",
                    &format!("--output={}", output.display()),
                    &repository()
                        .join("deploy/slurm/syncd-workers.sbatch")
                        .to_string_lossy(),
                    &env_file.to_string_lossy(),
                ],
            )?
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id: {id:?}");
        }
        Ok(BatchJob {
            id,
            conf: self.conf.clone(),
        })
    }

    /// The job's state while Slurm lists it (`PENDING`, `RUNNING`, `COMPLETING`), `None` after.
    fn state(&self, job: &BatchJob) -> Result<Option<String>> {
        match self.run("squeue", &["-h", "-j", &job.id, "-o", "%T"]) {
            Ok(state) => {
                let state = state.trim().to_string();
                Ok((!state.is_empty()).then_some(state))
            }
            // Forgotten by the controller: long over.
            Err(error) if format!("{error}").contains("Invalid job id") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// What `scontrol show job` says of the job once it has ended (state and exit code).
    fn final_state(&self, job: &BatchJob) -> Result<(String, String)> {
        let text = self.run("scontrol", &["show", "job", &job.id])?;
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|word| word.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_string()
        };
        Ok((field("JobState"), field("ExitCode")))
    }

    async fn wait_running(&self, job: &BatchJob) -> Result<()> {
        wait_for(
            &format!("Slurm job {} to run", job.id),
            Duration::from_secs(60),
            || async {
                match self.state(job)?.as_deref() {
                    Some("RUNNING") => Ok(Some(())),
                    Some("PENDING" | "CONFIGURING") => Ok(None),
                    other => bail!("Slurm job {} is {other:?}, not running", job.id),
                }
            },
        )
        .await
    }

    async fn wait_ended(&self, job: &BatchJob, timeout: Duration) -> Result<()> {
        wait_for(&format!("Slurm job {} to end", job.id), timeout, || async {
            Ok(self.state(job)?.is_none().then_some(()))
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started_here {
            let _ = Command::new(repository().join("scripts/slurm-cluster.sh"))
                .arg("stop")
                .status();
        }
    }
}

/// A submitted batch job, cancelled when dropped (a no-op once it has ended).
struct BatchJob {
    id: String,
    conf: String,
}

impl BatchJob {
    /// The names `syncd-workers.sbatch` gives this job's workers start with `{host}-job{id}-`.
    fn owns(&self, worker: &str) -> bool {
        worker.contains(&format!("-job{}-task", self.id))
    }
}

impl Drop for BatchJob {
    fn drop(&mut self) {
        let _ = Command::new("scancel")
            .arg(&self.id)
            .env("SLURM_CONF", &self.conf)
            .output();
    }
}

/// Fails in CI, skips otherwise.
fn unavailable(reason: &str) -> Result<()> {
    if std::env::var("CI").is_ok_and(|value| value == "true" || value == "1") {
        bail!("Slurm is unavailable, and CI requires this test: {reason}");
    }
    eprintln!("SKIPPED: the Slurm test needs a Slurm cluster: {reason}");
    Ok(())
}

/// An env file for the worker script: `KEY='value'` lines.
fn env_file(entries: &[(String, String)]) -> String {
    entries
        .iter()
        .map(|(key, value)| format!("{key}='{}'\n", value.replace('\'', r"'\''")))
        .collect()
}

/// The coordinator's log, the batch jobs' outputs and the workers' logs, for a failure message.
fn logs(env: &TestEnv) -> String {
    let mut files: Vec<PathBuf> = Vec::new();
    for folder in [env.dir.path().to_path_buf(), env.path("workers")] {
        if let Ok(entries) = std::fs::read_dir(&folder) {
            files.extend(entries.flatten().map(|entry| entry.path()).filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "log" || extension == "out")
            }));
        }
    }
    files.sort();
    let mut text = String::new();
    for file in files {
        let content = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = content.lines().collect();
        let tail = &lines[lines.len().saturating_sub(150)..];
        text.push_str(&format!(
            "\n==== {} (last {} lines) ====\n{}\n",
            file.display(),
            tail.len(),
            tail.join("\n")
        ));
    }
    text
}

/// Waits for a run to complete, failing early if the coordinator exits or the batch job ends.
async fn wait_completed(
    cluster: &Cluster,
    job: &BatchJob,
    coordinator: &mut Process,
    coordinator_config: &Path,
    run: &str,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if !coordinator.is_running() {
            bail!("the coordinator exited");
        }
        if cluster.state(job)?.is_none() {
            bail!(
                "Slurm job {} ended before run {run} completed: {:?}",
                job.id,
                cluster.final_state(job)
            );
        }
        let status: Value =
            serde_json::from_str(&cli(coordinator_config, &["run", "status", run, "--json"])?)?;
        if status["state"] == "completed" {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("run {run} did not complete in {timeout:?}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The run file's body of a run of one deformable object whose generation job takes long enough
/// on the CPU to be cancelled while it runs.
const LONG_RUN: &str = "[generation.deformable]\nresolution = 512\nsteps = 40\nguidance = 3.5\n\
     [filter]\nmin_aesthetic = -1000.0\nmin_similarity = -1.0\nmax_similarity = 0.9999\n\
     min_valid_images = 2\n";

#[tokio::test(flavor = "multi_thread")]
async fn workers_in_a_slurm_allocation_complete_a_run_and_hand_jobs_back_when_cancelled(
) -> Result<()> {
    let cluster = match Cluster::start() {
        Ok(cluster) => cluster,
        Err(reason) => return unavailable(&reason),
    };
    let env = TestEnv::new().await?;
    let outcome = scenario(&cluster, &env).await;
    match outcome {
        Ok(()) => env.cleanup().await,
        Err(error) => {
            let logs = logs(&env);
            // Kept for a closer look.
            let dir = env.dir.keep();
            Err(error.context(format!(
                "the Slurm test failed; its folder {} is kept. Logs:{logs}",
                dir.display()
            )))
        }
    }
}

async fn scenario(cluster: &Cluster, env: &TestEnv) -> Result<()> {
    let started = Instant::now();
    let coordinator_config = env.write_coordinator_config()?;
    let worker_binary = binary("syncd-worker")?;
    let head = converted_aesthetic_head(env)?;
    let mut coordinator = start_coordinator(env, &coordinator_config)?;

    // The env file: the demo's worker configuration, run from the checkout as scripts/demo.sh
    // runs it, with this test's connections, queues and bucket, as real_worker.rs passes them
    // (the script names each worker itself).
    let mut entries: Vec<(String, String)> = env
        .worker_connection_env("unused")
        .into_iter()
        .filter(|(key, _)| key != "SYNCD_WORKER__NAME")
        .collect();
    let workers_dir = env.path("workers");
    entries.extend(
        [
            (
                "SYNCD_SCORING__AESTHETIC_HEAD",
                head.to_string_lossy().to_string(),
            ),
            (
                "SYNCD_CONFIG",
                repository()
                    .join("deploy/demo/worker.toml")
                    .to_string_lossy()
                    .to_string(),
            ),
            (
                "SYNCD_WORKER_BIN",
                worker_binary.to_string_lossy().to_string(),
            ),
            ("SYNCD_WORKDIR", repository().to_string_lossy().to_string()),
            ("SYNCD_CPU_WORKERS_PER_NODE", "2".to_string()),
            (
                "SYNCD_WORKER_LOG_DIR",
                workers_dir.to_string_lossy().to_string(),
            ),
            ("SYNCD_WORKER__SHUTDOWN_GRACE_SECS", GRACE_SECS.to_string()),
            ("RUST_LOG", "info,lapin=warn,sqlx=warn,aws=warn".to_string()),
            ("NO_COLOR", "1".to_string()),
            // libtorch, as scripts/env.sh finds it.
            (
                "LD_LIBRARY_PATH",
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
            ),
        ]
        .map(|(key, value)| (key.to_string(), value)),
    );
    let workers_env = env.write("workers.env", &env_file(&entries))?;
    let pool = env.pool().await?;

    // 1. The demo run, through two workers in one allocation.
    let first = cluster.submit(env, &workers_env)?;
    cluster.wait_running(&first).await?;
    let run_file = repository().join("deploy/demo/run.toml");
    cli(
        &coordinator_config,
        &["run", "create", &run_file.to_string_lossy(), "--json"],
    )?;
    let status = wait_completed(
        cluster,
        &first,
        &mut coordinator,
        &coordinator_config,
        "demo",
        Duration::from_secs(300),
    )
    .await?;
    ensure_eq!(status["groups"]["accepted"].as_i64(), Some(5), "{status}");
    let index: Value = serde_json::from_slice(
        &env.storage()
            .get("datasets/demo/index.json")
            .await
            .context("the demo dataset's index")?,
    )?;
    ensure_eq!(index["samples"].as_i64(), Some(5), "{index}");
    // Every job ran on the allocation's workers, named after the job, the task and the host.
    let workers: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT worker FROM jobs WHERE worker IS NOT NULL")
            .fetch_all(&pool)
            .await?;
    ensure!(!workers.is_empty());
    for (worker,) in &workers {
        ensure!(
            first.owns(worker),
            "job run by {worker}, not by Slurm job {}",
            first.id
        );
    }
    let output = std::fs::read_to_string(env.path(&format!("slurm-{}.out", first.id)))?;
    ensure!(
        output.contains(&format!(
            "2 worker(s), 2 per node on 1 node(s), device cpu, grace {GRACE_SECS} s, KillWait {KILL_WAIT_SECS} s"
        )),
        "{output}"
    );
    eprintln!(
        "[{:>5.1} s] the demo run completed through Slurm job {} ({} worker(s) took jobs)",
        started.elapsed().as_secs_f64(),
        first.id,
        workers.len()
    );

    // 2. Cancelled while a worker holds a job: the job is handed back, not failed.
    create_cat_run(env, &coordinator_config, "preempted", LONG_RUN)?;
    let (job_id, holder): (uuid::Uuid, String) = wait_for(
        "the preempted run's generation job to run",
        Duration::from_secs(120),
        || async {
            Ok(sqlx::query_as(
                "SELECT j.id, j.worker FROM jobs j JOIN runs r ON r.id = j.run_id
                 WHERE r.name = 'preempted' AND j.kind = 'generate' AND j.state = 'running'
                   AND j.worker IS NOT NULL",
            )
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await?;
    ensure!(first.owns(&holder), "{holder}");
    // Plain scancel: SIGTERM to every process of the job, SIGKILL after KillWait.
    let cancelled = Instant::now();
    cluster.run("scancel", &[&first.id])?;
    cluster
        .wait_ended(&first, Duration::from_secs(KILL_WAIT_SECS + 30))
        .await?;
    let stopped_in = cancelled.elapsed();
    let output = std::fs::read_to_string(env.path(&format!("slurm-{}.out", first.id)))?;
    // Both workers stopped by themselves (status 0), not by SIGKILL, inside KillWait.
    for task in 0..2 {
        let stopped = format!("-job{}-task{task}: stopped (exit status 0)", first.id);
        ensure!(output.contains(&stopped), "no '{stopped}' in:\n{output}");
    }
    ensure!(
        stopped_in < Duration::from_secs(KILL_WAIT_SECS),
        "the workers took {stopped_in:?} to stop"
    );
    let holder_log = std::fs::read_to_string(workers_dir.join(format!("{holder}.log")))?;
    ensure!(
        holder_log.contains("handing the job back"),
        "{holder} did not hand its job back:\n{holder_log}"
    );
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&pool)
            .await?;
    ensure!(
        state != "failed" && state != "dead_lettered",
        "the handed-back job is {state}"
    );
    eprintln!(
        "[{:>5.1} s] Slurm job {} cancelled while {holder} ran a generation job: the workers \
         stopped in {:.1} s, the job was handed back ({state}, attempt {attempts})",
        started.elapsed().as_secs_f64(),
        first.id,
        stopped_in.as_secs_f64()
    );

    // The same script, submitted again, redoes the job; the run completes.
    let second = cluster.submit(env, &workers_env)?;
    cluster.wait_running(&second).await?;
    wait_completed(
        cluster,
        &second,
        &mut coordinator,
        &coordinator_config,
        "preempted",
        Duration::from_secs(300),
    )
    .await?;
    let failed: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE state IN ('failed', 'dead_lettered')")
            .fetch_all(&pool)
            .await?;
    ensure!(failed.is_empty(), "jobs failed: {failed:?}");
    let (final_attempts,): (i32,) = sqlx::query_as("SELECT attempts FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&pool)
        .await?;
    ensure_eq!(
        final_attempts,
        attempts,
        "handing a job back spends no attempt"
    );
    let history: Vec<Event> = sqlx::query_as(
        "SELECT from_state, to_state, worker, detail FROM job_events WHERE job_id = $1 ORDER BY id",
    )
    .bind(job_id)
    .fetch_all(&pool)
    .await?;
    // A stopping worker takes no job: not even the one it has just handed back.
    let taken_by_holder = history
        .iter()
        .filter(|(_, to, worker, _)| to == "running" && worker.as_deref() == Some(&holder))
        .count();
    ensure!(
        taken_by_holder == 1,
        "{holder} took the job again after SIGTERM ({taken_by_holder} starts): {history:?}"
    );
    ensure!(
        history.iter().any(|(_, _, worker, detail)| {
            detail.as_deref() == Some("redelivered to another worker")
                && worker.as_deref().is_some_and(|worker| second.owns(worker))
        }),
        "the handed-back job was not redelivered to the second allocation: {history:?}"
    );
    ensure!(
        history.iter().any(|(_, to, worker, _)| to == "succeeded"
            && worker.as_deref().is_some_and(|worker| second.owns(worker))),
        "{history:?}"
    );
    assert_exactly_once(&pool).await?;
    eprintln!(
        "[{:>5.1} s] Slurm job {} redid the handed-back job; the run completed, no job failed",
        started.elapsed().as_secs_f64(),
        second.id
    );
    cluster.run("scancel", &[&second.id])?;
    cluster
        .wait_ended(&second, Duration::from_secs(KILL_WAIT_SECS + 30))
        .await?;

    // 3. A worker whose device keeps failing exits with status 3; the script restarts it, once
    // here, then gives up and the job fails with that status. The device failure is a real one:
    // libtorch cannot allocate the noise of a 1048576-pixel square group.
    let mut failing = entries.clone();
    failing.retain(|(key, _)| key != "SYNCD_CPU_WORKERS_PER_NODE");
    failing.extend(
        [
            ("SYNCD_CPU_WORKERS_PER_NODE", "1"),
            ("SYNCD_WORKER__DEVICE_FAILURE_LIMIT", "1"),
            ("SYNCD_WORKER_RESTARTS", "1"),
            ("SYNCD_WORKER_RESTART_DELAY", "1"),
        ]
        .map(|(key, value)| (key.to_string(), value.to_string())),
    );
    let failing_env = env.write("failing.env", &env_file(&failing))?;
    env.write(
        "device-failure.jsonl",
        &serde_json::json!({
            "type": "deformable", "category": "Dog", "description": "a small brown dog",
            "backgrounds": ["on a beach", "in a park", "on a sofa"],
        })
        .to_string(),
    )?;
    let failing_run = env.write(
        "device-failure.toml",
        "name = \"device-failure\"\nseed = 9\n[input]\nobjects_file = \"device-failure.jsonl\"\n\
         [generation.deformable]\nresolution = 1048576\nsteps = 2\nguidance = 3.5\n\
         [jobs]\nmax_attempts = 5\nbackoff_base_secs = 0.2\n",
    )?;
    cli(
        &coordinator_config,
        &["run", "create", &failing_run.to_string_lossy()],
    )?;
    let third = cluster.submit(env, &failing_env)?;
    cluster.wait_ended(&third, Duration::from_secs(180)).await?;
    let output = std::fs::read_to_string(env.path(&format!("slurm-{}.out", third.id)))?;
    let name = format!("-job{}-task0", third.id);
    for line in [
        format!("{name}: exited with status 3 (device failing); restart 1 of 1 in 1 s"),
        format!("{name}: exited with status 3 (device failing) after 1 restart(s); giving up"),
        "all workers ended (exit status 3)".to_string(),
    ] {
        ensure!(output.contains(&line), "no '{line}' in:\n{output}");
    }
    let (job_state, exit_code) = cluster.final_state(&third)?;
    ensure_eq!((job_state.as_str(), exit_code.as_str()), ("FAILED", "3:0"));
    // Each run of the worker failed one attempt of the job, which waits for another worker.
    let (state, failures): (String, i64) = sqlx::query_as(
        "SELECT j.state, (SELECT count(*) FROM job_events e
                          WHERE e.job_id = j.id AND e.from_state = 'running'
                            AND e.to_state = 'retry_wait')
         FROM jobs j JOIN runs r ON r.id = j.run_id
         WHERE r.name = 'device-failure' AND j.kind = 'generate'",
    )
    .fetch_one(&pool)
    .await?;
    ensure_eq!(failures, 2, "{state}");
    ensure!(state == "retry_wait" || state == "queued", "{state}");
    eprintln!(
        "[{:>5.1} s] Slurm job {}: the worker exited with status 3, was restarted once, then \
         the job failed with status 3",
        started.elapsed().as_secs_f64(),
        third.id
    );

    let exit = coordinator.terminate(Duration::from_secs(20))?;
    ensure!(exit.success(), "coordinator exited with {exit}");
    Ok(())
}
