//! The FLUX arms of `syncd-worker parity` (see [`super::parity`]). Inputs are named after the
//! diffusers arguments; everything runs in float32.
//!
//! - `flux-transformer`: `--model` is a diffusers `transformer/` folder, or a BFL single file
//!   (configured by a `config.json` beside it, else FLUX.1-dev / Depth-dev by its input width).
//!   Inputs `hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`,
//!   `guidance` (guidance-distilled models), `img_ids`, `txt_ids`; output `sample`.
//! - `msa`: the same inputs batched over one group of N images, plus `masks` [N, h*w] (non-zero =
//!   foreground; applied only when `timestep` < 1, as the reference does) and optionally `spans`
//!   [N, 2] int64 (category-word token ranges). Outputs `sample` and, with `spans`,
//!   `attention_sum` [N, h*w] (category attention summed over layers).
//! - `warp`: inputs `latents` [3, r*r, C] (packed), `correspondences` [M, 4] (y1, x1, y2, x2 NDC,
//!   pairs (0,1), (0,2), (1,2) in order), `counts` [3] int64 (rows per pair), `t` (scalar);
//!   outputs `latents` (unchanged when warping is disabled) and `warping_disabled` (0 or 1).
//! - `flux-pipeline`: `--model` is a diffusers FLUX pipeline folder. Inputs `latents` (packed
//!   initial noise [B, h*w, 64]), `t5_input_ids` [B, 512] and `clip_input_ids` [B, 77] (the
//!   prompts as the pipeline's tokenizers pad them), scalars `height`, `width`,
//!   `num_inference_steps`, `guidance_scale`; outputs `latents_out` (the final packed latents,
//!   `output_type="latent"`) and `image` ([B, 3, H, W] in [0, 1], `output_type="pt"`).

use super::parity::{input, Inputs, Outputs};
use crate::pipelines::flux::{FluxPipeline, PromptTokens};
use crate::pipelines::warping::{warp_latents, Correspondences};
use anyhow::{ensure, Result};
use std::path::Path;
use syncd_models::flux::msa::{masks_apply_at, SharedKeys};
use syncd_models::flux::{AttentionCapture, FluxInputs, FluxTransformer, GroupAttention};
use tch::{Device, Kind, Tensor};

/// Loads a FLUX transformer in float32 from a diffusers folder or a BFL single file.
pub fn load_transformer(path: &Path, device: Device) -> Result<FluxTransformer> {
    FluxTransformer::load_path(path, device, Kind::Float)
}

fn float(inputs: &Inputs, name: &str) -> Result<Tensor> {
    Ok(input(inputs, name)?.to_kind(Kind::Float))
}

fn run_forward(
    model: &FluxTransformer,
    inputs: &Inputs,
    group: Option<&GroupAttention>,
) -> Result<Tensor> {
    let hidden_states = float(inputs, "hidden_states")?;
    let encoder_hidden_states = float(inputs, "encoder_hidden_states")?;
    let pooled_projections = float(inputs, "pooled_projections")?;
    let timestep = float(inputs, "timestep")?;
    let guidance = inputs
        .get("guidance")
        .map(|guidance| guidance.to_kind(Kind::Float));
    let img_ids = float(inputs, "img_ids")?;
    let txt_ids = float(inputs, "txt_ids")?;
    model.forward(
        &FluxInputs {
            hidden_states: &hidden_states,
            encoder_hidden_states: &encoder_hidden_states,
            pooled_projections: &pooled_projections,
            timestep: &timestep,
            guidance: guidance.as_ref(),
            img_ids: &img_ids,
            txt_ids: &txt_ids,
        },
        group,
    )
}

/// `flux-transformer`.
pub fn transformer(model_path: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let model = load_transformer(model_path, device)?;
    Ok(vec![("sample".into(), run_forward(&model, inputs, None)?)])
}

