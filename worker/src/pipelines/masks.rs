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

/// The reference's Otsu thresholding of maps [N, hw], each after min-max normalisation: per
/// map, the threshold among 0, 0.1, ..., 0.9 with the largest between-class variance (first one
/// on ties); values below become 0, values above 1, values exactly at the threshold keep their
/// normalised value. A constant map (no contrast) gives all zeros (the reference would divide
/// by zero).
///
/// All maps and levels are evaluated at once on the maps' device, with no value read back to
/// the host: the loop calls this after every step. Class sizes and sums are exact (float64),
/// the between-class variance is formed in float32 like the reference's.
fn otsu(maps: &Tensor) -> Tensor {
    let maps = maps.to_kind(Kind::Float);
    let (min, _) = maps.min_dim(1, true);
    let (max, _) = maps.max_dim(1, true);
    let range = &max - &min;
    let has_contrast = range.gt(0.0);
    let normalised = ((&maps - &min) / range.clamp_min(f64::from(f32::MIN_POSITIVE)))
        .masked_fill(&has_contrast.logical_not(), 0.0);
    let len = normalised.size()[1] as f64;
    // [N, L, hw]: which values fall in the low class at each level.
    let levels = Tensor::arange(OTSU_LEVELS, (Kind::Float, maps.device())) / OTSU_LEVELS as f64;
    let values = normalised.unsqueeze(1).to_kind(Kind::Double);
    let low = normalised
        .unsqueeze(1)
        .lt_tensor(&levels.reshape([1, OTSU_LEVELS, 1]))
        .to_kind(Kind::Double);
    let high: Tensor = 1.0 - &low;
    let low_count = low.sum_dim_intlist(2, false, Kind::Double);
    let high_count = high.sum_dim_intlist(2, false, Kind::Double);
    // A mean as the reference takes it: the class sum in float32, divided by the class size.
    let mean = |class: &Tensor, count: &Tensor| {
        (&values * class)
            .sum_dim_intlist(2, false, Kind::Double)
            .to_kind(Kind::Float)
            / count.to_kind(Kind::Float)
    };
    let low_mean = mean(&low, &low_count);
    let high_mean = mean(&high, &high_count);
    let fractions = ((&low_count / len) * (&high_count / len)).to_kind(Kind::Float);
    let variance = (low_mean - high_mean).square() * fractions;
    // An empty class has an undefined mean in the reference (NaN), never the best; a variance
    // of 0 never beats the initial best either, so both count as 0, and argmax picks the first
    // of the largest (level 0 when nothing is positive).
    let empty = low_count.eq(0.0).logical_or(&high_count.eq(0.0));
    let variance = variance
        .masked_fill(&empty, 0.0)
        .nan_to_num(0.0, None, None);
    let threshold = levels
        .index_select(0, &variance.argmax(1, false))
        .unsqueeze(1);
    let below = normalised.lt_tensor(&threshold);
    let above = normalised.gt_tensor(&threshold);
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
    let object = otsu(maps);
    let attention = box_dilate(&object.reshape([size[0], 1, grid_h, grid_w]), 3)
        .reshape([size[0], grid_h * grid_w]);
    Ok((object, attention))
}

/// The token span the reference falls back to when the category word is not found: the third
/// token, `[2, 3)`.
pub const FALLBACK_WORD_SPAN: (i64, i64) = (2, 3);

/// Plurals English stemmers do not reduce to their singular's stem, among animal names.
const IRREGULAR_PLURALS: &[(&str, &str)] = &[
    ("mice", "mouse"),
    ("geese", "goose"),
    ("wolves", "wolf"),
    ("calves", "calf"),
    ("oxen", "ox"),
];

/// A category word ("Cat", "Woodpecker", "polar bear") as it is looked up in captions: by the
/// stems of its words, case-insensitively, so "cats", "Cat" and "CATS" all name the category
/// "cat", wherever the tokenizer splits them. The reference matches exact token ids of the
/// capitalised word in lower-cased captions and so mostly falls back to a fixed token span.
pub struct CategoryWord {
    stems: Vec<String>,
    stemmer: rust_stemmers::Stemmer,
}

impl CategoryWord {
    pub fn new(category: &str) -> Self {
        let stemmer = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
        let stems = words(category)
            .map(|(_, word)| stem(&stemmer, word))
            .collect();
        Self { stems, stemmer }
    }

