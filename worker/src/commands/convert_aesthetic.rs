//! `syncd-worker convert-aesthetic IN.pth --out OUT.safetensors`
//!
//! The LAION aesthetic heads ship as PyTorch pickles; the worker reads safetensors only (memory
//! mapped, no code execution on load). This converts a head once, checking that it is a linear
//! or improved-MLP head with consistent shapes.

use anyhow::Result;
use std::path::Path;
use syncd_models::aesthetic::convert_pickle;

pub fn run(input: &Path, output: &Path) -> Result<()> {
    let kind = convert_pickle(input, output)?;
    println!("wrote {} ({kind:?} aesthetic head)", output.display());
    Ok(())
}
