//! The record of one group in the finished dataset: the `.json` member of a WebDataset sample.

use crate::ids::{GroupId, ObjectId, RunId};
use crate::lineage::Lineage;
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
    /// What made the group besides its prompts, object and seed: the generation settings, the
    /// workers, models (with their weights' hashes) and code that generated and scored it.
    /// Absent in records written before lineage was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
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

    /// The DINOv2 similarity of every two images of the sample, in sample order: an N x N
    /// symmetric matrix with 1.0 on the diagonal (an image is itself), the form trainers read.
    /// `pairs` name images by their index in the generated group, so each sample image is found
    /// through `group_indices`. `None` marks a pair the scores lack.
    pub fn similarity_matrix(&self) -> Vec<Vec<Option<f32>>> {
        let similarity = |a: u32, b: u32| {
            self.pairs
                .iter()
                .find(|pair| (pair.a, pair.b) == (a, b) || (pair.a, pair.b) == (b, a))
                .map(|pair| pair.similarity)
        };
        self.group_indices
            .iter()
            .map(|&a| {
                self.group_indices
                    .iter()
                    .map(|&b| if a == b { Some(1.0) } else { similarity(a, b) })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn record(group_indices: Vec<u32>, pairs: Vec<PairSimilarity>) -> DatasetRecord {
        DatasetRecord {
            key: "k".into(),
            run_id: RunId(Uuid::from_u128(1)),
            object_id: ObjectId(Uuid::from_u128(2)),
            group_id: GroupId(Uuid::from_u128(3)),
            object: ObjectSpec::Deformable {
                category: "Cat".into(),
                description: "a cat".into(),
            },
            prompts: Vec::new(),
            backgrounds: Vec::new(),
            descriptions: Vec::new(),
            images: Vec::new(),
            masks: Vec::new(),
            group_indices,
            aesthetic: Vec::new(),
            pairs,
            seed: 0,
            lineage: None,
        }
    }

    fn pair(a: u32, b: u32, similarity: f32) -> PairSimilarity {
        PairSimilarity { a, b, similarity }
    }

    #[test]
    fn the_similarity_matrix_is_in_sample_order() {
        // Image 1 of the group was filtered out: sample images 0 and 1 are group images 0 and 2.
        let two = record(vec![0, 2], vec![pair(0, 2, 0.8)]);
        assert_eq!(
            two.similarity_matrix(),
            vec![vec![Some(1.0), Some(0.8)], vec![Some(0.8), Some(1.0)]]
        );
        // Pairs are found in either order; the pair (1, 2) is missing.
        let matrix =
            record(vec![0, 1, 2], vec![pair(1, 0, 0.9), pair(0, 2, 0.7)]).similarity_matrix();
        assert_eq!(matrix[0], vec![Some(1.0), Some(0.9), Some(0.7)]);
        assert_eq!(matrix[2], vec![Some(0.7), None, Some(1.0)]);
    }
}
