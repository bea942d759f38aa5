//! Pinhole cameras and the ring of views placed around a normalised object.
//!
//! # Conventions
//!
//! - **World frame**: the normalised asset frame (see [`crate::mesh::Normalisation`]), glTF's
//!   axes: +Y is up. Elevation is the angle above the XZ plane, azimuth turns about +Y starting
//!   from +Z towards +X.
//! - **Camera frame** (OpenCV): +x points right in the image, +y points down, +z is the viewing
//!   direction. A world point `p` is `R p + t` in camera coordinates, with `[R | t]` the
//!   world-to-camera matrix ([`Camera::world_to_camera`], row-major, acting on column vectors).
//!   **Depth** is the camera-frame `z` (distance along the optical axis, not along the ray).
//! - **Pixels**: `u` is the column (+u right), `v` the row (+v down). Pixel `(col, row)` covers
//!   `[col, col+1) x [row, row+1)`, its centre is `(col + 0.5, row + 0.5)`, and the rasteriser
//!   samples at centres. `u = fx * x / z + cx`, `v = fy * y / z + cy`.
//! - **Intrinsics** are stored for an image of size 1 x 1 ([`Intrinsics`]), so the same camera
//!   serves the generation resolution and the 128 x 128 correspondence grid: at `W x H` pixels,
//!   `K = [[fx W, 0, cx W], [0, fy H, cy H], [0, 0, 1]]`.
//!
//! The correspondence files use the reference's PyTorch3D NDC instead (+x left, +y up); the
//! conversion lives in `syncd_proto::correspondence`.

use crate::error::{PriorError, Result};
use serde::{Deserialize, Serialize};

/// Pinhole intrinsics for a 1 x 1 image (multiply by the image size to get pixels).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intrinsics {
    pub fx: f32,
    pub fy: f32,
    pub cx: f32,
    pub cy: f32,
}

impl Intrinsics {
    /// A centred camera whose horizontal and vertical field of view is `fov_deg` (square images).
    pub fn from_fov(fov_deg: f32) -> Self {
        let focal = 0.5 / (0.5 * fov_deg.to_radians()).tan();
        Intrinsics {
            fx: focal,
            fy: focal,
            cx: 0.5,
            cy: 0.5,
        }
    }

    /// The 3x3 matrix `K` for a `width x height` image, row-major.
    pub fn matrix(&self, width: u32, height: u32) -> [[f32; 3]; 3] {
        let (w, h) = (width as f32, height as f32);
        [
            [self.fx * w, 0.0, self.cx * w],
            [0.0, self.fy * h, self.cy * h],
            [0.0, 0.0, 1.0],
        ]
    }
}

/// A 2D similarity of the image plane, `p' = scale * p + offset`, in image units of size 1
/// (`p = (u / W, v / H)`). The augmentation scales and moves the object in the frame with one of
/// these, which is the same as changing the intrinsics (see [`Camera::with_image_transform`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageTransform {
    pub scale: f32,
    /// `[x, y]` offset, +x right, +y down.
    pub offset: [f32; 2],
}

impl ImageTransform {
    pub const IDENTITY: ImageTransform = ImageTransform {
        scale: 1.0,
        offset: [0.0, 0.0],
    };
}

/// A camera of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Camera {
    pub intrinsics: Intrinsics,
    /// Rotation `R` (row-major): row `i` is camera axis `i` expressed in world coordinates.
    pub rotation: [[f32; 3]; 3],
    /// Translation `t`: the world origin in camera coordinates.
    pub translation: [f32; 3],
    pub azimuth_deg: f32,
    pub elevation_deg: f32,
    /// Distance from the camera centre to the world origin.
    pub distance: f32,
}

impl Camera {
    /// A camera at `eye` looking at the world origin with +Y up.
    pub fn look_at_origin(
        intrinsics: Intrinsics,
        azimuth_deg: f32,
        elevation_deg: f32,
        distance: f32,
    ) -> Self {
        let (azimuth, elevation) = (azimuth_deg.to_radians(), elevation_deg.to_radians());
        let eye = [
            distance * elevation.cos() * azimuth.sin(),
            distance * elevation.sin(),
            distance * elevation.cos() * azimuth.cos(),
        ];
        let forward = normalize(scale(eye, -1.0));
        let right = normalize(cross(forward, [0.0, 1.0, 0.0]));
        let down = cross(forward, right);
        let rotation = [right, down, forward];
        let translation = std::array::from_fn(|row| -dot(rotation[row], eye));
        Camera {
            intrinsics,
            rotation,
            translation,
            azimuth_deg,
            elevation_deg,
            distance,
        }
    }

