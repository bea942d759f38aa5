//! The binary format of a view triplet's pixel correspondences (`correspondences.bin`, see
//! [`crate::keys::prior_correspondences`]).
//!
//! The prior job writes it, the generate job reads it to warp latents between views. It is binary
//! because a triplet holds tens of thousands of rows: as JSON it would be several times larger and
//! slower to parse, and floats would round-trip through text.
//!
//! # Conventions (those of the reference, which the warping relies on)
//!
//! A row is `[y1, x1, y2, x2]`: a pixel of the first view of the pair and where the same surface
//! point lands in the second view, both in PyTorch3D NDC on the square correspondence grid
//! (`grid` x `grid`, 128 in the reference): +x points **left**, +y points **up**, the image spans
//! [-1, 1] on both axes. The first view's point is a pixel centre, so its pixel is recovered
//! exactly by `row = floor(grid * (0.5 - 0.5 * y1))`, `col = floor(grid * (0.5 - 0.5 * x1))`.
//! The second view's point is the continuous projection (not snapped to a pixel centre): sampling
//! `grid_sample(image2, (-x2, -y2), align_corners=False)` reads the image at exactly that point.
//! Pairs are stored in the order (0,1), (0,2), (1,2) of the triplet's views.
//!
//! # Layout (all integers and floats little-endian)
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"SYNCDCOR"
//! 8       4     u32 format version (FORMAT_VERSION)
//! 12      4     u32 grid size in pixels (square grid)
//! 16      4     u32 number of pairs P (at most MAX_PAIRS)
//! 20      12*P  per pair: u32 view a, u32 view b (indices into the triplet), u32 row count N
//! ...     16*N  per pair, in the same order: N rows of 4 f32 (y1, x1, y2, x2)
//! ```
//!
//! Decoding checks every declared count against the bytes actually present before allocating, so
//! a corrupt or hostile file costs nothing but an error.

use std::fmt;

/// The first eight bytes of every correspondence file.
pub const MAGIC: [u8; 8] = *b"SYNCDCOR";
/// Version of the layout above. Bump it on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// The most pairs a file may hold: a triplet has three, more would be a different format.
pub const MAX_PAIRS: u32 = 16;

const HEADER_BYTES: usize = 20;
const PAIR_HEADER_BYTES: usize = 12;
const ROW_BYTES: usize = 16;

/// One correspondence: `[y1, x1, y2, x2]` in PyTorch3D NDC (see the module documentation).
pub type CorrespondenceRow = [f32; 4];

/// The correspondences from view `a` to view `b` of a triplet.
#[derive(Clone, Debug, PartialEq)]
pub struct PairCorrespondences {
    /// Index of the first view within the triplet (0, 1 or 2).
    pub a: u32,
    /// Index of the second view within the triplet.
    pub b: u32,
    pub rows: Vec<CorrespondenceRow>,
}

/// All the correspondences of one triplet.
#[derive(Clone, Debug, PartialEq)]
pub struct CorrespondenceSet {
    /// Side of the square correspondence grid, in pixels.
    pub grid: u32,
    pub pairs: Vec<PairCorrespondences>,
}

/// Why bytes are not a correspondence file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CorrespondenceDecodeError {
    #[error("correspondence file does not start with the magic bytes SYNCDCOR")]
    BadMagic,
    #[error("correspondence file has format version {found}, this build reads {expected}")]
    UnsupportedVersion { found: u32, expected: u32 },
    #[error(
        "correspondence file is truncated: {needed} bytes needed for {what}, {available} present"
    )]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("correspondence file declares {0} pairs, at most {MAX_PAIRS} are allowed")]
    TooManyPairs(u32),
    #[error("correspondence file has a zero grid size")]
    ZeroGrid,
    #[error("correspondence file has {0} bytes after its last row")]
    TrailingBytes(u64),
    #[error("correspondence file has a non-finite value in pair {pair}, row {row}")]
    NonFinite { pair: usize, row: usize },
}

