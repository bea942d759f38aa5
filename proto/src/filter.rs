//! The filter rule: which images of a scored group enter the dataset.
//!
//! The rule is per pair, not a mean (see ARCHITECTURE.md): an image is valid if its aesthetic
//! score reaches the threshold and it belongs to at least one pair whose DINOv2 similarity lies in
//! the closed interval `[min_similarity, max_similarity]` (the upper bound drops near-duplicates).
//! A group is kept if at least `min_valid_images` of its images are valid, and then only its valid
//! images enter the dataset.

use crate::messages::PairSimilarity;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterThresholds {
    pub min_aesthetic: f32,
    pub min_similarity: f32,
    pub max_similarity: f32,
    pub min_valid_images: usize,
}

impl Default for FilterThresholds {
    fn default() -> Self {
        Self {
            min_aesthetic: 6.0,
            min_similarity: 0.7,
            max_similarity: 0.98,
            min_valid_images: 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterDecision {
    pub accepted: bool,
    /// Indices of the valid images, ascending. Only these enter the dataset.
    pub valid_images: Vec<u32>,
    /// Why, in words a person reads in the CLI.
    pub reason: String,
}

/// Applies the rule to the scores of one group of `aesthetic.len()` images.
pub fn decide(
    aesthetic: &[f32],
    pairs: &[PairSimilarity],
    thresholds: &FilterThresholds,
) -> FilterDecision {
    let images = aesthetic.len();
    // A pair naming an image the group does not have, or an image with itself, is malformed and
    // counts for neither of its images.
    let well_formed = |pair: &PairSimilarity| {
        pair.a != pair.b && (pair.a as usize) < images && (pair.b as usize) < images
    };
    let pair_counts = |pair: &PairSimilarity| {
        well_formed(pair)
            && pair.similarity >= thresholds.min_similarity
            && pair.similarity <= thresholds.max_similarity
    };
    let mut in_counting_pair = vec![false; images];
    for pair in pairs.iter().filter(|pair| pair_counts(pair)) {
        in_counting_pair[pair.a as usize] = true;
        in_counting_pair[pair.b as usize] = true;
    }

    let mut valid_images = Vec::new();
    let mut problems = Vec::new();
    for (index, &score) in aesthetic.iter().enumerate() {
        // NaN fails the comparison and so never passes: a broken score rejects the image.
        let looks_good = score >= thresholds.min_aesthetic;
        match (looks_good, in_counting_pair[index]) {
            (true, true) => valid_images.push(index as u32),
            (false, _) => problems.push(format!(
                "image {index} aesthetic {score:.3} < {}",
                thresholds.min_aesthetic
            )),
            (true, false) => problems.push(format!(
                "image {index} in no pair with similarity in [{}, {}]",
                thresholds.min_similarity, thresholds.max_similarity
            )),
        }
    }

    let accepted = valid_images.len() >= thresholds.min_valid_images;
    let verdict = if accepted { "accepted" } else { "rejected" };
    let mut reason = format!(
        "{verdict}: {} of {images} images valid (need {})",
        valid_images.len(),
        thresholds.min_valid_images
    );
    if !problems.is_empty() {
        reason.push_str("; ");
        reason.push_str(&problems.join("; "));
    }
    FilterDecision {
        accepted,
        valid_images: if accepted { valid_images } else { Vec::new() },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: u32, b: u32, similarity: f32) -> PairSimilarity {
        PairSimilarity { a, b, similarity }
    }

    fn all_pairs(sims: [f32; 3]) -> Vec<PairSimilarity> {
        vec![
            pair(0, 1, sims[0]),
            pair(0, 2, sims[1]),
            pair(1, 2, sims[2]),
        ]
    }

    #[test]
    fn bounds_are_inclusive() {
        let t = FilterThresholds::default();
        let at_edges = decide(&[6.0, 6.0, 6.0], &all_pairs([0.7, 0.98, 0.5]), &t);
        assert!(at_edges.accepted, "{}", at_edges.reason);
        assert_eq!(at_edges.valid_images, vec![0, 1, 2]);
    }

    #[test]
    fn just_outside_the_bounds_rejects() {
        let t = FilterThresholds::default();
        let below = decide(&[6.0, 6.0, 6.0], &all_pairs([0.6999, 0.98001, 0.1]), &t);
        assert!(!below.accepted);
        assert!(below.valid_images.is_empty());
        let ugly = decide(&[5.9999, 5.9999, 7.0], &all_pairs([0.8, 0.8, 0.8]), &t);
        assert!(!ugly.accepted);
        assert!(ugly.reason.contains("image 0 aesthetic"), "{}", ugly.reason);
    }

    #[test]
    fn a_group_of_three_can_enter_with_two_images() {
        let t = FilterThresholds::default();
        let decision = decide(&[7.0, 3.0, 6.5], &all_pairs([0.9, 0.75, 0.99]), &t);
        assert!(decision.accepted);
        assert_eq!(decision.valid_images, vec![0, 2]);
        assert!(decision.reason.contains("image 1 aesthetic"));
    }

    #[test]
    fn a_group_of_two_needs_its_one_pair() {
        let t = FilterThresholds::default();
        assert!(decide(&[6.0, 6.1], &[pair(0, 1, 0.7)], &t).accepted);
        assert!(!decide(&[6.0, 6.1], &[pair(0, 1, 0.99)], &t).accepted);
        assert!(!decide(&[6.0, 5.0], &[pair(0, 1, 0.8)], &t).accepted);
    }

    #[test]
    fn a_group_of_two_at_the_exact_edges() {
        let t = FilterThresholds::default();
        for similarity in [0.7, 0.98] {
            let decision = decide(&[6.0, 6.0], &[pair(0, 1, similarity)], &t);
            assert!(decision.accepted, "{similarity}: {}", decision.reason);
            assert_eq!(decision.valid_images, vec![0, 1]);
        }
        for similarity in [0.699_999_9, 0.980_000_1] {
            assert!(!decide(&[6.0, 6.0], &[pair(0, 1, similarity)], &t).accepted);
        }
        let ugly = decide(&[6.0, 5.999_999_5], &[pair(0, 1, 0.8)], &t);
        assert!(!ugly.accepted);
        assert!(ugly.reason.contains("image 1 aesthetic"), "{}", ugly.reason);
    }

    #[test]
    fn a_group_of_three_with_one_valid_image_is_rejected() {
        let t = FilterThresholds::default();
        // Only pair (0, 1) counts and image 1 is ugly: image 0 alone is valid.
        let decision = decide(&[7.0, 5.0, 7.0], &all_pairs([0.8, 0.99, 0.5]), &t);
        assert!(!decision.accepted);
        assert!(decision.valid_images.is_empty());
        assert!(
            decision.reason.contains("1 of 3 images valid"),
            "{}",
            decision.reason
        );
        assert!(
            decision.reason.contains("image 2 in no pair"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn the_counting_pair_partner_need_not_be_valid_itself() {
        // The rule is per pair: images 0 and 1 are each in a counting pair with the ugly image 2,
        // so both are valid even though they are near-duplicates of each other (0.99).
        let t = FilterThresholds::default();
        let decision = decide(&[7.0, 7.0, 3.0], &all_pairs([0.99, 0.8, 0.8]), &t);
        assert!(decision.accepted, "{}", decision.reason);
        assert_eq!(decision.valid_images, vec![0, 1]);
    }

    #[test]
    fn thresholds_are_configuration() {
        let strict = FilterThresholds {
            min_aesthetic: 6.5,
            min_similarity: 0.75,
            max_similarity: 0.95,
            min_valid_images: 3,
        };
        let scores = [6.5, 6.6, 6.7];
        assert!(decide(&scores, &all_pairs([0.75, 0.95, 0.1]), &strict).accepted);
        assert!(!decide(&scores, &all_pairs([0.75, 0.96, 0.1]), &strict).accepted);
        assert!(!decide(&[6.5, 6.6, 6.4], &all_pairs([0.8, 0.8, 0.8]), &strict).accepted);
    }

    #[test]
    fn empty_and_malformed_inputs_are_rejected_without_panicking() {
        let t = FilterThresholds::default();
        let empty = decide(&[], &[], &t);
        assert!(!empty.accepted);
        assert!(
            empty.reason.contains("0 of 0 images valid"),
            "{}",
            empty.reason
        );
        // A pair naming an image the group does not have counts for nobody.
        let stray = decide(&[7.0, 7.0], &[pair(0, 5, 0.8), pair(5, 1, 0.8)], &t);
        assert!(
            stray.valid_images.is_empty() && !stray.accepted,
            "{}",
            stray.reason
        );
        // Nor does an image paired with itself.
        let selfish = decide(&[7.0, 7.0], &[pair(0, 0, 0.8), pair(1, 1, 0.8)], &t);
        assert!(!selfish.accepted, "{}", selfish.reason);
        assert!(!decide(&[7.0, 7.0], &[], &t).accepted);
    }

    #[test]
    fn nan_scores_never_pass() {
        let t = FilterThresholds::default();
        let decision = decide(&[f32::NAN, 7.0, 7.0], &all_pairs([f32::NAN, 0.8, 0.8]), &t);
        assert_eq!(decision.valid_images, vec![1, 2]);
    }
}
