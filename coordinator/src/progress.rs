//! A run's progress as `syncd run watch` shows it: per stage (prompt, prior, generate, score,
//! pack) how much is done out of how much there will be, the decisions so far and the workers
//! busy on the run; and, over successive snapshots, each stage's rate and time left.
//!
//! Everything comes from the database in a few grouped queries, so watching needs no broker or
//! S3 and costs the same on a run of ten objects as on one of a hundred thousand.

use crate::run_config::RunConfig;
use crate::state::RunState;
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::{BTreeMap, VecDeque};
use syncd_proto::RunId;

/// The stages a group goes through, in order. `pack` is writing the dataset.
pub const STAGES: [&str; 5] = ["prompt", "prior", "generate", "score", "pack"];

/// One stage of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StageProgress {
    pub stage: &'static str,
    /// What the stage will have done when the run ends, as far as is known now: the jobs that
    /// exist, plus the groups of objects not yet planned at their configured count (an upper
    /// bound for rigid assets, whose prior may find fewer view triplets).
    pub total: i64,
    pub succeeded: i64,
    /// Failed for good or dead-lettered.
    pub failed: i64,
    pub cancelled: i64,
    pub running: i64,
    /// Pending, queued or waiting for a retry.
    pub waiting: i64,
}

impl StageProgress {
    /// Units that need no more work.
    pub fn finished(&self) -> i64 {
        self.succeeded + self.failed + self.cancelled
    }
}

/// One look at a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunProgress {
    pub run: RunId,
    pub name: String,
    pub state: String,
    pub dataset_state: String,
    pub dataset_error: Option<String>,
    pub stages: Vec<StageProgress>,
    /// Groups by decision (`pending`, `accepted`, `rejected`, `near_duplicate`, `failed`).
    pub groups: BTreeMap<String, i64>,
    /// Workers alive now, and those of them running a job of this run.
    pub workers_alive: i64,
    pub workers_busy: i64,
    pub taken_at: DateTime<Utc>,
}

impl RunProgress {
    /// Whether the run has ended: nothing more will change without an admin.
    pub fn ended(&self) -> bool {
        self.state == RunState::Completed.as_str() || self.state == RunState::Cancelled.as_str()
    }

    pub fn stage(&self, name: &str) -> Option<&StageProgress> {
        self.stages.iter().find(|stage| stage.stage == name)
    }
}

/// Takes a snapshot of `run`.
pub async fn snapshot(pool: &PgPool, run: RunId) -> Result<RunProgress> {
    let header = crate::db::runs::progress_header(pool, run)
        .await?
        .ok_or_else(|| crate::admin::NotFound(format!("no run {run}")))?;
    let config: RunConfig = serde_json::from_value(header.config)
        .context("the run's stored configuration no longer parses")?;

    let mut stages: BTreeMap<&str, StageProgress> = STAGES
        .iter()
        .map(|&stage| {
            (
                stage,
                StageProgress {
                    stage,
                    ..Default::default()
                },
            )
        })
        .collect();
    for (kind, state, count) in crate::db::jobs::count_by_kind_and_state_of_run(pool, run).await? {
        let Some(stage) = stages.get_mut(kind.as_str()) else {
            continue;
        };
        stage.total += count;
        match state.as_str() {
            "succeeded" => stage.succeeded += count,
            "failed" | "dead_lettered" => stage.failed += count,
            "cancelled" => stage.cancelled += count,
            "running" => stage.running += count,
            _ => stage.waiting += count,
        }
    }

    // Objects still active without groups will have their configured number of them; rigid
    // objects without a prior job yet will get one.
    for crate::db::objects::Unplanned {
        family,
        without_groups,
        without_prior,
    } in crate::db::objects::unplanned_of_run(pool, run).await?
    {
        let (per_object, priors) = match family.as_deref() {
            Some("rigid") => (config.generation.rigid.groups_per_object, without_prior),
            _ => (config.generation.deformable.groups_per_object, 0),
        };
        let groups_to_come = without_groups * i64::from(per_object);
        for stage in ["generate", "score"] {
            stages.get_mut(stage).expect("a stage").total += groups_to_come;
        }
        stages.get_mut("prior").expect("a stage").total += priors;
    }

    let groups: BTreeMap<String, i64> = crate::db::groups::count_by_decision_of_run(pool, run)
        .await?
        .into_iter()
        .collect();
    // Generation jobs exist only for planned groups: a group waiting for its generation job
    // still counts towards the scoring stage's total.
    let planned_groups: i64 = groups.values().sum();
    for stage in ["generate", "score"] {
        let stage = stages.get_mut(stage).expect("a stage");
        stage.total = stage.total.max(planned_groups);
    }

    // The dataset is one unit of packing until shards are packed as groups are accepted.
    let dataset_state = header.dataset_state;
    let pack = stages.get_mut("pack").expect("a stage");
    pack.total = 1;
    match dataset_state.as_str() {
        "written" => pack.succeeded = 1,
        _ => pack.waiting = 1,
    }

    let (workers_alive, workers_busy) = crate::workers::alive_and_busy_on(pool, run).await?;

    Ok(RunProgress {
        run,
        name: header.name,
        state: header.state,
        dataset_state,
        dataset_error: header.dataset_error,
        stages: STAGES.iter().map(|stage| stages[stage].clone()).collect(),
        groups,
        workers_alive,
        workers_busy,
        taken_at: header.taken_at,
    })
}

