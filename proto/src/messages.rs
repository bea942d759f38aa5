//! The messages that travel through RabbitMQ.
//!
//! Jobs go from the coordinator to workers as [`JobMessage`]; workers answer on the results queue
//! with [`WorkerReport`]. Every message carries [`WIRE_VERSION`]; a receiver that sees another
//! version rejects the message to the dead-letter queue instead of guessing.
//!
//! Payloads carry S3 keys, never image data: messages stay small and the broker stays fast.

use crate::ids::{GroupId, JobId, ObjectId, RunId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of every message in this module. Bump it on any incompatible change.
pub const WIRE_VERSION: u32 = 5;

/// The kinds of work a worker can do. Each kind has its own durable queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Ask an LLM for background captions (and descriptions for deformable objects).
    Prompt,
    /// Render a rigid asset into depth, masks and correspondences.
    Prior,
    /// Generate one group of images with FLUX and Masked Shared Attention.
    Generate,
    /// Score one group: aesthetic score per image, DINOv2 similarity per pair.
    Score,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::Prompt,
        JobKind::Prior,
        JobKind::Generate,
        JobKind::Score,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Prompt => "prompt",
            JobKind::Prior => "prior",
            JobKind::Generate => "generate",
            JobKind::Score => "score",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown job kind {s:?} (expected prompt, prior, generate or score)")
            })
    }
}

/// The FLUX model a generation job needs. Generation jobs of each family wait in a queue of their
/// own, so a worker takes only the jobs its loaded models can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFamily {
    /// FLUX.1-dev: text to image, for deformable objects.
    FluxDev,
    /// FLUX.1-Depth-dev: depth-controlled, for rigid objects.
    FluxDepthDev,
}

impl ModelFamily {
    pub const ALL: [ModelFamily; 2] = [ModelFamily::FluxDev, ModelFamily::FluxDepthDev];

    pub fn as_str(&self) -> &'static str {
        match self {
            ModelFamily::FluxDev => "flux-dev",
            ModelFamily::FluxDepthDev => "flux-depth-dev",
        }
    }

    /// The family that generates groups of this object.
    pub fn for_object(object: &ObjectSpec) -> Self {
        match object {
            ObjectSpec::Rigid { .. } => ModelFamily::FluxDepthDev,
            ObjectSpec::Deformable { .. } => ModelFamily::FluxDev,
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job waits for a worker: one queue per route. Every kind has one route, except
/// generation, which has one per [`ModelFamily`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    Prompt,
    Prior,
    Generate(ModelFamily),
    Score,
}

impl Route {
    pub const ALL: [Route; 5] = [
        Route::Prompt,
        Route::Prior,
        Route::Generate(ModelFamily::FluxDev),
        Route::Generate(ModelFamily::FluxDepthDev),
        Route::Score,
    ];

    pub fn kind(&self) -> JobKind {
        match self {
            Route::Prompt => JobKind::Prompt,
            Route::Prior => JobKind::Prior,
            Route::Generate(_) => JobKind::Generate,
            Route::Score => JobKind::Score,
        }
    }

    /// Every route of a kind.
    pub fn of_kind(kind: JobKind) -> impl Iterator<Item = Route> {
        Route::ALL
            .into_iter()
            .filter(move |route| route.kind() == kind)
    }

    /// The route's name: its queue's suffix and its value in the jobs table.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Prompt => "prompt",
            Route::Prior => "prior",
            Route::Generate(ModelFamily::FluxDev) => "generate.flux-dev",
            Route::Generate(ModelFamily::FluxDepthDev) => "generate.flux-depth-dev",
            Route::Score => "score",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Route::ALL
            .into_iter()
            .find(|route| route.as_str() == s)
            .ok_or_else(|| format!("unknown route {s:?}"))
    }
}

/// What an object is: the two families of the SynCD data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectSpec {
    /// An Objaverse asset with its Cap3D caption. `asset_key` is the S3 key of its GLB file.
    Rigid {
        uid: String,
        caption: String,
        asset_key: String,
    },
    /// An animal category (one of the reference's 16) with a detailed description.
    Deformable {
        category: String,
        description: String,
    },
}

impl ObjectSpec {
    pub fn is_rigid(&self) -> bool {
        matches!(self, ObjectSpec::Rigid { .. })
    }
}

