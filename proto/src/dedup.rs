//! Near-duplicate detection across groups.
//!
//! The filter rule ([`crate::filter`]) drops near-identical images inside one group; this module
//! catches a group that repeats an already accepted one (the same object generated twice with
//! almost the same look). It compares the L2-normalised DINOv2 embeddings of the object crops
//! that scoring returns ([`crate::messages::ScoreOutput::embeddings`]): the similarity of two
//! groups is the maximum cosine over all pairs of their images, and a candidate is a near
//! duplicate when its most similar accepted group reaches the threshold.
//!
//! [`NearDuplicateIndex`] is that rule, exactly, over groups held in memory. A run's accepted
//! groups are too many to hold or scan on every report (150K groups of three 1024-dim
//! embeddings), so the coordinator keeps them in PostgreSQL under [`signature`]s: random-hyperplane
//! locality-sensitive hashes that put images at a cosine at or above the threshold in a shared
//! bucket with near certainty, and unrelated images almost never. A check reads only the groups
//! sharing a bucket with the candidate and applies the exact rule to them, so it never reports a
//! group below the threshold; [`signature_miss_probability`] bounds how often it can miss one
//! above it.
//!
//! Objects of one kind look alike, so a run's groups of one category share buckets far more often
//! than random vectors would, and the groups sharing a bucket with a candidate grow with the
//! category. Each image's [`Sketch`] (the sign bits its signature is made of, 110 bytes) is kept
//! beside its embedding: the share of bits on which two sketches disagree estimates the angle
//! between the images, so a group whose sketches all disagree with the candidate's beyond
//! [`sketch_bound`] is left out before its embeddings (4 KB each) are read.

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
        self.dimension = Some(check_embeddings(group, &embeddings, self.dimension)?);
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

/// Whether a group's embeddings can take part in the exact rule, as
/// [`NearDuplicateIndex::insert`] requires: at least one, every one of `dimension` (the first's
/// when `None`), finite and non-zero. Returns their dimension.
pub fn check_embeddings(
    group: GroupId,
    embeddings: &[Vec<f32>],
    dimension: Option<usize>,
) -> Result<usize, DedupError> {
    let first = embeddings
        .first()
        .ok_or(DedupError::NoEmbeddings { group })?;
    let expected = dimension.unwrap_or(first.len());
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
    Ok(expected)
}

/// Bands of a [`signature`]: an image pair is found when any band matches.
pub const SIGNATURE_BANDS: usize = 40;
/// Sign bits per band: more bits make unrelated images share a band more rarely.
pub const BITS_PER_BAND: usize = 22;

/// One embedding's signature: its bucket keys and its [`Sketch`], from one projection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// One key per band.
    pub buckets: [i64; SIGNATURE_BANDS],
    pub sketch: Sketch,
}

/// The signature of one embedding. Its bucket keys, one per band, are the signs of the
/// embedding's projections on `BITS_PER_BAND` random hyperplanes, mixed with the band number and
/// `salt` (the run, so that runs never share buckets) into 64 bits; its sketch is all those signs.
///
/// Two vectors at angle θ fall on the same side of a random hyperplane with probability
/// 1 - θ/π, so they share a band with probability (1 - θ/π)^22. The hyperplanes' coordinates are
/// ±1, drawn from a fixed counter-based generator: the same for every process and version, as
/// stored signatures require. Changing anything here needs the stored signatures rebuilt.
pub fn signature(salt: u128, embedding: &[f32]) -> Signature {
    let projections = projections(embedding);
    let mut buckets = [0i64; SIGNATURE_BANDS];
    for (band, (key, planes)) in buckets
        .iter_mut()
        .zip(projections.chunks(BITS_PER_BAND))
        .enumerate()
    {
        let bits = planes.iter().fold(0u64, |bits, &projection| {
            (bits << 1) | u64::from(projection >= 0.0)
        });
        let salted = mix64(salt as u64 ^ mix64((salt >> 64) as u64 ^ band as u64));
        *key = mix64(salted ^ bits) as i64;
    }
    let mut sketch = [0u8; SKETCH_BYTES];
    for (plane, projection) in projections.iter().enumerate() {
        sketch[plane / 8] |= u8::from(*projection >= 0.0) << (plane % 8);
    }
    Signature {
        buckets,
        sketch: Sketch(sketch),
    }
}

/// Bytes of a [`Sketch`]: one bit per hyperplane of a [`signature`].
pub const SKETCH_BYTES: usize = PLANES / 8;
const _: () = assert!(PLANES.is_multiple_of(8));

/// The sign of an embedding's projection on every hyperplane of its [`signature`], unsalted.
/// Two images at angle θ disagree on each bit with probability θ/π, independently, so the
/// number of bits on which their sketches disagree estimates θ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sketch(pub [u8; SKETCH_BYTES]);

