//! `syncd`: the admin CLI. Data goes to stdout (text, or JSON with `--json`), messages to stderr;
//! any failure exits non-zero with a one-line error. The exit status tells scripts what kind of
//! failure it was (see [`exit_status`]). Commands that only read or change job state need only
//! the `[database]` section of the configuration; those that touch S3 need `[storage]` too.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use syncd_coordinator::admin::{self, InvalidInput, JobFilter, NotFound, RunSummary};
use syncd_coordinator::config::CoordinatorConfig;
use syncd_coordinator::db;
use syncd_coordinator::export::ExportFormat;
use syncd_coordinator::groups::{self, DecisionFilter, GroupRecord};
use syncd_coordinator::pictures::{self, SheetSource};
use syncd_coordinator::progress::{self, PaceMeter, RunProgress, StagePace};
use syncd_coordinator::run_config::InputOverrides;
use syncd_coordinator::state::JobState;
use syncd_coordinator::state::RunState;
use syncd_coordinator::{leadership, leftovers, outages, regenerations, workers};
use syncd_infra::outage;
use syncd_infra::storage::Storage;
use syncd_proto::messages::JobKind;
use syncd_proto::{GroupId, JobId, ObjectId};

#[derive(Parser)]
#[command(name = "syncd", version, about = "Drive the syncd data factory")]
struct Cli {
    /// The coordinator's configuration file; `SYNCD_` environment variables override it.
    #[arg(long, global = true, env = "SYNCD_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs: dataset-generation campaigns.
    #[command(subcommand)]
    Run(RunCommand),
    /// Jobs: one unit of work each.
    #[command(subcommand, visible_alias = "jobs")]
    Job(JobCommand),
    /// Objects: one rigid asset or deformable subject each.
    #[command(subcommand)]
    Object(ObjectCommand),
    /// Groups: the images of one object generated together, and the filter's decision on them.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Messages the broker dead-lettered.
    DeadLetters,
    /// Workers alive now: host, device, models, queues, current job, last announcement.
    Workers {
        /// Also workers that stopped or stopped announcing.
        #[arg(long)]
        all: bool,
    },
    /// Coordinators connected to the database: the one leading (running the loops) and those
    /// standing by to take over.
    Coordinators,
}

/// Input paths that replace a run file's (a shipped recipe names its inputs; these say where
/// they are here).
#[derive(Args)]
struct InputArgs {
    /// The ready-made objects file (JSON lines) instead of the run file's `input.objects_file`.
    #[arg(long)]
    objects_file: Option<PathBuf>,
    /// The Cap3D-style `uid,caption` CSV instead of the run file's `input.rigid_csv`.
    #[arg(long)]
    rigid_csv: Option<PathBuf>,
    /// Where the `{uid}.glb` assets are, instead of the run file's `input.assets_dir`: a folder,
    /// or `s3://BUCKET/PREFIX` in the working bucket (read in place, nothing uploaded).
    #[arg(long)]
    assets_dir: Option<syncd_coordinator::input::AssetSource>,
}

impl InputArgs {
    fn overrides(self) -> InputOverrides {
        InputOverrides {
            objects_file: self.objects_file,
            rigid_csv: self.rigid_csv,
            assets_dir: self.assets_dir,
        }
    }
}

