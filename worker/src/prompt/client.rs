//! A client for OpenAI-compatible chat-completions servers (vLLM, Ollama, llama.cpp's server).
//!
//! They all answer `POST {base_url}/chat/completions` with `model`, `messages`, `temperature`,
//! `top_p` and `max_tokens`. The client retries what a later attempt can fix — transport errors,
//! timeouts, 429 and 5xx — with capped exponential backoff and jitter (many workers share one LLM
//! server; jitter keeps them from retrying in lockstep), honouring `Retry-After`. Everything else
//! fails at once. Errors say which of the two happened, in the terms of
//! [`syncd_proto::messages::FailureKind`].

use super::requests::ChatMessage;
use anyhow::{bail, Context};
use rand::Rng;
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use syncd_proto::messages::FailureKind;

/// How many characters of an error response body an error message quotes.
const ERROR_BODY_CHARS: usize = 300;

/// Where the LLM is and how to sample from it. Deserialised from the worker configuration
/// (figment: TOML, then `SYNCD_..._LLM__FIELD` environment variables); durations are written the
/// humantime way ("90s", "500ms").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// The API root, for example `http://vllm:8000/v1`; `/chat/completions` is appended.
    pub base_url: String,
    /// The model name the server knows, for example `meta-llama/Meta-Llama-3-8B-Instruct`.
    pub model: String,
    /// Sent as a bearer token when set. Its `Debug` prints `[REDACTED]`, so logging the
    /// configuration never leaks it.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Sampling temperature; the reference samples Llama-3 at 0.6.
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus sampling mass; the reference uses 0.9.
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Upper bound of generated tokens per answer; the reference allows 2048.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Limit on one whole request, answer included. Generating 2048 tokens on a busy server
    /// takes a while, so this is generous.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Limit on opening the connection, so an unreachable server fails fast.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries after the first attempt, for transient failures only.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each further retry.
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Cap of the wait between retries (also caps a server's `Retry-After`).
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

fn default_temperature() -> f32 {
    0.6
}
fn default_top_p() -> f32 {
    0.9
}
fn default_max_tokens() -> u32 {
    2048
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retries() -> u32 {
    5
}
fn default_backoff_base() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

impl LlmConfig {
    /// A configuration with the reference's sampling and the default limits.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            temperature: default_temperature(),
            top_p: default_top_p(),
            max_tokens: default_max_tokens(),
            request_timeout: default_request_timeout(),
            connect_timeout: default_connect_timeout(),
            max_retries: default_max_retries(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.model.trim().is_empty() {
            bail!("llm model name is empty");
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            bail!("llm temperature {} is outside [0, 2]", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("llm top_p {} is outside (0, 1]", self.top_p);
        }
        if self.max_tokens == 0 {
            bail!("llm max_tokens is 0");
        }
        if self.request_timeout.is_zero() {
            bail!("llm request_timeout is 0");
        }
        Ok(())
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmFailure {
    #[error("could not reach the llm server: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("http status {status}: {body}")]
    Status { status: u16, body: String },
    /// A 2xx answer that is not a chat completion (not JSON, not UTF-8, no `choices`).
    #[error("the answer is not a chat completion: {0}")]
    Malformed(String),
}

/// A failed chat request, by what retrying it later could achieve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// The server was unreachable, too slow, overloaded or failing (transport error, timeout,
    /// 429, 5xx) on every attempt: the same request may well succeed later.
    #[error("llm request failed after {attempts} attempt(s): {failure}")]
    Transient { attempts: u32, failure: LlmFailure },
    /// The server refused the request (a 4xx other than 429) or answered something that is not
    /// a chat completion: sending it again would fail the same way.
    #[error("llm request failed, not retryable: {failure}")]
    Permanent { failure: LlmFailure },
}

impl LlmError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            LlmError::Transient { .. } => FailureKind::Transient,
            LlmError::Permanent { .. } => FailureKind::Permanent,
        }
    }

    /// The server could not be reached or said it cannot serve now (transport error, 429, 5xx)
    /// on every try: an outage of the LLM to wait out, not a fault of the job. A server that
    /// accepted the request and did not answer in time is the job's transient failure instead.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            LlmError::Transient {
                failure: LlmFailure::Transport(_) | LlmFailure::Status { .. },
                ..
            }
        )
    }

    pub fn failure(&self) -> &LlmFailure {
        match self {
            LlmError::Transient { failure, .. } | LlmError::Permanent { failure } => failure,
        }
    }
}

