//! The `syncd-worker` binary: parses arguments and hands over to the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use syncd_worker::commands::convert_aesthetic;
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
    /// Convert a LAION aesthetic head from its PyTorch pickle (.pth) to safetensors.
    ConvertAesthetic {
        /// The head as saved by `torch.save(state_dict)`.
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
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
        Command::ConvertAesthetic { input, out } => convert_aesthetic::run(&input, &out),
    }
}
