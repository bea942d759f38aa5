//! The operations behind the `syncd` admin CLI. Each read returns a serialisable report (printed
//! as text or, with `--json`, as JSON); each change runs in one transaction and goes through the
//! state machine.

use crate::dataset::DatasetIndex;
use crate::db::jobs::{self, Change, JobEvent, JobListing, JobRow};
use crate::db::{dead_letters, objects, outbox, runs};
use crate::export::{self, ExportFormat, ExportReport};
use crate::input;
use crate::outages::{self, WaitSummary};
use crate::plan::{self, MeasuredSeconds, RunPlan};
use crate::planner;
use crate::run_config::{InputOverrides, RunConfig};
use crate::state::{JobState, ObjectState, RunState};
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::path::Path;
use syncd_infra::storage::Storage;
use syncd_proto::messages::JobKind;
use syncd_proto::{keys, JobId, ObjectId, RunId};
use uuid::Uuid;

/// What a command was asked about does not exist (the CLI exits with status 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// An error in what a command was given (a run file, its inputs): the CLI exits with status 2,
/// as for a malformed command line. It reads as the error it wraps.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct InvalidInput(pub anyhow::Error);

#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub id: RunId,
    pub name: String,
    pub state: String,
    pub dataset_state: String,
    pub dataset_error: Option<String>,
    /// Where the dataset's manifest is (or will be) in the bucket.
    pub dataset_index: String,
    /// Shards written so far (those with samples) and the samples in them: the manifest lists
    /// them while the run runs.
    pub dataset_shards: i64,
    pub dataset_samples: i64,
    pub objects: BTreeMap<String, i64>,
    pub jobs: BTreeMap<String, i64>,
    pub groups: BTreeMap<String, i64>,
    pub dead_letters: i64,
    /// Outages the run waited out and jobs waiting now, per service (empty if none).
    pub waits: Vec<WaitSummary>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// Creates a run from its configuration file: reads the inputs, uploads rigid assets (several at
/// once, before the transaction, with progress on stderr), then writes the run, its objects and
/// first jobs in one transaction. All or nothing: when any step fails, the assets uploaded for
/// the run are deleted again.
pub async fn create_run(
    pool: &PgPool,
    storage: &Storage,
    file: &Path,
    overrides: &InputOverrides,
) -> Result<RunSummary> {
    let config = RunConfig::load_with(file, overrides).map_err(InvalidInput)?;
    // Refused before any upload; the transaction checks again, for a run created meanwhile.
    if runs::by_name(pool, &config.name).await?.is_some() {
        bail!("a run named {:?} exists already", config.name);
    }
    storage.ensure_bucket().await?;
    let listed = match &config.input.assets_dir {
        Some(input::AssetSource::Stored(stored)) => {
            Some(list_stored_assets(storage, stored).await?)
        }
        _ => None,
    };
    let objects = input::read_objects(&config, listed.as_ref()).map_err(InvalidInput)?;
    let run = RunId::new_random();
    let uploads = planner::asset_uploads(run, &objects);
    let created = async {
        upload_assets(storage, &uploads).await?;
        let mut tx = pool.begin().await?;
        planner::create_run(&mut tx, run, &config, objects).await?;
        tx.commit().await.context("committing the new run")
    }
    .await;
    if let Err(error) = created {
        let keys: Vec<String> = uploads.into_iter().map(|(_, key)| key).collect();
        if let Err(cleanup) = storage.delete(&keys).await {
            eprintln!(
                "the run was not created, and its uploaded assets could not be deleted: {cleanup:#}"
            );
        }
        return Err(error);
    }
    summary(pool, run).await
}

/// The keys under a stored assets prefix, which must be in the working bucket: workers read
/// assets from there.
async fn list_stored_assets(
    storage: &Storage,
    stored: &input::StoredAssets,
) -> Result<std::collections::HashSet<String>> {
    if stored.bucket != storage.bucket() {
        bail!(InvalidInput(anyhow::anyhow!(
            "assets at {stored} are outside the working bucket {:?}, which workers read them \
             from: copy them into it (say s3://{}/{}) or give a local folder",
            storage.bucket(),
            storage.bucket(),
            stored.prefix
        )));
    }
    eprintln!("listing the assets at {stored}");
    Ok(storage.list(&stored.prefix).await?.into_iter().collect())
}

/// Asset uploads in flight at once.
const PARALLEL_UPLOADS: usize = 8;

