//! Helpers for the end-to-end tests: each test gets its own database, queue prefix and bucket on
//! the real PostgreSQL, RabbitMQ and Garage of this machine, and starts the real coordinator and
//! worker binaries against them.
//!
//! Connection settings come from the environment that `scripts/test.sh` sets up
//! (`SYNCD_TEST_*`, written by `scripts/setup.sh`), with loopback defaults.

pub mod env;
pub mod processes;
