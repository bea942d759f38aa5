//! Handling worker reports. Each report is applied together with everything it causes (the next
//! jobs, the group decision) within the caller's transaction, and acknowledged to the broker only
//! after the commit: a crash at any point redelivers the report, and applying it again is a no-op
//! because a report counts only for the attempt the job awaits and only while the job is in
//! flight. The results consumer applies the reports waiting at once in one transaction, so that
//! they share one commit: the usual starts together and the other reports' jobs locked together
//! ([`prepare_batch`]), then the others one after another, leaving the rows no later report
//! reads to be written together at the end ([`ReportBatch::finish`]); savepoints only when a
//! report of the batch cannot apply: see `crate::service`.

use crate::db::groups::{self, Verdict};
use crate::db::jobs::{self, Change, JobRow, NewJob};
use crate::near_duplicates;
use crate::planner;
use crate::run_config::RunConfig;
use crate::state::Decision;
use crate::state::JobState;
use anyhow::Result;
use chrono::Utc;
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use syncd_proto::filter;
use syncd_proto::messages::{
    FailureKind, JobKind, JobOutput, ReportEvent, ScoreOutput, WorkerReport,
};
use syncd_proto::{JobId, ObjectId, RunId};

/// What became of a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// It changed the job.
    Changed(JobState),
    /// It was for another attempt or a job no longer in flight (a duplicate or a late answer).
    Ignored,
    /// No such job.
    UnknownJob,
}

/// What applying one batch of reports shares: what it reads once for the whole batch rather than
/// once per report (the run configurations it needs, read and parsed on first use, the jobs it
/// reports on, locked up front by [`prepare_batch`], the runs whose near-duplicate index is
/// known complete, and what its scored groups' checks read of that index, read at once by
/// [`prepare_batch`]) and, once prepared by [`prepare_batch`], the writes it makes once for the
/// whole batch ([`LaterWrites`], made by [`ReportBatch::finish`]).
#[derive(Default)]
pub struct ReportBatch {
    /// Whether the batch was prepared, and so keeps writes for its end.
    prepared: bool,
    configs: HashMap<RunId, Arc<RunConfig>>,
    locked: HashMap<JobId, JobRow>,
    /// The jobs locked up front: each is the subject of exactly one report of the batch.
    locked_up_front: HashSet<JobId>,
    indexed_runs: near_duplicates::IndexedRuns,
    /// What the batch's near-duplicate checks read of the index: kept only once it is prepared,
    /// when the index changes at its end alone.
    index_reads: near_duplicates::IndexReads,
    /// The signatures of the scored groups read ahead, by their scoring job.
    signatures: HashMap<JobId, near_duplicates::Signatures>,
    later: LaterWrites,
}

/// Rows a batch's reports write that no later report of the batch reads, kept to be written
/// together before the commit, one statement per table instead of one per report: the
/// successes of jobs locked up front (no other report of the batch is about them), the images
/// and scoring job of a generation (no report can be about a job that does not exist yet), the
/// decisions on scored groups and the accepted ones' entries in the near-duplicate index (the
/// batch's later checks compare with these in memory: [`near_duplicates::find`]), and the end
/// of objects whose groups are all decided (nothing in a batch reads an object's state once its
/// groups are made). Should a write fail, so does the batch, which is then applied report by
/// report.
#[derive(Default)]
pub struct LaterWrites {
    successes: Vec<jobs::Success>,
    group_images: Vec<groups::GroupImages>,
    scoring_jobs: Vec<NewJob>,
    /// In the order the near-duplicate rule saw them, which their decision times keep.
    decisions: Vec<groups::ScoredGroup>,
    accepted: Vec<near_duplicates::AcceptedGroup>,
    decided_objects: Vec<ObjectId>,
}

impl LaterWrites {
    /// A generation's images and the job that scores them.
    pub fn scoring(&mut self, images: groups::GroupImages, job: NewJob) {
        self.group_images.push(images);
        self.scoring_jobs.push(job);
    }

    /// A group of `object` was decided: the object is done if it was its last undecided one.
    /// Checked once all the batch's decisions are written.
    pub fn group_decided(&mut self, decision: groups::ScoredGroup, object: ObjectId) {
        self.decisions.push(decision);
        self.decided_objects.push(object);
    }

