//! FLUX.1 (Black Forest Labs) on libtorch: the rectified-flow transformer of FLUX.1-dev and
//! FLUX.1-Depth-dev, with Masked Shared Attention for jointly generated image groups (SynCD).
//!
//! - [`config`]: hyper-parameters (`Config::dev()`, `Config::depth_dev()`, or a diffusers
//!   `config.json`).
//! - [`transformer`]: the model, its loading (diffusers folder or BFL single file) and forward.
//! - [`blocks`], [`attention`], [`embeddings`], [`layers`]: its parts, named like diffusers'.
//! - [`msa`]: Masked Shared Attention and the attention capture for attention-derived masks.
//! - [`bfl_keys`]: the BFL checkpoint layout mapped onto the diffusers names.
//!
//! Upstream: <https://github.com/black-forest-labs/flux>,
//! diffusers `models/transformers/transformer_flux.py`.

pub mod attention;
pub mod bfl_keys;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod layers;
pub mod msa;
pub mod transformer;

pub use config::Config;
pub use msa::{AttentionCapture, GroupAttention};
pub use transformer::{FluxInputs, FluxTransformer};
