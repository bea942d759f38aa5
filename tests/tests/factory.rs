//! End-to-end tests of the factory: the real coordinator and CLI binaries and the worker job loop
//! (with the test-only generator and scorer of `syncd-test-worker`) against the real PostgreSQL,
//! RabbitMQ and Garage of this machine. Each test has its own database, queue prefix and bucket.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use syncd_tests::factory::{
    assert_exactly_once, counts, dataset_members, dataset_records, json_counts, llm_section,
    Factory,
};
use syncd_tests::fake_llm::FakeLlm;
use syncd_tests::processes::wait_for;

#[tokio::test(flavor = "multi_thread")]
async fn a_run_of_twenty_objects_flows_through_the_factory() -> Result<()> {
    let factory = Factory::start(2, 0).await?;
    let created = factory.create_run("e2e", 20)?;
    assert_eq!(created["state"], "active");
    let status = factory
        .wait_until_completed("e2e", Duration::from_secs(180))
        .await?;

    let pool = factory.env.pool().await?;
    // Every object ended in a terminal state, and the CLI's JSON agrees with the database.
    let objects = counts(&pool, "SELECT state, count(*) FROM objects GROUP BY state").await?;
    assert_eq!(objects.values().sum::<i64>(), 20);
    assert_eq!(objects.get("done"), Some(&20), "{objects:?}");
    assert_eq!(json_counts(&status["objects"]), objects);
    assert_eq!(
        json_counts(&status["jobs"]),
        counts(&pool, "SELECT state, count(*) FROM jobs GROUP BY state").await?
    );
    let groups = counts(
        &pool,
        "SELECT decision, count(*) FROM groups GROUP BY decision",
    )
    .await?;
    assert_eq!(json_counts(&status["groups"]), groups);
    assert_eq!(groups.values().sum::<i64>(), 20, "one group per object");
    let accepted = groups.get("accepted").copied().unwrap_or(0);
    assert!(
        accepted > 0 && accepted < 20,
        "the filter both accepts and rejects: {groups:?}"
    );
    assert_exactly_once(&pool).await?;

    // Both workers took part.
    let workers: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT worker FROM jobs WHERE worker IS NOT NULL")
            .fetch_all(&pool)
            .await?;
    assert_eq!(workers.len(), 2, "{workers:?}");

    // The accepted groups' files are in the bucket under the documented layout: the keys of
    // the attempt that made them.
    let storage = factory.env.storage();
    let rows: Vec<(uuid::Uuid, Value, Value, i32)> = sqlx::query_as(
        "SELECT g.id, g.image_keys, g.valid_images, j.attempts
         FROM groups g JOIN jobs j ON j.group_id = g.id AND j.kind = 'generate'
         WHERE g.decision = 'accepted'",
    )
    .fetch_all(&pool)
    .await?;
    let run_id = created["id"].as_str().context("run id")?;
    let stored = storage.list(&format!("runs/{run_id}/groups/")).await?;
    for (group, image_keys, _, attempt) in &rows {
        let prefix = format!("runs/{run_id}/groups/{group}/attempt-{attempt}");
        for (index, key) in image_keys.as_array().context("keys")?.iter().enumerate() {
            let expected = format!("{prefix}/{index}.png");
            assert_eq!(key.as_str(), Some(expected.as_str()));
            assert!(
                stored.contains(&expected),
                "{expected} missing from the bucket"
            );
            assert!(stored.contains(&format!("{prefix}/{index}.mask.png")));
        }
    }

    // The dataset: an index and WebDataset shards holding exactly the valid images.
    let index: Value = serde_json::from_slice(&storage.get("datasets/e2e/index.json").await?)?;
    assert_eq!(index["samples"].as_i64(), Some(accepted));
    let valid: i64 = rows
        .iter()
        .map(|(_, _, valid, _)| valid.as_array().map_or(0, |v| v.len() as i64))
        .sum();
    assert_eq!(index["images"].as_i64(), Some(valid));
    let members: Vec<String> = dataset_members(&factory.env, &index)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for (group, _, valid, _) in &rows {
        let key = group.simple().to_string();
        assert!(members.contains(&format!("{key}.json")));
        for sample in 0..valid.as_array().map_or(0, Vec::len) {
            assert!(
                members.contains(&format!("{key}.{sample}.png")),
                "{key}.{sample}.png"
            );
            assert!(members.contains(&format!("{key}.{sample}.mask.png")));
        }
    }
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_while_holding_a_job_loses_nothing() -> Result<()> {
    let mut factory = Factory::start(1, 1500).await?;
    factory.create_run("killed-worker", 6)?;
    let pool = factory.env.pool().await?;
    // Wait until the only worker holds a generation job, then kill it without warning.
    let victim: (uuid::Uuid,) = wait_for(
        "a running generation job",
        Duration::from_secs(60),
        || async {
            Ok(sqlx::query_as(
                "SELECT id FROM jobs WHERE kind = 'generate' AND state = 'running' LIMIT 1",
            )
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await?;
    factory.workers[0].kill()?;
    factory.start_worker("worker-replacement", 100)?;
    factory
        .wait_until_completed("killed-worker", Duration::from_secs(180))
        .await?;
    assert_exactly_once(&pool).await?;

    // The killed job was redelivered (same attempt) and completed by the replacement.
    let (attempts, worker): (i32, String) =
        sqlx::query_as("SELECT attempts, worker FROM jobs WHERE id = $1")
            .bind(victim.0)
            .fetch_one(&pool)
            .await?;
    assert_eq!(attempts, 1, "a redelivery is not a new attempt");
    assert_eq!(worker, "worker-replacement");
    let (redelivered,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_events WHERE job_id = $1 AND detail = 'redelivered to another worker'",
    )
    .bind(victim.0)
    .fetch_one(&pool)
    .await?;
    assert_eq!(redelivered, 1);
    let (groups,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM groups WHERE decision <> 'pending'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(groups, 6);
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_restarted_mid_run_loses_and_duplicates_nothing() -> Result<()> {
    let mut factory = Factory::start(2, 300).await?;
    factory.create_run("restarted", 12)?;
    let pool = factory.env.pool().await?;
    factory
        .wait_for_succeeded_jobs(4, Duration::from_secs(60))
        .await?;
    factory
        .coordinator
        .as_mut()
        .context("coordinator")?
        .kill()?;
    // Workers go on reporting into the results queue while the coordinator is down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    factory.start_coordinator()?;
    assert_completed_exactly_once(&factory, &pool, "restarted", 12).await?;
    factory.finish().await
}

/// Waits for run `name` of `objects` one-group objects to complete, then checks that every job
/// succeeded exactly once, every group was decided, and no job was made twice.
async fn assert_completed_exactly_once(
    factory: &Factory,
    pool: &sqlx::PgPool,
    name: &str,
    objects: i64,
) -> Result<()> {
    factory
        .wait_until_completed(name, Duration::from_secs(180))
        .await?;
    assert_exactly_once(pool).await?;
    let (groups, decided): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE decision <> 'pending') FROM groups",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!((groups, decided), (objects, objects));
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(pool)
        .await?;
    assert_eq!(
        jobs,
        2 * objects,
        "one generation and one scoring job per object, no more"
    );
    Ok(())
}

/// The coordinators `syncd coordinators` lists: (lock session name, role), the leader first.
fn coordinator_roles(factory: &Factory) -> Result<Vec<(String, String)>> {
    let rows = factory.cli_json(&["coordinators"])?;
    rows.as_array()
        .context("a list of coordinators")?
        .iter()
        .map(|row| {
            Ok((
                row["session"].as_str().context("session")?.to_string(),
                row["role"].as_str().context("role")?.to_string(),
            ))
        })
        .collect()
}

/// Waits until exactly one coordinator leads and `standbys` stand by; returns the leader's pid.
async fn wait_for_roles(factory: &Factory, standbys: usize) -> Result<u32> {
    wait_for(
        &format!("one leading coordinator and {standbys} standing by"),
        Duration::from_secs(60),
        || async {
            let roles = coordinator_roles(factory)?;
            let leading: Vec<&String> = roles
                .iter()
                .filter(|(_, role)| role == "leading")
                .map(|(session, _)| session)
                .collect();
            let standing_by = roles
                .iter()
                .filter(|(_, role)| role == "standing by")
                .count();
            assert!(
                leading.len() <= 1,
                "two coordinators lead at once: {roles:?}"
            );
            if leading.len() != 1 || standing_by != standbys {
                return Ok(None);
            }
            let pid = leading[0]
                .rsplit(' ')
                .next()
                .and_then(|pid| pid.parse().ok())
                .context("the lock session ends with the pid")?;
            Ok(Some(pid))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_coordinator_takes_over_when_the_leader_is_killed() -> Result<()> {
    let mut factory = Factory::start(2, 300).await?;
    let mut coordinators = vec![
        factory.coordinator.take().context("coordinator")?,
        factory.spawn_coordinator("standby")?,
    ];
    let leader_pid = wait_for_roles(&factory, 1).await?;
    let leader = coordinators
        .iter()
        .position(|process| process.pid() == leader_pid)
        .context("the leader is one of the two coordinators")?;
    let mut killed = coordinators.remove(leader);
    let standby = coordinators.remove(0);
    factory.coordinator = Some(standby);

    factory.create_run("taken-over", 12)?;
    let pool = factory.env.pool().await?;
    factory
        .wait_for_succeeded_jobs(4, Duration::from_secs(60))
        .await?;
    let standby_log = factory.coordinator.as_ref().context("standby")?.log_text();
    assert!(
        standby_log.contains("another coordinator leads; standing by")
            && !standby_log.contains("coordinator leading"),
        "the standby ran no loop while the other led:\n{standby_log}"
    );

    killed.kill()?;
    let killed_at = std::time::Instant::now();
    let new_leader = wait_for_roles(&factory, 0).await?;
    let lock_taken = killed_at.elapsed();
    assert_eq!(
        new_leader,
        factory.coordinator.as_ref().context("standby")?.pid()
    );
    wait_for(
        "the new leader's loops",
        Duration::from_secs(60),
        || async {
            let log = factory.coordinator.as_ref().context("standby")?.log_text();
            Ok(log
                .contains("coordinator leading: running the loops")
                .then_some(()))
        },
    )
    .await?;
    println!(
        "takeover: lock taken {:.1} s and loops running {:.1} s after the leader was SIGKILLed",
        lock_taken.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );

    // The old leader comes back as a standby: the lock stays where it is.
    let restarted = factory.spawn_coordinator("restarted")?;
    assert_eq!(wait_for_roles(&factory, 1).await?, new_leader);

    assert_completed_exactly_once(&factory, &pool, "taken-over", 12).await?;
    let status = factory.cli_json(&["run", "status", "taken-over"])?;
    assert_eq!(status["dataset_state"], "written", "{status}");
    drop(restarted);
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_message_is_dead_lettered_and_the_run_goes_on() -> Result<()> {
    let factory = Factory::start(1, 0).await?;
    // Let the topology exist, then drop garbage into the generation queue.
    factory.create_run("poisoned", 3)?;
    let channel = factory.env.broker_channel().await?;
    let queue = format!("{}.jobs.generate.flux-dev", factory.env.queue_prefix);
    wait_for("the job queues", Duration::from_secs(30), || async {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await;
        Ok(declared.ok().map(|_| ()))
    })
    .await
    .ok();
    let channel = factory.env.broker_channel().await?;
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            Default::default(),
            b"{\"this is\": not a job",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    factory
        .wait_until_completed("poisoned", Duration::from_secs(120))
        .await?;
    let letters = factory.wait_for_dead_letters().await?;
    let letter = &letters[0];
    assert_eq!(letter["reason"], "the message could not be decoded");
    assert!(letter["body"]
        .as_str()
        .unwrap_or_default()
        .contains("not a job"));
    assert_eq!(letter["queue"].as_str(), Some(queue.as_str()));
    let text = factory.cli(&["dead-letters"])?;
    assert!(text.contains("could not be decoded"), "{text}");
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_pauses_resumes_and_reports_errors_in_one_line() -> Result<()> {
    let factory = Factory::start(0, 0).await?;
    factory.create_run("paused", 2)?;
    let paused = factory.cli_json(&["run", "pause", "paused"])?;
    assert_eq!(paused["state"], "paused");
    let error = factory
        .cli(&["run", "pause", "paused"])
        .unwrap_err()
        .to_string();
    assert!(error.contains("already paused"), "{error}");
    let error = factory
        .cli(&["run", "status", "no-such-run"])
        .unwrap_err()
        .to_string();
    assert!(error.contains("no run named"), "{error}");
    assert!(!error.trim().contains('\n'));
    let resumed = factory.cli_json(&["run", "resume", "paused"])?;
    assert_eq!(resumed["state"], "active");
    let cancelled = factory.cli_json(&["run", "cancel", "paused"])?;
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(
        json_counts(&cancelled["objects"]).get("cancelled"),
        Some(&2)
    );
    let runs = factory.cli_json(&["run", "list"])?;
    assert_eq!(runs.as_array().map(Vec::len), Some(1));
    factory.finish().await
}

/// Deformable categories through the LLM prompt stage, as the reference asks it: one prompt job
/// per category (not per object), its captions de-duplicated and dealt out to the category's
/// objects, and every group's record saying exactly which background and description each of
/// its images used.
#[tokio::test(flavor = "multi_thread")]
async fn categories_get_one_prompt_job_each_and_records_say_what_every_image_used() -> Result<()> {
    let llm = FakeLlm::recorded().await;
    let mut factory = Factory::start(0, 0).await?;
    let llm_section = llm_section(&llm.base_url(), "");
    factory.start_worker_with(
        "worker-llm",
        0,
        &["prompt", "generate", "score"],
        &llm_section,
    )?;
    let run = "name = \"categories\"\nseed = 3\n[input]\ncategories = [\"Cat\", \"Fox\"]\n\
               objects_per_category = 3\n[prompts]\ncategory_requests = 2\ncaptions_per_request = 5\n\
               [generation.deformable]\nresolution = 64\nsteps = 2\n\
               [filter]\nmin_aesthetic = -1000.0\nmin_similarity = -1.0\nmax_similarity = 1.0\n\
               [dataset]\nnear_duplicate_threshold = 1.0\n";
    let path = factory.env.write("categories.toml", run)?;
    factory.cli_json(&["run", "create", &path.to_string_lossy()])?;
    factory
        .wait_until_completed("categories", Duration::from_secs(180))
        .await?;
    let pool = factory.env.pool().await?;
    assert_exactly_once(&pool).await?;

    // One prompt job per category, each 2 requests for backgrounds and 2 for descriptions.
    let kinds = counts(&pool, "SELECT kind, count(*) FROM jobs GROUP BY kind").await?;
    assert_eq!(kinds.get("prompt"), Some(&2), "{kinds:?}");
    assert_eq!(kinds.get("generate"), Some(&6), "{kinds:?}");
    assert_eq!(llm.request_count(), 8);

    // The category's objects got distinct descriptions from the one answer set, and every one
    // of their backgrounds names the category.
    let objects: Vec<(uuid::Uuid, Value, Value)> =
        sqlx::query_as("SELECT id, spec, backgrounds FROM objects ORDER BY ordinal")
            .fetch_all(&pool)
            .await?;
    assert_eq!(objects.len(), 6);
    let mut by_object = BTreeMap::new();
    for category in ["Cat", "Fox"] {
        let of_category: Vec<&(uuid::Uuid, Value, Value)> = objects
            .iter()
            .filter(|(_, spec, _)| spec["category"] == category)
            .collect();
        let mut descriptions: Vec<&str> = of_category
            .iter()
            .map(|(_, spec, _)| spec["description"].as_str().unwrap_or_default())
            .collect();
        assert!(
            descriptions.iter().all(|d| !d.is_empty()),
            "{descriptions:?}"
        );
        descriptions.sort();
        descriptions.dedup();
        assert_eq!(descriptions.len(), 3, "{category}: {descriptions:?}");
        for (id, spec, backgrounds) in of_category {
            let backgrounds: Vec<String> = serde_json::from_value(backgrounds.clone())?;
            assert_eq!(backgrounds.len(), 3, "one group of three images each");
            let word = category.to_lowercase();
            assert!(
                backgrounds.iter().all(|b| b.contains(&word)),
                "{backgrounds:?}"
            );
            by_object.insert(*id, (spec["description"].clone(), backgrounds));
        }
    }

    // Each dataset record names the background and description of each of its images, and
    // its prompts are made of exactly those.
    let groups: Vec<(uuid::Uuid, uuid::Uuid)> =
        sqlx::query_as("SELECT id, object_id FROM groups WHERE decision = 'accepted'")
            .fetch_all(&pool)
            .await?;
    assert!(!groups.is_empty());
    let records = dataset_records(&factory.env, "categories").await?;
    assert_eq!(records.len(), groups.len());
    for (group, object) in &groups {
        let record = &records[&group.simple().to_string()];
        let (description, backgrounds) = &by_object[object];
        let prompts = record["prompts"].as_array().context("prompts")?;
        assert_eq!(
            record["backgrounds"].as_array().map(Vec::len),
            Some(prompts.len())
        );
        for (image, prompt) in prompts.iter().enumerate() {
            let background = record["backgrounds"][image]
                .as_str()
                .context("background")?;
            assert!(backgrounds.iter().any(|b| b == background), "{background}");
            assert_eq!(&record["descriptions"][image], description);
            let expected = format!(
                "{}. {}. wide angle shot",
                background.trim_end_matches('.'),
                description
                    .as_str()
                    .unwrap_or_default()
                    .trim_end_matches('.')
            );
            assert_eq!(prompt.as_str(), Some(expected.as_str()));
        }
    }
    factory.finish().await
}
