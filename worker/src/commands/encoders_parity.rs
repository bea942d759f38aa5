//! The `parity` arms of FLUX's VAE and text encoders (see [`super::parity`]).
//!
//! | arm          | model folder                              | inputs                          | outputs                                |
//! | ------------ | ----------------------------------------- | ------------------------------- | -------------------------------------- |
//! | `vae-encode` | `vae/` folder, or a BFL `ae.safetensors`  | `sample`                        | `latent_dist_mean` (`latent_dist.mean`) |
//! | `vae-decode` | same                                      | `z`                             | `sample`                               |
//! | `t5`         | `text_encoder_2/`                         | `input_ids`, `attention_mask`?  | `last_hidden_state`                    |
//! | `clip-text`  | `text_encoder/`                           | `input_ids`                     | `last_hidden_state`, `pooler_output`   |
//!
//! All run in fp32, the precision the references are compared in.

use super::parity::{input, Inputs, Outputs};
use anyhow::Result;
use std::path::Path;
use syncd_models::clip_text::ClipTextModel;
use syncd_models::t5::T5Encoder;
use syncd_models::vae::AutoencoderKl;
use tch::{Device, Kind};

pub fn vae_encode(model: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let vae = AutoencoderKl::load_path(model, device, Kind::Float)?;
    let mean = vae.encode(input(inputs, "sample")?)?;
    Ok(vec![("latent_dist_mean".into(), mean)])
}

pub fn vae_decode(model: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let vae = AutoencoderKl::load_path(model, device, Kind::Float)?;
    let sample = vae.decode(input(inputs, "z")?)?;
    Ok(vec![("sample".into(), sample)])
}

pub fn t5(model: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let encoder = T5Encoder::load_dir(model, device, Kind::Float)?;
    let hidden = encoder.forward(input(inputs, "input_ids")?, inputs.get("attention_mask"))?;
    Ok(vec![("last_hidden_state".into(), hidden)])
}

pub fn clip_text(model: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let encoder = ClipTextModel::load_dir(model, device, Kind::Float)?;
    let output = encoder.forward(input(inputs, "input_ids")?)?;
    Ok(vec![
        ("last_hidden_state".into(), output.last_hidden_state),
        ("pooler_output".into(), output.pooler_output),
    ])
}
