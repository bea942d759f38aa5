//! The `run_tallies` table and its queue of changes, `run_tally_changes`: each run's jobs per kind
//! and state and groups per decision, so that the gauges read a few rows per run instead of
//! counting a run's every job and group every 5 s (a million index entries at 500K objects).
//!
//! The `jobs` and `groups` tables' triggers (migration `run_tallies`) append every change of a
//! count to the queue, so no writer can forget to count; [`fold`] is the only statement that
//! moves changes into the tallies.

use anyhow::{Context, Result};
use sqlx::PgPool;

/// The subject of the groups' tallies; a job kind's tallies have the kind's name.
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
