//! The demonstration run (`deploy/demo/run.toml`: four deformable objects and one rigid asset)
//! through the shipped `syncd-worker` binary with every model real: the 3D prior, FLUX.1-dev and
//! Depth-dev with Masked Shared Attention (tiny random weights from the parity fixtures), and the
//! DINOv2 / CLIP / aesthetic scorers (tiny random weights too). Against the real PostgreSQL,
//! RabbitMQ and S3 store of this machine, like `factory.rs`.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use syncd_tests::env::TestEnv;
use syncd_tests::processes::{binary, cli, Process};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_run_completes_with_the_real_worker_and_models() -> Result<()> {
    let env = TestEnv::new().await?;
    let coordinator_config = env.write_coordinator_config()?;
    let worker_binary = binary("syncd-worker")?;

    let head = env.path("aesthetic.safetensors");
    let converted = std::process::Command::new(&worker_binary)
        .arg("convert-aesthetic")
        .arg(repository().join("worker/tests/fixtures/scoring/aesthetic_mlp.pth"))
        .arg("--out")
        .arg(&head)
        .output()?;
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    // The demo's own worker configuration, run from the checkout as scripts/demo.sh runs it,
    // with this test's connections, queues and bucket.
    let worker_config = repository().join("deploy/demo/worker.toml");
    let connections = [
        ("SYNCD_WORKER__NAME", "real-worker".to_string()),
        ("SYNCD_BROKER__URL", env.amqp_url.clone()),
        ("SYNCD_BROKER__QUEUE_PREFIX", env.queue_prefix.clone()),
        // The queues' arguments must match the coordinator's, which declares them too.
        ("SYNCD_BROKER__DELIVERY_LIMIT", "3".to_string()),
        ("SYNCD_STORAGE__ENDPOINT", env.s3_endpoint.clone()),
        ("SYNCD_STORAGE__REGION", env.s3_region.clone()),
        ("SYNCD_STORAGE__BUCKET", env.bucket.clone()),
        ("SYNCD_STORAGE__ACCESS_KEY_ID", env.s3_access_key.clone()),
        (
            "SYNCD_STORAGE__SECRET_ACCESS_KEY",
            env.s3_secret_key.clone(),
        ),
        (
            "SYNCD_SCORING__AESTHETIC_HEAD",
            head.to_string_lossy().to_string(),
        ),
    ];
    let connections: Vec<(&str, &str)> = connections
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .collect();

    let config_arg = coordinator_config.to_string_lossy().to_string();
    let mut coordinator = Process::start(
        "coordinator",
        &binary("syncd-coordinator")?,
        &["--config", &config_arg],
        env.dir.path(),
        &[],
    )?;
    let worker_arg = worker_config.to_string_lossy().to_string();
    let mut worker = Process::start_in(
        "real-worker",
        &worker_binary,
        &["run", "--config", &worker_arg],
        env.dir.path(),
        Some(&repository()),
        &connections,
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
