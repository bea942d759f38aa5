//! `syncd-worker render ASSET --out DIR`: renders an asset's prior into a folder for people to
//! look at, and for checking a single asset without the coordinator.
//!
//! Layout of `DIR`:
//!
//! ```text
//! cameras.json                 every ring view (CamerasRecord, no augmentation)
//! view{NN}.depth.png           depth control image of ring view NN at the resolution
//! view{NN}.mask.png            foreground mask
//! view{NN}.depth.npy           metric depth (camera-frame z, 0 = background), float32 [H, W]
//! summary.json                 load report, coverage per view, chosen triplets
//! triplet{T}/                  exactly the files the prior job uploads for triplet T
//!     view{i}.depth.png, view{i}.mask.png, cameras.json, correspondences.bin
//!     correspondences_{a}{b}.png   matches of pair (a, b) drawn between the two views
//! ```

use crate::camera::{ImageTransform, RigOptions};
use crate::correspondence::CORRESPONDENCE_GRID;
use crate::error::{PriorError, Result};
use crate::images::{correspondence_picture, depth_control_png, encode_png, mask_png};
use crate::job::encode_triplets;
use crate::loader::{load_path, LoadReport};
use crate::npy;
use crate::pipeline::{build_scene, choose_triplets, PriorOptions, TRIPLET_PAIRS};
use crate::raster::Rasteriser;
use crate::record::{CamerasRecord, ViewRecord};
use serde::Serialize;
use std::path::Path;

/// Options of the `render` command.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderOptions {
    pub prior: PriorOptions,
    /// Enlargement of the 128 x 128 correspondence pictures.
    pub picture_zoom: u32,
    /// About how many matches each correspondence picture draws.
    pub picture_lines: usize,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            prior: PriorOptions::default(),
            picture_zoom: 3,
            picture_lines: 60,
        }
    }
}

impl RenderOptions {
    pub fn with_views(mut self, views: u32) -> Self {
        self.prior.rig = RigOptions {
            views,
            ..self.prior.rig
        };
        self
    }
}

/// What `summary.json` says.
#[derive(Clone, Debug, Serialize)]
pub struct RenderSummary {
    pub triangles: usize,
    pub mesh_instances: usize,
    pub primitives: usize,
    pub skipped: Vec<String>,
    /// Coverage of each ring view on the correspondence grid.
    pub coverage: Vec<f32>,
    pub eligible_views: Vec<usize>,
    pub triplets: Vec<syncd_proto::messages::PriorTriplet>,
}

/// Renders `asset` (`.glb` or `.gltf`) into `out` (created if needed).
pub fn render_to_dir(asset: &Path, out: &Path, options: &RenderOptions) -> Result<RenderSummary> {
    options.prior.validate()?;
    let loaded = load_path(asset)?;
    let triangles = loaded.mesh.triangle_count();
    let mut rasteriser = Rasteriser::new();
    let scene = build_scene(loaded.mesh, &options.prior.rig, &mut rasteriser)?;
    std::fs::create_dir_all(out).map_err(|source| PriorError::io(out, source))?;

    // The ring views are written first, so that an asset without a usable triplet still leaves
    // something to look at.
    let resolution = options.prior.resolution;
    let mut records = Vec::with_capacity(scene.cameras.len());
    for (view, camera) in scene.cameras.iter().enumerate() {
        let depth = rasteriser.render(&scene.mesh, camera, resolution, resolution);
        let stem = format!("view{view:02}");
        write(
            out,
            &format!("{stem}.depth.png"),
            &depth_control_png(&depth)?,
        )?;
        write(out, &format!("{stem}.mask.png"), &mask_png(&depth)?)?;
        let shape = [depth.height as usize, depth.width as usize];
        write(
            out,
            &format!("{stem}.depth.npy"),
            &npy::encode_f32(&shape, &depth.depth),
        )?;
        records.push(ViewRecord::new(
            view,
            camera,
            scene.coverage[view],
            ImageTransform::IDENTITY,
            resolution,
            resolution,
        ));
    }
    let cameras = CamerasRecord::new(
        resolution,
        resolution,
        CORRESPONDENCE_GRID,
        &scene.normalisation,
        records,
    );
    write(out, "cameras.json", &cameras.to_json())?;

    let prior = choose_triplets(scene, &options.prior, &mut rasteriser)?;
    let scene = &prior.scene;

    let artifacts = encode_triplets(&prior, resolution)?;
    for (chosen, files) in prior.triplets.iter().zip(&artifacts) {
        let folder = out.join(format!("triplet{}", files.triplet.index));
        std::fs::create_dir_all(&folder).map_err(|source| PriorError::io(&folder, source))?;
        for (name, bytes) in files.named_files() {
            write(&folder, &name, bytes)?;
        }
        for (pair, &(a, b)) in TRIPLET_PAIRS.iter().enumerate() {
            let picture = correspondence_picture(
                &chosen.views[a].grid_depth,
                &chosen.views[b].grid_depth,
                &chosen.correspondences.pairs[pair].rows,
                options.picture_zoom,
                options.picture_lines,
            );
            let name = format!("correspondences_{a}{b}.png");
            write(&folder, &name, &encode_png(&picture, &name)?)?;
        }
    }

    let LoadReport {
        mesh_instances,
        primitives,
        skipped,
    } = loaded.report;
    let summary = RenderSummary {
        triangles,
        mesh_instances,
        primitives,
        skipped,
        coverage: scene.coverage.clone(),
        eligible_views: prior.eligible_views.clone(),
        triplets: artifacts.iter().map(|a| a.triplet.clone()).collect(),
    };
    let json = serde_json::to_vec_pretty(&summary).expect("summaries always serialise");
    write(out, "summary.json", &json)?;
    Ok(summary)
}

fn write(folder: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = folder.join(name);
    std::fs::write(&path, bytes).map_err(|source| PriorError::io(&path, source))
}
