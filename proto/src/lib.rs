//! Wire types shared by the syncd coordinator and its workers.
//!
//! # Layout
//!
//! - [`ids`]: one newtype per identifier, so a job id can never be passed where a group id is meant.
//! - [`messages`]: the versioned job and result messages that travel through RabbitMQ.
//! - [`keys`]: the S3 key layout; every object the factory writes has its key built here.
//! - [`correspondence`]: the binary format of a prior triplet's pixel correspondences.
//! - [`dataset`]: the per-group record of the finished dataset.
//! - [`lineage`]: what made a group: its generation settings, models (with weight hashes) and code.
//! - [`filter`]: the rule that decides whether a scored group enters the dataset.
//! - [`dedup`]: near-duplicate detection of a scored group against the accepted ones.
//!
//! This crate is the only place where serde derives on wire types live: the coordinator and the
//! worker agree on a message only through the types defined here.

pub mod correspondence;
pub mod dataset;
pub mod dedup;
pub mod filter;
pub mod ids;
pub mod keys;
pub mod lineage;
pub mod messages;

pub use ids::{GroupId, JobId, ObjectId, RunId};
