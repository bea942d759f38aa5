//! The prior on meshes with known geometry: depth against analytic ray casting, correspondences
//! against the 3D points they stand for, occlusion, triplet selection and the job's files.

use syncd_prior::camera::{Camera, Intrinsics};
use syncd_prior::correspondence::{count_matches, for_each_match, CORRESPONDENCE_GRID};
use syncd_prior::pipeline::{build_scene, compute_prior, PriorOptions};
use syncd_prior::synthetic::{cube, cuboid, merge, slab_with_pillar, uv_sphere, GltfWriter};
use syncd_prior::triplets::{elevation_allowed, MIN_PAIR_MATCHES};
use syncd_prior::{
    render_depth, run_prior_job, Mesh, PriorError, Rasteriser, RenderOptions, RigOptions,
};
use syncd_proto::correspondence::{ndc_to_pixel, CorrespondenceSet};
use syncd_proto::keys;
use syncd_proto::messages::PriorJob;
use syncd_proto::{ObjectId, RunId};

type Aabb = ([f32; 3], [f32; 3]);

/// The boxes of `slab_with_pillar` (already unit-sized and centred: its bounding box is
/// [-0.5, 0.5] x [-0.1, 0.6] x [-0.5, 0.5], so normalisation moves it down by 0.25).
fn slab_with_pillar_boxes() -> Vec<Aabb> {
    vec![
        ([-0.5, -0.35, -0.5], [0.5, -0.15, 0.5]),
        ([-0.1, -0.15, 0.1], [0.1, 0.35, 0.3]),
    ]
}

/// The world ray through continuous pixel `(u, v)`: origin and unit direction, plus the cosine
/// between the direction and the optical axis (depth = distance * cosine).
fn pixel_ray(camera: &Camera, u: f32, v: f32, size: u32) -> ([f32; 3], [f32; 3], f32) {
    let origin = camera.centre();
    let through = camera.unproject(u, v, 1.0, size, size);
    let direction: [f32; 3] = std::array::from_fn(|i| through[i] - origin[i]);
    let length = direction.iter().map(|d| d * d).sum::<f32>().sqrt();
    let direction = direction.map(|d| d / length);
    let forward = camera.rotation[2];
    let cosine: f32 = (0..3).map(|i| direction[i] * forward[i]).sum();
    (origin, direction, cosine)
}

/// Slab-method ray/box intersection: the entry distance, if the ray hits the box.
fn hit_box(origin: [f32; 3], direction: [f32; 3], (min, max): Aabb) -> Option<f32> {
    let (mut near, mut far) = (f32::NEG_INFINITY, f32::INFINITY);
    for axis in 0..3 {
        let a = (min[axis] - origin[axis]) / direction[axis];
        let b = (max[axis] - origin[axis]) / direction[axis];
        near = near.max(a.min(b));
        far = far.min(a.max(b));
    }
    (near <= far && near > 0.0).then_some(near)
}

/// Analytic depth at continuous pixel `(u, v)` for a union of boxes (0 when nothing is hit).
fn boxes_depth(camera: &Camera, boxes: &[Aabb], u: f32, v: f32, size: u32) -> f32 {
    let (origin, direction, cosine) = pixel_ray(camera, u, v, size);
    boxes
        .iter()
        .filter_map(|&b| hit_box(origin, direction, b))
        .fold(None, |best: Option<f32>, t| {
            Some(best.map_or(t, |b| b.min(t)))
        })
        .map_or(0.0, |t| t * cosine)
}

/// Compares a rendered depth map with analytic depths at pixel centres: returns the number of
/// pixels whose coverage differs and the largest depth difference where both hit.
fn compare_with(depth: &syncd_prior::DepthMap, analytic: impl Fn(f32, f32) -> f32) -> (usize, f32) {
    let (mut coverage_mismatches, mut worst) = (0, 0.0f32);
    for row in 0..depth.height {
        for col in 0..depth.width {
            let rendered = depth.get(i64::from(col), i64::from(row));
            let expected = analytic(col as f32 + 0.5, row as f32 + 0.5);
            match (rendered > 0.0, expected > 0.0) {
                (true, true) => worst = worst.max((rendered - expected).abs()),
                (false, false) => {}
                _ => coverage_mismatches += 1,
            }
        }
    }
    (coverage_mismatches, worst)
}

