//! The prompt stage: asks an LLM for the captions a [`PromptJob`] wants.
//!
//! Layout:
//! - [`client`]: an OpenAI-compatible chat-completions client with retries and typed errors.
//! - [`requests`]: the three requests of the SynCD reference and their wording.
//! - [`cleaning`]: turning a chatty answer into caption lines.
//! - this file: [`PromptGenerator`], which sends as many requests as a job needs and assembles
//!   the [`PromptOutput`].
//!
//! A rigid object gets background captions (its Cap3D caption is the object). A deformable
//! category gets background captions naming the category and detailed descriptions of the
//! animal. Each list is filled by requests of a fixed size (10 per rigid asset, 25 per
//! deformable request, as the reference) until the job's count of distinct usable lines is
//! reached; an LLM that keeps answering too few usable lines gets a bounded number of extra
//! requests, then the job fails saying how many lines it got.

pub mod cleaning;
pub mod client;
pub mod requests;

pub use client::{ChatAnswer, LlmClient, LlmConfig, LlmError, LlmFailure};
pub use requests::RequestKind;

use cleaning::UniqueLines;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use syncd_proto::messages::{FailureKind, ObjectSpec, PromptJob, PromptOutput};

/// How the prompt stage uses the LLM. Deserialised from the worker configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub llm: LlmConfig,
    /// Captions asked for per rigid request; the reference asks 10 per asset.
    #[serde(default = "default_rigid_per_request")]
    pub rigid_per_request: u32,
    /// Captions (backgrounds or descriptions) asked for per deformable request; the reference
    /// asks 25 per request, 6 requests per category.
    #[serde(default = "default_deformable_per_request")]
    pub deformable_per_request: u32,
    /// Requests allowed per list beyond the number that would fill it if every line were usable
    /// and distinct. Answers contain duplicates and lines the cleaning drops; this bounds how
    /// long a model that keeps answering nonsense is asked.
    #[serde(default = "default_extra_requests")]
    pub extra_requests: u32,
    /// Requests of one list in flight at once. Servers such as vLLM batch concurrent requests,
    /// so a few in flight cost little more than one.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_rigid_per_request() -> u32 {
    10
}
fn default_deformable_per_request() -> u32 {
    25
}
fn default_extra_requests() -> u32 {
    4
}
fn default_concurrency() -> usize {
    4
}

impl PromptConfig {
    /// The reference's request sizes and the default limits around `llm`.
    pub fn new(llm: LlmConfig) -> Self {
        Self {
            llm,
            rigid_per_request: default_rigid_per_request(),
            deformable_per_request: default_deformable_per_request(),
            extra_requests: default_extra_requests(),
            concurrency: default_concurrency(),
        }
    }

    fn per_request(&self, kind: RequestKind) -> u32 {
        match kind {
            RequestKind::RigidBackgrounds => self.rigid_per_request,
            RequestKind::DeformableBackgrounds | RequestKind::DeformableDescriptions => {
                self.deformable_per_request
            }
        }
    }
}

/// Why a prompt job failed.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The LLM could not be asked (see [`LlmError`] for whether that may pass).
    #[error("asking for {kind} of {subject:?}: {error}")]
    Llm {
        kind: RequestKind,
        subject: String,
        error: LlmError,
    },
    /// The LLM answered, but not enough distinct usable lines within the request budget.
    #[error(
        "the llm gave only {obtained} usable {kind} of {subject:?} in {requests} requests, \
         {wanted} were asked for"
    )]
    TooFewLines {
        kind: RequestKind,
        subject: String,
        obtained: usize,
        wanted: usize,
        requests: u32,
    },
    /// The job itself cannot be served (an empty caption or category).
    #[error("invalid prompt job: {0}")]
    InvalidJob(String),
}

impl PromptError {
    /// What the coordinator should do with the job: transient LLM trouble is retried; a refused
    /// request, an object the LLM cannot caption or an invalid job is not.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            PromptError::Llm { error, .. } => error.failure_kind(),
            PromptError::TooFewLines { .. } | PromptError::InvalidJob(_) => FailureKind::Permanent,
        }
    }
}

/// Runs prompt jobs against one LLM server.
#[derive(Clone, Debug)]
pub struct PromptGenerator {
    client: LlmClient,
    config: PromptConfig,
}

