//! The 3D prior of rigid objects (see `../shared` pipeline section B in ARCHITECTURE.md):
//! everything a worker computes from a GLB asset before generation, in plain Rust on the CPU.
