//! `syncd-coordinator`: the coordinator service. Parses arguments, sets up telemetry and hands
//! over to `syncd_coordinator::service::run` until SIGINT or SIGTERM.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use syncd_coordinator::config::CoordinatorConfig;

#[derive(Parser)]
#[command(
    name = "syncd-coordinator",
    version,
    about = "The syncd coordinator service"
)]
struct Cli {
    /// Configuration file (TOML); `SYNCD_`-prefixed environment variables override it.
    #[arg(long, env = "SYNCD_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _telemetry = syncd_infra::telemetry::init("syncd-coordinator")?;
    let config = CoordinatorConfig::load(cli.config.as_deref())?;
    tracing::info!(?config, "configuration loaded");
    syncd_coordinator::service::run(config, syncd_infra::shutdown_signal()).await
}
