//! The denoising loop of a FLUX image group: flow-matching Euler steps with embedded guidance,
//! optional true classifier-free guidance from a given step, channel-concatenated control
//! latents (Depth-dev), Masked Shared Attention with given or attention-derived masks, and
//! depth-based warping of the early latents, in the order the SynCD reference runs them.
//!
//! It works on packed latents and text embeddings, so it can be checked step for step against
//! the reference without the text encoders or the VAE.

use super::masks::attention_token_masks;
use super::sampler::{euler_step, SchedulerConfig};
use super::warping::{Correspondences, GroupWarp, WARP_UNTIL};
use anyhow::{ensure, Result};
use syncd_models::flux::embeddings::{image_ids, text_ids};
use syncd_models::flux::msa::{masks_apply_at, SharedKeys};
use syncd_models::flux::{AttentionCapture, FluxInputs, FluxTransformer, GroupAttention};
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

/// How the two passes of true classifier-free guidance run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfgPasses {
    /// One forward over a batch of both halves (each a group sharing attention within itself):
    /// the weights are read once per step, and the GPU sees twice the work per kernel.
    Batched,
    /// Two forwards, as the reference runs them; half the activation memory.
    Separate,
}

/// Everything [`denoise`] needs besides the initial latents.
pub struct SamplingPlan<'a> {
    pub embeddings: &'a PromptEmbeddings,
    pub negative: Option<(&'a PromptEmbeddings, &'a TrueCfg)>,
    pub cfg_passes: CfgPasses,
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

/// One forward's conditioning: text embeddings, their ids, timestep and guidance for a batch.
struct Conditioning {
    t5: Tensor,
    pooled: Tensor,
    txt_ids: Tensor,
    guidance: Option<Tensor>,
    batch: i64,
}

impl Conditioning {
    fn new(transformer: &FluxTransformer, embeddings: &[&PromptEmbeddings], guidance: f64) -> Self {
        let device = transformer.device();
        let t5 = Tensor::cat(&embeddings.iter().map(|e| &e.t5).collect::<Vec<_>>(), 0);
        let pooled = Tensor::cat(&embeddings.iter().map(|e| &e.pooled).collect::<Vec<_>>(), 0);
        let batch = t5.size()[0];
        Self {
            txt_ids: text_ids(t5.size()[1], device),
            guidance: transformer
                .config
                .guidance_embeds
                .then(|| Tensor::full([batch], guidance, (Kind::Float, device))),
            t5,
            pooled,
            batch,
        }
    }

    /// The velocity of `hidden` [B, h*w, C] (repeated to the conditioning's batch) at `time`.
    fn velocity(
        &self,
        transformer: &FluxTransformer,
        hidden: &Tensor,
        time: f32,
        img_ids: &Tensor,
        group: Option<&GroupAttention>,
    ) -> Result<Tensor> {
        let copies = self.batch / hidden.size()[0];
        let hidden = if copies > 1 {
            hidden.repeat([copies, 1, 1])
        } else {
            hidden.shallow_clone()
        };
        let timestep = Tensor::full(
            [self.batch],
            f64::from(time),
            (Kind::Float, transformer.device()),
        );
        transformer.forward(
            &FluxInputs {
                hidden_states: &hidden,
                encoder_hidden_states: &self.t5,
                pooled_projections: &self.pooled,
                timestep: &timestep,
                guidance: self.guidance.as_ref(),
                img_ids,
                txt_ids: &self.txt_ids,
            },
            group,
        )
    }
}

