//! A CPU z-buffer rasteriser that renders depth and the foreground mask of a [`Mesh`].
//!
//! How it works, and why:
//!
//! - Vertices are projected once per view and snapped to fixed point with [`SUBPIXEL_BITS`] bits
//!   of sub-pixel precision. Edge functions are then exact 64-bit integers, so two triangles that
//!   share an edge agree on which side of it every pixel centre lies: no cracks, no double
//!   coverage.
//! - Pixel centres exactly on an edge follow a top-left style ownership rule: of the two
//!   directions in which adjacent triangles traverse a shared edge, only one owns it.
//! - Each triangle walks its bounding box with incremental edge functions (one add per pixel and
//!   edge). Most triangles of a dense mesh cover less than a pixel: their box is usually empty and
//!   they cost only the projection and a few comparisons.
//! - Depth is perspective-correct: `1/z` is affine in screen space, so it is interpolated with
//!   the screen-space barycentrics and inverted per pixel. The z-buffer stores `1/z` (larger is
//!   nearer; 0 is empty), so an empty pixel needs no special value.
//! - No back-face culling: Objaverse meshes are often open or inconsistently wound, and the depth
//!   of the nearest surface is wanted whichever way it faces.
//!
//! Triangles with a vertex at or behind the near plane are skipped. The ring cameras always stand
//! outside the object's bounding sphere (checked in [`crate::camera::RigOptions::cameras`]), so
//! this never happens for them; it only keeps arbitrary cameras from producing garbage.

use crate::camera::{apply, Camera};
use crate::mesh::Mesh;

/// Sub-pixel precision of the snapped vertex positions.
pub const SUBPIXEL_BITS: u32 = 8;
const SUBPIXEL_ONE: i64 = 1 << SUBPIXEL_BITS;
const HALF_PIXEL: i64 = SUBPIXEL_ONE / 2;
/// Projected coordinates beyond this many pixels from the origin are not representable exactly
/// (fixed-point coordinates stay below 2^29, so edge functions, a difference of two products of
/// coordinate differences, stay below 2^61 and inside i64); triangles reaching there are skipped.
const GUARD_BAND_PIXELS: f32 = (1 << 21) as f32;
/// Vertices nearer than this (camera-frame z) are treated as behind the camera.
const NEAR_PLANE: f32 = 1e-4;

/// A depth image: camera-frame z per pixel, 0 where no surface was hit (the background).
#[derive(Clone, Debug, PartialEq)]
pub struct DepthMap {
    pub width: u32,
    pub height: u32,
    /// Row-major, `depth[row * width + col]`.
    pub depth: Vec<f32>,
}

impl DepthMap {
    pub fn empty(width: u32, height: u32) -> Self {
        DepthMap {
            width,
            height,
            depth: vec![0.0; width as usize * height as usize],
        }
    }

    /// Depth at `(col, row)`, 0 for the background or outside the image.
    pub fn get(&self, col: i64, row: i64) -> f32 {
        if col < 0 || row < 0 || col >= i64::from(self.width) || row >= i64::from(self.height) {
            return 0.0;
        }
        self.depth[row as usize * self.width as usize + col as usize]
    }

    pub fn is_foreground(&self, col: i64, row: i64) -> bool {
        self.get(col, row) > 0.0
    }

    pub fn foreground_pixels(&self) -> usize {
        self.depth.iter().filter(|&&depth| depth > 0.0).count()
    }

    /// Fraction of the frame covered by the object.
    pub fn coverage(&self) -> f32 {
        self.foreground_pixels() as f32 / self.depth.len().max(1) as f32
    }

    /// The foreground's bounding box in image units of size 1, `[left, top, right, bottom]`
    /// (pixel edges, not centres); `None` for an empty image.
    pub fn foreground_box(&self) -> Option<[f32; 4]> {
        let width = self.width as usize;
        let mut bounds: Option<[usize; 4]> = None;
        for (index, _) in self.depth.iter().enumerate().filter(|(_, &d)| d > 0.0) {
            let (col, row) = (index % width, index / width);
            let b = bounds.get_or_insert([col, row, col, row]);
            b[0] = b[0].min(col);
            b[1] = b[1].min(row);
            b[2] = b[2].max(col);
            b[3] = b[3].max(row);
        }
        bounds.map(|[left, top, right, bottom]| {
            [
                left as f32 / self.width as f32,
                top as f32 / self.height as f32,
                (right + 1) as f32 / self.width as f32,
                (bottom + 1) as f32 / self.height as f32,
            ]
        })
    }
}