#[derive(Subcommand)]
enum RunCommand {
    /// Create a run from its configuration file.
    Create {
        file: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
    },
    /// Print what a run file would create (objects, jobs, groups, LLM requests, GPU time)
    /// without creating anything. Needs no database unless --measured-from is given.
    Plan {
        file: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        /// Estimate GPU time from the per-group times of this earlier run (name or id).
        #[arg(long)]
        measured_from: Option<String>,
    },
    /// List runs with their progress.
    List,
    /// Show one run's progress.
    Status { run: String },
    /// Follow a run until it ends: progress per stage with rates and time left, decisions and
    /// busy workers. Exits 0 when the run completes, 1 when it is cancelled; with --json, one
    /// line of JSON per update.
    Watch {
        run: String,
        /// Seconds between updates.
        #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Stop dispatching new jobs of a run.
    Pause { run: String },
    /// Dispatch a paused run's jobs again.
    Resume { run: String },
    /// Cancel a run's unfinished jobs.
    Cancel { run: String },
    /// Retry every failed or dead-lettered job of a run.
    Retry { run: String },
    /// Finish the dataset of a paused or cancelled run with the groups accepted so far: the
    /// rest are packed into shards and the manifest is marked complete. Resuming the run later
    /// grows the dataset again.
    Finalize { run: String },
    /// Draw a grid of the run's groups of one decision: each group's images with their masks
    /// outlined, labelled with its decision, position, id, scores and reason.
    Sheet {
        run: String,
        #[command(flatten)]
        decision: DecisionArgs,
        /// Groups to show at most, the first in the run's order (object, then group index).
        #[arg(short = 'n', long = "limit", default_value_t = 64,
              value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// The PNG file to write.
        #[arg(long, value_name = "PNG")]
        out: PathBuf,
    },
    /// Write the run's finished dataset into a local folder, in the layout another program
    /// reads.
    Export {
        run: String,
        /// The layout.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The folder to write; it must be new or empty, unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Write into a folder that has files (files of the same names are replaced).
        #[arg(long)]
        force: bool,
    },
    /// Delete the working copies of the images and masks of groups already packed into written
    /// dataset shards (the dataset keeps them; records and contact sheets stay). Such groups
    /// can no longer be regenerated and compared, nor shown with their images.
    Reclaim { run: String },
    /// List the run's files in S3 that nothing refers to (what failed attempts left).
    Leftovers {
        run: String,
        /// Delete them (the run must not be active).
        #[arg(long)]
        delete: bool,
    },
}

/// Which groups a grid shows: exactly one decision.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct DecisionArgs {
    /// Groups the filter accepted.
    #[arg(long)]
    accepted: bool,
    /// Groups the filter rejected.
    #[arg(long)]
    rejected: bool,
    /// Groups left out as near duplicates of an accepted group.
    #[arg(long)]
    near_duplicate: bool,
    /// Groups whose generation or scoring failed.
    #[arg(long)]
    failed: bool,
}

impl DecisionArgs {
    fn filter(&self) -> DecisionFilter {
        if self.accepted {
            DecisionFilter::Accepted
        } else if self.rejected {
            DecisionFilter::Rejected
        } else if self.near_duplicate {
            DecisionFilter::NearDuplicate
        } else {
            DecisionFilter::Failed
        }
    }
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Show a group: its object, prompts, scores, decision, files and contact sheet.
    Show {
        group: GroupId,
        /// Also write its contact sheet to this PNG file: the one in S3, or, while the group has
        /// none there yet, one drawn now.
        #[arg(long, value_name = "PNG")]
        sheet: Option<PathBuf>,
    },
    /// Generate a group again from its lineage, into a prefix of its own, and compare the images
    /// with the group's, pixel by pixel. Exits 0 when every image and mask is bit-identical and
    /// 1 when any differs (the output says whether the models, code or device differed too).
    /// Needs a generation worker of the group's model family; the group itself is not changed.
    Regenerate {
        group: GroupId,
        /// How long to wait for the regeneration, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Show a job with its history.
    Show { job: JobId },
    /// List jobs, oldest first, a page at a time.
    List {
        /// Only the jobs of this run (name or id).
        #[arg(long)]
        run: Option<String>,
        /// Only jobs in this state (pending, queued, running, retry_wait, succeeded, failed,
        /// dead_lettered, cancelled).
        #[arg(long, value_parser = parse_job_state)]
        state: Option<JobState>,
        /// Only jobs of this kind (prompt, prior, generate, score).
        #[arg(long, value_parser = parse_job_kind)]
        kind: Option<JobKind>,
        /// Jobs per page.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Start after this job: the `next` the previous page printed.
        #[arg(long)]
        after: Option<JobId>,
    },
    /// Retry a failed or dead-lettered job.
    Retry { job: JobId },
}

#[derive(Subcommand)]
enum ObjectCommand {
    /// Show an object with its groups and jobs.
    Show { object: ObjectId },
}

/// Exit statuses beyond 0, so that scripts can tell failures apart.
mod status {
    /// Anything else; also `run watch` of a run that was cancelled.
    pub const FAILED: u8 = 1;
    /// A malformed command line (clap's own status) or run file or input.
    pub const INVALID_INPUT: u8 = 2;
    /// The run, job or object asked about does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// PostgreSQL (or S3, for the commands that use it) could not be reached.
    pub const UNREACHABLE: u8 = 4;
}

/// The exit status of a failed command. (`downcast_ref` finds a marker whether it is the error
/// itself or wrapped in context.)
fn exit_status(error: &anyhow::Error) -> u8 {
    if outage::classify(error).is_some() {
        status::UNREACHABLE
    } else if error.downcast_ref::<NotFound>().is_some() {
        status::NOT_FOUND
    } else if error.downcast_ref::<InvalidInput>().is_some() {
        status::INVALID_INPUT
    } else {
        status::FAILED
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::from(exit_status(&error))
        }
    }
}

