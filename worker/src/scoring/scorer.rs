//! The scoring job (pipeline stage D): aesthetic score of each image of a group and DINOv2
//! similarity of each pair of object crops.
//!
//! A [`Scorer`] loads the three models once (DINOv2, the CLIP vision tower, an aesthetic head)
//! and scores groups: the full image goes through CLIP preprocessing, the CLIP tower, L2
//! normalisation and the head; the object crop ([`super::crop`]) goes through DINOv2
//! preprocessing and DINOv2, whose normed CLS embedding is L2-normalised; each pair's similarity
//! is the cosine (the dot product of the normalised embeddings). Images go through the models in
//! batches of `batch_size`. The models run in the configured dtype; normalisation, similarities
//! and the aesthetic head run in float32 (the head is tiny, and its score is compared with a
//! threshold).

use super::crop::object_crop_box;
use super::preprocess::{image_tensor, Preprocess};
use crate::device::{parse_device, parse_dtype};
use anyhow::{bail, ensure, Context, Result};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use syncd_models::aesthetic::{AestheticHead, AestheticHeadKind};
use syncd_models::clip_vision::ClipVision;
use syncd_models::dinov2::Dinov2;
use syncd_proto::messages::{PairSimilarity, ScoreOutput};
use tch::{Device, Kind, Tensor};

/// Where the scoring models are and how to run them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    /// DINOv2 model: a Hugging Face folder, or a torch.hub checkpoint (folder or safetensors file).
    pub dinov2_dir: PathBuf,
    /// CLIP folder (`CLIPVisionModelWithProjection` or whole `CLIPModel`).
    pub clip_dir: PathBuf,
    /// The converted aesthetic head (safetensors, see `syncd-worker convert-aesthetic`).
    pub aesthetic_head: PathBuf,
    /// Which head `aesthetic_head` must be: a mismatch is an error, not a silent swap of scales.
    pub aesthetic_head_kind: AestheticHeadKind,
    /// `cpu`, `cuda` or `cuda:N`; by default the worker's `[worker] device`.
    #[serde(default)]
    pub device: Option<String>,
    /// `fp32` or `bf16`; by default the worker's `[worker] dtype`.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Images per model call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "Preprocess::dinov2")]
    pub dinov2_preprocess: Preprocess,
    #[serde(default = "Preprocess::clip")]
    pub clip_preprocess: Preprocess,
}

fn default_batch_size() -> usize {
    16
}

/// The loaded scoring models.
#[derive(Debug)]
pub struct Scorer {
    dinov2: Dinov2,
    clip: ClipVision,
    head: AestheticHead,
    device: Device,
    batch_size: usize,
    dinov2_preprocess: Preprocess,
    clip_preprocess: Preprocess,
}

impl ScorerConfig {
    /// These settings with the device and dtype the worker runs everything else on where they
    /// name none.
    pub fn on_worker_device(mut self, device: &str, dtype: &str) -> Self {
        self.device.get_or_insert_with(|| device.to_string());
        self.dtype.get_or_insert_with(|| dtype.to_string());
        self
    }
}

impl Scorer {
    /// Loads the models on the configured device and dtype (see
    /// [`ScorerConfig::on_worker_device`]; both must be set).
    pub fn load(config: &ScorerConfig) -> Result<Self> {
        let device = parse_device(
            config
                .device
                .as_deref()
                .context("the scorer has no device")?,
        )?;
        let kind = parse_dtype(config.dtype.as_deref().context("the scorer has no dtype")?)?;
        ensure!(config.batch_size > 0, "batch_size must be at least 1");
        config
            .dinov2_preprocess
            .validate()
            .context("dinov2_preprocess")?;
        config
            .clip_preprocess
            .validate()
            .context("clip_preprocess")?;
        let dinov2 = Dinov2::load(&config.dinov2_dir, device, kind)?;
        let clip = ClipVision::load(&config.clip_dir, device, kind)?;
        let head = AestheticHead::load(
            &config.aesthetic_head,
            Some(config.aesthetic_head_kind),
            device,
        )?;
        let clip_side = clip.config().image_size;
        ensure!(
            config.clip_preprocess.crop == clip_side,
            "clip_preprocess crops {} pixels but the CLIP tower in {} takes {clip_side}",
            config.clip_preprocess.crop,
            config.clip_dir.display()
        );
        ensure!(
            head.input_dim() == clip.config().projection_dim,
            "the aesthetic head {} takes {}-dimensional embeddings, the CLIP tower in {} gives {}",
            config.aesthetic_head.display(),
            head.input_dim(),
            config.clip_dir.display(),
            clip.config().projection_dim
        );
        Ok(Self {
            dinov2,
            clip,
            head,
            device,
            batch_size: config.batch_size,
            dinov2_preprocess: config.dinov2_preprocess.clone(),
            clip_preprocess: config.clip_preprocess.clone(),
        })
    }

