//! `syncd-bench-scale`: the control plane under a simulated fleet, on this machine's real
//! PostgreSQL, RabbitMQ and Garage.
//!
//! The fleet is `--workers` TEST-ONLY worker processes (`syncd-test-worker`: the real worker job
//! loop with zero model time and 1024-dim embeddings, DINOv2-L's size), each taking one job at a
//! time as a GPU worker does. A run of `--objects` deformable objects with ready-made prompts
//! (one group each, the reference's recipe: a generation and a scoring job) goes through the real
//! coordinator. With `--skip-s3` the workers upload and read no image, so the figures are the
//! control plane's alone. Such a run has no images to pack or draw: the coordinator's packing
//! and contact-sheet loops are off (a day between packing passes, shards larger than the run,
//! no sheets), as they would otherwise only fail its groups one by one, and the dataset is not
//! waited for.
//!
//! It prints run creation time, end-to-end jobs per second, dispatch-to-start and
//! start-to-success latency percentiles (from the jobs' recorded transitions), the
//! coordinator's peak RSS and CPU-seconds per job, and the CPU each service used meanwhile.
//! The run's database is dropped at the end (a 100K-object run's history takes gigabytes).
//! `scripts/bench/scale.sh` runs it beside Celery on the same broker and database.
//!
//! While the jobs run it prints, on stderr, the jobs that succeeded each minute. On a server
//! with autovacuum off it stands in for autovacuum (see [`stand_in_for_autovacuum`]), unless
//! `--no-vacuum`: a deployment's server vacuums, and without it the figures of a long run
//! would measure the dead rows the server keeps, not the control plane. After the jobs it
//! times one refresh of the coordinator's gauges at the run's final size.
//!
//! ```sh
//! cargo build --release -p syncd-tests -p syncd-coordinator --bins
//! target/release/syncd-bench-scale --objects 10000 --workers 16 [--skip-s3]
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use syncd_tests::factory::Factory;
use syncd_tests::processes::wait_for;
use tokio::sync::oneshot;

#[derive(Parser)]
struct Args {
    /// Objects of the run (one group, so two jobs, each).
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Workers upload and read no image: the control plane alone.
    #[arg(long)]
    skip_s3: bool,
    /// Print one line of JSON with the figures as well.
    #[arg(long)]
    json: bool,
    /// Do not stand in for autovacuum when the server has it off.
    #[arg(long)]
    no_vacuum: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let data_plane_off: &[(&str, &str)] = &[
        ("SYNCD_LOOPS__PACKING_INTERVAL_MS", "86400000"),
        ("SYNCD_LOOPS__SHEET_CONCURRENCY", "0"),
    ];
    let coordinator_env = if args.skip_s3 { data_plane_off } else { &[] };
    let mut factory = Factory::start_with_coordinator_env(0, 0, coordinator_env).await?;
    let skip = if args.skip_s3 { "1" } else { "0" };
    for index in 0..args.workers {
        factory.start_worker_env(
            &format!("simulated-{index}"),
            0,
            &["generate", "score"],
            &[
                ("SYNCD_TEST_EMBEDDING_DIM", "1024"),
                ("SYNCD_TEST_SKIP_S3", skip),
            ],
        )?;
    }
    let pool = factory.env.pool().await?;
    let coordinator = factory.coordinator.as_ref().context("coordinator")?.pid();
    let cpu_before = cpu_seconds_by_program()?;