/// Runs the loop from packed `latents` [B, h*w, 64] (diffusers' `FluxPipeline` loop, plus the
/// SynCD additions the plan asks for).
///
/// Nothing is read back to the host during a step, except the foreground token lists of
/// attention-derived masks (once per step, when the masks change): rigid masks and warping
/// are resolved once for the whole loop.
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
    let positive = Conditioning::new(transformer, &[plan.embeddings], plan.guidance);
    let negative = match plan.negative {
        Some((negative, cfg)) => {
            let passes = match plan.cfg_passes {
                CfgPasses::Batched => {
                    ensure!(
                        negative.t5.size()[1] == plan.embeddings.t5.size()[1],
                        "the negative prompt has {} T5 tokens, the prompts {}: batched guidance \
                         needs both padded to the same length",
                        negative.t5.size()[1],
                        plan.embeddings.t5.size()[1]
                    );
                    Conditioning::new(transformer, &[plan.embeddings, negative], plan.guidance)
                }
                CfgPasses::Separate => Conditioning::new(transformer, &[negative], plan.guidance),
            };
            Some((passes, cfg))
        }
        None => None,
    };
    let mut warp = match plan.warping {
        Some(correspondences) => {
            ensure!(
                batch == 3,
                "warping works on groups of 3 images, got {batch}"
            );
            let warp = GroupWarp::new(correspondences, device);
            if warp.is_none() {
                tracing::warn!(
                    "a correspondence falls outside the grid: warping off for this group"
                );
            }
            warp
        }
        None => None,
    };

    // The shared keys of the unmasked first step and of fixed masks, built when first used.
    let mut unmasked_keys: Option<SharedKeys> = None;
    let mut fixed_keys: Option<SharedKeys> = None;
    let capture = match &plan.sharing {
        Some(Sharing::FromAttention { spans }) => Some(AttentionCapture::new(spans.clone())),
        _ => None,
    };
    let mut latents = latents;
    let mut attention_sum: Option<Tensor> = None;
    let mut attention_layers = 0usize;
    let mut derived: Option<(Tensor, Tensor)> = None;
    for step in 0..schedule.steps() {
        let time = schedule.model_time(step);
        if f64::from(time) <= WARP_UNTIL {
            warp = None;
        }
        if let Some(warp) = &warp {
            latents = warp.apply(&latents, f64::from(time))?;
        }
        let model_input = match plan.control {
            Some(control) => Tensor::cat(&[&latents, &control.to_kind(latents.kind())], 2),
            None => latents.shallow_clone(),
        };
        // The first step (t == 1) shares attention unmasked, as the reference does.
        let step_keys: Option<SharedKeys>;
        let keys = match (&plan.sharing, &derived) {
            (None, _) => None,
            (Some(Sharing::Masks(masks)), _) if masks_apply_at(time) => {
                Some(cached(&mut fixed_keys, || {
                    transformer.shared_keys(batch, Some(masks), plan.grid)
                })?)
            }
            (Some(Sharing::FromAttention { .. }), Some((_, attention))) if masks_apply_at(time) => {
                step_keys = Some(transformer.shared_keys(batch, Some(attention), plan.grid)?);
                step_keys.as_ref()
            }
            (Some(_), _) => Some(cached(&mut unmasked_keys, || {
                transformer.shared_keys(batch, None, plan.grid)
            })?),
        };
        let group = keys.map(|keys| GroupAttention {
            keys,
            capture: capture.as_ref(),
        });
        let guided = negative.as_ref().filter(|(_, cfg)| step >= cfg.from_step);
        let velocity = match (guided, plan.cfg_passes) {
            (Some((both, cfg)), CfgPasses::Batched) => {
                let velocities =
                    both.velocity(transformer, &model_input, time, &img_ids, group.as_ref())?;
                let [positive, negative]: [Tensor; 2] =
                    velocities.chunk(2, 0).try_into().expect("two halves");
                guide(&positive, &negative, cfg.scale)
            }
            (Some((negative, cfg)), CfgPasses::Separate) => {
                let positive =
                    positive.velocity(transformer, &model_input, time, &img_ids, group.as_ref())?;
                // The negative pass shares attention with the same masks, without capture.
                let group = keys.map(|keys| GroupAttention {
                    keys,
                    capture: None,
                });
                let negative =
                    negative.velocity(transformer, &model_input, time, &img_ids, group.as_ref())?;
                guide(&positive, &negative, cfg.scale)
            }
            (None, _) => {
                positive.velocity(transformer, &model_input, time, &img_ids, group.as_ref())?
            }
        };
        if let Some((sum, layers)) = capture.as_ref().and_then(AttentionCapture::take) {
            attention_sum = Some(match attention_sum.take() {
                Some(total) => total + sum,
                None => sum,
            });
            attention_layers += layers;
            let average = attention_sum.as_ref().expect("just set") / attention_layers as f64;
            derived = Some(attention_token_masks(&average, rows, columns)?);
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

/// The keys in `slot`, built first if there are none yet.
fn cached(
    slot: &mut Option<SharedKeys>,
    build: impl FnOnce() -> Result<SharedKeys>,
) -> Result<&SharedKeys> {
    if slot.is_none() {
        *slot = Some(build()?);
    }
    Ok(slot.as_ref().expect("just filled"))
}

/// True classifier-free guidance: `negative + scale * (positive - negative)`.
fn guide(positive: &Tensor, negative: &Tensor, scale: f64) -> Tensor {
    negative + (positive - negative) * scale
}