fn normalised(mut mesh: Mesh) -> Mesh {
    mesh.normalise().unwrap();
    mesh
}

#[test]
fn cube_depth_matches_ray_casting_everywhere() {
    let mesh = normalised(cube(3.0));
    let boxes = [([-0.5; 3], [0.5; 3])];
    for (azimuth, elevation) in [(0.0, 0.0), (45.0, 30.0), (200.0, 55.0)] {
        let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), azimuth, elevation, 2.5);
        let depth = render_depth(&mesh, &camera, 256, 256);
        let (mismatches, worst) =
            compare_with(&depth, |u, v| boxes_depth(&camera, &boxes, u, v, 256));
        // Silhouette pixels can only disagree through the 1/256-pixel vertex snapping.
        assert!(
            mismatches <= 4,
            "{mismatches} coverage mismatches at {azimuth}/{elevation}"
        );
        assert!(worst < 1e-4, "depth off by {worst}");
        assert!(depth.coverage() > 0.1);
    }
    // A known pixel: facing the +Z face from 2.5 away, the centre is at depth 2.
    let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), 0.0, 0.0, 2.5);
    let depth = render_depth(&mesh, &camera, 256, 256);
    assert!((depth.get(128, 128) - 2.0).abs() < 1e-5);
    assert_eq!(depth.get(0, 0), 0.0);
}

#[test]
fn sphere_depth_matches_ray_casting_up_to_faceting() {
    let radius = 0.5;
    let mesh = uv_sphere(radius, 256, 128);
    let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), 30.0, 20.0, 2.0);
    let depth = render_depth(&mesh, &camera, 256, 256);
    let analytic = |u: f32, v: f32| {
        let (origin, direction, cosine) = pixel_ray(&camera, u, v, 256);
        let b: f32 = (0..3).map(|i| origin[i] * direction[i]).sum();
        let c: f32 = origin.iter().map(|o| o * o).sum::<f32>() - radius * radius;
        let discriminant = b * b - c;
        if discriminant < 0.0 {
            0.0
        } else {
            (-b - discriminant.sqrt()) * cosine
        }
    };
    let (mismatches, worst) = compare_with(&depth, analytic);
    // The inscribed polygon loses a thin rim at the silhouette: a ring of at most ~1 pixel
    // (the circle's circumference is about 2 pi 75 = 470 pixels).
    assert!(mismatches < 250, "{mismatches} coverage mismatches");
    // Faceting: chords of 1.4 degrees sit at most r (1 - cos 0.7 deg) = 4e-5 inside the sphere;
    // near the silhouette a grazing ray exaggerates it.
    let centre = depth.get(128, 128);
    assert!((centre - 1.5).abs() < 1e-3, "centre depth {centre}");
    assert!(worst < 0.05, "depth off by {worst}");
}

#[test]
fn self_occlusion_shows_the_nearest_part() {
    let mesh = normalised(slab_with_pillar());
    let boxes = slab_with_pillar_boxes();
    for (azimuth, elevation) in [(0.0, 20.0), (90.0, 40.0), (180.0, 10.0), (330.0, 55.0)] {
        let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), azimuth, elevation, 2.2);
        let depth = render_depth(&mesh, &camera, 200, 200);
        let (mismatches, worst) =
            compare_with(&depth, |u, v| boxes_depth(&camera, &boxes, u, v, 200));
        assert!(
            mismatches <= 6,
            "{mismatches} mismatches at {azimuth}/{elevation}"
        );
        // Vertex snapping (1/256 pixel) moves depth by slope / 256 on surfaces seen at a grazing
        // angle, up to a few 1e-4 here.
        assert!(
            worst < 1e-3,
            "depth off by {worst} at {azimuth}/{elevation}"
        );
    }
    // From the front, the image centre row shows the pillar in front of the slab: the pillar's
    // front face (z = 0.3) is nearer than anything of the slab behind it.
    let camera = Camera::look_at_origin(Intrinsics::from_fov(40.0), 0.0, 0.0, 2.2);
    let depth = render_depth(&mesh, &camera, 200, 200);
    let (_, v, _) = camera.project([0.0, 0.2, 0.3], 200, 200).unwrap();
    assert!((depth.get(100, v as i64) - 1.9).abs() < 1e-4);
}

