//! The syncd worker: pulls jobs from RabbitMQ, runs them, uploads outputs to S3 and reports back.

pub mod commands;
pub mod device;
pub mod models;
pub mod pipelines;
