//! The shipped binaries on a test's [`TestEnv`]: the coordinator, and `syncd-worker` with the
//! tiny random-weight models of the demonstration (`deploy/demo/worker.toml`), as the demo, a
//! Slurm allocation or any other launcher starts them.

use crate::env::TestEnv;
use crate::processes::{binary, cli, Process};
use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};

/// The checkout, where the demo's configuration points its model paths from.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_path_buf()
}

/// The demo's aesthetic head, converted into the test's folder as `scripts/demo.sh` does.
pub fn converted_aesthetic_head(env: &TestEnv) -> Result<PathBuf> {
    let head = env.path("aesthetic.safetensors");
    let converted = std::process::Command::new(binary("syncd-worker")?)
        .arg("convert-aesthetic")
        .arg(repository().join("worker/tests/fixtures/scoring/aesthetic_mlp.pth"))
        .arg("--out")
        .arg(&head)
        .output()?;
    ensure!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    Ok(head)
}

/// Starts the coordinator with `config`.
pub fn start_coordinator(env: &TestEnv, config: &Path) -> Result<Process> {
    let config = config.to_string_lossy().to_string();
    Process::start(
        "coordinator",
        &binary("syncd-coordinator")?,
        &["--config", &config],
        env.dir.path(),
        &[],
    )
}

/// Starts `syncd-worker run --config CONFIG` from the checkout (where the demo configuration's
/// relative paths point), on the test's services, with `extra` variables on top.
pub fn start_worker(
    env: &TestEnv,
    name: &str,
    config: &Path,
    extra: &[(String, String)],
) -> Result<Process> {
    let mut variables = env.worker_connection_env(name);
    variables.extend_from_slice(extra);
    let variables: Vec<(&str, &str)> = variables
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let config = config.to_string_lossy().to_string();
    Process::start_in(
        name,
        &binary("syncd-worker")?,
        &["run", "--config", &config],
        env.dir.path(),
        Some(&repository()),
        &variables,
    )
}

/// Writes a run of one deformable object (a cat, three backgrounds) with the run file's `body`
/// after its name and input, and creates it with the CLI.
pub fn create_cat_run(
    env: &TestEnv,
    coordinator_config: &Path,
    name: &str,
    body: &str,
) -> Result<()> {
    env.write(
        &format!("{name}.jsonl"),
        &serde_json::json!({
            "type": "deformable", "category": "Cat", "description": "a grey cat with white paws",
            "backgrounds": ["on a wooden table", "in a sunny garden", "on a snowy street"],
        })
        .to_string(),
    )?;
    let run = env.write(
        &format!("{name}.toml"),
        &format!("name = \"{name}\"\nseed = 5\n[input]\nobjects_file = \"{name}.jsonl\"\n{body}"),
    )?;
    cli(
        coordinator_config,
        &["run", "create", &run.to_string_lossy()],
    )?;
    Ok(())
}
