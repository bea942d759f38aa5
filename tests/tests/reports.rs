//! Applying worker reports (`syncd_coordinator::results`) on the real PostgreSQL: a batch's
//! starts applied together in one statement leave exactly what applying every report one at a
//! time leaves, for the usual starts and for every start the set-based path must leave alone.

use anyhow::Result;
use sqlx::PgPool;
use syncd_coordinator::db::jobs::{self, NewJob};
use syncd_coordinator::results::{self, BatchReads};
use syncd_proto::messages::{
    JobPayload, ReportEvent, ScoreJob, Service, WorkerReport, WIRE_VERSION,
};
use syncd_proto::JobId;
use syncd_tests::env::TestEnv;
use syncd_tests::synthetic::SyntheticRun;

/// Four jobs of a fresh run: the first three queued at attempt 1, the last still pending.
async fn jobs_of_a_new_run(pool: &PgPool, name: &str) -> Result<Vec<JobId>> {
    let mut run = SyntheticRun::create(pool, name).await?;
    let groups = run.add_groups(pool, 4).await?;
    let new_jobs = groups
        .iter()
        .map(|group| NewJob {
            run_id: run.id,
            object_id: run.object(),
            group_id: Some(*group),
            payload: JobPayload::Score(ScoreJob {
                group_id: *group,
                image_keys: Vec::new(),
                mask_keys: Vec::new(),
                aesthetic_head: None,
            }),
            max_attempts: 3,
            lease_secs: 60,
        })
        .collect();
    let mut tx = pool.begin().await?;
    let ids = jobs::insert_many(&mut tx, new_jobs).await?;
    let mut due = Vec::new();
    for id in &ids[..3] {
        due.extend(jobs::get(&mut tx, *id).await?);
    }
    jobs::queue_many(&mut tx, &due).await?;
    tx.commit().await?;
    Ok(ids)
}

/// One batch over `ids`: a usual start, a start delivered twice (the second is a redelivery),
/// a start of another attempt, a heartbeat after a start, a start of an unknown job and one of a
/// job not yet queued.
fn batch(ids: &[JobId]) -> Vec<WorkerReport> {
    let report = |job: JobId, attempt: u32, worker: &str, event: ReportEvent| WorkerReport {
        version: WIRE_VERSION,
        job_id: job,
        attempt,
        worker: worker.to_string(),
        event,
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
    ]
}

/// A job's event: attempt, from, to, worker, detail.
type Event = (i32, Option<String>, String, Option<String>, Option<String>);

/// What the reports left, for each job in order: its row and its history, times left out.
async fn outcome(pool: &PgPool, ids: &[JobId]) -> Result<Vec<String>> {
    let mut outcome = Vec::new();
    for id in ids {
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
    Ok(outcome)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_applied_as_the_results_consumer_does_leaves_what_one_at_a_time_leaves(
) -> Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.migrated_pool().await?;

    // One at a time, as a batch retried with savepoints applies it.
    let one_by_one = jobs_of_a_new_run(&pool, "one by one").await?;
    let mut tx = pool.begin().await?;
    let mut reads = BatchReads::default();
    for report in batch(&one_by_one) {
        results::apply(&mut tx, &report, &mut reads).await?;
    }
    tx.commit().await?;

    // The starts together, then the other reports' jobs locked together, then those reports
    // one at a time: what the results consumer does.
    let together = jobs_of_a_new_run(&pool, "together").await?;
    let reports = batch(&together);
    let mut tx = pool.begin().await?;
    let mut reads = BatchReads::default();
    let batch: Vec<&WorkerReport> = reports.iter().collect();
    let applied = results::prepare_batch(&mut tx, &batch, &mut reads).await?;
    assert_eq!(
        applied,
        [true, true, false, false, false, false, false],
        "only the first delivery of each usual start is applied together"
    );
    for (report, _) in batch.iter().zip(&applied).filter(|(_, applied)| !**applied) {
        results::apply(&mut tx, report, &mut reads).await?;
    }
    tx.commit().await?;

    let expected = outcome(&pool, &one_by_one).await?;
    assert_eq!(outcome(&pool, &together).await?, expected);
    // And what that is: started and then waiting, redelivered, ignored, untouched.
    assert!(
        expected[0].starts_with("running 1 Some(\"w1\") leased=true Some(\"storage\")"),
        "{expected:#?}"
    );
    for what in [
        "redelivered to another worker",
        "ignored started report for attempt 2",
        "pending 0 None",
    ] {
        assert!(
            expected.iter().any(|line| line.contains(what)),
            "{what}: {expected:#?}"
        );
    }
    env.cleanup().await
}
