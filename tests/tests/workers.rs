//! Workers on many hosts, as the coordinator sees them: a worker frozen past its lease (SIGSTOP,
//! as a host that hangs or a VM that is paused) whose attempt is taken over, generation jobs
//! routed to workers of their model family, a busy worker holding no other job, `syncd workers`,
//! the delivery limit: counting workers that crash on a job, never jobs handed back, and a worker
//! idle on several queues that gets a message on each at once. The real coordinator and CLI,
//! `syncd-test-worker`, and the real PostgreSQL, RabbitMQ and Garage of this machine.

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use syncd_infra::broker::{self, Outgoing, Publisher, Topology};
use syncd_proto::ids::{GroupId, JobId, ObjectId, RunId};
use syncd_proto::messages::{
    GenerateJob, JobMessage, JobPayload, ObjectSpec, ReportEvent, WorkerReport, WIRE_VERSION,
};
use syncd_tests::env::TestEnv;
use syncd_tests::factory::{dataset_members, Factory};
use syncd_tests::processes::{binary, wait_for, Process};
use uuid::Uuid;

/// One deformable object (FLUX.1-dev) and one rigid asset (FLUX.1-Depth-dev, after its 3D
/// prior), one group each, with a lease of 4 s and a filter that keeps every group.
fn write_run(factory: &Factory, name: &str) -> Result<String> {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../prior/tests/fixtures");
    let objects = [
        serde_json::json!({
            "type": "deformable", "category": "Cat", "description": "a grey cat with white paws",
            "backgrounds": ["on a wooden table", "in a sunny garden", "on a snowy street"],
        }),
        serde_json::json!({
            "type": "rigid", "uid": "prior_reference",
            "caption": "a grey stone sculpture of a ring standing on a slab",
            "backgrounds": ["on a kitchen table", "on a grassy lawn", "on a stone floor"],
        }),
    ];
    let lines: Vec<String> = objects.iter().map(Value::to_string).collect();
    factory.env.write("objects.jsonl", &lines.join("\n"))?;
    let run = format!(
        "name = \"{name}\"\nseed = 3\n[input]\nobjects_file = \"objects.jsonl\"\n\
         assets_dir = \"{assets}\"\n\
         [generation.deformable]\nresolution = 64\nsteps = 2\nguidance = 3.5\n\
         [generation.rigid]\nresolution = 64\nsteps = 2\nguidance = 10.0\ngroups_per_object = 1\n\
         [jobs]\nmax_attempts = 3\nbackoff_base_secs = 0.2\nlease_secs = 4\n\
         [filter]\nmin_aesthetic = -1000.0\nmin_similarity = -1.0\nmax_similarity = 0.9999\n\
         min_valid_images = 2\n\
         [dataset]\nsamples_per_shard = 4\nnear_duplicate_threshold = 1.0\n",
        assets = fixtures.display()
    );
    let path = factory.env.write("run.toml", &run)?;
    Ok(path.to_string_lossy().to_string())
}

