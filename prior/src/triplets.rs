//! Choosing the view triplets a group is generated from.
//!
//! The reference keeps a triplet of views only when each of its three pairs has more than 10% of
//! the 128 x 128 grid matched (so warping has enough to work with), draws views only from
//! elevations in (0, 60) degrees, and uses each asset up to twice: the triplets with the most
//! overlap. Overlap is measured here as the sum of the three pair counts; ties go to the
//! lexicographically smallest views so the choice is deterministic.

use crate::correspondence::CORRESPONDENCE_GRID;

/// A triplet needs strictly more matches than this on each pair: 10% of the 128 x 128 grid
/// (1638.4, so at least 1639).
pub const MIN_PAIR_MATCHES: u32 = (CORRESPONDENCE_GRID * CORRESPONDENCE_GRID) / 10;

/// The elevation range, in degrees (exclusive on both ends), of views a triplet may use.
pub const ELEVATION_RANGE_DEG: (f32, f32) = (0.0, 60.0);

/// Whether a view at this elevation may be part of a triplet.
pub fn elevation_allowed(elevation_deg: f32) -> bool {
    elevation_deg > ELEVATION_RANGE_DEG.0 && elevation_deg < ELEVATION_RANGE_DEG.1
}

/// A candidate triplet: ring view indices in increasing order and the match counts of its pairs
/// (0,1), (0,2), (1,2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Triplet {
    pub views: [usize; 3],
    pub matches: [u32; 3],
}

impl Triplet {
    pub fn overlap(&self) -> u64 {
        self.matches.iter().map(|&count| u64::from(count)).sum()
    }

    pub fn weakest_pair(&self) -> u32 {
        self.matches.into_iter().min().unwrap_or(0)
    }
}

/// Every triplet of `eligible` views (sorted ascending) whose pairs all have more than
/// `min_matches` matches, best first, at most `max_triplets`. `pair_matches(a, b)` with `a < b`
/// is the match count from view `a` to view `b`.
pub fn select_triplets(
    eligible: &[usize],
    pair_matches: impl Fn(usize, usize) -> u32,
    min_matches: u32,
    max_triplets: usize,
) -> Vec<Triplet> {
    let mut views = eligible.to_vec();
    views.sort_unstable();
    views.dedup();
    let mut candidates = Vec::new();
    for (i, &first) in views.iter().enumerate() {
        for (j, &second) in views.iter().enumerate().skip(i + 1) {
            let first_second = pair_matches(first, second);
            if first_second <= min_matches {
                continue;
            }
            for &third in &views[j + 1..] {
                let triplet = Triplet {
                    views: [first, second, third],
                    matches: [
                        first_second,
                        pair_matches(first, third),
                        pair_matches(second, third),
                    ],
                };
                if triplet.weakest_pair() > min_matches {
                    candidates.push(triplet);
                }
            }
        }
    }
    candidates.sort_by(|a, b| b.overlap().cmp(&a.overlap()).then(a.views.cmp(&b.views)));
    candidates.truncate(max_triplets);
    candidates
}

/// The best "weakest pair" over all triplets of `eligible`, to explain why none qualified.
pub fn best_weakest_pair(eligible: &[usize], pair_matches: impl Fn(usize, usize) -> u32) -> u32 {
    select_triplets(eligible, pair_matches, 0, usize::MAX)
        .iter()
        .map(Triplet::weakest_pair)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_ten_percent_of_the_grid() {
        assert_eq!(MIN_PAIR_MATCHES, 1638);
        assert!(elevation_allowed(30.0));
        assert!(!elevation_allowed(0.0) && !elevation_allowed(60.0) && !elevation_allowed(-5.0));
    }

    #[test]
    fn triplets_need_every_pair_above_the_threshold_and_come_best_first() {
        // Views on a circle of 6: neighbours overlap a lot, opposite views not at all.
        let overlap = |a: usize, b: usize| {
            let gap = (b - a).min(6 - (b - a));
            [0, 5000, 2000, 100][gap]
        };
        let all: Vec<usize> = (0..6).collect();
        let chosen = select_triplets(&all, overlap, MIN_PAIR_MATCHES, usize::MAX);
        // Three consecutive views (gaps 1, 1, 2) and every other view (gaps 2, 2, 2) qualify:
        // 8 of the 20 triplets, the consecutive ones first.
        assert_eq!(chosen.len(), 8);
        assert!(chosen[..6].iter().all(|t| t.overlap() == 12000));
        assert_eq!(chosen[6].views, [0, 2, 4]);
        assert_eq!(chosen[7].views, [1, 3, 5]);
        assert_eq!(chosen[0].views, [0, 1, 2]);
        assert_eq!(chosen[0].matches, [5000, 2000, 5000]);
        let limited = select_triplets(&all, overlap, MIN_PAIR_MATCHES, 2);
        assert_eq!(limited, chosen[..2]);
        // Without view 1 and 4 nothing qualifies.
        assert!(select_triplets(&[0, 2, 3, 5], overlap, MIN_PAIR_MATCHES, 2).is_empty());
        assert_eq!(best_weakest_pair(&[0, 2, 3, 5], overlap), 100);
    }
}
