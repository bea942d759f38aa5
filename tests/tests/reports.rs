//! Applying worker reports (`syncd_coordinator::results`) on the real PostgreSQL: a batch's
//! starts applied together in one statement, and the successes, images, scoring jobs, decisions
//! and near-duplicate index entries it writes together at its end, leave exactly what applying
//! every report one at a time leaves, for the usual reports and for every one the set-based paths
//! must leave alone.

use anyhow::Result;
use sqlx::PgPool;
use syncd_coordinator::db::jobs::{self, NewJob};
use syncd_coordinator::results::{self, ReportBatch};
use syncd_proto::keys;
use syncd_proto::messages::{
    GenerateJob, GenerateOutput, JobOutput, JobPayload, ObjectSpec, PairSimilarity, ReportEvent,
    ScoreJob, ScoreOutput, Service, WorkerReport, WIRE_VERSION,
};
use syncd_proto::{GroupId, JobId, RunId};
use syncd_tests::env::TestEnv;
use syncd_tests::synthetic::SyntheticRun;

/// A fresh run's jobs, one per group.
struct NewRun {
    id: RunId,
    groups: Vec<GroupId>,
    jobs: Vec<JobId>,
}

/// Seven jobs of a fresh run, one per group: the first three scoring jobs queued at attempt 1,
/// the fourth a scoring job still pending, the fifth a generation and the sixth and seventh
/// scoring jobs, all three queued at attempt 1.
async fn jobs_of_a_new_run(pool: &PgPool, name: &str) -> Result<NewRun> {
    let mut run = SyntheticRun::create(pool, name).await?;
    let groups = run.add_groups(pool, 7).await?;
    let scoring = |group: GroupId| {
        JobPayload::Score(ScoreJob {
            group_id: group,
            image_keys: Vec::new(),
            mask_keys: Vec::new(),
            aesthetic_head: None,
        })
    };
    let generation = |group: GroupId| {
        JobPayload::Generate(GenerateJob {
            group_id: group,
            object: ObjectSpec::Deformable {
                category: "cat".into(),
                description: "a cat".into(),
            },
            prompts: vec!["a cat on a sofa".into(); 3],
            subject_word: "cat".into(),
            seed: 1,
            width: 64,
            height: 64,
            steps: 1,
            guidance: 3.5,
            prior: None,
            true_cfg: None,
            regeneration: None,
        })
    };
    let new_jobs = groups
        .iter()
        .enumerate()
        .map(|(index, group)| NewJob {
            run_id: run.id,
            object_id: run.object(),
            group_id: Some(*group),
            payload: match index {
                4 => generation(*group),
                _ => scoring(*group),
            },
            max_attempts: 3,
            lease_secs: 60,
        })
        .collect();
    let mut tx = pool.begin().await?;
    let ids = jobs::insert_many(&mut tx, new_jobs).await?;
    let mut due = Vec::new();
    for id in [ids[0], ids[1], ids[2], ids[4], ids[5], ids[6]] {
        due.extend(jobs::get(&mut tx, id).await?);
    }
    jobs::queue_many(&mut tx, &due).await?;
    tx.commit().await?;
    Ok(NewRun {
        id: run.id,
        groups,
        jobs: ids,
    })
}

