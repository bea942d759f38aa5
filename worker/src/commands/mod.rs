//! The worker binary's commands besides `run`: tools people use to check and prepare models.

pub mod bench;
pub mod bench_group;
pub mod bench_msa;
pub mod convert_aesthetic;
pub mod encoders_parity;
pub mod flux_parity;
pub mod parity;
pub mod parity_scoring;
