//! Loading glTF assets: scene hierarchies and buffer kinds that must load, and bad input that
//! must fail with a clear, permanent error and never panic or allocate what the file declares.

use serde_json::json;
use syncd_prior::loader::{load_bytes, ExternalBuffers, LoadLimits};
use syncd_prior::synthetic::{cube, glb, uv_sphere, GltfWriter};
use syncd_prior::{load_glb, load_path, PriorError};

fn assert_close(actual: [f32; 3], expected: [f32; 3]) {
    for axis in 0..3 {
        assert!(
            (actual[axis] - expected[axis]).abs() < 1e-5,
            "{actual:?} != {expected:?}"
        );
    }
}

#[test]
fn a_single_mesh_loads_unchanged() {
    let mesh = uv_sphere(0.7, 12, 6);
    let asset = load_glb(&GltfWriter::single(&mesh).to_glb()).unwrap();
    assert_eq!(asset.mesh, mesh);
    assert_eq!(asset.report.mesh_instances, 1);
    assert_eq!(asset.report.primitives, 1);
    assert!(asset.report.skipped.is_empty());
}

#[test]
fn node_transforms_compose_down_the_hierarchy() {
    let mut writer = GltfWriter::new();
    let unit = writer.add_mesh(&cube(0.5));
    // A root translated by (10, 0, 0) holding the cube directly.
    let moved = writer.add_node(json!({"mesh": unit, "translation": [10.0, 0.0, 0.0]}));
    // A parent scaling by 2 and turning 90 degrees about +Y, whose child is moved by (0, 0, 3):
    // the child ends up at parent * (0, 0, 3) = rotate(0, 0, 6) = (6, 0, 0), cube side 2.
    let child = writer.add_node(json!({"mesh": unit, "translation": [0.0, 0.0, 3.0]}));
    let half = std::f32::consts::FRAC_1_SQRT_2;
    let parent = writer.add_node(json!({
        "children": [child], "scale": [2.0, 2.0, 2.0], "rotation": [0.0, half, 0.0, half]
    }));
    // A matrix node (column-major) translating by (0, -5, 0).
    let matrix = writer.add_node(json!({
        "mesh": unit,
        "matrix": [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -5.0, 0.0, 1.0]
    }));
    for root in [moved, parent, matrix] {
        writer.add_root(root);
    }
    let asset = load_glb(&writer.to_glb()).unwrap();
    assert_eq!(asset.report.mesh_instances, 3);
    assert_eq!(asset.mesh.triangle_count(), 36);
    // Each instance occupies 8 consecutive vertices; their bounding boxes tell the transforms.
    let mut boxes: Vec<([f32; 3], [f32; 3])> = asset
        .mesh
        .positions
        .chunks(8)
        .map(|corners| {
            let mut min = [f32::INFINITY; 3];
            let mut max = [f32::NEG_INFINITY; 3];
            for corner in corners {
                for axis in 0..3 {
                    min[axis] = min[axis].min(corner[axis]);
                    max[axis] = max[axis].max(corner[axis]);
                }
            }
            (min, max)
        })
        .collect();
    boxes.sort_by(|a, b| a.0[0].partial_cmp(&b.0[0]).unwrap());
    let expected = [
        ([-0.5, -5.5, -0.5], [0.5, -4.5, 0.5]),
        ([5.0, -1.0, -1.0], [7.0, 1.0, 1.0]),
        ([9.5, -0.5, -0.5], [10.5, 0.5, 0.5]),
    ];
    for ((min, max), (expected_min, expected_max)) in boxes.into_iter().zip(expected) {
        assert_close(min, expected_min);
        assert_close(max, expected_max);
    }
}

