//! The S3 key layout. Every key the factory writes is built by a function here, so the layout is
//! documented in one place (see ARCHITECTURE.md) and keys are deterministic: a re-run of a job
//! overwrites its objects instead of adding new ones.
//!
//! Generated images are the exception: they are scoped by attempt, because two attempts of one
//! group need not make the same pixels (another GPU, another kernel). An attempt that lost its
//! lease and finishes late writes beside the current attempt's images, never over them, and the
//! coordinator records only the current attempt's keys, so what was scored is what the dataset
//! holds. (The 3D prior is computed on the CPU, bit for bit the same on every attempt, so its
//! files are not scoped.)
//!
//! ```text
//! runs/{run}/assets/{uid}.glb                         rigid assets uploaded with the run
//! runs/{run}/objects/{object}/prior/{triplet}/view{i}.depth.png   depth control image (1/depth, min-max)
//! runs/{run}/objects/{object}/prior/{triplet}/view{i}.mask.png    foreground mask
//! runs/{run}/objects/{object}/prior/{triplet}/cameras.json        cameras of the three views
//! runs/{run}/objects/{object}/prior/{triplet}/correspondences.bin pairs (0,1), (0,2), (1,2)
//! runs/{run}/groups/{group}/attempt-{n}/{i}.png        generated image i of a group (attempt n)
//! runs/{run}/groups/{group}/attempt-{n}/{i}.mask.png   foreground mask used for image i
//! runs/{run}/groups/{group}/regenerations/{r}/attempt-{n}/{i}.png   regeneration r of the group
//! runs/{run}/groups/{group}/regenerations/{r}/attempt-{n}/{i}.mask.png
//! runs/{run}/groups/{group}/sheet.png                 contact sheet of a decided group
//! datasets/{run_name}/shard-{n:06}.tar                finished dataset, WebDataset shards
//! datasets/{run_name}/shard-{n:06}.parquet            the same samples, fixed columns (Hugging Face)
//! datasets/{run_name}/README.md                       dataset card listing the Parquet files
//! datasets/{run_name}/index.json                      shard list and per-shard counts
//! ```

use crate::ids::{GroupId, ObjectId, RunId};

pub fn asset(run: RunId, uid: &str) -> String {
    format!("runs/{run}/assets/{uid}.glb")
}

/// Everything a run writes lies under this prefix, its datasets excepted.
pub fn run_prefix(run: RunId) -> String {
    format!("runs/{run}/")
}

/// Everything the 3D prior writes for an object.
pub fn prior_prefix(run: RunId, object: ObjectId) -> String {
    format!("runs/{run}/objects/{object}/prior/")
}

pub fn prior_triplet_prefix(run: RunId, object: ObjectId, triplet: u32) -> String {
    format!("runs/{run}/objects/{object}/prior/{triplet}")
}

/// Every key of one prior triplet: depth and mask of each of its three views, the cameras and
/// the correspondences.
pub fn prior_triplet_keys(run: RunId, object: ObjectId, triplet: u32) -> Vec<String> {
    let mut keys: Vec<String> = (0..3)
        .flat_map(|view| {
            [
                prior_depth(run, object, triplet, view),
                prior_mask(run, object, triplet, view),
            ]
        })
        .collect();
    keys.push(prior_cameras(run, object, triplet));
    keys.push(prior_correspondences(run, object, triplet));
    keys
}

pub fn prior_depth(run: RunId, object: ObjectId, triplet: u32, view: u32) -> String {
    format!(
        "{}/view{view}.depth.png",
        prior_triplet_prefix(run, object, triplet)
    )
}

pub fn prior_mask(run: RunId, object: ObjectId, triplet: u32, view: u32) -> String {
    format!(
        "{}/view{view}.mask.png",
        prior_triplet_prefix(run, object, triplet)
    )
}

