//! `syncd-worker bench-msa`: speed and memory of one group denoising step of full-size
//! FLUX.1-dev with Masked Shared Attention, on random bf16 weights (no checkpoint needed).
//!
//! The model is created directly on the device and filled with random values there, so the
//! command starts in seconds. Each step is one transformer forward over a group of N images
//! (with masks from the second step on, as generation does) plus the Euler update. It prints
//! one JSON line: seconds per masked step (mean after two warm-up steps, one unmasked and one
//! masked), the peak device memory the process used, sampled with `nvidia-smi` (the same probe
//! `scripts/bench/flux_msa_reference.py` uses, so the two figures compare), and how many
//! attention calls ran on each of libtorch's kernels (`math` is the unfused one).

use super::bench::{random_transformer, synchronize, MemoryProbe};
use crate::device::{parse_device, parse_dtype};
use crate::pipelines::sampler::euler_step;
use anyhow::{ensure, Result};
use std::time::Instant;
use syncd_models::flux::attention;
use syncd_models::flux::embeddings::{image_ids, text_ids};
use syncd_models::flux::{AttentionCapture, Config, FluxInputs, GroupAttention};
use tch::{Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct BenchMsaArgs {
    /// `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// `bf16` or `fp32`.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Image side in pixels (512: rigid objects, 1024: deformable).
    #[arg(long, default_value_t = 1024)]
    pub size: i64,
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Images per group.
    #[arg(long, default_value_t = 3)]
    pub group: i64,
    /// T5 tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub text_tokens: i64,
    /// Fraction of each image's tokens marked foreground.
    #[arg(long, default_value_t = 0.35)]
    pub foreground: f64,
    /// Also capture the category-word attention (deformable masks).
    #[arg(long)]
    pub capture: bool,
    /// Run the group without shared attention (independent images), for comparison.
    #[arg(long)]
    pub plain: bool,
    /// A diffusers transformer `config.json` to use instead of FLUX.1-dev (smoke tests).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

pub fn run(args: &BenchMsaArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    ensure!(args.size % 16 == 0, "--size must be a multiple of 16");
    ensure!(
        args.group >= 2 || args.plain,
        "--group must be at least 2 for shared attention"
    );
    let _guard = tch::no_grad_guard();
    let probe = MemoryProbe::start();
    let build_start = Instant::now();
    let model = random_transformer(args.config.as_deref(), Config::dev(), device, kind)?;
    let config = model.config.clone();
    let build_seconds = build_start.elapsed().as_secs_f64();

    let grid = args.size / 16;
    let tokens = grid * grid;
    let n = args.group;
    let mut latents = Tensor::randn([n, tokens, config.in_channels], (kind, device));
    let text = Tensor::randn(
        [n, args.text_tokens, config.joint_attention_dim],
        (kind, device),
    );
    let pooled = Tensor::randn([n, config.pooled_projection_dim], (kind, device));
    let guidance = Tensor::full([n], 3.5, (Kind::Float, device));
    let img_ids = image_ids(grid, grid, device);
    let txt_ids = text_ids(args.text_tokens, device);
    let masks = Tensor::rand([n, tokens], (Kind::Float, device)).lt(args.foreground);

    // Two untimed steps first: the unmasked one and the first masked one, each of which meets
    // its shapes for the first time (kernel plans, allocator).
    let total = args.steps + 2;
    let mut step_seconds = Vec::with_capacity(args.steps);
    let capture = args
        .capture
        .then(|| AttentionCapture::new(vec![(2, 4); n as usize]));
    let (unmasked, masked) = if args.plain {
        (None, None)
    } else {
        (
            Some(model.shared_keys(n, None, (grid, grid))?),
            Some(model.shared_keys(n, Some(&masks), (grid, grid))?),
        )
    };
    attention::start_kernel_audit();
    for step in 0..total {
        // Step 0 runs at t = 1 (unmasked sharing), the others masked, as in generation.
        let time = 1.0 - step as f64 / (total as f64 + 1.0);
        let timestep = Tensor::full([n], time, (Kind::Float, device));
        let keys = if step == 0 { &unmasked } else { &masked };
        let group = keys.as_ref().map(|keys| GroupAttention {
            keys,
            capture: capture.as_ref(),
        });
        synchronize(device);
        let start = Instant::now();
        let velocity = model.forward(
            &FluxInputs {
                hidden_states: &latents,
                encoder_hidden_states: &text,
                pooled_projections: &pooled,
                timestep: &timestep,
                guidance: Some(&guidance),
                img_ids: &img_ids,
                txt_ids: &txt_ids,
            },
            group.as_ref(),
        )?;
        latents = euler_step(&latents, &velocity, time as f32, (time - 0.02) as f32);
        if let Some(capture) = &capture {
            let _ = capture.take();
        }
        synchronize(device);
        if step > 1 {
            step_seconds.push(start.elapsed().as_secs_f64());
        }
    }
    let kernels = attention::finish_kernel_audit();
    let peak_mib = probe.finish();
    let mean = step_seconds.iter().sum::<f64>() / step_seconds.len().max(1) as f64;
    let line = serde_json::json!({
        "implementation": "syncd-worker (libtorch, gathered MSA)",
        "mode": if args.plain { "plain" } else if args.capture { "msa+capture" } else { "msa" },
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "group": n,
        "text_tokens": args.text_tokens,
        "parameters": model.parameter_count(),
        "build_seconds": build_seconds,
        "seconds_per_step": mean,
        "step_seconds": step_seconds,
        "peak_memory_mib": peak_mib,
        "attention_kernels": kernels,
    });
    println!("{line}");
    Ok(())
}
