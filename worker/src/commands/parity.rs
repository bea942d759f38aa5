//! `syncd-worker parity <model> --model DIR --inputs FILE --output FILE`
//!
//! Runs one model from a Hugging Face-style folder on tensors read from a safetensors file and
//! writes its outputs to another safetensors file. Input tensors are named after the reference
//! implementation's forward arguments and outputs after its output fields, so anyone can compare
//! the Rust models with the Python reference on the same weights and inputs.
//!
//! Each model family adds one arm to [`ParityModel`] and implements it in its own module, as a
//! function `fn(&Path, &Inputs, Device) -> Result<Outputs>`.

use super::encoders_parity;
use super::parity_scoring;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;
use syncd_models::weights;
use tch::{Device, Tensor};

/// Named input tensors, as read from the inputs file.
pub type Inputs = HashMap<String, Tensor>;
/// Named output tensors, in the order they are written.
pub type Outputs = Vec<(String, Tensor)>;

/// The models the command can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ParityModel {
    /// transformers' `Dinov2Model` / `Dinov2WithRegistersModel`.
    Dinov2,
    /// transformers' `CLIPVisionModelWithProjection`.
    ClipVision,
    /// A LAION aesthetic head (linear or improved MLP), converted to safetensors.
    Aesthetic,
    /// diffusers' `FluxTransformer2DModel` (dev or Depth-dev): folder or BFL single file.
    FluxTransformer,
    /// The FLUX transformer over one group with Masked Shared Attention.
    Msa,
    /// Depth-based warping of packed latents from correspondences.
    Warp,
    /// A whole diffusers `FluxPipeline` folder from given initial latents and token ids.
    FluxPipeline,
    /// FLUX VAE encoder: `sample` -> `latent_dist_mean`.
    VaeEncode,
    /// FLUX VAE decoder: `z` -> `sample`.
    VaeDecode,
    /// T5 encoder: `input_ids` (+ `attention_mask`) -> `last_hidden_state`.
    T5,
    /// CLIP text encoder: `input_ids` -> `last_hidden_state`, `pooler_output`.
    ClipText,
}

impl ParityModel {
    fn run(self, model_dir: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
        match self {
            Self::Dinov2 => parity_scoring::dinov2(model_dir, inputs, device),
            Self::ClipVision => parity_scoring::clip_vision(model_dir, inputs, device),
            Self::Aesthetic => parity_scoring::aesthetic(model_dir, inputs, device),
            Self::FluxTransformer => super::flux_parity::transformer(model_dir, inputs, device),
            Self::Msa => super::flux_parity::msa(model_dir, inputs, device),
            Self::Warp => super::flux_parity::warp(model_dir, inputs, device),
            Self::FluxPipeline => super::flux_parity::pipeline(model_dir, inputs, device),
            Self::VaeEncode => encoders_parity::vae_encode(model_dir, inputs, device),
            Self::VaeDecode => encoders_parity::vae_decode(model_dir, inputs, device),
            Self::T5 => encoders_parity::t5(model_dir, inputs, device),
            Self::ClipText => encoders_parity::clip_text(model_dir, inputs, device),
        }
    }
}

/// Fetches a required input tensor by its reference name.
pub fn input<'a>(inputs: &'a Inputs, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).with_context(|| {
        let mut present: Vec<&str> = inputs.keys().map(String::as_str).collect();
        present.sort();
        format!("the inputs file has no tensor {name:?} (it has {present:?})")
    })
}

pub fn run(
    model: ParityModel,
    model_dir: &Path,
    inputs_path: &Path,
    output_path: &Path,
    device: Device,
) -> Result<()> {
    let inputs = weights::read_all(inputs_path)
        .with_context(|| format!("reading parity inputs {}", inputs_path.display()))?;
    let inputs: Inputs = inputs
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_device(device)))
        .collect();
    let outputs = {
        let _guard = tch::no_grad_guard();
        model.run(model_dir, &inputs, device)?
    };
    weights::write_all(output_path, &outputs)
}