/// A job as the coordinator publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub version: u32,
    pub job_id: JobId,
    /// Attempt number, from 1. A result is accepted only for the attempt the coordinator awaits,
    /// so a late answer to an abandoned attempt can never be counted twice.
    pub attempt: u32,
    pub run_id: RunId,
    pub object_id: ObjectId,
    /// How often the worker reports [`ReportEvent::Heartbeat`] while it holds the attempt: the
    /// coordinator presumes the attempt lost after a few missed heartbeats, not after a fixed
    /// time, so a slow job is never taken from a live worker.
    pub heartbeat_secs: u32,
    pub payload: JobPayload,
}

impl JobMessage {
    pub fn kind(&self) -> JobKind {
        self.payload.kind()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobPayload {
    Prompt(PromptJob),
    Prior(PriorJob),
    Generate(GenerateJob),
    Score(ScoreJob),
}

impl JobPayload {
    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Prompt(_) => JobKind::Prompt,
            JobPayload::Prior(_) => JobKind::Prior,
            JobPayload::Generate(_) => JobKind::Generate,
            JobPayload::Score(_) => JobKind::Score,
        }
    }

    /// The queue the job waits in.
    pub fn route(&self) -> Route {
        match self {
            JobPayload::Prompt(_) => Route::Prompt,
            JobPayload::Prior(_) => Route::Prior,
            JobPayload::Generate(job) => Route::Generate(ModelFamily::for_object(&job.object)),
            JobPayload::Score(_) => Route::Score,
        }
    }
}

/// Ask the LLM for captions, as the reference asks them. A rigid object's job asks for the
/// backgrounds of that one asset (its Cap3D caption is the object). A deformable job asks for a
/// whole category at once: backgrounds naming the category and descriptions of the animal, which
/// the coordinator then hands out to the category's objects, so no two objects draw their
/// descriptions from separate, overlapping answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptJob {
    /// The rigid object, or the deformable category (its `description` is empty).
    pub object: ObjectSpec,
    pub backgrounds: CaptionRequests,
    /// Deformable only; ignored for rigid objects.
    pub descriptions: CaptionRequests,
}

/// How one list of captions is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionRequests {
    /// Requests sent (the reference: one per rigid asset, six per deformable category and list).
    pub requests: u32,
    /// Captions asked for in each request (the reference: 10 per rigid asset, 25 per deformable
    /// request).
    pub per_request: u32,
    /// Distinct usable captions the list needs at least. While it has fewer after `requests`
    /// answers, the worker asks again, within its own bound on extra requests, then fails.
    pub at_least: u32,
}

impl CaptionRequests {
    /// Nothing to ask.
    pub const NONE: CaptionRequests = CaptionRequests {
        requests: 0,
        per_request: 0,
        at_least: 0,
    };

    /// Captions asked for in all requests together.
    pub fn asked(&self) -> u64 {
        u64::from(self.requests) * u64::from(self.per_request)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptOutput {
    /// Every distinct usable caption of the answers, in the order the LLM wrote them.
    pub backgrounds: Vec<String>,
    pub descriptions: Vec<String>,
}

/// Render the 3D prior of a rigid asset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorJob {
    pub uid: String,
    /// S3 key of the GLB asset.
    pub asset_key: String,
    /// Number of camera views around the object.
    pub views: u32,
    /// Maximum number of view triplets to keep.
    pub max_triplets: u32,
    /// Generation resolution (square), in pixels.
    pub resolution: u32,
    /// Seed of the augmentation (object scale and placement).
    pub seed: u64,
}

/// One chosen view triplet; its files live under [`crate::keys::prior_triplet_prefix`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorTriplet {
    pub index: u32,
    /// The view indices of the ring the triplet was chosen from.
    pub views: [u32; 3],
    /// Matched correspondence counts for the pairs (0,1), (0,2), (1,2).
    pub matches: [u32; 3],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorOutput {
    pub triplets: Vec<PriorTriplet>,
}

/// Generate one group of images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateJob {
    pub group_id: GroupId,
    pub object: ObjectSpec,
    /// One full prompt per image of the group.
    pub prompts: Vec<String>,
    /// The word whose attention gives the deformable foreground masks (the category).
    pub subject_word: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// Rigid objects only: the prior triplet to condition on.
    pub prior: Option<PriorTriplet>,
    /// True classifier-free guidance with a negative prompt, on top of the embedded guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg: Option<TrueCfgSettings>,
    /// Set when the job regenerates an already generated group (`syncd group regenerate`): the
    /// number of that regeneration. Its outputs go under the regeneration's own prefix
    /// ([`crate::keys::generation_attempt_prefix`]) and change nothing about the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regeneration: Option<u32>,
}

