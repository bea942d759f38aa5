//! The worker binary's commands besides `run`: tools people use to check and prepare models.

pub mod parity;
