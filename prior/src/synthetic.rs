//! Meshes with known geometry and a minimal glTF writer, for the tests, the benchmarks and the
//! fuzzer's seed inputs. Known shapes give analytic depths to compare against; writing real glTF
//! files exercises the same loader path as Objaverse assets.

use crate::mesh::Mesh;
use serde_json::{json, Value};

/// An axis-aligned box between `min` and `max`, 12 triangles, wound outwards.
pub fn cuboid(min: [f32; 3], max: [f32; 3]) -> Mesh {
    let corner = |index: usize| {
        [
            if index & 1 == 0 { min[0] } else { max[0] },
            if index & 2 == 0 { min[1] } else { max[1] },
            if index & 4 == 0 { min[2] } else { max[2] },
        ]
    };
    let positions = (0..8).map(corner).collect();
    // Each face as a quad of corner indices, counter-clockwise seen from outside.
    let faces: [[u32; 4]; 6] = [
        [0, 4, 6, 2], // -x
        [1, 3, 7, 5], // +x
        [0, 1, 5, 4], // -y
        [2, 6, 7, 3], // +y
        [0, 2, 3, 1], // -z
        [4, 5, 7, 6], // +z
    ];
    let triangles = faces
        .iter()
        .flat_map(|[a, b, c, d]| [[*a, *b, *c], [*a, *c, *d]])
        .collect();
    Mesh {
        positions,
        triangles,
    }
}

/// A cube of side `2 * half` centred on the origin.
pub fn cube(half: f32) -> Mesh {
    cuboid([-half; 3], [half; 3])
}

/// A latitude-longitude sphere: `2 * segments * (rings - 1)` triangles.
pub fn uv_sphere(radius: f32, segments: u32, rings: u32) -> Mesh {
    assert!(
        segments >= 3 && rings >= 2,
        "a sphere needs 3 segments and 2 rings"
    );
    let mut positions = vec![[0.0, radius, 0.0]];
    for ring in 1..rings {
        let polar = std::f32::consts::PI * ring as f32 / rings as f32;
        for segment in 0..segments {
            let azimuth = std::f32::consts::TAU * segment as f32 / segments as f32;
            positions.push([
                radius * polar.sin() * azimuth.cos(),
                radius * polar.cos(),
                radius * polar.sin() * azimuth.sin(),
            ]);
        }
    }
    positions.push([0.0, -radius, 0.0]);
    let bottom = positions.len() as u32 - 1;
    let vertex = |ring: u32, segment: u32| 1 + (ring - 1) * segments + segment % segments;
    let mut triangles = Vec::new();
    for segment in 0..segments {
        triangles.push([0, vertex(1, segment + 1), vertex(1, segment)]);
        triangles.push([
            bottom,
            vertex(rings - 1, segment),
            vertex(rings - 1, segment + 1),
        ]);
    }
    for ring in 1..rings - 1 {
        for segment in 0..segments {
            let (a, b) = (vertex(ring, segment), vertex(ring, segment + 1));
            let (c, d) = (vertex(ring + 1, segment), vertex(ring + 1, segment + 1));
            triangles.push([a, b, d]);
            triangles.push([a, d, c]);
        }
    }
    Mesh {
        positions,
        triangles,
    }
}

/// A sphere with about `triangles` triangles, for benchmarks.
pub fn sphere_with_triangles(triangles: usize) -> Mesh {
    // 2 * s * (r - 1) triangles with s = 2 r.
    let rings = ((triangles as f64 / 4.0).sqrt().round() as u32).max(2);
    uv_sphere(0.5, 2 * rings, rings)
}

/// A non-convex object with self-occlusion: a flat slab with a pillar standing on its front half.
/// Seen from the front and above, the pillar hides part of the slab.
pub fn slab_with_pillar() -> Mesh {
    merge(&[
        cuboid([-0.5, -0.1, -0.5], [0.5, 0.1, 0.5]),
        cuboid([-0.1, 0.1, 0.1], [0.1, 0.6, 0.3]),
    ])
}

/// The union of meshes as one triangle soup.
pub fn merge(meshes: &[Mesh]) -> Mesh {
    let mut merged = Mesh::default();
    for mesh in meshes {
        let offset = merged.positions.len() as u32;
        merged.positions.extend(&mesh.positions);
        merged
            .triangles
            .extend(mesh.triangles.iter().map(|t| t.map(|i| i + offset)));
    }
    merged
}

/// Builds glTF documents: meshes stored as float positions and u32 indices in one buffer, nodes
/// given as JSON so tests can use any transform form (matrix, TRS, children).
#[derive(Clone, Debug, Default)]
pub struct GltfWriter {
    binary: Vec<u8>,
    views: Vec<Value>,
    accessors: Vec<Value>,
    meshes: Vec<Value>,
    nodes: Vec<Value>,
    scene_roots: Vec<usize>,
}

