//! The database layer: one module per table, owning every statement on it, each statement checked
//! at compile time against the schema (`sqlx::query!` and its kin, described in `.sqlx/`).
//!
//! The PostgreSQL pool. Migrations (the `migrations/` folder at the repository root, embedded at
//! build time) run on every connect: sqlx takes an advisory lock while migrating, so several
//! coordinators or CLI calls starting at once do not race.

pub mod dead_letters;
pub mod groups;
pub mod jobs;
pub mod objects;
pub mod outbox;
pub mod run_tallies;
pub mod runs;

use crate::config::DatabaseConfig;
use anyhow::{Context, Result};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(config: &DatabaseConfig) -> Result<PgPool> {
    let options =
        PgConnectOptions::from_str(config.url.expose_secret()).context("invalid database.url")?;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .context("cannot connect to PostgreSQL (check database.url)")?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    Ok(pool)
}

/// Whether the server vacuums on its own (`autovacuum`, on unless its operator turned it off).
/// Every job transition leaves a dead row in `jobs` and every decision one in `groups`; without
/// vacuuming, the statements that read the jobs in flight and the gauges slow down as a run
/// grows (at 150K jobs: 150 ms per in-flight count, 0.5 s per gauge).
pub async fn autovacuum_on(pool: &PgPool) -> Result<bool> {
    let setting = sqlx::query_scalar!(r#"SELECT current_setting('autovacuum') AS "setting!""#)
        .fetch_one(pool)
        .await
        .context("reading the server's autovacuum setting")?;
    Ok(setting == "on")
}
