//! The denoising loop of a FLUX image group: flow-matching Euler steps with embedded guidance,
//! optional true classifier-free guidance from a given step, channel-concatenated control
//! latents (Depth-dev), Masked Shared Attention with given or attention-derived masks, and
//! depth-based warping of the early latents, in the order the SynCD reference runs them.
//!
//! It works on packed latents and text embeddings, so it can be checked step for step against
//! the reference without the text encoders or the VAE.

use super::masks::attention_token_masks;
use super::sampler::{euler_step, SchedulerConfig};
use super::warping::{warp_latents, Correspondences, WARP_UNTIL};
use crate::models::flux::embeddings::{image_ids, text_ids};
use crate::models::flux::msa::masks_apply_at;
use crate::models::flux::{AttentionCapture, FluxInputs, FluxTransformer, GroupAttention};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Text conditioning of FLUX: T5 token embeddings and the pooled CLIP embedding.
pub struct PromptEmbeddings {
    /// [B, T, joint_attention_dim] (T5 `last_hidden_state`).
    pub t5: Tensor,
    /// [B, pooled_projection_dim] (CLIP text `pooler_output`).
    pub pooled: Tensor,
}

/// True classifier-free guidance with a negative prompt (used for rigid objects).
#[derive(Clone, Debug, PartialEq)]
pub struct TrueCfg {
    pub negative_prompt: String,
    pub scale: f64,
    /// First step index (0-based) that runs the negative pass; the reference starts at 1.
    pub from_step: usize,
}

/// How a sampling run shares attention within its group.
pub enum Sharing {
    /// Fixed token masks [N, h*w].
    Masks(Tensor),
    /// Masks derived from the attention to the category word: per image its token span.
    FromAttention { spans: Vec<(i64, i64)> },
}

/// Everything [`FluxPipeline::sample`] needs besides the initial latents.
pub struct SamplingPlan<'a> {
    pub embeddings: &'a PromptEmbeddings,
    pub negative: Option<(&'a PromptEmbeddings, &'a TrueCfg)>,
    pub steps: usize,
    pub guidance: f64,
    /// Packed control latents [B, h*w, 64] concatenated to the latents on every step.
    pub control: Option<&'a Tensor>,
    pub sharing: Option<Sharing>,
    pub warping: Option<&'a Correspondences>,
    /// The packed token grid (rows, columns).
    pub grid: (i64, i64),
}

/// The final latents and, with attention-derived masks, the last Otsu masks [N, h*w].
pub struct SamplingResult {
    pub latents: Tensor,
    pub object_masks: Option<Tensor>,
}

/// Runs the loop from packed `latents` [B, h*w, 64] (diffusers' `FluxPipeline` loop, plus the
/// SynCD additions the plan asks for).
pub fn denoise(
    transformer: &FluxTransformer,
    scheduler: &SchedulerConfig,
    latents: Tensor,
    plan: &SamplingPlan,
) -> Result<SamplingResult> {
    let _guard = tch::no_grad_guard();
    let device = transformer.device();
    let batch = latents.size()[0];
    let image_seq_len = latents.size()[1];
    let (rows, columns) = plan.grid;
    ensure!(
        rows * columns == image_seq_len,
        "latents have {image_seq_len} tokens, the grid is {rows}x{columns}"
    );
    let schedule = scheduler.schedule(plan.steps, image_seq_len)?;
    let img_ids = image_ids(rows, columns, device);
    let txt_ids = text_ids(plan.embeddings.t5.size()[1], device);
    let negative_txt_ids = plan
        .negative
        .map(|(negative, _)| text_ids(negative.t5.size()[1], device));
    let guidance = transformer
        .config
        .guidance_embeds
        .then(|| Tensor::full([batch], plan.guidance, (Kind::Float, device)));
    if plan.warping.is_some() {
        ensure!(
            batch == 3,
            "warping works on groups of 3 images, got {batch}"
        );
    }

    let mut latents = latents;
    let mut warping = plan.warping;
    let mut attention_sum: Option<Tensor> = None;
    let mut attention_layers = 0usize;
    let mut derived: Option<(Tensor, Tensor)> = None;
    for step in 0..schedule.steps() {
        let time = schedule.model_time(step);
        if let Some(correspondences) = warping {
            if f64::from(time) > WARP_UNTIL {
                match warp_latents(&latents, correspondences, f64::from(time))? {
                    Some(warped) => latents = warped,
                    None => {
                        tracing::warn!(
                            step,
                            "a correspondence falls outside the grid: warping off for this group"
                        );
                        warping = None;
                    }
                }
            }
        }
        let model_input = match plan.control {
            Some(control) => Tensor::cat(&[&latents, &control.to_kind(latents.kind())], 2),
            None => latents.shallow_clone(),
        };
        let timestep = Tensor::full([batch], f64::from(time), (Kind::Float, device));
        // The first step (t == 1) shares attention unmasked, as the reference does.
        let foreground = if masks_apply_at(time) {
            match &plan.sharing {
                Some(Sharing::Masks(masks)) => Some(masks.shallow_clone()),
                Some(Sharing::FromAttention { .. }) => derived
                    .as_ref()
                    .map(|(_, attention)| attention.shallow_clone()),
                None => None,
            }
        } else {
            None
        };
        let group = plan.sharing.as_ref().map(|sharing| GroupAttention {
            group_size: batch,
            foreground: foreground.as_ref().map(Tensor::shallow_clone),
            capture: match sharing {
                Sharing::FromAttention { spans } => Some(AttentionCapture::new(spans.clone())),
                Sharing::Masks(_) => None,
            },
        });
        let mut velocity = transformer.forward(
            &FluxInputs {
                hidden_states: &model_input,
                encoder_hidden_states: &plan.embeddings.t5,
                pooled_projections: &plan.embeddings.pooled,
                timestep: &timestep,
                guidance: guidance.as_ref(),
                img_ids: &img_ids,
                txt_ids: &txt_ids,
            },
            group.as_ref(),
        )?;
        if let Some((sum, layers)) = group
            .as_ref()
            .and_then(|group| group.capture.as_ref())
            .and_then(AttentionCapture::take)
        {
            attention_sum = Some(match attention_sum.take() {
                Some(total) => total + sum,
                None => sum,
            });
            attention_layers += layers;
            let average = attention_sum.as_ref().expect("just set") / attention_layers as f64;
            derived = Some(attention_token_masks(&average, rows, columns)?);
        }
        if let (Some((negative, cfg)), Some(negative_txt_ids)) = (plan.negative, &negative_txt_ids)
        {
            if step >= cfg.from_step {
                // The negative pass shares attention with the same masks, without capture.
                let group = group.as_ref().map(|group| GroupAttention {
                    group_size: group.group_size,
                    foreground: group.foreground.as_ref().map(Tensor::shallow_clone),
                    capture: None,
                });
                let negative_velocity = transformer.forward(
                    &FluxInputs {
                        hidden_states: &model_input,
                        encoder_hidden_states: &negative.t5,
                        pooled_projections: &negative.pooled,
                        timestep: &timestep,
                        guidance: guidance.as_ref(),
                        img_ids: &img_ids,
                        txt_ids: negative_txt_ids,
                    },
                    group.as_ref(),
                )?;
                velocity = &negative_velocity + (velocity - &negative_velocity) * cfg.scale;
            }
        }
        latents = euler_step(
            &latents,
            &velocity,
            schedule.sigmas[step],
            schedule.sigmas[step + 1],
        );
    }
    Ok(SamplingResult {
        latents,
        object_masks: derived.map(|(object, _)| object),
    })
}
