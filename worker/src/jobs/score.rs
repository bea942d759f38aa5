//! Scoring jobs: download a group's images and masks, score them with the [`Scorer`] (aesthetic
//! per image, DINOv2 similarity per pair of object crops) on a blocking thread, and return the
//! scores. An image that does not decode fails the job permanently: another attempt would read
//! the same bytes.

use crate::models::aesthetic::AestheticHeadKind;
use crate::runner::{JobContext, JobError, JobRunner};
use crate::scoring::scorer::{decode_image, decode_mask, Scorer};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use syncd_proto::messages::{AestheticHead, JobKind, JobMessage, JobOutput, JobPayload};

pub struct ScoreRunner {
    /// libtorch tensors may move between threads but not be shared, so the models sit behind a
    /// lock; the worker runs one job at a time anyway.
    scorer: Arc<Mutex<Scorer>>,
    /// The loaded aesthetic predictor, as jobs name it.
    head: AestheticHead,
}

impl ScoreRunner {
    pub fn new(scorer: Scorer) -> Self {
        // The models know nothing of the wire; the job boundary translates.
        let head = match scorer.aesthetic_head_kind() {
            AestheticHeadKind::Linear => AestheticHead::Linear,
            AestheticHeadKind::Mlp => AestheticHead::Mlp,
        };
        Self {
            scorer: Arc::new(Mutex::new(scorer)),
            head,
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
        if let Some(wanted) = score.aesthetic_head.filter(|&wanted| wanted != self.head) {
            return Err(JobError::permanent(anyhow::anyhow!(
                "the run's filter is meant for the {wanted} aesthetic head and this worker scores \
                 with the {} head ([scoring] aesthetic_head): their scores are not comparable",
                self.head
            )));
        }
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
