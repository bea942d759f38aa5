//! The `run_tallies` table and its queue of changes, `run_tally_changes`: each run's jobs per route
//! and state and groups per decision, so that the gauges and the dispatcher read a few rows per
//! run instead of counting jobs and groups in their tables: a count there reads an index entry for
//! every row version vacuum has not removed yet, which a long run adds faster than it removes them
//! (a million entries per gauge refresh at 500K objects).
//!
//! The `jobs` and `groups` tables' triggers (migration `run_tallies`) append every change of a
//! count to the queue, so no writer can forget to count; [`fold`] is the only statement that
//! moves changes into the tallies.

use anyhow::{Context, Result};
use sqlx::PgPool;
use std::collections::HashMap;
use syncd_proto::messages::Route;

/// The subject of the groups' tallies; a job route's tallies have the route's name
/// ([`Route::as_str`]), and a kind's are the sum of its routes'.
pub const GROUPS: &str = "groups";

/// Adds the committed changes to the tallies and deletes them, in one statement. A change is
/// counted once whichever coordinator folds it: a concurrent fold skips the changes this one
/// deleted. The changes of a run deleted meanwhile are dropped with it. Returns how many
/// changes were folded.
pub async fn fold(pool: &PgPool) -> Result<u64> {
    let folded = sqlx::query_scalar!(
        r#"WITH changes AS (
               DELETE FROM run_tally_changes RETURNING run_id, subject, state, delta),
           added AS (
               INSERT INTO run_tallies (run_id, subject, state, count)
               SELECT c.run_id, c.subject, c.state, sum(c.delta)
               FROM changes c JOIN runs r ON r.id = c.run_id
               GROUP BY c.run_id, c.subject, c.state
               ON CONFLICT (run_id, subject, state)
                   DO UPDATE SET count = run_tallies.count + excluded.count)
           SELECT count(*) AS "folded!" FROM changes"#
    )
    .fetch_one(pool)
    .await
    .context("folding the runs' tally changes")?;
    Ok(folded as u64)
}

/// One tally of a watched run (active, paused, or ended in the last minutes, so that its final
/// counts are recorded). A run without any tally appears once, with neither subject nor state.
pub struct WatchedTally {
    pub run: String,
    pub subject: Option<String>,
    pub state: Option<String>,
    pub count: i64,
}

/// The watched runs' tallies, as of the last [`fold`].
pub async fn watched(pool: &PgPool) -> Result<Vec<WatchedTally>> {
    sqlx::query_as!(
        WatchedTally,
        r#"SELECT r.name AS "run!", t.subject AS "subject?", t.state AS "state?",
                  coalesce(t.count, 0) AS "count!"
           FROM runs r LEFT JOIN run_tallies t ON t.run_id = r.id
           WHERE r.state IN ('active', 'paused') OR r.updated_at > now() - interval '10 minutes'"#
    )
    .fetch_all(pool)
    .await
    .context("reading the watched runs' tallies")
}

/// How many jobs of every run are in each of `states`, as of the last [`fold`] (states with none
/// are absent).
pub async fn jobs_in_states(pool: &PgPool, states: &[&str]) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT state, sum(count)::int8 AS "jobs!" FROM run_tallies
           WHERE subject <> $1 AND state = ANY($2) AND count <> 0
           GROUP BY state"#,
        GROUPS,
        states as &[&str]
    )
    .fetch_all(pool)
    .await
    .context("reading the jobs per state")?;
    Ok(rows.into_iter().map(|row| (row.state, row.jobs)).collect())
}

/// Jobs that a worker holds or will soon (`queued` or `running`), per route over every run, as of
/// the last [`fold`] (routes with none are absent).
pub async fn in_flight_by_route(pool: &PgPool) -> Result<HashMap<Route, i64>> {
    let rows = sqlx::query!(
        r#"SELECT subject AS route, sum(count)::int8 AS "jobs!" FROM run_tallies
           WHERE subject <> $1 AND state IN ('queued', 'running') AND count <> 0
           GROUP BY subject"#,
        GROUPS
    )
    .fetch_all(pool)
    .await
    .context("reading the jobs in flight")?;
    rows.into_iter()
        .map(|row| {
            let route = row.route.parse().map_err(anyhow::Error::msg)?;
            Ok((route, row.jobs))
        })
        .collect()
}