fn parse_job_state(text: &str) -> Result<JobState, String> {
    JobState::ALL
        .into_iter()
        .find(|state| state.as_str() == text)
        .ok_or_else(|| {
            let names: Vec<&str> = JobState::ALL.iter().map(|state| state.as_str()).collect();
            format!("unknown job state {text:?} (expected {})", names.join(", "))
        })
}

fn parse_job_kind(text: &str) -> Result<JobKind, String> {
    text.parse()
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.1 to 3600"
        )),
    }
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", text(value));
    }
    Ok(())
}

fn summary_text(run: &RunSummary) -> String {
    let counts = |map: &std::collections::BTreeMap<String, i64>| {
        map.iter()
            .map(|(key, count)| format!("{key}={count}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let waits: String = run
        .waits
        .iter()
        .map(|wait| {
            let waited = outages::human_duration(std::time::Duration::from_secs_f64(
                wait.waited_secs.max(0.0),
            ));
            let now = match wait.waiting_since {
                Some(since) => format!(
                    "; {} job(s) waiting for it since {}",
                    wait.jobs_waiting,
                    since.format("%H:%M:%S")
                ),
                None => String::new(),
            };
            format!(
                "\n  waited for {}: {} outage(s), {waited}{now}",
                wait.service, wait.outages
            )
        })
        .collect();
    format!(
        "{name} ({id}) {state}\n  objects: {objects}\n  jobs:    {jobs}\n  groups:  {groups}\n  dead letters: {dead}{waits}\n  dataset: {dataset_state} at {index}, {shards} shard(s) with {samples} sample(s) written{error}",
        name = run.name,
        id = run.id,
        state = run.state,
        objects = counts(&run.objects),
        jobs = counts(&run.jobs),
        groups = counts(&run.groups),
        dead = run.dead_letters,
        dataset_state = run.dataset_state,
        index = run.dataset_index,
        shards = run.dataset_shards,
        samples = run.dataset_samples,
        error = run.dataset_error.as_ref().map(|error| format!(" ({error})")).unwrap_or_default(),
    )
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    if let Command::Run(RunCommand::Plan {
        file,
        inputs,
        measured_from,
    }) = cli.command
    {
        return plan(cli.config.as_deref(), &file, inputs, measured_from, json).await;
    }
    let config_file = cli.config.as_deref();
    let pool = db::connect(&CoordinatorConfig::load_database(config_file)?).await?;
    // Only the commands that touch S3 need (and check) the whole configuration.
    let full_config = || CoordinatorConfig::load(config_file);
    let storage = || -> Result<Storage> { Ok(Storage::new(&full_config()?.storage)) };
    match cli.command {
        Command::Run(command) => match command {
            RunCommand::Create { file, inputs } => {
                let storage = storage()?;
                let run = admin::create_run(&pool, &storage, &file, &inputs.overrides()).await?;
                print(json, &run, summary_text)
            }
            RunCommand::Plan { .. } => unreachable!("planned above, without a database"),
            RunCommand::List => {
                let runs = admin::list_runs(&pool).await?;
                print(json, &runs, |runs| {
                    runs.iter().map(summary_text).collect::<Vec<_>>().join("\n")
                })
            }
            RunCommand::Status { run } => {
                let id = admin::resolve_run(&pool, &run).await?;
                print(json, &admin::summary(&pool, id).await?, summary_text)
            }
            RunCommand::Pause { run } => change_run(&pool, &run, RunState::Paused, json).await,
            RunCommand::Resume { run } => change_run(&pool, &run, RunState::Active, json).await,
            RunCommand::Cancel { run } => change_run(&pool, &run, RunState::Cancelled, json).await,
            RunCommand::Finalize { run } => {
                let id = admin::resolve_run(&pool, &run).await?;
                print(json, &admin::finalize_run(&pool, id).await?, summary_text)
            }
            RunCommand::Watch { run, interval } => {
                let id = admin::resolve_run(&pool, &run).await?;
                watch(
                    &pool,
                    id,
                    std::time::Duration::from_secs_f64(interval),
                    json,
                )
                .await
            }
            RunCommand::Reclaim { run } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let reclaimed = leftovers::reclaim_packed(&pool, &storage()?, id).await?;
                print(json, &reclaimed, |reclaimed| {
                    format!(
                        "deleted {} files of {} packed groups of run {}",
                        reclaimed.files, reclaimed.groups, reclaimed.run
                    )
                })
            }
            RunCommand::Leftovers { run, delete } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let storage = storage()?;
                let found = if delete {
                    leftovers::reclaim(&pool, &storage, id).await?
                } else {
                    leftovers::find(&pool, &storage, id).await?
                };
                print(json, &found, |found| {
                    let mut text = format!(
                        "{} files under runs/{}/: {} referred to, {} of work in flight, {} left over{}",
                        found.scanned,
                        found.run,
                        found.referred,
                        found.in_flight,
                        found.leftovers.len(),
                        if found.deleted { " (deleted)" } else { "" }
                    );
                    for key in &found.leftovers {
                        text.push_str(&format!("\n  {key}"));
                    }
                    text
                })
            }
            RunCommand::Sheet {
                run,
                decision,
                limit,
                out,
            } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let storage = storage()?;
                let filter = decision.filter();
                let (png, shown, total) =
                    pictures::run_grid(&pool, &storage, id, filter, limit).await?;
                write_png(&out, &png)?;
                print(
                    json,
                    &serde_json::json!({ "file": out, "groups": shown, "total": total }),
                    |_| {
                        format!(
                            "wrote {shown} of {total} {} groups of run {run} to {}",
                            filter.as_str(),
                            out.display()
                        )
                    },
                )
            }
            RunCommand::Export {
                run,
                format,
                out,
                force,
            } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let config = full_config()?;
                let datasets = config.dataset_storage(&Storage::new(&config.storage));
                let report = admin::export_run(&pool, &datasets, id, format, &out, force).await?;
                print(json, &report, |report| {
                    format!(
                        "exported {} samples ({} images) of run {} to {}",
                        report.samples,
                        report.images,
                        report.run_name,
                        report.out.display()
                    )
                })
            }
            RunCommand::Retry { run } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let retried = admin::retry_jobs(&pool, id, None).await?;
                print(json, &serde_json::json!({ "retried": retried }), |_| {
                    format!("{retried} job(s) sent back to pending")
                })
            }
        },
        Command::Job(JobCommand::Show { job }) => {
            let report = admin::show_job(&pool, job).await?;
            print(json, &report, |report| {
                serde_json::to_string_pretty(report).unwrap_or_default()
            })
        }
        Command::Job(JobCommand::List {
            run,
            state,
            kind,
            limit,
            after,
        }) => {
            let run = match run {
                Some(run) => Some(admin::resolve_run(&pool, &run).await?),
                None => None,
            };
            let filter = JobFilter {
                run,
                state,
                kind,
                after,
                limit,
            };
            let page = admin::list_jobs(&pool, &filter).await?;
            print(json, &page, job_page_text)
        }
        Command::Job(JobCommand::Retry { job }) => {
            let run = admin::show_job(&pool, job).await?.run_id;
            let retried = admin::retry_jobs(&pool, run, Some(job)).await?;
            print(json, &serde_json::json!({ "retried": retried }), |_| {
                format!("job {job} sent back to pending")
            })
        }
        Command::Object(ObjectCommand::Show { object }) => {
            let report = admin::show_object(&pool, object).await?;
            print(json, &report, |report| {
                serde_json::to_string_pretty(report).unwrap_or_default()
            })
        }
        Command::Group(GroupCommand::Show { group, sheet }) => {
            let record = groups::get(&pool, group).await?;
            print(json, &record, group_text)?;
            if let Some(path) = sheet {
                let storage = storage()?;
                let (png, source) = pictures::sheet(&storage, &record).await?;
                write_png(&path, &png)?;
                let whence = match source {
                    SheetSource::Stored => "the one in S3",
                    SheetSource::Drawn => "drawn now: none is in S3 yet",
                };
                eprintln!(
                    "wrote the contact sheet of group {group} to {} ({whence})",
                    path.display()
                );
            }
            Ok(())
        }
        Command::Group(GroupCommand::Regenerate { group, timeout }) => {
            let storage = storage()?;
            let requested = regenerations::request(&pool, group).await?;
            eprintln!(
                "regeneration {} of group {group}: job {}, waiting for a generation worker",
                requested.number, requested.job
            );
            let timeout = std::time::Duration::from_secs(timeout);
            let done = regenerations::wait(&pool, group, requested.number, timeout).await?;
            if done.job_state != JobState::Succeeded {
                anyhow::bail!(
                    "regeneration {} of group {group} ended {}: {}",
                    done.number,
                    done.job_state,
                    done.error.as_deref().unwrap_or("no error recorded")
                );
            }
            let comparison = regenerations::compare(&pool, &storage, &done).await?;
            print(json, &comparison, comparison_text)?;
            if comparison.identical {
                Ok(())
            } else {
                Err(RegenerationDiffers(group).into())
            }
        }
        Command::Workers { all } => {
            let workers = workers::list(&pool, all).await?;
            print(json, &workers, |workers| {
                if workers.is_empty() {
                    return "no workers alive (they announce themselves once connected)".into();
                }
                workers
                    .iter()
                    .map(worker_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Coordinators => {
            let coordinators = leadership::coordinators(&pool).await?;
            print(json, &coordinators, |coordinators| {
                if coordinators.is_empty() {
                    return "no coordinator is connected to this database".into();
                }
                coordinators
                    .iter()
                    .map(|coordinator| {
                        format!(
                            "{:<12} {}  connected since {}{}",
                            coordinator.role,
                            coordinator.session,
                            coordinator.connected_at.format("%Y-%m-%d %H:%M:%S UTC"),
                            coordinator
                                .address
                                .as_ref()
                                .map(|address| format!(" from {address}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::DeadLetters => {
            let letters = syncd_coordinator::db::dead_letters::list(&pool).await?;
            print(json, &letters, |letters| {
                letters
                    .iter()
                    .map(|letter| {
                        format!(
                            "#{} {} job={} queue={}: {}",
                            letter.id,
                            letter.received_at,
                            letter
                                .job_id
                                .map(|id| id.to_string())
                                .unwrap_or_else(|| "-".into()),
                            letter.queue.as_deref().unwrap_or("-"),
                            letter.reason
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

fn job_page_text(page: &admin::JobPage) -> String {
    if page.jobs.is_empty() {
        return "no jobs".into();
    }
    let mut lines: Vec<String> = page
        .jobs
        .iter()
        .map(|job| {
            let error = job
                .last_error
                .as_deref()
                .map(|error| {
                    let line = error.lines().next().unwrap_or_default();
                    format!("  {}", line.chars().take(100).collect::<String>())
                })
                .unwrap_or_default();
            format!(
                "{id}  {route:<24} {state:<13} attempt {attempts}/{max}  {worker}{error}",
                id = job.id,
                route = job.route,
                state = job.state,
                attempts = job.attempts,
                max = job.max_attempts,
                worker = job.worker.as_deref().unwrap_or("-"),
            )
        })
        .collect();
    if let Some(next) = page.next {
        lines.push(format!("more: --after {next}"));
    }
    lines.join("\n")
}

/// One `run watch --json` line: the snapshot and each stage's pace.
#[derive(Serialize)]
struct WatchUpdate<'a> {
    #[serde(flatten)]
    progress: &'a RunProgress,
    pace: &'a [StagePace],
}

/// `group regenerate` made other pixels: it exits with status 1.
#[derive(Debug, thiserror::Error)]
#[error("the regenerated images of group {0} differ from its own")]
struct RegenerationDiffers(GroupId);

/// What `group regenerate` found, one file a line, then the setups.
fn comparison_text(comparison: &regenerations::Comparison) -> String {
    let mut lines = vec![format!(
        "regeneration {} of group {}: {}",
        comparison.number,
        comparison.group,
        if comparison.identical {
            "bit-identical"
        } else {
            "differs"
        }
    )];
    for file in &comparison.files {
        let verdict = match (file.identical, file.differing_values, &file.detail) {
            (true, _, _) => "bit-identical".to_string(),
            (false, _, Some(detail)) => detail.clone(),
            (false, Some(values), None) => format!(
                "{values} pixel values differ, by at most {}",
                file.max_difference.unwrap_or_default()
            ),
            (false, None, None) => "differs".to_string(),
        };
        lines.push(format!("  {} {}: {verdict}", file.what, file.index));
    }
    lines.push(format!(
        "  original:    {}",
        provenance_text(comparison.original_setup.as_ref())
    ));
    lines.push(format!(
        "  regenerated: {}",
        provenance_text(comparison.regenerated_setup.as_ref())
    ));
    lines.push(
        match comparison.same_setup {
            Some(true) => "  same models, code and device: the images must be bit-identical",
            Some(false) => "  the models, code or device differ: the images need not match",
            None => "  the original setup is not recorded: nothing to say about the difference",
        }
        .to_string(),
    );
    lines.join("\n")
}

/// What ran a job, on one line: worker, host, device, precision, code, models with their hashes.
fn provenance_text(provenance: Option<&syncd_proto::lineage::Provenance>) -> String {
    let Some(provenance) = provenance else {
        return "not recorded".to_string();
    };
    let models: Vec<String> = provenance
        .models
        .iter()
        .map(|model| format!("{} {}", model.name, model.content_hash))
        .collect();
    format!(
        "{} on {} ({} {}), code {}, {}",
        provenance.worker,
        provenance.host,
        provenance.device,
        provenance.dtype,
        provenance.code_version,
        models.join(", ")
    )
}

/// The run ended without completing: `run watch` exits with status 1.
#[derive(Debug, thiserror::Error)]
#[error("run {0} was cancelled")]
struct RunCancelled(String);

/// `syncd run watch`: a snapshot every `interval` until the run ends. On a terminal the frame is
/// redrawn in place; otherwise (a log, a pipe) each frame is printed after the last. A database
/// outage is waited out, since a watch runs for days.
async fn watch(
    pool: &sqlx::PgPool,
    run: syncd_proto::RunId,
    interval: std::time::Duration,
    json: bool,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    const BAR_WIDTH: usize = 30;
    let terminal = std::io::stdout().is_terminal();
    let mut meter = PaceMeter::new(std::time::Duration::from_secs(60));
    let mut drawn = 0;
    let mut delays = outage::backoff();
    loop {
        let snapshot = match progress::snapshot(pool, run).await {
            Ok(snapshot) => snapshot,
            Err(error) if outage::classify(&error).is_some() => {
                eprintln!("database unreachable, retrying: {error:#}");
                tokio::time::sleep(delays.next().unwrap_or(interval)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        delays = outage::backoff();
        let pace = meter.add(&snapshot);
        let mut out = std::io::stdout().lock();
        if json {
            let update = WatchUpdate {
                progress: &snapshot,
                pace: &pace,
            };
            writeln!(out, "{}", serde_json::to_string(&update)?)?;
        } else {
            let lines = progress::render(&snapshot, &pace, BAR_WIDTH);
            if terminal && drawn > 0 {
                // Back to the top of the last frame, and clear it.
                write!(out, "\x1b[{drawn}A\x1b[J")?;
            }
            for line in &lines {
                writeln!(out, "{line}")?;
            }
            if !terminal {
                writeln!(out)?;
            }
            drawn = lines.len();
        }
        out.flush()?;
        drop(out);
        if snapshot.ended() {
            if snapshot.state == syncd_coordinator::state::RunState::Cancelled.as_str() {
                return Err(RunCancelled(snapshot.name).into());
            }
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

fn write_png(path: &std::path::Path, png: &[u8]) -> Result<()> {
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

/// A group's record for a person: one fact a line.
fn group_text(record: &GroupRecord) -> String {
    let object = match &record.object {
        syncd_proto::messages::ObjectSpec::Deformable {
            category,
            description,
        } => format!("{category}: {description}"),
        syncd_proto::messages::ObjectSpec::Rigid { uid, caption, .. } => {
            format!("asset {uid}: {caption}")
        }
    };
    let mut lines = vec![
        format!("group {}", record.id),
        format!("  run:      {} ({})", record.run_name, record.run_id),
        format!(
            "  object:   {} ({}) {object}",
            record.object_ordinal, record.object_id
        ),
        format!("  index:    {}, seed {}", record.index, record.seed),
        format!(
            "  decision: {}{}",
            record.decision,
            record
                .reason
                .as_ref()
                .map(|reason| format!(" ({reason})"))
                .unwrap_or_default()
        ),
    ];
    for (index, prompt) in record.prompts.iter().enumerate() {
        let score = record.aesthetic_text(index);
        let valid = match record.image_valid(index) {
            Some(true) => ", valid",
            Some(false) => ", not valid",
            None => "",
        };
        let key = record
            .image_keys
            .as_ref()
            .and_then(|keys| keys.get(index))
            .map_or("not generated", String::as_str);
        lines.push(format!(
            "  image {index}:  {score}{valid}; {key}\n            {prompt}"
        ));
    }
    if let Some(pairs) = &record.pairs {
        let pairs: Vec<String> = pairs
            .iter()
            .map(|pair| format!("{}-{} {:.4}", pair.a, pair.b, pair.similarity))
            .collect();
        lines.push(format!("  pairs:    {}", pairs.join(", ")));
    }
    if let Some(lineage) = &record.lineage {
        let generation = &lineage.generation;
        let true_cfg = generation.true_cfg.as_ref().map_or(String::new(), |cfg| {
            format!(", true CFG {} from step {}", cfg.scale, cfg.from_step)
        });
        lines.push(format!(
            "  settings: {}x{}, {} steps, guidance {}{true_cfg}",
            generation.width, generation.height, generation.steps, generation.guidance
        ));
        lines.push(format!(
            "  made by:  {}",
            provenance_text(lineage.generated_by.as_ref())
        ));
        lines.push(format!(
            "  scored:   {}",
            provenance_text(lineage.scored_by.as_ref())
        ));
    }
    if let Some(trace) = &record.trace_id {
        lines.push(format!("  trace:    {trace}"));
    }
    let sheet = &record.sheet;
    lines.push(match (&sheet.key, sheet.written_at, &sheet.error) {
        (Some(key), Some(at), _) => format!(
            "  sheet:    {key} (drawn {})",
            at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        (_, _, Some(error)) => format!(
            "  sheet:    failed ({error}); tried again at {}",
            sheet
                .retry_at
                .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default()
        ),
        _ if record.decision == "pending" => "  sheet:    none until the group is decided".into(),
        _ => "  sheet:    not drawn yet".into(),
    });
    lines.join("\n")
}

fn worker_text(worker: &workers::WorkerRow) -> String {
    let list = |value: &serde_json::Value| {
        value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let doing = match (&worker.current_job, &worker.current_kind) {
        (Some(job), kind) => format!("{} job {job}", kind.as_deref().unwrap_or("unknown")),
        (None, _) => worker.state.clone(),
    };
    let seen = (chrono::Utc::now() - worker.last_seen).num_seconds().max(0) as u64;
    format!(
        "{name}{gone}  host={host} device={device} models={models} queues={routes}  {doing}  \
         last heard {seen} ago",
        name = worker.name,
        gone = if worker.alive { "" } else { " (gone)" },
        host = worker.host,
        device = worker.device,
        models = list(&worker.models),
        routes = list(&worker.routes),
        seen = outages::human_duration(std::time::Duration::from_secs(seen)),
    )
}

/// `syncd run plan`: the database is opened only to measure an earlier run.
async fn plan(
    config: Option<&std::path::Path>,
    file: &std::path::Path,
    inputs: InputArgs,
    measured_from: Option<String>,
    json: bool,
) -> Result<()> {
    let measured = match measured_from {
        Some(run) => {
            let config = CoordinatorConfig::load(config)?;
            let pool = db::connect(&config.database).await?;
            let id = admin::resolve_run(&pool, &run).await?;
            Some(admin::measured_seconds(&pool, id, &run).await?)
        }
        None => None,
    };
    let (plan, run_config) = admin::plan_run(file, &inputs.overrides(), measured.as_ref())?;
    print(json, &plan, |plan| plan.to_text(&run_config))
}

async fn change_run(pool: &sqlx::PgPool, run: &str, to: RunState, json: bool) -> Result<()> {
    let id = admin::resolve_run(pool, run).await?;
    print(
        json,
        &admin::set_run_state(pool, id, to).await?,
        summary_text,
    )
}
