//! Fuzzes the asset loader: any bytes must give a mesh or a `PriorError`, never a panic, a hang or
//! an allocation beyond what the input justifies. Inputs that load are also normalised, since a
//! mesh that loads must be usable. The seed corpus (see `scripts/fuzz.sh`) holds valid GLB and
//! glTF files so the fuzzer starts from the interesting part of the format.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_prior::loader::{load_bytes, ExternalBuffers, LoadLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run fast; the checks they exercise are the same.
    let limits = LoadLimits {
        max_triangles: 200_000,
        max_vertices: 200_000,
        ..LoadLimits::default()
    };
    if let Ok(mut asset) = load_bytes(data, ExternalBuffers::Refuse, &limits) {
        let _ = asset.mesh.normalise();
    }
});