/// Uploads `(file, key)` pairs, [`PARALLEL_UPLOADS`] at a time, saying on stderr how far it got
/// every few seconds.
async fn upload_assets(storage: &Storage, uploads: &[(std::path::PathBuf, String)]) -> Result<()> {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let total = uploads.len();
    let started = std::time::Instant::now();
    let mut reported = started;
    let mut done = 0;
    // A failure stops new uploads, but those already sent are awaited, not dropped: a request
    // dropped mid-way can still land in the bucket after the caller deleted the run's assets.
    let failed = AtomicBool::new(false);
    let mut uploading = futures::stream::iter(uploads)
        .map(|(path, key)| {
            let failed = &failed;
            async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                storage
                    .put_file(key, path, "model/gltf-binary")
                    .await
                    .with_context(|| format!("uploading asset {}", path.display()))?;
                Ok(true)
            }
        })
        .buffer_unordered(PARALLEL_UPLOADS);
    let mut first_error = None;
    while let Some(uploaded) = uploading.next().await {
        match uploaded {
            Ok(false) => {}
            Ok(true) => {
                done += 1;
                if reported.elapsed() >= std::time::Duration::from_secs(2) || done == total {
                    reported = std::time::Instant::now();
                    if started.elapsed() >= std::time::Duration::from_secs(2) {
                        eprintln!(
                            "uploaded {done} of {total} assets ({:.0}%, {:.0?})",
                            100.0 * done as f64 / total as f64,
                            started.elapsed()
                        );
                    }
                }
            }
            Err(error) => {
                failed.store(true, Ordering::Relaxed);
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What a run file would create (see [`crate::plan`]), with its configuration. Reads the inputs
/// but touches no database: pass `measured` to estimate with an earlier run's times.
pub fn plan_run(
    file: &Path,
    overrides: &InputOverrides,
    measured: Option<&MeasuredSeconds>,
) -> Result<(RunPlan, RunConfig)> {
    let (config, inputs) = (|| {
        let config = RunConfig::load_with(file, overrides)?;
        // Stored assets are not listed: a plan needs no bucket. `run create` checks them.
        let inputs = input::read_inputs(&config, input::MissingAssets::Count, None)?;
        anyhow::Ok((config, inputs))
    })()
    .map_err(InvalidInput)?;
    Ok((plan::plan_run(&config, &inputs, measured), config))
}

/// Seconds per group that `run` took: its succeeded generation jobs per family, and its
/// scoring jobs over both families.
pub async fn measured_seconds(pool: &PgPool, run: RunId, name: &str) -> Result<MeasuredSeconds> {
    let mut conn = pool.acquire().await?;
    let mut measured = MeasuredSeconds {
        run: name.to_string(),
        ..Default::default()
    };
    for (family, mean, _) in jobs::mean_seconds_by_family(&mut conn, run, JobKind::Generate).await?
    {
        match family.as_str() {
            "rigid" => measured.rigid_group = Some(mean),
            "deformable" => measured.deformable_group = Some(mean),
            _ => {}
        }
    }
    let scoring = jobs::mean_seconds_by_family(&mut conn, run, JobKind::Score).await?;
    let count: i64 = scoring.iter().map(|(_, _, count)| count).sum();
    if count > 0 {
        let total: f64 = scoring
            .iter()
            .map(|(_, mean, count)| mean * *count as f64)
            .sum();
        measured.score_group = Some(total / count as f64);
    }
    if measured.rigid_group.is_none()
        && measured.deformable_group.is_none()
        && measured.score_group.is_none()
    {
        bail!("run {name:?} has no succeeded generation or scoring job to measure");
    }
    Ok(measured)
}

/// Finds a run by id or by name.
pub async fn resolve_run(pool: &PgPool, name_or_id: &str) -> Result<RunId> {
    runs::by_name_or_id(pool, name_or_id)
        .await?
        .ok_or_else(|| NotFound(format!("no run named {name_or_id:?}")).into())
}

pub async fn summary(pool: &PgPool, run: RunId) -> Result<RunSummary> {
    let row = runs::get(pool, run)
        .await?
        .ok_or_else(|| NotFound(format!("no run {run}")))?;
    let dead_letters = dead_letters::count_of_run(pool, run).await?;
    let (dataset_shards, dataset_samples) =
        crate::dataset::packing::written(&mut *pool.acquire().await?, run).await?;
    Ok(RunSummary {
        id: run,
        dataset_index: keys::dataset_index(&row.name),
        dataset_shards,
        dataset_samples,
        name: row.name,
        state: row.state.to_string(),
        dataset_state: row.dataset_state,
        dataset_error: row.dataset_error,
        objects: objects::count_by_state_of_run(pool, run)
            .await?
            .into_iter()
            .collect(),
        jobs: jobs::count_by_state_of_run(pool, run)
            .await?
            .into_iter()
            .collect(),
        groups: crate::db::groups::count_by_decision_of_run(pool, run)
            .await?
            .into_iter()
            .collect(),
        dead_letters,
        waits: outages::run_summary(&mut *pool.acquire().await?, run).await?,
        created_at: row.created_at,
        completed_at: row.completed_at,
    })
}

pub async fn list_runs(pool: &PgPool) -> Result<Vec<RunSummary>> {
    let ids = runs::all(pool).await?;
    let mut summaries = Vec::with_capacity(ids.len());
    for id in ids {
        summaries.push(summary(pool, id).await?);
    }
    Ok(summaries)
}

/// Pauses, resumes or cancels a run. Cancelling also cancels its unfinished jobs and objects and
/// drops their unpublished messages.
pub async fn set_run_state(pool: &PgPool, run: RunId, to: RunState) -> Result<RunSummary> {
    let mut tx = pool.begin().await?;
    let (_, from) = crate::db::runs::config_and_state(&mut tx, run).await?;
    if from == to {
        bail!("run is already {to}");
    }
    if from == RunState::Completed {
        // The machine lets a completed run go on only for jobs `syncd run retry` reopens.
        bail!("a completed run cannot become {to} (`syncd run retry` reopens its failed jobs)");
    }
    runs::set_state(&mut tx, run, from, to).await?;
    if to == RunState::Active {
        // A finalised paused run goes on: its dataset grows again.
        crate::dataset::packing::reopen(&mut tx, run).await?;
    }
    if to == RunState::Cancelled {
        let open = [
            JobState::Pending,
            JobState::Queued,
            JobState::Running,
            JobState::RetryWait,
        ];
        for job in jobs::of_run_in_states(&mut tx, run, &open).await? {
            let change = Change {
                detail: Some("run cancelled"),
                ..Default::default()
            };
            jobs::transition(&mut tx, &job, JobState::Cancelled, change).await?;
        }
        outbox::delete_of_run(&mut tx, run).await?;
        objects::cancel_active_of_run(&mut tx, run).await?;
    }
    tx.commit().await?;
    summary(pool, run).await
}

/// `syncd run finalize`: a paused or cancelled run's dataset is finished with the groups
/// accepted so far (see [`crate::dataset::packing`]). An active run is refused: its dataset is
/// finished when its objects are.
pub async fn finalize_run(pool: &PgPool, run: RunId) -> Result<RunSummary> {
    let mut tx = pool.begin().await?;
    let (_, state) = crate::db::runs::config_and_state(&mut tx, run).await?;
    match state {
        RunState::Paused | RunState::Cancelled => {}
        RunState::Active => {
            return Err(InvalidInput(anyhow::anyhow!(
                "the run is active: its dataset is finished when its objects are; to stop early, \
                 pause or cancel it first (`syncd run pause`, `syncd run cancel`), then finalize"
            ))
            .into())
        }
        RunState::Completed => {
            return Err(InvalidInput(anyhow::anyhow!(
                "the run is completed: its dataset is finished"
            ))
            .into())
        }
    }
    crate::dataset::packing::request_finalize(&mut tx, run).await?;
    tx.commit().await?;
    summary(pool, run).await
}

/// Sends failed and dead-lettered jobs back to `pending` with fresh attempts, and reopens their
/// groups, objects and run (a completed run's dataset grows again as they finish).
pub async fn retry_jobs(pool: &PgPool, run: RunId, only: Option<JobId>) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let (_, run_state) = crate::db::runs::config_and_state(&mut tx, run).await?;
    if run_state == RunState::Cancelled {
        bail!("the run is cancelled; nothing in it can be retried");
    }
    let retryable = [JobState::Failed, JobState::DeadLettered];
    let jobs: Vec<JobRow> = jobs::of_run_in_states(&mut tx, run, &retryable)
        .await?
        .into_iter()
        .filter(|job| only.is_none_or(|id| id == job.id))
        .collect();
    if let Some(id) = only {
        if jobs.is_empty() {
            bail!("job {id} is not failed or dead-lettered in this run");
        }
    }
    for job in &jobs {
        let change = Change {
            detail: Some("retried by an admin"),
            ..Default::default()
        };
        jobs::transition(&mut tx, job, JobState::Pending, change).await?;
        if let Some(group) = job.group_id {
            crate::db::groups::reopen_failed(&mut tx, group).await?;
        }
        let reopened = [ObjectState::Failed, ObjectState::Skipped, ObjectState::Done];
        for (object, _) in planner::objects_of_job(&mut tx, job, &reopened).await? {
            objects::reopen(&mut tx, object).await?;
        }
    }
    if !jobs.is_empty() && run_state == RunState::Completed {
        crate::dataset::packing::reopen(&mut tx, run).await?;
        runs::set_state(&mut tx, run, RunState::Completed, RunState::Active).await?;
    }
    tx.commit().await?;
    Ok(jobs.len())
}

#[derive(Debug, Serialize)]
pub struct JobReport {
    pub id: JobId,
    pub run_id: RunId,
    pub object_id: ObjectId,
    pub group_id: Option<syncd_proto::GroupId>,
    pub kind: String,
    pub state: String,
    pub attempts: u32,
    pub max_attempts: u32,
    pub worker: Option<String>,
    pub last_error: Option<String>,
    pub payload: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub history: Vec<JobEvent>,
}

fn job_report(job: JobRow, history: Vec<JobEvent>) -> Result<JobReport> {
    Ok(JobReport {
        id: job.id,
        run_id: job.run_id,
        object_id: job.object_id,
        group_id: job.group_id,
        kind: job.kind.to_string(),
        state: job.state.to_string(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        worker: job.worker,
        last_error: job.last_error,
        payload: serde_json::to_value(&job.payload)?,
        output: job.output,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        history,
    })
}

pub async fn show_job(pool: &PgPool, id: JobId) -> Result<JobReport> {
    let job = jobs::get(&mut *pool.acquire().await?, id)
        .await?
        .ok_or_else(|| NotFound(format!("no job {id}")))?;
    job_report(job, jobs::history(pool, id).await?)
}

/// Which jobs `syncd jobs list` shows, and from where.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub run: Option<RunId>,
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    /// The last job of the previous page: this page starts after it.
    pub after: Option<JobId>,
    pub limit: u32,
}

/// One page of jobs, oldest first; `next` is the `after` of the following page, if any.
#[derive(Debug, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobListing>,
    pub next: Option<Uuid>,
}

/// Lists jobs in the order they were created, a page at a time. Pages are keyed by the last
/// job shown rather than by an offset, so a page costs the same deep into a million jobs and
/// jobs created meanwhile shift nothing.
pub async fn list_jobs(pool: &PgPool, filter: &JobFilter) -> Result<JobPage> {
    if let Some(after) = filter.after {
        if !jobs::exists(pool, after).await? {
            return Err(NotFound(format!("no job {after} to list after")).into());
        }
    }
    let limit = i64::from(filter.limit.max(1));
    let listed = jobs::ListingFilter {
        run: filter.run,
        state: filter.state,
        kind: filter.kind.map(|kind| kind.as_str()),
        after: filter.after,
    };
    let mut jobs = jobs::listing(pool, &listed, limit + 1).await?;
    let next = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|job| job.id)
    } else {
        None
    };
    Ok(JobPage { jobs, next })
}

