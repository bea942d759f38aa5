//! Gauges computed from the database for Prometheus (counters are incremented where things
//! happen). Names follow Prometheus conventions: `syncd_` prefix, `_total` counters, base units.

use crate::db::{jobs, outbox, run_tallies, runs};
use crate::state::{Decision, JobState};
use anyhow::Result;
use sqlx::PgPool;
use syncd_proto::messages::{JobKind, Route, Service, WorkerState};

/// Every outcome the dashboard and alerts read, at 0: a counter that appears only with its first
/// increment shows Prometheus no increase (it has no earlier sample), so the first dead letter
/// would raise no alert, and a query of an outcome that never happened would have no data.
pub fn initialise_counters() {
    metrics::counter!("syncd_dead_letters_total").increment(0);
    for kind in JobKind::ALL {
        for outcome in ["succeeded", "retried", "failed", "dead_lettered"] {
            metrics::counter!("syncd_jobs_total", "kind" => kind.as_str(), "outcome" => outcome)
                .increment(0);
        }
    }
    for decision in ["accepted", "rejected", "near_duplicate"] {
        metrics::counter!("syncd_groups_total", "decision" => decision).increment(0);
    }
}

/// `syncd_coordinator_leading`: 1 while this coordinator leads (runs the loops), 0 on standby.
pub fn set_leading(leading: bool) {
    metrics::gauge!("syncd_coordinator_leading").set(if leading { 1.0 } else { 0.0 });
}

/// Refreshes every gauge. Each query reads the run tallies or a bounded part of an index, so the
/// refresh costs the same at a hundred jobs and at millions: `syncd_jobs{state}` counts only the
/// states a job passes through (pending, queued, running, retry_wait; the ended ones are the
/// `syncd_jobs_total` counters), and the per-run gauges read the watched runs' tallies.
pub async fn update_gauges(pool: &PgPool) -> Result<()> {
    run_tallies::fold(pool).await?;
    let in_flight = JobState::ALL
        .into_iter()
        .filter(|state| !state.is_terminal());
    let names: Vec<&str> = in_flight.clone().map(JobState::as_str).collect();
    let states = run_tallies::jobs_in_states(pool, &names).await?;
    set_counts(
        "syncd_jobs",
        "state",
        in_flight.map(JobState::as_str),
        &states,
    );
    let waiting = jobs::waiting_by_service(pool).await?;
    set_counts(
        "syncd_jobs_waiting",
        "service",
        Service::ALL.map(|service| service.as_str()),
        &waiting,
    );
    metrics::gauge!("syncd_outbox_pending").set(outbox::pending(pool).await? as f64);
    let workers = crate::workers::alive_by_state(pool).await?;
    set_counts(
        "syncd_workers_alive",
        "state",
        [WorkerState::Idle, WorkerState::Busy].map(|state| state.as_str()),
        &workers,
    );
    metrics::gauge!("syncd_workers_lost").set(crate::workers::lost(pool).await? as f64);
    update_run_gauges(pool).await
}

/// Per-run progress: `syncd_run_jobs{run, kind, state}` (every kind and state, 0 when none),
/// `syncd_run_groups{run, decision}` (every decision, 0 when none) and
/// `syncd_run_last_progress_timestamp_seconds{run}` (the latest job that finished, or the run's
/// creation), for the dashboard's run rows and the no-progress alert. The counts come from the
/// run tallies, folded first ([`update_gauges`]): a few rows per run whatever its size.
async fn update_run_gauges(pool: &PgPool) -> Result<()> {
    let tallies = run_tallies::watched(pool).await?;
    let mut watched: Vec<&str> = tallies.iter().map(|tally| tally.run.as_str()).collect();
    watched.sort_unstable();
    watched.dedup();
    let count = |run: &str, subject: &str, state: &str| {
        tallies
            .iter()
            .find(|tally| {
                tally.run == run
                    && tally.subject.as_deref() == Some(subject)
                    && tally.state.as_deref() == Some(state)
            })
            .map_or(0, |tally| tally.count) as f64
    };
    for run in watched {
        for kind in JobKind::ALL {
            for state in JobState::ALL {
                let jobs: f64 = Route::of_kind(kind)
                    .map(|route| count(run, route.as_str(), state.as_str()))
                    .sum();
                metrics::gauge!("syncd_run_jobs", "run" => run.to_string(), "kind" => kind.as_str(), "state" => state.as_str())
                    .set(jobs);
            }
        }
        for decision in Decision::ALL {
            metrics::gauge!("syncd_run_groups", "run" => run.to_string(), "decision" => decision.as_str())
                .set(count(run, run_tallies::GROUPS, decision.as_str()));
        }
    }
    let progress = runs::watched_last_progress(pool).await?;
    for (run, at) in progress {
        metrics::gauge!("syncd_run_last_progress_timestamp_seconds", "run" => run).set(at);
    }
    Ok(())
}

/// Sets `gauge{label=value}` for every value: its count in `counts`, or 0 when it has none, so
/// that a state that empties shows 0 rather than its last count.
fn set_counts(
    gauge: &'static str,
    label: &'static str,
    values: impl IntoIterator<Item = &'static str>,
    counts: &[(String, i64)],
) {
    for value in values {
        let count = counts
            .iter()
            .find(|(name, _)| name == value)
            .map_or(0, |(_, count)| *count);
        metrics::gauge!(gauge, label => value).set(count as f64);
    }
}
