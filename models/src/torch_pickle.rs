//! Reading a state dict saved by `torch.save` without Python and without executing pickle code.
//!
//! Why not libtorch: tch's `Tensor::loadz_multi` goes through libtorch's TorchScript unpickler,
//! which turns the `collections.OrderedDict` every `module.state_dict()` is into `None` (it only
//! expects one as a tensor's empty backward hooks), so a real state dict fails to load.
//!
//! The file is read by `pytorch-reader` (Burn's checkpoint reader): it runs the pickle machine
//! itself, builds only containers and tensor views of storages, refuses any other callable, and
//! checks that every tensor fits its storage before its bytes are read.

use anyhow::{bail, Context, Result};
use pytorch_reader::{DType, PytorchReader};
use std::path::Path;
use tch::{Kind, Tensor};

/// The tensors of a `torch.save(state_dict)` file, by name (sorted), on the CPU in their saved
/// dtype. Entries that are not tensors (a `_metadata` attribute, plain numbers) are skipped.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let reader = PytorchReader::new(path)
        .with_context(|| format!("{} is not a PyTorch checkpoint", path.display()))?;
    let mut entries: Vec<_> = reader.into_tensors().into_iter().collect();
    entries.sort_by(|(a, _), (b, _)| a.cmp(b));
    entries
        .into_iter()
        .map(|(name, tensor)| {
            let kind = match tensor.dtype() {
                DType::F64 => Kind::Double,
                DType::F32 => Kind::Float,
                DType::F16 => Kind::Half,
                DType::BF16 => Kind::BFloat16,
                DType::I64 => Kind::Int64,
                DType::I32 => Kind::Int,
                DType::I16 => Kind::Int16,
                DType::I8 => Kind::Int8,
                DType::U8 => Kind::Uint8,
                DType::Bool => Kind::Bool,
                other => bail!("tensor {name} has dtype {other:?}, which libtorch cannot hold"),
            };
            let shape: Vec<i64> = tensor.shape().iter().map(|&extent| extent as i64).collect();
            let bytes = tensor
                .read()
                .with_context(|| format!("reading tensor {name} of {}", path.display()))?;
            let tensor = Tensor::f_from_data_size(&bytes, &shape, kind)
                .with_context(|| format!("tensor {name} of {}", path.display()))?;
            Ok((name, tensor))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A `torch.save`-shaped archive whose pickle is `pickle` (no storages).
    fn archive_with(pickle: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/version", options).unwrap();
        zip.write_all(b"3\n").unwrap();
        zip.finish().unwrap();
        file
    }

    #[test]
    fn refuses_to_call_anything_but_tensor_rebuilds() {
        // GLOBAL os.system, EMPTY_TUPLE, REDUCE, STOP.
        let file = archive_with(b"\x80\x02cos\nsystem\n)R.");
        assert!(read_state_dict(file.path()).is_err());
    }

    #[test]
    fn plain_values_are_skipped_and_truncation_is_an_error() {
        // A dict {'a': (1, -2, 300)}: EMPTY_DICT MARK 'a' MARK 1 -2 300 TUPLE SETITEMS STOP.
        let pickle = b"\x80\x02}(X\x01\x00\x00\x00a(K\x01J\xfe\xff\xff\xffM\x2c\x01tu.";
        let file = archive_with(pickle);
        assert!(read_state_dict(file.path()).unwrap().is_empty());
        let truncated = archive_with(&pickle[..pickle.len() - 3]);
        assert!(read_state_dict(truncated.path()).is_err());
        let not_a_zip = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_a_zip.path(), b"not a checkpoint").unwrap();
        let error = read_state_dict(not_a_zip.path()).unwrap_err();
        assert!(
            format!("{error:#}").contains("is not a PyTorch checkpoint"),
            "{error:#}"
        );
    }
}