/// A stage's pace over the last minute of snapshots.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePace {
    pub stage: &'static str,
    /// Units finished per minute, once two snapshots a few seconds apart exist.
    pub per_minute: Option<f64>,
    /// Seconds until the stage is finished at that pace; `None` without a pace, or while
    /// nothing moves.
    pub eta_secs: Option<f64>,
}

/// Remembers recent snapshots to tell each stage's pace.
pub struct PaceMeter {
    window: chrono::Duration,
    seen: VecDeque<(DateTime<Utc>, Vec<i64>)>,
}

impl PaceMeter {
    /// Paces over `window` (the last minute suits a person watching).
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            seen: VecDeque::new(),
        }
    }

    /// Adds a snapshot; the pace of each stage from the oldest snapshot in the window to it.
    pub fn add(&mut self, progress: &RunProgress) -> Vec<StagePace> {
        let finished: Vec<i64> = progress
            .stages
            .iter()
            .map(StageProgress::finished)
            .collect();
        let now = progress.taken_at;
        while self
            .seen
            .front()
            .is_some_and(|(at, _)| now - *at > self.window)
        {
            self.seen.pop_front();
        }
        let pace = progress
            .stages
            .iter()
            .enumerate()
            .map(|(index, stage)| {
                let per_minute = self.seen.front().and_then(|(then, before)| {
                    let seconds = (now - *then).num_milliseconds() as f64 / 1000.0;
                    (seconds >= 1.0)
                        .then(|| (finished[index] - before[index]) as f64 * 60.0 / seconds)
                });
                let left = (stage.total - stage.finished()).max(0);
                let eta_secs = match per_minute {
                    _ if left == 0 => Some(0.0),
                    Some(rate) if rate > 0.0 => Some(left as f64 * 60.0 / rate),
                    _ => None,
                };
                StagePace {
                    stage: stage.stage,
                    per_minute,
                    eta_secs,
                }
            })
            .collect();
        self.seen.push_back((now, finished));
        pace
    }
}

