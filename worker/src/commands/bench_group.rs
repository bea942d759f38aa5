//! `syncd-worker bench-group`: the denoising loop of one whole SynCD group, on random weights,
//! with the recipe's every step: the rigid recipe (FLUX.1-Depth-dev, depth control latents,
//! true CFG from step 1, fixed masks, warping; 512², 30 steps) or the deformable one
//! (FLUX.1-dev, masks derived from attention every step; 1024², 50 steps).
//!
//! It prints one JSON line per way of running the guidance passes (`--cfg-passes`): seconds per
//! group (the median of `--repeats` loops, the ways taking turns; every loop's time is listed in
//! the order they ran), per step, the image-passes the transformer made, the peak GPU memory,
//! and the FLOP floor of those passes at `--peak-tflops` (790: H100 SXM dense bf16) with the
//! measured time over it. The loops start from the same latents, so a second loop meets the
//! attention shapes of the first: with cuDNN, it finds their graphs built. With both ways, a last line gives their ratio. The text encoders and the VAE are
//! outside the loop and outside the figures (a prompt's embeddings are cached per worker; the
//! VAE runs once per image).
//!
//! The floor counts, per image-pass of `T` text and `L` image tokens in a group of `N`,
//! `2 * parameters * (T + L)` for the weights and `4 * layers * width * (T + L) * (T + L + (N-1) L)`
//! for attention (every borrowed token counted, as on the unmasked first step): 40 TFLOP at
//! 512² and 151 TFLOP at 1024² for FLUX.1-dev.

use super::bench::{random_transformer, synchronize, MemoryProbe};
use crate::device::{parse_device, parse_dtype};
use crate::pipelines::denoise::{
    denoise, CfgPasses, PromptEmbeddings, SamplingPlan, Sharing, TrueCfg,
};
use crate::pipelines::sampler::SchedulerConfig;
use crate::pipelines::warping::{Correspondences, CORRESPONDENCE_GRID};
use anyhow::{ensure, Result};
use std::time::Instant;
use syncd_models::flux::{attention, Config, FluxTransformer};
use tch::{Kind, Tensor};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    Rigid,
    Deformable,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassesArg {
    Batched,
    Separate,
    /// Both, one after the other, and their ratio.
    Both,
}

