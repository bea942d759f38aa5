//! The dataset grows while the run runs: shards are written and listed in the manifest as groups
//! are accepted, readable (by the `webdataset` package) before the run ends; a cancelled run is
//! finalised; a paused run is finalised with what it accepted
//! (a group whose image is gone fails alone, with the reason), its packed groups' working copies
//! are reclaimed, and it grows again when resumed; a coordinator stopped in the middle of a
//! packing pass stops at once, and the next one packs what it left. The
//! real coordinator and CLI, `syncd-test-worker`, and the real PostgreSQL, RabbitMQ and Garage
//! of this machine.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use syncd_tests::env::{Routes, TestEnv};
use syncd_tests::factory::{dataset_members, dataset_records, Factory};
use syncd_tests::fault_proxy::{Fault, FaultProxy};
use syncd_tests::processes::{cli_output, wait_for};
use syncd_tests::python::run_script;

/// A filter that keeps every group, and shards of `samples` groups.
fn sections(samples: u32) -> String {
    format!(
        "[filter]\nmin_aesthetic = -1000.0\nmin_similarity = -1.0\nmax_similarity = 1.0\n\
         min_valid_images = 2\n\
         [dataset]\nsamples_per_shard = {samples}\nnear_duplicate_threshold = 1.0\n"
    )
}

/// The run's manifest, once one is written.
async fn manifest(factory: &Factory, run: &str) -> Result<Option<Value>> {
    let key = format!("datasets/{run}/index.json");
    let storage = factory.env.dataset_storage();
    if storage.list(&key).await?.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice(&storage.get(&key).await?)?))
}

/// The group keys the manifest's tar shards hold.
async fn sample_keys(factory: &Factory, index: &Value) -> Result<BTreeSet<String>> {
    Ok(dataset_members(&factory.env, index)
        .await?
        .into_iter()
        .filter_map(|(name, _)| name.strip_suffix(".json").map(String::from))
        .collect())
}

/// Waits for the run to complete; checks that its manifest is complete and holds every group
/// the run accepted, once; returns their keys.
async fn completed_dataset(factory: &Factory, run: &str) -> Result<BTreeSet<String>> {
    let status = factory
        .wait_until_completed(run, Duration::from_secs(180))
        .await?;
    let index = manifest(factory, run).await?.context("the manifest")?;
    assert_eq!(index["complete"], true, "{index}");
    let all = sample_keys(factory, &index).await?;
    assert_eq!(
        all.len() as i64,
        status["groups"]["accepted"].as_i64().unwrap_or(-1),
        "every accepted group is in the dataset once: {status}"
    );
    assert_eq!(status["dataset_samples"].as_u64(), Some(all.len() as u64));
    Ok(all)
}

