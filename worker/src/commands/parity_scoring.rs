//! The `parity` arms of the scoring models: DINOv2 (`pixel_values` -> `pooler_output`,
//! `last_hidden_state`), the CLIP vision tower (`pixel_values` -> `image_embeds`) and the
//! aesthetic heads (`embeds` -> `scores`), named as the transformers forward arguments and
//! output fields (the heads as the LAION modules' input and output), in float32.

use super::parity::{input, Inputs, Outputs};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use syncd_models::aesthetic::AestheticHead;
use syncd_models::clip_vision::ClipVision;
use syncd_models::dinov2::Dinov2;
use tch::{Device, Kind};

/// `model_dir`: a DINOv2 folder in either layout; registers come from `config.json`'s
/// `model_type` (`dinov2_with_registers`).
pub fn dinov2(model_dir: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let model = Dinov2::load(model_dir, device, Kind::Float)?;
    let output = model.forward(input(inputs, "pixel_values")?)?;
    Ok(vec![
        ("pooler_output".into(), output.pooler_output),
        ("last_hidden_state".into(), output.last_hidden_state),
    ])
}

pub fn clip_vision(model_dir: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let model = ClipVision::load(model_dir, device, Kind::Float)?;
    let image_embeds = model.forward(input(inputs, "pixel_values")?)?;
    Ok(vec![("image_embeds".into(), image_embeds)])
}

/// `model_dir`: a folder holding one converted head (`*.safetensors`); its kind is recognised
/// from the tensor names.
pub fn aesthetic(model_dir: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let head = AestheticHead::load(&single_safetensors(model_dir)?, None, device)?;
    let scores = head.forward(input(inputs, "embeds")?)?;
    Ok(vec![("scores".into(), scores)])
}

fn single_safetensors(dir: &Path) -> Result<PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    match files.as_slice() {
        [file] => Ok(file.clone()),
        [] => bail!("{} holds no .safetensors head", dir.display()),
        _ => bail!(
            "{} holds several .safetensors files: {files:?}",
            dir.display()
        ),
    }
}
