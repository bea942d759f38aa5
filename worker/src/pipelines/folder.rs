//! A diffusers FLUX pipeline folder as users hold it (a Hugging Face snapshot such as
//! `black-forest-labs/FLUX.1-dev`): `model_index.json` plus one folder per component.
//!
//! | folder            | component                                   |
//! | ----------------- | ------------------------------------------- |
//! | `transformer/`    | `FluxTransformer2DModel` (sharded + index)  |
//! | `vae/`            | `AutoencoderKL`                             |
//! | `text_encoder/`   | `CLIPTextModel`                             |
//! | `text_encoder_2/` | `T5EncoderModel`                            |
//! | `tokenizer/`      | CLIP tokenizer                              |
//! | `tokenizer_2/`    | T5 tokenizer                                |
//! | `scheduler/`      | `FlowMatchEulerDiscreteScheduler` config    |
//!
//! [`FluxPipelineFolder::open`] checks the layout and reads the scheduler config; the
//! component loaders build the models on demand, so a caller loads only what it needs.
//! The folder of a Hugging Face cache repository (`models--org--name`) resolves to the
//! snapshot its `refs/main` names.

use crate::pipelines::sampler::SchedulerConfig;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use syncd_models::clip_text::ClipTextModel;
use syncd_models::loading::read_json;
use syncd_models::t5::T5Encoder;
use syncd_models::tokenizer::PromptTokenizer;
use syncd_models::vae::AutoencoderKl;
use tch::{Device, Kind};

/// FLUX's T5 prompt length (diffusers `FluxPipeline`'s `max_sequence_length` default).
pub const T5_MAX_LENGTH: usize = 512;

/// `model_index.json`: the pipeline class and, per component, `[library, class]` (or nulls).
#[derive(Clone, Debug, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(flatten)]
    pub components: BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// The class a component folder holds (`"FluxTransformer2DModel"`), if listed.
    pub fn component_class(&self, component: &str) -> Option<&str> {
        self.components.get(component)?.as_array()?.get(1)?.as_str()
    }
}

/// The components of a FLUX pipeline folder.
#[derive(Clone, Debug)]
pub struct FluxPipelineFolder {
    pub root: PathBuf,
    pub model_index: ModelIndex,
    pub scheduler: SchedulerConfig,
    /// `transformer/`: loaded by the FLUX transformer's own loader.
    pub transformer_dir: PathBuf,
    pub vae_dir: PathBuf,
    /// CLIP text encoder.
    pub text_encoder_dir: PathBuf,
    /// T5 encoder.
    pub text_encoder_2_dir: PathBuf,
    /// CLIP tokenizer.
    pub tokenizer_dir: PathBuf,
    /// T5 tokenizer.
    pub tokenizer_2_dir: PathBuf,
}

const COMPONENTS: [&str; 7] = [
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
];

impl FluxPipelineFolder {
    /// Opens a pipeline folder (or a Hugging Face cache repository folder), checking that every
    /// component folder is there.
    pub fn open(path: &Path) -> Result<Self> {
        let root = resolve_hf_cache_snapshot(path)?;
        let index_path = root.join("model_index.json");
        if !index_path.exists() {
            bail!(
                "{} is not a diffusers pipeline folder (no model_index.json)",
                root.display()
            );
        }
        let model_index: ModelIndex = read_json(&index_path)?;
        if !model_index.class_name.starts_with("Flux") {
            bail!(
                "{} holds a {}, not a FLUX pipeline",
                index_path.display(),
                model_index.class_name
            );
        }
        for component in COMPONENTS {
            let dir = root.join(component);
            if !dir.is_dir() {
                bail!(
                    "the pipeline folder {} has no {component}/ folder",
                    root.display()
                );
            }
        }
        let scheduler =
            SchedulerConfig::from_file(&root.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            transformer_dir: root.join("transformer"),
            vae_dir: root.join("vae"),
            text_encoder_dir: root.join("text_encoder"),
            text_encoder_2_dir: root.join("text_encoder_2"),
            tokenizer_dir: root.join("tokenizer"),
            tokenizer_2_dir: root.join("tokenizer_2"),
            scheduler,
            model_index,
            root,
        })
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<AutoencoderKl> {
        AutoencoderKl::load_diffusers_dir(&self.vae_dir, device, kind)
    }

    pub fn load_clip_text(&self, device: Device, kind: Kind) -> Result<ClipTextModel> {
        ClipTextModel::load_dir(&self.text_encoder_dir, device, kind)
    }

    pub fn load_t5(&self, device: Device, kind: Kind) -> Result<T5Encoder> {
        T5Encoder::load_dir(&self.text_encoder_2_dir, device, kind)
    }

    /// The CLIP tokenizer, padding to its `model_max_length` (77).
    pub fn clip_tokenizer(&self) -> Result<PromptTokenizer> {
        PromptTokenizer::from_dir(&self.tokenizer_dir, None).with_context(|| {
            format!(
                "loading the CLIP tokenizer from {}",
                self.tokenizer_dir.display()
            )
        })
    }

    /// The T5 tokenizer, padding to `max_length` ([`T5_MAX_LENGTH`] in FLUX).
    pub fn t5_tokenizer(&self, max_length: usize) -> Result<PromptTokenizer> {
        PromptTokenizer::from_dir(&self.tokenizer_2_dir, Some(max_length)).with_context(|| {
            format!(
                "loading the T5 tokenizer from {}",
                self.tokenizer_2_dir.display()
            )
        })
    }
}

/// `models--org--name/` (a Hugging Face cache repository) -> its `snapshots/<refs/main>/`;
/// any other folder is returned as is.
fn resolve_hf_cache_snapshot(path: &Path) -> Result<PathBuf> {
    let reference = path.join("refs").join("main");
    if path.join("model_index.json").exists() || !reference.exists() {
        return Ok(path.to_path_buf());
    }
    let commit = std::fs::read_to_string(&reference)
        .with_context(|| format!("cannot read {}", reference.display()))?;
    let snapshot = path.join("snapshots").join(commit.trim());
    if !snapshot.is_dir() {
        bail!(
            "{} names snapshot {}, which is not in {}",
            reference.display(),
            commit.trim(),
            path.join("snapshots").display()
        );
    }
    Ok(snapshot)
}
