//! 3D-prior jobs: download the asset, compute depth, masks and correspondences with
//! [`syncd_prior`] on a blocking thread (it is CPU work measured in seconds), and upload every
//! file under the run's key layout. An asset the prior cannot use fails permanently, so the
//! coordinator skips the object instead of retrying it.

use crate::runner::{JobContext, JobError, JobRunner};
use async_trait::async_trait;
use syncd_proto::messages::{JobKind, JobMessage, JobOutput, JobPayload, PriorOutput};

pub struct PriorRunner;

#[async_trait]
impl JobRunner for PriorRunner {
    fn kind(&self) -> JobKind {
        JobKind::Prior
    }

    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Prior(prior) = &job.payload else {
            return Err(JobError::permanent(anyhow::anyhow!("not a prior job")));
        };
        let asset = context.storage.get(&prior.asset_key).await?;
        let request = prior.clone();
        let artifacts =
            tokio::task::spawn_blocking(move || syncd_prior::run_prior_job(&asset, &request))
                .await
                .map_err(|panic| {
                    JobError::transient(anyhow::anyhow!("the prior computation panicked: {panic}"))
                })?
                .map_err(JobError::permanent)?;
        for (key, bytes, content_type) in artifacts.files(job.run_id, job.object_id) {
            context
                .storage
                .put(&key, bytes.to_vec(), content_type)
                .await?;
        }
        let triplets = artifacts
            .triplets
            .iter()
            .map(|triplet| triplet.triplet.clone())
            .collect();
        Ok(JobOutput::Prior(PriorOutput { triplets }))
    }
}
