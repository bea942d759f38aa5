//! `syncd`: the admin CLI. Data goes to stdout (text, or JSON with `--json`), messages to stderr;
//! any failure exits non-zero with a one-line error.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use syncd_coordinator::admin::{self, RunSummary};
use syncd_coordinator::config::CoordinatorConfig;
use syncd_coordinator::db;
use syncd_coordinator::export::ExportFormat;
use syncd_coordinator::run_config::InputOverrides;
use syncd_coordinator::state::RunState;
use syncd_coordinator::{leftovers, outages, workers};
use syncd_infra::storage::Storage;
use syncd_proto::{JobId, ObjectId};

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
    #[command(subcommand)]
    Job(JobCommand),
    /// Objects: one rigid asset or deformable subject each.
    #[command(subcommand)]
    Object(ObjectCommand),
    /// Messages the broker dead-lettered.
    DeadLetters,
    /// Workers alive now: host, device, models, queues, current job, last announcement.
    Workers {
        /// Also workers that stopped or stopped announcing.
        #[arg(long)]
        all: bool,
    },
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
    /// The folder of `{uid}.glb` assets instead of the run file's `input.assets_dir`.
    #[arg(long)]
    assets_dir: Option<PathBuf>,
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
    /// Stop dispatching new jobs of a run.
    Pause { run: String },
    /// Dispatch a paused run's jobs again.
    Resume { run: String },
    /// Cancel a run's unfinished jobs.
    Cancel { run: String },
    /// Retry every failed or dead-lettered job of a run.
    Retry { run: String },
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
    /// List the run's files in S3 that nothing refers to (what failed attempts left).
    Leftovers {
        run: String,
        /// Delete them (the run must not be active).
        #[arg(long)]
        delete: bool,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Show a job with its history.
    Show { job: JobId },
    /// Retry a failed or dead-lettered job.
    Retry { job: JobId },
}

#[derive(Subcommand)]
enum ObjectCommand {
    /// Show an object with its groups and jobs.
    Show { object: ObjectId },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
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
        "{name} ({id}) {state}\n  objects: {objects}\n  jobs:    {jobs}\n  groups:  {groups}\n  dead letters: {dead}{waits}\n  dataset: {dataset_state} at {index}{error}",
        name = run.name,
        id = run.id,
        state = run.state,
        objects = counts(&run.objects),
        jobs = counts(&run.jobs),
        groups = counts(&run.groups),
        dead = run.dead_letters,
        dataset_state = run.dataset_state,
        index = run.dataset_index,
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
    let config = CoordinatorConfig::load(cli.config.as_deref())?;
    let pool = db::connect(&config.database).await?;
    match cli.command {
        Command::Run(command) => match command {
            RunCommand::Create { file, inputs } => {
                let storage = Storage::new(&config.storage);
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
            RunCommand::Leftovers { run, delete } => {
                let id = admin::resolve_run(&pool, &run).await?;
                let storage = Storage::new(&config.storage);
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
            RunCommand::Export {
                run,
                format,
                out,
                force,
            } => {
                let id = admin::resolve_run(&pool, &run).await?;
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
        Command::DeadLetters => {
            let letters = admin::dead_letters(&pool).await?;
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
