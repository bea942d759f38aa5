//! Model implementations on libtorch, one file per model (or a folder per family). Models only
//! compute; pipelines that combine them live in [`crate::pipelines`].

pub mod weights;
pub mod flux;
