//! The worker binary's commands besides `run`: tools people use to check and prepare models.

pub mod encoders_parity;
pub mod parity;