/// Ring cameras around the normalised slab-with-pillar and their grid depths.
fn slab_scene() -> (Vec<Camera>, Vec<syncd_prior::DepthMap>) {
    let scene = build_scene(
        slab_with_pillar(),
        &RigOptions::default(),
        &mut Rasteriser::new(),
    )
    .unwrap();
    (scene.cameras, scene.grid_depths)
}

#[test]
fn correspondences_land_on_the_same_surface_point() {
    let (cameras, depths) = slab_scene();
    let boxes = slab_with_pillar_boxes();
    let grid = CORRESPONDENCE_GRID;
    let (mut checked, mut within_one_pixel) = (0usize, 0usize);
    for (a, b) in [(0, 1), (0, 3), (2, 7), (5, 4)] {
        for_each_match(&cameras[a], &depths[a], &cameras[b], &depths[b], |found| {
            let (u_a, v_a) = (found.col_a as f32 + 0.5, found.row_a as f32 + 0.5);
            // The point of A is on the surface ...
            let depth_a = depths[a].get(i64::from(found.col_a), i64::from(found.row_a));
            let analytic_a = boxes_depth(&cameras[a], &boxes, u_a, v_a, grid);
            assert!(
                (depth_a - analytic_a).abs() < 1e-3,
                "A's depth is not the surface's"
            );
            // ... and the match is its exact projection into B.
            let point = cameras[a].unproject(u_a, v_a, depth_a, grid, grid);
            let (u, v, _) = cameras[b].project(point, grid, grid).unwrap();
            assert!((u - found.u_b).abs() < 1e-3 && (v - found.v_b).abs() < 1e-3);
            // The surface B sees at the matched position, by ray casting, is the same 3D point:
            // it projects back into A's pixel.
            let depth_b = boxes_depth(&cameras[b], &boxes, found.u_b, found.v_b, grid);
            let seen_by_b = cameras[b].unproject(found.u_b, found.v_b, depth_b, grid, grid);
            let (back_u, back_v, _) = cameras[a].project(seen_by_b, grid, grid).unwrap();
            let distance = ((back_u - u_a).powi(2) + (back_v - v_a).powi(2)).sqrt();
            within_one_pixel += usize::from(depth_b > 0.0 && distance < 1.0);
            checked += 1;
        });
    }
    assert!(checked > 10_000, "only {checked} matches checked");
    // The visibility test samples B's depth at a pixel centre, so at an occluding edge a match can
    // be visible at the centre yet hidden at the exact position: a thin band, nothing more.
    let share = within_one_pixel as f64 / checked as f64;
    println!(
        "{within_one_pixel} of {checked} matches ({:.2}%) within one pixel",
        100.0 * share
    );
    assert!(share > 0.99, "{:.2}% within one pixel", 100.0 * share);
}