#[test]
fn external_and_data_uri_buffers_load_and_paths_cannot_escape() {
    let mesh = cube(0.5);
    let writer = GltfWriter::single(&mesh);
    let folder = tempfile::tempdir().unwrap();
    let (document, binary) = writer.to_gltf_with_external_buffer("cube%20data.bin");
    std::fs::write(folder.path().join("cube data.bin"), &binary).unwrap();
    std::fs::write(folder.path().join("cube.gltf"), &document).unwrap();
    let asset = load_path(&folder.path().join("cube.gltf")).unwrap();
    assert_eq!(asset.mesh, mesh);

    // A worker only accepts self-contained assets.
    let error = load_glb(&document).unwrap_err();
    assert!(
        matches!(error, PriorError::BufferUnavailable { .. }),
        "{error}"
    );

    let (escaping, _) = writer.to_gltf_with_external_buffer("../cube.bin");
    let error = load_bytes(
        &escaping,
        ExternalBuffers::RelativeTo(folder.path()),
        &LoadLimits::default(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("inside the asset's folder"),
        "{error}"
    );

    // The same buffer as a base64 data URI.
    use base64::Engine as _;
    let mut embedded = writer.document();
    embedded["buffers"][0]["uri"] = json!(format!(
        "data:application/octet-stream;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(writer.binary())
    ));
    let asset = load_glb(&serde_json::to_vec(&embedded).unwrap()).unwrap();
    assert_eq!(asset.mesh, mesh);
}

#[test]
fn every_truncation_of_a_glb_is_a_clear_error() {
    let bytes = GltfWriter::single(&cube(0.5)).to_glb();
    for length in 0..bytes.len() {
        let error = load_glb(&bytes[..length]).expect_err("a truncated file must not load");
        assert!(error.is_permanent(), "{error}");
        assert!(
            matches!(
                error,
                PriorError::MalformedGlb(_) | PriorError::NotGltf(_) | PriorError::InvalidGltf(_)
            ),
            "length {length}: {error}"
        );
    }
}

#[test]
fn a_glb_header_shorter_than_its_own_headers_is_rejected() {
    let mut bytes = GltfWriter::single(&cube(0.5)).to_glb();
    bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
    let error = load_glb(&bytes).unwrap_err();
    assert!(matches!(error, PriorError::MalformedGlb(_)), "{error}");
}

#[test]
fn files_that_are_not_gltf_are_rejected() {
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    for bytes in [&png[..], b"", b"hello world", b"[1, 2, 3]"] {
        let error = load_glb(bytes).unwrap_err();
        assert!(matches!(error, PriorError::NotGltf(_)), "{error}");
        assert!(error.is_permanent());
    }
    // JSON, but not a glTF document.
    let error = load_glb(br#"{"hello": "world"}"#).unwrap_err();
    assert!(matches!(error, PriorError::InvalidGltf(_)), "{error}");
}

#[test]
fn an_asset_without_triangles_is_rejected() {
    // Points only.
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    document["meshes"][0]["primitives"][0]["mode"] = json!(0);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(matches!(error, PriorError::NoTriangles), "{error}");
    // A scene with no mesh at all.
    let mut document = writer.document();
    document["nodes"][0] = json!({"name": "empty"});
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(matches!(error, PriorError::NoTriangles), "{error}");
}

#[test]
fn non_finite_vertices_are_rejected() {
    let mut mesh = cube(0.5);
    mesh.positions[3][1] = f32::NAN;
    let error = load_glb(&GltfWriter::single(&mesh).to_glb()).unwrap_err();
    assert!(
        matches!(error, PriorError::NonFiniteVertex { mesh: 0 }),
        "{error}"
    );
    // A finite vertex sent to infinity by its node's scale.
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    document["nodes"][0]["scale"] = json!([1e38, 1e38, 1e38]);
    document["nodes"][0]["translation"] = json!([3e38, 0.0, 0.0]);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(
        matches!(error, PriorError::NonFiniteVertex { .. }),
        "{error}"
    );
}

#[test]
fn a_two_gigabyte_declared_buffer_is_rejected_before_allocating() {
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    document["buffers"][0]["byteLength"] = json!(2u64 << 30);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    match error {
        PriorError::BufferTooShort {
            buffer: 0,
            declared,
            available,
        } => {
            assert_eq!(declared, 2 << 30);
            assert_eq!(available, writer.binary().len() as u64);
        }
        other => panic!("unexpected error {other}"),
    }
    // The same through a data URI: refused from the URI's length, before decoding.
    let mut document = writer.document();
    document["buffers"][0]["byteLength"] = json!(2u64 << 30);
    document["buffers"][0]["uri"] = json!("data:application/octet-stream;base64,AAAA");
    let error = load_glb(&serde_json::to_vec(&document).unwrap()).unwrap_err();
    assert!(
        matches!(error, PriorError::BufferTooShort { .. }),
        "{error}"
    );
}

#[test]
fn accessors_and_views_reaching_past_their_data_are_rejected() {
    let writer = GltfWriter::single(&cube(0.5));
    let cases = [
        ("accessors", 0, "count", json!(100_000)),
        ("accessors", 0, "byteOffset", json!(4_000_000_000u64)),
        ("accessors", 1, "count", json!(0)),
        ("bufferViews", 0, "byteLength", json!(1_000_000)),
        ("bufferViews", 0, "byteStride", json!(4)),
    ];
    for (array, index, field, value) in cases {
        let pointer = format!("{array}/{index}/{field}");
        let mut document = writer.document();
        document[array][index][field] = value;
        let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
        assert!(error.is_permanent(), "{pointer}: {error}");
        assert!(
            matches!(
                error,
                PriorError::BadAccessor { .. } | PriorError::InvalidGltf(_)
            ),
            "{pointer}: {error}"
        );
    }
    // Integer positions would need quantisation support.
    let mut document = writer.document();
    document["accessors"][0]["componentType"] = json!(5123);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(matches!(error, PriorError::Unsupported(_)), "{error}");
    // Indices beyond the vertex array.
    let mut mesh = cube(0.5);
    mesh.triangles[5][2] = 8;
    let error = load_glb(&GltfWriter::single(&mesh).to_glb()).unwrap_err();
    assert!(matches!(error, PriorError::BadPrimitive { .. }), "{error}");
}

#[test]
fn a_position_attribute_naming_a_missing_accessor_is_rejected() {
    // Found by fuzzing: gltf-json's own validation indexes the accessors with it.
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    document["meshes"][0]["primitives"][0]["attributes"]["POSITION"] = json!(7);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(matches!(error, PriorError::InvalidGltf(_)), "{error}");
    document["accessors"] = json!([]);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(matches!(error, PriorError::InvalidGltf(_)), "{error}");
}

#[test]
fn draco_and_other_geometry_extensions_are_refused_material_ones_accepted() {
    let writer = GltfWriter::single(&cube(0.5));
    let with_required = |extensions: &[&str]| {
        let mut document = writer.document();
        document["extensionsUsed"] = json!(extensions);
        document["extensionsRequired"] = json!(extensions);
        load_glb(&glb(&document, writer.binary()))
    };
    let error = with_required(&["KHR_draco_mesh_compression"]).unwrap_err();
    assert!(matches!(error, PriorError::DracoCompressed), "{error}");
    assert!(error.to_string().contains("Draco"));
    let error = with_required(&["EXT_meshopt_compression"]).unwrap_err();
    assert!(matches!(error, PriorError::Unsupported(_)), "{error}");
    assert!(error.is_permanent());
    let asset = with_required(&["KHR_materials_unlit", "KHR_texture_transform"]).unwrap();
    assert_eq!(asset.mesh.triangle_count(), 12);
}

#[test]
fn cyclic_hierarchies_and_instancing_bombs_are_refused() {
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    document["nodes"] = json!([{"mesh": 0, "children": [1]}, {"children": [0]}]);
    let error = load_glb(&glb(&document, writer.binary())).unwrap_err();
    assert!(error.is_permanent(), "{error}");

    let mut bomb = GltfWriter::new();
    let mesh = bomb.add_mesh(&cube(0.5));
    let leaves: Vec<usize> = (0..10)
        .map(|_| bomb.add_node(json!({"mesh": mesh})))
        .collect();
    let root = bomb.add_node(json!({"children": leaves}));
    bomb.add_root(root);
    let limits = LoadLimits {
        max_triangles: 100,
        ..LoadLimits::default()
    };
    let error = load_bytes(&bomb.to_glb(), ExternalBuffers::Refuse, &limits).unwrap_err();
    assert!(
        matches!(
            error,
            PriorError::TooLarge {
                what: "triangles",
                count: 120,
                ..
            }
        ),
        "{error}"
    );
}