    let started = Instant::now();
    // Shards of 100 groups: the first is readable soon after the first groups are accepted.
    let samples_per_shard = if args.skip_s3 { u32::MAX } else { 100 };
    factory.create_run_with(
        "scale",
        args.objects,
        &format!("[dataset]\nsamples_per_shard = {samples_per_shard}\n"),
    )?;
    let creation = started.elapsed();
    let (groups,): (i64,) = sqlx::query_as("SELECT count(*) FROM groups")
        .fetch_one(&pool)
        .await?;
    let jobs = 2 * groups;
    let autovacuum = syncd_coordinator::db::autovacuum_on(&pool).await?;
    let vacuum = (!autovacuum && !args.no_vacuum)
        .then(|| Background::spawn(|stop| stand_in_for_autovacuum(pool.clone(), stop)));
    let progress = Background::spawn(|stop| report_progress(pool.clone(), jobs, stop));
    let flow_started = Instant::now();
    let timeout = Duration::from_secs(60 + jobs as u64);
    // Polled from the run tallies, as the dispatcher and the gauges read them: counting the
    // whole jobs table five times a second took a third of PostgreSQL's time at 100K objects,
    // and even a probe of its state index reads the entries of every dead row version. A
    // generation's success inserts its scoring job in the same transaction, so the tallies show
    // no unfinished job only once every job ended.
    wait_for(&format!("{jobs} jobs to succeed"), timeout, || async {
        use syncd_coordinator::db::run_tallies;
        use syncd_coordinator::state::JobState;
        run_tallies::fold(&pool).await?;
        let states: Vec<&str> = JobState::ALL
            .into_iter()
            .filter(|state| *state != JobState::Succeeded)
            .map(JobState::as_str)
            .collect();
        let counts = run_tallies::jobs_in_states(&pool, &states).await?;
        let terminal = |state: &str| {
            state
                .parse()
                .is_ok_and(|state: JobState| state.is_terminal())
        };
        let unfinished = counts.iter().any(|(state, _)| !terminal(state));
        let ended = counts.iter().any(|(state, _)| terminal(state));
        if ended {
            bail!("jobs ended without succeeding");
        }
        Ok((!unfinished).then_some(()))
    })
    .await
    .with_context(|| factory.logs())?;
    let flow = flow_started.elapsed();
    progress.stop().await?;
    // Nothing is left in flight, so every job exists: a generation's success creates its
    // scoring job in the same transaction.
    let (succeeded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await?;
    if succeeded != jobs {
        bail!("{succeeded} jobs succeeded, {jobs} expected");
    }
    let dataset = if args.skip_s3 {
        None
    } else {
        factory
            .wait_until_completed("scale", Duration::from_secs(600))
            .await?;
        Some(flow_started.elapsed() - flow)
    };
    let vacuum = match vacuum {
        Some(vacuum) => Some(vacuum.stop().await?),
        None => None,
    };
    let cpu_after = cpu_seconds_by_program()?;
    let coordinator_cpu = process_cpu_seconds(coordinator)?;
    let coordinator_peak_rss_mib = peak_rss_kib(coordinator)? as f64 / 1024.0;
    if args.skip_s3 {
        // Such a run's shards cannot be packed: stopped now, the coordinator does not start
        // its closing pass while the figures below are read.
        factory.stop_coordinator(Duration::from_secs(20))?;
    }
    let gauges_started = Instant::now();
    syncd_coordinator::metrics::update_gauges(&pool).await?;
    let gauge_refresh = gauges_started.elapsed();

    let latency = |from: &'static str, to: &'static str| {
        let pool = pool.clone();
        async move {
            let row: (Option<f64>, Option<f64>) = sqlx::query_as(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds),
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds)
                 FROM (SELECT extract(epoch FROM b.at - a.at)::float8 AS seconds
                       FROM job_events a JOIN job_events b
                         ON b.job_id = a.job_id AND b.from_state = a.to_state
                       WHERE a.to_state = $1 AND b.to_state = $2) AS waits",
            )
            .bind(from)
            .bind(to)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok((row.0.unwrap_or(0.0), row.1.unwrap_or(0.0)))
        }
    };
    let dispatch_to_start = latency("queued", "running").await?;
    // From the first accepted group to the first shard listed in the manifest.
    let (first_shard,): (Option<f64>,) = sqlx::query_as(
        "SELECT extract(epoch FROM (SELECT min(written_at) FROM dataset_shards WHERE samples > 0)
                              - (SELECT min(decided_at) FROM groups WHERE decision = 'accepted'))::float8",
    )
    .fetch_one(&pool)
    .await?;
    let start_to_success = latency("running", "succeeded").await?;

    let jobs_per_second = jobs as f64 / flow.as_secs_f64();
    let cpu: BTreeMap<String, f64> = cpu_after
        .iter()
        .map(|(program, after)| {
            let before = cpu_before.get(program).copied().unwrap_or(0.0);
            (program.clone(), after - before)
        })
        .filter(|(_, used)| *used > 0.05)
        .collect();
    let wall = flow.as_secs_f64();
    println!(
        "{} objects, {groups} groups, {jobs} jobs, {} simulated workers, S3 traffic {}",
        args.objects,
        args.workers,
        if args.skip_s3 { "off" } else { "on" }
    );
    // Without vacuuming, the job tables' dead rows slow the coordinator as the run grows.
    match (autovacuum, &vacuum) {
        (true, _) => println!("PostgreSQL autovacuum:   on"),
        (false, None) => println!("PostgreSQL autovacuum:   off, and not stood in for"),
        (false, Some(tally)) => println!(
            "PostgreSQL autovacuum:   off; stood in for by the benchmark: {} VACUUMs, {} ANALYZEs, {:.1} s",
            tally.vacuums,
            tally.analyses,
            tally.busy.as_secs_f64()
        ),
    }
    println!("run creation:            {:.2} s", creation.as_secs_f64());
    println!("jobs end to end:         {jobs_per_second:.0} jobs/s ({wall:.1} s)");
    println!(
        "dispatch to start:       p50 {:.3} s, p99 {:.3} s",
        dispatch_to_start.0, dispatch_to_start.1
    );
    println!(
        "start to success:        p50 {:.3} s, p99 {:.3} s (zero model time: report transit and apply)",
        start_to_success.0, start_to_success.1
    );
    if let Some(dataset) = dataset {
        println!("last job to dataset:     {:.1} s", dataset.as_secs_f64());
    }
    if let Some(first_shard) = first_shard {
        println!("first accepted group to first readable shard: {first_shard:.1} s");
    }
    println!(
        "coordinator:             peak RSS {coordinator_peak_rss_mib:.0} MiB, {:.2} ms CPU per job",
        1000.0 * coordinator_cpu / jobs as f64
    );
    println!(
        "gauge refresh:           {:.0} ms at this run's size (every 5 s in the coordinator)",
        1000.0 * gauge_refresh.as_secs_f64()
    );
    println!("CPU while jobs ran (share of one core, by program):");
    for (program, used) in &cpu {
        println!("  {program:<20} {:>5.0}%", 100.0 * used / wall);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "objects": args.objects, "groups": groups, "jobs": jobs, "workers": args.workers,
                "skip_s3": args.skip_s3, "creation_seconds": creation.as_secs_f64(),
                "jobs_per_second": jobs_per_second,
                "dispatch_to_start_p50": dispatch_to_start.0, "dispatch_to_start_p99": dispatch_to_start.1,
                "start_to_success_p50": start_to_success.0, "start_to_success_p99": start_to_success.1,
                "coordinator_peak_rss_mib": coordinator_peak_rss_mib,
                "first_shard_seconds": first_shard,
                "coordinator_cpu_ms_per_job": 1000.0 * coordinator_cpu / jobs as f64,
                "gauge_refresh_seconds": gauge_refresh.as_secs_f64(),
                "autovacuum": autovacuum,
                "vacuum_stand_in": vacuum.as_ref().map(|tally| serde_json::json!({
                    "vacuums": tally.vacuums, "analyses": tally.analyses,
                    "seconds": tally.busy.as_secs_f64(),
                })),
                "cpu_seconds": cpu,
            })
        );
    }
    pool.close().await;
    factory.finish_and_drop_database().await
}