#[test]
fn occluded_points_are_rejected_and_visible_ones_kept() {
    // Views 0 (azimuth 0, the pillar's side) and 10 (azimuth 180): from 180 degrees, the pillar
    // hides part of the slab that view 0 sees, and the pillar's back hides its front face.
    let (cameras, depths) = slab_scene();
    let boxes = slab_with_pillar_boxes();
    let grid = CORRESPONDENCE_GRID;
    let (a, b) = (0, 10);
    let mut matched = vec![false; (grid * grid) as usize];
    for_each_match(&cameras[a], &depths[a], &cameras[b], &depths[b], |found| {
        matched[(found.row_a * grid + found.col_a) as usize] = true;
    });
    // The rule, with ray casting as the oracle: the surface B sees at the centre of the pixel a
    // point falls in must be within the tolerance of the point's depth.
    let (mut occluded, mut visible, mut visible_matched) = (0, 0, 0);
    for row in 0..grid {
        for col in 0..grid {
            let depth = depths[a].get(i64::from(col), i64::from(row));
            if depth <= 0.0 {
                continue;
            }
            let point = cameras[a].unproject(col as f32 + 0.5, row as f32 + 0.5, depth, grid, grid);
            let (u, v, z) = cameras[b].project(point, grid, grid).unwrap();
            let seen = boxes_depth(&cameras[b], &boxes, u.floor() + 0.5, v.floor() + 0.5, grid);
            let is_matched = matched[(row * grid + col) as usize];
            if seen > 0.0 && seen < z - 0.05 {
                occluded += 1;
                assert!(!is_matched, "occluded pixel ({col}, {row}) matched");
            } else if seen > 0.0 && (seen - z).abs() < 0.009 {
                visible += 1;
                visible_matched += usize::from(is_matched);
            }
        }
    }
    println!("{occluded} occluded, {visible_matched} of {visible} visible matched");
    assert!(
        occluded > 200,
        "the views should occlude each other ({occluded})"
    );
    assert!(visible > 200);
    assert!(
        visible_matched as f32 > 0.99 * visible as f32,
        "{visible_matched} of {visible} visible points matched"
    );
}

#[test]
fn triplets_follow_the_overlap_and_elevation_rules() {
    let options = PriorOptions {
        rig: RigOptions {
            views: 12,
            // Every third view is below the horizon and must never be used.
            elevations_deg: vec![20.0, 40.0, -10.0],
            ..RigOptions::default()
        },
        max_triplets: 1000,
        ..PriorOptions::default()
    };
    let mesh = slab_with_pillar();
    let prior = compute_prior(mesh, &options).unwrap();
    let scene = &prior.scene;
    // Recount independently: every triplet of allowed views whose three pairs qualify.
    let allowed: Vec<usize> = (0..12)
        .filter(|&v| elevation_allowed(scene.cameras[v].elevation_deg))
        .collect();
    assert_eq!(allowed.len(), 8);
    let count = |a: usize, b: usize| {
        count_matches(
            &scene.cameras[a],
            &scene.grid_depths[a],
            &scene.cameras[b],
            &scene.grid_depths[b],
        )
    };
    let mut expected = 0;
    for i in 0..allowed.len() {
        for j in i + 1..allowed.len() {
            for k in j + 1..allowed.len() {
                let (a, b, c) = (allowed[i], allowed[j], allowed[k]);
                if [count(a, b), count(a, c), count(b, c)]
                    .iter()
                    .all(|&n| n > MIN_PAIR_MATCHES)
                {
                    expected += 1;
                }
            }
        }
    }
    assert!(expected > 0);
    assert_eq!(prior.triplets.len(), expected);
    for pair in prior.triplets.windows(2) {
        assert!(pair[0].selection.overlap() >= pair[1].selection.overlap());
    }
    for triplet in &prior.triplets {
        assert!(triplet.selection.views.iter().all(|v| v % 3 != 2));
        assert!(triplet
            .selection
            .matches
            .iter()
            .all(|&n| n > MIN_PAIR_MATCHES));
    }

    // The default keeps the two best.
    let best_two = compute_prior(
        slab_with_pillar(),
        &PriorOptions {
            max_triplets: 2,
            ..options.clone()
        },
    )
    .unwrap();
    assert_eq!(best_two.triplets.len(), 2);
    assert_eq!(best_two.triplets[0].selection, prior.triplets[0].selection);
}

