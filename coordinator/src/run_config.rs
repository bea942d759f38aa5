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
//! assets_dir = "assets"            # or "s3://BUCKET/PREFIX" in the working bucket, read in place
//! categories = ["Cat", "Dog"]      # deformable: the LLM writes descriptions and backgrounds
//! objects_per_category = 2
//!
//! [filter]
//! min_aesthetic = 6.0
//! ```

use crate::input::AssetSource;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use syncd_proto::filter::FilterThresholds;
use syncd_proto::messages::{AestheticHead, TrueCfgSettings};

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
    pub scoring: ScoringConfig,
    #[serde(default)]
    pub filter: FilterThresholds,
    #[serde(default)]
    pub jobs: JobPolicy,
    #[serde(default)]
    pub dataset: DatasetConfig,
    #[serde(default)]
    pub estimate: EstimateConfig,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// JSON lines of objects with ready-made prompts (see [`crate::input::ReadyObject`]).
    pub objects_file: Option<PathBuf>,
    /// Cap3D-style CSV: `uid,caption` per row, no header required.
    pub rigid_csv: Option<PathBuf>,
    /// Where every rigid object's `{uid}.glb` is: a local folder (uploaded into the run when it
    /// is created), or `s3://BUCKET/PREFIX` in the working bucket (read from there; nothing is
    /// copied).
    pub assets_dir: Option<AssetSource>,
    /// Deformable categories; the LLM writes each object's description and backgrounds.
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default = "one")]
    pub objects_per_category: u32,
}

fn one() -> u32 {
    1
}

/// How the prompt stage asks the LLM (reference, section A).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptConfig {
    /// Background captions asked for each rigid asset, in one request (the reference: 10).
    pub rigid_backgrounds: u32,
    /// Requests per deformable category, for its backgrounds and again for its descriptions
    /// (the reference: 6). The answers are cleaned, de-duplicated across the whole category and
    /// handed out to the category's objects.
    pub category_requests: u32,
    /// Captions asked for in each request of a deformable category (the reference: 25).
    pub captions_per_request: u32,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            rigid_backgrounds: 10,
            category_requests: 6,
            captions_per_request: 25,
        }
    }
}

/// Settings of the generation jobs, per object family (reference, section C).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    pub images_per_group: u32,
    pub rigid: FamilySettings,
    pub deformable: FamilySettings,
}

/// The generation settings of one family. A run file that sets some of these fields keeps its
/// family's defaults for all the others ([`RunConfig::from_toml`] merges field by field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilySettings {
    /// Width and height of the images, in pixels.
    pub resolution: u32,
    pub steps: u32,
    /// Embedded (distilled) guidance scale.
    pub guidance: f32,
    /// Groups made of each object. A rigid asset gets one group per view triplet its 3D prior
    /// finds, up to this many (the reference uses each asset up to twice); a deformable object
    /// gets exactly this many.
    pub groups_per_object: u32,
    /// True classifier-free guidance with a negative prompt. A scale of 1 turns it off (as in
    /// diffusers, which runs it only above 1).
    pub true_cfg: TrueCfgSettings,
}

impl FamilySettings {
    /// The reference's rigid recipe: FLUX.1-Depth-dev at 512x512, 30 steps, guidance 10, true
    /// CFG 2.5 from step 1; each asset used up to twice.
    pub fn reference_rigid() -> Self {
        Self {
            resolution: 512,
            steps: 30,
            guidance: 10.0,
            groups_per_object: 2,
            true_cfg: TrueCfgSettings::reference_rigid(),
        }
    }

    /// The reference's deformable recipe: FLUX.1-dev at 1024x1024, 50 steps, guidance 3.5, no
    /// true CFG (scale 1, keeping the reference's negative prompt should a run raise the scale).
    pub fn reference_deformable() -> Self {
        Self {
            resolution: 1024,
            steps: 50,
            guidance: 3.5,
            groups_per_object: 1,
            true_cfg: TrueCfgSettings {
                scale: 1.0,
                ..TrueCfgSettings::reference_rigid()
            },
        }
    }

