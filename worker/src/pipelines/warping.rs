//! Depth-based warping of the noisy latents of a rigid-object group (SynCD, section "3D
//! consistency"): on early steps, each image's latents are overwritten where a pixel
//! correspondence from another view is visible, so the three images start from consistent
//! noise on the object.
//!
//! Conventions follow the reference exactly: correspondence rows are `(y1, x1, y2, x2)` in
//! PyTorch3D NDC (+x left, +y up) on a 128x128 grid, for the view pairs (0,1), (0,2), (1,2) in
//! that order. Image 2 is warped into images 0 and 1 (bicubic sampling at `(-x2, -y2)`,
//! `align_corners=False`), then the updated image 1 fills image 0 where image 2 gave nothing.
//! From `t < 0.9` the visibility maps are eroded (all 9 neighbours visible). Latents are
//! nearest-upsampled to 128x128 first and nearest-downsampled back.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Resolution of the correspondence grid.
pub const CORRESPONDENCE_GRID: i64 = 128;
/// Warping runs while the scheduler time is above this (the reference's `warp_thresh`).
pub const WARP_UNTIL: f64 = 0.8;
/// Below this time the visibility maps are eroded.
const ERODE_BELOW: f64 = 0.9;

/// Correspondences of a group of three views.
#[derive(Debug)]
pub struct Correspondences {
    /// [M, 4] float32 rows `(y1, x1, y2, x2)`, the pairs (0,1), (0,2), (1,2) one after another.
    pub rows: Tensor,
    /// Rows per pair, in the same order.
    pub counts: [i64; 3],
}

impl Correspondences {
    pub fn new(rows: Tensor, counts: [i64; 3]) -> Result<Self> {
        let size = rows.size();
        if size.len() != 2 || size[1] != 4 {
            bail!("correspondences have shape {size:?}, expected [rows, 4] (y1, x1, y2, x2)");
        }
        if counts.iter().any(|&count| count < 0) || counts.iter().sum::<i64>() != size[0] {
            bail!(
                "correspondence pair counts {counts:?} do not add up to the {} rows",
                size[0]
            );
        }
        Ok(Self {
            rows: rows.to_kind(Kind::Float),
            counts,
        })
    }

    fn pair(&self, index: usize) -> Tensor {
        let start: i64 = self.counts[..index].iter().sum();
        self.rows.narrow(0, start, self.counts[index])
    }
}

/// One pair's rows resolved against the 128 grid: target pixel indices and sampling grid.
struct PairWarp {
    target_rows: Tensor,
    target_columns: Tensor,
    /// [1, M, 1, 2] sampling points `(-x2, -y2)`.
    grid: Tensor,
}

impl PairWarp {
    /// `None` if any of the pair's four coordinates maps outside the grid (the reference checks
    /// all four columns and then stops warping the group).
    fn new(rows: &Tensor) -> Option<Self> {
        let grid_size = CORRESPONDENCE_GRID as f64;
        let indices = ((rows * -0.5 + 0.5) * grid_size)
            .floor()
            .to_kind(Kind::Int64);
        if indices.numel() > 0 {
            let min = indices.min().int64_value(&[]);
            let max = indices.max().int64_value(&[]);
            if min < 0 || max >= CORRESPONDENCE_GRID {
                return None;
            }
        }
        let grid = Tensor::stack(&[-rows.select(1, 3), -rows.select(1, 2)], 1)
            .unsqueeze(0)
            .unsqueeze(2);
        Some(Self {
            target_rows: indices.select(1, 0),
            target_columns: indices.select(1, 1),
            grid,
        })
    }

    /// Samples `source` [1, C, 128, 128] bicubically at the pair's points: [1, C, M].
    fn sample(&self, source: &Tensor) -> Tensor {
        // interpolation 2 = bicubic, padding 0 = zeros.
        Tensor::grid_sampler_2d(source, &self.grid.to_kind(source.kind()), 2, 0, false)
            .nan_to_num(0.0, None, None)
            .squeeze_dim(3)
    }

    /// Writes `values` [1, C, M] (or a broadcastable scalar map) into `target` [1, C, 128, 128].
    fn scatter(&self, target: &mut Tensor, values: &Tensor) {
        let _ = target.index_put_(
            &[
                None,
                None,
                Some(&self.target_rows),
                Some(&self.target_columns),
            ],
            values,
            false,
        );
    }

    /// `map` [1, C, 128, 128] at the target pixels: [1, C, M].
    fn gather(&self, map: &Tensor) -> Tensor {
        map.index(&[
            None,
            None,
            Some(&self.target_rows),
            Some(&self.target_columns),
        ])
    }
}

