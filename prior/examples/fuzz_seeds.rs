//! Writes the seed inputs of the `load_asset` fuzz target (committed under
//! `fuzz/seeds/load_asset/`): small valid assets covering the loader's paths, from which the
//! fuzzer mutates. Run: `cargo run -p syncd-prior --example fuzz_seeds -- fuzz/seeds/load_asset`.

use base64::Engine as _;
use serde_json::json;
use std::path::PathBuf;
use syncd_prior::synthetic::{cube, glb, slab_with_pillar, uv_sphere, GltfWriter};

fn main() -> std::io::Result<()> {
    let folder = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: fuzz_seeds OUTPUT_FOLDER"),
    );
    std::fs::create_dir_all(&folder)?;

    std::fs::write(
        folder.join("cube.glb"),
        GltfWriter::single(&cube(0.5)).to_glb(),
    )?;

    // Several nodes with every transform form, one mesh instanced twice.
    let mut writer = GltfWriter::new();
    let slab = writer.add_mesh(&slab_with_pillar());
    let ball = writer.add_mesh(&uv_sphere(0.3, 8, 5));
    let child = writer.add_node(json!({"mesh": ball, "rotation": [0.0, 0.38, 0.0, 0.92]}));
    let parent =
        writer.add_node(json!({"mesh": slab, "children": [child], "scale": [2.0, 1.0, 2.0]}));
    let matrix = writer.add_node(json!({
        "mesh": ball,
        "matrix": [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 1.0]
    }));
    writer.add_root(parent);
    writer.add_root(matrix);
    std::fs::write(folder.join("nodes.glb"), writer.to_glb())?;

    // JSON glTF with its buffer as a data URI.
    let writer = GltfWriter::single(&uv_sphere(0.5, 6, 4));
    let mut document = writer.document();
    document["buffers"][0]["uri"] = json!(format!(
        "data:application/octet-stream;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(writer.binary())
    ));
    std::fs::write(folder.join("sphere.gltf"), serde_json::to_vec(&document)?)?;

    // A points primitive next to a triangle one, and a sparse accessor.
    let writer = GltfWriter::single(&cube(0.5));
    let mut document = writer.document();
    let primitive = document["meshes"][0]["primitives"][0].clone();
    let mut points = primitive.clone();
    points["mode"] = json!(0);
    document["meshes"][0]["primitives"] = json!([primitive, points]);
    document["accessors"][0]["sparse"] = json!({
        "count": 1,
        "indices": {"bufferView": 1, "componentType": 5125},
        "values": {"bufferView": 0}
    });
    std::fs::write(folder.join("mixed.glb"), glb(&document, writer.binary()))?;
    Ok(())
}