impl GltfWriter {
    pub fn new() -> Self {
        GltfWriter::default()
    }

    /// Adds a mesh with one indexed triangle primitive; returns its index.
    pub fn add_mesh(&mut self, mesh: &Mesh) -> usize {
        let positions = self.add_view(
            mesh.positions
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes()),
        );
        let (min, max) = mesh.positions.iter().fold(
            ([f32::INFINITY; 3], [f32::NEG_INFINITY; 3]),
            |(mut min, mut max), p| {
                for axis in 0..3 {
                    min[axis] = min[axis].min(p[axis]);
                    max[axis] = max[axis].max(p[axis]);
                }
                (min, max)
            },
        );
        let finite = |values: [f32; 3]| values.map(|v| if v.is_finite() { v } else { 0.0 });
        self.accessors.push(json!({
            "bufferView": positions, "componentType": 5126, "count": mesh.positions.len(),
            "type": "VEC3", "min": finite(min), "max": finite(max),
        }));
        let position_accessor = self.accessors.len() - 1;
        let indices = self.add_view(
            mesh.triangles
                .iter()
                .flatten()
                .flat_map(|i| i.to_le_bytes()),
        );
        self.accessors.push(json!({
            "bufferView": indices, "componentType": 5125, "count": mesh.triangles.len() * 3,
            "type": "SCALAR",
        }));
        let index_accessor = self.accessors.len() - 1;
        self.meshes.push(json!({
            "primitives": [{"attributes": {"POSITION": position_accessor}, "indices": index_accessor}]
        }));
        self.meshes.len() - 1
    }

    /// Adds a node (any glTF node object); returns its index.
    pub fn add_node(&mut self, node: Value) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Makes a node a root of the scene.
    pub fn add_root(&mut self, node: usize) {
        self.scene_roots.push(node);
    }

    /// A writer holding one mesh on one root node with no transform.
    pub fn single(mesh: &Mesh) -> Self {
        let mut writer = GltfWriter::new();
        let mesh_index = writer.add_mesh(mesh);
        let node = writer.add_node(json!({ "mesh": mesh_index }));
        writer.add_root(node);
        writer
    }

    /// The document, with buffer 0 left without a URI (the GLB binary chunk).
    pub fn document(&self) -> Value {
        json!({
            "asset": {"version": "2.0", "generator": "syncd-prior synthetic"},
            "scene": 0,
            "scenes": [{"nodes": self.scene_roots}],
            "nodes": self.nodes,
            "meshes": self.meshes,
            "accessors": self.accessors,
            "bufferViews": self.views,
            "buffers": [{"byteLength": self.binary.len()}],
        })
    }

    /// The binary buffer.
    pub fn binary(&self) -> &[u8] {
        &self.binary
    }

    /// A `.glb` file.
    pub fn to_glb(&self) -> Vec<u8> {
        glb(&self.document(), &self.binary)
    }

    /// A `.gltf` document whose buffer is the external file `buffer_uri`, and that file's bytes.
    pub fn to_gltf_with_external_buffer(&self, buffer_uri: &str) -> (Vec<u8>, Vec<u8>) {
        let mut document = self.document();
        document["buffers"][0]["uri"] = json!(buffer_uri);
        (
            serde_json::to_vec(&document).expect("json"),
            self.binary.clone(),
        )
    }

    fn add_view(&mut self, bytes: impl Iterator<Item = u8>) -> usize {
        let offset = self.binary.len();
        self.binary.extend(bytes);
        let length = self.binary.len() - offset;
        // Keep every view 4-byte aligned, as glTF requires for float data.
        while !self.binary.len().is_multiple_of(4) {
            self.binary.push(0);
        }
        self.views
            .push(json!({"buffer": 0, "byteOffset": offset, "byteLength": length}));
        self.views.len() - 1
    }
}

/// Packs a document and a binary chunk into a `.glb` (any document: tests pass broken ones).
pub fn glb(document: &Value, binary: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(document).expect("json");
    gltf::binary::Glb {
        header: gltf::binary::Header {
            magic: *b"glTF",
            version: 2,
            // Computed by to_vec.
            length: 0,
        },
        json: json.into(),
        bin: (!binary.is_empty()).then(|| binary.to_vec().into()),
    }
    .to_vec()
    .expect("writing a GLB to memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_expected_sizes() {
        assert_eq!(cube(0.5).triangle_count(), 12);
        assert_eq!(uv_sphere(1.0, 8, 4).triangle_count(), 2 * 8 * 3);
        let big = sphere_with_triangles(100_000);
        assert!((90_000..110_000).contains(&big.triangle_count()));
        assert_eq!(slab_with_pillar().triangle_count(), 24);
    }
}