/// Waits until the factory has accepted at least `count` groups.
async fn wait_for_accepted(factory: &Factory, pool: &sqlx::PgPool, count: i64) -> Result<()> {
    wait_for(
        &format!("{count} accepted groups"),
        Duration::from_secs(120),
        || async {
            let (accepted,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM groups WHERE decision = 'accepted'")
                    .fetch_one(pool)
                    .await?;
            Ok((accepted >= count).then_some(()))
        },
    )
    .await
    .with_context(|| factory.logs())
}

/// Finalises `run` and waits for its dataset; checks that the run kept its `state` and the
/// manifest is complete; returns the manifest.
async fn finalised_dataset(factory: &Factory, run: &str, state: &str) -> Result<Value> {
    let finalised = factory.cli_json(&["run", "finalize", run])?;
    assert_eq!(finalised["state"], state, "{finalised}");
    let status = wait_for("the finalised dataset", Duration::from_secs(60), || async {
        let status = factory.cli_json(&["run", "status", run])?;
        Ok((status["dataset_state"] == "written").then_some(status))
    })
    .await
    .with_context(|| factory.logs())?;
    assert_eq!(status["state"], state, "{status}");
    let index = manifest(factory, run).await?.context("the manifest")?;
    assert_eq!(index["complete"], true, "{index}");
    Ok(index)
}

#[tokio::test(flavor = "multi_thread")]
async fn shards_are_readable_while_the_run_runs() -> Result<()> {
    // One slow worker: the run lasts long enough to be seen half done.
    let factory = Factory::start(1, 400).await?;
    factory.create_run_with("growing", 12, &sections(2))?;
    let (index, state) = wait_for(
        "a manifest listing a shard while the run is active",
        Duration::from_secs(120),
        || async {
            let Some(index) = manifest(&factory, "growing").await? else {
                return Ok(None);
            };
            let status = factory.cli_json(&["run", "status", "growing"])?;
            let listed = index["shards"].as_array().is_some_and(|s| !s.is_empty());
            Ok(listed.then_some((index, status)))
        },
    )
    .await
    .with_context(|| factory.logs())?;
    assert_eq!(state["state"], "active", "{state}");
    assert_eq!(index["complete"], false, "{index}");
    // Every listed shard is there and whole, with the samples the manifest says.
    let early = sample_keys(&factory, &index).await?;
    let listed: u64 = index["shards"]
        .as_array()
        .context("shards")?
        .iter()
        .map(|shard| shard["samples"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(early.len() as u64, listed, "{index}");
    assert_eq!(index["samples"].as_u64(), Some(listed), "{index}");
    // A trainer reads them with `webdataset` while the run goes on.
    let folder = factory.env.path("early");
    std::fs::create_dir_all(&folder)?;
    let mut shards = Vec::new();
    for shard in index["shards"].as_array().context("shards")? {
        let key = shard["key"].as_str().context("shard key")?;
        let path = folder.join(key.rsplit('/').next().context("a file name")?);
        factory.env.dataset_storage().get_file(key, &path).await?;
        shards.push(path);
    }
    let read = run_script("webdataset_keys.py", &shards)?;
    let read: BTreeSet<String> = serde_json::from_value(read)?;
    assert_eq!(read, early, "webdataset reads the listed shards' samples");

    let all = completed_dataset(&factory, "growing").await?;
    assert!(early.is_subset(&all), "shards once listed stay listed");
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_run_is_finalised_with_what_it_accepted_and_a_missing_image_fails_its_group_only(
) -> Result<()> {
    let factory = Factory::start(1, 300).await?;
    let pool = factory.env.pool().await?;
    // Shards larger than the run: nothing is packed before the run closes or is finalised.
    factory.create_run_with("stopped", 8, &sections(100))?;
    wait_for_accepted(&factory, &pool, 3).await?;

    // An active run is not finalised: it says what to do instead, and changes nothing.
    let refused = cli_output(&factory.coordinator_config, &["run", "finalize", "stopped"])?;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("pause or cancel it first"), "{error}");

    factory.cli(&["run", "pause", "stopped"])?;
    // Jobs already queued finish; nothing new starts.
    wait_for(
        "the paused run to settle",
        Duration::from_secs(60),
        || async {
            let (busy,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'retry_wait')",
            )
            .fetch_one(&pool)
            .await?;
            Ok((busy == 0).then_some(()))
        },
    )
    .await?;
    let accepted: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, image_keys->>1 FROM groups WHERE decision = 'accepted' ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    assert!(accepted.len() >= 3, "{accepted:?}");
    let (lost_group, lost_image) = accepted[0].clone();
    factory
        .env
        .storage()
        .delete(std::slice::from_ref(&lost_image))
        .await?;

    let index = finalised_dataset(&factory, "stopped", "paused").await?;
    let keys = sample_keys(&factory, &index).await?;
    assert_eq!(
        keys.len(),
        accepted.len() - 1,
        "every accepted group but the one without its image: {index}"
    );
    let (decision, reason): (String, String) =
        sqlx::query_as("SELECT decision, reason FROM groups WHERE id = $1")
            .bind(lost_group)
            .fetch_one(&pool)
            .await?;
    assert_eq!(decision, "failed");
    assert!(
        reason.contains(&lost_image),
        "the reason names the image: {reason}"
    );
    let records = dataset_records(&factory.env, "stopped").await?;
    assert!(
        records
            .values()
            .all(|record| record["group_id"] != lost_group.to_string()),
        "the failed group is not in the dataset"
    );

    // The packed groups' working copies can go: the dataset has them.
    let reclaimed = factory.cli_json(&["run", "reclaim", "stopped"])?;
    assert_eq!(
        reclaimed["groups"].as_u64(),
        Some(keys.len() as u64),
        "{reclaimed}"
    );
    let (packed_image,): (String,) = sqlx::query_as(
        "SELECT image_keys->>0 FROM groups WHERE decision = 'accepted' AND shard IS NOT NULL LIMIT 1",
    )
    .fetch_one(&pool)
    .await?;
    assert!(factory.env.storage().list(&packed_image).await?.is_empty());
    assert_eq!(
        sample_keys(&factory, &index).await?,
        keys,
        "the dataset is untouched"
    );

    // Resumed, the run goes on and its dataset grows again, to every group it accepts.
    factory.cli(&["run", "resume", "stopped"])?;
    let all = completed_dataset(&factory, "stopped").await?;
    assert!(keys.is_subset(&all), "the finalised shards stay");
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_is_finalised_with_the_groups_it_accepted() -> Result<()> {
    let factory = Factory::start(1, 300).await?;
    let pool = factory.env.pool().await?;
    factory.create_run_with("cancelled", 8, &sections(100))?;
    wait_for_accepted(&factory, &pool, 2).await?;
    factory.cli(&["run", "cancel", "cancelled"])?;
    let index = finalised_dataset(&factory, "cancelled", "cancelled").await?;
    let (accepted,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM groups WHERE decision = 'accepted'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(sample_keys(&factory, &index).await?.len() as i64, accepted);
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_stopped_while_packing_stops_at_once_and_loses_nothing() -> Result<()> {
    // The coordinator reaches storage through a proxy that delays every chunk: its closing
    // packing pass, which reads each group's images, takes far longer than the patience below.
    let env = TestEnv::new().await?;
    let storage = FaultProxy::for_url(&env.s3_endpoint).await?;
    let coordinator_routes = Routes {
        s3_endpoint: storage.route(&env.s3_endpoint)?,
        ..env.direct_routes()
    };
    let worker_routes = env.direct_routes();
    let mut factory = Factory::start_routed(env, &coordinator_routes, &worker_routes, 1, 0).await?;
    let pool = factory.env.pool().await?;
    storage.set(Fault::Latency(Duration::from_millis(1500)));
    // Shards larger than the run: its one shard is assigned and packed once it closes.
    factory.create_run_with("stopping", 6, &sections(100))?;
    let shard: i32 = wait_for(
        "the closing pass's shard",
        Duration::from_secs(180),
        || async {
            Ok(sqlx::query_scalar::<_, i32>(
                "SELECT shard FROM dataset_shards WHERE state = 'packing' LIMIT 1",
            )
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await
    .with_context(|| factory.logs())?;
    // The pass is now reading images, a few seconds each.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = factory
        .stop_coordinator(Duration::from_secs(10))
        .with_context(|| factory.logs())?;
    assert!(status.success(), "the coordinator exited with {status}");
    let (state,): (String,) = sqlx::query_as(
        "SELECT state FROM dataset_shards WHERE shard = $1 AND run_id = \
         (SELECT id FROM runs WHERE name = 'stopping')",
    )
    .bind(shard)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        state, "packing",
        "the unfinished shard is left for the next leader"
    );

    // Storage answers at full speed again; the next coordinator packs the shard.
    storage.set(Fault::None);
    factory.start_coordinator()?;
    let all = completed_dataset(&factory, "stopping").await?;
    let (failed,): (i64,) = sqlx::query_as("SELECT count(*) FROM groups WHERE decision = 'failed'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(failed, 0, "no group was failed by the interrupted pass");
    assert!(!all.is_empty());
    factory.finish().await
}