/// Erodes a binary visibility map [B, 1, 128, 128]: a pixel stays only if its 3x3 box mean is
/// at least 0.9 (all nine neighbours visible, zero padding outside).
fn erode(visibility: &Tensor) -> Tensor {
    let kernel = Tensor::ones([1, 1, 3, 3], (visibility.kind(), visibility.device())) / 9.0;
    visibility
        .conv2d(&kernel, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1)
        .clamp(0.0, 1.0)
        .ge(0.9)
        .to_kind(visibility.kind())
}

/// A group's correspondences resolved against the grid once, on the latents' device, for every
/// warped step of its run (resolving them reads the coordinates' range back to the host).
pub struct GroupWarp {
    first_second: PairWarp,
    first_third: PairWarp,
    second_third: PairWarp,
}

impl GroupWarp {
    /// `None` when a correspondence falls outside the grid: the group is then not warped (the
    /// reference finds the same on its first warped step and stops warping the group).
    pub fn new(correspondences: &Correspondences, device: Device) -> Option<Self> {
        let rows = Correspondences {
            rows: correspondences.rows.to_device(device),
            counts: correspondences.counts,
        };
        Some(Self {
            first_second: PairWarp::new(&rows.pair(0))?,
            first_third: PairWarp::new(&rows.pair(1))?,
            second_third: PairWarp::new(&rows.pair(2))?,
        })
    }

    /// Warps packed latents [3, res*res, C] at scheduler time `t` (in [0, 1]).
    pub fn apply(&self, latents: &Tensor, t: f64) -> Result<Tensor> {
        let size = latents.size();
        if size.len() != 3 || size[0] != 3 {
            bail!("warping takes the packed latents of a group of 3, got shape {size:?}");
        }
        let res = (size[1] as f64).sqrt().round() as i64;
        if res * res != size[1] {
            bail!("warping needs a square latent grid, got {} tokens", size[1]);
        }
        let channels = size[2];
        let device = latents.device();
        let grid = CORRESPONDENCE_GRID;
        let kind = latents.kind();
        let feats = latents
            .to_kind(Kind::Float)
            .reshape([3, res, res, channels])
            .permute([0, 3, 1, 2])
            .upsample_nearest2d([grid, grid], None, None);
        let source = feats.narrow(0, 2, 1);
        let erode_now = t < ERODE_BELOW;
        let visible_value = Tensor::ones([1], (Kind::Float, device));

        // Image 2 into images 0 and 1.
        let warped = feats.zeros_like();
        let mut visible = Tensor::zeros([3, 1, grid, grid], (Kind::Float, device));
        for (target, pair) in [(0, &self.first_third), (1, &self.second_third)] {
            let mut warped_target = warped.narrow(0, target, 1);
            pair.scatter(&mut warped_target, &pair.sample(&source));
            let mut visible_target = visible.narrow(0, target, 1);
            pair.scatter(&mut visible_target, &visible_value);
        }
        if erode_now {
            visible = erode(&visible);
        }
        let feats: Tensor = &visible * &warped + (1.0 - &visible) * &feats;

        // The updated image 1 into image 0, where image 2 gave nothing.
        let first_second = &self.first_second;
        let sampled = first_second.sample(&feats.narrow(0, 1, 1));
        let mut warped_first = warped.narrow(0, 0, 1);
        first_second.scatter(&mut warped_first, &sampled);
        let mut visible_first = Tensor::zeros([1, 1, grid, grid], (Kind::Float, device));
        let not_yet = 1.0 - first_second.gather(&visible.narrow(0, 0, 1));
        first_second.scatter(&mut visible_first, &not_yet);
        if erode_now {
            visible_first = erode(&visible_first);
        }
        let first: Tensor = &visible_first * warped.narrow(0, 0, 1)
            + (1.0 - &visible_first) * feats.narrow(0, 0, 1);
        let feats = Tensor::cat(&[first, feats.narrow(0, 1, 2)], 0);

        Ok(feats
            .upsample_nearest2d([res, res], None, None)
            .permute([0, 2, 3, 1])
            .reshape([3, res * res, channels])
            .to_kind(kind))
    }
}

/// Warps packed latents [3, res*res, C] at scheduler time `t` (in [0, 1]) in one call. Returns
/// `None` when a correspondence falls outside the grid: the caller then stops warping this group.
pub fn warp_latents(
    latents: &Tensor,
    correspondences: &Correspondences,
    t: f64,
) -> Result<Option<Tensor>> {
    GroupWarp::new(correspondences, latents.device())
        .map(|warp| warp.apply(latents, t))
        .transpose()
}
