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
use syncd_tests::factory::{dataset_records, download_dataset};
use syncd_tests::processes::{cli, cli_output, free_address, http_get, wait_for, Process};
use syncd_tests::python::run_script;
use syncd_tests::shipped::{
    converted_aesthetic_head, create_cat_run, repository, start_coordinator, start_worker,
};
use syncd_worker::identity::content_hash;

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

    check_lineage(&env, &head).await?;
    check_readers(&env, &coordinator_config).await?;
    check_regeneration(&env, &coordinator_config, &pool, &run_id).await?;

    worker.terminate(Duration::from_secs(20))?;
    let exit = coordinator.terminate(Duration::from_secs(20))?;
    assert!(exit.success(), "coordinator exited with {exit}");
    env.cleanup().await
}

/// Every dataset record carries its group's lineage: the demo run's generation settings, and the
/// worker, device, code and models (with their weights' hashes) that generated and scored it.
async fn check_lineage(env: &TestEnv, aesthetic_head: &Path) -> Result<()> {
    let records = dataset_records(env, "demo").await?;
    assert_eq!(records.len(), 5);
    let fixtures = repository().join("worker/tests/fixtures");
    let dev_hash = content_hash(&fixtures.join("tiny-flux-pipeline"))?;
    let depth_hash = content_hash(&fixtures.join("flux/tiny-depth"))?;
    // A single file's hash is the BLAKE3 of its bytes, computed here independently.
    let head_hash = format!(
        "blake3:{}",
        blake3::hash(&std::fs::read(aesthetic_head)?).to_hex()
    );
    for record in records.values() {
        let lineage = &record["lineage"];
        let generation = &lineage["generation"];
        assert_eq!(generation["width"], 64, "{lineage}");
        assert_eq!(generation["steps"], 4, "{lineage}");
        let generated_by = &lineage["generated_by"];
        assert_eq!(generated_by["worker"], "real-worker", "{lineage}");
        assert_eq!(generated_by["device"], "cpu");
        assert_eq!(generated_by["dtype"], "fp32");
        let code = generated_by["code_version"]
            .as_str()
            .context("code version")?;
        assert!(code.starts_with(env!("CARGO_PKG_VERSION")), "{code}");
        let models = |provenance: &Value| -> Vec<(String, String)> {
            provenance["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|model| {
                    (
                        model["name"].as_str().unwrap_or_default().to_string(),
                        model["content_hash"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        };
        assert_eq!(
            models(generated_by),
            vec![
                ("flux-dev".to_string(), dev_hash.clone()),
                ("flux-depth-dev".to_string(), depth_hash.clone()),
            ]
        );
        let scored_by = &lineage["scored_by"];
        assert!(
            models(scored_by).contains(&("aesthetic-mlp".to_string(), head_hash.clone())),
            "{scored_by}"
        );
        assert_eq!(models(scored_by).len(), 3, "{scored_by}");
        if record["object"]["type"] == "rigid" {
            assert_eq!(generation["guidance"], 10.0);
            assert_eq!(generation["true_cfg"]["scale"], 2.5, "{lineage}");
            assert!(generation["prior"]["views"].is_array(), "{lineage}");
        } else {
            assert!(generation["true_cfg"].is_null(), "{lineage}");
            assert!(!generation["subject_word"]
                .as_str()
                .unwrap_or_default()
                .is_empty());
        }
    }
    Ok(())
}

/// The demo's dataset as people take it away: `datasets` loads its Parquet files (by file and by
/// folder) with each record's lineage, `webdataset` its tar shards, and its export to the SynCD
/// layout reads with a reader that follows that layout.
async fn check_readers(env: &TestEnv, coordinator_config: &Path) -> Result<()> {
    let folder = env.path("demo-dataset");
    download_dataset(env, "demo", &folder).await?;
    let loaded = run_script(
        "load_dataset.py",
        &[
            folder.as_os_str(),
            "--cache-dir".as_ref(),
            env.path("hf-cache").as_os_str(),
        ],
    )?;
    for reader in ["parquet", "folder", "webdataset"] {
        let rows = loaded[reader].as_array().context("rows")?;
        assert_eq!(rows.len(), 5, "{reader}: {loaded}");
    }
    for row in loaded["parquet"].as_array().context("rows")? {
        assert_eq!(row["models"].as_array().map(Vec::len), Some(2), "{row}");
    }
    let out = env.path("demo-export");
    let out_text = out.to_string_lossy().to_string();
    cli(
        coordinator_config,
        &[
            "run", "export", "demo", "--format", "syncd", "--out", &out_text,
        ],
    )?;
    let read = run_script("syncd_layout_reader.py", &[out.as_os_str()])?;
    assert_eq!(read["metadata_files"], serde_json::json!(["metadata.json"]));
    assert_eq!(read["items"].as_array().map(Vec::len), Some(5), "{read}");
    Ok(())
}

/// `syncd group regenerate` on a finished run: the rigid group (depth control, true CFG, MSA and
/// warping) and a deformable one (attention masks) come out bit-identical on the same worker,
/// under their own prefix, and leave the group as it was; an image changed in S3 since is found.
async fn check_regeneration(
    env: &TestEnv,
    coordinator_config: &Path,
    pool: &sqlx::PgPool,
    run_id: &str,
) -> Result<()> {
    let groups: Vec<(uuid::Uuid, String, Value)> = sqlx::query_as(
        "SELECT g.id, o.spec->>'type', g.image_keys FROM groups g JOIN objects o ON o.id = g.object_id
         ORDER BY o.spec->>'type' DESC, o.ordinal",
    )
    .fetch_all(pool)
    .await?;
    let regenerate = |group: &str| -> Result<(bool, Value, String)> {
        let output = cli_output(
            coordinator_config,
            &["group", "regenerate", group, "--json", "--timeout", "300"],
        )?;
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let comparison = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("regenerate printed no comparison: {stderr}"))?;
        Ok((output.status.success(), comparison, stderr))
    };
    // The rigid group first, then the first deformable one.
    for (group, kind, image_keys) in &groups[..2] {
        let (success, comparison, stderr) = regenerate(&group.to_string())?;
        assert!(success, "{kind} group {group}: {comparison:#}\n{stderr}");
        assert_eq!(comparison["identical"], true, "{comparison:#}");
        assert_eq!(comparison["same_setup"], true, "{comparison:#}");
        let files = comparison["files"].as_array().context("files")?;
        assert_eq!(
            files.len(),
            6,
            "three images and three masks: {comparison:#}"
        );
        let prefix = format!("runs/{run_id}/groups/{group}/regenerations/1/attempt-1/");
        for file in files {
            assert_eq!(file["identical"], true, "{file}");
            let regenerated = file["regenerated"].as_str().context("key")?;
            assert!(regenerated.starts_with(&prefix), "{regenerated}");
        }
        let (now,): (Value,) = sqlx::query_as("SELECT image_keys FROM groups WHERE id = $1")
            .bind(group)
            .fetch_one(pool)
            .await?;
        assert_eq!(&now, image_keys, "the group keeps its own images");
    }

    // One value of one pixel of the rigid group's image 1, changed in S3: the next regeneration
    // (number 2) finds exactly that one value and exits 1.
    let (group, _, image_keys) = &groups[0];
    let key = image_keys[1].as_str().context("image key")?;
    let storage = env.storage();
    let mut image = image::load_from_memory(&storage.get(key).await?)?.to_rgb8();
    image.get_pixel_mut(5, 7).0[0] ^= 1;
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    storage.put(key, png, "image/png").await?;
    let (success, comparison, stderr) = regenerate(&group.to_string())?;
    assert!(
        !success,
        "a changed image must fail the comparison: {comparison:#}"
    );
    assert!(stderr.contains("differ"), "{stderr}");
    assert_eq!(comparison["number"], 2);
    assert_eq!(comparison["identical"], false);
    let differing: Vec<(String, i64, i64)> = comparison["files"]
        .as_array()
        .context("files")?
        .iter()
        .filter(|file| file["identical"] == false)
        .map(|file| {
            (
                file["what"].as_str().unwrap_or_default().to_string(),
                file["index"].as_i64().unwrap_or(-1),
                file["differing_values"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(differing, vec![("image".to_string(), 1, 1)]);
    Ok(())
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
