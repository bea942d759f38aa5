//! Python scripts of the tests (`tests/python/`), run with the set-up's venv, where
//! `scripts/setup.sh` installs `scripts/requirements-fixtures.txt`: the readers people use on a
//! dataset (`datasets`, `webdataset`) and readers of other programs' layouts.

use crate::env::cache_dir;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The venv's interpreter: `$SYNCD_VENV/bin/python`, by default in the set-up's cache.
pub fn venv_python() -> PathBuf {
    std::env::var("SYNCD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("venv"))
        .join("bin/python")
}

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Runs `tests/python/{name}` with `args` and parses the JSON object it prints. Offline: the
/// Hugging Face libraries must not reach for the Hub.
pub fn run_script<S: AsRef<OsStr>>(name: &str, args: &[S]) -> Result<Value> {
    let python = venv_python();
    let output = Command::new(&python)
        .arg(script(name))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {name}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "parsing what {name} printed: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