    /// `[R | t]` as a 4x4 row-major matrix: `p_camera = M p_world`.
    pub fn world_to_camera(&self) -> [[f32; 4]; 4] {
        let r = &self.rotation;
        let t = &self.translation;
        [
            [r[0][0], r[0][1], r[0][2], t[0]],
            [r[1][0], r[1][1], r[1][2], t[1]],
            [r[2][0], r[2][1], r[2][2], t[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    /// The camera centre in world coordinates (`-R^T t`).
    pub fn centre(&self) -> [f32; 3] {
        scale(transpose_apply(&self.rotation, self.translation), -1.0)
    }

    pub fn to_camera(&self, world: [f32; 3]) -> [f32; 3] {
        add(apply(&self.rotation, world), self.translation)
    }

    pub fn to_world(&self, camera: [f32; 3]) -> [f32; 3] {
        transpose_apply(&self.rotation, sub(camera, self.translation))
    }

    /// Continuous pixel position `(u, v)` and depth of a world point in a `width x height`
    /// image; `None` behind the camera.
    pub fn project(&self, world: [f32; 3], width: u32, height: u32) -> Option<(f32, f32, f32)> {
        let [x, y, z] = self.to_camera(world);
        if z <= 0.0 {
            return None;
        }
        let k = &self.intrinsics;
        Some((
            (k.fx * x / z + k.cx) * width as f32,
            (k.fy * y / z + k.cy) * height as f32,
            z,
        ))
    }

    /// The world point at continuous pixel position `(u, v)` with the given depth.
    pub fn unproject(&self, u: f32, v: f32, depth: f32, width: u32, height: u32) -> [f32; 3] {
        let k = &self.intrinsics;
        let x = (u / width as f32 - k.cx) / k.fx * depth;
        let y = (v / height as f32 - k.cy) / k.fy * depth;
        self.to_world([x, y, depth])
    }

    /// The same camera after the image is transformed by `transform`: a point that projected to
    /// `p` now projects to `scale * p + offset`.
    pub fn with_image_transform(&self, transform: &ImageTransform) -> Camera {
        let k = &self.intrinsics;
        Camera {
            intrinsics: Intrinsics {
                fx: k.fx * transform.scale,
                fy: k.fy * transform.scale,
                cx: k.cx * transform.scale + transform.offset[0],
                cy: k.cy * transform.scale + transform.offset[1],
            },
            ..*self
        }
    }
}

/// How the ring of views is laid out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RigOptions {
    /// Number of views.
    pub views: u32,
    /// View `i` has elevation `elevations_deg[i % len]`: alternating rings give neighbouring
    /// views different heights. The reference keeps only views with elevation in (0, 60).
    pub elevations_deg: Vec<f32>,
    /// View `i` has azimuth `azimuth_offset_deg + i * 360 / views`.
    pub azimuth_offset_deg: f32,
    /// Horizontal and vertical field of view. The default is the Blender default camera
    /// (50 mm lens, 36 mm sensor) of the Cap3D renders the reference used.
    pub fov_deg: f32,
    /// Camera distance from the origin; `None` picks the closest distance at which the object's
    /// bounding sphere fits in the frame, so every view sees the whole object.
    pub distance: Option<f32>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            views: 20,
            elevations_deg: vec![15.0, 35.0],
            azimuth_offset_deg: 0.0,
            fov_deg: 39.6,
            distance: None,
        }
    }
}

/// Margin on the fitted distance, so the silhouette does not touch the frame border.
const FIT_MARGIN: f32 = 1.02;

impl RigOptions {
    /// The cameras of the ring around an object of the given radius (see [`crate::Mesh::radius`]).
    pub fn cameras(&self, object_radius: f32) -> Result<Vec<Camera>> {
        if self.views == 0 || self.views > 1000 {
            return Err(PriorError::InvalidOptions(format!(
                "{} views; between 1 and 1000 are supported",
                self.views
            )));
        }
        if self.elevations_deg.is_empty()
            || self
                .elevations_deg
                .iter()
                .any(|elevation| elevation.is_nan() || elevation.abs() >= 89.0)
        {
            return Err(PriorError::InvalidOptions(
                "elevations must be given and lie strictly between -89 and 89 degrees".into(),
            ));
        }
        if !(self.fov_deg > 1.0 && self.fov_deg < 170.0) {
            return Err(PriorError::InvalidOptions(format!(
                "field of view {} degrees is not in (1, 170)",
                self.fov_deg
            )));
        }
        let fitted = object_radius / (0.5 * self.fov_deg.to_radians()).sin() * FIT_MARGIN;
        let distance = self.distance.unwrap_or(fitted);
        // The rasteriser relies on every vertex being in front of every camera.
        if !(distance.is_finite() && distance > object_radius * 1.001 && distance > 0.0) {
            return Err(PriorError::InvalidOptions(format!(
                "camera distance {distance} must exceed the object radius {object_radius}"
            )));
        }
        let intrinsics = Intrinsics::from_fov(self.fov_deg);
        Ok((0..self.views)
            .map(|view| {
                let azimuth = self.azimuth_offset_deg + view as f32 * 360.0 / self.views as f32;
                let elevation = self.elevations_deg[view as usize % self.elevations_deg.len()];
                Camera::look_at_origin(intrinsics, azimuth, elevation, distance)
            })
            .collect())
    }
}

pub(crate) fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn scale(a: [f32; 3], s: f32) -> [f32; 3] {
    a.map(|value| value * s)
}

fn add(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    std::array::from_fn(|i| a[i] + b[i])
}

fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    std::array::from_fn(|i| a[i] - b[i])
}

