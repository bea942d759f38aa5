//! The `syncd-worker` binary: parses arguments and hands over to the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use syncd_worker::commands::convert_aesthetic;
use syncd_worker::commands::parity::{self, ParityModel};
use syncd_worker::config::WorkerConfig;
use syncd_worker::device::parse_device;
use syncd_worker::jobs;
use syncd_worker::service::{DeviceFailing, Worker, WorkerStatus};

#[derive(Parser)]
#[command(name = "syncd-worker", version, about = "The syncd GPU worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take jobs from the queues until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML); `SYNCD_`-prefixed environment variables override it.
        #[arg(long, env = "SYNCD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run one model on inputs from a safetensors file, for parity checks against the reference.
    Parity {
        /// Which model to run.
        which: ParityModel,
        /// Hugging Face-style model folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Render the 3D prior of a rigid asset (depth, masks, cameras, correspondences) into a folder.
    Render {
        /// The asset: a `.glb`, or a `.gltf` with its buffers beside it.
        asset: PathBuf,
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Views in the ring around the object.
        #[arg(long, default_value_t = 20)]
        views: u32,
        /// Side of the square depth and mask images, in pixels.
        #[arg(long, default_value_t = 512)]
        resolution: u32,
        /// Most view triplets to keep.
        #[arg(long, default_value_t = 2)]
        max_triplets: u32,
        /// Seed of the placement augmentation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a LAION aesthetic head from its PyTorch pickle (.pth) to safetensors.
    ConvertAesthetic {
        /// The head as saved by `torch.save(state_dict)`.
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Time full-size FLUX.1-dev group steps with Masked Shared Attention (random weights).
    BenchMsa(syncd_worker::commands::bench_msa::BenchMsaArgs),
    /// Time one whole group's denoising loop (rigid or deformable recipe, random weights) against
    /// the FLOP floor, with the guidance passes batched and separate.
    BenchGroup(syncd_worker::commands::bench_group::BenchGroupArgs),
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Run { config } => end_process(run(config)),
        tool => run_tool(tool).map(|()| ExitCode::SUCCESS),
    }
}

/// The binary's commands besides `run`.
fn run_tool(command: Command) -> Result<()> {
    match command {
        Command::Run { .. } => unreachable!("main runs the worker itself"),
        Command::Parity {
            which,
            model,
            inputs,
            output,
            device,
        } => parity::run(which, &model, &inputs, &output, parse_device(&device)?),
        Command::Render {
            asset,
            out,
            views,
            resolution,
            max_triplets,
            seed,
        } => {
            let mut options = syncd_prior::RenderOptions::default().with_views(views);
            options.prior.resolution = resolution;
            options.prior.max_triplets = max_triplets;
            options.prior.seed = seed;
            let summary = syncd_prior::render_to_dir(&asset, &out, &options)
                .with_context(|| format!("rendering {}", asset.display()))?;
            println!(
                "{} triangles, {} triplet(s) written to {}",
                summary.triangles,
                summary.triplets.len(),
                out.display()
            );
            Ok(())
        }
        Command::ConvertAesthetic { input, out } => convert_aesthetic::run(&input, &out),
        Command::BenchMsa(args) => syncd_worker::commands::bench_msa::run(&args),
        Command::BenchGroup(args) => syncd_worker::commands::bench_group::run(&args),
    }
}

/// The exit status of a worker whose device keeps failing: its supervisor restarts it.
const EXIT_DEVICE_FAILING: u8 = 3;

fn run(config: Option<PathBuf>) -> Result<u8> {
    let runtime = tokio::runtime::Runtime::new()?;
    let exit = runtime.block_on(async {
        let _telemetry = syncd_infra::telemetry::init("syncd-worker")?;
        let config = WorkerConfig::load(config.as_deref())?;
        tracing::info!(?config, "configuration loaded");
        let status = WorkerStatus::new(&config.name());
        if let Some(metrics) = &config.metrics {
            let ready = status.readiness();
            syncd_infra::metrics::serve(metrics.listen, metrics.token.clone(), ready).await?;
        }
        let mut runners = Vec::new();
        for kind in &config.worker.kinds {
            runners.push(jobs::build_runner(*kind, &config).await?);
        }
        let worker = Worker::new(&config, runners, status);
        match worker.run(syncd_infra::shutdown_signal()).await {
            Ok(()) => Ok(0),
            Err(error) if error.is::<DeviceFailing>() => {
                eprintln!("syncd-worker: {error:#}");
                Ok(EXIT_DEVICE_FAILING)
            }
            Err(error) => Err(error),
        }
    });
    // A job handed back at shutdown may still be computing on its models' thread: its result is
    // no longer wanted, and waiting for it would only get the worker killed by its supervisor.
    runtime.shutdown_background();
    exit
}

/// Ends the worker's process with `outcome`'s status (an error is printed as `main` prints
/// one) without running the C++ static destructors. A job handed back at shutdown may still be
/// computing on its models' thread inside libtorch, and tearing libtorch down under it crashes the
/// process on its way out (status 139 where its supervisor expects 0). By now the worker's logs
/// and traces are flushed (the telemetry guard is dropped inside `run`), and nothing else
/// outlives the process.
fn end_process(outcome: Result<u8>) -> ! {
    use std::io::Write;
    let code = match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("Error: {error:?}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[allow(unsafe_code)]
    // SAFETY: `_exit` takes a plain integer and ends the process at once; it reads and frees
    // nothing of the process, whatever other threads are doing.
    unsafe {
        libc::_exit(i32::from(code))
    }
}
