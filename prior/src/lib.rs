//! The 3D prior of rigid objects (pipeline section B): everything a worker computes from an
//! Objaverse asset before generation, in plain Rust on the CPU (no Blender, no Python).
//!
//! From a glTF asset it renders a ring of views around the normalised object, measures which
//! views see the same surface, picks the view triplets with the most overlap, and for each
//! triplet produces what generation is conditioned on: a depth control image and a foreground
//! mask per view, the cameras, and the pixel correspondences between the views that the
//! depth-based warping uses.
//!
//! # Layout
//!
//! - [`error`]: [`PriorError`], whose variants say whether a failure is the asset's (permanent,
//!   the object is skipped) or not (transient).
//! - [`loader`]: glTF/GLB loading with the `gltf` crate, hardened against hostile files.
//! - [`mesh`]: the flat triangle mesh and its normalisation to unit size.
//! - [`camera`]: pinhole cameras, their conventions, and the ring of views.
//! - [`raster`]: the z-buffer rasteriser producing depth and foreground.
//! - [`correspondence`]: pixel matches between two views through depth.
//! - [`triplets`]: choosing view triplets by overlap.
//! - [`augment`]: the object scale and placement augmentation.
//! - [`pipeline`]: the steps above put together, in memory.
//! - [`images`]: depth control and mask PNGs, correspondence pictures.
//! - [`record`]: the `cameras.json` record of rendered views.
//! - [`npy`]: raw float depth as NumPy `.npy`.
//! - [`job`]: [`run_prior_job`], what the worker calls for a prior job.
//! - [`render_cmd`]: [`render_to_dir`], the `syncd-worker render` command.
//! - [`synthetic`]: known shapes and a glTF writer for tests, benchmarks and fuzzing.
//!
//! The correspondence file format itself lives in `syncd_proto::correspondence`, since the
//! generate job reads what the prior job writes.

pub mod augment;
pub mod camera;
pub mod correspondence;
pub mod error;
pub mod images;
pub mod job;
pub mod loader;
pub mod mesh;
pub mod npy;
pub mod pipeline;
pub mod raster;
pub mod record;
pub mod render_cmd;
pub mod synthetic;
pub mod triplets;

pub use camera::{Camera, ImageTransform, Intrinsics, RigOptions};
pub use error::PriorError;
pub use job::{prior_options, run_prior_job, PriorArtifacts, TripletArtifacts};
pub use loader::{load_bytes, load_glb, load_path, ExternalBuffers, LoadLimits, LoadedAsset};
pub use mesh::{Mesh, Normalisation};
pub use pipeline::{compute_prior, Prior, PriorOptions};
pub use raster::{render_depth, DepthMap, Rasteriser};
pub use render_cmd::{render_to_dir, RenderOptions, RenderSummary};
