//! The prior job as a worker runs it: GLB bytes and a [`PriorJob`] in, the files to upload and
//! the job's output out. No I/O happens here; the worker downloads the asset and uploads
//! [`PriorArtifacts::files`] under the keys they carry.

use crate::correspondence::CORRESPONDENCE_GRID;
use crate::error::Result;
use crate::images::{depth_control_png, mask_png};
use crate::loader::{load_glb, LoadReport};
use crate::pipeline::{compute_prior, ChosenTriplet, Prior, PriorOptions};
use crate::record::{CamerasRecord, ViewRecord};
use crate::RigOptions;
use syncd_proto::keys;
use syncd_proto::messages::{PriorJob, PriorOutput, PriorTriplet};
use syncd_proto::{ObjectId, RunId};
use uuid::Uuid;

/// The encoded files of one chosen triplet.
#[derive(Clone, Debug, PartialEq)]
pub struct TripletArtifacts {
    pub triplet: PriorTriplet,
    /// Depth control image of each view ([`keys::prior_depth`]).
    pub depth_png: [Vec<u8>; 3],
    /// Foreground mask of each view ([`keys::prior_mask`]).
    pub mask_png: [Vec<u8>; 3],
    /// [`CamerasRecord`] of the three views ([`keys::prior_cameras`]).
    pub cameras_json: Vec<u8>,
    /// `syncd_proto::correspondence` file ([`keys::prior_correspondences`]).
    pub correspondences: Vec<u8>,
}

/// What the prior job produced.
#[derive(Clone, Debug, PartialEq)]
pub struct PriorArtifacts {
    pub triplets: Vec<TripletArtifacts>,
    /// What loading the asset skipped, for the job's log.
    pub load_report: LoadReport,
}

/// A file to upload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArtifactFile<'a> {
    pub key: &'a str,
    pub bytes: &'a [u8],
    pub content_type: &'static str,
}

impl PriorArtifacts {
    /// The job's output message.
    pub fn output(&self) -> PriorOutput {
        PriorOutput {
            triplets: self.triplets.iter().map(|t| t.triplet.clone()).collect(),
        }
    }

    /// Every file with its S3 key, one per key of the layout in `syncd_proto::keys`.
    pub fn files(&self, run: RunId, object: ObjectId) -> Vec<(String, &[u8], &'static str)> {
        self.triplets
            .iter()
            .flat_map(|triplet| triplet.files(run, object))
            .collect()
    }
}

impl TripletArtifacts {
    /// The triplet's files with their S3 keys.
    pub fn files(&self, run: RunId, object: ObjectId) -> Vec<(String, &[u8], &'static str)> {
        let index = self.triplet.index;
        let mut files = Vec::with_capacity(8);
        for view in 0..3u32 {
            files.push((
                keys::prior_depth(run, object, index, view),
                &self.depth_png[view as usize][..],
                "image/png",
            ));
            files.push((
                keys::prior_mask(run, object, index, view),
                &self.mask_png[view as usize][..],
                "image/png",
            ));
        }
        files.push((
            keys::prior_cameras(run, object, index),
            &self.cameras_json[..],
            "application/json",
        ));
        files.push((
            keys::prior_correspondences(run, object, index),
            &self.correspondences[..],
            "application/octet-stream",
        ));
        files
    }

    /// The file names within the triplet's folder (the last segment of each key), with bytes.
    pub fn named_files(&self) -> Vec<(String, &[u8])> {
        // Any ids do: only the part after the triplet's prefix is kept.
        let (run, object) = (RunId(Uuid::nil()), ObjectId(Uuid::nil()));
        let prefix_len = keys::prior_triplet_prefix(run, object, self.triplet.index).len() + 1;
        self.files(run, object)
            .into_iter()
            .map(|(key, bytes, _)| (key[prefix_len..].to_string(), bytes))
            .collect()
    }
}

/// The options a job asks for.
pub fn prior_options(job: &PriorJob) -> PriorOptions {
    PriorOptions {
        rig: RigOptions {
            views: job.views,
            ..RigOptions::default()
        },
        resolution: job.resolution,
        max_triplets: job.max_triplets,
        seed: job.seed,
        ..PriorOptions::default()
    }
}

/// Runs the prior job on a GLB held in memory.
pub fn run_prior_job(glb_bytes: &[u8], job: &PriorJob) -> Result<PriorArtifacts> {
    let options = prior_options(job);
    options.validate()?;
    let asset = load_glb(glb_bytes)?;
    let prior = compute_prior(asset.mesh, &options)?;
    Ok(PriorArtifacts {
        triplets: encode_triplets(&prior, options.resolution)?,
        load_report: asset.report,
    })
}

/// Encodes every chosen triplet of a prior into its files.
pub fn encode_triplets(prior: &Prior, resolution: u32) -> Result<Vec<TripletArtifacts>> {
    prior
        .triplets
        .iter()
        .enumerate()
        .map(|(index, chosen)| encode_triplet(prior, index as u32, chosen, resolution))
        .collect()
}

fn encode_triplet(
    prior: &Prior,
    index: u32,
    chosen: &ChosenTriplet,
    resolution: u32,
) -> Result<TripletArtifacts> {
    let [first, second, third] = &chosen.views;
    let depth_png = [
        depth_control_png(&first.depth)?,
        depth_control_png(&second.depth)?,
        depth_control_png(&third.depth)?,
    ];
    let mask_png = [
        mask_png(&first.depth)?,
        mask_png(&second.depth)?,
        mask_png(&third.depth)?,
    ];
    let cameras = CamerasRecord::new(
        resolution,
        resolution,
        CORRESPONDENCE_GRID,
        &prior.scene.normalisation,
        chosen
            .views
            .iter()
            .map(|view| {
                ViewRecord::new(
                    view.ring_view,
                    &view.camera,
                    view.coverage,
                    view.transform,
                    resolution,
                    resolution,
                )
            })
            .collect(),
    );
    Ok(TripletArtifacts {
        triplet: PriorTriplet {
            index,
            views: chosen.selection.views.map(|view| view as u32),
            matches: chosen.stored_matches(),
        },
        depth_png,
        mask_png,
        cameras_json: cameras.to_json(),
        correspondences: chosen.correspondences.encode(),
    })
}