    async fn write(self, conn: &mut PgConnection) -> Result<()> {
        jobs::succeed_many(&mut *conn, &self.successes).await?;
        groups::set_images_many(&mut *conn, &self.group_images).await?;
        jobs::insert_many(&mut *conn, self.scoring_jobs).await?;
        groups::decide_many(&mut *conn, &self.decisions).await?;
        near_duplicates::add_many(&mut *conn, &self.accepted).await?;
        planner::finish_objects_if_decided(&mut *conn, &self.decided_objects).await?;
        Ok(())
    }
}

impl ReportBatch {
    async fn config(&mut self, conn: &mut PgConnection, run: RunId) -> Result<Arc<RunConfig>> {
        if let Some(config) = self.configs.get(&run) {
            return Ok(config.clone());
        }
        let (config, _) = crate::db::runs::config_and_state(conn, run).await?;
        let config = Arc::new(config);
        self.configs.insert(run, config.clone());
        Ok(config)
    }

    /// Locks, in one statement, the jobs that exactly one of `reports` is about, so that
    /// [`apply`] finds each already read. A job with several reports in the batch is left to be
    /// locked as each is applied: the report before changes the row the next one must see.
    async fn lock_jobs(
        &mut self,
        conn: &mut PgConnection,
        reports: &[&WorkerReport],
    ) -> Result<()> {
        let mut reports_per_job = HashMap::<JobId, usize>::new();
        for report in reports {
            *reports_per_job.entry(report.job_id).or_default() += 1;
        }
        let once: Vec<JobId> = reports_per_job
            .into_iter()
            .filter_map(|(job, reports)| (reports == 1).then_some(job))
            .collect();
        for job in jobs::lock_many(conn, &once).await? {
            self.locked_up_front.insert(job.id);
            self.locked.insert(job.id, job);
        }
        Ok(())
    }

    /// Reads the near-duplicate index at once for the groups of `reports` that will be checked
    /// (see [`near_duplicates::prefetch`]), keeping their signatures for [`decide`]: those
    /// scored for the attempt their job awaits (the job locked up front, so no other report of
    /// the batch changes it first) whose scores pass the filter. Reading for a report that then
    /// does not apply after all would cost a read, not a decision.
    async fn read_index_ahead(
        &mut self,
        conn: &mut PgConnection,
        reports: &[&WorkerReport],
    ) -> Result<()> {
        let mut checked = Vec::new();
        for report in reports {
            let ReportEvent::Succeeded {
                output: JobOutput::Score(scores),
                ..
            } = &report.event
            else {
                continue;
            };
            let Some(job) = self.locked.get(&report.job_id) else {
                continue;
            };
            if job.attempts != report.attempt
                || !job.state.is_in_flight()
                || job.kind != JobKind::Score
            {
                continue;
            }
            let (job, run) = (job.id, job.run_id);
            let config = self.config(&mut *conn, run).await?;
            if !filter::decide(&scores.aesthetic, &scores.pairs, &config.filter).accepted {
                continue;
            }
            let signatures = near_duplicates::Signatures::of(run, &scores.embeddings);
            self.signatures.insert(job, signatures);
            checked.push((job, run, config.dataset.near_duplicate_threshold));
        }
        let candidates: Vec<near_duplicates::Candidate> = checked
            .iter()
            .map(|&(job, run, threshold)| near_duplicates::Candidate {
                run,
                signatures: &self.signatures[&job],
                threshold,
            })
            .collect();
        near_duplicates::prefetch(
            conn,
            &candidates,
            &mut self.indexed_runs,
            &mut self.index_reads,
        )
        .await
    }

    /// The job a report is about, locked: taken from those locked up front, or locked now.
    async fn job(&mut self, conn: &mut PgConnection, id: JobId) -> Result<Option<JobRow>> {
        match self.locked.remove(&id) {
            Some(job) => Ok(Some(job)),
            None => jobs::lock(conn, id).await,
        }
    }

