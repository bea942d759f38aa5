//! Foreground masks on the token grid for Masked Shared Attention, from the two sources SynCD
//! uses, and the lookup of the category word's tokens.
//!
//! - Rigid objects: the render's alpha, area-downsampled to the token grid (any coverage counts)
//!   and dilated with a 9x9 box.
//! - Deformable objects: the model's own text-to-image attention to the category word, averaged
//!   over heads, layers and the steps so far; min-max normalised, thresholded with a 10-level
//!   Otsu search and dilated 3x3, recomputed after every step.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Otsu's search levels: thresholds 0, 0.1, ..., 0.9.
const OTSU_LEVELS: i64 = 10;

/// Box dilation of binary-ish maps [N, 1, h, w] with a `size` x `size` window (zero padding):
/// the clamped window sum, like the reference's `conv2d(ones)` + `clamp(0, 1)`.
fn box_dilate(maps: &Tensor, size: i64) -> Tensor {
    let kernel = Tensor::ones([1, 1, size, size], (maps.kind(), maps.device()));
    let pad = size / 2;
    maps.conv2d(&kernel, None::<&Tensor>, [1, 1], [pad, pad], [1, 1], 1)
        .clamp(0.0, 1.0)
}

/// Rigid masks: `alpha` [N, H, W] (any real dtype) -> [N, grid_h * grid_w] float32 in {0, 1}.
pub fn rigid_token_masks(alpha: &Tensor, grid_h: i64, grid_w: i64) -> Result<Tensor> {
    let size = alpha.size();
    if size.len() != 3 {
        bail!("alpha masks have shape {size:?}, expected [images, height, width]");
    }
    if size[1] % grid_h != 0 || size[2] % grid_w != 0 {
        bail!(
            "alpha masks of {}x{} do not divide into the {grid_h}x{grid_w} token grid",
            size[1],
            size[2]
        );
    }
    let covered = alpha.gt(0.0).to_kind(Kind::Float).unsqueeze(1);
    // `F.interpolate(mode="area")` is adaptive average pooling.
    let coverage = covered.adaptive_avg_pool2d([grid_h, grid_w]);
    Ok(box_dilate(&coverage, 9)
        .gt(0.0)
        .to_kind(Kind::Float)
        .reshape([size[0], grid_h * grid_w]))
}

/// The reference's Otsu thresholding of one map [hw] after min-max normalisation: the threshold
/// among 0, 0.1, ..., 0.9 with the largest between-class variance (first one on ties); values
/// below become 0, values above 1, values exactly at the threshold keep their normalised value.
/// A constant map (no contrast) gives all zeros (the reference would divide by zero).
fn otsu(map: &Tensor) -> Tensor {
    let map = map.to_kind(Kind::Float);
    let min = map.min();
    let range = map.max() - &min;
    if range.double_value(&[]) <= 0.0 {
        return map.zeros_like();
    }
    let normalised = (&map - &min) / range;
    let len = normalised.numel() as f32;
    let mut threshold = 0.0f32;
    let mut best = 0.0f32;
    for level in 0..OTSU_LEVELS {
        let candidate = level as f32 / OTSU_LEVELS as f32;
        let low_mask = normalised.lt(f64::from(candidate));
        let low = normalised.masked_select(&low_mask);
        let high = normalised.masked_select(&low_mask.logical_not());
        if low.numel() == 0 || high.numel() == 0 {
            // An empty class has an undefined mean in the reference (NaN), never the best.
            continue;
        }
        let fractions = (low.numel() as f64 / len as f64) * (high.numel() as f64 / len as f64);
        let gap = low.mean(Kind::Float) - high.mean(Kind::Float);
        let variance = (gap.square() * fractions).double_value(&[]) as f32;
        if variance > best {
            best = variance;
            threshold = candidate;
        }
    }
    let threshold = f64::from(threshold);
    let below = normalised.lt(threshold);
    let above = normalised.gt(threshold);
    normalised.masked_fill(&below, 0.0).masked_fill(&above, 1.0)
}

