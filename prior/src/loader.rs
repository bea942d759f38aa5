//! Loading the geometry of an Objaverse asset (glTF 2.0: `.glb`, or `.gltf` with external or
//! embedded buffers) into one flat [`Mesh`] in the default scene's world frame.
//!
//! The `gltf` crate parses the container and the document and validates its indices; this module
//! adds what a worker fed untrusted files needs on top of it:
//!
//! - every size the file declares (GLB chunk lengths, buffer lengths, buffer views, accessors) is
//!   checked against the bytes actually present, with overflow-checked arithmetic, **before**
//!   anything is allocated or read, so a truncated or hostile file is an error, never a panic or a
//!   huge allocation;
//! - the number of triangles and vertices the scene would instantiate is bounded up front
//!   ([`LoadLimits`]), so a small file instancing a large mesh thousands of times is refused;
//! - extensions that change geometry and that the prior cannot decode (Draco, meshopt,
//!   quantisation) are refused with a clear error, while required extensions that only concern
//!   materials or textures are accepted, since only geometry is used.
//!
//! Only triangle-list primitives are loaded. Points and lines have no surface to render and
//! triangle strips and fans are rare in Objaverse; all of them are skipped and listed in
//! [`LoadReport::skipped`].

use crate::error::{PriorError, Result};
use crate::mesh::Mesh;
use base64::Engine as _;
use gltf::mesh::Mode;
use gltf::Semantic;
use std::borrow::Cow;
use std::io::Read;
use std::path::{Component, Path};

/// Bounds on what one asset may make the prior allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Triangles over all instantiated primitives.
    pub max_triangles: u64,
    /// Vertices over all instantiated primitives.
    pub max_vertices: u64,
    /// Depth of the node hierarchy; deeper (or cyclic) hierarchies are refused.
    pub max_node_depth: usize,
    /// Node visits while walking the scene (a node reachable through several parents counts
    /// once per path).
    pub max_node_visits: usize,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_triangles: 20_000_000,
            max_vertices: 30_000_000,
            max_node_depth: 128,
            max_node_visits: 100_000,
        }
    }
}

/// What loading found besides the triangles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Mesh instances in the default scene (a mesh referenced by two nodes counts twice).
    pub mesh_instances: usize,
    /// Triangle primitives loaded (per instance).
    pub primitives: usize,
    /// One line per primitive that was not loaded and why.
    pub skipped: Vec<String>,
}

/// A loaded asset: its triangles in world coordinates (not yet normalised) and the report.
#[derive(Clone, Debug)]
pub struct LoadedAsset {
    pub mesh: Mesh,
    pub report: LoadReport,
}

/// Where buffers referenced by URI may be read from.
#[derive(Clone, Copy, Debug)]
pub enum ExternalBuffers<'a> {
    /// Only the GLB binary chunk and `data:` URIs: what a worker accepts from object storage.
    Refuse,
    /// Files relative to this folder (the folder of a `.gltf` file), never outside it.
    RelativeTo(&'a Path),
}

/// Extensions that may be required without changing the geometry the prior reads.
const GEOMETRY_NEUTRAL_EXTENSION_PREFIXES: &[&str] = &[
    "KHR_materials_",
    "KHR_texture_",
    "EXT_texture_",
    "MSFT_texture_",
    "KHR_lights_",
    "EXT_lights_",
    "KHR_xmp",
];

const GLB_MAGIC: &[u8; 4] = b"glTF";
/// GLB file header (12 bytes) plus the JSON chunk header (8 bytes).
const GLB_MIN_LENGTH: usize = 20;

/// Loads a `.glb` held in memory. Buffers must be embedded (binary chunk or `data:` URI).
pub fn load_glb(bytes: &[u8]) -> Result<LoadedAsset> {
    load_bytes(bytes, ExternalBuffers::Refuse, &LoadLimits::default())
}

/// Loads a `.glb` or `.gltf` file; a `.gltf` file's external buffers are read from its folder.
pub fn load_path(path: &Path) -> Result<LoadedAsset> {
    let bytes = std::fs::read(path).map_err(|source| PriorError::io(path, source))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    load_bytes(
        &bytes,
        ExternalBuffers::RelativeTo(folder),
        &LoadLimits::default(),
    )
}