/// True classifier-free guidance: each step from `from_step` (0-based) also runs the negative
/// prompt and moves the prediction away from it by `scale` (the reference: 2.5 from step 1 for
/// rigid objects, with a fixed negative prompt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrueCfgSettings {
    pub negative_prompt: String,
    pub scale: f32,
    pub from_step: u32,
}

impl TrueCfgSettings {
    /// The reference's setting for rigid objects.
    pub fn reference_rigid() -> Self {
        Self {
            negative_prompt: "3d render, cartoon, low resolution, illustration, blurry".into(),
            scale: 2.5,
            from_step: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// S3 keys of the images, in group order.
    pub image_keys: Vec<String>,
    /// S3 keys of the foreground masks used, in group order.
    pub mask_keys: Vec<String>,
}

/// Score one generated group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreJob {
    pub group_id: GroupId,
    pub image_keys: Vec<String>,
    pub mask_keys: Vec<String>,
    /// The aesthetic predictor the run's thresholds are meant for; absent means whichever the
    /// worker has. A worker with another head refuses the job rather than give scores on
    /// another scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aesthetic_head: Option<AestheticHead>,
}

/// The LAION aesthetic predictors on CLIP ViT-L/14 embeddings. Their scores are on different
/// scales, so a run's `min_aesthetic` holds for one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AestheticHead {
    /// The original linear predictor (`sa_0_4_vit_l_14_linear.pth`), which the reference uses.
    Linear,
    /// The improved MLP predictor (`sac+logos+ava1-l14-linearMSE.pth`).
    Mlp,
}

impl fmt::Display for AestheticHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AestheticHead::Linear => "linear",
            AestheticHead::Mlp => "mlp",
        })
    }
}

/// DINOv2 cosine similarity of the object crops of images `a` and `b` of a group.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairSimilarity {
    pub a: u32,
    pub b: u32,
    pub similarity: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreOutput {
    /// Aesthetic score of each image, in group order.
    pub aesthetic: Vec<f32>,
    /// Similarity of every pair of images.
    pub pairs: Vec<PairSimilarity>,
    /// L2-normalised DINOv2 embedding of each image's object crop, kept for near-duplicate
    /// detection across groups.
    pub embeddings: Vec<Vec<f32>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOutput {
    Prompt(PromptOutput),
    Prior(PriorOutput),
    Generate(GenerateOutput),
    Score(ScoreOutput),
}

impl JobOutput {
    pub fn kind(&self) -> JobKind {
        match self {
            JobOutput::Prompt(_) => JobKind::Prompt,
            JobOutput::Prior(_) => JobKind::Prior,
            JobOutput::Generate(_) => JobKind::Generate,
            JobOutput::Score(_) => JobKind::Score,
        }
    }
}

/// How a job failed, which decides what the coordinator does next.
/// A service the factory depends on. When one is unreachable, work that needs it waits for it
/// instead of failing: an outage is never a job's fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// PostgreSQL, the coordinator's state.
    Database,
    /// RabbitMQ.
    Broker,
    /// The S3 store.
    Storage,
    /// The prompt stage's LLM server.
    Llm,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Database,
        Service::Broker,
        Service::Storage,
        Service::Llm,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Service::Database => "database",
            Service::Broker => "broker",
            Service::Storage => "storage",
            Service::Llm => "llm",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL
            .into_iter()
            .find(|service| service.as_str() == s)
            .ok_or_else(|| format!("unknown service {s:?}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Worth another attempt (an unreachable service, a timeout, out of memory).
    Transient,
    /// Will fail again however often it runs (a broken mesh, an unsupported asset): the object is
    /// skipped, not retried.
    Permanent,
}

/// What a worker says about a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub version: u32,
    pub job_id: JobId,
    pub attempt: u32,
    /// The reporting worker's name, for the job history.
    pub worker: String,
    pub event: ReportEvent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReportEvent {
    /// The worker took the job and is running it.
    Started,
    /// The worker still holds the attempt. `waiting_for` names a service the job needs and
    /// cannot reach: the attempt is paused, not failing, and resumes when the service answers.
    Heartbeat { waiting_for: Option<Service> },
    /// The job finished and its outputs are in S3. `provenance` says what made them (the
    /// dataset records it as the group's lineage).
    Succeeded {
        output: JobOutput,
        duration_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provenance: Option<crate::lineage::Provenance>,
    },
    Failed {
        failure: FailureKind,
        error: String,
        duration_ms: u64,
    },
}

/// A worker's presence on `{prefix}.workers`: sent when it starts, every `interval_secs`, when
/// it takes or finishes a job and when it stops. The coordinator keeps the latest of each worker
/// for `syncd workers`; announcements change no job state, and losing one loses nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerAnnouncement {
    pub version: u32,
    pub worker: String,
    pub host: String,
    /// Where it runs models: "cuda:0", "cpu".
    pub device: String,
    /// What it loaded, by name ("flux-dev", "flux-depth-dev", "dinov2", "llm", ...).
    pub models: Vec<String>,
    /// The routes ([`Route::as_str`]) it takes jobs from.
    pub routes: Vec<String>,
    pub state: WorkerState,
    /// The job it holds, while `Busy`.
    pub current_job: Option<JobId>,
    /// Seconds until its next announcement: it is presumed gone after a few are missed.
    pub interval_secs: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Connected and waiting for a job.
    Idle,
    /// Running `current_job`.
    Busy,
    /// Shut down cleanly (or stopped because its device keeps failing).
    Stopped,
}

impl WorkerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// Errors decoding a message from the broker. Any of them sends the message to the dead-letter
/// queue: it will never decode, so retrying it would only block the queue.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not valid JSON for this type: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("message has wire version {found}, this build speaks {expected}")]
    WrongVersion { found: u32, expected: u32 },
}

