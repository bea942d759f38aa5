//! Loading checkpoints into a [`tch::nn::VarStore`] without holding the weights twice.
//!
//! A [`Checkpoint`] memory-maps one or more safetensors files (a single file, or a diffusers /
//! transformers folder with sharded files and an index) and reads only their headers. Loading
//! walks the variables a model created, finds each one's source tensor by name through a
//! [`KeyMap`], checks its shape and copies it in, one tensor at a time: the file bytes stay in
//! the page cache (evictable, not anonymous memory), so peak memory is the model plus one tensor.
//!
//! The [`KeyMap`] is how one model struct loads several checkpoint layouts: models name their
//! variables after one layout (the Hugging Face one) and map the others onto it, including
//! fused tensors that must be sliced (BFL's `qkv`) or re-ordered (BFL's final `(shift, scale)`).

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

/// Where one tensor's bytes are in one of the mapped files.
#[derive(Clone, Debug)]
struct TensorLocation {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// A set of memory-mapped safetensors files, indexed by tensor name.
pub struct Checkpoint {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    tensors: BTreeMap<String, TensorLocation>,
}

/// One slice of a source tensor: `narrow(dim, start, len)` of tensor `name`, or the whole tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcePart {
    pub name: String,
    pub narrow: Option<(i64, i64, i64)>,
}

/// Where a model variable comes from: one tensor, a slice of one, or several slices concatenated
/// along `cat_dim`.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub parts: Vec<SourcePart>,
    pub cat_dim: i64,
}

impl Source {
    pub fn whole(name: impl Into<String>) -> Self {
        Self {
            parts: vec![SourcePart {
                name: name.into(),
                narrow: None,
            }],
            cat_dim: 0,
        }
    }

    pub fn slice(name: impl Into<String>, dim: i64, start: i64, len: i64) -> Self {
        Self {
            parts: vec![SourcePart {
                name: name.into(),
                narrow: Some((dim, start, len)),
            }],
            cat_dim: 0,
        }
    }

    pub fn concat(parts: Vec<SourcePart>, cat_dim: i64) -> Self {
        Self { parts, cat_dim }
    }
}

/// Maps a model variable name (as the VarStore names it, `.`-separated) to its source in the
/// checkpoint.
pub type KeyMap<'a> = dyn Fn(&str) -> Source + 'a;

/// The identity mapping: the checkpoint uses the model's own names.
pub fn same_names(name: &str) -> Source {
    Source::whole(name)
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported tensor dtype {other:?}"),
    })
}

impl Checkpoint {
    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut checkpoint = Self {
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        checkpoint.add_file(path)?;
        Ok(checkpoint)
    }

    /// Opens the weights of a Hugging Face model folder: the shards listed in its
    /// `*.safetensors.index.json` if there is one, else every `*.safetensors` file in it.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read model folder {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .collect();
        let index = entries.iter().find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(".safetensors.index.json"))
        });
        let mut files: Vec<PathBuf> = match index {
            Some(index) => {
                #[derive(serde::Deserialize)]
                struct Index {
                    weight_map: HashMap<String, String>,
                }
                let text = std::fs::read_to_string(index)
                    .with_context(|| format!("cannot read {}", index.display()))?;
                let index_data: Index = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a safetensors index", index.display()))?;
                let mut shards: Vec<PathBuf> = index_data
                    .weight_map
                    .values()
                    .map(|file| dir.join(file))
                    .collect();
                shards.sort();
                shards.dedup();
                shards
            }
            None => entries
                .into_iter()
                .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
                .collect(),
        };
        files.sort();
        if files.is_empty() {
            bail!("no safetensors weights in {}", dir.display());
        }
        let mut checkpoint = Self {
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for file in &files {
            checkpoint.add_file(file)?;
        }
        Ok(checkpoint)
    }

    #[allow(unsafe_code)]
    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open weights {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process. A weight file changed on disk
        // while mapped is outside what any loader can defend against; safetensors' own Python
        // loader maps files the same way.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map weights {}", path.display()))?;
        let file_index = self.files.len();
        {
            let parsed = SafeTensors::deserialize(&mmap).with_context(|| {
                format!(
                    "{} is not a valid safetensors file (truncated or corrupt)",
                    path.display()
                )
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in parsed.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let location = TensorLocation {
                    file: file_index,
                    dtype: view.dtype(),
                    shape: view.shape().iter().map(|&d| d as i64).collect(),
                    start,
                    end: start + view.data().len(),
                };
                if self.tensors.insert(name.clone(), location).is_some() {
                    bail!(
                        "tensor {name} appears twice in the checkpoint ({})",
                        path.display()
                    );
                }
            }
        }
        self.files.push((path.to_path_buf(), mmap));
        Ok(())
    }

    /// The names of all tensors in the checkpoint, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a tensor, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors
            .get(name)
            .map(|location| location.shape.as_slice())
    }

    /// Reads one tensor onto the CPU in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let location = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor {name} is missing from the checkpoint"))?;
        let (path, mmap) = &self.files[location.file];
        let bytes = &mmap[location.start..location.end];
        let kind = kind_of(location.dtype)
            .with_context(|| format!("tensor {name} in {}", path.display()))?;
        Tensor::f_from_data_size(bytes, &location.shape, kind)
            .with_context(|| format!("cannot read tensor {name} from {}", path.display()))
    }

    /// Reads the tensor a [`Source`] describes.
    pub fn read_source(&self, source: &Source) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(source.parts.len());
        for part in &source.parts {
            let tensor = self.tensor(&part.name)?;
            let tensor = match part.narrow {
                Some((dim, start, len)) => tensor.f_narrow(dim, start, len).with_context(|| {
                    format!(
                        "tensor {} of shape {:?} has no slice {start}..{} on dim {dim}",
                        part.name,
                        tensor.size(),
                        start + len
                    )
                })?,
                None => tensor,
            };
            parts.push(tensor);
        }
        if parts.len() == 1 {
            Ok(parts.pop().expect("one part"))
        } else {
            Ok(Tensor::f_cat(&parts, source.cat_dim)?)
        }
    }

    /// Copies every variable of `vs` from this checkpoint, converting to the variable's dtype and
    /// device. Fails on the first missing or wrongly-shaped tensor, naming it.
    pub fn load_into(&self, vs: &mut VarStore, map: &KeyMap<'_>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut variable) in variables {
            let source = map(&name);
            let tensor = self
                .read_source(&source)
                .with_context(|| format!("loading model weight {name}"))?;
            let tensor = match same_but_unit_dims(&tensor.size(), &variable.size()) {
                true => tensor.reshape(variable.size()),
                false => tensor,
            };
            if tensor.size() != variable.size() {
                bail!(
                    "weight {name} has shape {:?} in the checkpoint ({}), the model expects {:?}",
                    tensor.size(),
                    source
                        .parts
                        .iter()
                        .map(|part| part.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" + "),
                    variable.size()
                );
            }
            let converted = tensor.to_kind(variable.kind()).to_device(variable.device());
            variable.f_copy_(&converted)?;
        }
        Ok(())
    }
}