/// Loads glTF (binary or JSON) from memory.
pub fn load_bytes(
    bytes: &[u8],
    external: ExternalBuffers<'_>,
    limits: &LoadLimits,
) -> Result<LoadedAsset> {
    let (root, blob) = parse_container(bytes)?;
    let document = validate_document(root)?;
    let buffers = resolve_buffers(&document, blob.as_deref(), external)?;
    let scene = document
        .default_scene()
        .or_else(|| document.scenes().next())
        .ok_or_else(|| PriorError::InvalidGltf("the asset has no scene".into()))?;
    let instances = collect_instances(&scene, limits)?;
    check_budget(&instances, limits)?;
    build_mesh(&instances, &buffers)
}

/// Splits a GLB into JSON and binary chunk, or takes the bytes as glTF JSON.
fn parse_container(bytes: &[u8]) -> Result<(gltf::json::Root, Option<Cow<'_, [u8]>>)> {
    if bytes.starts_with(GLB_MAGIC) {
        let glb = split_glb(bytes)?;
        let root = gltf::json::Root::from_slice(&glb.json).map_err(|error| {
            PriorError::InvalidGltf(format!("the JSON chunk does not parse: {error}"))
        })?;
        return Ok((root, glb.bin));
    }
    let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(PriorError::NotGltf(
            "neither the binary glTF magic \"glTF\" nor a JSON object".into(),
        ));
    }
    match gltf::json::Root::from_slice(bytes) {
        Ok(root) => Ok((root, None)),
        Err(error) if error.is_data() => Err(PriorError::InvalidGltf(format!(
            "the JSON is not a glTF document: {error}"
        ))),
        Err(error) => Err(PriorError::NotGltf(format!(
            "the JSON does not parse: {error}"
        ))),
    }
}

/// Checks the GLB header against the actual length before the `gltf` crate reads it (it trusts
/// the declared total length in ways that can underflow on hostile input).
fn split_glb(bytes: &[u8]) -> Result<gltf::binary::Glb<'_>> {
    if bytes.len() < GLB_MIN_LENGTH {
        return Err(PriorError::MalformedGlb(format!(
            "{} bytes is shorter than the {GLB_MIN_LENGTH}-byte headers",
            bytes.len()
        )));
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
    let version = word(4);
    if version != 2 {
        return Err(PriorError::MalformedGlb(format!(
            "version {version}, only glTF 2 is supported"
        )));
    }
    let declared = word(8) as usize;
    if declared < GLB_MIN_LENGTH {
        return Err(PriorError::MalformedGlb(format!(
            "declared length {declared} is shorter than its headers"
        )));
    }
    if declared > bytes.len() {
        return Err(PriorError::MalformedGlb(format!(
            "truncated: the header declares {declared} bytes, {} are present",
            bytes.len()
        )));
    }
    gltf::binary::Glb::from_slice(&bytes[..declared])
        .map_err(|error| PriorError::MalformedGlb(error.to_string()))
}

/// Refuses geometry extensions the prior cannot decode, then lets `gltf` validate the document.
fn validate_document(mut root: gltf::json::Root) -> Result<gltf::Document> {
    let mut unsupported = Vec::new();
    for extension in &root.extensions_required {
        if extension == "KHR_draco_mesh_compression" {
            return Err(PriorError::DracoCompressed);
        }
        let neutral = GEOMETRY_NEUTRAL_EXTENSION_PREFIXES
            .iter()
            .any(|prefix| extension.starts_with(prefix));
        if !neutral {
            unsupported.push(extension.clone());
        }
    }
    if !unsupported.is_empty() {
        return Err(PriorError::Unsupported(format!(
            "required extensions {}",
            unsupported.join(", ")
        )));
    }
    // Material and texture extensions do not affect geometry: drop them from the required list so
    // that the crate's validation, which only knows the extensions it implements, accepts them.
    root.extensions_required.clear();
    // gltf-json 1.4's primitive validation indexes the accessor list with the POSITION index
    // before checking it (a panic on hostile input, found by fuzzing): check it first.
    let accessor_count = root.accessors.len();
    for (mesh_index, mesh) in root.meshes.iter().enumerate() {
        for (primitive_index, primitive) in mesh.primitives.iter().enumerate() {
            let position = primitive
                .attributes
                .get(&gltf::json::validation::Checked::Valid(Semantic::Positions));
            if let Some(accessor) = position.filter(|index| index.value() >= accessor_count) {
                return Err(PriorError::InvalidGltf(format!(
                    "mesh {mesh_index} primitive {primitive_index}: POSITION refers to accessor \
                     {} of {accessor_count}",
                    accessor.value()
                )));
            }
        }
    }
    gltf::Document::from_json(root).map_err(|error| match error {
        gltf::Error::Validation(errors) => {
            let shown: Vec<String> = errors
                .iter()
                .take(5)
                .map(|(path, error)| format!("{path}: {error}"))
                .collect();
            PriorError::InvalidGltf(format!(
                "{} validation error(s): {}",
                errors.len(),
                shown.join("; ")
            ))
        }
        other => PriorError::InvalidGltf(other.to_string()),
    })
}

