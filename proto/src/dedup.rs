//! Near-duplicate detection across groups.
//!
//! The filter rule ([`crate::filter`]) drops near-identical images inside one group; this module
//! catches a group that repeats an already accepted one (the same object generated twice with
//! almost the same look). It compares the L2-normalised DINOv2 embeddings of the object crops
//! that scoring returns ([`crate::messages::ScoreOutput::embeddings`]): the similarity of two
//! groups is the maximum cosine over all pairs of their images, and a candidate is a near
//! duplicate when its most similar accepted group reaches the threshold.
//!
//! The index is a plain in-memory structure with no I/O: the coordinator persists the
//! embeddings of accepted groups and rebuilds the index from them.

use crate::ids::GroupId;
use std::collections::BTreeMap;
use thiserror::Error;

/// The default threshold: the same bound above which the filter rule calls two images of one
/// group near-duplicates ([`crate::filter::FilterThresholds::max_similarity`]).
pub const DEFAULT_NEAR_DUPLICATE_THRESHOLD: f32 = 0.98;

#[derive(Debug, Error, PartialEq)]
pub enum DedupError {
    #[error("group {group} has no embeddings")]
    NoEmbeddings { group: GroupId },
    #[error("embedding {index} of group {group} has dimension {found}, the index holds dimension {expected}")]
    WrongDimension {
        group: GroupId,
        index: usize,
        found: usize,
        expected: usize,
    },
    #[error("embedding {index} of group {group} has a non-finite or zero-length vector")]
    Degenerate { group: GroupId, index: usize },
}

/// The embeddings of the accepted groups and the threshold that makes a group a near duplicate.
#[derive(Clone, Debug)]
pub struct NearDuplicateIndex {
    /// Accepted groups by id; a `BTreeMap` so that ties resolve to the smallest id, the same on
    /// every run.
    groups: BTreeMap<GroupId, Vec<Vec<f32>>>,
    /// Maximum pairwise cosine at or above which a candidate counts as a near duplicate.
    threshold: f32,
    /// The embedding dimension, fixed by the first inserted group.
    dimension: Option<usize>,
}

impl Default for NearDuplicateIndex {
    fn default() -> Self {
        Self::new(DEFAULT_NEAR_DUPLICATE_THRESHOLD)
    }
}

