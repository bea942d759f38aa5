//! Helpers for the end-to-end tests: each test gets its own database, queue prefix and bucket on
//! the real PostgreSQL, RabbitMQ and Garage of this machine, and starts the real coordinator and
//! worker binaries against them.
//!
//! - [`env`]: a test's private database, queue prefix and bucket, and its configuration files.
//! - [`processes`]: starting the real binaries and waiting on them.
//! - [`shipped`]: the shipped coordinator and `syncd-worker` (with the demo's tiny models).
//! - [`factory`]: a whole factory (coordinator and test workers) and what to count in it.
//! - [`fake_llm`]: a fake OpenAI-compatible chat-completions server for the prompt stage.
//! - [`fault_proxy`]: a loopback TCP proxy that cuts, delays, throttles or partitions a service.
//! - [`python`]: the tests' Python scripts, run with the set-up's venv.
//! - [`prometheus`]: a real Prometheus scraping a test's factory, queried as Grafana queries it.
//! - [`otlp`]: a test-only OTLP trace receiver, to follow traces across the processes.
//! - [`synthetic`]: runs and groups written straight into the database, and unit vectors shaped
//!   like embeddings, for tests and benchmarks of the coordinator's database code.
//!
//! Connection settings come from the environment that `scripts/test.sh` sets up
//! (`SYNCD_TEST_*`, written by `scripts/setup.sh`), with loopback defaults.

pub mod env;
pub mod factory;
pub mod fake_llm;
pub mod fault_proxy;
pub mod otlp;
pub mod processes;
pub mod prometheus;
pub mod python;
pub mod shipped;
pub mod synthetic;