impl Sketch {
    /// The sketch stored as `bytes`, if they are one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// On how many hyperplanes the two embeddings fall on different sides.
    pub fn disagreements(&self, other: &Sketch) -> u32 {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum()
    }
}

/// The probability, per pair of images at the threshold, that [`sketch_bound`] leaves the pair
/// out: far below [`signature_miss_probability`], so the sketches change no recall that matters.
pub const SKETCH_MISS_PROBABILITY: f64 = 1e-9;

/// The most disagreeing bits a pair of images at cosine `threshold` or above shows, except with
/// probability [`SKETCH_MISS_PROBABILITY`]: the smallest count `k` with P(more than `k`) at most
/// that, the disagreements being binomial over the sketch's bits with probability θ/π each. A
/// group none of whose images comes within it of a candidate image has no pair at the threshold.
pub fn sketch_bound(threshold: f32) -> u32 {
    let bits = PLANES as u32;
    let disagree = f64::from(threshold).clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    if disagree >= 0.5 {
        // At or below cosine 0 the probabilities underflow; no bound is worth having there.
        return bits;
    }
    // The binomial's mass from 0 upwards, each term from the last, until what is left is small.
    let ratio = disagree / (1.0 - disagree);
    let mut term = (1.0 - disagree).powi(bits as i32);
    let mut below = 0.0;
    for count in 0..bits {
        below += term;
        if 1.0 - below <= SKETCH_MISS_PROBABILITY {
            return count;
        }
        term *= ratio * f64::from(bits - count) / f64::from(count + 1);
    }
    bits
}

/// The embedding's projection on each hyperplane of a [`signature`], each the sum of the
/// coordinates in order with the hyperplane's signs.
fn projections(embedding: &[f32]) -> [f32; PLANES] {
    let mut projections = [0f32; PLANES];
    for (block, projections) in projections.chunks_mut(PLANES_AT_ONCE).enumerate() {
        let projections: &mut [f32; PLANES_AT_ONCE] = projections
            .try_into()
            .expect("PLANES_AT_ONCE divides PLANES");
        for (word, chunk) in embedding.chunks(64).enumerate() {
            let signs: [u64; PLANES_AT_ONCE] = std::array::from_fn(|lane| {
                let plane = (block * PLANES_AT_ONCE + lane) as u64;
                mix64(HYPERPLANE_SEED ^ (plane << 32) ^ word as u64)
            });
            // Each half word in 32-bit lanes, so that one coordinate's sign bits for all the
            // planes come out of one uniform shift: coordinate `offset` moves to bit 31, where a
            // set bit flips the value's sign (adding -value where the coordinate is -1).
            for (half, values) in chunk.chunks(32).enumerate() {
                let signs: [u32; PLANES_AT_ONCE] =
                    std::array::from_fn(|lane| (signs[lane] >> (32 * half)) as u32);
                for (offset, value) in values.iter().enumerate() {
                    let value = value.to_bits();
                    for (projection, signs) in projections.iter_mut().zip(&signs) {
                        let flip = (signs << (31 - offset)) & SIGN_BIT;
                        *projection += f32::from_bits(value ^ flip);
                    }
                }
            }
        }
    }
    projections
}

/// The hyperplanes of a [`signature`].
const PLANES: usize = SIGNATURE_BANDS * BITS_PER_BAND;
/// Hyperplanes projected on together. Their sums are independent, so they run side by side (in
/// SIMD lanes) instead of each waiting for the previous addition, while each plane's own sum still
/// adds the coordinates in order: the float rounding, hence every sign bit, is the same as one
/// plane at a time. (Eight measured fastest on x86-64's baseline SSE2, against 4 and 16.)
const PLANES_AT_ONCE: usize = 8;
const _: () = assert!(PLANES.is_multiple_of(PLANES_AT_ONCE));
const SIGN_BIT: u32 = 1 << 31;

/// The probability that a [`signature`] lookup misses one pair of images at cosine `cosine`:
/// no band of the two signatures matches.
pub fn signature_miss_probability(cosine: f64) -> f64 {
    let same_side = 1.0 - cosine.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    (1.0 - same_side.powi(BITS_PER_BAND as i32)).powi(SIGNATURE_BANDS as i32)
}

