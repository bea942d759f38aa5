//! The syncd worker: pulls jobs from RabbitMQ, runs them, uploads outputs to S3 and reports back.
//!
//! # Layout
//!
//! - [`service`]: the job loop (consume, report `Started`, run, report the outcome, ack).
//! - [`runner`]: the [`runner::JobRunner`] interface every job kind implements.
//! - [`jobs`]: the real runners, one per job kind; [`prompt`] is the LLM prompt stage.
//! - [`pipelines`]: the models of `syncd-models` combined into generation; [`scoring`] into
//!   the scorer.
//! - [`commands`]: the binary's tools besides `run` (`parity`, ...).
//! - [`config`], [`device`]: configuration, device and dtype selection.

pub mod commands;
pub mod config;
pub mod device;
pub mod heartbeat;
pub mod identity;
pub mod jobs;
pub mod pipelines;
pub mod prompt;
pub mod runner;
pub mod scoring;
pub mod service;
