//! The demonstration run (`deploy/demo/run.toml`: four deformable objects and one rigid asset)
//! through the shipped `syncd-worker` binary with every model real: the 3D prior, FLUX.1-dev and
//! Depth-dev with Masked Shared Attention (tiny random weights from the parity fixtures), and the
//! DINOv2 / CLIP / aesthetic scorers (tiny random weights too). Against the real PostgreSQL,
//! RabbitMQ and S3 store of this machine, like `factory.rs`.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use syncd_tests::env::TestEnv;
use syncd_tests::processes::{cli, free_address, http_get, wait_for, Process};
use syncd_tests::shipped::{
    converted_aesthetic_head, create_cat_run, repository, start_coordinator, start_worker,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_run_completes_with_the_real_worker_and_models() -> Result<()> {
    let env = TestEnv::new().await?;
    let coordinator_config = env.write_coordinator_config()?;
    let head = converted_aesthetic_head(&env)?;
    // The demo's own worker configuration, run from the checkout as scripts/demo.sh runs it,
    // with this test's connections, queues and bucket.
    let mut coordinator = start_coordinator(&env, &coordinator_config)?;
    let mut worker = start_worker(
        &env,
        "real-worker",
        &repository().join("deploy/demo/worker.toml"),
        &[(
            "SYNCD_SCORING__AESTHETIC_HEAD".into(),
            head.to_string_lossy().to_string(),
        )],
    )?;

    let run_file = repository().join("deploy/demo/run.toml");
    let created: Value = serde_json::from_str(&cli(
        &coordinator_config,
        &["run", "create", &run_file.to_string_lossy(), "--json"],
    )?)?;
    let run_id = created["id"].as_str().context("run id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        let exited = !worker.is_running() || !coordinator.is_running();
        let logs = || format!("{}\n{}", coordinator.log_text(), worker.log_text());
        if exited {
            anyhow::bail!("a process of the factory exited:\n{}", logs());
        }
        let status: Value = serde_json::from_str(&cli(
            &coordinator_config,
            &["run", "status", "demo", "--json"],
        )?)?;
        if status["state"] == "completed" {
            break status;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the demo run did not complete in 600 s: {status}\n{}",
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let pool = env.pool().await?;
    let objects: Vec<(String, String)> =
        sqlx::query_as("SELECT spec->>'type', state FROM objects ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    assert_eq!(objects.len(), 5, "{objects:?}");
    assert!(
        objects.iter().all(|(_, state)| state == "done"),
        "{objects:?}"
    );
    assert_eq!(
        objects.iter().filter(|(kind, _)| kind == "rigid").count(),
        1
    );
    // The permissive demo filter keeps every group: all five are in the dataset.
    assert_eq!(status["groups"]["accepted"].as_i64(), Some(5), "{status}");

    // Every image and mask is a 64x64 PNG; the rigid group's masks are its render masks, so the
    // object covers part of each image and not all of it.
    let storage = env.storage();
    let groups: Vec<(Value, Value, String)> = sqlx::query_as(
        "SELECT g.image_keys, g.mask_keys, o.spec->>'type'
         FROM groups g JOIN objects o ON o.id = g.object_id",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(groups.len(), 5);
    for (image_keys, mask_keys, kind) in &groups {
        let image_keys = image_keys.as_array().context("image keys")?;
        assert_eq!(image_keys.len(), 3);
        for key in image_keys {
            let key = key.as_str().context("key")?;
            assert!(key.starts_with(&format!("runs/{run_id}/groups/")), "{key}");
            let image = image::load_from_memory(&storage.get(key).await?)?;
            assert_eq!((image.width(), image.height()), (64, 64));
        }
        for key in mask_keys.as_array().context("mask keys")? {
            let mask = image::load_from_memory(&storage.get(key.as_str().context("key")?).await?)?
                .to_luma8();
            let foreground = mask.pixels().filter(|pixel| pixel.0[0] == 255).count();
            if kind == "rigid" {
                assert!(
                    foreground > 0 && foreground < 64 * 64,
                    "rigid mask covers {foreground} pixels"
                );
            }
        }
    }
    let index: Value = serde_json::from_slice(&storage.get("datasets/demo/index.json").await?)?;
    assert_eq!(index["samples"].as_i64(), Some(5));

    worker.terminate(Duration::from_secs(20))?;
    let exit = coordinator.terminate(Duration::from_secs(20))?;
    assert!(exit.success(), "coordinator exited with {exit}");
    env.cleanup().await
}

/// Creates a run of one deformable object at `resolution`, through the CLI.
fn create_run(
    env: &TestEnv,
    coordinator_config: &Path,
    name: &str,
    resolution: u32,
    max_attempts: u32,
) -> Result<()> {
    let body = format!(
        "[generation.deformable]\nresolution = {resolution}\nsteps = 2\nguidance = 3.5\n\
         [jobs]\nmax_attempts = {max_attempts}\nbackoff_base_secs = 0.2\n"
    );
    create_cat_run(env, coordinator_config, name, &body)
}

/// The state, attempts and last error of a run's generation job, once it is in `states`.
async fn generation_job(
    pool: &sqlx::PgPool,
    run: &str,
    states: &[&str],
) -> Result<(String, i32, Option<String>)> {
    let states: Vec<String> = states.iter().map(|state| state.to_string()).collect();
    wait_for(
        &format!("run {run}'s generation job in {states:?}"),
        Duration::from_secs(180),
        || async {
            Ok(sqlx::query_as(
                "SELECT j.state, j.attempts, j.last_error FROM jobs j JOIN runs r ON r.id = j.run_id
                 WHERE r.name = $1 AND j.kind = 'generate' AND j.state = ANY($2)",
            )
            .bind(run)
            .bind(&states)
            .fetch_optional(pool)
            .await?)
        },
    )
    .await
}

/// A real libtorch failure on the CPU: a group at 1048576x1048576 pixels, whose initial noise
/// alone is 3.3 TB, more than any machine can allocate. libtorch's out-of-memory error fails the
/// attempt (transient), the worker goes on with the next job, and when its device fails
/// `device_failure_limit` jobs in a row it stops with status 3, for its supervisor to restart it,
/// leaving the job to be retried rather than failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_failure_costs_an_attempt_and_a_device_that_keeps_failing_stops_the_worker(
) -> Result<()> {
    let env = TestEnv::new().await?;
    let coordinator_config = env.write_coordinator_config()?;
    let listen = free_address()?;
    let worker_config = env.write(
        "device-worker.toml",
        &format!(
            "[worker]\nkinds = [\"generate\"]\ndevice = \"cpu\"\ndtype = \"fp32\"\n\
             shutdown_grace_secs = 10\ndevice_failure_limit = 2\n\
             [broker]\nqueue_prefix = \"unused\"\n[storage]\nbucket = \"unused\"\n\
             [models]\nflux_dev = \"{flux}\"\n[metrics]\nlisten = \"{listen}\"\n",
            flux = repository()
                .join("worker/tests/fixtures/tiny-flux-pipeline")
                .display()
        ),
    )?;
    let mut coordinator = start_coordinator(&env, &coordinator_config)?;
    let mut worker = start_worker(&env, "device-worker", &worker_config, &[])?;
    let logs = |worker: &Process, coordinator: &Process| {
        format!("{}\n{}", coordinator.log_text(), worker.log_text())
    };
    // Ready (models loaded, taking jobs) and healthy, on the probes' endpoints.
    wait_for(
        "the worker to be ready",
        Duration::from_secs(120),
        || async {
            Ok(match http_get(&listen, "/readyz", None).await {
                Ok((200, _)) => Some(()),
                _ => None,
            })
        },
    )
    .await
    .with_context(|| logs(&worker, &coordinator))?;
    assert_eq!(http_get(&listen, "/healthz", None).await?.0, 200);

    let pool = env.pool().await?;
    let huge = 1 << 20;
    // One attempt allowed: the device failure fails the job, and the worker goes on.
    create_run(&env, &coordinator_config, "oom-once", huge, 1)?;
    let (_, attempts, error) = generation_job(&pool, "oom-once", &["failed"])
        .await
        .with_context(|| logs(&worker, &coordinator))?;
    assert_eq!(attempts, 1);
    let error = error.unwrap_or_default();
    assert!(error.contains("can't allocate memory"), "{error}");
    let pid = worker.pid();
    assert!(worker.is_running(), "{}", logs(&worker, &coordinator));

    // The same process makes an ordinary group next: nothing was poisoned.
    create_run(&env, &coordinator_config, "after-oom", 64, 1)?;
    generation_job(&pool, "after-oom", &["succeeded"])
        .await
        .with_context(|| logs(&worker, &coordinator))?;
    assert_eq!(worker.pid(), pid);

    // Two failures in a row: the worker stops with status 3, and the job waits for another.
    create_run(&env, &coordinator_config, "oom-again", huge, 5)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = worker.exit_status()? {
            break status;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the worker did not stop:\n{}", logs(&worker, &coordinator));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(status.code(), Some(3), "{}", logs(&worker, &coordinator));
    assert!(
        worker.log_text().contains("device_failure_limit"),
        "{}",
        worker.log_text()
    );
    // Two attempts spent, and the job back in the queue for a worker with a sound device.
    generation_job(&pool, "oom-again", &["retry_wait", "queued"]).await?;
    let (failed_attempts,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id JOIN runs r ON r.id = j.run_id
         WHERE r.name = 'oom-again' AND j.kind = 'generate' AND e.to_state = 'retry_wait'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(failed_attempts, 2);

    let exit = coordinator.terminate(Duration::from_secs(20))?;
    assert!(exit.success(), "coordinator exited with {exit}");
    env.cleanup().await
}