/// One batch over `run`'s jobs: a usual start, a start delivered twice (the second is a
/// redelivery), a start of another attempt, a heartbeat after a start, a start of an unknown
/// job, one of a job not yet queued, and three successes of queued jobs: a generation's and two
/// scoring jobs' (the first accepted, the second a near duplicate of it).
fn batch(run: &NewRun) -> Vec<WorkerReport> {
    let ids = &run.jobs;
    let report = |job: JobId, attempt: u32, worker: &str, event: ReportEvent| WorkerReport {
        version: WIRE_VERSION,
        job_id: job,
        attempt,
        worker: worker.to_string(),
        event,
    };
    let prefix = keys::generation_attempt_prefix(run.id, run.groups[4], None, 1);
    let generated = JobOutput::Generate(GenerateOutput {
        image_keys: (0..3).map(|i| format!("{prefix}image-{i}.png")).collect(),
        mask_keys: (0..3).map(|i| format!("{prefix}mask-{i}.png")).collect(),
    });
    let scored = JobOutput::Score(ScoreOutput {
        aesthetic: vec![6.5; 3],
        pairs: [(0, 1), (0, 2), (1, 2)]
            .map(|(a, b)| PairSimilarity {
                a,
                b,
                similarity: 0.8,
            })
            .to_vec(),
        embeddings: vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.6, 0.8]],
    });
    let scored_again = JobOutput::Score(ScoreOutput {
        embeddings: vec![vec![0.6, 0.8], vec![0.0, 1.0], vec![1.0, 0.0]],
        ..match &scored {
            JobOutput::Score(scores) => scores.clone(),
            _ => unreachable!(),
        }
    });
    let succeeded = |output| ReportEvent::Succeeded {
        output,
        duration_ms: 5,
        provenance: None,
    };
    vec![
        report(ids[0], 1, "w1", ReportEvent::Started),
        report(ids[1], 1, "w1", ReportEvent::Started),
        report(ids[1], 1, "w2", ReportEvent::Started),
        report(ids[2], 2, "w1", ReportEvent::Started),
        report(
            ids[0],
            1,
            "w1",
            ReportEvent::Heartbeat {
                waiting_for: Some(Service::Storage),
            },
        ),
        report(JobId::new_random(), 1, "w3", ReportEvent::Started),
        report(ids[3], 1, "w3", ReportEvent::Started),
        report(ids[4], 1, "w4", succeeded(generated)),
        report(ids[5], 1, "w5", succeeded(scored)),
        report(ids[6], 1, "w6", succeeded(scored_again)),
    ]
}

/// A job's event: attempt, from, to, worker, detail.
type Event = (i32, Option<String>, String, Option<String>, Option<String>);