    /// Changes the number of images per model call (benchmarks sweep it without reloading).
    /// Which aesthetic predictor the scores come from.
    pub fn aesthetic_head_kind(&self) -> AestheticHeadKind {
        self.head.kind()
    }

    pub fn set_batch_size(&mut self, batch_size: usize) -> Result<()> {
        ensure!(batch_size > 0, "batch_size must be at least 1");
        self.batch_size = batch_size;
        Ok(())
    }

    /// Scores one group. `masks[i]` is the foreground mask of `images[i]`, of the same size.
    /// A group of one image has no pairs.
    pub fn score_group(&self, images: &[RgbImage], masks: &[GrayImage]) -> Result<ScoreOutput> {
        check_group(images, masks)?;
        let _no_grad = tch::no_grad_guard();
        let aesthetic = self.aesthetic_scores(images)?;
        let embeddings = self.object_embeddings(images, masks)?;
        Ok(ScoreOutput {
            aesthetic,
            pairs: pair_similarities(&embeddings),
            embeddings,
        })
    }

    /// The aesthetic score of each full image.
    pub fn aesthetic_scores(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        let _no_grad = tch::no_grad_guard();
        let mut scores = Vec::with_capacity(images.len());
        for (chunk_index, chunk) in images.chunks(self.batch_size).enumerate() {
            let tensors: Vec<Tensor> = chunk.iter().map(image_tensor).collect();
            let pixels = self
                .clip_preprocess
                .batch(&tensors, self.device)
                .with_context(|| format!("CLIP preprocessing of batch {chunk_index}"))?;
            let embeds = l2_normalise(&self.clip.forward(&pixels)?);
            scores.extend(to_vec(&self.head.forward(&embeds)?)?);
        }
        Ok(scores)
    }

    /// The L2-normalised DINOv2 embedding of each image's object crop.
    pub fn object_embeddings(
        &self,
        images: &[RgbImage],
        masks: &[GrayImage],
    ) -> Result<Vec<Vec<f32>>> {
        check_group(images, masks)?;
        let _no_grad = tch::no_grad_guard();
        let dim = self.dinov2.config().hidden_size;
        let mut embeddings = Vec::with_capacity(images.len());
        let pairs: Vec<(&RgbImage, &GrayImage)> = images.iter().zip(masks).collect();
        for (chunk_index, chunk) in pairs.chunks(self.batch_size).enumerate() {
            let crops: Vec<Tensor> = chunk
                .iter()
                .map(|(image, mask)| {
                    let crop = object_crop_box(mask);
                    image_tensor(image)
                        .narrow(1, crop.top as i64, crop.height as i64)
                        .narrow(2, crop.left as i64, crop.width as i64)
                })
                .collect();
            let pixels = self
                .dinov2_preprocess
                .batch(&crops, self.device)
                .with_context(|| format!("DINOv2 preprocessing of batch {chunk_index}"))?;
            let pooled = self.dinov2.forward(&pixels)?.pooler_output;
            let flat = to_vec(&l2_normalise(&pooled))?;
            embeddings.extend(flat.chunks(dim as usize).map(<[f32]>::to_vec));
        }
        Ok(embeddings)
    }
}