/// The text `syncd run watch` prints for one snapshot: a header, a bar per stage with its pace,
/// the decisions and the workers. Plain ASCII, so that a log file reads as well as a terminal.
pub fn render(progress: &RunProgress, pace: &[StagePace], width: usize) -> Vec<String> {
    let mut lines = vec![format!(
        "{} ({})  {}  dataset {}{}",
        progress.name,
        progress.run,
        progress.state,
        progress.dataset_state,
        progress
            .dataset_error
            .as_ref()
            .map(|error| format!(": {error}"))
            .unwrap_or_default()
    )];
    for (stage, pace) in progress.stages.iter().zip(pace) {
        let fraction = if stage.total == 0 {
            1.0
        } else {
            stage.finished() as f64 / stage.total as f64
        };
        let filled = ((fraction * width as f64).round() as usize).min(width);
        let rate = match pace.per_minute {
            Some(rate) => format!("{rate:.1}/min"),
            None => "-/min".into(),
        };
        let eta = match pace.eta_secs {
            _ if stage.finished() >= stage.total => "done".to_string(),
            Some(secs) => format!(
                "eta {}",
                crate::outages::human_duration(std::time::Duration::from_secs_f64(secs))
            ),
            None => "eta -".into(),
        };
        let mut extra = Vec::new();
        if stage.running > 0 {
            extra.push(format!("{} running", stage.running));
        }
        if stage.waiting > 0 {
            extra.push(format!("{} waiting", stage.waiting));
        }
        if stage.failed > 0 {
            extra.push(format!("{} failed", stage.failed));
        }
        if stage.cancelled > 0 {
            extra.push(format!("{} cancelled", stage.cancelled));
        }
        lines.push(format!(
            "  {:<8} [{}{}] {:>6}/{:<6} {:>3.0}%  {:>10}  {:<12} {}",
            stage.stage,
            "#".repeat(filled),
            ".".repeat(width - filled),
            stage.finished(),
            stage.total,
            fraction * 100.0,
            rate,
            eta,
            extra.join(", ")
        ));
    }
    let decision = |name: &str| progress.groups.get(name).copied().unwrap_or(0);
    lines.push(format!(
        "  groups: {} accepted, {} rejected, {} near-duplicate, {} failed, {} undecided",
        decision("accepted"),
        decision("rejected"),
        decision("near_duplicate"),
        decision("failed"),
        decision("pending"),
    ));
    lines.push(format!(
        "  workers: {} busy on this run, {} alive",
        progress.workers_busy, progress.workers_alive
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(at_secs: i64, generated: i64) -> RunProgress {
        RunProgress {
            run: RunId(uuid::Uuid::nil()),
            name: "r".into(),
            state: "active".into(),
            dataset_state: "pending".into(),
            dataset_error: None,
            stages: STAGES
                .iter()
                .map(|&stage| StageProgress {
                    stage,
                    total: 100,
                    succeeded: if stage == "generate" { generated } else { 100 },
                    ..Default::default()
                })
                .collect(),
            groups: BTreeMap::new(),
            workers_alive: 2,
            workers_busy: 1,
            taken_at: DateTime::from_timestamp(1_000_000 + at_secs, 0).unwrap(),
        }
    }

    #[test]
    fn pace_and_time_left_come_from_the_window() {
        let mut meter = PaceMeter::new(std::time::Duration::from_secs(60));
        let first = meter.add(&progress(0, 10));
        assert_eq!(first[2].per_minute, None, "one snapshot has no pace");
        assert_eq!(
            first[0].eta_secs,
            Some(0.0),
            "a finished stage needs no time"
        );
        let second = meter.add(&progress(30, 40));
        assert_eq!(second[2].per_minute, Some(60.0));
        assert_eq!(second[2].eta_secs, Some(60.0));
        // The first snapshot leaves the window: the pace is measured from the second.
        let third = meter.add(&progress(90, 70));
        assert_eq!(third[2].per_minute, Some(30.0));
        assert_eq!(third[2].eta_secs, Some(60.0));
        // Nothing moved for a minute: no time left can be told.
        let stalled = meter.add(&progress(150, 70));
        assert_eq!(stalled[2].per_minute, Some(0.0));
        assert_eq!(stalled[2].eta_secs, None);
    }

    #[test]
    fn the_frame_has_a_bar_per_stage() {
        let mut meter = PaceMeter::new(std::time::Duration::from_secs(60));
        meter.add(&progress(0, 0));
        let snapshot = progress(60, 50);
        let lines = render(&snapshot, &meter.add(&snapshot), 20);
        assert_eq!(lines.len(), 1 + STAGES.len() + 2);
        let generate = &lines[3];
        assert!(generate.contains("generate"), "{generate}");
        assert!(
            generate.contains(&format!("[{}{}]", "#".repeat(10), ".".repeat(10))),
            "{generate}"
        );
        assert!(generate.contains("50/100"), "{generate}");
        assert!(generate.contains("50.0/min"), "{generate}");
        assert!(generate.contains("eta 1m"), "{generate}");
        assert!(lines[1].contains("done"), "{}", lines[1]);
        assert!(lines
            .last()
            .unwrap()
            .contains("1 busy on this run, 2 alive"));
    }
}