/// Whether two different shapes hold the same values laid out alike and differ only by trailing
/// dimensions of size 1: a 1x1 convolution kernel `[out, in, 1, 1]` stored where a linear layer
/// `[out, in]` is expected (the LDM / BFL VAEs' attention projections), or the reverse.
fn same_but_unit_dims(stored: &[i64], expected: &[i64]) -> bool {
    let trim = |shape: &[i64]| -> usize {
        shape.len() - shape.iter().rev().take_while(|&&d| d == 1).count()
    };
    stored != expected && stored[..trim(stored)] == expected[..trim(expected)]
}

/// Reads every tensor of a safetensors file (inputs of the `parity` command, fixtures).
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    let checkpoint = Checkpoint::open_file(path)?;
    checkpoint
        .names()
        .map(|name| Ok((name.to_string(), checkpoint.tensor(name)?)))
        .collect()
}

/// Writes named tensors to a safetensors file (outputs of the `parity` command).
pub fn write_all(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, tensor)| {
            (
                name.clone(),
                tensor.to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&contiguous, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn write_fixture(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("weights.safetensors");
        let named: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(name, tensor)| (name.to_string(), tensor.shallow_clone()))
            .collect();
        write_all(&path, &named).unwrap();
        path
    }

    #[test]
    fn loads_renamed_sliced_and_concatenated_weights() {
        let dir = tempfile::tempdir().unwrap();
        let fused = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([6, 2]);
        let path = write_fixture(dir.path(), &[("qkv", fused.shallow_clone())]);
        let checkpoint = Checkpoint::open_file(&path).unwrap();

        let mut vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let k = root.zeros("k", &[2, 2]);
        let swapped = root.zeros("swapped", &[6, 2]);
        let map = |name: &str| match name {
            "k" => Source::slice("qkv", 0, 2, 2),
            _ => Source::concat(
                vec![
                    SourcePart {
                        name: "qkv".into(),
                        narrow: Some((0, 3, 3)),
                    },
                    SourcePart {
                        name: "qkv".into(),
                        narrow: Some((0, 0, 3)),
                    },
                ],
                0,
            ),
        };
        checkpoint.load_into(&mut vs, &map).unwrap();
        assert!(k.equal(&fused.narrow(0, 2, 2)));
        assert!(swapped.narrow(0, 0, 3).equal(&fused.narrow(0, 3, 3)));
    }

    #[test]
    fn missing_and_misshapen_weights_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(
            dir.path(),
            &[("a", Tensor::zeros([3], (Kind::Float, Device::Cpu)))],
        );
        let checkpoint = Checkpoint::open_file(&path).unwrap();

        let mut vs = VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("a", &[4]);
        let error = checkpoint.load_into(&mut vs, &same_names).unwrap_err();
        assert!(
            format!("{error:#}").contains("weight a has shape [3]"),
            "{error:#}"
        );

        let mut vs = VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("b", &[3]);
        let error = checkpoint.load_into(&mut vs, &same_names).unwrap_err();
        assert!(
            format!("{error:#}").contains("tensor b is missing"),
            "{error:#}"
        );
    }

    #[test]
    fn one_by_one_convolutions_load_into_linear_layers() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([3, 2, 1, 1]);
        let path = write_fixture(dir.path(), &[("proj", kernel.shallow_clone())]);
        let checkpoint = Checkpoint::open_file(&path).unwrap();
        let mut vs = VarStore::new(Device::Cpu);
        let linear = vs.root().zeros("proj", &[3, 2]);
        checkpoint.load_into(&mut vs, &same_names).unwrap();
        assert!(linear.equal(&kernel.reshape([3, 2])));

        let mut vs = VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("proj", &[2, 3]);
        let error = checkpoint.load_into(&mut vs, &same_names).unwrap_err();
        assert!(
            format!("{error:#}").contains("weight proj has shape [3, 2, 1, 1]"),
            "{error:#}"
        );
    }

    #[test]
    fn truncated_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_fixture(
            dir.path(),
            &[("a", Tensor::zeros([64], (Kind::Float, Device::Cpu)))],
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let error = Checkpoint::open_file(&path)
            .err()
            .expect("truncated file must fail");
        assert!(
            format!("{error:#}").contains("truncated or corrupt"),
            "{error:#}"
        );
    }
}
