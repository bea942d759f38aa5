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
//! animal. Each list is asked for as the job says, in the reference's terms (one request of 10
//! per rigid asset; 6 requests of 25 per deformable category and list), and keeps every distinct
//! usable line of the answers, in the order the requests were sent and the LLM wrote them. A list
//! with fewer lines than the job needs gets a bounded number of extra requests, then the job
//! fails saying how many lines it got.

pub mod cleaning;
pub mod client;
pub mod requests;

pub use client::{ChatAnswer, LlmClient, LlmConfig, LlmError, LlmFailure};
pub use requests::RequestKind;

use cleaning::UniqueLines;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use syncd_proto::messages::{CaptionRequests, FailureKind, ObjectSpec, PromptJob, PromptOutput};

/// How the prompt stage uses the LLM. Deserialised from the worker configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub llm: LlmConfig,
    /// Requests allowed per list beyond those the job asks for, while the answers hold fewer
    /// distinct usable lines than the job needs. Answers contain duplicates and lines the
    /// cleaning drops; this bounds how long a model that keeps answering nonsense is asked.
    #[serde(default = "default_extra_requests")]
    pub extra_requests: u32,
    /// Requests of one list in flight at once. Servers such as vLLM batch concurrent requests,
    /// so a few in flight cost little more than one.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_extra_requests() -> u32 {
    4
}
fn default_concurrency() -> usize {
    4
}

impl PromptConfig {
    /// The default limits around `llm`.
    pub fn new(llm: LlmConfig) -> Self {
        Self {
            llm,
            extra_requests: default_extra_requests(),
            concurrency: default_concurrency(),
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
    /// The job itself cannot be served (an empty caption or category, a list that asks for
    /// lines with no request to get them).
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

    /// The LLM server was unreachable: the job waits for it instead of failing.
    pub fn is_llm_outage(&self) -> bool {
        matches!(self, PromptError::Llm { error, .. } if error.is_unreachable())
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

    /// The captions `job` asks for: its backgrounds and, for a deformable category, its
    /// descriptions, each list distinct and in the order the LLM wrote them.
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

    /// Sends the requests of one list, then more while it has fewer than `asked.at_least`
    /// distinct usable lines and the extra budget lasts.
    async fn collect(
        &self,
        kind: RequestKind,
        subject: &str,
        asked: CaptionRequests,
    ) -> Result<Vec<String>, PromptError> {
        if asked.requests == 0 && asked.at_least == 0 {
            return Ok(Vec::new());
        }
        if asked.requests == 0 || asked.per_request == 0 {
            return Err(PromptError::InvalidJob(format!(
                "{kind} of {subject:?}: {} lines needed, but {} requests of {} lines asked",
                asked.at_least, asked.requests, asked.per_request
            )));
        }
        let wanted = asked.at_least as usize;
        let budget = asked.requests + self.config.extra_requests;
        let messages = requests::messages(kind, subject, asked.per_request);
        let mut lines = UniqueLines::default();
        let mut sent = 0u32;
        let mut round = asked.requests;
        while round > 0 {
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
            // Short of lines: as many more requests as would fill the list if every line were
            // usable, within the budget.
            let missing = wanted.saturating_sub(lines.len());
            round = (missing.div_ceil(asked.per_request as usize) as u32).min(budget - sent);
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
        Ok(lines.into_vec())
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
    fn configuration_has_defaults_and_refuses_no_concurrency() {
        let config: PromptConfig = serde_json::from_value(serde_json::json!({
            "llm": { "base_url": "http://vllm:8000/v1", "model": "llama" },
        }))
        .unwrap();
        assert_eq!(config.extra_requests, 4);
        assert!(PromptGenerator::new(PromptConfig {
            concurrency: 0,
            ..config
        })
        .is_err());
    }
}
