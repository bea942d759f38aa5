//! Time per asset of the prior's CPU work, on generated spheres of 10K, 100K and 1M triangles,
//! on one thread:
//!
//! - `ring_512`: rendering the 20 ring views at the generation resolution (512 x 512), what the
//!   `render` command does on top of the job;
//! - `prior_job`: the whole in-memory job: 20 views on the 128 x 128 grid, the pairwise
//!   correspondence counts, triplet choice and the augmented triplet views at 512 with their
//!   correspondences (everything but PNG encoding).
//!
//! Run with `cargo bench -p syncd-prior --bench render`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use syncd_prior::pipeline::{build_scene, compute_prior, PriorOptions};
use syncd_prior::synthetic::sphere_with_triangles;
use syncd_prior::{Rasteriser, RigOptions};

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];

fn ring_512(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_512");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for triangles in SIZES {
        let mesh = sphere_with_triangles(triangles);
        let mut rasteriser = Rasteriser::new();
        let scene = build_scene(mesh, &RigOptions::default(), &mut rasteriser).unwrap();
        group.throughput(Throughput::Elements(scene.mesh.triangle_count() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(triangles),
            &scene,
            |b, scene| {
                b.iter(|| {
                    for camera in &scene.cameras {
                        std::hint::black_box(rasteriser.render(&scene.mesh, camera, 512, 512));
                    }
                })
            },
        );
    }
    group.finish();
}

fn prior_job(c: &mut Criterion) {
    let mut group = c.benchmark_group("prior_job");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for triangles in SIZES {
        let mesh = sphere_with_triangles(triangles);
        group.throughput(Throughput::Elements(mesh.triangle_count() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(triangles), &mesh, |b, mesh| {
            b.iter(|| compute_prior(mesh.clone(), &PriorOptions::default()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, ring_512, prior_job);
criterion_main!(benches);