fn check_version(found: u32) -> Result<(), DecodeError> {
    if found == WIRE_VERSION {
        Ok(())
    } else {
        Err(DecodeError::WrongVersion {
            found,
            expected: WIRE_VERSION,
        })
    }
}

impl JobMessage {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let message: Self = serde_json::from_slice(bytes)?;
        check_version(message.version)?;
        Ok(message)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("job messages always serialise")
    }
}

impl WorkerAnnouncement {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let message: Self = serde_json::from_slice(bytes)?;
        check_version(message.version)?;
        Ok(message)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("worker announcements always serialise")
    }
}

impl WorkerReport {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let message: Self = serde_json::from_slice(bytes)?;
        check_version(message.version)?;
        Ok(message)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("worker reports always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_job() -> JobMessage {
        JobMessage {
            version: WIRE_VERSION,
            job_id: JobId::new_random(),
            attempt: 1,
            heartbeat_secs: 10,
            run_id: RunId::new_random(),
            object_id: ObjectId::new_random(),
            payload: JobPayload::Score(ScoreJob {
                group_id: GroupId::new_random(),
                image_keys: vec!["a".into()],
                mask_keys: vec!["b".into()],
                aesthetic_head: None,
            }),
        }
    }

    #[test]
    fn job_messages_round_trip() {
        let job = sample_job();
        assert_eq!(JobMessage::decode(&job.encode()).unwrap(), job);
        assert_eq!(job.kind(), JobKind::Score);
    }

    #[test]
    fn other_versions_and_garbage_are_rejected() {
        let mut job = sample_job();
        job.version = WIRE_VERSION + 1;
        assert!(matches!(
            JobMessage::decode(&job.encode()),
            Err(DecodeError::WrongVersion { .. })
        ));
        assert!(matches!(
            JobMessage::decode(b"{not json"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn generation_jobs_are_routed_by_the_family_of_their_object() {
        let mut job = GenerateJob {
            group_id: GroupId::new_random(),
            object: ObjectSpec::Deformable {
                category: "cat".into(),
                description: "a cat".into(),
            },
            prompts: vec![],
            subject_word: "cat".into(),
            seed: 1,
            width: 512,
            height: 512,
            steps: 1,
            guidance: 3.5,
            prior: None,
            true_cfg: None,
            regeneration: None,
        };
        let route = |job: &GenerateJob| JobPayload::Generate(job.clone()).route();
        assert_eq!(route(&job), Route::Generate(ModelFamily::FluxDev));
        job.object = ObjectSpec::Rigid {
            uid: "u".into(),
            caption: "a chair".into(),
            asset_key: "k".into(),
        };
        assert_eq!(route(&job), Route::Generate(ModelFamily::FluxDepthDev));
        assert_eq!(sample_job().payload.route(), Route::Score);
        for route in Route::ALL {
            assert_eq!(route.as_str().parse::<Route>().unwrap(), route);
        }
        assert_eq!(Route::of_kind(JobKind::Generate).count(), 2);
    }

    #[test]
    fn job_kinds_parse_from_their_names() {
        for kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>().unwrap(), kind);
        }
        assert!("render".parse::<JobKind>().is_err());
    }
}