#[derive(clap::Args, Debug)]
pub struct BenchGroupArgs {
    #[arg(long, value_enum)]
    pub recipe: Recipe,
    /// `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// `bf16` or `fp32`.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Image side in pixels; the recipe's by default (512 rigid, 1024 deformable).
    #[arg(long)]
    pub size: Option<i64>,
    /// Denoising steps; the recipe's by default (30 rigid, 50 deformable).
    #[arg(long)]
    pub steps: Option<usize>,
    /// T5 tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub text_tokens: i64,
    /// How the rigid recipe's guidance passes run.
    #[arg(long, value_enum, default_value = "both")]
    pub cfg_passes: PassesArg,
    /// Dense bf16 TFLOP/s of the device, for the floor.
    #[arg(long, default_value_t = 790.0)]
    pub peak_tflops: f64,
    /// Timed loops per way of running the guidance passes, the ways taking turns; the median
    /// is reported.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// A diffusers transformer `config.json` instead of the full-size model (CPU runs).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Images per group, as SynCD makes them.
const GROUP: i64 = 3;
/// Fraction of each image's tokens marked foreground in the rigid recipe's masks.
const FOREGROUND: f64 = 0.35;
/// Correspondences per view pair (of the 128² grid's 16K pixels).
const CORRESPONDENCES_PER_PAIR: i64 = 4000;

/// One recipe's inputs on the device, random where a real group has model outputs.
struct GroupInputs {
    positive: PromptEmbeddings,
    negative: Option<(PromptEmbeddings, TrueCfg)>,
    control: Option<Tensor>,
    masks: Option<Tensor>,
    correspondences: Option<Correspondences>,
    guidance: f64,
}

impl GroupInputs {
    fn new(recipe: Recipe, model: &FluxTransformer, text_tokens: i64, tokens: i64) -> Result<Self> {
        let config = &model.config;
        let (kind, device) = (model.kind(), model.device());
        let embeddings = || PromptEmbeddings {
            t5: Tensor::randn(
                [GROUP, text_tokens, config.joint_attention_dim],
                (kind, device),
            ),
            pooled: Tensor::randn([GROUP, config.pooled_projection_dim], (kind, device)),
        };
        Ok(match recipe {
            Recipe::Rigid => {
                ensure!(
                    config.takes_control_latents(),
                    "the rigid recipe runs a depth-controlled transformer (in_channels {} = 2 x \
                     out_channels {})",
                    config.in_channels,
                    config.output_channels()
                );
                let rows = Tensor::rand([3 * CORRESPONDENCES_PER_PAIR, 4], (Kind::Float, device))
                    * 1.9
                    - 0.95;
                Self {
                    positive: embeddings(),
                    negative: Some((
                        embeddings(),
                        TrueCfg {
                            negative_prompt: String::new(),
                            scale: 2.5,
                            from_step: 1,
                        },
                    )),
                    control: Some(Tensor::randn(
                        [GROUP, tokens, config.output_channels()],
                        (kind, device),
                    )),
                    masks: Some(
                        Tensor::rand([GROUP, tokens], (Kind::Float, device))
                            .lt(FOREGROUND)
                            .to_kind(Kind::Float),
                    ),
                    correspondences: Some(Correspondences::new(
                        rows,
                        [CORRESPONDENCES_PER_PAIR; 3],
                    )?),
                    guidance: 10.0,
                }
            }
            Recipe::Deformable => Self {
                positive: embeddings(),
                negative: None,
                control: None,
                masks: None,
                correspondences: None,
                guidance: 3.5,
            },
        })
    }

    fn plan(&self, steps: usize, grid: (i64, i64), cfg_passes: CfgPasses) -> SamplingPlan<'_> {
        SamplingPlan {
            embeddings: &self.positive,
            negative: self
                .negative
                .as_ref()
                .map(|(embeddings, cfg)| (embeddings, cfg)),
            cfg_passes,
            steps,
            guidance: self.guidance,
            control: self.control.as_ref(),
            sharing: Some(match &self.masks {
                Some(masks) => Sharing::Masks(masks.shallow_clone()),
                None => Sharing::FromAttention {
                    spans: vec![(2, 4); GROUP as usize],
                },
            }),
            warping: self.correspondences.as_ref(),
            grid,
        }
    }

    /// Image-passes of the transformer over `steps` (each image of each forward counts once).
    fn image_passes(&self, steps: usize) -> usize {
        let guided = match &self.negative {
            Some((_, cfg)) => steps.saturating_sub(cfg.from_step),
            None => 0,
        };
        (steps + guided) * GROUP as usize
    }
}

/// FLOPs of one image-pass (see the module documentation).
fn flops_per_image_pass(config: &Config, parameters: i64, text: i64, image: i64) -> f64 {
    let sequence = (text + image) as f64;
    let keys = sequence + ((GROUP - 1) * image) as f64;
    let layers = (config.num_layers + config.num_single_layers) as f64;
    2.0 * parameters as f64 * sequence + 4.0 * layers * config.inner_dim() as f64 * sequence * keys
}