impl NearDuplicateIndex {
    pub fn new(threshold: f32) -> Self {
        Self {
            groups: BTreeMap::new(),
            threshold,
            dimension: None,
        }
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds (or replaces) an accepted group. Every embedding must have the index's dimension and
    /// be a finite, non-zero vector: a broken embedding stored here would silently hide or fake
    /// duplicates for the rest of the run.
    pub fn insert(&mut self, group: GroupId, embeddings: Vec<Vec<f32>>) -> Result<(), DedupError> {
        if embeddings.is_empty() {
            return Err(DedupError::NoEmbeddings { group });
        }
        let expected = self.dimension.unwrap_or(embeddings[0].len());
        for (index, embedding) in embeddings.iter().enumerate() {
            if embedding.len() != expected {
                return Err(DedupError::WrongDimension {
                    group,
                    index,
                    found: embedding.len(),
                    expected,
                });
            }
            let norm = norm(embedding);
            if !norm.is_finite() || norm == 0.0 {
                return Err(DedupError::Degenerate { group, index });
            }
        }
        self.dimension = Some(expected);
        self.groups.insert(group, embeddings);
        Ok(())
    }

    pub fn remove(&mut self, group: &GroupId) -> Option<Vec<Vec<f32>>> {
        self.groups.remove(group)
    }

    /// The accepted group most similar to a candidate's embeddings and that similarity (the
    /// maximum cosine over all pairs of a candidate image and a group image). `None` when the
    /// index is empty or no pair could be compared: candidate vectors of another dimension, zero
    /// length or with non-finite values take part in no pair.
    pub fn nearest(&self, embeddings: &[Vec<f32>]) -> Option<(GroupId, f32)> {
        let mut best: Option<(GroupId, f32)> = None;
        for (group, stored) in &self.groups {
            let similarity = stored
                .iter()
                .flat_map(|a| embeddings.iter().filter_map(move |b| cosine(a, b)))
                .fold(None, |max: Option<f32>, value| {
                    Some(max.map_or(value, |m| m.max(value)))
                });
            if let Some(similarity) = similarity {
                // Strictly greater: on a tie the group met first (smallest id) stays.
                if best.is_none_or(|(_, current)| similarity > current) {
                    best = Some((*group, similarity));
                }
            }
        }
        best
    }

    /// The accepted group a candidate nearly duplicates: its [`Self::nearest`] group when the
    /// similarity reaches the threshold (inclusive), else `None`.
    pub fn is_near_duplicate(&self, embeddings: &[Vec<f32>]) -> Option<(GroupId, f32)> {
        self.nearest(embeddings)
            .filter(|&(_, similarity)| similarity >= self.threshold)
    }
}

fn norm(vector: &[f32]) -> f32 {
    vector.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// Cosine of two vectors, or `None` when it is undefined (different lengths, a zero vector,
/// non-finite values). Computed in full rather than as a dot product so that a caller passing
/// vectors that are not exactly unit length still gets a cosine.
fn cosine(a: &[f32], b: &[f32]) -> Option<f32> {
    if a.len() != b.len() {
        return None;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let cosine = dot / (norm(a) * norm(b));
    cosine.is_finite().then_some(cosine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn group(n: u128) -> GroupId {
        GroupId(Uuid::from_u128(n))
    }

    fn unit(angle_degrees: f32) -> Vec<f32> {
        let radians = angle_degrees.to_radians();
        vec![radians.cos(), radians.sin(), 0.0]
    }

    #[test]
    fn empty_index_has_no_nearest_group() {
        let index = NearDuplicateIndex::default();
        assert!(index.is_empty());
        assert_eq!(index.nearest(&[unit(0.0)]), None);
        assert_eq!(index.is_near_duplicate(&[unit(0.0)]), None);
    }

    #[test]
    fn nearest_takes_the_maximum_over_all_image_pairs() {
        let mut index = NearDuplicateIndex::new(0.9);
        index
            .insert(group(1), vec![unit(90.0), unit(60.0)])
            .unwrap();
        index
            .insert(group(2), vec![unit(180.0), unit(25.0)])
            .unwrap();
        // The candidate's second image is 5 degrees from group 2's second image; every pair with
        // group 1 is at least 30 degrees apart.
        let candidate = vec![unit(-90.0), unit(20.0)];
        let (nearest, similarity) = index.nearest(&candidate).unwrap();
        assert_eq!(nearest, group(2));
        assert!((similarity - 5f32.to_radians().cos()).abs() < 1e-6);
        assert_eq!(
            index.is_near_duplicate(&candidate),
            Some((group(2), similarity))
        );
    }

    #[test]
    fn threshold_is_inclusive_and_configurable() {
        // (1, 0) and (1, sqrt 3): dot 1, norms 1 and exactly 2, so the cosine is exactly 0.5.
        let stored = vec![vec![1.0, 0.0]];
        let candidate = vec![vec![1.0, 3f32.sqrt()]];
        let mut at = NearDuplicateIndex::new(0.5);
        at.insert(group(1), stored.clone()).unwrap();
        assert_eq!(at.is_near_duplicate(&candidate), Some((group(1), 0.5)));
        let mut above = NearDuplicateIndex::new(0.500_001);
        above.insert(group(1), stored).unwrap();
        assert_eq!(above.threshold(), 0.500_001);
        assert_eq!(above.is_near_duplicate(&candidate), None);
    }

    #[test]
    fn below_threshold_is_not_a_duplicate_but_still_nearest() {
        let mut index = NearDuplicateIndex::default();
        index.insert(group(7), vec![unit(0.0)]).unwrap();
        let candidate = vec![unit(30.0)];
        assert_eq!(index.nearest(&candidate).unwrap().0, group(7));
        assert_eq!(index.is_near_duplicate(&candidate), None);
        assert!(index.is_near_duplicate(&[unit(0.0)]).is_some());
    }

    #[test]
    fn ties_resolve_to_the_smallest_group_id() {
        let mut index = NearDuplicateIndex::default();
        index.insert(group(9), vec![unit(10.0)]).unwrap();
        index.insert(group(3), vec![unit(-10.0)]).unwrap();
        assert_eq!(index.nearest(&[unit(0.0)]).unwrap().0, group(3));
    }

    #[test]
    fn unnormalised_candidates_still_give_cosines() {
        let mut index = NearDuplicateIndex::default();
        index.insert(group(1), vec![vec![0.0, 2.0]]).unwrap();
        let (_, similarity) = index.nearest(&[vec![0.0, 40.0]]).unwrap();
        assert!((similarity - 1.0).abs() < 1e-6);
    }

    #[test]
    fn broken_candidates_compare_with_nothing() {
        let mut index = NearDuplicateIndex::default();
        index.insert(group(1), vec![unit(0.0)]).unwrap();
        assert_eq!(index.nearest(&[]), None);
        assert_eq!(index.nearest(&[vec![1.0, 0.0]]), None, "other dimension");
        assert_eq!(index.nearest(&[vec![0.0, 0.0, 0.0]]), None, "zero vector");
        assert_eq!(index.nearest(&[vec![f32::NAN, 0.0, 0.0]]), None, "NaN");
        // A broken image does not hide a good one of the same candidate.
        let mixed = vec![vec![f32::NAN, 0.0, 0.0], unit(0.0)];
        assert!(index.is_near_duplicate(&mixed).is_some());
    }

    #[test]
    fn insert_rejects_bad_groups() {
        let mut index = NearDuplicateIndex::default();
        assert_eq!(
            index.insert(group(1), vec![]),
            Err(DedupError::NoEmbeddings { group: group(1) })
        );
        index.insert(group(1), vec![unit(0.0)]).unwrap();
        assert_eq!(
            index.insert(group(2), vec![unit(0.0), vec![1.0, 0.0]]),
            Err(DedupError::WrongDimension {
                group: group(2),
                index: 1,
                found: 2,
                expected: 3
            })
        );
        assert_eq!(
            index.insert(group(3), vec![vec![0.0; 3]]),
            Err(DedupError::Degenerate {
                group: group(3),
                index: 0
            })
        );
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn replacing_and_removing_groups() {
        let mut index = NearDuplicateIndex::default();
        index.insert(group(1), vec![unit(0.0)]).unwrap();
        index.insert(group(1), vec![unit(90.0)]).unwrap();
        assert_eq!(index.len(), 1);
        assert!(index.is_near_duplicate(&[unit(90.0)]).is_some());
        assert!(index.remove(&group(1)).is_some());
        assert_eq!(index.nearest(&[unit(90.0)]), None);
    }
}