/// The text of one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatAnswer {
    /// The assistant message; empty when the server sent none.
    pub content: String,
    /// The model stopped at `max_tokens`, so its last line is probably cut off.
    pub truncated: bool,
}

#[derive(Serialize)]
struct ChatRequestBody<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    temperature: f32,
    top_p: f32,
    max_tokens: u32,
}

#[derive(Deserialize)]
struct ChatResponseBody {
    choices: Vec<ChatChoice>,
}

#[derive(Deserialize)]
struct ChatChoice {
    #[serde(default)]
    message: Option<ChatResponseMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

/// One attempt's failure and whether another attempt may help.
struct AttemptError {
    failure: LlmFailure,
    retryable: bool,
    /// The server's `Retry-After`, when it sent one.
    retry_after: Option<Duration>,
}

impl AttemptError {
    fn permanent(failure: LlmFailure) -> Self {
        Self {
            failure,
            retryable: false,
            retry_after: None,
        }
    }

    fn transient(failure: LlmFailure) -> Self {
        Self {
            failure,
            retryable: true,
            retry_after: None,
        }
    }
}

/// A chat-completions client; cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct LlmClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    config: LlmConfig,
}

impl LlmClient {
    /// Checks the configuration and builds the HTTP client.
    pub fn new(config: LlmConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let endpoint = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint)
            .with_context(|| format!("llm base_url {:?} is not a URL", config.base_url))?;
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .build()
            .context("building the llm http client")?;
        Ok(Self {
            http,
            endpoint,
            config,
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// Sends `messages` and returns the first choice's text, retrying transient failures.
    pub async fn chat(&self, messages: &[ChatMessage]) -> Result<ChatAnswer, LlmError> {
        let body = ChatRequestBody {
            model: &self.config.model,
            messages,
            temperature: self.config.temperature,
            top_p: self.config.top_p,
            max_tokens: self.config.max_tokens,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.attempt(&body).await {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            if !error.retryable {
                return Err(LlmError::Permanent {
                    failure: error.failure,
                });
            }
            if attempts > self.config.max_retries {
                return Err(LlmError::Transient {
                    attempts,
                    failure: error.failure,
                });
            }
            let wait = self.backoff(attempts, error.retry_after);
            tracing::warn!(
                endpoint = %self.endpoint,
                attempt = attempts,
                wait_ms = wait.as_millis() as u64,
                error = %error.failure,
                "llm request failed, retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&self, body: &ChatRequestBody<'_>) -> Result<ChatAnswer, AttemptError> {
        let mut request = self.http.post(self.endpoint.clone()).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            let failure = LlmFailure::Status {
                status: status.as_u16(),
                body: excerpt(&bytes),
            };
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            return Err(AttemptError {
                failure,
                retryable,
                retry_after,
            });
        }
        parse_answer(&bytes).map_err(AttemptError::permanent)
    }

    fn transport_error(&self, error: reqwest::Error) -> AttemptError {
        let failure = if error.is_timeout() {
            LlmFailure::Timeout(self.config.request_timeout)
        } else {
            // The source chain carries the useful part ("connection refused").
            LlmFailure::Transport(format!("{:#}", anyhow::Error::from(error)))
        };
        AttemptError::transient(failure)
    }

    /// The wait before retry number `attempt` (from 1): `backoff_base * 2^(attempt-1)` times a
    /// jitter in [0.5, 1], at least the server's `Retry-After`, at most `backoff_max`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .config
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(16));
        let jittered = exponential.mul_f64(rand::rng().random_range(0.5..=1.0));
        jittered
            .max(retry_after.unwrap_or_default())
            .min(self.config.backoff_max)
    }
}

/// Parses a chat-completions answer; a missing message or content is an empty answer (the
/// caller decides what too few lines mean), a body that is not a chat completion is an error.
fn parse_answer(bytes: &[u8]) -> Result<ChatAnswer, LlmFailure> {
    let body: ChatResponseBody = serde_json::from_slice(bytes)
        .map_err(|e| LlmFailure::Malformed(format!("{e} in {:?}", excerpt(bytes))))?;
    let choice = body
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmFailure::Malformed("`choices` is empty".into()))?;
    Ok(ChatAnswer {
        content: choice
            .message
            .and_then(|message| message.content)
            .unwrap_or_default(),
        truncated: choice.finish_reason.as_deref() == Some("length"),
    })
}

/// `Retry-After` in seconds (the HTTP-date form is rare from LLM servers and ignored).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    seconds.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of a body for error messages, lossily decoded.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
    if text.chars().count() > ERROR_BODY_CHARS {
        excerpt.push_str("...");
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_api_key() {
        let mut config = LlmConfig::new("http://localhost:8000/v1", "llama");
        config.api_key = Some(SecretString::from("sk-very-secret"));
        let printed = format!("{config:?}");
        assert!(!printed.contains("sk-very-secret"), "{printed}");
        assert!(printed.contains("REDACTED"));
    }

    #[test]
    fn configuration_defaults_follow_the_reference() {
        let config: LlmConfig = serde_json::from_value(serde_json::json!({
            "base_url": "http://vllm:8000/v1",
            "model": "meta-llama/Meta-Llama-3-8B-Instruct",
            "request_timeout": "90s",
            "backoff_base": "250ms",
        }))
        .unwrap();
        assert_eq!(config.temperature, 0.6);
        assert_eq!(config.top_p, 0.9);
        assert_eq!(config.max_tokens, 2048);
        assert_eq!(config.request_timeout, Duration::from_secs(90));
        assert_eq!(config.backoff_base, Duration::from_millis(250));
        assert!(config.api_key.is_none());
        assert!(serde_json::from_value::<LlmConfig>(serde_json::json!({
            "base_url": "http://vllm:8000/v1", "model": "m", "temprature": 0.5,
        }))
        .is_err());
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(LlmClient::new(LlmConfig::new("not a url", "m")).is_err());
        assert!(LlmClient::new(LlmConfig::new("http://localhost:1/v1", " ")).is_err());
        let mut config = LlmConfig::new("http://localhost:1/v1", "m");
        config.top_p = 0.0;
        assert!(LlmClient::new(config).is_err());
        let client = LlmClient::new(LlmConfig::new("http://localhost:1/v1/", "m")).unwrap();
        assert_eq!(
            client.endpoint.as_str(),
            "http://localhost:1/v1/chat/completions"
        );
    }

    #[test]
    fn answers_parse_and_nonsense_is_malformed() {
        let answer = parse_answer(
            br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"1. a"},"finish_reason":"length"}]}"#,
        )
        .unwrap();
        assert_eq!(answer.content, "1. a");
        assert!(answer.truncated);
        let empty = parse_answer(br#"{"choices":[{"message":{"content":null}}]}"#).unwrap();
        assert_eq!(empty.content, "");
        for nonsense in [
            &b"not json"[..],
            br#"{"object":"chat.completion"}"#,
            br#"{"choices":[]}"#,
            br#"{"choices":"many"}"#,
            b"{\"choices\":[{\"message\":{\"content\":\"\xff\xfe\"}}]}",
            b"",
        ] {
            assert!(
                matches!(parse_answer(nonsense), Err(LlmFailure::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(nonsense)
            );
        }
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        let mut config = LlmConfig::new("http://localhost:1/v1", "m");
        config.backoff_base = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(1000);
        let client = LlmClient::new(config).unwrap();
        for attempt in 1..=3u32 {
            let full = Duration::from_millis(100 * (1 << (attempt - 1)));
            let wait = client.backoff(attempt, None);
            assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
        }
        assert_eq!(client.backoff(30, None), Duration::from_millis(1000));
        let told = client.backoff(1, Some(Duration::from_millis(700)));
        assert_eq!(told, Duration::from_millis(700));
        let capped = client.backoff(1, Some(Duration::from_secs(3600)));
        assert_eq!(capped, Duration::from_millis(1000));
    }
}
