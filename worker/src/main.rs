//! The `syncd-worker` binary: parses arguments and hands over to the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use syncd_worker::commands::parity::{self, ParityModel};
use syncd_worker::device::parse_device;

#[derive(Parser)]
#[command(name = "syncd-worker", version, about = "The syncd GPU worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Time full-size FLUX.1-dev group steps with Masked Shared Attention (random weights).
    BenchMsa(syncd_worker::commands::bench_msa::BenchMsaArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Parity {
            which,
            model,
            inputs,
            output,
            device,
        } => parity::run(which, &model, &inputs, &output, parse_device(&device)?),
        Command::BenchMsa(args) => syncd_worker::commands::bench_msa::run(&args),
    }
}