#[test]
fn objects_too_small_or_without_overlap_are_permanent_failures() {
    // A thin rod covers only a sliver of each view.
    let rod = cuboid([-0.01, -0.5, -0.01], [0.01, 0.5, 0.01]);
    let error = compute_prior(rod, &PriorOptions::default()).unwrap_err();
    assert!(
        matches!(error, PriorError::ObjectTooSmall { .. }),
        "{error}"
    );
    assert!(error.is_permanent());
    // Three views 120 degrees apart around a cube share too little surface.
    let options = PriorOptions {
        rig: RigOptions {
            views: 3,
            elevations_deg: vec![10.0],
            ..RigOptions::default()
        },
        ..PriorOptions::default()
    };
    let error = compute_prior(cube(0.5), &options).unwrap_err();
    assert!(
        matches!(error, PriorError::NoValidTriplet { .. }),
        "{error}"
    );
    assert!(error.is_permanent());
}

fn job(seed: u64) -> PriorJob {
    PriorJob {
        uid: "test".into(),
        asset_key: "runs/x/assets/test.glb".into(),
        views: 20,
        max_triplets: 2,
        resolution: 256,
        seed,
    }
}

fn decode_gray(png: &[u8]) -> image::GrayImage {
    image::load_from_memory(png).unwrap().to_luma8()
}

#[test]
fn the_job_produces_one_file_per_key_in_the_reference_conventions() {
    // Two meshes on two nodes, to go through the full loader.
    let mut writer = GltfWriter::new();
    let slab = writer.add_mesh(&cuboid([-0.5, -0.1, -0.5], [0.5, 0.1, 0.5]));
    let pillar = writer.add_mesh(&cuboid([-0.1, -0.25, -0.1], [0.1, 0.25, 0.1]));
    let first = writer.add_node(serde_json::json!({"mesh": slab}));
    let second =
        writer.add_node(serde_json::json!({"mesh": pillar, "translation": [0.0, 0.35, 0.2]}));
    writer.add_root(first);
    writer.add_root(second);
    let glb = writer.to_glb();

    let artifacts = run_prior_job(&glb, &job(11)).unwrap();
    assert_eq!(artifacts.triplets.len(), 2);
    let output = artifacts.output();
    assert_eq!(output.triplets.len(), 2);

    let (run, object) = (RunId::new_random(), ObjectId::new_random());
    let files = artifacts.files(run, object);
    assert_eq!(files.len(), 2 * 8);
    let mut names: Vec<&String> = files.iter().map(|(key, _, _)| key).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 16, "keys must be distinct");
    assert_eq!(files[0].0, keys::prior_depth(run, object, 0, 0));
    assert_eq!(files[7].0, keys::prior_correspondences(run, object, 0));

    for triplet in &artifacts.triplets {
        assert!(triplet.triplet.views.windows(2).all(|w| w[0] < w[1]));
        let set = CorrespondenceSet::decode(&triplet.correspondences).unwrap();
        assert_eq!(set.grid, 128);
        assert_eq!(
            set.pairs.iter().map(|p| (p.a, p.b)).collect::<Vec<_>>(),
            vec![(0, 1), (0, 2), (1, 2)]
        );
        let masks: Vec<image::GrayImage> = triplet
            .mask_png
            .iter()
            .map(|png| decode_gray(png))
            .collect();
        for (index, pair) in set.pairs.iter().enumerate() {
            let (a, b) = (pair.a as usize, pair.b as usize);
            assert_eq!(pair.rows.len() as u32, triplet.triplet.matches[index]);
            assert!(pair.rows.len() > 500);
            let mut on_object = 0;
            for &[y1, x1, y2, x2] in &pair.rows {
                // The reference's target pixel formula lands on view a's object ...
                let (row, col) = ndc_to_pixel(128, y1, x1).expect("inside the grid");
                let scale = 256 / 128;
                let in_a = masks[a].get_pixel(col * scale + 1, row * scale + 1)[0];
                // ... and (-x2, -y2) in grid_sample terms on view b's object.
                let (row_b, col_b) = ndc_to_pixel(256, y2, x2).expect("inside the frame");
                let in_b = masks[b].get_pixel(col_b, row_b)[0];
                on_object += usize::from(in_a == 255 && in_b == 255);
            }
            assert!(on_object as f32 > 0.97 * pair.rows.len() as f32);
        }
        for (depth_png, mask_png) in triplet.depth_png.iter().zip(&triplet.mask_png) {
            let depth = decode_gray(depth_png);
            let mask = decode_gray(mask_png);
            assert_eq!(depth.dimensions(), (256, 256));
            // The depth control image is zero off the object and bright near the camera.
            assert!(depth
                .pixels()
                .zip(mask.pixels())
                .all(|(d, m)| m[0] == 255 || d[0] == 0));
            assert_eq!(depth.pixels().map(|d| d[0]).max(), Some(255));
            // Placed near the bottom: the lowest object row is within the last 6% of the frame.
            let lowest = (0..256u32)
                .rev()
                .find(|&row| (0..256).any(|col| mask.get_pixel(col, row)[0] == 255))
                .unwrap();
            assert!(lowest >= 236, "lowest object row {lowest}");
        }
        let cameras: serde_json::Value = serde_json::from_slice(&triplet.cameras_json).unwrap();
        assert_eq!(cameras["views"].as_array().unwrap().len(), 3);
        assert_eq!(cameras["width"], 256);
        let scale = cameras["views"][0]["augmentation"]["scale"]
            .as_f64()
            .unwrap();
        assert!((0.7..0.95).contains(&scale));
    }

    // Deterministic for a seed, different for another.
    assert_eq!(run_prior_job(&glb, &job(11)).unwrap(), artifacts);
    let other = run_prior_job(&glb, &job(12)).unwrap();
    assert_ne!(other.triplets[0].depth_png, artifacts.triplets[0].depth_png);
}

