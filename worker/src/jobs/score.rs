//! Scoring jobs: download a group's images and masks, score them with the [`Scorer`] (aesthetic
//! per image, DINOv2 similarity per pair of object crops) on the scorer's own thread, and return
//! the scores. An image that does not decode fails the job permanently: another attempt would
//! read the same bytes.

use crate::device::{model_failure, ModelThread};
use crate::runner::{JobContext, JobError, JobRunner, ModelSetup};
use crate::scoring::scorer::{decode_image, decode_mask, Scorer};
use async_trait::async_trait;
use syncd_models::aesthetic::AestheticHeadKind;
use syncd_proto::messages::{AestheticHead, JobKind, JobMessage, JobOutput, JobPayload};
use tracing::Instrument;

pub struct ScoreRunner {
    scorer: ModelThread<Scorer>,
    /// The loaded aesthetic predictor, as jobs name it.
    head: AestheticHead,
    setup: ModelSetup,
}

impl ScoreRunner {
    /// `setup` identifies the scorer's models in the provenance of every score.
    pub fn new(scorer: Scorer, setup: ModelSetup) -> anyhow::Result<Self> {
        // The models know nothing of the wire; the job boundary translates.
        let head = match scorer.aesthetic_head_kind() {
            AestheticHeadKind::Linear => AestheticHead::Linear,
            AestheticHeadKind::Mlp => AestheticHead::Mlp,
        };
        Ok(Self {
            scorer: ModelThread::spawn("score", scorer)?,
            head,
            setup,
        })
    }
}

#[async_trait]
impl JobRunner for ScoreRunner {
    fn kind(&self) -> JobKind {
        JobKind::Score
    }

    fn models(&self) -> Vec<String> {
        vec![
            "dinov2".into(),
            "clip-vision".into(),
            format!("aesthetic-{}", self.head),
        ]
    }

    fn model_setup(&self) -> Option<ModelSetup> {
        Some(self.setup.clone())
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
        let output = self
            .scorer
            .run(move |scorer| scorer.score_group(&images, &masks).map_err(model_failure))
            .instrument(tracing::info_span!("score group"))
            .await?;
        Ok(JobOutput::Score(output))
    }
}