    /// Whether the success of `job` is kept for the batch's end: when no other report of the
    /// batch is about the job and it waits for no service (a wait that ends is recorded as the
    /// job changes state, by [`jobs::transition`]).
    fn keeps_success_of(&self, job: &JobRow) -> bool {
        self.locked_up_front.contains(&job.id) && !job.waiting
    }

    /// Where the writes that a success causes beyond its job go: kept for the batch's end once
    /// it is prepared.
    fn later_writes(&mut self) -> Option<&mut LaterWrites> {
        self.prepared.then_some(&mut self.later)
    }

    /// Makes the batch's kept writes ([`LaterWrites`]); the caller commits after.
    pub async fn finish(self, conn: &mut PgConnection) -> Result<()> {
        self.later.write(conn).await
    }
}

/// Applies one report within `tx`'s transaction (the caller commits it, after
/// [`ReportBatch::finish`]). `batch` holds what the batch shares.
pub async fn apply(
    tx: &mut PgConnection,
    report: &WorkerReport,
    batch: &mut ReportBatch,
) -> Result<Applied> {
    let Some(job) = batch.job(&mut *tx, report.job_id).await? else {
        tracing::warn!(job = %report.job_id, "report for an unknown job");
        return Ok(Applied::UnknownJob);
    };
    if let ReportEvent::Heartbeat { waiting_for } = &report.event {
        // Heartbeats change no state and leave no history: only the lease and what the
        // attempt waits for. One for another attempt, or before `Started`, is dropped.
        if job.attempts != report.attempt || job.state != JobState::Running {
            return Ok(Applied::Ignored);
        }
        jobs::heartbeat(&mut *tx, &job, *waiting_for).await?;
        return Ok(Applied::Changed(JobState::Running));
    }
    if job.attempts != report.attempt || !job.state.is_in_flight() {
        let detail = format!(
            "ignored {} report for attempt {} (job is {} at attempt {})",
            event_name(&report.event),
            report.attempt,
            job.state,
            job.attempts
        );
        jobs::record_event(
            &mut *tx,
            job.id,
            report.attempt,
            Some(job.state),
            job.state,
            Some(&report.worker),
            Some(&detail),
        )
        .await?;
        metrics::counter!("syncd_reports_ignored_total").increment(1);
        return Ok(Applied::Ignored);
    }
    let worker = Some(report.worker.as_str());
    let next = match &report.event {
        ReportEvent::Started => {
            let detail =
                (job.state == JobState::Running).then_some("redelivered to another worker");
            jobs::transition(
                &mut *tx,
                &job,
                JobState::Running,
                Change {
                    worker,
                    detail,
                    ..Default::default()
                },
            )
            .await?;
            JobState::Running
        }
        ReportEvent::Succeeded {
            output,
            duration_ms,
            provenance,
        } => {
            let config = batch.config(&mut *tx, job.run_id).await?;
            if output.kind() != job.kind {
                let error = format!(
                    "worker returned a {} output for a {} job",
                    output.kind(),
                    job.kind
                );
                fail_attempt(
                    &mut *tx,
                    &config,
                    &job,
                    worker,
                    &error,
                    FailureKind::Permanent,
                )
                .await?
            } else {
                let verdict = match output {
                    JobOutput::Score(scores) => {
                        Some(decide(&mut *tx, &config, &job, scores, batch).await?)
                    }
                    _ => None,
                };
                let output_kept = stored_output(output)?;
                let detail = verdict.as_ref().map(|verdict| verdict.reason.as_str());
                if batch.keeps_success_of(&job) {
                    batch.later.successes.push(jobs::Success {
                        job: job.id,
                        from: job.state,
                        attempt: job.attempts,
                        worker: worker.map(str::to_string),
                        output: output_kept,
                        detail: detail.map(str::to_string),
                    });
                } else {
                    let change = Change {
                        worker,
                        output: Some(output_kept),
                        detail,
                        ..Default::default()
                    };
                    jobs::transition(&mut *tx, &job, JobState::Succeeded, change).await?;
                }
                planner::on_success(
                    &mut *tx,
                    &config,
                    &job,
                    output,
                    provenance.as_ref(),
                    verdict.as_ref(),
                    batch.later_writes(),
                )
                .await?;
                metrics::counter!("syncd_jobs_total", "kind" => job.kind.as_str(), "outcome" => "succeeded").increment(1);
                metrics::histogram!("syncd_job_duration_seconds", "kind" => job.kind.as_str())
                    .record(*duration_ms as f64 / 1000.0);
                if let Some(verdict) = &verdict {
                    metrics::counter!("syncd_groups_total", "decision" => verdict.decision.as_str())
                        .increment(1);
                }
                JobState::Succeeded
            }
        }
        ReportEvent::Failed { failure, error, .. } => {
            let config = batch.config(&mut *tx, job.run_id).await?;
            fail_attempt(&mut *tx, &config, &job, worker, error, *failure).await?
        }
        ReportEvent::Heartbeat { .. } => unreachable!("heartbeats are applied above"),
    };
    Ok(Applied::Changed(next))
}

