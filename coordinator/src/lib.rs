//! The syncd coordinator: keeps all job state in PostgreSQL, publishes jobs to RabbitMQ through
//! a transactional outbox, applies worker reports, decides which groups enter the dataset, and
//! writes the dataset's shards to S3 as groups are accepted.
//!
//! # Layout
//!
//! - [`config`]: the service configuration (figment: TOML + `SYNCD_` environment).
//! - [`run_config`], [`input`]: a run's configuration file and its inputs.
//! - [`state`]: the job, run and object state machines.
//! - [`jobs`]: the job table: insert, lock, transition (with history).
//! - [`planner`]: runs into objects and jobs; each result into the next stage.
//! - [`plan`]: what a run file would create (`syncd run plan`), without creating it.
//! - [`results`]: applying worker reports, the filter decision; [`near_duplicates`]: the index
//!   of accepted groups that near-duplicates are looked up in.
//! - [`dispatcher`], [`relay`], [`reaper`], [`dead_letters`], [`dataset`] (its `packing`: the
//!   dataset shards written as groups are accepted): the background loops, run by [`service`] while this coordinator leads ([`leadership`]: one
//!   leader, standbys take over).
//! - [`leftovers`]: files in S3 that nothing refers to; failed groups' files are removed.
//! - [`groups`]: the record of a group; [`sheets`]: contact sheets and grids drawn from it;
//!   [`pictures`]: sheets of decided groups in S3 (a loop), sheets and grids for the CLI;
//!   [`gallery`]: the read-only web gallery.
//! - [`regenerations`]: `syncd group regenerate`, a group generated again from its lineage and
//!   compared with its images.
//! - [`outages`]: the outages the factory waited out (`outages` table).
//! - [`admin`]: the operations of the `syncd` CLI; [`export`]: `syncd run export`, a finished
//!   dataset in another layout.
//! - [`metrics`]: Prometheus gauges.
//!
//! **Architecture invariant:** the coordinator never assumes a worker finishes, answers once, or
//! answers in order. A report counts only for the attempt the job awaits and only while the job
//! is in flight; everything else is recorded and ignored.

pub mod admin;
pub mod config;
pub mod dataset;
pub mod db;
pub mod dead_letters;
pub mod dispatcher;
pub mod export;
pub mod gallery;
pub mod groups;
pub mod input;
pub mod leadership;
pub mod leftovers;
pub mod metrics;
pub mod near_duplicates;
pub mod outages;
pub mod pictures;
pub mod plan;
pub mod planner;
pub mod progress;
pub mod reaper;
pub mod regenerations;
pub mod relay;
pub mod results;
pub mod run_config;
pub mod service;
pub mod sheets;
pub mod state;
pub mod workers;
