//! The record of one group in the finished dataset: the `.json` member of a WebDataset sample.

use crate::ids::{GroupId, ObjectId, RunId};
use crate::messages::{ObjectSpec, PairSimilarity};
use serde::{Deserialize, Serialize};

/// Everything a training job needs to know about a sample besides its pixels. Every prompt part
/// is stored, including the deformable object description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// The WebDataset key of the sample: the group id without dashes (no dots, as WebDataset
    /// groups files by the part of their name before the first dot).
    pub key: String,
    pub run_id: RunId,
    pub object_id: ObjectId,
    pub group_id: GroupId,
    pub object: ObjectSpec,
    /// The prompt of each image in the sample, in sample order.
    pub prompts: Vec<String>,
    /// Member names of the images in the tar shard, in sample order (`{key}.{i}.png`).
    pub images: Vec<String>,
    /// Member names of the masks (`{key}.{i}.mask.png`).
    pub masks: Vec<String>,
    /// Index of each sample image in the generated group.
    pub group_indices: Vec<u32>,
    pub aesthetic: Vec<f32>,
    pub pairs: Vec<PairSimilarity>,
    pub seed: u64,
}

impl DatasetRecord {
    pub fn key_for(group: GroupId) -> String {
        group.0.simple().to_string()
    }
}