/// The checks every group passes before any model runs.
fn check_group(images: &[RgbImage], masks: &[GrayImage]) -> Result<()> {
    ensure!(!images.is_empty(), "a group to score has no images");
    ensure!(
        images.len() == masks.len(),
        "the group has {} images but {} masks",
        images.len(),
        masks.len()
    );
    for (index, (image, mask)) in images.iter().zip(masks).enumerate() {
        let (width, height) = image.dimensions();
        ensure!(
            width > 0 && height > 0,
            "image {index} is empty ({width}x{height})"
        );
        if mask.dimensions() != image.dimensions() {
            bail!(
                "mask {index} is {}x{} but its image is {width}x{height}",
                mask.width(),
                mask.height()
            );
        }
    }
    Ok(())
}

/// Rows divided by their L2 norm, in float32.
fn l2_normalise(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let norm = x.norm_scalaropt_dim(2, [-1], true);
    x / norm
}

fn to_vec(x: &Tensor) -> Result<Vec<f32>> {
    let flat = x.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1);
    Ok(Vec::<f32>::try_from(&flat)?)
}

/// The cosine similarity of every pair `a < b` of L2-normalised embeddings, in order
/// (0,1), (0,2), ..., (1,2), ...
pub fn pair_similarities(embeddings: &[Vec<f32>]) -> Vec<PairSimilarity> {
    let mut pairs = Vec::new();
    for a in 0..embeddings.len() {
        for b in a + 1..embeddings.len() {
            let similarity = embeddings[a]
                .iter()
                .zip(&embeddings[b])
                .map(|(x, y)| x * y)
                .sum();
            pairs.push(PairSimilarity {
                a: a as u32,
                b: b as u32,
                similarity,
            });
        }
    }
    pairs
}

/// Decodes an image file's bytes (PNG or JPEG) to RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let decoded = image::load_from_memory(bytes).with_context(|| {
        format!(
            "cannot decode image ({} bytes; expected PNG or JPEG)",
            bytes.len()
        )
    })?;
    Ok(decoded.to_rgb8())
}

/// Decodes a mask file's bytes (PNG or JPEG) to 8-bit grey (RGB masks are converted to luma).
pub fn decode_mask(bytes: &[u8]) -> Result<GrayImage> {
    let decoded = image::load_from_memory(bytes).with_context(|| {
        format!(
            "cannot decode mask ({} bytes; expected PNG or JPEG)",
            bytes.len()
        )
    })?;
    Ok(decoded.to_luma8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_all_ordered_pairs() {
        let embeddings = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.6, 0.8]];
        let pairs = pair_similarities(&embeddings);
        let order: Vec<(u32, u32)> = pairs.iter().map(|p| (p.a, p.b)).collect();
        assert_eq!(order, vec![(0, 1), (0, 2), (1, 2)]);
        assert!((pairs[1].similarity - 0.6).abs() < 1e-6);
        assert!(pair_similarities(&embeddings[..1]).is_empty());
    }

    #[test]
    fn undecodable_bytes_are_a_clear_error() {
        let error = decode_image(b"definitely not an image").unwrap_err();
        assert!(
            format!("{error:#}").contains("cannot decode image (23 bytes"),
            "{error:#}"
        );
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(RgbImage::new(4, 4))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(
            decode_image(&png[..png.len() / 2]).is_err(),
            "truncated PNG"
        );
        assert_eq!(decode_mask(&png).unwrap().dimensions(), (4, 4));
    }

    #[test]
    fn groups_are_checked_before_scoring() {
        let image = RgbImage::new(8, 6);
        let mask = GrayImage::new(8, 6);
        assert!(check_group(&[], &[]).is_err());
        assert!(check_group(std::slice::from_ref(&image), &[]).is_err());
        let error = check_group(std::slice::from_ref(&image), &[GrayImage::new(6, 8)]).unwrap_err();
        assert!(format!("{error}").contains("mask 0 is 6x8 but its image is 8x6"));
        assert!(check_group(&[RgbImage::new(0, 5)], &[GrayImage::new(0, 5)]).is_err());
        assert!(check_group(&[image], &[mask]).is_ok());
    }
}