/// `msa`.
pub fn msa(model_path: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let model = load_transformer(model_path, device)?;
    let hidden_states = input(inputs, "hidden_states")?;
    let group_size = hidden_states.size()[0];
    let time = input(inputs, "timestep")?.double_value(&[0]) as f32;
    let masks = input(inputs, "masks")?;
    let spans = match inputs.get("spans") {
        Some(spans) => {
            ensure!(
                spans.size() == [group_size, 2],
                "spans has shape {:?}, expected [{group_size}, 2]",
                spans.size()
            );
            let flat = Vec::<i64>::try_from(
                spans
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Int64)
                    .flatten(0, -1),
            )?;
            Some(
                flat.chunks(2)
                    .map(|pair| (pair[0], pair[1]))
                    .collect::<Vec<_>>(),
            )
        }
        None => None,
    };
    let img_ids = float(inputs, "img_ids")?;
    let rows = img_ids.select(1, 1).max().double_value(&[]).round() as i64 + 1;
    let keys = SharedKeys::new(
        group_size,
        masks_apply_at(time).then_some(masks),
        &img_ids,
        rows,
        &model.config.axes_dims_rope,
    )?;
    let capture = spans.map(AttentionCapture::new);
    let group = GroupAttention {
        keys: &keys,
        capture: capture.as_ref(),
    };
    let sample = run_forward(&model, inputs, Some(&group))?;
    let mut outputs = vec![("sample".to_string(), sample)];
    if let Some((sum, _)) = capture.as_ref().and_then(AttentionCapture::take) {
        outputs.push(("attention_sum".into(), sum));
    }
    Ok(outputs)
}

/// `warp` (no model: `--model` is ignored).
pub fn warp(_model_path: &Path, inputs: &Inputs, _device: Device) -> Result<Outputs> {
    let latents = float(inputs, "latents")?;
    let counts = Vec::<i64>::try_from(
        input(inputs, "counts")?
            .to_device(Device::Cpu)
            .to_kind(Kind::Int64),
    )?;
    let counts: [i64; 3] = counts
        .try_into()
        .map_err(|counts| anyhow::anyhow!("counts must hold 3 pair sizes, got {counts:?}"))?;
    let correspondences = Correspondences::new(float(inputs, "correspondences")?, counts)?;
    let t = input(inputs, "t")?.double_value(&[]);
    let (latents, disabled) = match warp_latents(&latents, &correspondences, t)? {
        Some(warped) => (warped, 0u8),
        None => (latents, 1u8),
    };
    Ok(vec![
        ("latents".into(), latents),
        ("warping_disabled".into(), Tensor::from(disabled)),
    ])
}

/// `flux-pipeline`.
pub fn pipeline(folder: &Path, inputs: &Inputs, device: Device) -> Result<Outputs> {
    let pipeline = FluxPipeline::load(folder, device, Kind::Float)?;
    let scalar = |name: &str| -> Result<f64> {
        let tensor = input(inputs, name)?;
        ensure!(
            tensor.numel() == 1,
            "{name} must be a scalar, has shape {:?}",
            tensor.size()
        );
        Ok(tensor.reshape([-1]).double_value(&[0]))
    };
    let steps = scalar("num_inference_steps")?;
    ensure!(
        steps >= 1.0,
        "num_inference_steps must be at least 1, is {steps}"
    );
    let tokens = PromptTokens {
        t5: input(inputs, "t5_input_ids")?
            .to_kind(Kind::Int64)
            .to_device(device),
        clip: input(inputs, "clip_input_ids")?
            .to_kind(Kind::Int64)
            .to_device(device),
    };
    let (latents, image) = pipeline.text_to_image(
        &tokens,
        float(inputs, "latents")?,
        steps as usize,
        scalar("guidance_scale")?,
        scalar("height")? as i64,
        scalar("width")? as i64,
    )?;
    Ok(vec![
        ("latents_out".into(), latents),
        ("image".into(), image),
    ])
}
