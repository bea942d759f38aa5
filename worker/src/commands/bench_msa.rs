//! `syncd-worker bench-msa`: speed and memory of one group denoising step of full-size
//! FLUX.1-dev with Masked Shared Attention, on random bf16 weights (no checkpoint needed).
//!
//! The model is created directly on the device and filled with random values there, so the
//! command starts in seconds. Each step is one transformer forward over a group of N images
//! (with masks from the second step on, as generation does) plus the Euler update. It prints
//! one JSON line: seconds per step (mean after one warm-up step) and the peak device memory the
//! process used, sampled with `nvidia-smi` (the same probe `scripts/bench/flux_msa_reference.py`
//! uses, so the two figures compare).

use crate::device::{parse_device, parse_dtype};
use crate::models::flux::embeddings::{image_ids, text_ids};
use crate::models::flux::{AttentionCapture, Config, FluxInputs, FluxTransformer, GroupAttention};
use crate::pipelines::sampler::euler_step;
use anyhow::{ensure, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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
    /// Timed steps (after one warm-up step).
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

/// Samples this process's GPU memory with `nvidia-smi` until dropped; keeps the peak (MiB).
struct MemoryProbe {
    stop: Arc<AtomicBool>,
    peak_mib: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl MemoryProbe {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_mib = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, peak_mib) = (stop.clone(), peak_mib.clone());
            std::thread::spawn(move || {
                let pid = std::process::id().to_string();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(output) = std::process::Command::new("nvidia-smi")
                        .args([
                            "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits",
                        ])
                        .output()
                    {
                        for line in String::from_utf8_lossy(&output.stdout).lines() {
                            let mut fields = line.split(',').map(str::trim);
                            if fields.next() == Some(pid.as_str()) {
                                if let Some(Ok(mib)) = fields.next().map(str::parse::<u64>) {
                                    peak_mib.fetch_max(mib, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            stop,
            peak_mib,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        Some(self.peak_mib.load(Ordering::Relaxed)).filter(|&mib| mib > 0)
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
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
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::dev(),
    };
    let mut model = FluxTransformer::zeros(config.clone(), device, kind)?;
    model.randomize(0.02);
    synchronize(device);
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

    let total = args.steps + 1;
    let mut step_seconds = Vec::with_capacity(args.steps);
    for step in 0..total {
        // Step 0 runs at t = 1 (unmasked sharing), the others masked, as in generation.
        let time = 1.0 - step as f64 / (total as f64 + 1.0);
        let timestep = Tensor::full([n], time, (Kind::Float, device));
        let group = (!args.plain).then(|| GroupAttention {
            group_size: n,
            foreground: (step > 0).then(|| masks.shallow_clone()),
            capture: args
                .capture
                .then(|| AttentionCapture::new(vec![(2, 4); n as usize])),
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
        if let Some(capture) = group.as_ref().and_then(|group| group.capture.as_ref()) {
            let _ = capture.take();
        }
        synchronize(device);
        if step > 0 {
            step_seconds.push(start.elapsed().as_secs_f64());
        }
    }
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
    });
    println!("{line}");
    Ok(())
}