pub fn run(args: &BenchGroupArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    let (default_config, default_size, default_steps) = match args.recipe {
        Recipe::Rigid => (Config::depth_dev(), 512, 30),
        Recipe::Deformable => (Config::dev(), 1024, 50),
    };
    let size = args.size.unwrap_or(default_size);
    let steps = args.steps.unwrap_or(default_steps);
    ensure!(
        size > 0 && size % 16 == 0,
        "--size must be a positive multiple of 16"
    );
    ensure!(steps >= 1, "--steps must be at least 1");
    let grid = size / 16;
    ensure!(
        args.recipe != Recipe::Rigid || grid * 2 <= CORRESPONDENCE_GRID,
        "warping needs latents no larger than the {CORRESPONDENCE_GRID}² correspondence grid"
    );
    let _guard = tch::no_grad_guard();
    let probe = MemoryProbe::start();
    let model = random_transformer(args.config.as_deref(), default_config, device, kind)?;
    let tokens = grid * grid;
    let inputs = GroupInputs::new(args.recipe, &model, args.text_tokens, tokens)?;
    let scheduler = SchedulerConfig::default();
    let latents = Tensor::randn(
        [GROUP, tokens, model.config.output_channels()],
        (kind, device),
    );
    let passes = match (args.recipe, args.cfg_passes) {
        (Recipe::Deformable, _) | (_, PassesArg::Batched) => vec![CfgPasses::Batched],
        (_, PassesArg::Separate) => vec![CfgPasses::Separate],
        (_, PassesArg::Both) => vec![CfgPasses::Batched, CfgPasses::Separate],
    };
    let image_passes = inputs.image_passes(steps);
    let floor_seconds = image_passes as f64
        * flops_per_image_pass(
            &model.config,
            model.parameter_count(),
            args.text_tokens,
            tokens,
        )
        / (args.peak_tflops * 1e12);

    // A short untimed loop per way first: kernel selection and allocator warm-up. Its two
    // steps are one unmasked and one masked (and guided), so its attention calls are those of
    // the whole loop; their kernels are counted there.
    attention::start_kernel_audit();
    for &cfg_passes in &passes {
        denoise(
            &model,
            &scheduler,
            latents.copy(),
            &inputs.plan(2.min(steps), (grid, grid), cfg_passes),
        )?;
    }
    let kernels = attention::finish_kernel_audit();
    let mut timings: Vec<(CfgPasses, Vec<f64>)> =
        passes.iter().map(|&passes| (passes, Vec::new())).collect();
    for _ in 0..args.repeats.max(1) {
        for (cfg_passes, seconds) in &mut timings {
            synchronize(device);
            let start = Instant::now();
            let result = denoise(
                &model,
                &scheduler,
                latents.copy(),
                &inputs.plan(steps, (grid, grid), *cfg_passes),
            )?;
            synchronize(device);
            seconds.push(start.elapsed().as_secs_f64());
            ensure!(
                result.latents.isfinite().all().int64_value(&[]) == 1,
                "the loop produced non-finite latents"
            );
        }
    }
    let mut seconds_by_passes = Vec::new();
    for (cfg_passes, runs) in timings {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let seconds = sorted[sorted.len() / 2];
        seconds_by_passes.push((cfg_passes, seconds));
        let line = serde_json::json!({
            "implementation": "syncd-worker (libtorch)",
            "recipe": format!("{:?}", args.recipe).to_lowercase(),
            "cfg_passes": format!("{cfg_passes:?}").to_lowercase(),
            "device": args.device,
            "dtype": args.dtype,
            "size": size,
            "steps": steps,
            "image_passes": image_passes,
            "seconds_per_group": seconds,
            "seconds_per_step": seconds / steps as f64,
            "runs": runs,
            "floor_seconds": floor_seconds,
            "over_floor": seconds / floor_seconds,
            "attention_kernels": kernels,
        });
        println!("{line}");
    }
    let peak_mib = probe.finish();
    if let [(_, batched), (_, separate)] = seconds_by_passes.as_slice() {
        println!(
            "{}",
            serde_json::json!({
                "recipe": format!("{:?}", args.recipe).to_lowercase(),
                "separate_over_batched": separate / batched,
                "peak_memory_mib": peak_mib,
            })
        );
    } else {
        println!("{}", serde_json::json!({ "peak_memory_mib": peak_mib }));
    }
    Ok(())
}
