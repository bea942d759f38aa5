//! Keeps `libtorch_cuda.so` among the binary's dynamic dependencies, and records the commit the
//! worker is built from (`SYNCD_GIT_COMMIT`, part of every result's provenance).
//!
//! The linker's `--as-needed` drops libraries no symbol is taken from, and nothing in the Rust
//! code names a CUDA symbol directly: without this, a worker built against a CUDA-enabled
//! libtorch starts on a GPU machine and reports CUDA as unavailable.

use std::path::PathBuf;

fn main() {
    println!(
        "cargo:rustc-env=SYNCD_GIT_COMMIT={}",
        git_commit().unwrap_or_else(|| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if let Some(lib_dir) = torch_lib_dir() {
        if lib_dir.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-search=native={}", lib_dir.display());
            println!(
                "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state"
            );
        }
    }
}

/// The libtorch library folder torch-sys links against: `$LIBTORCH/lib`, or the one of the
/// Python `torch` package when `LIBTORCH_USE_PYTORCH` is set (found via `DEP_TCH_LIBTORCH_LIB`
/// when torch-sys exports it, else by asking Python).
fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    std::env::var_os("LIBTORCH_USE_PYTORCH")?;
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let output = std::process::Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// The commit being built: `SYNCD_GIT_COMMIT` when the build sets it (an image built without
/// `.git`), else `git rev-parse HEAD`. The build script runs again when HEAD moves to another
/// commit (the branch's ref file, or HEAD itself when detached).
fn git_commit() -> Option<String> {
    println!("cargo:rerun-if-env-changed=SYNCD_GIT_COMMIT");
    if let Ok(commit) = std::env::var("SYNCD_GIT_COMMIT") {
        return Some(commit);
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A worktree keeps its HEAD apart, but branches live in the common folder.
        let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
            .map_or(git_dir.clone(), PathBuf::from);
        for watched in [common.join(&branch), common.join("packed-refs")] {
            if watched.exists() {
                println!("cargo:rerun-if-changed={}", watched.display());
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
