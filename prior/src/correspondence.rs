//! Pixel correspondences between two views, as the reference computes them: every foreground
//! pixel of view A is lifted to 3D with its depth, projected into view B, and kept when view B's
//! depth at that pixel agrees with the projected depth (the point is visible in B, not hidden
//! behind another part of the object).
//!
//! Rows are written in the reference's PyTorch3D NDC convention (see
//! `syncd_proto::correspondence`): the A side is the pixel centre, the B side the continuous
//! projection.

use crate::camera::{apply, Camera};
use crate::raster::DepthMap;
use syncd_proto::correspondence::{pixel_to_ndc, CorrespondenceRow};

/// Side of the square grid correspondences are computed on (the reference's 128 x 128).
pub const CORRESPONDENCE_GRID: u32 = 128;

/// Largest depth disagreement, in units of the normalised (unit-size) object, for a projected
/// point to count as visible in the other view.
pub const DEPTH_TOLERANCE: f32 = 0.01;

/// One match: pixel `(col, row)` of view A lands at continuous position `(u, v)` of view B.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixelMatch {
    pub col_a: u32,
    pub row_a: u32,
    pub u_b: f32,
    pub v_b: f32,
}

/// Calls `visit` for every visible match from view A to view B. The depth maps must have the
/// same square size (the correspondence grid) and be rendered with the given cameras.
pub fn for_each_match(
    camera_a: &Camera,
    depth_a: &DepthMap,
    camera_b: &Camera,
    depth_b: &DepthMap,
    mut visit: impl FnMut(PixelMatch),
) {
    let (width_a, height_a) = (depth_a.width as f32, depth_a.height as f32);
    let (width_b, height_b) = (depth_b.width as f32, depth_b.height as f32);
    let ka = &camera_a.intrinsics;
    let kb = &camera_b.intrinsics;
    // Camera A to camera B in one rigid transform: p_b = R_b R_a^T (p_a - t_a) + t_b.
    let relative: [[f32; 3]; 3] = std::array::from_fn(|row| {
        std::array::from_fn(|col| {
            (0..3)
                .map(|k| camera_b.rotation[row][k] * camera_a.rotation[col][k])
                .sum()
        })
    });
    let shift = {
        let moved = apply(&relative, camera_a.translation);
        std::array::from_fn::<f32, 3, _>(|axis| camera_b.translation[axis] - moved[axis])
    };
    for row in 0..depth_a.height {
        for col in 0..depth_a.width {
            let depth = depth_a.depth[(row * depth_a.width + col) as usize];
            if depth <= 0.0 {
                continue;
            }
            let u = col as f32 + 0.5;
            let v = row as f32 + 0.5;
            let in_a = [
                (u / width_a - ka.cx) / ka.fx * depth,
                (v / height_a - ka.cy) / ka.fy * depth,
                depth,
            ];
            let rotated = apply(&relative, in_a);
            let [x, y, z] = std::array::from_fn(|axis| rotated[axis] + shift[axis]);
            if z <= 0.0 {
                continue;
            }
            let u_b = (kb.fx * x / z + kb.cx) * width_b;
            let v_b = (kb.fy * y / z + kb.cy) * height_b;
            let depth_in_b = depth_b.get(u_b.floor() as i64, v_b.floor() as i64);
            if depth_in_b > 0.0 && (depth_in_b - z).abs() < DEPTH_TOLERANCE {
                visit(PixelMatch {
                    col_a: col,
                    row_a: row,
                    u_b,
                    v_b,
                });
            }
        }
    }
}

/// The number of visible matches from A to B.
pub fn count_matches(
    camera_a: &Camera,
    depth_a: &DepthMap,
    camera_b: &Camera,
    depth_b: &DepthMap,
) -> u32 {
    let mut count = 0;
    for_each_match(camera_a, depth_a, camera_b, depth_b, |_| count += 1);
    count
}

/// The visible matches from A to B as rows `(y1, x1, y2, x2)` in PyTorch3D NDC.
pub fn correspondence_rows(
    camera_a: &Camera,
    depth_a: &DepthMap,
    camera_b: &Camera,
    depth_b: &DepthMap,
) -> Vec<CorrespondenceRow> {
    let grid = depth_a.width;
    debug_assert!(
        depth_a.width == depth_a.height && depth_b.width == grid && depth_b.height == grid
    );
    let mut rows = Vec::new();
    for_each_match(camera_a, depth_a, camera_b, depth_b, |found| {
        let (y1, x1) = pixel_to_ndc(grid, found.row_a as f32 + 0.5, found.col_a as f32 + 0.5);
        let (y2, x2) = pixel_to_ndc(grid, found.v_b, found.u_b);
        rows.push([y1, x1, y2, x2]);
    });
    rows
}
