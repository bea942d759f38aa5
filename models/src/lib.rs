//! The neural networks syncd runs, on libtorch (`tch`), and their checkpoint loading: the FLUX
//! transformer with Masked Shared Attention ([`flux`]), the FLUX VAE ([`vae`]), the T5 and CLIP
//! text encoders with their tokenizers ([`t5`], [`clip_text`], [`tokenizer`]), DINOv2
//! ([`dinov2`]), the CLIP vision tower ([`clip_vision`]) and the aesthetic heads
//! ([`aesthetic`]).
//!
//! Every model is built the same way: its weights live in a `tch` `VarStore` created empty
//! ([`loading`]), are filled from memory-mapped safetensors one tensor at a time, straight into
//! the model's dtype and device ([`weights`]; other checkpoint layouts are mapped onto the
//! model's names), and its parts come from [`layers`] (and [`vit`] for the vision towers).
//!
//! Models only compute: they know nothing of jobs, queues or storage. The worker combines them
//! into pipelines (generation, scoring).

pub mod aesthetic;
pub mod clip_text;
pub mod clip_vision;
pub mod dinov2;
pub mod flux;
pub mod layers;
pub mod loading;
pub mod t5;
pub mod tokenizer;
pub mod torch_pickle;
pub mod vae;
pub mod vit;
pub mod weights;