fn normalize(a: [f32; 3]) -> [f32; 3] {
    scale(a, 1.0 / dot(a, a).sqrt())
}

/// `R p` for a row-major rotation.
pub(crate) fn apply(rotation: &[[f32; 3]; 3], p: [f32; 3]) -> [f32; 3] {
    rotation.map(|row| dot(row, p))
}

/// `R^T p` for a row-major rotation.
fn transpose_apply(rotation: &[[f32; 3]; 3], p: [f32; 3]) -> [f32; 3] {
    std::array::from_fn(|column| (0..3).map(|row| rotation[row][column] * p[row]).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f32; 3], b: [f32; 3]) -> bool {
        (0..3).all(|i| (a[i] - b[i]).abs() < 1e-5)
    }

    #[test]
    fn a_camera_on_plus_z_sees_plus_x_on_the_right_and_plus_y_up() {
        let camera = Camera::look_at_origin(Intrinsics::from_fov(90.0), 0.0, 0.0, 2.0);
        assert!(close(camera.centre(), [0.0, 0.0, 2.0]));
        // The origin projects to the image centre at depth 2.
        let (u, v, z) = camera.project([0.0; 3], 100, 100).unwrap();
        assert!((u - 50.0).abs() < 1e-4 && (v - 50.0).abs() < 1e-4 && (z - 2.0).abs() < 1e-6);
        // +X world is to the right, +Y world is up (smaller row).
        let (u, _, _) = camera.project([0.5, 0.0, 0.0], 100, 100).unwrap();
        let (_, v, _) = camera.project([0.0, 0.5, 0.0], 100, 100).unwrap();
        assert!(u > 50.0 && v < 50.0);
        // With a 90 degree field of view, x = z at the right border.
        let (u, _, _) = camera.project([1.0, 0.0, 1.0], 100, 100).unwrap();
        assert!((u - 100.0).abs() < 1e-3);
    }

    #[test]
    fn unproject_inverts_project() {
        let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), 37.0, 25.0, 2.5);
        let point = [0.1, -0.2, 0.3];
        let (u, v, z) = camera.project(point, 128, 128).unwrap();
        assert!(close(camera.unproject(u, v, z, 128, 128), point));
        assert!((camera.elevation_deg - 25.0).abs() < 1e-6);
        // The camera is above the XZ plane for a positive elevation.
        assert!(camera.centre()[1] > 0.0);
    }

    #[test]
    fn an_image_transform_moves_projections_the_same_way() {
        let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), 10.0, 20.0, 2.0);
        let transform = ImageTransform {
            scale: 0.8,
            offset: [0.1, 0.15],
        };
        let moved = camera.with_image_transform(&transform);
        let point = [0.2, 0.1, -0.3];
        let (u, v, z) = camera.project(point, 200, 100).unwrap();
        let (u2, v2, z2) = moved.project(point, 200, 100).unwrap();
        assert!((u2 - (0.8 * u + 0.1 * 200.0)).abs() < 1e-3);
        assert!((v2 - (0.8 * v + 0.15 * 100.0)).abs() < 1e-3);
        assert_eq!(z, z2);
    }

    #[test]
    fn the_ring_fits_the_object_and_follows_the_layout() {
        let cameras = RigOptions::default().cameras(0.8).unwrap();
        assert_eq!(cameras.len(), 20);
        assert_eq!(cameras[1].elevation_deg, 35.0);
        assert!((cameras[1].azimuth_deg - 18.0).abs() < 1e-5);
        let fitted = 0.8 / (0.5f32 * 39.6f32.to_radians()).sin() * FIT_MARGIN;
        assert!((cameras[0].distance - fitted).abs() < 1e-5);
        assert!(RigOptions {
            distance: Some(0.5),
            ..RigOptions::default()
        }
        .cameras(0.8)
        .is_err());
    }
}
