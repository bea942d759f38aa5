//! The dispatcher (`syncd_coordinator::dispatcher`) on the real PostgreSQL: each route keeps at
//! most `max_queued_per_route` jobs in flight, counted from the run tallies, and gets room back
//! as its jobs leave flight, whichever statement moves them.

use anyhow::Result;
use sqlx::PgPool;
use std::collections::BTreeMap;
use syncd_coordinator::db::jobs::{self, Change, NewJob};
use syncd_coordinator::db::run_tallies;
use syncd_coordinator::dispatcher;
use syncd_coordinator::state::JobState;
use syncd_infra::broker::Topology;
use syncd_proto::messages::{JobPayload, PriorJob, Route, ScoreJob};
use syncd_proto::JobId;
use syncd_tests::env::TestEnv;
use syncd_tests::factory::assert_tallies_match;
use syncd_tests::synthetic::SyntheticRun;

/// The room each route gets in these tests.
const LIMIT: i64 = 3;

/// Jobs in flight per route, counted in the jobs table row by row.
async fn in_flight_rows(pool: &PgPool) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT route, count(*) FROM jobs WHERE state IN ('queued', 'running') GROUP BY route",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Messages waiting in the outbox per queue.
async fn outbox_by_queue(pool: &PgPool) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT queue, count(*) FROM outbox GROUP BY queue")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Moves `job` to `to` through the job state machine, as a report would.
async fn move_job(pool: &PgPool, job: JobId, to: JobState) -> Result<()> {
    let mut tx = pool.begin().await?;
    let row = jobs::lock(&mut tx, job).await?.expect("the job exists");
    jobs::transition(&mut tx, &row, to, Change::default()).await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_route_keeps_its_limit_in_flight_counted_from_the_tallies() -> Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.migrated_pool().await?;
    let topology = Topology::new(&env.broker_config());
    let mut run = SyntheticRun::create(&pool, "dispatch").await?;
    let groups = run.add_groups(&pool, 6).await?;
    // Six scoring jobs and five prior jobs: two routes, each with more due than its room.
    let scoring = groups.iter().map(|group| {
        JobPayload::Score(ScoreJob {
            group_id: *group,
            image_keys: Vec::new(),
            mask_keys: Vec::new(),
            aesthetic_head: None,
        })
    });
    let priors = (0..5).map(|index| {
        JobPayload::Prior(PriorJob {
            uid: format!("asset-{index}"),
            asset_key: format!("assets/asset-{index}.glb"),
            views: 8,
            max_triplets: 2,
            resolution: 64,
            seed: index,
        })
    });
    let new_jobs = scoring
        .chain(priors)
        .map(|payload| NewJob {
            run_id: run.id,
            object_id: run.object(),
            group_id: None,
            payload,
            max_attempts: 3,
            lease_secs: 60,
        })
        .collect();
    let mut tx = pool.begin().await?;
    jobs::insert_many(&mut tx, new_jobs).await?;
    tx.commit().await?;
    let (score, prior) = (Route::Score.as_str(), Route::Prior.as_str());
    let expect = |scores: i64, priors: i64| {
        BTreeMap::from([(prior.to_string(), priors), (score.to_string(), scores)])
    };

    // Each route gets its room, and a second pass finds none.
    assert_eq!(dispatcher::dispatch_due(&pool, &topology, LIMIT).await?, 6);
    assert_eq!(in_flight_rows(&pool).await?, expect(3, 3));
    assert_eq!(dispatcher::dispatch_due(&pool, &topology, LIMIT).await?, 0);
    assert_eq!(in_flight_rows(&pool).await?, expect(3, 3));

    // A job that starts stays in flight; one that succeeds, and one that a plain statement
    // takes out of flight, each make room for one more of their route.
    let queued: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, route FROM jobs WHERE state = 'queued' ORDER BY route, created_at",
    )
    .fetch_all(&pool)
    .await?;
    let of_route = |route: &str| -> Vec<JobId> {
        queued
            .iter()
            .filter(|(_, queued_route)| queued_route == route)
            .map(|(id, _)| JobId(*id))
            .collect()
    };
    let (queued_scores, queued_priors) = (of_route(score), of_route(prior));
    move_job(&pool, queued_scores[0], JobState::Running).await?;
    move_job(&pool, queued_scores[1], JobState::Running).await?;
    move_job(&pool, queued_scores[1], JobState::Succeeded).await?;
    sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1")
        .bind(queued_priors[0].0)
        .execute(&pool)
        .await?;
    assert_eq!(dispatcher::dispatch_due(&pool, &topology, LIMIT).await?, 2);
    assert_eq!(in_flight_rows(&pool).await?, expect(3, 3));

    // Every job queued has its message, on its route's queue.
    assert_eq!(
        outbox_by_queue(&pool).await?,
        BTreeMap::from([
            (topology.job_queue(Route::Prior), 4),
            (topology.job_queue(Route::Score), 4)
        ])
    );
    // The tallies the dispatcher read agree with the rows.
    assert_tallies_match(&pool).await?;
    assert_eq!(
        run_tallies::in_flight_by_route(&pool).await?,
        [(Route::Score, 3), (Route::Prior, 3)].into()
    );
    Ok(())
}