#[test]
fn bad_jobs_and_bad_assets_fail_permanently() {
    let glb = GltfWriter::single(&cube(0.5)).to_glb();
    let mut bad = job(1);
    bad.resolution = 0;
    assert!(matches!(
        run_prior_job(&glb, &bad),
        Err(PriorError::InvalidOptions(_))
    ));
    let error = run_prior_job(b"garbage", &job(1)).unwrap_err();
    assert!(error.is_permanent());
    assert_eq!(
        error.failure_kind(),
        syncd_proto::messages::FailureKind::Permanent
    );
}

#[test]
fn render_to_dir_writes_views_cameras_and_triplets() {
    let folder = tempfile::tempdir().unwrap();
    let asset = folder.path().join("object.glb");
    let mesh = merge(&[cube(0.4), cuboid([-0.1, 0.4, -0.1], [0.1, 0.8, 0.1])]);
    std::fs::write(&asset, GltfWriter::single(&mesh).to_glb()).unwrap();
    let out = folder.path().join("out");
    let mut options = RenderOptions::default().with_views(16);
    options.prior.resolution = 64;
    let summary = syncd_prior::render_to_dir(&asset, &out, &options).unwrap();
    assert_eq!(summary.coverage.len(), 16);
    assert!(!summary.triplets.is_empty());
    for view in 0..16 {
        for suffix in ["depth.png", "mask.png", "depth.npy"] {
            assert!(out.join(format!("view{view:02}.{suffix}")).is_file());
        }
    }
    let npy = std::fs::read(out.join("view00.depth.npy")).unwrap();
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    assert_eq!(npy.len(), 10 + header_len + 64 * 64 * 4);
    let cameras: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cameras.json")).unwrap()).unwrap();
    assert_eq!(cameras["views"].as_array().unwrap().len(), 16);
    assert!(cameras["normalisation"]["asset_to_world"].is_array());
    for name in [
        "view0.depth.png",
        "view2.mask.png",
        "cameras.json",
        "correspondences.bin",
        "correspondences_01.png",
        "correspondences_12.png",
    ] {
        assert!(out.join("triplet0").join(name).is_file(), "{name}");
    }
    assert!(out.join("summary.json").is_file());
}
