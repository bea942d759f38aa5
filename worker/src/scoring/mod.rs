//! Scoring generated groups (pipeline stage D): preprocessing that matches the reference image
//! processors, the object crop rule, and the [`Scorer`] that runs DINOv2, CLIP and an aesthetic
//! head over a group. The models themselves live in [`syncd_models`]; the filter rule that
//! consumes the scores lives in `syncd_proto::filter`.

pub mod crop;
pub mod preprocess;
pub mod scorer;

pub use scorer::{decode_image, decode_mask, pair_similarities, Scorer, ScorerConfig};
