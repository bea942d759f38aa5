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
    /// The background caption each image's prompt was made from, in sample order.
    #[serde(default)]
    pub backgrounds: Vec<String>,
    /// The object description each image's prompt was made from (deformable objects; `null`
    /// for rigid objects, whose background captions name the object themselves).
    #[serde(default)]
    pub descriptions: Vec<Option<String>>,
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

/// What one image of a group is generated from: its whole prompt and the parts it was composed
/// of, kept so that the record of every group says exactly what each of its images used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePrompt {
    pub prompt: String,
    pub background: String,
    pub description: Option<String>,
}

impl DatasetRecord {
    pub fn key_for(group: GroupId) -> String {
        group.0.simple().to_string()
    }
}