/// Deformable masks: Otsu masks of the averaged attention maps [N, grid_h * grid_w], and the
/// same masks dilated 3x3 for attention. Returns `(object, attention)`.
pub fn attention_token_masks(maps: &Tensor, grid_h: i64, grid_w: i64) -> Result<(Tensor, Tensor)> {
    let size = maps.size();
    if size.len() != 2 || size[1] != grid_h * grid_w {
        bail!(
            "attention maps have shape {size:?}, expected [images, {}]",
            grid_h * grid_w
        );
    }
    let object = Tensor::stack(
        &(0..size[0])
            .map(|image| otsu(&maps.get(image)))
            .collect::<Vec<_>>(),
        0,
    );
    let attention = box_dilate(&object.reshape([size[0], 1, grid_h, grid_w]), 3)
        .reshape([size[0], grid_h * grid_w]);
    Ok((object, attention))
}

/// The half-open token span of a word in a prompt's token ids, searched for each spelling of
/// the word (e.g. lower-case and capitalised, without the end-of-sequence token); the last
/// match wins, as in the reference. Without a match the reference's fixed fall-back `[2, 3)`.
pub fn word_token_span(prompt_ids: &[u32], spellings: &[Vec<u32>]) -> (i64, i64) {
    let mut span = (2, 3);
    let mut best_start = None;
    for word in spellings.iter().filter(|word| !word.is_empty()) {
        for start in (0..=prompt_ids.len().saturating_sub(word.len())).rev() {
            if prompt_ids.len() >= word.len() && prompt_ids[start..start + word.len()] == word[..] {
                if best_start.is_none_or(|best| start > best) {
                    best_start = Some(start);
                    span = (start as i64, (start + word.len()) as i64);
                }
                break;
            }
        }
    }
    span
}

/// The spellings of a category word to look up: as given, lower-case, capitalised.
pub fn word_spellings(word: &str) -> Vec<String> {
    let lower = word.to_lowercase();
    let mut capitalised = lower.clone();
    if let Some(first) = capitalised.get(0..1) {
        let upper = first.to_uppercase();
        capitalised.replace_range(0..1, &upper);
    }
    let mut spellings: Vec<String> = Vec::with_capacity(3);
    for spelling in [word.to_string(), lower, capitalised] {
        if !spellings.contains(&spelling) {
            spellings.push(spelling);
        }
    }
    spellings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weights::read_all;
    use std::path::Path;

    fn fixture() -> std::collections::HashMap<String, Tensor> {
        read_all(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flux/masks.safetensors"
        )))
        .unwrap()
    }

    #[test]
    fn rigid_masks_match_reference() {
        let fixture = fixture();
        let masks = rigid_token_masks(&fixture["alpha"], 4, 4).unwrap();
        assert!(masks.equal(&fixture["rigid_masks"]));
    }

    #[test]
    fn attention_masks_match_reference() {
        let fixture = fixture();
        let (_, masks) = attention_token_masks(&fixture["attention_maps"], 8, 8).unwrap();
        assert!(
            masks.equal(&fixture["deformable_masks"]),
            "{masks} vs {}",
            fixture["deformable_masks"]
        );
    }

    #[test]
    fn finds_the_last_span_of_any_spelling() {
        let prompt = [5, 7, 9, 3, 7, 9, 1];
        assert_eq!(word_token_span(&prompt, &[vec![7, 9]]), (4, 6));
        assert_eq!(word_token_span(&prompt, &[vec![8], vec![3]]), (3, 4));
        assert_eq!(word_token_span(&prompt, &[vec![42]]), (2, 3));
        assert_eq!(word_spellings("Cat"), ["Cat", "cat"]);
        assert_eq!(word_spellings("fox"), ["fox", "Fox"]);
    }
}