/// Applies at once the `Started` reports of a batch that start the attempt their job awaits (the
/// usual case): one statement for all of them, where [`apply`] takes two per report. Returns,
/// for each of `reports`, whether it was applied here; the others are [`apply`]'s, in their order
/// (every other event, and a start that is a redelivery, a duplicate, late, or of an unknown
/// job). Applying these starts ahead of the rest of the batch changes no outcome: a start only
/// moves a queued attempt to running, and any other report of that attempt applies the same
/// from running as from queued.
async fn apply_starts(tx: &mut PgConnection, reports: &[&WorkerReport]) -> Result<Vec<bool>> {
    let mut jobs_seen = HashSet::new();
    let (indexes, starts): (Vec<usize>, Vec<jobs::Start>) = reports
        .iter()
        .enumerate()
        .filter(|(_, report)| matches!(report.event, ReportEvent::Started))
        // A job's first start of the batch only: `start_many` takes each job once.
        .filter(|(_, report)| jobs_seen.insert(report.job_id))
        .map(|(index, report)| {
            let start = jobs::Start {
                job: report.job_id,
                attempt: report.attempt,
                worker: &report.worker,
            };
            (index, start)
        })
        .unzip();
    let mut applied = vec![false; reports.len()];
    if starts.is_empty() {
        return Ok(applied);
    }
    let started: HashSet<JobId> = jobs::start_many(tx, &starts).await?.into_iter().collect();
    for (index, start) in indexes.into_iter().zip(&starts) {
        applied[index] = started.contains(&start.job);
    }
    Ok(applied)
}

/// Prepares a batch of reports for [`apply`]: applies its usual starts together
/// ([`apply_starts`]), locks the jobs of the other reports together, then reads the
/// near-duplicate index for all its scored groups at once. Returns,
/// for each of `reports`, whether it was applied here; the others are [`apply`]'s, in their
/// order. A batch retried with savepoints skips this, so that each report goes alone.
pub async fn prepare_batch(
    tx: &mut PgConnection,
    reports: &[&WorkerReport],
    batch: &mut ReportBatch,
) -> Result<Vec<bool>> {
    batch.prepared = true;
    let started = apply_starts(&mut *tx, reports).await?;
    let rest: Vec<&WorkerReport> = reports
        .iter()
        .zip(&started)
        .filter_map(|(report, started)| (!started).then_some(*report))
        .collect();
    batch.lock_jobs(&mut *tx, &rest).await?;
    batch.read_index_ahead(tx, &rest).await?;
    Ok(started)
}

