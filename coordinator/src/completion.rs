//! Finishing runs: an active run whose objects are all in a terminal state gets its dataset
//! assembled and becomes `completed`. Assembly failures are recorded on the run and retried on
//! the next pass, so a storage outage delays completion without losing anything.

use crate::dataset;
use crate::planner;
use anyhow::Result;
use sqlx::PgPool;
use syncd_infra::storage::Storage;
use syncd_proto::RunId;

/// Assembles the datasets of finished runs: images read from `work`, shards written to
/// `datasets`.
pub async fn complete_finished_runs(
    pool: &PgPool,
    work: &Storage,
    datasets: &Storage,
) -> Result<()> {
    let finished: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT r.id FROM runs r
         WHERE r.state = 'active'
           AND NOT EXISTS (SELECT 1 FROM objects o WHERE o.run_id = r.id AND o.state = 'active')
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.id
                           AND j.state IN ('pending', 'queued', 'running', 'retry_wait'))",
    )
    .fetch_all(pool)
    .await?;
    for (run,) in finished {
        let run = RunId(run);
        let (config, _) = planner::load_run_config(&mut *pool.acquire().await?, run).await?;
        match dataset::assemble(pool, work, datasets, run, &config).await {
            Ok(index) => {
                sqlx::query(
                    "UPDATE runs SET state = 'completed', dataset_state = 'written', dataset_error = NULL,
                         completed_at = now(), updated_at = now()
                     WHERE id = $1 AND state = 'active'",
                )
                .bind(run.0)
                .execute(pool)
                .await?;
                tracing::info!(%run, samples = index.samples, shards = index.shards.len(), "run completed");
            }
            Err(error) => {
                tracing::error!(%run, error = format!("{error:#}"), "dataset assembly failed; will retry");
                sqlx::query("UPDATE runs SET dataset_state = 'failed', dataset_error = $2, updated_at = now() WHERE id = $1")
                    .bind(run.0)
                    .bind(format!("{error:#}"))
                    .execute(pool)
                    .await?;
            }
        }
    }
    Ok(())
}
