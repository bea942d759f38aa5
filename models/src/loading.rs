//! Building a model in a [`VarStore`] and filling it from a checkpoint, the same way for every
//! model: read its `config.json`, create the variables in the target dtype and device with a
//! cheap zero init (every one is overwritten by the checkpoint), copy the weights in one tensor
//! at a time, and freeze the store (inference only: no gradient bookkeeping).

use crate::weights::{Checkpoint, KeyMap};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind};

/// Reads and parses a JSON configuration file (`config.json`, `scheduler_config.json`, ...).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid config", path.display()))
}

/// An empty store whose new variables are created directly in `kind` on `device`, so that a
/// bf16 model never exists in fp32 on the way.
pub fn empty_var_store(device: Device, kind: Kind) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// Copies the checkpoint into the store's variables (see [`Checkpoint::load_into`]) and freezes
/// them.
pub fn fill_var_store(vs: &mut VarStore, checkpoint: &Checkpoint, map: &KeyMap<'_>) -> Result<()> {
    checkpoint.load_into(vs, map)?;
    vs.freeze();
    Ok(())
}