/// The verdict on a scored group. An accepted group enters the near-duplicate index: kept for
/// the batch's end once it is prepared, and written now otherwise.
async fn decide(
    conn: &mut sqlx::PgConnection,
    config: &RunConfig,
    job: &JobRow,
    scores: &ScoreOutput,
    batch: &mut ReportBatch,
) -> Result<Verdict> {
    let verdict = filter::decide(&scores.aesthetic, &scores.pairs, &config.filter);
    if !verdict.accepted {
        return Ok(Verdict {
            decision: Decision::Rejected,
            valid_images: verdict.valid_images,
            reason: verdict.reason,
        });
    }
    let threshold = config.dataset.near_duplicate_threshold;
    let signatures = batch
        .signatures
        .remove(&job.id)
        .unwrap_or_else(|| near_duplicates::Signatures::of(job.run_id, &scores.embeddings));
    // A batch applied report by report writes each accepted group at once, so its checks
    // cannot share reads.
    let mut own_reads = near_duplicates::IndexReads::default();
    let index_reads = if batch.prepared {
        &mut batch.index_reads
    } else {
        &mut own_reads
    };
    let check = near_duplicates::find(
        conn,
        job.run_id,
        &scores.embeddings,
        &signatures,
        threshold,
        &mut batch.indexed_runs,
        index_reads,
        &batch.later.accepted,
    )
    .await?;
    if let Some((group, similarity)) = check.duplicate_of {
        if Some(group) != job.group_id {
            return Ok(Verdict {
                decision: Decision::NearDuplicate,
                valid_images: Vec::new(),
                reason: format!(
                    "near duplicate of group {group} (DINOv2 cosine {similarity:.4} >= {}); {}",
                    config.dataset.near_duplicate_threshold, verdict.reason
                ),
            });
        }
    }
    // Indexed in this transaction, so the next report's check already sees it.
    let accepted = job.group_id.and_then(|group| {
        near_duplicates::AcceptedGroup::new(
            job.run_id,
            group,
            scores.embeddings.clone(),
            signatures,
        )
    });
    if let Some(accepted) = accepted {
        match batch.later_writes() {
            Some(later) => later.accepted.push(accepted),
            None => near_duplicates::add_many(conn, &[accepted]).await?,
        }
    }
    Ok(Verdict {
        decision: Decision::Accepted,
        valid_images: verdict.valid_images,
        reason: verdict.reason,
    })
}

/// What a succeeded job keeps as its output. A scoring job's embeddings (3 x 1024 floats with
/// DINOv2-L) are kept once, on its group (and in the near-duplicate index when it is accepted),
/// not again in the job's row: writing them twice doubled the cost of applying a score.
fn stored_output(output: &JobOutput) -> Result<serde_json::Value> {
    Ok(match output {
        JobOutput::Score(scores) => serde_json::to_value(JobOutput::Score(ScoreOutput {
            aesthetic: scores.aesthetic.clone(),
            pairs: scores.pairs.clone(),
            embeddings: Vec::new(),
        }))?,
        output => serde_json::to_value(output)?,
    })
}

fn event_name(event: &ReportEvent) -> &'static str {
    match event {
        ReportEvent::Started => "started",
        ReportEvent::Succeeded { .. } => "succeeded",
        ReportEvent::Failed { .. } => "failed",
        ReportEvent::Heartbeat { .. } => "heartbeat",
    }
}

/// Ends the current attempt of `job` as failed. Shared by worker reports, expired leases and
/// dead letters.
pub async fn fail_attempt(
    conn: &mut sqlx::PgConnection,
    config: &RunConfig,
    job: &JobRow,
    worker: Option<&str>,
    error: &str,
    failure: FailureKind,
) -> Result<JobState> {
    let retry = failure == FailureKind::Transient && job.attempts < job.max_attempts;
    if retry {
        let not_before = Utc::now() + config.jobs.backoff(job.attempts + 1);
        let change = Change {
            worker,
            error: Some(error),
            not_before: Some(not_before),
            ..Default::default()
        };
        jobs::transition(conn, job, JobState::RetryWait, change).await?;
        metrics::counter!("syncd_jobs_total", "kind" => job.kind.as_str(), "outcome" => "retried")
            .increment(1);
        return Ok(JobState::RetryWait);
    }
    let detail = match failure {
        FailureKind::Permanent => format!("permanent failure: {error}"),
        FailureKind::Transient => format!(
            "no attempts left ({} of {}): {error}",
            job.attempts, job.max_attempts
        ),
    };
    let change = Change {
        worker,
        error: Some(error),
        detail: Some(&detail),
        ..Default::default()
    };
    jobs::transition(conn, job, JobState::Failed, change).await?;
    planner::on_failure(conn, job, error, failure == FailureKind::Permanent).await?;
    metrics::counter!("syncd_jobs_total", "kind" => job.kind.as_str(), "outcome" => "failed")
        .increment(1);
    Ok(JobState::Failed)
}
