//! A run's configuration file: what to generate, with which settings, and which thresholds
//! decide what enters the dataset. It is stored with the run (`runs.config`), so a run can be
//! inspected and reproduced from the database alone.
//!
//! ```toml
//! name = "cats-and-chairs"
//! seed = 42
//!
//! [input]
//! objects_file = "objects.jsonl"   # ready-made prompts, one JSON object per line
//! rigid_csv = "cap3d.csv"          # Cap3D-style "uid,caption" rows; assets in assets_dir/{uid}.glb
//! assets_dir = "assets"
//! categories = ["Cat", "Dog"]      # deformable: the LLM writes descriptions and backgrounds
//! objects_per_category = 2
//!
//! [filter]
//! min_aesthetic = 6.0
//! ```

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use syncd_proto::filter::FilterThresholds;
use syncd_proto::messages::TrueCfgSettings;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Unique among runs; names the dataset folder in S3.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub input: InputConfig,
    #[serde(default)]
    pub prompts: PromptConfig,
    #[serde(default)]
    pub generation: GenerationConfig,
    #[serde(default)]
    pub prior: PriorConfig,
    #[serde(default)]
    pub filter: FilterThresholds,
    #[serde(default)]
    pub jobs: JobPolicy,
    #[serde(default)]
    pub dataset: DatasetConfig,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// JSON lines of objects with ready-made prompts (see [`crate::input::ReadyObject`]).
    pub objects_file: Option<PathBuf>,
    /// Cap3D-style CSV: `uid,caption` per row, no header required.
    pub rigid_csv: Option<PathBuf>,
    /// Folder holding `{uid}.glb` for every rigid object.
    pub assets_dir: Option<PathBuf>,
    /// Deformable categories; the LLM writes each object's description and backgrounds.
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default = "one")]
    pub objects_per_category: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptConfig {
    /// Background captions asked of the LLM per object.
    pub backgrounds: u32,
    /// Object descriptions asked of the LLM per deformable object.
    pub descriptions: u32,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            backgrounds: 10,
            descriptions: 1,
        }
    }
}

/// Settings of the generation jobs, per object family (reference, section C).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    pub images_per_group: u32,
    pub groups_per_object: u32,
    pub rigid: FamilySettings,
    pub deformable: FamilySettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilySettings {
    pub resolution: u32,
    pub steps: u32,
    /// Embedded (distilled) guidance scale.
    pub guidance: f32,
    /// True classifier-free guidance; absent means none.
    #[serde(default)]
    pub true_cfg: Option<TrueCfgSettings>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            images_per_group: 3,
            groups_per_object: 1,
            rigid: FamilySettings {
                resolution: 512,
                steps: 30,
                guidance: 10.0,
                true_cfg: Some(TrueCfgSettings::reference_rigid()),
            },
            deformable: FamilySettings {
                resolution: 1024,
                steps: 50,
                guidance: 3.5,
                true_cfg: None,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorConfig {
    pub views: u32,
    pub max_triplets: u32,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            views: 20,
            max_triplets: 2,
        }
    }
}

/// Retry policy of the run's jobs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobPolicy {
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max_secs`.
    pub backoff_base_secs: f64,
    pub backoff_max_secs: f64,
    /// An attempt with no result after this long is presumed lost and retried.
    pub attempt_timeout_secs: u64,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base_secs: 5.0,
            backoff_max_secs: 300.0,
            attempt_timeout_secs: 4 * 3600,
        }
    }
}

impl JobPolicy {
    /// Delay before attempt `next_attempt` (2, 3, ...).
    pub fn backoff(&self, next_attempt: u32) -> std::time::Duration {
        let exponent = next_attempt.saturating_sub(2).min(30) as i32;
        let secs = (self.backoff_base_secs * 2f64.powi(exponent)).min(self.backoff_max_secs);
        std::time::Duration::from_secs_f64(secs.max(0.0))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Samples (groups) per WebDataset shard.
    pub samples_per_shard: u32,
    /// Cosine similarity of DINOv2 embeddings above which an accepted group is a near duplicate
    /// of an earlier one and is left out of the dataset.
    pub near_duplicate_threshold: f32,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            samples_per_shard: 1000,
            near_duplicate_threshold: syncd_proto::dedup::DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        }
    }
}

impl RunConfig {
    /// Reads a run file; relative input paths are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read run file {}", path.display()))?;
        let mut config: RunConfig =
            toml_from_str(&text).with_context(|| format!("invalid run file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for input_path in [
            &mut config.input.objects_file,
            &mut config.input.rigid_csv,
            &mut config.input.assets_dir,
        ]
        .into_iter()
        .flatten()
        {
            if input_path.is_relative() {
                *input_path = base.join(&*input_path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "run name {:?} must be non-empty ASCII letters, digits, '-' or '_' (it names an S3 folder)",
                self.name
            );
        }
        if self.generation.images_per_group < 2 {
            bail!("generation.images_per_group must be at least 2");
        }
        if self.generation.groups_per_object == 0 {
            bail!("generation.groups_per_object must be at least 1");
        }
        if self.jobs.max_attempts == 0 {
            bail!("jobs.max_attempts must be at least 1");
        }
        if self.filter.min_similarity > self.filter.max_similarity {
            bail!("filter.min_similarity is above filter.max_similarity");
        }
        if self.input.rigid_csv.is_some() && self.input.assets_dir.is_none() {
            bail!("input.rigid_csv needs input.assets_dir (where the {{uid}}.glb files are)");
        }
        if self.dataset.samples_per_shard == 0 {
            bail!("dataset.samples_per_shard must be at least 1");
        }
        Ok(())
    }
}

fn toml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    use figment::providers::{Format, Toml};
    Ok(figment::Figment::from(Toml::string(text)).extract()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = JobPolicy {
            backoff_base_secs: 2.0,
            backoff_max_secs: 5.0,
            ..Default::default()
        };
        assert_eq!(policy.backoff(2).as_secs_f64(), 2.0);
        assert_eq!(policy.backoff(3).as_secs_f64(), 4.0);
        assert_eq!(policy.backoff(4).as_secs_f64(), 5.0);
    }

    #[test]
    fn names_that_cannot_be_s3_folders_are_refused() {
        let mut config: RunConfig = toml_from_str("name = \"ok\"\n[input]\n").unwrap();
        config.validate().unwrap();
        config.name = "a/b".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = toml_from_str::<RunConfig>("name = \"x\"\nsede = 3\n[input]\n").unwrap_err();
        assert!(format!("{error:#}").contains("sede"), "{error:#}");
    }

    #[test]
    fn the_demo_run_file_loads_with_the_reference_rigid_guidance() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/run.toml");
        let config = RunConfig::load(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.generation.rigid.true_cfg,
            Some(TrueCfgSettings::reference_rigid())
        );
        assert_eq!(config.generation.deformable.true_cfg, None);
        assert_eq!(
            GenerationConfig::default().rigid.true_cfg,
            Some(TrueCfgSettings::reference_rigid())
        );
    }
}
