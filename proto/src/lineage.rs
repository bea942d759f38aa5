//! Where a group came from: the settings it was generated with, the models that made and scored
//! it (each named with a content hash of its weights) and the code that ran them. Every dataset
//! record carries its group's [`Lineage`], so a group can be regenerated, and a regeneration that
//! does not match can be told apart from one made with other weights or other code.

use crate::messages::{GenerateJob, PriorTriplet, TrueCfgSettings};
use serde::{Deserialize, Serialize};

/// One model a worker loaded, as it identifies it in every result it reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// What the model does in the worker ("flux-dev", "flux-depth-dev", "dinov2", "clip",
    /// "aesthetic-linear").
    pub name: String,
    /// The file or folder name the weights were loaded from (the path itself is the host's).
    pub source: String,
    /// `blake3:` and the hex BLAKE3 hash of the weights: of the file, or for a folder of the list
    /// of its files' relative paths and hashes (see the worker's `identity` module).
    pub content_hash: String,
}

/// What ran a job: the worker, where, and with which models and code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub worker: String,
    pub host: String,
    /// Where the models ran ("cuda:0", "cpu") and in which precision ("bf16", "fp32").
    pub device: String,
    pub dtype: String,
    /// The worker's version and the commit it was built from.
    pub code_version: String,
    pub models: Vec<ModelIdentity>,
}

impl Provenance {
    /// Whether `other` ran the same models and code on the same kind of device: the condition
    /// under which a regeneration must be bit-identical. The worker and host may differ.
    pub fn same_setup(&self, other: &Provenance) -> bool {
        self.device == other.device
            && self.dtype == other.dtype
            && self.code_version == other.code_version
            && self.models == other.models
    }
}

/// The settings of a group's generation job, beside the prompts and seed the record already
/// holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// FLUX's embedded guidance.
    pub guidance: f32,
    /// True classifier-free guidance, when the group used it.
    pub true_cfg: Option<TrueCfgSettings>,
    /// The word whose attention gave a deformable group's masks (empty for rigid groups).
    pub subject_word: String,
    /// Rigid groups: the 3D prior triplet the images were conditioned on.
    pub prior: Option<PriorTriplet>,
}

impl GenerationSettings {
    pub fn of(job: &GenerateJob) -> Self {
        Self {
            width: job.width,
            height: job.height,
            steps: job.steps,
            guidance: job.guidance,
            true_cfg: job.true_cfg.clone(),
            subject_word: job.subject_word.clone(),
            prior: job.prior.clone(),
        }
    }
}

/// Everything that made a group besides its prompts, object and seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub generation: GenerationSettings,
    /// The worker that generated the images the record holds; absent for groups generated
    /// before workers reported it.
    pub generated_by: Option<Provenance>,
    /// The worker that scored them.
    pub scored_by: Option<Provenance>,
}
