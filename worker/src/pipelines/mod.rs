//! Pipelines: models combined into generation procedures. Models (in [`syncd_models`]) only
//! compute; sampling loops, guidance, masks and warping live here.
//!
//! - [`flux`]: FLUX text-to-image (and depth-controlled) generation of image groups with Masked
//!   Shared Attention, the entry point [`flux::generate_group`].
//! - [`folder`]: the diffusers pipeline folder layout and its component loaders.
//! - [`sampler`]: the flow-matching schedule, Euler step and latent packing.
//! - [`masks`]: foreground token masks (rigid renders, attention-derived) and word lookup.
//! - [`warping`]: depth-based warping of the noisy latents from correspondences.
//! - [`noise`]: seeded, device-independent Gaussian noise.

pub mod denoise;
pub mod flux;
pub mod folder;
pub mod masks;
pub mod noise;
pub mod sampler;
pub mod warping;
