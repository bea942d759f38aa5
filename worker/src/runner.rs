//! The one interface behind which every kind of work sits. The job loop (`service`) only decodes
//! messages, reports and acknowledges; a [`JobRunner`] does the work of one job kind and says how
//! it failed, which decides whether the coordinator retries.

use async_trait::async_trait;
use std::fmt;
use syncd_infra::storage::Storage;
use syncd_proto::lineage::ModelIdentity;
use syncd_proto::messages::{FailureKind, JobKind, JobMessage, JobOutput, Route};

/// What a runner gets besides the job: where to read inputs and write outputs.
#[derive(Clone)]
pub struct JobContext {
    pub storage: Storage,
    /// This worker's name, for logs.
    pub worker: String,
}

/// The models a runner computes with, where, and in which precision.
#[derive(Clone, Debug)]
pub struct ModelSetup {
    /// As configured: "cuda", "cuda:1", "cpu".
    pub device: String,
    /// "bf16", "fp32".
    pub dtype: String,
    pub models: Vec<ModelIdentity>,
}

/// A failed job and whether another attempt could succeed.
#[derive(Debug)]
pub struct JobError {
    pub failure: FailureKind,
    pub error: anyhow::Error,
    /// The device failed (libtorch out of memory, a CUDA error), not the job: the job loop
    /// stops the worker when this happens to several jobs in a row.
    pub device_fault: bool,
}

impl JobError {
    /// Will fail again however often it runs: a broken asset, an unsupported input.
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        Self {
            failure: FailureKind::Permanent,
            error: error.into(),
            device_fault: false,
        }
    }

    /// Worth another attempt: an unreachable service, a timeout, out of memory.
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        Self {
            failure: FailureKind::Transient,
            error: error.into(),
            device_fault: false,
        }
    }

    /// The device failed under the job: worth another attempt, maybe on another worker.
    pub fn device(error: impl Into<anyhow::Error>) -> Self {
        Self {
            device_fault: true,
            ..Self::transient(error)
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Errors of unknown nature are presumed transient: the coordinator's attempt limit still bounds
/// how often they are retried.
impl From<anyhow::Error> for JobError {
    fn from(error: anyhow::Error) -> Self {
        Self::transient(error)
    }
}

#[async_trait]
pub trait JobRunner: Send + Sync {
    /// The job kind this runner does.
    fn kind(&self) -> JobKind;

    /// The queues it takes jobs from: every route of its kind, unless its models can run only
    /// some (a generation runner with one FLUX family loaded).
    fn routes(&self) -> Vec<Route> {
        Route::of_kind(self.kind()).collect()
    }

    /// What it loaded, by name, for the worker's announcements.
    fn models(&self) -> Vec<String> {
        Vec::new()
    }

    /// What its results are computed with, for their provenance; `None` for a runner without
    /// models of its own (the 3D prior is plain CPU code, the LLM is a remote service).
    fn model_setup(&self) -> Option<ModelSetup> {
        None
    }

    /// Runs one job: reads its inputs, writes its outputs under deterministic keys, and returns
    /// what the coordinator needs to plan the next stage.
    async fn run(&self, job: &JobMessage, context: &JobContext) -> Result<JobOutput, JobError>;
}
