//! Model implementations on libtorch, one file per model (or a folder per family). Models only
//! compute; pipelines that combine them live in [`crate::pipelines`].

pub mod clip_text;
pub mod layers;
pub mod loading;
pub mod pipeline_folder;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod weights;
