//! The rasteriser against an independent reference: trimesh ray casting on the same mesh and
//! cameras (`scripts/fixtures/make_prior_fixtures.py` writes the fixture). The mesh is the GLB
//! trimesh exported, so this also covers loading a third-party file and the normalisation.

use safetensors::SafeTensors;
use syncd_prior::camera::{Camera, Intrinsics};
use syncd_prior::{load_glb, render_depth};

const FIXTURE_MESH: &[u8] = include_bytes!("fixtures/prior_reference.glb");
const FIXTURE_DEPTHS: &[u8] = include_bytes!("fixtures/prior_reference.safetensors");
/// Agreement tolerance on depth, in units of the unit-size object.
const DEPTH_TOLERANCE: f32 = 1e-3;

fn floats(tensors: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = tensors
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

#[test]
fn depth_agrees_with_trimesh_ray_casting() {
    let tensors = SafeTensors::deserialize(FIXTURE_DEPTHS).unwrap();
    let (shape, depth) = floats(&tensors, "depth");
    let (_, intrinsics) = floats(&tensors, "intrinsics");
    let (_, extrinsics) = floats(&tensors, "world_to_camera");
    let (views, size) = (shape[0], shape[1]);
    assert_eq!(shape[2], size);

    let mut mesh = load_glb(FIXTURE_MESH).unwrap().mesh;
    mesh.normalise().unwrap();

    let (mut foreground, mut agreeing, mut worst_agreeing) = (0usize, 0usize, 0f32);
    for view in 0..views {
        let k = &intrinsics[view * 9..view * 9 + 9];
        let m = &extrinsics[view * 16..view * 16 + 16];
        let camera = Camera {
            intrinsics: Intrinsics {
                fx: k[0] / size as f32,
                fy: k[4] / size as f32,
                cx: k[2] / size as f32,
                cy: k[5] / size as f32,
            },
            rotation: [[m[0], m[1], m[2]], [m[4], m[5], m[6]], [m[8], m[9], m[10]]],
            translation: [m[3], m[7], m[11]],
            azimuth_deg: 0.0,
            elevation_deg: 0.0,
            distance: 0.0,
        };
        let rendered = render_depth(&mesh, &camera, size as u32, size as u32);
        let reference = &depth[view * size * size..(view + 1) * size * size];
        for (&ours, &theirs) in rendered.depth.iter().zip(reference) {
            if ours <= 0.0 && theirs <= 0.0 {
                continue;
            }
            foreground += 1;
            let error = (ours - theirs).abs();
            if ours > 0.0 && theirs > 0.0 && error < DEPTH_TOLERANCE {
                agreeing += 1;
                worst_agreeing = worst_agreeing.max(error);
            }
        }
    }
    let share = agreeing as f64 / foreground as f64;
    println!(
        "{agreeing} of {foreground} foreground pixels agree within {DEPTH_TOLERANCE} \
         ({:.3}%), largest error among them {worst_agreeing:e}",
        100.0 * share
    );
    assert!(foreground > 10_000, "the fixture should have foreground");
    assert!(share > 0.99, "only {:.3}% of pixels agree", 100.0 * share);
}
