//! Scoring jobs: download a group's images and masks, score them with the [`Scorer`] (aesthetic
//! per image, DINOv2 similarity per pair of object crops) on a blocking thread, and return the
//! scores. An image that does not decode fails the job permanently: another attempt would read
//! the same bytes.

use crate::runner::{JobContext, JobError, JobRunner};
use crate::scoring::scorer::{decode_image, decode_mask, Scorer};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use syncd_proto::messages::{JobKind, JobMessage, JobOutput, JobPayload};

pub struct ScoreRunner {
    /// libtorch tensors may move between threads but not be shared, so the models sit behind a
    /// lock; the worker runs one job at a time anyway.
    scorer: Arc<Mutex<Scorer>>,
}

impl ScoreRunner {
    pub fn new(scorer: Scorer) -> Self {
        Self {
            scorer: Arc::new(Mutex::new(scorer)),
        }
    }
}

#[async_trait]
impl JobRunner for ScoreRunner {
    fn kind(&self) -> JobKind {
        JobKind::Score
    }

    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Score(score) = &job.payload else {
            return Err(JobError::permanent(anyhow::anyhow!("not a scoring job")));
        };
        let mut images = Vec::with_capacity(score.image_keys.len());
        for key in &score.image_keys {
            let bytes = context.storage.get(key).await?;
            images.push(decode_image(&bytes).map_err(JobError::permanent)?);
        }
        let mut masks = Vec::with_capacity(score.mask_keys.len());
        for key in &score.mask_keys {
            let bytes = context.storage.get(key).await?;
            masks.push(decode_mask(&bytes).map_err(JobError::permanent)?);
        }
        let scorer = self.scorer.clone();
        let output = tokio::task::spawn_blocking(move || {
            let scorer = scorer
                .lock()
                .map_err(|_| anyhow::anyhow!("a previous scoring job panicked"))?;
            scorer.score_group(&images, &masks)
        })
        .await
        .map_err(|panic| JobError::transient(anyhow::anyhow!("scoring panicked: {panic}")))??;
        Ok(JobOutput::Score(output))
    }
}