/// A vertex after projection: snapped screen position and `1/z`.
#[derive(Clone, Copy, Debug, Default)]
struct ScreenVertex {
    x: i64,
    y: i64,
    inverse_depth: f32,
    /// In front of the near plane and inside the guard band.
    usable: bool,
}

/// Renders depth maps, reusing its vertex buffer between calls.
#[derive(Debug, Default)]
pub struct Rasteriser {
    screen: Vec<ScreenVertex>,
}

impl Rasteriser {
    pub fn new() -> Self {
        Rasteriser::default()
    }

    /// Renders the depth of `mesh` seen by `camera` into a `width x height` image.
    pub fn render(&mut self, mesh: &Mesh, camera: &Camera, width: u32, height: u32) -> DepthMap {
        self.project(mesh, camera, width, height);
        let mut inverse_depth = vec![0.0f32; width as usize * height as usize];
        for triangle in &mesh.triangles {
            let [a, b, c] = triangle.map(|index| self.screen[index as usize]);
            if a.usable && b.usable && c.usable {
                draw_triangle(&mut inverse_depth, width, height, a, b, c);
            }
        }
        DepthMap {
            width,
            height,
            depth: inverse_depth
                .into_iter()
                .map(|inverse| if inverse > 0.0 { 1.0 / inverse } else { 0.0 })
                .collect(),
        }
    }

    fn project(&mut self, mesh: &Mesh, camera: &Camera, width: u32, height: u32) {
        let k = &camera.intrinsics;
        let (fx, fy) = (k.fx * width as f32, k.fy * height as f32);
        let (cx, cy) = (k.cx * width as f32, k.cy * height as f32);
        self.screen.clear();
        self.screen.extend(mesh.positions.iter().map(|&position| {
            let [x, y, z] = apply(&camera.rotation, position);
            let z = z + camera.translation[2];
            let (x, y) = (x + camera.translation[0], y + camera.translation[1]);
            if z.is_nan() || z <= NEAR_PLANE {
                return ScreenVertex::default();
            }
            let u = fx * x / z + cx;
            let v = fy * y / z + cy;
            if !(u.abs() < GUARD_BAND_PIXELS && v.abs() < GUARD_BAND_PIXELS) {
                return ScreenVertex::default();
            }
            ScreenVertex {
                x: (u * SUBPIXEL_ONE as f32).round() as i64,
                y: (v * SUBPIXEL_ONE as f32).round() as i64,
                inverse_depth: 1.0 / z,
                usable: true,
            }
        }));
    }
}

/// Renders one depth map without keeping a [`Rasteriser`] around.
pub fn render_depth(mesh: &Mesh, camera: &Camera, width: u32, height: u32) -> DepthMap {
    Rasteriser::new().render(mesh, camera, width, height)
}

/// The edge function of `a -> b` at `p`: twice the signed area of `(a, b, p)`.
fn edge(a: &ScreenVertex, b: &ScreenVertex, px: i64, py: i64) -> i64 {
    (b.x - a.x) * (py - a.y) - (b.y - a.y) * (px - a.x)
}

/// Whether edge `a -> b` owns the pixel centres lying exactly on it. The reverse edge `b -> a`
/// never does, which is all a shared edge needs.
fn owns_boundary(a: &ScreenVertex, b: &ScreenVertex) -> bool {
    let (dx, dy) = (b.x - a.x, b.y - a.y);
    dy > 0 || (dy == 0 && dx < 0)
}

/// First pixel index whose centre is at or after fixed-point coordinate `min`.
fn first_centre_at_or_after(min: i64) -> i64 {
    (min - HALF_PIXEL + SUBPIXEL_ONE - 1).div_euclid(SUBPIXEL_ONE)
}

/// Last pixel index whose centre is at or before fixed-point coordinate `max`.
fn last_centre_at_or_before(max: i64) -> i64 {
    (max - HALF_PIXEL).div_euclid(SUBPIXEL_ONE)
}

