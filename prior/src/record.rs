//! `cameras.json`: the description of a set of rendered views that lets any consumer relate the
//! images back to 3D (the warping, a viewer, a re-render).

use crate::camera::{Camera, ImageTransform};
use crate::mesh::Normalisation;
use serde::{Deserialize, Serialize};

/// The conventions, spelled out in the file itself so it can be read without this code.
pub const CONVENTION: &str = "world: normalised asset frame (glTF axes, +y up); \
camera: OpenCV (+x right, +y down, +z forward), p_camera = world_to_camera * p_world; \
pixels: u = column (+right), v = row (+down), pixel (c, r) centred at (c + 0.5, r + 0.5), \
[u, v, 1]^T ~ intrinsics * p_camera; depth = camera-frame z; \
asset_to_world = normalisation matrix applied to the asset's scene coordinates";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CamerasRecord {
    pub convention: String,
    /// Size of the images the intrinsics are for.
    pub width: u32,
    pub height: u32,
    /// Side of the square grid the correspondences are computed on.
    pub correspondence_grid: u32,
    pub normalisation: NormalisationRecord,
    pub views: Vec<ViewRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormalisationRecord {
    /// Bounding-box centre of the asset, in its own scene coordinates.
    pub centre: [f32; 3],
    /// `1 / max extent` of the asset's bounding box.
    pub scale: f32,
    /// `asset_to_world`, 4x4 row-major: `p_world = M p_asset`.
    pub asset_to_world: [[f32; 4]; 4],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewRecord {
    /// Index of the view in the ring of cameras.
    pub ring_view: u32,
    pub azimuth_deg: f32,
    pub elevation_deg: f32,
    pub distance: f32,
    /// Share of the frame the object covers before augmentation.
    pub coverage: f32,
    /// 3x3 row-major, in pixels of `width x height` images (augmentation included).
    pub intrinsics: [[f32; 3]; 3],
    /// 4x4 row-major.
    pub world_to_camera: [[f32; 4]; 4],
    /// The placement augmentation already folded into `intrinsics` (identity when none).
    pub augmentation: ImageTransform,
}

impl CamerasRecord {
    pub fn new(
        width: u32,
        height: u32,
        correspondence_grid: u32,
        normalisation: &Normalisation,
        views: Vec<ViewRecord>,
    ) -> Self {
        CamerasRecord {
            convention: CONVENTION.to_string(),
            width,
            height,
            correspondence_grid,
            normalisation: NormalisationRecord {
                centre: normalisation.centre,
                scale: normalisation.scale,
                asset_to_world: normalisation.matrix(),
            },
            views,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("camera records always serialise")
    }
}

impl ViewRecord {
    pub fn new(
        ring_view: usize,
        camera: &Camera,
        coverage: f32,
        augmentation: ImageTransform,
        width: u32,
        height: u32,
    ) -> Self {
        ViewRecord {
            ring_view: ring_view as u32,
            azimuth_deg: camera.azimuth_deg,
            elevation_deg: camera.elevation_deg,
            distance: camera.distance,
            coverage,
            intrinsics: camera.intrinsics.matrix(width, height),
            world_to_camera: camera.world_to_camera(),
            augmentation,
        }
    }
}
