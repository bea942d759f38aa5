//! The prior of one asset, from its triangles to the chosen triplets: normalise, place the ring
//! of cameras, render every view on the correspondence grid, measure coverage and pairwise
//! overlap, choose triplets, then augment each chosen view and render what generation needs.
//!
//! Everything is computed in memory and deterministic for a given seed; turning the result into
//! files is left to [`crate::job`] (object storage) and [`crate::render_cmd`] (a local folder).

use crate::augment::AugmentOptions;
use crate::camera::{Camera, ImageTransform, RigOptions};
use crate::correspondence::{correspondence_rows, count_matches, CORRESPONDENCE_GRID};
use crate::error::{PriorError, Result};
use crate::mesh::{Mesh, Normalisation};
use crate::raster::{DepthMap, Rasteriser};
use crate::triplets::{
    best_weakest_pair, elevation_allowed, select_triplets, Triplet, MIN_PAIR_MATCHES,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use syncd_proto::correspondence::{CorrespondenceSet, PairCorrespondences};

/// The pairs of a triplet, in the order of the correspondence files.
pub const TRIPLET_PAIRS: [(usize, usize); 3] = [(0, 1), (0, 2), (1, 2)];

/// Everything that decides the prior of an asset.
#[derive(Clone, Debug, PartialEq)]
pub struct PriorOptions {
    pub rig: RigOptions,
    pub augment: AugmentOptions,
    /// Side of the square generation images (depth control and mask), in pixels.
    pub resolution: u32,
    /// Most triplets to keep (the reference uses each asset up to twice).
    pub max_triplets: u32,
    /// Seed of the augmentation draws.
    pub seed: u64,
}

impl Default for PriorOptions {
    fn default() -> Self {
        PriorOptions {
            rig: RigOptions::default(),
            augment: AugmentOptions::default(),
            resolution: 512,
            max_triplets: 2,
            seed: 0,
        }
    }
}

/// The ring sizes accepted.
pub const VIEW_RANGE: std::ops::RangeInclusive<u32> = 3..=100;

/// The generation resolutions accepted, in pixels.
pub const RESOLUTION_RANGE: std::ops::RangeInclusive<u32> = 16..=4096;

/// The normalised object and its ring of views, rendered on the correspondence grid.
#[derive(Clone, Debug)]
pub struct Scene {
    /// Triangles in the normalised frame.
    pub mesh: Mesh,
    pub normalisation: Normalisation,
    /// The ring, before augmentation.
    pub cameras: Vec<Camera>,
    /// Depth of every ring view on the correspondence grid.
    pub grid_depths: Vec<DepthMap>,
    /// Share of the frame the object covers in each view.
    pub coverage: Vec<f32>,
}

/// One view of a chosen triplet, after augmentation.
#[derive(Clone, Debug)]
pub struct TripletView {
    /// Index of the view in the ring.
    pub ring_view: usize,
    /// Coverage of the untransformed view, which decided the scale range.
    pub coverage: f32,
    pub transform: ImageTransform,
    /// The ring camera with the augmentation applied to its intrinsics.
    pub camera: Camera,
    /// Depth at the generation resolution.
    pub depth: DepthMap,
    /// Depth on the correspondence grid.
    pub grid_depth: DepthMap,
}

/// A chosen triplet with everything generation needs.
#[derive(Clone, Debug)]
pub struct ChosenTriplet {
    /// The triplet as selected (match counts before augmentation).
    pub selection: Triplet,
    pub views: [TripletView; 3],
    /// Correspondences of pairs (0,1), (0,2), (1,2) between the augmented views.
    pub correspondences: CorrespondenceSet,
}

impl ChosenTriplet {
    /// Match counts of the stored correspondences, pairs (0,1), (0,2), (1,2).
    pub fn stored_matches(&self) -> [u32; 3] {
        std::array::from_fn(|pair| self.correspondences.pairs[pair].rows.len() as u32)
    }
}

/// The prior of one asset.
#[derive(Clone, Debug)]
pub struct Prior {
    pub scene: Scene,
    /// Ring views that may be part of a triplet (elevation and coverage rules).
    pub eligible_views: Vec<usize>,
    pub triplets: Vec<ChosenTriplet>,
}

impl PriorOptions {
    pub fn validate(&self) -> Result<()> {
        if !RESOLUTION_RANGE.contains(&self.resolution) {
            return Err(PriorError::InvalidOptions(format!(
                "resolution {} is not in {RESOLUTION_RANGE:?}",
                self.resolution
            )));
        }
        if self.max_triplets == 0 {
            return Err(PriorError::InvalidOptions("max_triplets is 0".into()));
        }
        if !VIEW_RANGE.contains(&self.rig.views) {
            return Err(PriorError::InvalidOptions(format!(
                "{} views; a triplet needs at least 3 and the pairwise matching is quadratic, so \
                 at most {} are accepted",
                self.rig.views,
                VIEW_RANGE.end()
            )));
        }
        Ok(())
    }
}

/// Normalises the mesh, places the ring and renders it on the correspondence grid.
pub fn build_scene(mut mesh: Mesh, rig: &RigOptions, rasteriser: &mut Rasteriser) -> Result<Scene> {
    let normalisation = mesh.normalise()?;
    let cameras = rig.cameras(mesh.radius())?;
    let grid_depths: Vec<DepthMap> = cameras
        .iter()
        .map(|camera| rasteriser.render(&mesh, camera, CORRESPONDENCE_GRID, CORRESPONDENCE_GRID))
        .collect();
    let coverage = grid_depths.iter().map(DepthMap::coverage).collect();
    Ok(Scene {
        mesh,
        normalisation,
        cameras,
        grid_depths,
        coverage,
    })
}

/// Computes the prior of an asset given in its own (unnormalised) coordinates.
pub fn compute_prior(mesh: Mesh, options: &PriorOptions) -> Result<Prior> {
    options.validate()?;
    let mut rasteriser = Rasteriser::new();
    let scene = build_scene(mesh, &options.rig, &mut rasteriser)?;
    choose_triplets(scene, options, &mut rasteriser)
}

/// Chooses the triplets of a scene and renders their augmented views.
pub fn choose_triplets(
    scene: Scene,
    options: &PriorOptions,
    rasteriser: &mut Rasteriser,
) -> Result<Prior> {
    options.validate()?;

    let in_elevation_range: Vec<usize> = (0..scene.cameras.len())
        .filter(|&view| elevation_allowed(scene.cameras[view].elevation_deg))
        .collect();
    if in_elevation_range.is_empty() {
        return Err(PriorError::InvalidOptions(
            "no ring view has an elevation in (0, 60) degrees".into(),
        ));
    }
    let eligible_views: Vec<usize> = in_elevation_range
        .iter()
        .copied()
        .filter(|&view| options.augment.accepts(scene.coverage[view]))
        .collect();
    if eligible_views.len() < 3 {
        let best_coverage = in_elevation_range
            .iter()
            .map(|&view| scene.coverage[view])
            .fold(0.0, f32::max);
        return Err(PriorError::ObjectTooSmall {
            min_coverage: options.augment.min_coverage * 100.0,
            best_coverage: best_coverage * 100.0,
        });
    }

    let pair_counts = PairCounts::compute(&scene, &eligible_views);
    let selected = select_triplets(
        &eligible_views,
        |a, b| pair_counts.get(a, b),
        MIN_PAIR_MATCHES,
        options.max_triplets as usize,
    );
    if selected.is_empty() {
        return Err(PriorError::NoValidTriplet {
            threshold: MIN_PAIR_MATCHES,
            best: best_weakest_pair(&eligible_views, |a, b| pair_counts.get(a, b)),
        });
    }

    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let triplets = selected
        .into_iter()
        .map(|selection| {
            let views = selection.views.map(|ring_view| {
                let coverage = scene.coverage[ring_view];
                // An empty view can only be eligible with a zero minimum coverage; it then keeps
                // the whole frame as its box.
                let foreground_box = scene.grid_depths[ring_view]
                    .foreground_box()
                    .unwrap_or([0.0, 0.0, 1.0, 1.0]);
                let transform = options.augment.sample(&mut rng, coverage, foreground_box);
                let camera = scene.cameras[ring_view].with_image_transform(&transform);
                TripletView {
                    ring_view,
                    coverage,
                    transform,
                    camera,
                    depth: rasteriser.render(
                        &scene.mesh,
                        &camera,
                        options.resolution,
                        options.resolution,
                    ),
                    grid_depth: rasteriser.render(
                        &scene.mesh,
                        &camera,
                        CORRESPONDENCE_GRID,
                        CORRESPONDENCE_GRID,
                    ),
                }
            });
            let correspondences = CorrespondenceSet {
                grid: CORRESPONDENCE_GRID,
                pairs: TRIPLET_PAIRS
                    .iter()
                    .map(|&(a, b)| PairCorrespondences {
                        a: a as u32,
                        b: b as u32,
                        rows: correspondence_rows(
                            &views[a].camera,
                            &views[a].grid_depth,
                            &views[b].camera,
                            &views[b].grid_depth,
                        ),
                    })
                    .collect(),
            };
            ChosenTriplet {
                selection,
                views,
                correspondences,
            }
        })
        .collect();
    Ok(Prior {
        scene,
        eligible_views,
        triplets,
    })
}

/// Match counts between ring views on the correspondence grid (from the lower to the higher
/// index), computed once for every pair of eligible views.
struct PairCounts {
    views: usize,
    counts: Vec<u32>,
}

impl PairCounts {
    fn compute(scene: &Scene, eligible: &[usize]) -> Self {
        let views = scene.cameras.len();
        let mut counts = vec![0; views * views];
        for (i, &a) in eligible.iter().enumerate() {
            for &b in &eligible[i + 1..] {
                let (a, b) = (a.min(b), a.max(b));
                counts[a * views + b] = count_matches(
                    &scene.cameras[a],
                    &scene.grid_depths[a],
                    &scene.cameras[b],
                    &scene.grid_depths[b],
                );
            }
        }
        PairCounts { views, counts }
    }

    fn get(&self, a: usize, b: usize) -> u32 {
        self.counts[a.min(b) * self.views + a.max(b)]
    }
}
