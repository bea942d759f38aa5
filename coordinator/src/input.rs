//! Reading a run's inputs: ready-made objects (JSON lines), Cap3D-style CSV rows of rigid
//! objects, and deformable categories. Every problem names the file and line.

use crate::run_config::RunConfig;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a run's rigid assets (`{uid}.glb`) are: a local folder, uploaded into the run's prefix
/// when the run is created, or a prefix of the working bucket (`s3://BUCKET/PREFIX`), where
/// they stay and are read from by every run that names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AssetSource {
    Folder(PathBuf),
    Stored(StoredAssets),
}

/// A prefix of an S3 bucket holding `{uid}.glb` files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAssets {
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
}

impl StoredAssets {
    /// The key of `uid`'s asset.
    pub fn key(&self, uid: &str) -> String {
        format!("{}{uid}.glb", self.prefix)
    }
}

impl fmt::Display for StoredAssets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

impl FromStr for AssetSource {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let Some(location) = text.strip_prefix("s3://") else {
            return Ok(AssetSource::Folder(PathBuf::from(text)));
        };
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            bail!("{text:?} names no bucket (expected s3://BUCKET/PREFIX)");
        }
        let prefix = prefix.trim_start_matches('/');
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        Ok(AssetSource::Stored(StoredAssets {
            bucket: bucket.to_string(),
            prefix,
        }))
    }
}

impl TryFrom<String> for AssetSource {
    type Error = anyhow::Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<AssetSource> for String {
    fn from(source: AssetSource) -> String {
        source.to_string()
    }
}

impl fmt::Display for AssetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssetSource::Folder(path) => write!(f, "{}", path.display()),
            AssetSource::Stored(stored) => stored.fmt(f),
        }
    }
}

/// A rigid object's asset: a local file to upload, or the key of one already in the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asset {
    File(PathBuf),
    Stored(String),
}

/// The keys found under a stored assets prefix, listed by the caller (which holds the bucket);
/// `None` where they were not listed, and every stored asset is taken as present.
pub type ListedAssets<'a> = Option<&'a HashSet<String>>;

/// One object of a run before it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedObject {
    pub family: Family,
    /// Ready-made background captions; `None` sends the object through the LLM prompt stage
    /// (a deformable object's description comes from there too).
    pub backgrounds: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Family {
    Rigid {
        uid: String,
        caption: String,
        asset: Asset,
    },
    Deformable {
        category: String,
        /// Empty until the LLM's descriptions of the category are handed out (or from the
        /// input file).
        description: String,
    },
}

/// A line of the ready-made objects file.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ReadyObject {
    Rigid {
        uid: String,
        caption: String,
        backgrounds: Vec<String>,
    },
    Deformable {
        category: String,
        description: String,
        backgrounds: Vec<String>,
    },
}

/// Objaverse UIDs are hex strings; anything else could escape the assets folder or an S3 key.
fn check_uid(uid: &str) -> Result<()> {
    if uid.is_empty()
        || !uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid object uid {uid:?} (expected letters, digits, '-' or '_')");
    }
    Ok(())
}

/// What to do with a rigid object whose asset file is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingAssets {
    /// Creating a run: a missing asset is an error naming the file and line.
    Refuse,
    /// Planning a run: the object is left out and counted, so the plan says how many are missing.
    Count,
}

/// Every object of a run's inputs, and the uids of rigid objects left out for a missing asset.
#[derive(Debug, Default)]
pub struct RunInputs {
    pub objects: Vec<PlannedObject>,
    pub missing_assets: Vec<String>,
}

/// Reads every object the run's configuration names, in input order; a missing asset is an
/// error.
pub fn read_objects(config: &RunConfig, listed: ListedAssets) -> Result<Vec<PlannedObject>> {
    Ok(read_inputs(config, MissingAssets::Refuse, listed)?.objects)
}

/// Reads every object the run's configuration names, in input order.
pub fn read_inputs(
    config: &RunConfig,
    missing: MissingAssets,
    listed: ListedAssets,
) -> Result<RunInputs> {
    let mut inputs = RunInputs::default();
    let assets = Assets {
        config,
        missing,
        listed,
    };
    if let Some(path) = &config.input.objects_file {
        read_ready_objects(&assets, path, &mut inputs)?;
    }
    if let Some(path) = &config.input.rigid_csv {
        read_rigid_csv(&assets, path, &mut inputs)?;
    }
    // RunConfig::validate refuses empty and repeated categories.
    for category in &config.input.categories {
        let category = category.trim();
        for _ in 0..config.input.objects_per_category {
            inputs.objects.push(PlannedObject {
                family: Family::Deformable {
                    category: category.to_string(),
                    description: String::new(),
                },
                backgrounds: None,
            });
        }
    }
    if inputs.objects.is_empty() && inputs.missing_assets.is_empty() {
        bail!("the run names no objects (set input.objects_file, input.rigid_csv or input.categories)");
    }
    Ok(inputs)
}

