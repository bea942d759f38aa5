//! What a worker computes with, as its results say: each loaded model named with a content hash
//! of its weights, the device and precision, and the code version. The coordinator keeps this
//! with every generated and scored group (its lineage), so a regeneration that differs can be
//! told apart from one made with other weights or other code.
//!
//! A model's hash is BLAKE3 (memory-mapped, on every core: a FLUX folder holds tens of GB, and
//! this runs once at start-up):
//! - of the file, for a single-file checkpoint;
//! - for a folder, of the list of its regular files, one line `{relative path}\0{file hash}\n`
//!   each, in byte order of the paths. Symbolic links are followed, as a Hugging Face cache's
//!   snapshot folders are links into its blob store; hidden entries (`.git`, `.cache`) are
//!   skipped, since they are not weights.

use anyhow::{Context, Result};
use std::path::Path;
use syncd_proto::lineage::ModelIdentity;

/// The worker's version and the commit it was built from (`build.rs`).
pub const CODE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("SYNCD_GIT_COMMIT"));

/// Identifies the model `name` loaded from `path` (a file or a folder).
pub fn identify(name: &str, path: &Path) -> Result<ModelIdentity> {
    let started = std::time::Instant::now();
    let content_hash = content_hash(path)
        .with_context(|| format!("hashing the weights of {name} ({})", path.display()))?;
    tracing::info!(
        model = name,
        path = %path.display(),
        %content_hash,
        seconds = started.elapsed().as_secs_f64(),
        "model identified"
    );
    let source = path
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        .or_else(|| path.file_name())
        .map(|source| source.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ModelIdentity {
        name: name.to_string(),
        source,
        content_hash,
    })
}

/// `blake3:` and the hex hash of a file, or of a folder's file list (see the module's comment).
pub fn content_hash(path: &Path) -> Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let hash = if metadata.is_dir() {
        let mut listing = blake3::Hasher::new();
        let files = walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|entry| entry.depth() == 0 || !is_hidden(entry.file_name()));
        let mut relative_paths = Vec::new();
        for entry in files {
            let entry = entry.with_context(|| format!("listing {}", path.display()))?;
            if entry.file_type().is_file() {
                let relative = entry
                    .path()
                    .strip_prefix(path)?
                    .to_string_lossy()
                    .into_owned();
                relative_paths.push((relative, entry.into_path()));
            }
        }
        // Sorted by the whole relative path's bytes, whatever order the walk gave.
        relative_paths.sort();
        for (relative, file) in relative_paths {
            listing.update(relative.as_bytes());
            listing.update(b"\0");
            listing.update(file_hash(&file)?.to_hex().as_bytes());
            listing.update(b"\n");
        }
        listing.finalize()
    } else {
        file_hash(path)?
    };
    Ok(format!("blake3:{}", hash.to_hex()))
}

fn file_hash(file: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(file)
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(hasher.finalize())
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_hash_follows_its_files_and_their_names_but_not_hidden_ones() {
        let folder = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = folder.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        write("config.json", b"{}");
        write("transformer/model.safetensors", b"weights");
        let first = content_hash(folder.path()).unwrap();
        assert!(
            first.starts_with("blake3:") && first.len() == 7 + 64,
            "{first}"
        );
        // The same content elsewhere hashes the same.
        let copy = tempfile::tempdir().unwrap();
        std::fs::write(copy.path().join("config.json"), b"{}").unwrap();
        std::fs::create_dir(copy.path().join("transformer")).unwrap();
        std::fs::write(
            copy.path().join("transformer/model.safetensors"),
            b"weights",
        )
        .unwrap();
        assert_eq!(content_hash(copy.path()).unwrap(), first);
        // Hidden entries are not weights.
        write(".cache/lock", b"anything");
        assert_eq!(content_hash(folder.path()).unwrap(), first);
        // One byte of one file, or a file's name, changes it.
        write("transformer/model.safetensors", b"weightz");
        let changed = content_hash(folder.path()).unwrap();
        assert_ne!(changed, first);
        std::fs::rename(
            folder.path().join("transformer/model.safetensors"),
            folder.path().join("transformer/other.safetensors"),
        )
        .unwrap();
        assert_ne!(content_hash(folder.path()).unwrap(), changed);
        // A single file is hashed as itself.
        let file = folder.path().join("config.json");
        assert_eq!(
            content_hash(&file).unwrap(),
            format!("blake3:{}", blake3::hash(b"{}").to_hex())
        );
        assert!(content_hash(&folder.path().join("missing")).is_err());
    }
}
