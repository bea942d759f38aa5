//! Prompt jobs: the LLM prompt stage ([`crate::prompt`]) behind the job interface.

use crate::prompt::{PromptConfig, PromptGenerator};
use crate::runner::{JobContext, JobError, JobRunner};
use async_trait::async_trait;
use syncd_infra::outage::{Service, Unreachable};
use syncd_proto::messages::{JobKind, JobMessage, JobOutput, JobPayload};

pub struct PromptRunner {
    generator: PromptGenerator,
}

impl PromptRunner {
    pub fn new(config: PromptConfig) -> anyhow::Result<Self> {
        Ok(Self {
            generator: PromptGenerator::new(config)?,
        })
    }
}

#[async_trait]
impl JobRunner for PromptRunner {
    fn kind(&self) -> JobKind {
        JobKind::Prompt
    }

    async fn run(&self, job: &JobMessage, _context: &JobContext) -> Result<JobOutput, JobError> {
        let JobPayload::Prompt(prompt) = &job.payload else {
            return Err(JobError::permanent(anyhow::anyhow!("not a prompt job")));
        };
        match self.generator.run(prompt).await {
            Ok(output) => Ok(JobOutput::Prompt(output)),
            Err(error) => {
                let outage = error.is_llm_outage();
                let mut job_error = JobError {
                    failure: error.failure_kind(),
                    error: anyhow::Error::new(error),
                    device_fault: false,
                };
                if outage {
                    job_error.error = job_error.error.context(Unreachable {
                        service: Service::Llm,
                    });
                }
                Err(job_error)
            }
        }
    }
}