/// What the reports left, for each job in order: its row and its history; for each group, its
/// images, decision and jobs (those the reports made included); times and ids left out.
async fn outcome(pool: &PgPool, run: &NewRun) -> Result<Vec<String>> {
    let mut outcome = Vec::new();
    for id in &run.jobs {
        let (state, attempts, worker, leased, waiting): (
            String,
            i32,
            Option<String>,
            bool,
            Option<String>,
        ) = sqlx::query_as(
            "SELECT state, attempts, worker, lease_expires_at IS NOT NULL, waiting_for
                 FROM jobs WHERE id = $1",
        )
        .bind(id.0)
        .fetch_one(pool)
        .await?;
        outcome.push(format!(
            "{state} {attempts} {worker:?} leased={leased} {waiting:?}"
        ));
        let events: Vec<Event> = sqlx::query_as(
            "SELECT attempt, from_state, to_state, worker, detail FROM job_events
                 WHERE job_id = $1 ORDER BY id",
        )
        .bind(id.0)
        .fetch_all(pool)
        .await?;
        outcome.extend(events.iter().map(|event| format!("  {event:?}")));
    }
    for group in &run.groups {
        let (images, masks, decision, reason, jobs): (
            Option<serde_json::Value>,
            Option<serde_json::Value>,
            String,
            Option<String>,
            Vec<String>,
        ) = sqlx::query_as(
            "SELECT g.image_keys, g.mask_keys, g.decision, g.reason,
                    ARRAY(SELECT j.kind || ' ' || j.state || ' ' || j.payload::text FROM jobs j
                          WHERE j.group_id = g.id ORDER BY j.kind, j.created_at)
                 FROM groups g WHERE g.id = $1",
        )
        .bind(group.0)
        .fetch_one(pool)
        .await?;
        outcome.push(format!(
            "group {images:?} {masks:?} {decision} {reason:?} {jobs:?}"
        ));
    }
    // The order of the decisions, and what the near-duplicate index holds.
    let decided: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM groups WHERE run_id = $1 AND decided_at IS NOT NULL ORDER BY decided_at",
    )
    .bind(run.id.0)
    .fetch_all(pool)
    .await?;
    outcome.push(format!("decided in order: {decided:?}"));
    let indexed: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT i.group_id,
                (SELECT count(*) FROM near_duplicate_buckets b WHERE b.group_id = i.group_id)
         FROM near_duplicate_images i WHERE i.run_id = $1 GROUP BY i.group_id",
    )
    .bind(run.id.0)
    .fetch_all(pool)
    .await?;
    outcome.push(format!("indexed with their buckets: {indexed:?}"));
    // The two runs' ids differ, and so do their groups' and the keys made from them.
    let mut ids = vec![(run.id.to_string(), "RUN".to_string())];
    for (index, group) in run.groups.iter().enumerate() {
        ids.push((group.to_string(), format!("GROUP-{index}")));
    }
    Ok(outcome
        .into_iter()
        .map(|line| {
            ids.iter()
                .fold(line, |line, (id, name)| line.replace(id, name))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_applied_as_the_results_consumer_does_leaves_what_one_at_a_time_leaves(
) -> Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.migrated_pool().await?;

    // One at a time, as a batch retried with savepoints applies it.
    let one_by_one = jobs_of_a_new_run(&pool, "one by one").await?;
    let mut tx = pool.begin().await?;
    let mut reports = ReportBatch::default();
    for report in batch(&one_by_one) {
        results::apply(&mut tx, &report, &mut reports).await?;
    }
    reports.finish(&mut tx).await?;
    tx.commit().await?;

    // The starts together, then the other reports' jobs locked together, then those reports
    // one at a time, then the writes they left for the end: what the results consumer does.
    let together = jobs_of_a_new_run(&pool, "together").await?;
    let reports = batch(&together);
    let mut tx = pool.begin().await?;
    let mut shared = ReportBatch::default();
    let batch: Vec<&WorkerReport> = reports.iter().collect();
    let applied = results::prepare_batch(&mut tx, &batch, &mut shared).await?;
    assert_eq!(
        applied,
        [true, true, false, false, false, false, false, false, false, false],
        "only the first delivery of each usual start is applied together"
    );
    for (report, _) in batch.iter().zip(&applied).filter(|(_, applied)| !**applied) {
        results::apply(&mut tx, report, &mut shared).await?;
    }
    let written_before_the_end: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE run_id = $1 AND state = 'succeeded'),
                (SELECT count(*) FROM groups WHERE run_id = $1 AND decision <> 'pending'),
                (SELECT count(*) FROM near_duplicate_images WHERE run_id = $1)",
    )
    .bind(together.id.0)
    .fetch_one(&mut *tx)
    .await?;
    assert_eq!(
        written_before_the_end,
        (0, 0, 0),
        "the successes, decisions and index entries are written at the batch's end"
    );
    shared.finish(&mut tx).await?;
    tx.commit().await?;

    let expected = outcome(&pool, &one_by_one).await?;
    assert_eq!(outcome(&pool, &together).await?, expected);
    let kinds_and_states = |what: &str| expected.iter().filter(|l| l.contains(what)).count();
    // And what that is: started and then waiting, redelivered, ignored, untouched.
    assert!(
        expected[0].starts_with("running 1 Some(\"w1\") leased=true Some(\"storage\")"),
        "{expected:#?}"
    );
    assert_eq!(kinds_and_states("succeeded 1 Some(\"w"), 3, "{expected:#?}");
    assert_eq!(kinds_and_states("\"score queued"), 1, "{expected:#?}");
    assert_eq!(
        kinds_and_states("\"score pending"),
        2,
        "the scoring job the generation made, and the one not yet queued: {expected:#?}"
    );
    for what in [
        "redelivered to another worker",
        "ignored started report for attempt 2",
        "pending 0 None",
        "image-0.png",
        " accepted Some(",
        " near_duplicate Some(\"near duplicate of group GROUP-5 (DINOv2 cosine 1.0000",
        "decided in order: [GROUP-5, GROUP-6]",
        "indexed with their buckets: [(GROUP-5, ",
    ] {
        assert!(
            expected.iter().any(|line| line.contains(what)),
            "{what}: {expected:#?}"
        );
    }
    env.cleanup().await
}
