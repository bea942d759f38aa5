//! The reference's placement augmentation: the object is shrunk by a random scale and placed
//! near the bottom of the frame, so generated images show it standing in a scene rather than
//! filling the frame.
//!
//! - scale `s ~ U(0.7, 0.95)`, or `U(0.9, 0.95)` when the object covers less than 20% of the frame
//!   (small objects must not become tiny); views where it covers less than 10% are not used;
//! - the image is scaled about its horizontal centre and moved vertically so the object's lowest
//!   pixel sits a small random margin above the bottom edge (our reading of "pasted near the
//!   bottom"; the object always stays fully in frame).
//!
//! The transform is applied to the camera intrinsics ([`Camera::with_image_transform`]), not to
//! rendered images: depth, mask and correspondences are then all rendered with the same
//! transformed camera, so they agree exactly and nothing is resampled.
//!
//! [`Camera::with_image_transform`]: crate::camera::Camera::with_image_transform

use crate::camera::ImageTransform;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AugmentOptions {
    /// Scale range for objects covering at least `small_coverage` of the frame.
    pub scale_range: (f32, f32),
    /// Scale range for objects covering less than `small_coverage`.
    pub small_object_scale_range: (f32, f32),
    pub small_coverage: f32,
    /// Views where the object covers less than this are not used at all.
    pub min_coverage: f32,
    /// Gap between the object's lowest pixel and the bottom edge, as a fraction of the height.
    pub bottom_margin_range: (f32, f32),
}

impl Default for AugmentOptions {
    fn default() -> Self {
        AugmentOptions {
            scale_range: (0.7, 0.95),
            small_object_scale_range: (0.9, 0.95),
            small_coverage: 0.2,
            min_coverage: 0.1,
            bottom_margin_range: (0.01, 0.05),
        }
    }
}

impl AugmentOptions {
    /// Whether a view whose object covers `coverage` of the frame may be used.
    pub fn accepts(&self, coverage: f32) -> bool {
        coverage >= self.min_coverage
    }

    /// Draws the transform of one view. `coverage` is the object's share of the frame and
    /// `foreground_box` its bounding box `[left, top, right, bottom]` in image units, both
    /// measured on the untransformed view.
    pub fn sample(
        &self,
        rng: &mut impl Rng,
        coverage: f32,
        foreground_box: [f32; 4],
    ) -> ImageTransform {
        let (low, high) = if coverage < self.small_coverage {
            self.small_object_scale_range
        } else {
            self.scale_range
        };
        let scale = uniform(rng, low, high);
        let margin = uniform(rng, self.bottom_margin_range.0, self.bottom_margin_range.1);
        let [_, top, _, bottom] = foreground_box;
        // Horizontally: scale about the image centre. Vertically: object bottom at 1 - margin,
        // but never push its top out of the frame.
        let offset_x = 0.5 * (1.0 - scale);
        let offset_y = (1.0 - margin - scale * bottom).max(-scale * top);
        ImageTransform {
            scale,
            offset: [offset_x, offset_y],
        }
    }
}

fn uniform(rng: &mut impl Rng, low: f32, high: f32) -> f32 {
    if high > low {
        rng.random_range(low..high)
    } else {
        low
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn scales_follow_the_coverage_rule_and_objects_land_near_the_bottom() {
        let options = AugmentOptions::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let object = [0.3, 0.2, 0.7, 0.8];
        for _ in 0..200 {
            let large = options.sample(&mut rng, 0.4, object);
            assert!((0.7..0.95).contains(&large.scale));
            let small = options.sample(&mut rng, 0.15, object);
            assert!((0.9..0.95).contains(&small.scale));
            for transform in [large, small] {
                let bottom = transform.scale * object[3] + transform.offset[1];
                let top = transform.scale * object[1] + transform.offset[1];
                assert!((0.95..=0.99).contains(&bottom), "bottom at {bottom}");
                assert!(top >= 0.0);
                // Horizontally centred scaling keeps the frame centre fixed.
                assert!((transform.scale * 0.5 + transform.offset[0] - 0.5).abs() < 1e-6);
            }
        }
        assert!(options.accepts(0.1) && !options.accepts(0.09));
    }

    #[test]
    fn the_same_seed_draws_the_same_transforms() {
        let options = AugmentOptions::default();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            options.sample(&mut rng, 0.5, [0.2, 0.2, 0.8, 0.8])
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