/// The bytes of every object under `keys`.
async fn read_all(factory: &Factory, keys: &[String]) -> Result<Vec<Vec<u8>>> {
    let storage = factory.env.storage();
    let mut files = Vec::new();
    for key in keys {
        files.push(storage.get(key).await?.to_vec());
    }
    Ok(files)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_worker_cannot_change_what_was_scored_and_jobs_wait_for_their_model_family(
) -> Result<()> {
    let mut factory = Factory::start(0, 0).await?;
    let pool = factory.env.pool().await?;
    // "frozen" takes generation and scoring jobs of FLUX.1-dev, and its generation takes 5 s:
    // long enough to be frozen holding one.
    let dev_only = [("SYNCD_TEST_FAMILIES", "flux-dev")];
    factory.start_worker_env("frozen", 5000, &["generate", "score"], &dev_only)?;
    let run_file = write_run(&factory, "fenced")?;
    factory.cli_json(&["run", "create", &run_file])?;
    let (job, group): (Uuid, Uuid) = wait_for(
        "the frozen worker to hold the deformable group's generation",
        Duration::from_secs(60),
        || async {
            Ok(sqlx::query_as(
                "SELECT id, group_id FROM jobs
                 WHERE kind = 'generate' AND state = 'running' AND worker = 'frozen'",
            )
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await
    .with_context(|| factory.logs())?;
    factory.workers[0].signal("STOP")?;
    factory.start_worker_env("healthy", 0, &["prior", "generate", "score"], &dev_only)?;

    // Its heartbeats stop, its lease expires, and "healthy" makes the group again and scores
    // it, while "frozen" still holds the first attempt's message: it holds no scoring job.
    let (image_keys, mask_keys): (Value, Value) = wait_for(
        "the group made again and scored by the healthy worker",
        Duration::from_secs(90),
        || async {
            Ok(sqlx::query_as(
                "SELECT image_keys, mask_keys FROM groups WHERE id = $1 AND decided_at IS NOT NULL",
            )
            .bind(group)
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await
    .with_context(|| factory.logs())?;
    let (attempts, worker): (i32, String) =
        sqlx::query_as("SELECT attempts, worker FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await?;
    assert_eq!((attempts, worker.as_str()), (2, "healthy"));
    let (image_keys, mask_keys) = (strings(&image_keys), strings(&mask_keys));
    assert!(
        image_keys.iter().all(|key| key.contains("/attempt-2/")),
        "the recorded images are the second attempt's: {image_keys:?}"
    );
    let scored = read_all(&factory, &image_keys).await?;
    let scored_masks = read_all(&factory, &mask_keys).await?;

    // The rigid object's generation waits for a FLUX.1-Depth-dev worker: queued, not failed,
    // and taken by nobody.
    let (rigid_state, rigid_attempts): (String, i32) = wait_for(
        "the rigid group's generation job to be queued",
        Duration::from_secs(60),
        || async {
            Ok(sqlx::query_as(
                "SELECT j.state, j.attempts FROM jobs j JOIN objects o ON o.id = j.object_id
                 WHERE j.kind = 'generate' AND o.spec ->> 'type' = 'rigid' AND j.state = 'queued'",
            )
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await
    .with_context(|| factory.logs())?;
    assert_eq!((rigid_state.as_str(), rigid_attempts), ("queued", 1));

    // Woken, "frozen" finishes its stale attempt: its images go to its own keys and its report
    // is ignored.
    factory.workers[0].signal("CONT")?;
    wait_for(
        "the stale attempt's report, ignored",
        Duration::from_secs(60),
        || async {
            let (ignored,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM job_events
                 WHERE job_id = $1 AND worker = 'frozen' AND detail LIKE 'ignored succeeded report%'",
            )
            .bind(job)
            .fetch_one(&pool)
            .await?;
            Ok((ignored == 1).then_some(()))
        },
    )
    .await
    .with_context(|| factory.logs())?;
    let stale_keys: Vec<String> = image_keys
        .iter()
        .map(|key| key.replace("/attempt-2/", "/attempt-1/"))
        .collect();
    let stale = read_all(&factory, &stale_keys).await?;
    // (Compared as booleans: the files themselves are no message.)
    assert!(stale != scored, "the two attempts painted different pixels");
    assert!(
        read_all(&factory, &image_keys).await? == scored,
        "the stale attempt overwrote the scored images"
    );
    assert!(read_all(&factory, &mask_keys).await? == scored_masks);

    // A worker of FLUX.1-Depth-dev takes the rigid group; the run completes.
    factory.start_worker_env(
        "depth",
        0,
        &["generate"],
        &[("SYNCD_TEST_FAMILIES", "flux-depth-dev")],
    )?;
    factory
        .wait_until_completed("fenced", Duration::from_secs(120))
        .await?;
    let generated_by: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT o.spec ->> 'type', j.worker FROM jobs j JOIN objects o ON o.id = j.object_id
         WHERE j.kind = 'generate'",
    )
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    assert_eq!(generated_by["rigid"], "depth");
    assert_eq!(generated_by["deformable"], "healthy");

    // The dataset holds exactly the images that were scored.
    let index: Value = serde_json::from_slice(
        &factory
            .env
            .dataset_storage()
            .get("datasets/fenced/index.json")
            .await?,
    )?;
    let members: BTreeMap<String, Vec<u8>> = dataset_members(&factory.env, &index)
        .await?
        .into_iter()
        .collect();
    let key = group.simple().to_string();
    let record: Value = serde_json::from_slice(&members[&format!("{key}.json")])?;
    let indices: Vec<usize> = record["group_indices"]
        .as_array()
        .context("group_indices")?
        .iter()
        .filter_map(Value::as_u64)
        .map(|index| index as usize)
        .collect();
    assert!(indices.len() >= 2, "{record}");
    for (sample, index) in indices.iter().enumerate() {
        let packed = image::load_from_memory(&members[&format!("{key}.{sample}.png")])?;
        let scored = image::load_from_memory(&scored[*index])?;
        assert_eq!(
            packed.to_rgb8(),
            scored.to_rgb8(),
            "image {index} of the group"
        );
    }

    // Every worker announced itself, with the queues it takes jobs from.
    let workers = factory.cli_json(&["workers"])?;
    let routes: BTreeMap<String, Vec<String>> = workers
        .as_array()
        .context("a list of workers")?
        .iter()
        .map(|worker| {
            (
                worker["name"].as_str().unwrap_or_default().to_string(),
                strings(&worker["routes"]),
            )
        })
        .collect();
    assert_eq!(
        routes.get("healthy"),
        Some(&vec![
            "prior".to_string(),
            "generate.flux-dev".into(),
            "score".into()
        ]),
        "{workers}"
    );
    assert_eq!(
        routes.get("depth"),
        Some(&vec!["generate.flux-depth-dev".to_string()])
    );
    assert!(routes.contains_key("frozen"), "{workers}");
    let text = factory.cli(&["workers"])?;
    assert!(text.contains("healthy") && text.contains("host="), "{text}");

    // A worker that stops says so, and leaves the list of live workers.
    let status = factory.workers[2].terminate(Duration::from_secs(20))?;
    assert!(status.success(), "depth exited with {status}");
    wait_for(
        "depth gone from the live workers",
        Duration::from_secs(20),
        || async {
            let workers = factory.cli_json(&["workers"])?;
            let names = workers.as_array().map(|workers| {
                workers
                    .iter()
                    .filter_map(|worker| worker["name"].as_str().map(String::from))
                    .collect::<Vec<_>>()
            });
            Ok(names.filter(|names| !names.contains(&"depth".to_string())))
        },
    )
    .await?;
    let all = factory.cli_json(&["workers", "--all"])?;
    assert!(all.to_string().contains("\"depth\""), "{all}");
    factory.finish().await
}

/// A factory with no workers yet whose job queues have the given delivery limit.
async fn factory_with_delivery_limit(limit: u32) -> Result<Factory> {
    let mut env = TestEnv::new().await?;
    env.delivery_limit = Some(limit);
    let routes = env.direct_routes();
    Factory::start_routed(env, &routes, &routes, 0, 0).await
}

async fn generation_jobs(factory: &Factory) -> Result<Vec<(String, String, i32)>> {
    let pool = factory.env.pool().await?;
    Ok(sqlx::query_as(
        "SELECT o.spec->>'description', j.state, j.attempts FROM jobs j \
         JOIN objects o ON o.id = j.object_id WHERE j.kind = 'generate' ORDER BY o.ordinal",
    )
    .fetch_all(&pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_crashes_every_worker_is_dead_lettered_and_the_run_goes_on() -> Result<()> {
    let mut factory = factory_with_delivery_limit(2).await?;
    factory.create_run("crashing", 3)?;
    // Every worker aborts on object 1's generation, as a worker crashing inside a model would.
    for index in 0..5 {
        factory.start_worker_env(
            &format!("crashing-{index}"),
            0,
            &["generate", "score"],
            &[("SYNCD_TEST_CRASH_ON", "markings number 1")],
        )?;
    }
    factory
        .wait_until_completed("crashing", Duration::from_secs(120))
        .await?;
    let letters = factory.wait_for_dead_letters().await?;
    assert!(
        letters[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("delivered too many times")),
        "{letters}"
    );
    let jobs = generation_jobs(&factory).await?;
    let states: Vec<&str> = jobs.iter().map(|(_, state, _)| state.as_str()).collect();
    assert_eq!(
        states,
        ["succeeded", "dead_lettered", "succeeded"],
        "{jobs:?}"
    );
    // The broker stopped the job after the limit's worth of crashes: the rest of the workers
    // are alive, and nothing else was lost.
    let crashed = factory
        .workers
        .iter_mut()
        .filter_map(|worker| worker.exit_status().transpose())
        .count();
    assert!((2..=3).contains(&crashed), "{crashed} workers crashed");
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_handed_back_again_and_again_is_never_dead_lettered() -> Result<()> {
    let mut factory = factory_with_delivery_limit(1).await?;
    factory.create_run("preempted", 1)?;
    // Three workers in turn take the generation and are stopped with no grace, as preempted
    // Slurm jobs are: each hands the job back.
    for index in 0..3 {
        let name = format!("preempted-{index}");
        factory.start_worker_env(
            &name,
            60_000,
            &["generate"],
            &[("SYNCD_WORKER__SHUTDOWN_GRACE_SECS", "0")],
        )?;
        let worker = factory
            .workers
            .last_mut()
            .context("the worker just started")?;
        wait_for(
            &format!("{name} to start the job"),
            Duration::from_secs(60),
            || {
                let started = worker.log_text().contains("job started");
                async move { Ok(started.then_some(())) }
            },
        )
        .await?;
        let status = worker.terminate(Duration::from_secs(20))?;
        assert!(status.success(), "{name} exited with {status}");
        assert!(
            worker.log_text().contains("handing the job back"),
            "{}",
            worker.log_text()
        );
    }
    factory.start_worker("finisher", 0)?;
    factory
        .wait_until_completed("preempted", Duration::from_secs(120))
        .await?;
    let letters = factory.cli_json(&["dead-letters"])?;
    assert_eq!(letters.as_array().map(Vec::len), Some(0), "{letters}");
    let jobs = generation_jobs(&factory).await?;
    assert_eq!(jobs.len(), 1);
    let (_, state, attempts) = &jobs[0];
    assert_eq!((state.as_str(), *attempts), ("succeeded", 1), "{jobs:?}");
    factory.finish().await
}

/// A generation job of `object` (its model family follows from it) of no size, as the test
/// worker runs it without any S3 traffic.
fn generation_job(object: ObjectSpec) -> JobMessage {
    let object_id = ObjectId::new_random();
    JobMessage {
        version: WIRE_VERSION,
        job_id: JobId::new_random(),
        attempt: 1,
        run_id: RunId::new_random(),
        object_id,
        heartbeat_secs: 5,
        payload: JobPayload::Generate(GenerateJob {
            group_id: GroupId::derive(object_id, 0),
            object,
            prompts: vec!["a".into(), "b".into(), "c".into()],
            subject_word: "cat".into(),
            seed: 1,
            width: 8,
            height: 8,
            steps: 1,
            guidance: 3.5,
            prior: None,
            true_cfg: None,
            regeneration: None,
        }),
    }
}

/// A worker idle on several queues gets a message on each at once: it runs one and hands the
/// other back. The two messages arrive on fresh channels, so both carry delivery tag 1 (tags
/// count per channel): a worker that took a tag for a job's identity across channels would keep
/// the second message unacknowledged, unrun, for as long as it lives.
#[tokio::test(flavor = "multi_thread")]
async fn messages_arriving_together_on_two_queues_are_both_run() -> Result<()> {
    let env = TestEnv::new().await?;
    let config = env.broker_config();
    let topology = Topology::new(&config);
    let connection = broker::connect(&config, Duration::from_secs(30)).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    let worker_config = env.write_worker_config("racing", &["generate"], "")?;
    let mut worker = Process::start(
        "racing",
        &binary("syncd-test-worker")?,
        &["--config", &worker_config.to_string_lossy()],
        env.dir.path(),
        &[("SYNCD_TEST_SKIP_S3", "1")],
    )?;
    let jobs = [
        generation_job(ObjectSpec::Deformable {
            category: "cat".into(),
            description: "a cat".into(),
        }),
        generation_job(ObjectSpec::Rigid {
            uid: "ring".into(),
            caption: "a ring".into(),
            asset_key: "assets/ring.glb".into(),
        }),
    ];
    let queues: Vec<String> = jobs
        .iter()
        .map(|job| topology.job_queue(job.payload.route()))
        .collect();
    assert_ne!(queues[0], queues[1], "one queue per model family");
    // Both queues empty and subscribed: the worker waits on both at once.
    wait_for(
        "the worker to subscribe to both generation queues",
        Duration::from_secs(60),
        || async {
            let mut subscribed = true;
            for queue in &queues {
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                subscribed &= declared.consumer_count() == 1;
            }
            Ok(subscribed.then_some(()))
        },
    )
    .await
    .with_context(|| worker.log_text())?;

    let bodies: Vec<Vec<u8>> = jobs.iter().map(JobMessage::encode).collect();
    let ids: Vec<String> = jobs.iter().map(|job| job.job_id.to_string()).collect();
    let outgoing: Vec<Outgoing> = (0..jobs.len())
        .map(|index| Outgoing {
            queue: &queues[index],
            message_id: &ids[index],
            body: &bodies[index],
            traceparent: None,
        })
        .collect();
    let publisher = Publisher::open(&connection).await?;
    for confirmed in publisher
        .publish_all(&outgoing, Duration::from_secs(10))
        .await?
    {
        confirmed?;
    }

    let mut results = channel
        .basic_consume(
            topology.results_queue().as_str().into(),
            "test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut succeeded = BTreeSet::new();
    let expected: BTreeSet<JobId> = jobs.iter().map(|job| job.job_id).collect();
    let all_reported = async {
        while succeeded != expected {
            let delivery = results
                .next()
                .await
                .context("the results consumer ended")??;
            let report = WorkerReport::decode(&delivery.data)?;
            if matches!(report.event, ReportEvent::Succeeded { .. }) {
                succeeded.insert(report.job_id);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), all_reported)
        .await
        .with_context(|| {
            format!(
                "only {} of the 2 jobs were run\n{}",
                succeeded.len(),
                worker.log_text()
            )
        })??;
    worker.terminate(Duration::from_secs(30))?;
    Ok(())
}