/// The bytes of every buffer, each exactly as long as it declares.
fn resolve_buffers<'a>(
    document: &gltf::Document,
    blob: Option<&'a [u8]>,
    external: ExternalBuffers<'_>,
) -> Result<Vec<Cow<'a, [u8]>>> {
    document
        .buffers()
        .map(|buffer| {
            let index = buffer.index();
            let declared = buffer.length();
            let too_short = |available: usize| PriorError::BufferTooShort {
                buffer: index,
                declared: declared as u64,
                available: available as u64,
            };
            match buffer.source() {
                gltf::buffer::Source::Bin => {
                    let blob = blob.ok_or_else(|| PriorError::BufferUnavailable {
                        buffer: index,
                        reason: "it has no URI and the asset has no GLB binary chunk".into(),
                    })?;
                    if index != 0 {
                        return Err(PriorError::BufferUnavailable {
                            buffer: index,
                            reason: "only buffer 0 may refer to the GLB binary chunk".into(),
                        });
                    }
                    let bytes = blob.get(..declared).ok_or_else(|| too_short(blob.len()))?;
                    Ok(Cow::Borrowed(bytes))
                }
                gltf::buffer::Source::Uri(uri) if uri.starts_with("data:") => {
                    let (_, payload) = uri.split_once(";base64,").ok_or_else(|| {
                        PriorError::BufferUnavailable {
                            buffer: index,
                            reason: "data URI is not base64".into(),
                        }
                    })?;
                    // Base64 yields at most 3 bytes per 4 characters: refuse before decoding.
                    let decodable = payload.len() / 4 * 3 + 2;
                    if decodable < declared {
                        return Err(too_short(decodable));
                    }
                    let mut bytes = base64::engine::general_purpose::STANDARD
                        .decode(payload)
                        .map_err(|error| PriorError::BufferUnavailable {
                            buffer: index,
                            reason: format!("data URI does not decode: {error}"),
                        })?;
                    if bytes.len() < declared {
                        return Err(too_short(bytes.len()));
                    }
                    bytes.truncate(declared);
                    Ok(Cow::Owned(bytes))
                }
                gltf::buffer::Source::Uri(uri) => match external {
                    ExternalBuffers::Refuse => Err(PriorError::BufferUnavailable {
                        buffer: index,
                        reason: format!(
                            "it refers to the external file {uri:?}; only self-contained assets \
                             (GLB or data URIs) are accepted here"
                        ),
                    }),
                    ExternalBuffers::RelativeTo(folder) => {
                        read_external_buffer(folder, uri, index, declared).map(Cow::Owned)
                    }
                },
            }
        })
        .collect()
}