impl CorrespondenceSet {
    /// The encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + self.pairs.len() * PAIR_HEADER_BYTES
            + self
                .pairs
                .iter()
                .map(|pair| pair.rows.len() * ROW_BYTES)
                .sum::<usize>()
    }

    /// Encodes the set in the layout documented above.
    ///
    /// # Panics
    ///
    /// If there are more than [`MAX_PAIRS`] pairs or a pair has more than `u32::MAX` rows: both
    /// are programming errors of the writer, not data problems.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.pairs.len() <= MAX_PAIRS as usize,
            "a correspondence file holds at most {MAX_PAIRS} pairs"
        );
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.grid.to_le_bytes());
        out.extend_from_slice(&(self.pairs.len() as u32).to_le_bytes());
        for pair in &self.pairs {
            let rows = u32::try_from(pair.rows.len()).expect("row count fits in u32");
            out.extend_from_slice(&pair.a.to_le_bytes());
            out.extend_from_slice(&pair.b.to_le_bytes());
            out.extend_from_slice(&rows.to_le_bytes());
        }
        for pair in &self.pairs {
            for row in &pair.rows {
                for value in row {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes a file, rejecting anything that does not follow the layout exactly.
    pub fn decode(bytes: &[u8]) -> Result<Self, CorrespondenceDecodeError> {
        let mut reader = Reader { bytes, at: 0 };
        let magic = reader.take(MAGIC.len(), "the magic bytes")?;
        if magic != MAGIC {
            return Err(CorrespondenceDecodeError::BadMagic);
        }
        let version = reader.u32("the version")?;
        if version != FORMAT_VERSION {
            return Err(CorrespondenceDecodeError::UnsupportedVersion {
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let grid = reader.u32("the grid size")?;
        if grid == 0 {
            return Err(CorrespondenceDecodeError::ZeroGrid);
        }
        let pair_count = reader.u32("the pair count")?;
        if pair_count > MAX_PAIRS {
            return Err(CorrespondenceDecodeError::TooManyPairs(pair_count));
        }
        let mut headers = Vec::with_capacity(pair_count as usize);
        for _ in 0..pair_count {
            let a = reader.u32("a pair header")?;
            let b = reader.u32("a pair header")?;
            let rows = reader.u32("a pair header")?;
            headers.push((a, b, rows));
        }
        // Check the total before allocating any row storage.
        let total_rows: u64 = headers.iter().map(|&(_, _, rows)| u64::from(rows)).sum();
        let needed = total_rows * ROW_BYTES as u64;
        let available = reader.remaining() as u64;
        if needed > available {
            return Err(CorrespondenceDecodeError::Truncated {
                what: "the rows",
                needed,
                available,
            });
        }
        if needed < available {
            return Err(CorrespondenceDecodeError::TrailingBytes(available - needed));
        }
        let mut pairs = Vec::with_capacity(headers.len());
        for (pair_index, (a, b, row_count)) in headers.into_iter().enumerate() {
            let mut rows = Vec::with_capacity(row_count as usize);
            for row_index in 0..row_count as usize {
                let chunk = reader.take(ROW_BYTES, "the rows")?;
                let mut row = [0f32; 4];
                for (value, bytes) in row.iter_mut().zip(chunk.chunks_exact(4)) {
                    *value = f32::from_le_bytes(bytes.try_into().expect("four bytes"));
                }
                if row.iter().any(|value| !value.is_finite()) {
                    return Err(CorrespondenceDecodeError::NonFinite {
                        pair: pair_index,
                        row: row_index,
                    });
                }
                rows.push(row);
            }
            pairs.push(PairCorrespondences { a, b, rows });
        }
        Ok(CorrespondenceSet { grid, pairs })
    }
}

/// The grid pixel `(row, col)` a first-view coordinate `(y1, x1)` designates (the reference's
/// `floor(grid * (0.5 - 0.5 * y))`); `None` outside the grid.
pub fn ndc_to_pixel(grid: u32, y: f32, x: f32) -> Option<(u32, u32)> {
    let to_index = |value: f32| {
        let index = (grid as f32 * (0.5 - 0.5 * value)).floor();
        (index >= 0.0 && index < grid as f32).then_some(index as u32)
    };
    Some((to_index(y)?, to_index(x)?))
}

/// The NDC coordinate `(y, x)` of a continuous image position `(row, col)` on the grid, where
/// pixel `(r, c)` covers `[r, r+1) x [c, c+1)` and its centre is `(r + 0.5, c + 0.5)`.
pub fn pixel_to_ndc(grid: u32, row: f32, col: f32) -> (f32, f32) {
    let size = grid as f32;
    (1.0 - 2.0 * row / size, 1.0 - 2.0 * col / size)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<&'a [u8], CorrespondenceDecodeError> {
        if self.remaining() < len {
            return Err(CorrespondenceDecodeError::Truncated {
                what,
                needed: (self.at + len) as u64,
                available: self.bytes.len() as u64,
            });
        }
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(slice)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CorrespondenceDecodeError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("four bytes")))
    }
}

impl fmt::Display for CorrespondenceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "correspondences on a {0}x{0} grid:", self.grid)?;
        for pair in &self.pairs {
            write!(f, " ({},{}) {} rows", pair.a, pair.b, pair.rows.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CorrespondenceSet {
        CorrespondenceSet {
            grid: 128,
            pairs: vec![
                PairCorrespondences {
                    a: 0,
                    b: 1,
                    rows: vec![[0.5, -0.25, 0.125, 1.0], [-1.0, 1.0, 0.0, 0.0]],
                },
                PairCorrespondences {
                    a: 0,
                    b: 2,
                    rows: vec![],
                },
                PairCorrespondences {
                    a: 1,
                    b: 2,
                    rows: vec![[0.1, 0.2, 0.3, 0.4]],
                },
            ],
        }
    }

    #[test]
    fn sets_round_trip_and_have_the_documented_size() {
        let set = sample();
        let bytes = set.encode();
        assert_eq!(bytes.len(), set.encoded_len());
        assert_eq!(bytes.len(), 20 + 3 * 12 + 3 * 16);
        assert_eq!(&bytes[..8], b"SYNCDCOR");
        assert_eq!(CorrespondenceSet::decode(&bytes).unwrap(), set);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            let error = CorrespondenceSet::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(error, CorrespondenceDecodeError::Truncated { .. }),
                "length {len}: {error}"
            );
        }
    }

    #[test]
    fn garbage_and_other_versions_are_rejected() {
        assert_eq!(
            CorrespondenceSet::decode(b"not a correspondence file at all"),
            Err(CorrespondenceDecodeError::BadMagic)
        );
        let mut bytes = sample().encode();
        bytes[8] = 9;
        assert!(matches!(
            CorrespondenceSet::decode(&bytes),
            Err(CorrespondenceDecodeError::UnsupportedVersion { found: 9, .. })
        ));
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(
            CorrespondenceSet::decode(&bytes),
            Err(CorrespondenceDecodeError::TrailingBytes(1))
        );
        let mut bytes = sample().encode();
        bytes[16..20].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            CorrespondenceSet::decode(&bytes),
            Err(CorrespondenceDecodeError::TooManyPairs(1000))
        );
        let mut bytes = sample().encode();
        bytes[20 + 3 * 12..20 + 3 * 12 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            CorrespondenceSet::decode(&bytes),
            Err(CorrespondenceDecodeError::NonFinite { pair: 0, row: 0 })
        ));
    }

    #[test]
    fn a_huge_declared_row_count_fails_without_allocating() {
        let mut bytes = sample().encode();
        // Row count of the first pair.
        bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            CorrespondenceSet::decode(&bytes),
            Err(CorrespondenceDecodeError::Truncated {
                what: "the rows",
                ..
            })
        ));
    }

    #[test]
    fn pixel_centres_map_back_to_their_pixel() {
        for grid in [1u32, 7, 128] {
            for row in 0..grid {
                for col in 0..grid {
                    let (y, x) = pixel_to_ndc(grid, row as f32 + 0.5, col as f32 + 0.5);
                    assert_eq!(ndc_to_pixel(grid, y, x), Some((row, col)));
                }
            }
        }
        // +x is left and +y is up: the top-left pixel has positive coordinates.
        let (y, x) = pixel_to_ndc(128, 0.5, 0.5);
        assert!(y > 0.99 && x > 0.99);
        assert_eq!(ndc_to_pixel(128, 1.5, 0.0), None);
    }
}