/// A task of the benchmark's own that runs beside the jobs until it is told to stop.
struct Background<T> {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<T>>,
}

impl<T: Send + 'static> Background<T> {
    fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self {
            stop,
            task: tokio::spawn(body(stopped)),
        }
    }

    /// Stops the task and returns what it made, or the error it ended with.
    async fn stop(self) -> Result<T> {
        // A task that already ended with an error has dropped its receiver.
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Prints, every minute on stderr, the jobs that succeeded so far and in that minute: a long
/// run's rate as it goes, where a slowdown that grows with the run shows.
async fn report_progress(pool: PgPool, jobs: i64, mut stop: oneshot::Receiver<()>) -> Result<()> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(60));
    ticks.tick().await;
    let mut before = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = ticks.tick() => {}
        }
        let (succeeded,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
                .fetch_one(&pool)
                .await?;
        eprintln!(
            "minute {:>3}: {succeeded} of {jobs} jobs succeeded, {:.0} jobs/s in this minute",
            (started.elapsed().as_secs_f64() / 60.0).round(),
            (succeeded - before) as f64 / 60.0
        );
        before = succeeded;
    }
}

/// What the autovacuum stand-in did.
struct VacuumTally {
    vacuums: u64,
    analyses: u64,
    busy: Duration,
}