/// Reads `declared` bytes of a buffer file next to a `.gltf`, refusing paths that leave its
/// folder and files shorter than declared (checked on the file's size before reading).
fn read_external_buffer(
    folder: &Path,
    uri: &str,
    index: usize,
    declared: usize,
) -> Result<Vec<u8>> {
    let unavailable = |reason: String| PriorError::BufferUnavailable {
        buffer: index,
        reason,
    };
    let relative = percent_decode(uri).ok_or_else(|| unavailable(format!("bad URI {uri:?}")))?;
    let relative = Path::new(&relative);
    let inside_folder = relative
        .components()
        .all(|component| matches!(component, Component::Normal(_) | Component::CurDir));
    if uri.contains("://") || !inside_folder {
        return Err(unavailable(format!(
            "URI {uri:?} does not name a file inside the asset's folder"
        )));
    }
    let path = folder.join(relative);
    let file = std::fs::File::open(&path).map_err(|source| PriorError::io(&path, source))?;
    let available = file
        .metadata()
        .map_err(|source| PriorError::io(&path, source))?
        .len();
    if available < declared as u64 {
        return Err(PriorError::BufferTooShort {
            buffer: index,
            declared: declared as u64,
            available,
        });
    }
    let mut bytes = Vec::with_capacity(declared);
    file.take(declared as u64)
        .read_to_end(&mut bytes)
        .map_err(|source| PriorError::io(&path, source))?;
    if bytes.len() < declared {
        return Err(PriorError::BufferTooShort {
            buffer: index,
            declared: declared as u64,
            available: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Decodes `%XX` escapes of a relative URI; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(uri: &str) -> Option<String> {
    let bytes = uri.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A mesh placed in the scene: the mesh and its node's world matrix (column-major, as glTF).
struct Instance<'a> {
    mesh: gltf::Mesh<'a>,
    world: [[f32; 4]; 4],
}

/// Walks the scene's node trees (iteratively, with depth and visit limits so that a cyclic or
/// absurdly deep hierarchy is an error rather than a stack overflow) and composes transforms.
fn collect_instances<'a>(
    scene: &gltf::Scene<'a>,
    limits: &LoadLimits,
) -> Result<Vec<Instance<'a>>> {
    let mut instances = Vec::new();
    let mut stack: Vec<(gltf::Node<'a>, [[f32; 4]; 4], usize)> =
        scene.nodes().map(|node| (node, identity(), 0)).collect();
    let mut visits = 0usize;
    while let Some((node, parent, depth)) = stack.pop() {
        visits += 1;
        if visits > limits.max_node_visits {
            return Err(PriorError::TooLarge {
                what: "node visits",
                count: visits as u64,
                limit: limits.max_node_visits as u64,
            });
        }
        if depth > limits.max_node_depth {
            return Err(PriorError::InvalidGltf(format!(
                "the node hierarchy is deeper than {} (or cyclic) at node {}",
                limits.max_node_depth,
                node.index()
            )));
        }
        let world = multiply(&parent, &node.transform().matrix());
        if let Some(mesh) = node.mesh() {
            instances.push(Instance { mesh, world });
        }
        for child in node.children() {
            stack.push((child, world, depth + 1));
        }
    }
    Ok(instances)
}

/// Refuses a scene whose instantiated triangles or vertices exceed the limits, before reading.
fn check_budget(instances: &[Instance<'_>], limits: &LoadLimits) -> Result<()> {
    let mut triangles = 0u64;
    let mut vertices = 0u64;
    for instance in instances {
        for primitive in instance.mesh.primitives() {
            if primitive.mode() != Mode::Triangles {
                continue;
            }
            let vertex_count = primitive
                .get(&Semantic::Positions)
                .map_or(0, |accessor| accessor.count() as u64);
            let corner_count = primitive
                .indices()
                .map_or(vertex_count, |accessor| accessor.count() as u64);
            triangles = triangles.saturating_add(corner_count / 3);
            vertices = vertices.saturating_add(vertex_count);
        }
    }
    if triangles > limits.max_triangles {
        return Err(PriorError::TooLarge {
            what: "triangles",
            count: triangles,
            limit: limits.max_triangles,
        });
    }
    if vertices > limits.max_vertices {
        return Err(PriorError::TooLarge {
            what: "vertices",
            count: vertices,
            limit: limits.max_vertices,
        });
    }
    Ok(())
}

fn build_mesh(instances: &[Instance<'_>], buffers: &[Cow<'_, [u8]>]) -> Result<LoadedAsset> {
    let mut mesh = Mesh::default();
    let mut report = LoadReport {
        mesh_instances: instances.len(),
        ..LoadReport::default()
    };
    let buffer_data = |buffer: gltf::Buffer<'_>| buffers.get(buffer.index()).map(|data| &**data);
    for instance in instances {
        let mesh_index = instance.mesh.index();
        for primitive in instance.mesh.primitives() {
            let primitive_index = primitive.index();
            let bad_primitive = |reason: String| PriorError::BadPrimitive {
                mesh: mesh_index,
                primitive: primitive_index,
                reason,
            };
            if primitive.mode() != Mode::Triangles {
                report.skipped.push(format!(
                    "mesh {mesh_index} primitive {primitive_index}: mode {:?} is not a triangle list",
                    primitive.mode()
                ));
                continue;
            }
            let positions = primitive
                .get(&Semantic::Positions)
                .ok_or_else(|| bad_primitive("it has no POSITION attribute".into()))?;
            check_positions_accessor(&positions)?;
            check_accessor_bounds(&positions, buffers)?;
            if let Some(indices) = primitive.indices() {
                check_indices_accessor(&indices)?;
                check_accessor_bounds(&indices, buffers)?;
            }

            let reader = primitive.reader(buffer_data);
            let local: Vec<[f32; 3]> = reader
                .read_positions()
                .ok_or_else(|| bad_primitive("its positions cannot be read".into()))?
                .collect();
            if local.iter().flatten().any(|value| !value.is_finite()) {
                return Err(PriorError::NonFiniteVertex { mesh: mesh_index });
            }
            let base = u32::try_from(mesh.positions.len()).map_err(|_| PriorError::TooLarge {
                what: "vertices",
                count: mesh.positions.len() as u64,
                limit: u32::MAX as u64,
            })?;
            let vertex_count = local.len() as u32;
            for point in &local {
                let world = transform_point(&instance.world, *point);
                if world.iter().any(|value| !value.is_finite()) {
                    return Err(PriorError::NonFiniteVertex { mesh: mesh_index });
                }
                mesh.positions.push(world);
            }

            let corners: Vec<u32> = match reader.read_indices() {
                Some(indices) => indices.into_u32().collect(),
                None => (0..vertex_count).collect(),
            };
            if let Some(&bad) = corners.iter().find(|&&index| index >= vertex_count) {
                return Err(bad_primitive(format!(
                    "index {bad} is out of range for {vertex_count} vertices"
                )));
            }
            if !corners.len().is_multiple_of(3) {
                report.skipped.push(format!(
                    "mesh {mesh_index} primitive {primitive_index}: {} trailing indices ignored \
                     (not a multiple of 3)",
                    corners.len() % 3
                ));
            }
            mesh.triangles.extend(
                corners
                    .chunks_exact(3)
                    .map(|corner| [base + corner[0], base + corner[1], base + corner[2]]),
            );
            report.primitives += 1;
        }
    }
    if mesh.triangles.is_empty() {
        return Err(PriorError::NoTriangles);
    }
    Ok(LoadedAsset { mesh, report })
}

fn check_positions_accessor(accessor: &gltf::Accessor<'_>) -> Result<()> {
    use gltf::accessor::{DataType, Dimensions};
    if accessor.data_type() != DataType::F32
        || accessor.dimensions() != Dimensions::Vec3
        || accessor.normalized()
    {
        return Err(PriorError::Unsupported(format!(
            "POSITION accessor {} is {:?} {:?}; only float VEC3 positions are supported \
             (quantised positions need KHR_mesh_quantization)",
            accessor.index(),
            accessor.data_type(),
            accessor.dimensions()
        )));
    }
    Ok(())
}

fn check_indices_accessor(accessor: &gltf::Accessor<'_>) -> Result<()> {
    use gltf::accessor::{DataType, Dimensions};
    let unsigned = matches!(
        accessor.data_type(),
        DataType::U8 | DataType::U16 | DataType::U32
    );
    if !unsigned || accessor.dimensions() != Dimensions::Scalar {
        return Err(PriorError::BadAccessor {
            accessor: accessor.index(),
            reason: format!(
                "indices must be unsigned scalars, found {:?} {:?}",
                accessor.data_type(),
                accessor.dimensions()
            ),
        });
    }
    Ok(())
}

/// Checks that every byte the accessor (and its sparse part) would read lies inside its buffer
/// view and every view inside its buffer, with checked arithmetic. After this the `gltf` reader
/// cannot index out of bounds or overflow.
fn check_accessor_bounds(accessor: &gltf::Accessor<'_>, buffers: &[Cow<'_, [u8]>]) -> Result<()> {
    let index = accessor.index();
    let bad = |reason: String| PriorError::BadAccessor {
        accessor: index,
        reason,
    };
    let count = accessor.count();
    if count == 0 {
        return Err(bad("it has no elements".into()));
    }
    let element = accessor.size();
    match (accessor.view(), accessor.sparse()) {
        (None, None) => {
            return Err(bad("it has neither a buffer view nor sparse data".into()));
        }
        (Some(view), _) => {
            check_range(&view, accessor.offset(), count, element, buffers).map_err(&bad)?
        }
        (None, Some(_)) => {}
    }
    if let Some(sparse) = accessor.sparse() {
        let sparse_count = sparse.count();
        if sparse_count == 0 || sparse_count > count {
            return Err(bad(format!(
                "sparse count {sparse_count} is not in 1..={count}"
            )));
        }
        let indices = sparse.indices();
        check_range(
            &indices.view(),
            indices.offset(),
            sparse_count,
            indices.index_type().size(),
            buffers,
        )
        .map_err(|reason| bad(format!("sparse indices: {reason}")))?;
        let values = sparse.values();
        check_range(
            &values.view(),
            values.offset(),
            sparse_count,
            element,
            buffers,
        )
        .map_err(|reason| bad(format!("sparse values: {reason}")))?;
    }
    Ok(())
}

/// `count` elements of `element` bytes from `offset` in `view` (with its stride) fit in the view,
/// and the view fits in its buffer.
fn check_range(
    view: &gltf::buffer::View<'_>,
    offset: usize,
    count: usize,
    element: usize,
    buffers: &[Cow<'_, [u8]>],
) -> std::result::Result<(), String> {
    let stride = view.stride().unwrap_or(element);
    if stride < element {
        return Err(format!(
            "buffer view {} has stride {stride}, smaller than the {element}-byte element",
            view.index()
        ));
    }
    let end = stride
        .checked_mul(count - 1)
        .and_then(|bytes| bytes.checked_add(element))
        .and_then(|bytes| bytes.checked_add(offset))
        .ok_or_else(|| format!("{count} elements overflow the address space"))?;
    if end > view.length() {
        return Err(format!(
            "reads {end} bytes of buffer view {} which has {}",
            view.index(),
            view.length()
        ));
    }
    let buffer = view.buffer().index();
    let buffer_length = buffers.get(buffer).map_or(0, |data| data.len());
    let view_end = view
        .offset()
        .checked_add(view.length())
        .ok_or_else(|| format!("buffer view {} overflows", view.index()))?;
    if view_end > buffer_length {
        return Err(format!(
            "buffer view {} ends at byte {view_end} of buffer {buffer} which has {buffer_length}",
            view.index()
        ));
    }
    Ok(())
}

fn identity() -> [[f32; 4]; 4] {
    std::array::from_fn(|column| std::array::from_fn(|row| f32::from(u8::from(row == column))))
}

/// Product of two column-major 4x4 matrices (`a * b`).
fn multiply(a: &[[f32; 4]; 4], b: &[[f32; 4]; 4]) -> [[f32; 4]; 4] {
    std::array::from_fn(|column| {
        std::array::from_fn(|row| (0..4).map(|k| a[k][row] * b[column][k]).sum())
    })
}

/// Applies a column-major affine matrix to a point.
fn transform_point(matrix: &[[f32; 4]; 4], point: [f32; 3]) -> [f32; 3] {
    std::array::from_fn(|row| {
        matrix[0][row] * point[0]
            + matrix[1][row] * point[1]
            + matrix[2][row] * point[2]
            + matrix[3][row]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_compose_in_gltf_order() {
        // Translate by (1, 0, 0) after scaling by 2: a point at x = 1 lands on x = 3.
        let mut translate = identity();
        translate[3][0] = 1.0;
        let mut scale = identity();
        for (axis, column) in scale.iter_mut().enumerate().take(3) {
            column[axis] = 2.0;
        }
        let world = multiply(&translate, &scale);
        assert_eq!(transform_point(&world, [1.0, 1.0, 0.0]), [3.0, 2.0, 0.0]);
    }

    #[test]
    fn uris_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b.bin").as_deref(), Some("a b.bin"));
        assert_eq!(percent_decode("bad%2"), None);
    }
}