impl PromptGenerator {
    /// Builds the LLM client from `config.llm`; fails on an invalid configuration.
    pub fn new(config: PromptConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.rigid_per_request > 0 && config.deformable_per_request > 0,
            "prompt rigid_per_request and deformable_per_request must be positive"
        );
        anyhow::ensure!(
            config.concurrency > 0,
            "prompt concurrency must be positive"
        );
        Ok(Self {
            client: LlmClient::new(config.llm.clone())?,
            config,
        })
    }

    pub fn config(&self) -> &PromptConfig {
        &self.config
    }

    /// The captions `job` asks for: `job.backgrounds` backgrounds and, for deformable objects,
    /// `job.descriptions` descriptions, each list distinct and in the order the LLM wrote them.
    pub async fn run(&self, job: &PromptJob) -> Result<PromptOutput, PromptError> {
        match &job.object {
            ObjectSpec::Rigid { caption, uid, .. } => {
                if caption.trim().is_empty() {
                    return Err(PromptError::InvalidJob(format!(
                        "rigid object {uid} has an empty caption"
                    )));
                }
                let backgrounds = self
                    .collect(RequestKind::RigidBackgrounds, caption, job.backgrounds)
                    .await?;
                Ok(PromptOutput {
                    backgrounds,
                    descriptions: Vec::new(),
                })
            }
            ObjectSpec::Deformable { category, .. } => {
                if category.trim().is_empty() {
                    return Err(PromptError::InvalidJob(
                        "deformable object has an empty category".into(),
                    ));
                }
                // One list after the other, so that the requests of a job reach the server in a
                // predictable order.
                let backgrounds = self
                    .collect(
                        RequestKind::DeformableBackgrounds,
                        category,
                        job.backgrounds,
                    )
                    .await?;
                let descriptions = self
                    .collect(
                        RequestKind::DeformableDescriptions,
                        category,
                        job.descriptions,
                    )
                    .await?;
                Ok(PromptOutput {
                    backgrounds,
                    descriptions,
                })
            }
        }
    }

    /// Sends requests of `kind` until `wanted` distinct usable lines are in hand or the request
    /// budget is spent.
    async fn collect(
        &self,
        kind: RequestKind,
        subject: &str,
        wanted: u32,
    ) -> Result<Vec<String>, PromptError> {
        let wanted = wanted as usize;
        if wanted == 0 {
            return Ok(Vec::new());
        }
        // Never ask for more than the job wants; ask for full batches otherwise (a small
        // request after a large one mostly repeats it).
        let per_request = (self.config.per_request(kind) as usize).min(wanted);
        let budget = wanted.div_ceil(per_request) as u32 + self.config.extra_requests;
        let messages = requests::messages(kind, subject, per_request as u32);
        let mut lines = UniqueLines::default();
        let mut sent = 0u32;
        while lines.len() < wanted && sent < budget {
            let round = ((wanted - lines.len()).div_ceil(per_request) as u32).min(budget - sent);
            let answers: Vec<ChatAnswer> = futures::stream::iter(0..round)
                .map(|_| self.client.chat(&messages))
                .buffered(self.config.concurrency)
                .try_collect()
                .await
                .map_err(|error| PromptError::Llm {
                    kind,
                    subject: subject.to_string(),
                    error,
                })?;
            sent += round;
            for answer in answers {
                let usable = cleaning::usable_lines(kind, subject, complete_text(&answer));
                let new = lines.extend(usable);
                tracing::debug!(%kind, subject, new, total = lines.len(), wanted, "llm answer");
            }
        }
        if lines.len() < wanted {
            return Err(PromptError::TooFewLines {
                kind,
                subject: subject.to_string(),
                obtained: lines.len(),
                wanted,
                requests: sent,
            });
        }
        let mut lines = lines.into_vec();
        lines.truncate(wanted);
        Ok(lines)
    }
}

/// The answer without its last line when generation stopped at the token limit in the middle of
/// that line: it is most likely cut mid-sentence.
fn complete_text(answer: &ChatAnswer) -> &str {
    let text = answer.content.as_str();
    if !answer.truncated || text.ends_with('\n') {
        return text;
    }
    text.rsplit_once('\n').map_or("", |(complete, _)| complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_answer_loses_its_last_line() {
        let answer = |content: &str, truncated| ChatAnswer {
            content: content.into(),
            truncated,
        };
        assert_eq!(complete_text(&answer("1. a\n2. b", false)), "1. a\n2. b");
        assert_eq!(complete_text(&answer("1. a\n2. b", true)), "1. a");
        assert_eq!(complete_text(&answer("1. a\n", true)), "1. a\n");
        assert_eq!(complete_text(&answer("1. a cut", true)), "");
    }

    #[test]
    fn configuration_defaults_follow_the_reference() {
        let config: PromptConfig = serde_json::from_value(serde_json::json!({
            "llm": { "base_url": "http://vllm:8000/v1", "model": "llama" },
        }))
        .unwrap();
        assert_eq!(config.rigid_per_request, 10);
        assert_eq!(config.deformable_per_request, 25);
        assert!(PromptGenerator::new(PromptConfig {
            concurrency: 0,
            ..config
        })
        .is_err());
    }
}