pub fn prior_cameras(run: RunId, object: ObjectId, triplet: u32) -> String {
    format!(
        "{}/cameras.json",
        prior_triplet_prefix(run, object, triplet)
    )
}

pub fn prior_correspondences(run: RunId, object: ObjectId, triplet: u32) -> String {
    format!(
        "{}/correspondences.bin",
        prior_triplet_prefix(run, object, triplet)
    )
}

pub fn group_prefix(run: RunId, group: GroupId) -> String {
    format!("runs/{run}/groups/{group}")
}

/// Everything one attempt of a generation job writes: the group's images, or, when the job is
/// regeneration `n` of the group (`syncd group regenerate`), that regeneration's, which never
/// mix with the images the group was scored and packed with.
pub fn generation_attempt_prefix(
    run: RunId,
    group: GroupId,
    regeneration: Option<u32>,
    attempt: u32,
) -> String {
    match regeneration {
        None => format!("{}/attempt-{attempt}/", group_prefix(run, group)),
        Some(n) => format!(
            "{}/regenerations/{n}/attempt-{attempt}/",
            group_prefix(run, group)
        ),
    }
}

/// Generated image `index` under an attempt's prefix.
pub fn generated_image(attempt_prefix: &str, index: u32) -> String {
    format!("{attempt_prefix}{index}.png")
}

/// The foreground mask used for generated image `index`, under an attempt's prefix.
pub fn generated_mask(attempt_prefix: &str, index: u32) -> String {
    format!("{attempt_prefix}{index}.mask.png")
}

/// The contact sheet of a decided group. Not scoped by attempt: the coordinator draws it from the
/// images it recorded, and draws it again (over the same key) if the group is decided again.
pub fn group_sheet(run: RunId, group: GroupId) -> String {
    format!("{}/sheet.png", group_prefix(run, group))
}

pub fn dataset_prefix(run_name: &str) -> String {
    format!("datasets/{run_name}")
}

pub fn dataset_shard(run_name: &str, shard: u32) -> String {
    format!("{}/shard-{shard:06}.tar", dataset_prefix(run_name))
}

/// The Parquet twin of tar shard `shard`: the same samples in the same order.
pub fn dataset_parquet_shard(run_name: &str, shard: u32) -> String {
    format!("{}/shard-{shard:06}.parquet", dataset_prefix(run_name))
}

/// The dataset card: `datasets` reads the YAML `configs` of a folder's `README.md` to find its
/// data files, so the Parquet files load by the folder alone, the tar shards beside them aside.
pub fn dataset_card(run_name: &str) -> String {
    format!("{}/README.md", dataset_prefix(run_name))
}

pub fn dataset_index(run_name: &str) -> String {
    format!("{}/index.json", dataset_prefix(run_name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn keys_follow_the_documented_layout() {
        let run = RunId(Uuid::from_u128(1));
        let group = GroupId(Uuid::from_u128(2));
        let attempt = generation_attempt_prefix(run, group, None, 2);
        assert_eq!(
            generated_image(&attempt, 1),
            "runs/00000000-0000-0000-0000-000000000001/groups/00000000-0000-0000-0000-000000000002/attempt-2/1.png"
        );
        let regeneration = generation_attempt_prefix(run, group, Some(3), 1);
        assert_eq!(
            generated_mask(&regeneration, 0),
            "runs/00000000-0000-0000-0000-000000000001/groups/00000000-0000-0000-0000-000000000002/regenerations/3/attempt-1/0.mask.png"
        );
        assert_eq!(
            group_sheet(run, group),
            "runs/00000000-0000-0000-0000-000000000001/groups/00000000-0000-0000-0000-000000000002/sheet.png"
        );
        assert_eq!(dataset_shard("demo", 3), "datasets/demo/shard-000003.tar");
        assert_eq!(
            dataset_parquet_shard("demo", 3),
            "datasets/demo/shard-000003.parquet"
        );
        assert_eq!(dataset_card("demo"), "datasets/demo/README.md");
    }
}