    /// The byte range of the last place in `text` where the category's words follow each
    /// other; `None` if they never do (or the category has no word).
    pub fn find_in(&self, text: &str) -> Option<std::ops::Range<usize>> {
        if self.stems.is_empty() {
            return None;
        }
        let found: Vec<(std::ops::Range<usize>, String)> = words(text)
            .map(|(range, word)| (range, stem(&self.stemmer, word)))
            .collect();
        found
            .windows(self.stems.len())
            .rev()
            .find(|window| window.iter().zip(&self.stems).all(|((_, a), b)| a == b))
            .map(|window| window[0].0.start..window[window.len() - 1].0.end)
    }

    /// The half-open span of the tokens of `prompt` that spell the category word (the last
    /// place it occurs), given each token's byte range in the prompt (special tokens have empty
    /// ranges). `None` when the prompt does not name the category, or names it only past the
    /// tokens the encoder keeps.
    pub fn token_span(&self, prompt: &str, token_offsets: &[(usize, usize)]) -> Option<(i64, i64)> {
        let word = self.find_in(prompt)?;
        let covering =
            |&(start, end): &(usize, usize)| start < end && start < word.end && end > word.start;
        let first = token_offsets.iter().position(covering)?;
        let last = token_offsets.iter().rposition(covering)?;
        Some((first as i64, last as i64 + 1))
    }
}

/// The words of `text` (maximal runs of letters and digits) with their byte ranges.
fn words(text: &str) -> impl Iterator<Item = (std::ops::Range<usize>, &str)> {
    let mut rest = text.char_indices().peekable();
    std::iter::from_fn(move || {
        while rest.next_if(|(_, c)| !c.is_alphanumeric()).is_some() {}
        let (start, _) = *rest.peek()?;
        let mut end = start;
        while let Some((at, c)) = rest.next_if(|(_, c)| c.is_alphanumeric()) {
            end = at + c.len_utf8();
        }
        Some((start..end, &text[start..end]))
    })
}

fn stem(stemmer: &rust_stemmers::Stemmer, word: &str) -> String {
    let lower = word.to_lowercase();
    let singular = IRREGULAR_PLURALS
        .iter()
        .find(|(plural, _)| *plural == lower)
        .map_or(lower.as_str(), |(_, singular)| singular);
    stemmer.stem(singular).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use syncd_models::weights::read_all;

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
    fn plurals_and_any_case_name_the_category_and_the_last_place_wins() {
        let cat = CategoryWord::new("Cat");
        let prompt = "Two cats. A CAT on a mat, the cat's bowl";
        // "cat's" is the words "cat" and "s": the last place is there.
        assert_eq!(cat.find_in(prompt), Some(30..33));
        assert_eq!(cat.find_in("two cats on a sofa"), Some(4..8));
        assert_eq!(cat.find_in("a Cat"), Some(2..5));
        assert_eq!(cat.find_in("a caterpillar and a category"), None);
        assert_eq!(
            CategoryWord::new("Mouse").find_in("three mice in a barn"),
            Some(6..10)
        );
        assert_eq!(CategoryWord::new("Fox").find_in("two foxes"), Some(4..9));
        assert_eq!(
            CategoryWord::new("polar bear").find_in("a bear and two polar bears"),
            Some(15..26)
        );
        assert_eq!(CategoryWord::new("").find_in("a cat"), None);
        assert_eq!(CategoryWord::new("Fox").find_in("über föxes"), None);
    }

    #[test]
    fn the_token_span_covers_every_token_of_the_word() {
        // "two woodpeckers here" split as [two][▁wood][peck][ers][▁here][</s>].
        let prompt = "two woodpeckers here";
        let offsets = [(0, 3), (3, 8), (8, 12), (12, 15), (15, 20), (0, 0)];
        let word = CategoryWord::new("Woodpecker");
        assert_eq!(word.token_span(prompt, &offsets), Some((1, 4)));
        // Not in the prompt, or past the kept tokens: no span.
        assert_eq!(CategoryWord::new("Owl").token_span(prompt, &offsets), None);
        assert_eq!(word.token_span(prompt, &offsets[..1]), None);
    }
}