/// How a read finds rigid objects' assets.
struct Assets<'a> {
    config: &'a RunConfig,
    missing: MissingAssets,
    listed: ListedAssets<'a>,
}

impl Assets<'_> {
    /// Where `uid`'s asset is: `Ok(None)` when it is missing and `missing` says to count it
    /// (the uid is then recorded in `inputs`).
    fn find(&self, uid: &str, inputs: &mut RunInputs) -> Result<Option<Asset>> {
        let source = self
            .config
            .input
            .assets_dir
            .as_ref()
            .context("rigid objects need input.assets_dir")?;
        let (asset, found, place) = match source {
            AssetSource::Folder(dir) => {
                let path = dir.join(format!("{uid}.glb"));
                let found = path.is_file();
                let place = path.display().to_string();
                (Asset::File(path), found, place)
            }
            AssetSource::Stored(stored) => {
                let key = stored.key(uid);
                let found = self.listed.is_none_or(|keys| keys.contains(&key));
                let place = format!("s3://{}/{key}", stored.bucket);
                (Asset::Stored(key), found, place)
            }
        };
        if found {
            return Ok(Some(asset));
        }
        match self.missing {
            MissingAssets::Refuse => bail!("asset of rigid object {uid} not found at {place}"),
            MissingAssets::Count => {
                inputs.missing_assets.push(uid.to_string());
                Ok(None)
            }
        }
    }
}

/// Largest input file a run reads. The reference's inputs are tens of megabytes (Cap3D captions
/// of 76K assets); anything far larger is a wrong file, refused before it is read into memory.
pub const MAX_INPUT_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// Refuses an input file larger than [`MAX_INPUT_FILE_BYTES`].
pub fn check_size(path: &Path, what: &str) -> Result<()> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?
        .len();
    if size > MAX_INPUT_FILE_BYTES {
        bail!(
            "{what} {} is {size} bytes, more than the {MAX_INPUT_FILE_BYTES} bytes an input may have",
            path.display()
        );
    }
    Ok(())
}

fn read_ready_objects(assets: &Assets, path: &Path, inputs: &mut RunInputs) -> Result<()> {
    check_size(path, "objects file")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read objects file {}", path.display()))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let place = || format!("{}:{}", path.display(), number + 1);
        let ready: ReadyObject =
            serde_json::from_str(line).with_context(|| format!("{}: invalid object", place()))?;
        let object = match ready {
            ReadyObject::Rigid {
                uid,
                caption,
                backgrounds,
            } => {
                check_uid(&uid).with_context(place)?;
                let Some(asset) = assets.find(&uid, inputs).with_context(place)? else {
                    continue;
                };
                PlannedObject {
                    family: Family::Rigid {
                        asset,
                        uid,
                        caption,
                    },
                    backgrounds: Some(backgrounds),
                }
            }
            ReadyObject::Deformable {
                category,
                description,
                backgrounds,
            } => {
                if description.trim().is_empty() {
                    bail!("{}: a deformable object needs a description", place());
                }
                PlannedObject {
                    family: Family::Deformable {
                        category,
                        description,
                    },
                    backgrounds: Some(backgrounds),
                }
            }
        };
        if object.backgrounds.as_ref().is_some_and(Vec::is_empty) {
            bail!(
                "{}: an object with ready-made prompts needs at least one background",
                place()
            );
        }
        inputs.objects.push(object);
    }
    Ok(())
}