#[derive(Debug, Serialize)]
pub struct ObjectReport {
    pub id: ObjectId,
    pub run_id: RunId,
    pub state: String,
    pub spec: serde_json::Value,
    pub backgrounds: Option<serde_json::Value>,
    pub descriptions: Option<serde_json::Value>,
    pub error: Option<String>,
    pub groups: Vec<serde_json::Value>,
    pub jobs: Vec<JobReport>,
}

pub async fn show_object(pool: &PgPool, id: ObjectId) -> Result<ObjectReport> {
    let row = objects::get(pool, id)
        .await?
        .ok_or_else(|| NotFound(format!("no object {id}")))?;
    let groups = crate::db::groups::summaries_of_object(pool, id).await?;
    let object_jobs = jobs::of_object(pool, id).await?;
    let mut jobs = Vec::with_capacity(object_jobs.len());
    for job in object_jobs {
        let events = jobs::history(pool, job.id).await?;
        jobs.push(job_report(job, events)?);
    }
    Ok(ObjectReport {
        id,
        run_id: RunId(row.run_id),
        state: row.state,
        spec: row.spec,
        backgrounds: row.backgrounds,
        descriptions: row.descriptions,
        error: row.error,
        groups,
        jobs,
    })
}

/// Exports the finished dataset of `run`, read from `datasets` (the dataset bucket), into the
/// local folder `out` (see [`crate::export`]).
pub async fn export_run(
    pool: &PgPool,
    datasets: &Storage,
    run: RunId,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> Result<ExportReport> {
    let run = summary(pool, run).await?;
    // A dataset still growing (the run active, or reopened by a retry) is not finished, even
    // though its manifest lists the shards written so far.
    if run.dataset_state != "written" {
        bail!(
            "run {:?} has no finished dataset (dataset {}, run {}); a run's dataset is finished \
             when the run completes, or when a paused or cancelled run is finalized \
             (`syncd run finalize`)",
            run.name,
            run.dataset_state,
            run.state
        );
    }
    let index: DatasetIndex = serde_json::from_slice(&datasets.get(&run.dataset_index).await?)
        .with_context(|| format!("reading the dataset index {}", run.dataset_index))?;
    export::export(datasets, &index, format, out, force).await
}