fn draw_triangle(
    inverse_depth: &mut [f32],
    width: u32,
    height: u32,
    a: ScreenVertex,
    b: ScreenVertex,
    c: ScreenVertex,
) {
    // Pixel range of the bounding box, clipped to the image. Most triangles of dense meshes stop
    // here because no pixel centre falls inside their box.
    let col_start = first_centre_at_or_after(a.x.min(b.x).min(c.x)).max(0);
    let col_end = last_centre_at_or_before(a.x.max(b.x).max(c.x)).min(i64::from(width) - 1);
    if col_start > col_end {
        return;
    }
    let row_start = first_centre_at_or_after(a.y.min(b.y).min(c.y)).max(0);
    let row_end = last_centre_at_or_before(a.y.max(b.y).max(c.y)).min(i64::from(height) - 1);
    if row_start > row_end {
        return;
    }

    let area = edge(&a, &b, c.x, c.y);
    if area == 0 {
        return;
    }
    // Orient every triangle the same way so "inside" is "all edge functions non-negative".
    let (a, b, c) = if area > 0 { (a, b, c) } else { (a, c, b) };
    let area = area.abs();

    // Barycentric weight of vertex a is edge(b, c), of b is edge(c, a), of c is edge(a, b).
    // A pixel is inside when each weight is positive, or zero on an owned edge: the bias turns
    // "w > 0 || (w == 0 && owned)" into "w + bias >= 0".
    let bias = |from: &ScreenVertex, to: &ScreenVertex| -i64::from(!owns_boundary(from, to));
    let (bias_a, bias_b, bias_c) = (bias(&b, &c), bias(&c, &a), bias(&a, &b));

    let start_x = col_start * SUBPIXEL_ONE + HALF_PIXEL;
    let start_y = row_start * SUBPIXEL_ONE + HALF_PIXEL;
    let mut row_weights = [
        edge(&b, &c, start_x, start_y),
        edge(&c, &a, start_x, start_y),
        edge(&a, &b, start_x, start_y),
    ];
    // Steps of the edge functions for one pixel right and one pixel down.
    let step_x = [
        -(c.y - b.y) * SUBPIXEL_ONE,
        -(a.y - c.y) * SUBPIXEL_ONE,
        -(b.y - a.y) * SUBPIXEL_ONE,
    ];
    let step_y = [
        (c.x - b.x) * SUBPIXEL_ONE,
        (a.x - c.x) * SUBPIXEL_ONE,
        (b.x - a.x) * SUBPIXEL_ONE,
    ];

    // 1/z = 1/z_a + w_b (1/z_b - 1/z_a) + w_c (1/z_c - 1/z_a), weights normalised by the area.
    let inverse_area = 1.0 / area as f64;
    let gradient_b = (f64::from(b.inverse_depth) - f64::from(a.inverse_depth)) * inverse_area;
    let gradient_c = (f64::from(c.inverse_depth) - f64::from(a.inverse_depth)) * inverse_area;
    let base = f64::from(a.inverse_depth);

    let width = width as usize;
    for row in row_start..=row_end {
        let mut weights = row_weights;
        let row_offset = row as usize * width;
        for col in col_start..=col_end {
            if weights[0] + bias_a >= 0 && weights[1] + bias_b >= 0 && weights[2] + bias_c >= 0 {
                let value =
                    (base + weights[1] as f64 * gradient_b + weights[2] as f64 * gradient_c) as f32;
                let slot = &mut inverse_depth[row_offset + col as usize];
                if value > *slot {
                    *slot = value;
                }
            }
            for edge_index in 0..3 {
                weights[edge_index] += step_x[edge_index];
            }
        }
        for edge_index in 0..3 {
            row_weights[edge_index] += step_y[edge_index];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camera::Intrinsics;

    /// A camera on +Z at distance 2 looking at the origin with a 90 degree field of view: at
    /// depth z the image spans [-z, z] in x and y.
    fn front_camera() -> Camera {
        Camera::look_at_origin(Intrinsics::from_fov(90.0), 0.0, 0.0, 2.0)
    }

    fn quad(z: f32, half: f32) -> Mesh {
        Mesh {
            positions: vec![
                [-half, -half, z],
                [half, -half, z],
                [half, half, z],
                [-half, half, z],
            ],
            triangles: vec![[0, 1, 2], [0, 2, 3]],
        }
    }

    #[test]
    fn a_fronto_parallel_quad_has_constant_depth_and_exact_extent() {
        // The quad at world z = 0 is at depth 2 and spans [-1, 1]: exactly the middle half of a
        // 64-pixel image, columns and rows 16..48.
        let depth = render_depth(&quad(0.0, 1.0), &front_camera(), 64, 64);
        for row in 0..64 {
            for col in 0..64 {
                let inside = (16..48).contains(&row) && (16..48).contains(&col);
                let value = depth.get(col, row);
                if inside {
                    assert!((value - 2.0).abs() < 1e-5, "({col}, {row}): {value}");
                } else {
                    assert_eq!(value, 0.0, "({col}, {row})");
                }
            }
        }
    }

    #[test]
    fn the_nearest_surface_wins_whatever_the_drawing_order() {
        let mut near_first = quad(0.5, 0.5);
        let far = quad(-0.5, 1.0);
        let offset = near_first.positions.len() as u32;
        near_first.positions.extend(&far.positions);
        near_first
            .triangles
            .extend(far.triangles.iter().map(|t| t.map(|i| i + offset)));
        let mut far_first = near_first.clone();
        far_first.triangles.reverse();
        for mesh in [near_first, far_first] {
            let depth = render_depth(&mesh, &front_camera(), 64, 64);
            assert!((depth.get(32, 32) - 1.5).abs() < 1e-5);
            // Outside the near quad the far quad shows.
            assert!((depth.get(20, 32) - 2.5).abs() < 1e-5);
        }
    }

    #[test]
    fn a_fan_of_triangles_covers_every_pixel_exactly_once() {
        // A fan around an off-grid centre: count coverage by rendering each triangle alone.
        let centre = [0.0123, -0.0371, 0.0];
        let mut positions = vec![centre];
        let segments = 37;
        for i in 0..segments {
            let angle = i as f32 / segments as f32 * std::f32::consts::TAU;
            positions.push([0.9 * angle.cos(), 0.9 * angle.sin(), 0.0]);
        }
        let triangles: Vec<[u32; 3]> = (0..segments)
            .map(|i| [0, 1 + i, 1 + (i + 1) % segments])
            .collect();
        let camera = front_camera();
        let mut counts = vec![0u32; 96 * 96];
        for (index, triangle) in triangles.iter().enumerate() {
            // Alternate winding: ownership must not depend on it.
            let triangle = if index % 2 == 0 {
                *triangle
            } else {
                [triangle[0], triangle[2], triangle[1]]
            };
            let single = Mesh {
                positions: positions.clone(),
                triangles: vec![triangle],
            };
            let depth = render_depth(&single, &camera, 96, 96);
            for (count, value) in counts.iter_mut().zip(&depth.depth) {
                *count += u32::from(*value > 0.0);
            }
        }
        let whole = render_depth(
            &Mesh {
                positions,
                triangles,
            },
            &camera,
            96,
            96,
        );
        for (count, value) in counts.iter().zip(&whole.depth) {
            assert!(*count <= 1, "a pixel was drawn by two triangles");
            assert_eq!(*count == 1, *value > 0.0);
        }
        // Interior pixels are all covered: no holes along the shared edges.
        let centre_pixel = 48;
        for offset in -15..=15 {
            assert!(whole.is_foreground(centre_pixel + offset, centre_pixel));
            assert!(whole.is_foreground(centre_pixel, centre_pixel + offset));
        }
    }

    #[test]
    fn depth_is_perspective_correct_on_a_slanted_plane() {
        // The plane z = 0.5 x (world) seen from +Z: depth along a pixel's ray is exact, not an
        // affine interpolation of the vertex depths.
        let mesh = Mesh {
            positions: vec![
                [-1.0, -1.0, -0.5],
                [1.0, -1.0, 0.5],
                [1.0, 1.0, 0.5],
                [-1.0, 1.0, -0.5],
            ],
            triangles: vec![[0, 1, 2], [0, 2, 3]],
        };
        let camera = front_camera();
        let depth = render_depth(&mesh, &camera, 128, 128);
        let mut checked = 0;
        for row in 0..128 {
            for col in 0..128 {
                let value = depth.get(col, row);
                if value == 0.0 {
                    continue;
                }
                // Ray through the pixel centre: x = t * (u - 64) / 64, z_world = 2 - t where t is
                // the depth; on the plane 2 - t = 0.5 * x.
                let slope = (col as f32 + 0.5 - 64.0) / 64.0;
                let expected = 2.0 / (1.0 + 0.5 * slope);
                assert!((value - expected).abs() < 1e-4, "{value} vs {expected}");
                checked += 1;
            }
        }
        assert!(checked > 3000);
    }

    #[test]
    fn foreground_box_and_coverage() {
        let depth = render_depth(&quad(0.0, 1.0), &front_camera(), 64, 64);
        assert_eq!(depth.foreground_box(), Some([0.25, 0.25, 0.75, 0.75]));
        assert!((depth.coverage() - 0.25).abs() < 1e-6);
        assert_eq!(DepthMap::empty(4, 4).foreground_box(), None);
    }
}
