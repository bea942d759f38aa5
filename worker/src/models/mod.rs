//! Model implementations on libtorch, one file per model (or a folder per family). Models only
//! compute; pipelines that combine them live in [`crate::pipelines`].

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