const HYPERPLANE_SEED: u64 = 0x5359_4e43_445f_4c53;

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit hash of `x`.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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

    /// Two keys of the signature of the test vector below, as this code first computed them.
    const GOLDEN_FIRST: i64 = -7_252_711_381_557_178_066;
    const GOLDEN_LAST: i64 = 5_706_327_948_746_628_778;

    fn shares_a_band(a: &Signature, b: &Signature) -> bool {
        a.buckets.iter().zip(&b.buckets).any(|(x, y)| x == y)
    }

    #[test]
    fn signatures_are_fixed_salted_and_scale_free() {
        let v: Vec<f32> = (0..1024)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        assert_eq!(signature(7, &v), signature(7, &v));
        // Scaled by a power of two, so that every projection scales exactly.
        let scaled: Vec<f32> = v.iter().map(|x| x * 4.0).collect();
        assert_eq!(signature(7, &v), signature(7, &scaled));
        assert!(!shares_a_band(&signature(7, &v), &signature(8, &v)));
        // The hyperplanes and the mixing are part of the stored format: these must never change.
        let keys = signature(0x5eed, &v).buckets;
        assert_eq!((keys[0], keys[39]), (GOLDEN_FIRST, GOLDEN_LAST));
    }

    #[test]
    fn sketches_hold_the_signs_the_bands_are_made_of_and_ignore_the_salt() {
        let v: Vec<f32> = (0..1024)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let signed = signature(7, &v);
        assert_eq!(signed.sketch, signature(8, &v).sketch);
        for (plane, projection) in projections(&v).iter().enumerate() {
            let bit = (signed.sketch.0[plane / 8] >> (plane % 8)) & 1;
            assert_eq!(bit == 1, *projection >= 0.0, "plane {plane}");
        }
        let negated: Vec<f32> = v.iter().map(|x| -x).collect();
        let opposite = signature(7, &negated).sketch;
        assert_eq!(signed.sketch.disagreements(&signed.sketch), 0);
        // Every projection changes sign, except those exactly 0, which stay "non-negative".
        let zeros = projections(&v).iter().filter(|p| **p == 0.0).count() as u32;
        assert_eq!(
            signed.sketch.disagreements(&opposite),
            PLANES as u32 - zeros
        );
        assert_eq!(Sketch::from_bytes(&signed.sketch.0), Some(signed.sketch));
        assert_eq!(Sketch::from_bytes(&signed.sketch.0[1..]), None);
    }

    #[test]
    fn sketch_bounds_follow_the_binomial_tail() {
        // At 0.98 a pair disagrees on 880 × acos(0.98)/π ≈ 56 bits on average (standard
        // deviation 7.3); the bound sits about six deviations above, and unrelated images
        // (cosine 0: 440 bits) and images of one kind (cosine 0.6: 260 bits) far beyond it.
        let bound = sketch_bound(0.98);
        assert!((95..=110).contains(&bound), "{bound}");
        assert!(sketch_bound(0.9) > bound && sketch_bound(0.995) < bound);
        assert_eq!(sketch_bound(1.0), 0);
        assert_eq!(sketch_bound(0.0), PLANES as u32);
        assert_eq!(sketch_bound(-1.0), PLANES as u32);
    }

    /// The projection on one hyperplane of a [`signature`], the way its definition reads.
    fn projection_on(plane: usize, embedding: &[f32]) -> f32 {
        let mut projection = 0f32;
        for (word, chunk) in embedding.chunks(64).enumerate() {
            let signs = mix64(HYPERPLANE_SEED ^ ((plane as u64) << 32) ^ word as u64);
            for (offset, value) in chunk.iter().enumerate() {
                projection += if (signs >> offset) & 1 == 1 {
                    -value
                } else {
                    *value
                };
            }
        }
        projection
    }

    #[test]
    fn projections_equal_one_plane_at_a_time_bit_for_bit() {
        // Lengths that fill the last 64-coordinate word and lengths that do not, and values of
        // mixed magnitudes, so that any change in the order of additions shows in the rounding.
        for (length, seed) in [(1024, 1u64), (1000, 2), (768, 3), (65, 4), (3, 5), (0, 6)] {
            let v: Vec<f32> = (0..length as u64)
                .map(|i| {
                    let x = mix64(seed ^ (i << 8));
                    let magnitude = [1e-3f32, 1.0, 1e3][(x % 3) as usize];
                    ((x >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * magnitude
                })
                .collect();
            let projections = projections(&v);
            for (plane, projection) in projections.iter().enumerate() {
                assert_eq!(
                    projection.to_bits(),
                    projection_on(plane, &v).to_bits(),
                    "length {length}, plane {plane}"
                );
            }
        }
    }

    #[test]
    fn miss_probabilities_follow_the_band_layout() {
        assert!((signature_miss_probability(0.98) - 2.26e-5).abs() < 1e-7);
        assert!(signature_miss_probability(0.995) < 1e-9);
        assert_eq!(signature_miss_probability(1.0), 0.0);
        assert!(signature_miss_probability(0.0) > 1.0 - 1e-4);
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