/// Does what PostgreSQL's autovacuum would do with its default settings, on a server that has
/// it off: once a minute (`autovacuum_naptime`), every table of the run's database with more
/// dead rows than 50 + 20% of its rows, or more inserts since its last vacuum than 1,000 + 20%,
/// is vacuumed, and one with more changes since its last analysis than 50 + 10% is analysed,
/// paced as autovacuum paces itself (a 2 ms pause per 200 units of cost).
async fn stand_in_for_autovacuum(
    pool: PgPool,
    mut stop: oneshot::Receiver<()>,
) -> Result<VacuumTally> {
    let mut conn: PgConnection = pool.acquire().await?.detach();
    // Statements without parameters go over the simple protocol, as VACUUM must.
    conn.execute("SET vacuum_cost_delay = '2ms'; SET vacuum_cost_limit = 200")
        .await?;
    let mut tally = VacuumTally {
        vacuums: 0,
        analyses: 0,
        busy: Duration::ZERO,
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(60));
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        let due: Vec<(String, bool, bool)> = sqlx::query_as(
            "SELECT format('%I.%I', s.schemaname, s.relname),
                    s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0)
                    OR s.n_ins_since_vacuum > 1000 + 0.2 * greatest(c.reltuples, 0),
                    s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)
             FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid",
        )
        .fetch_all(&mut conn)
        .await
        .context("reading the tables' dead rows")?;
        for (table, vacuum, analyse) in due {
            let statement = match (vacuum, analyse) {
                (true, true) => format!("VACUUM (ANALYZE) {table}"),
                (true, false) => format!("VACUUM {table}"),
                (false, true) => format!("ANALYZE {table}"),
                (false, false) => continue,
            };
            let started = Instant::now();
            conn.execute(statement.as_str())
                .await
                .with_context(|| format!("running {statement}"))?;
            tally.busy += started.elapsed();
            tally.vacuums += u64::from(vacuum);
            tally.analyses += u64::from(analyse);
        }
    }
    conn.close().await?;
    Ok(tally)
}

/// Linux's fixed clock-tick rate for `/proc/*/stat` times (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user and system) of one process so far, all its threads included.
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    cpu_of_stat(&stat).context("parsing /proc/PID/stat")
}

/// utime + stime of a `/proc/PID/stat` line (fields 14 and 15, after the parenthesised name).
fn cpu_of_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// CPU seconds used so far by the live processes of each program (`comm`): PostgreSQL's
/// backends, RabbitMQ (`beam.smp`), Garage, the coordinator and the simulated workers.
/// Processes that exited meanwhile are not counted.
fn cpu_seconds_by_program() -> Result<BTreeMap<String, f64>> {
    let mut totals = BTreeMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let program = stat[open + 1..close].to_string();
        if let Some(seconds) = cpu_of_stat(&stat) {
            *totals.entry(program).or_insert(0.0) += seconds;
        }
    }
    Ok(totals)
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")
}
