//! The triangle soup the prior renders, and its normalisation to a unit-size object.
//!
//! A [`Mesh`] is flat: every glTF primitive instance is already transformed into the scene's world
//! frame by the loader, so the renderer sees one vertex array and one index array. The prior only
//! needs geometry (depth and silhouettes), so nothing else is kept.

use crate::error::{PriorError, Result};
use serde::{Deserialize, Serialize};

/// Triangles in one coordinate frame.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mesh {
    pub positions: Vec<[f32; 3]>,
    /// Vertex indices of each triangle; every index is `< positions.len()`.
    pub triangles: Vec<[u32; 3]>,
}

/// The similarity transform that brings an asset into the unit frame of the reference:
/// `normalised = (world - centre) * scale`, centring the bounding box on the origin and making its
/// largest side 1. Kept so that every output can be related back to the asset's own coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalisation {
    /// Centre of the asset's axis-aligned bounding box, in the asset's world frame.
    pub centre: [f32; 3],
    /// `1 / max extent` of that bounding box.
    pub scale: f32,
}

impl Normalisation {
    /// The transform as a 4x4 row-major matrix acting on column vectors (`p' = M p`).
    pub fn matrix(&self) -> [[f32; 4]; 4] {
        let s = self.scale;
        let [cx, cy, cz] = self.centre;
        [
            [s, 0.0, 0.0, -s * cx],
            [0.0, s, 0.0, -s * cy],
            [0.0, 0.0, s, -s * cz],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    pub fn apply(&self, point: [f32; 3]) -> [f32; 3] {
        std::array::from_fn(|axis| (point[axis] - self.centre[axis]) * self.scale)
    }
}

impl Mesh {
    pub fn triangle_count(&self) -> usize {
        self.triangles.len()
    }

    /// Axis-aligned bounding box `(min, max)` of the vertices that triangles use.
    ///
    /// Unreferenced vertices are ignored: assets sometimes carry stray vertices far away, which
    /// would otherwise shrink the visible object.
    pub fn bounds(&self) -> Option<([f32; 3], [f32; 3])> {
        let mut used = vec![false; self.positions.len()];
        for triangle in &self.triangles {
            for &index in triangle {
                used[index as usize] = true;
            }
        }
        let mut min = [f32::INFINITY; 3];
        let mut max = [f32::NEG_INFINITY; 3];
        let mut any = false;
        for (position, _) in self.positions.iter().zip(&used).filter(|(_, &used)| used) {
            any = true;
            for axis in 0..3 {
                min[axis] = min[axis].min(position[axis]);
                max[axis] = max[axis].max(position[axis]);
            }
        }
        any.then_some((min, max))
    }

    /// The normalisation of the reference: bounding-box centre to the origin, largest extent to 1.
    pub fn normalisation(&self) -> Result<Normalisation> {
        let (min, max) = self.bounds().ok_or(PriorError::NoTriangles)?;
        let centre: [f32; 3] = std::array::from_fn(|axis| 0.5 * (min[axis] + max[axis]));
        let extent = (0..3)
            .map(|axis| f64::from(max[axis]) - f64::from(min[axis]))
            .fold(0.0f64, f64::max);
        let scale = (1.0 / extent) as f32;
        // A point-like asset (zero extent) or one whose extent does not fit in f32 cannot be
        // brought to unit size.
        if !(extent > 0.0
            && scale.is_finite()
            && scale > 0.0
            && centre.iter().all(|c| c.is_finite()))
        {
            return Err(PriorError::DegenerateExtent);
        }
        Ok(Normalisation { centre, scale })
    }

    /// Applies a normalisation in place.
    pub fn apply(&mut self, normalisation: &Normalisation) {
        for position in &mut self.positions {
            *position = normalisation.apply(*position);
        }
    }

    /// Normalises the mesh to unit size and returns the transform that was applied.
    pub fn normalise(&mut self) -> Result<Normalisation> {
        let normalisation = self.normalisation()?;
        self.apply(&normalisation);
        Ok(normalisation)
    }

    /// The largest distance of a used vertex from the origin: the radius of the smallest
    /// origin-centred sphere holding the object, which decides how far the cameras must stand.
    pub fn radius(&self) -> f32 {
        self.triangles
            .iter()
            .flatten()
            .map(|&index| {
                let [x, y, z] = self.positions[index as usize];
                (x * x + y * y + z * z).sqrt()
            })
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_centres_the_box_and_makes_the_largest_side_one() {
        let mut mesh = Mesh {
            positions: vec![
                [1.0, 2.0, 3.0],
                [5.0, 3.0, 4.0],
                [1.0, 4.0, 3.5],
                [100.0; 3],
            ],
            // The last vertex is unused and must not count.
            triangles: vec![[0, 1, 2]],
        };
        let normalisation = mesh.normalise().unwrap();
        assert_eq!(normalisation.centre, [3.0, 3.0, 3.5]);
        assert_eq!(normalisation.scale, 0.25);
        let (min, max) = mesh.bounds().unwrap();
        assert_eq!(min, [-0.5, -0.25, -0.125]);
        assert_eq!(max, [0.5, 0.25, 0.125]);
    }

    #[test]
    fn a_point_like_mesh_is_degenerate() {
        let mut mesh = Mesh {
            positions: vec![[1.0; 3]; 3],
            triangles: vec![[0, 1, 2]],
        };
        assert!(matches!(
            mesh.normalise(),
            Err(PriorError::DegenerateExtent)
        ));
    }
}
