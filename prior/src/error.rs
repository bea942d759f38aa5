//! The one error type of the prior, whose variants say what went wrong with an asset and, through
//! [`PriorError::failure_kind`], what the coordinator should do about it.
//!
//! Every problem of the asset itself (unreadable, unsupported, empty, degenerate, too small in
//! frame, no usable view triplet) is permanent: rendering it again gives the same answer, so the
//! coordinator skips the object instead of retrying. Only problems outside the asset (reading or
//! writing local files) are transient.

use std::path::PathBuf;
use syncd_proto::messages::FailureKind;

#[derive(Debug, thiserror::Error)]
pub enum PriorError {
    #[error("asset is not glTF: {0}")]
    NotGltf(String),
    #[error("asset is a malformed binary glTF (.glb): {0}")]
    MalformedGlb(String),
    #[error("asset is invalid glTF: {0}")]
    InvalidGltf(String),
    #[error(
        "asset is Draco-compressed (KHR_draco_mesh_compression), which the prior cannot decode"
    )]
    DracoCompressed,
    #[error("asset uses unsupported glTF features: {0}")]
    Unsupported(String),
    #[error("buffer {buffer} declares {declared} bytes but only {available} are present")]
    BufferTooShort {
        buffer: usize,
        declared: u64,
        available: u64,
    },
    #[error("buffer {buffer} cannot be resolved: {reason}")]
    BufferUnavailable { buffer: usize, reason: String },
    #[error("accessor {accessor} is out of bounds or malformed: {reason}")]
    BadAccessor { accessor: usize, reason: String },
    #[error("mesh {mesh} primitive {primitive}: {reason}")]
    BadPrimitive {
        mesh: usize,
        primitive: usize,
        reason: String,
    },
    #[error("asset has a non-finite vertex position (NaN or infinite) in mesh {mesh}")]
    NonFiniteVertex { mesh: usize },
    #[error("asset has no triangles in its default scene")]
    NoTriangles,
    #[error("asset is too large: {what} ({count}) exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("asset has a degenerate extent (all vertices coincide or lie too far apart)")]
    DegenerateExtent,
    #[error("no view covers at least {min_coverage:.0}% of the frame (best: {best_coverage:.1}%)")]
    ObjectTooSmall {
        min_coverage: f32,
        best_coverage: f32,
    },
    #[error("no view triplet has more than {threshold} matched pixels on each of its pairs (best minimum: {best})")]
    NoValidTriplet { threshold: u32, best: u32 },
    #[error("invalid prior job or render options: {0}")]
    InvalidOptions(String),
    #[error("encoding {what}: {reason}")]
    Encode { what: String, reason: String },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PriorError {
    /// What the coordinator should do with the job that failed with this error.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            PriorError::Io { .. } | PriorError::Encode { .. } => FailureKind::Transient,
            PriorError::NotGltf(_)
            | PriorError::MalformedGlb(_)
            | PriorError::InvalidGltf(_)
            | PriorError::DracoCompressed
            | PriorError::Unsupported(_)
            | PriorError::BufferTooShort { .. }
            | PriorError::BufferUnavailable { .. }
            | PriorError::BadAccessor { .. }
            | PriorError::BadPrimitive { .. }
            | PriorError::NonFiniteVertex { .. }
            | PriorError::NoTriangles
            | PriorError::TooLarge { .. }
            | PriorError::DegenerateExtent
            | PriorError::ObjectTooSmall { .. }
            | PriorError::NoValidTriplet { .. }
            | PriorError::InvalidOptions(_) => FailureKind::Permanent,
        }
    }

    /// Whether the coordinator must skip the object rather than retry the job.
    pub fn is_permanent(&self) -> bool {
        self.failure_kind() == FailureKind::Permanent
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PriorError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = PriorError> = std::result::Result<T, E>;