    /// The true-CFG settings a generation job carries: none when the scale is 1.
    pub fn true_cfg_enabled(&self) -> Option<TrueCfgSettings> {
        (self.true_cfg.scale > 1.0).then(|| self.true_cfg.clone())
    }

    fn validate(&self, family: &str) -> Result<()> {
        if self.resolution == 0 || !self.resolution.is_multiple_of(16) {
            bail!(
                "generation.{family}.resolution must be a positive multiple of 16 (FLUX packs 2x2 latent patches of 8x8 pixels)"
            );
        }
        if self.steps == 0 {
            bail!("generation.{family}.steps must be at least 1");
        }
        if self.groups_per_object == 0 {
            bail!("generation.{family}.groups_per_object must be at least 1");
        }
        // NaN fails this test too.
        if self.true_cfg.scale.is_nan() || self.true_cfg.scale < 1.0 {
            bail!("generation.{family}.true_cfg.scale must be at least 1 (1 turns true CFG off)");
        }
        if self.true_cfg.scale > 1.0 && self.true_cfg.negative_prompt.trim().is_empty() {
            bail!("generation.{family}.true_cfg needs a negative_prompt when its scale is above 1");
        }
        Ok(())
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            images_per_group: 3,
            rigid: FamilySettings::reference_rigid(),
            deformable: FamilySettings::reference_deformable(),
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

/// Which scoring models the run's filter thresholds are meant for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// The aesthetic predictor `filter.min_aesthetic` is meant for (`linear`, the reference's,
    /// or `mlp`). A worker with the other head fails the run's scoring jobs, naming both, rather
    /// than give scores on another scale; unset, any head scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aesthetic_head: Option<AestheticHead>,
}

/// Retry policy of the run's jobs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobPolicy {
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max_secs`.
    pub backoff_base_secs: f64,
    pub backoff_max_secs: f64,
    /// A running attempt not heard from for this long (no start, heartbeat or result) is presumed
    /// lost, its worker dead or hung, and is retried. Workers heartbeat four times per lease
    /// (at least every 30 s), so a slow job on a live worker is never taken away.
    #[serde(alias = "attempt_timeout_secs")]
    pub lease_secs: u64,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base_secs: 5.0,
            backoff_max_secs: 300.0,
            lease_secs: 120,
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

/// GPU seconds per group that `syncd run plan` multiplies by the number of groups when no
/// measured times are given. The defaults are the FLOP floor on one H100 SXM (790 dense bf16
/// TFLOP/s): about 40 TFLOP per image pass at 512x512 and 151 at 1024x1024, MSA included; a rigid
/// group is 3 images x (30 steps + 29 true-CFG passes), a deformable group 3 images x 50 steps.
/// Scoring (DINOv2-L and CLIP-L on 3 crops) is under a millisecond at that floor. Real times are
/// higher: measure a pilot run and plan with `--measured-from`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EstimateConfig {
    pub rigid_group_seconds: f64,
    pub deformable_group_seconds: f64,
    pub score_group_seconds: f64,
}

impl Default for EstimateConfig {
    fn default() -> Self {
        Self {
            rigid_group_seconds: 9.0,
            deformable_group_seconds: 29.0,
            score_group_seconds: 0.001,
        }
    }
}

/// Input paths given on the command line, which replace the run file's (relative paths are
/// taken from the current folder, as any command-line path). A shipped recipe names its inputs
/// after the files a user downloads; these say where they are on this machine.
#[derive(Clone, Debug, Default)]
pub struct InputOverrides {
    pub objects_file: Option<PathBuf>,
    pub rigid_csv: Option<PathBuf>,
    pub assets_dir: Option<AssetSource>,
}

impl RunConfig {
    /// Reads a run file; relative input paths are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &InputOverrides::default())
    }

    /// Reads a run file and replaces its input paths with those of `overrides`.
    pub fn load_with(path: &Path, overrides: &InputOverrides) -> Result<Self> {
        crate::input::check_size(path, "run file")?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read run file {}", path.display()))?;
        let mut config = Self::from_toml(&text)
            .with_context(|| format!("invalid run file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let folder = match &mut config.input.assets_dir {
            Some(AssetSource::Folder(folder)) => Some(folder),
            _ => None,
        };
        for input_path in [
            config.input.objects_file.as_mut(),
            config.input.rigid_csv.as_mut(),
            folder,
        ]
        .into_iter()
        .flatten()
        {
            if input_path.is_relative() {
                *input_path = base.join(&*input_path);
            }
        }
        for (given, input_path) in [
            (&overrides.objects_file, &mut config.input.objects_file),
            (&overrides.rigid_csv, &mut config.input.rigid_csv),
        ] {
            if let Some(given) = given {
                *input_path = Some(given.clone());
            }
        }
        if let Some(given) = &overrides.assets_dir {
            config.input.assets_dir = Some(given.clone());
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a run file's text over the defaults, field by field: a file that sets one field of
    /// a section (say `generation.rigid.steps`) keeps the defaults of every other field of it,
    /// including the family's own (the rigid true-CFG settings are not lost by setting the
    /// steps). Unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self> {
        use figment::providers::{Format, Serialized, Toml};
        let defaults = serde_json::json!({
            "seed": 0,
            "prompts": PromptConfig::default(),
            "generation": GenerationConfig::default(),
            "prior": PriorConfig::default(),
            "scoring": ScoringConfig::default(),
            "filter": FilterThresholds::default(),
            "jobs": JobPolicy::default(),
            "dataset": DatasetConfig::default(),
            "estimate": EstimateConfig::default(),
        });
        Ok(figment::Figment::from(Serialized::defaults(defaults))
            .merge(Toml::string(text))
            .extract()?)
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
        self.generation.rigid.validate("rigid")?;
        self.generation.deformable.validate("deformable")?;
        if self.generation.rigid.groups_per_object > self.prior.max_triplets {
            bail!(
                "generation.rigid.groups_per_object ({}) is above prior.max_triplets ({}): a rigid asset gets one group per view triplet",
                self.generation.rigid.groups_per_object,
                self.prior.max_triplets
            );
        }
        if self.prompts.rigid_backgrounds == 0
            || self.prompts.category_requests == 0
            || self.prompts.captions_per_request == 0
        {
            bail!("prompts.rigid_backgrounds, category_requests and captions_per_request must be at least 1");
        }
        let mut seen = std::collections::HashSet::new();
        for category in &self.input.categories {
            let category = category.trim();
            if category.is_empty() {
                bail!("input.categories contains an empty category");
            }
            if !seen.insert(category.to_lowercase()) {
                bail!("input.categories names {category:?} twice");
            }
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
        let mut config = RunConfig::from_toml("name = \"ok\"\n[input]\n").unwrap();
        config.validate().unwrap();
        config.name = "a/b".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = RunConfig::from_toml("name = \"x\"\nsede = 3\n[input]\n").unwrap_err();
        assert!(format!("{error:#}").contains("sede"), "{error:#}");
        let error = RunConfig::from_toml("name = \"x\"\n[input]\n[generation.rigid]\nstep = 3\n")
            .unwrap_err();
        assert!(format!("{error:#}").contains("step"), "{error:#}");
    }

    #[test]
    fn an_empty_run_file_has_the_reference_settings() {
        let config = RunConfig::from_toml("name = \"x\"\n[input]\n").unwrap();
        assert_eq!(config.generation.rigid, FamilySettings::reference_rigid());
        assert_eq!(
            config.generation.deformable,
            FamilySettings::reference_deformable()
        );
        assert_eq!(
            config.generation.rigid.true_cfg_enabled(),
            Some(TrueCfgSettings::reference_rigid())
        );
        assert_eq!(config.generation.deformable.true_cfg_enabled(), None);
        assert_eq!(config.generation.rigid.groups_per_object, 2);
        assert_eq!(config.prompts.category_requests, 6);
        assert_eq!(config.prompts.captions_per_request, 25);
        assert_eq!(config.prompts.rigid_backgrounds, 10);
    }

    /// Sets one field of `section` in a run file and returns the parsed configuration.
    fn with_one_field(section: &str, field: &str) -> RunConfig {
        let input = if section == "input" { "" } else { "[input]\n" };
        RunConfig::from_toml(&format!("name = \"x\"\n{input}[{section}]\n{field}\n")).unwrap()
    }

    #[test]
    fn one_rigid_field_keeps_every_other_rigid_default() {
        let reference = FamilySettings::reference_rigid();
        let config = with_one_field("generation.rigid", "steps = 12");
        assert_eq!(
            config.generation.rigid,
            FamilySettings {
                steps: 12,
                ..reference.clone()
            }
        );
        assert_eq!(
            config.generation.deformable,
            FamilySettings::reference_deformable()
        );
        // Nested: one true-CFG field keeps the negative prompt and the first step.
        let config = with_one_field("generation.rigid.true_cfg", "scale = 3.0");
        assert_eq!(config.generation.rigid.true_cfg.scale, 3.0);
        assert_eq!(
            config.generation.rigid.true_cfg.negative_prompt,
            reference.true_cfg.negative_prompt
        );
        assert_eq!(config.generation.rigid.true_cfg.from_step, 1);
        assert_eq!(config.generation.rigid.steps, 30);
        // Scale 1 turns true CFG off.
        let config = with_one_field("generation.rigid.true_cfg", "scale = 1.0");
        assert_eq!(config.generation.rigid.true_cfg_enabled(), None);
    }

    #[test]
    fn one_deformable_field_keeps_every_other_deformable_default() {
        let config = with_one_field("generation.deformable", "resolution = 512");
        assert_eq!(
            config.generation.deformable,
            FamilySettings {
                resolution: 512,
                ..FamilySettings::reference_deformable()
            }
        );
        assert_eq!(config.generation.rigid, FamilySettings::reference_rigid());
        // Raising the scale turns true CFG on with the family's negative prompt.
        let config = with_one_field("generation.deformable.true_cfg", "scale = 2.0");
        let enabled = config.generation.deformable.true_cfg_enabled().unwrap();
        assert_eq!(enabled.scale, 2.0);
        assert_eq!(
            enabled.negative_prompt,
            TrueCfgSettings::reference_rigid().negative_prompt
        );
        assert_eq!(config.generation.deformable.steps, 50);
    }

    #[test]
    fn one_field_of_the_other_sections_keeps_their_defaults() {
        let config = with_one_field("prompts", "category_requests = 2");
        assert_eq!(config.prompts.category_requests, 2);
        assert_eq!(config.prompts.captions_per_request, 25);
        let config = with_one_field("filter", "min_aesthetic = 5.5");
        assert_eq!(
            config.filter,
            FilterThresholds {
                min_aesthetic: 5.5,
                ..FilterThresholds::default()
            }
        );
        let config = with_one_field("generation", "images_per_group = 2");
        assert_eq!(config.generation.images_per_group, 2);
        assert_eq!(config.generation.rigid, FamilySettings::reference_rigid());
    }

    #[test]
    fn inconsistent_settings_are_refused_with_the_field_named() {
        for (section, field, expected) in [
            (
                "generation.rigid",
                "groups_per_object = 3",
                "prior.max_triplets",
            ),
            (
                "generation.deformable",
                "resolution = 1000",
                "multiple of 16",
            ),
            (
                "generation.rigid.true_cfg",
                "negative_prompt = \"\"",
                "negative_prompt",
            ),
            ("generation.rigid.true_cfg", "scale = 0.5", "at least 1"),
            ("input", "categories = [\"Cat\", \"cat\"]", "twice"),
            ("prompts", "category_requests = 0", "category_requests"),
        ] {
            let error = with_one_field(section, field).validate().unwrap_err();
            assert!(
                format!("{error:#}").contains(expected),
                "{field}: {error:#}"
            );
        }
    }

    #[test]
    fn the_demo_run_file_loads_with_the_reference_rigid_guidance() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/run.toml");
        let config = RunConfig::load(&path).unwrap();
        assert_eq!(
            config.generation.rigid.true_cfg_enabled(),
            Some(TrueCfgSettings::reference_rigid())
        );
        assert_eq!(config.generation.deformable.true_cfg_enabled(), None);
    }

    #[test]
    fn the_syncd_recipe_is_the_reference_configuration() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/recipes/syncd.toml");
        let recipe = RunConfig::load(&path).unwrap();
        let defaults = RunConfig::from_toml("name = \"syncd\"\n[input]\n").unwrap();
        assert_eq!(recipe.generation.rigid, defaults.generation.rigid);
        assert_eq!(recipe.generation.deformable, defaults.generation.deformable);
        assert_eq!(recipe.generation.images_per_group, 3);
        assert_eq!(recipe.filter, FilterThresholds::default());
        assert_eq!(
            serde_json::to_value(&recipe.prompts).unwrap(),
            serde_json::to_value(&defaults.prompts).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&recipe.estimate).unwrap(),
            serde_json::to_value(&defaults.estimate).unwrap()
        );
        assert_eq!((recipe.prior.views, recipe.prior.max_triplets), (20, 2));
        assert_eq!(recipe.scoring.aesthetic_head, Some(AestheticHead::Linear));
        let categories = [
            "Hamster",
            "Rabbit",
            "Fox",
            "Parrot",
            "Bird",
            "Squirrel",
            "Cat",
            "Dog",
            "Alpaca",
            "Mouse",
            "Frog",
            "Bear",
            "Woodpecker",
            "Duck",
            "Fish",
            "Monkey",
        ];
        assert_eq!(recipe.input.categories, categories);
        assert_eq!(
            recipe.generation.rigid.true_cfg_enabled(),
            Some(TrueCfgSettings::reference_rigid())
        );
        assert_eq!(recipe.generation.deformable.true_cfg_enabled(), None);
    }

    #[test]
    fn command_line_inputs_replace_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipe.toml");
        std::fs::write(
            &path,
            "name = \"x\"\n[input]\nrigid_csv = \"cap3d.csv\"\nassets_dir = \"glbs\"\n",
        )
        .unwrap();
        let config = RunConfig::load(&path).unwrap();
        assert_eq!(config.input.rigid_csv, Some(dir.path().join("cap3d.csv")));
        assert_eq!(
            config.input.assets_dir,
            Some(AssetSource::Folder(dir.path().join("glbs")))
        );
        let config = RunConfig::load_with(
            &path,
            &InputOverrides {
                assets_dir: Some("/data/objaverse".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            config.input.assets_dir,
            Some(AssetSource::Folder("/data/objaverse".into()))
        );
        // An S3 prefix is not a path: it is not taken relative to the run file.
        std::fs::write(
            &path,
            "name = \"x\"\n[input]\nrigid_csv = \"cap3d.csv\"\nassets_dir = \"s3://work/glbs\"\n",
        )
        .unwrap();
        let config = RunConfig::load(&path).unwrap();
        assert_eq!(
            config.input.assets_dir.map(|source| source.to_string()),
            Some("s3://work/glbs/".to_string())
        );
        assert_eq!(config.input.rigid_csv, Some(dir.path().join("cap3d.csv")));
    }
}