fn read_rigid_csv(assets: &Assets, path: &Path, inputs: &mut RunInputs) -> Result<()> {
    check_size(path, "rigid CSV")?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    for (number, record) in reader.records().enumerate() {
        let place = || format!("{}:{}", path.display(), number + 1);
        let record = record.with_context(place)?;
        let (Some(uid), Some(caption)) = (record.get(0), record.get(1)) else {
            bail!("{}: expected `uid,caption`", place());
        };
        let (uid, caption) = (uid.trim(), caption.trim());
        if number == 0 && uid.eq_ignore_ascii_case("uid") {
            continue;
        }
        check_uid(uid).with_context(place)?;
        if caption.is_empty() {
            bail!("{}: object {uid} has an empty caption", place());
        }
        let Some(asset) = assets.find(uid, inputs).with_context(place)? else {
            continue;
        };
        inputs.objects.push(PlannedObject {
            family: Family::Rigid {
                uid: uid.to_string(),
                caption: caption.to_string(),
                asset,
            },
            backgrounds: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_config::InputConfig;

    fn config(input: InputConfig) -> RunConfig {
        let mut config = RunConfig::from_toml("name = \"t\"\n[input]\n").unwrap();
        config.input = input;
        config
    }

    #[test]
    fn reads_all_three_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("abc123.glb"), b"glb").unwrap();
        std::fs::write(dir.path().join("objects.jsonl"), "{\"type\":\"deformable\",\"category\":\"Cat\",\"description\":\"a tabby\",\"backgrounds\":[\"a sofa\"]}\n\n").unwrap();
        std::fs::write(
            dir.path().join("cap3d.csv"),
            "uid,caption\nabc123,\"a chair, wooden\"\n",
        )
        .unwrap();
        let objects = read_objects(
            &config(InputConfig {
                objects_file: Some(dir.path().join("objects.jsonl")),
                rigid_csv: Some(dir.path().join("cap3d.csv")),
                assets_dir: Some(AssetSource::Folder(dir.path().to_path_buf())),
                categories: vec!["Dog".into()],
                objects_per_category: 2,
            }),
            None,
        )
        .unwrap();
        assert_eq!(objects.len(), 4);
        assert!(
            matches!(&objects[1].family, Family::Rigid { caption, .. } if caption == "a chair, wooden")
        );
        assert!(objects[2].backgrounds.is_none());
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("objects.jsonl"),
            "{\"type\":\"deformable\"}\n",
        )
        .unwrap();
        let error = read_objects(
            &config(InputConfig {
                objects_file: Some(dir.path().join("objects.jsonl")),
                ..Default::default()
            }),
            None,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("objects.jsonl:1"),
            "{error:#}"
        );

        std::fs::write(dir.path().join("cap3d.csv"), "../../etc/passwd,evil\n").unwrap();
        let error = read_objects(
            &config(InputConfig {
                rigid_csv: Some(dir.path().join("cap3d.csv")),
                assets_dir: Some(AssetSource::Folder(dir.path().to_path_buf())),
                ..Default::default()
            }),
            None,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("invalid object uid"),
            "{error:#}"
        );
    }

    #[test]
    fn a_plan_counts_missing_assets_where_a_run_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("here.glb"), b"glb").unwrap();
        std::fs::write(dir.path().join("cap3d.csv"), "here,a lamp\ngone,a vase\n").unwrap();
        let config = config(InputConfig {
            rigid_csv: Some(dir.path().join("cap3d.csv")),
            assets_dir: Some(AssetSource::Folder(dir.path().to_path_buf())),
            ..Default::default()
        });
        let inputs = read_inputs(&config, MissingAssets::Count, None).unwrap();
        assert_eq!(inputs.objects.len(), 1);
        assert_eq!(inputs.missing_assets, ["gone"]);
        let error = read_objects(&config, None).unwrap_err();
        assert!(format!("{error:#}").contains("cap3d.csv:2"), "{error:#}");
    }

    #[test]
    fn stored_assets_are_keys_under_their_prefix_and_checked_against_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cap3d.csv"),
            "here,a lamp
gone,a vase
",
        )
        .unwrap();
        let source: AssetSource = "s3://work/objaverse/glbs".parse().unwrap();
        assert_eq!(source.to_string(), "s3://work/objaverse/glbs/");
        let config = config(InputConfig {
            rigid_csv: Some(dir.path().join("cap3d.csv")),
            assets_dir: Some(source),
            ..Default::default()
        });
        let listed: HashSet<String> = ["objaverse/glbs/here.glb".to_string()].into();
        let inputs = read_inputs(&config, MissingAssets::Count, Some(&listed)).unwrap();
        assert_eq!(inputs.missing_assets, ["gone"]);
        assert!(matches!(
            &inputs.objects[0].family,
            Family::Rigid { asset: Asset::Stored(key), .. } if key == "objaverse/glbs/here.glb"
        ));
        let error = read_objects(&config, Some(&listed)).unwrap_err();
        assert!(
            format!("{error:#}").contains("cap3d.csv:2")
                && format!("{error:#}").contains("s3://work/objaverse/glbs/gone.glb"),
            "{error:#}"
        );
        // Not listed (a plan without the bucket): every stored asset is taken as present.
        assert_eq!(read_objects(&config, None).unwrap().len(), 2);

        let bare: AssetSource = "s3://work".parse().unwrap();
        assert_eq!(bare.to_string(), "s3://work/");
        assert!("s3:///glbs".parse::<AssetSource>().is_err());
        assert_eq!(
            "glbs".parse::<AssetSource>().unwrap(),
            AssetSource::Folder("glbs".into())
        );
    }
}
