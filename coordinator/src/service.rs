//! The coordinator service: background loops over the database and the broker, run until a
//! shutdown signal.
//!
//! | loop | does |
//! | --- | --- |
//! | dispatcher | due jobs -> `queued` + outbox rows |
//! | relay | outbox rows -> RabbitMQ (confirmed) |
//! | results | worker reports -> job state, next jobs, decisions |
//! | dead letters | dead-lettered messages -> `dead_letters` rows, jobs `dead_lettered` |
//! | announcements | worker announcements -> `workers` rows (`syncd workers`) |
//! | reaper | expired leases -> retry |
//! | packing | accepted groups -> dataset shards and manifest in S3; finished runs `completed` |
//! | reclaim | failed groups' partial uploads -> deleted |
//! | sheets | decided groups -> contact sheets in S3 (`crate::pictures`) |
//! | metrics | gauges for Prometheus |
//!
//! A loop step that fails because a service is unreachable (see `syncd_infra::outage`) waits
//! the outage out with jittered backoff and goes on by itself when the service answers; the
//! coordinator's outages are logged, exported as metrics and written to the `outages` table.
//! Other errors are logged and the loop goes on. The broker loops share one connection; when it
//! fails they are restarted on a fresh one, and messages not yet acknowledged are redelivered by
//! the broker. A report that cannot be applied for a reason other than an outage is
//! dead-lettered, never handed back forever.
//!
//! The loops run only while this coordinator leads (`crate::leadership`): a second coordinator
//! on the same database stands by and takes over when the leader dies. Both serve metrics and
//! the gallery.
//!
//! With `gallery.listen` set, the coordinator also serves the read-only gallery
//! (`crate::gallery`).

use crate::config::CoordinatorConfig;
use crate::leadership::Candidate;
use crate::{
    dataset, db, dead_letters, dispatcher, gallery, leftovers, outages, pictures, reaper, relay,
    workers,
};
use anyhow::{bail, Context, Result};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use syncd_infra::broker::{self, Publisher, Topology};
use syncd_infra::outage::{self, Outages, Service, Unreachable};
use syncd_infra::storage::Storage;
use syncd_infra::telemetry;
use syncd_proto::messages::{WorkerAnnouncement, WorkerReport};
use tokio::sync::watch;
use tracing::Instrument;

/// What every loop shares.
#[derive(Clone)]
struct Loops {
    pool: PgPool,
    /// How long one step may take: `loops.step_timeout_secs` (the packing loop's is its own).
    step_timeout: Duration,
    /// Whether a step in progress is dropped at shutdown rather than finished. Only for a loop
    /// whose steps commit as they go and leave what they did not finish to the next step (the
    /// packing loop: a closing run's last pass can take minutes, and its shard stays `packing`
    /// for the next leader).
    abandon_at_stop: bool,
    outages: Arc<Outages>,
    stopped: watch::Receiver<bool>,
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(config: CoordinatorConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let outages = Arc::new(Outages::new("coordinator"));
    let pool = connect_database(&config, &outages).await?;
    // Advice only: a database that stops answering here is waited out by the loops, not fatal.
    match db::autovacuum_on(&pool).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "PostgreSQL's autovacuum is off: the jobs and groups tables keep every dead row, and \
             dispatch and the gauges slow down as runs grow; turn it on (autovacuum = on) or \
             run VACUUM ANALYZE on them regularly"
        ),
        Err(error) => tracing::warn!(
            error = format!("{error:#}"),
            "could not read PostgreSQL's autovacuum setting"
        ),
    }
    let storage = Storage::new(&config.storage);
    storage.ensure_bucket().await?;
    let datasets = config.dataset_storage(&storage);
    datasets.ensure_bucket().await?;
    let topology = Topology::new(&config.broker);
    if let Some(listen) = config.metrics.listen {
        // Ready while every service answers: a coordinator waiting out an outage does no work.
        let outages = outages.clone();
        let ready = Arc::new(move || !outages.any_down());
        syncd_infra::metrics::serve(listen, config.metrics.token.clone(), ready).await?;
        crate::metrics::initialise_counters();
    }
    if let Some(listen) = config.gallery.listen {
        gallery::serve(listen, pool.clone(), storage.clone()).await?;
    }

    crate::metrics::set_leading(false);
    let candidate = Candidate::new(
        &config.database,
        Duration::from_millis(config.loops.leadership_interval_ms),
    )?;
    let interval = candidate.interval();
    tracing::info!(session = candidate.name(), "coordinator started");
    tokio::pin!(shutdown);
    loop {
        let mut leadership = tokio::select! {
            _ = &mut shutdown => break,
            leadership = candidate.acquire(&outages, &pool) => leadership?,
        };
        crate::metrics::set_leading(true);
        tracing::info!("coordinator leading: running the loops");
        let (stop, stopped) = watch::channel(false);
        let shared = Loops {
            pool: pool.clone(),
            step_timeout: Duration::from_secs(config.loops.step_timeout_secs.max(1)),
            abandon_at_stop: false,
            outages: outages.clone(),
            stopped,
        };
        let mut tasks = spawn_loops(&config, shared, &storage, &datasets, &topology);
        let lost = tokio::select! {
            _ = &mut shutdown => None,
            error = leadership.lost() => Some(error),
        };
        let _ = stop.send(true);
        crate::metrics::set_leading(false);
        let Some(error) = lost else {
            tracing::info!("shutting down: finishing the current messages");
            join_loops(&mut tasks).await;
            leadership.release().await;
            break;
        };
        tracing::error!(
            error = format!("{error:#}"),
            "leadership lost: stopping the loops and standing by"
        );
        // Another coordinator may take over: the loops get one interval to stop, then are
        // aborted (their transactions roll back; their broker connection closes on drop, so the
        // broker redelivers what they held). A new leader waits longer than that before it starts.
        if tokio::time::timeout(interval, join_loops(&mut tasks))
            .await
            .is_err()
        {
            tasks.abort_all();
            join_loops(&mut tasks).await;
        }
        drop(leadership);
    }
    pool.close().await;
    Ok(())
}

/// Starts every loop of a leadership term; they run until `shared.stopped`.
fn spawn_loops(
    config: &CoordinatorConfig,
    shared: Loops,
    storage: &Storage,
    datasets: &Storage,
    topology: &Topology,
) -> tokio::task::JoinSet<Result<()>> {
    let intervals = &config.loops;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (topology, limit) = (topology.clone(), intervals.max_queued_per_route);
        tasks.spawn(shared.clone().every(
            "dispatcher",
            intervals.dispatch_interval_ms,
            &[Service::Database],
            move |pool| {
                let topology = topology.clone();
                async move {
                    dispatcher::dispatch_due(&pool, &topology, limit)
                        .await
                        .map(drop)
                }
            },
        ));
    }
    {
        let outages = shared.outages.clone();
        tasks.spawn(shared.clone().every(
            "reaper",
            intervals.reaper_interval_ms,
            &[Service::Database],
            move |pool| {
                // Leases count only while the coordinator hears from workers: after an outage of
                // the database or the broker, heartbeats get a whole lease to arrive first.
                let healthy_for = outages
                    .healthy_since(&[Service::Database, Service::Broker])
                    .map(|since| since.elapsed());
                async move {
                    match healthy_for {
                        Some(healthy_for) => {
                            reaper::reap_expired(&pool, healthy_for).await.map(drop)
                        }
                        None => Ok(()),
                    }
                }
            },
        ));
    }
    {
        let (storage, datasets) = (storage.clone(), datasets.clone());
        let concurrency = intervals.packing_concurrency;
        let packing = Loops {
            step_timeout: Duration::from_secs(intervals.packing_timeout_secs),
            abandon_at_stop: true,
            ..shared.clone()
        };
        tasks.spawn(packing.every(
            "packing",
            intervals.packing_interval_ms,
            &[Service::Database, Service::Storage],
            move |pool| {
                let (storage, datasets) = (storage.clone(), datasets.clone());
                async move {
                    let buckets = dataset::packing::Buckets {
                        work: &storage,
                        datasets: &datasets,
                    };
                    dataset::packing::pack(&pool, &buckets, concurrency)
                        .await
                        .map(drop)
                }
            },
        ));
    }
    {
        let storage = storage.clone();
        tasks.spawn(shared.clone().every(
            "reclaim",
            intervals.packing_interval_ms,
            &[Service::Database, Service::Storage],
            move |pool| {
                let storage = storage.clone();
                async move {
                    leftovers::reclaim_failed_groups(&pool, &storage)
                        .await
                        .map(drop)
                }
            },
        ));
    }
    if intervals.sheet_concurrency > 0 {
        let (storage, concurrency) = (storage.clone(), intervals.sheet_concurrency);
        tasks.spawn(shared.clone().every(
            "sheets",
            intervals.sheet_interval_ms,
            &[Service::Database, Service::Storage],
            move |pool| {
                let storage = storage.clone();
                async move {
                    pictures::write_missing_sheets(&pool, &storage, concurrency)
                        .await
                        .map(drop)
                }
            },
        ));
    }
    tasks.spawn(
        shared
            .clone()
            .every("metrics", 5_000, &[Service::Database], |pool| async move {
                crate::metrics::update_gauges(&pool).await
            }),
    );
    tasks.spawn(broker_loops(config.clone(), shared, topology.clone()));

    tasks
}

/// Waits for every loop to end, logging the ones that ended with an error.
async fn join_loops(tasks: &mut tokio::task::JoinSet<Result<()>>) {
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(error)) = result {
            tracing::error!(error = format!("{error:#}"), "loop ended with an error");
        }
    }
}

/// Connects to the database, waiting for it while it is unreachable: a coordinator started
/// during a database outage (or before the database, under compose) starts when it answers.
async fn connect_database(config: &CoordinatorConfig, outages: &Outages) -> Result<PgPool> {
    let mut delays = outage::backoff();
    loop {
        match db::connect(&config.database).await {
            Ok(pool) => {
                outages.up(Service::Database);
                return Ok(pool);
            }
            Err(error) if outage::classify(&error) == Some(Service::Database) => {
                outages.down(Service::Database, &error);
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
            }
            Err(error) => return Err(error),
        }
    }
}

impl Loops {
    /// Calls `step` every `interval_ms` until shutdown. A step that fails because one of
    /// `services` is unreachable marks the outage and backs off with jitter until a step
    /// succeeds; other errors are logged, not fatal.
    async fn every<F, Fut>(
        mut self,
        name: &'static str,
        interval_ms: u64,
        services: &'static [Service],
        mut step: F,
    ) -> Result<()>
    where
        F: FnMut(PgPool) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms.max(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut delays = outage::backoff();
        loop {
            tokio::select! {
                _ = self.stopped.changed() => return Ok(()),
                _ = ticker.tick() => {}
            }
            let bounded = tokio::time::timeout(self.step_timeout, step(self.pool.clone()));
            let outcome = if self.abandon_at_stop {
                tokio::select! {
                    _ = self.stopped.changed() => return Ok(()),
                    outcome = bounded => outcome,
                }
            } else {
                bounded.await
            };
            let result = match outcome {
                Ok(result) => result,
                // A step that hangs waits on a connection that went silent: the first service
                // the loop needs, the database for every loop.
                Err(elapsed) => Err(anyhow::Error::new(elapsed)
                    .context(Unreachable {
                        service: services[0],
                    })
                    .context(format!("the {name} step took over {:?}", self.step_timeout))),
            };
            match result {
                Ok(()) => {
                    delays = outage::backoff();
                    self.answered(services).await;
                }
                Err(error) => match outage::classify(&error) {
                    Some(service) => {
                        self.outages.down(service, &error);
                        let delay = delays.next().unwrap_or(Duration::from_secs(1));
                        tokio::select! {
                            _ = self.stopped.changed() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    None => {
                        tracing::warn!(
                            task = name,
                            error = format!("{error:#}"),
                            "loop step failed"
                        )
                    }
                },
            }
        }
    }

    /// Messages of `what` could not be written to the database: the outage behind `error` is
    /// marked, or the error logged. Either way the messages go back to the broker to be tried
    /// again.
    fn not_recorded(&self, what: &str, error: &anyhow::Error) {
        match outage::classify(error) {
            Some(service) => {
                self.outages.down(service, error);
            }
            None => tracing::error!(
                error = format!("{error:#}"),
                "cannot record {what}; will retry"
            ),
        }
    }

    /// Marks `services` as answering, and writes down the outages this ends.
    async fn answered(&self, services: &[Service]) {
        outages::answered(&self.pool, &self.outages, services).await;
    }
}

/// The loops that need the broker, restarted on a fresh connection whenever it fails.
async fn broker_loops(config: CoordinatorConfig, shared: Loops, topology: Topology) -> Result<()> {
    let mut stopped = shared.stopped.clone();
    let mut delays = outage::backoff();
    loop {
        let attempt = async {
            let connection = broker::connect(&config.broker, Duration::from_secs(60)).await?;
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            let publisher = Publisher::open(&connection).await?;
            shared.answered(&[Service::Broker]).await;
            let relay = shared.clone().every(
                "relay",
                config.loops.relay_interval_ms,
                &[Service::Database, Service::Broker],
                |pool| {
                    let publisher = publisher.clone();
                    async move {
                        // An outbox backlog is drained at once, not one batch per tick.
                        while relay::relay_batch(&pool, &publisher).await? > 0 {}
                        Ok(())
                    }
                },
            );
            let result = tokio::select! {
                result = relay => result,
                result = consume_results(&connection, &shared, &topology) => result,
                result = consume_dead_letters(&connection, &shared, &topology) => result,
                result = consume_announcements(&connection, &shared, &topology) => result,
            };
            let _ = connection.close(200, "coordinator stopping".into()).await;
            result
        };
        let delay = match attempt.await {
            Ok(()) if *stopped.borrow() => return Ok(()),
            Ok(()) => {
                tracing::warn!("broker loops ended; reconnecting");
                delays = outage::backoff();
                delays.next().unwrap_or(Duration::from_secs(1))
            }
            Err(error) => {
                if outage::classify(&error) == Some(Service::Broker) {
                    shared.outages.down(Service::Broker, &error);
                } else {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "broker connection failed; reconnecting"
                    );
                }
                delays.next().unwrap_or(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = stopped.changed() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Reports applied in one transaction at most: the reports already waiting when the consumer
/// turns to them, so a busy factory shares one commit among many and an idle one waits for none.
const REPORT_BATCH: usize = 128;

async fn consume_results(
    connection: &lapin::Connection,
    shared: &Loops,
    topology: &Topology,
) -> Result<()> {
    let mut stopped = shared.stopped.clone();
    let results_queue = topology.results_queue();
    let channel = broker::consumer_channel(connection, 2 * REPORT_BATCH as u16).await?;
    let mut consumer = channel
        .basic_consume(
            results_queue.as_str().into(),
            "coordinator-results".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming results")?;
    let mut delays = outage::backoff();
    loop {
        let Some(deliveries) =
            next_batch(&mut consumer, &mut stopped, REPORT_BATCH, "results").await?
        else {
            return Ok(());
        };
        let mut reports = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match WorkerReport::decode(&delivery.data) {
                Ok(report) => reports.push((delivery, report)),
                Err(error) => {
                    tracing::warn!(%error, "undecodable report sent to the dead-letter queue");
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await?;
                }
            }
        }
        if apply_reports(shared, &results_queue, reports, &mut delays).await? {
            delays = outage::backoff();
        }
    }
}

/// The next messages of `consumer`: the first to arrive, and up to `limit` in all of those
/// already delivered. `None` on shutdown.
async fn next_batch(
    consumer: &mut lapin::Consumer,
    stopped: &mut watch::Receiver<bool>,
    limit: usize,
    what: &str,
) -> Result<Option<Vec<lapin::message::Delivery>>> {
    let first = tokio::select! {
        _ = stopped.changed() => return Ok(None),
        delivery = consumer.next() => delivery,
    };
    let mut deliveries = vec![first];
    while deliveries.len() < limit {
        match consumer.next().now_or_never() {
            Some(delivery) => deliveries.push(delivery),
            None => break,
        }
    }
    deliveries
        .into_iter()
        .map(|delivery| {
            let Some(delivery) = delivery else {
                bail!("the {what} consumer was cancelled")
            };
            delivery.with_context(|| format!("receiving {what}"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Applies `reports` in one transaction and acknowledges them after the commit. A report that
/// cannot be applied for a reason of its own is rolled back alone and dead-lettered; an outage
/// rolls back the batch, which is handed back (after the next of `delays`) to be applied once the
/// database answers. True when the database answered.
async fn apply_reports(
    shared: &Loops,
    results_queue: &str,
    reports: Vec<(lapin::message::Delivery, WorkerReport)>,
    delays: &mut impl Iterator<Item = Duration>,
) -> Result<bool> {
    let Some((last, _)) = reports.last() else {
        return Ok(true);
    };
    let pool = &shared.pool;
    // A batch nearly always applies whole, so it is first tried without savepoints (two round
    // trips per report fewer). A report that fails for a reason of its own aborts that try; the
    // batch is then applied again with each report under a savepoint, so that only that report
    // is set aside. (Metrics counted by the aborted try are not taken back.)
    let applying = async {
        match apply_batch(pool, &reports, Savepoints::None).await? {
            Batch::Committed(unapplicable) => Ok(unapplicable),
            Batch::ReportFailed => match apply_batch(pool, &reports, Savepoints::EachReport).await?
            {
                Batch::Committed(unapplicable) => Ok(unapplicable),
                Batch::ReportFailed => unreachable!("with savepoints a failed report is set aside"),
            },
        }
    };
    let applied = match tokio::time::timeout(shared.step_timeout, applying).await {
        Ok(applied) => applied,
        // Applying reports only talks to the database: no answer in time is its outage.
        Err(elapsed) => Err(anyhow::Error::new(elapsed).context(Unreachable {
            service: Service::Database,
        })),
    };
    let unapplicable = match applied {
        Ok(unapplicable) => unapplicable,
        Err(error) => {
            // Nothing was committed, so nothing is half-done.
            let Some(service) = outage::classify(&error) else {
                return Err(error);
            };
            // Hand the reports back and wait: they apply once the database answers.
            shared.outages.down(service, &error);
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
            for (delivery, _) in &reports {
                broker::requeue(delivery).await?;
            }
            return Ok(false);
        }
    };
    shared.answered(&[Service::Database]).await;
    if unapplicable.is_empty() {
        // One acknowledgement for the batch: every earlier delivery of this channel is settled
        // already, and later ones are not in the batch.
        last.ack(BasicAckOptions { multiple: true }).await?;
        return Ok(true);
    }
    let mut unapplicable = unapplicable.into_iter().peekable();
    for (index, (delivery, report)) in reports.iter().enumerate() {
        match unapplicable.next_if(|(failed, _)| *failed == index) {
            None => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Some((_, error)) => {
                dead_letter_report(pool, results_queue, delivery, report, &error, delays).await?;
            }
        }
    }
    Ok(true)
}

/// Whether each report of a batch goes under a savepoint of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Savepoints {
    None,
    EachReport,
}

/// What became of a batch of reports.
enum Batch {
    /// The transaction committed; these reports (by index, with why) could not be applied and
    /// were left out.
    Committed(Vec<(usize, anyhow::Error)>),
    /// A report could not be applied and, without savepoints, nothing was committed.
    ReportFailed,
}

/// Applies `reports` in one transaction. An outage is an error, with nothing committed.
async fn apply_batch(
    pool: &PgPool,
    reports: &[(lapin::message::Delivery, WorkerReport)],
    savepoints: Savepoints,
) -> Result<Batch> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let mut batch = crate::results::ReportBatch::default();
    let mut unapplicable = Vec::new();
    // The batch's usual starts in one statement and the other reports' jobs locked together,
    // on the first try only: with savepoints each report goes alone, so that one that cannot
    // apply is set aside by itself.
    let started = match savepoints {
        Savepoints::None => {
            let batch_reports: Vec<&WorkerReport> =
                reports.iter().map(|(_, report)| report).collect();
            match crate::results::prepare_batch(&mut tx, &batch_reports, &mut batch).await {
                Ok(started) => started,
                Err(error) if outage::classify(&error).is_some() => return Err(error),
                Err(_) => return Ok(Batch::ReportFailed),
            }
        }
        Savepoints::EachReport => vec![false; reports.len()],
    };
    for (index, (delivery, report)) in reports.iter().enumerate() {
        let span = report_span(delivery, report);
        if started[index] {
            span.in_scope(
                || tracing::debug!(job = %report.job_id, "start applied with the batch's"),
            );
            continue;
        }
        let applied = match savepoints {
            Savepoints::None => {
                crate::results::apply(&mut tx, report, &mut batch)
                    .instrument(span)
                    .await
            }
            Savepoints::EachReport => {
                let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
                let applied = crate::results::apply(&mut savepoint, report, &mut batch)
                    .instrument(span)
                    .await;
                match &applied {
                    Ok(_) => savepoint.commit().await?,
                    Err(error) if outage::classify(error).is_some() => {}
                    Err(_) => savepoint.rollback().await?,
                }
                applied
            }
        };
        match applied {
            Ok(applied) => tracing::debug!(job = %report.job_id, ?applied, "report applied"),
            Err(error) if outage::classify(&error).is_some() => return Err(error),
            Err(_) if savepoints == Savepoints::None => return Ok(Batch::ReportFailed),
            Err(error) => unapplicable.push((index, error)),
        }
    }
    match batch.finish(&mut tx).await {
        Ok(()) => {}
        Err(error) if outage::classify(&error).is_some() => return Err(error),
        // Only a batch without savepoints keeps writes for the end (each report of a batch with
        // savepoints makes its own), so this one is tried again report by report.
        Err(_) => return Ok(Batch::ReportFailed),
    }
    tx.commit().await.context("committing reports")?;
    Ok(Batch::Committed(unapplicable))
}

/// The span of applying `report`. Reports sent within a job's span continue its trace; heartbeats
/// carry no trace and get no span (one per heartbeat would bury the traces).
fn report_span(delivery: &lapin::message::Delivery, report: &WorkerReport) -> tracing::Span {
    let traceparent = broker::traceparent(delivery);
    let span = match traceparent {
        Some(_) => tracing::info_span!(
            "apply report",
            job = %report.job_id,
            attempt = report.attempt,
            worker = %report.worker
        ),
        None => tracing::Span::none(),
    };
    telemetry::follow(&span, traceparent.as_deref());
    span
}

/// A report that can never apply goes to the dead letters, recorded with the reason.
async fn dead_letter_report(
    pool: &PgPool,
    results_queue: &str,
    delivery: &lapin::message::Delivery,
    report: &WorkerReport,
    error: &anyhow::Error,
    delays: &mut impl Iterator<Item = Duration>,
) -> Result<()> {
    let reason = format!("{error:#}");
    tracing::error!(job = %report.job_id, error = %reason, "a report cannot be applied: dead-lettering it");
    match dead_letters::record_report(pool, results_queue, report, &delivery.data, &reason).await {
        Ok(()) => {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Err(error) if outage::classify(&error).is_some() => {
            requeue_after(delivery, delays).await?;
        }
        // The broker's dead-letter queue keeps it; its consumer records it as it can.
        Err(_) => {
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
        }
    }
    Ok(())
}

async fn consume_dead_letters(
    connection: &lapin::Connection,
    shared: &Loops,
    topology: &Topology,
) -> Result<()> {
    consume_into_database(
        connection,
        shared,
        &topology.dead_letter_queue(),
        "dead letters",
        |pool, delivery| async move {
            let (queue, reason) =
                dead_letters::death_reason(delivery.properties.headers().as_ref());
            dead_letters::record(&pool, queue, &reason, &delivery.data).await
        },
    )
    .await
}

/// Announcements recorded at once at most: a busy fleet announces twice per job.
const ANNOUNCEMENT_BATCH: usize = 256;

/// Keeps the latest announcement of each worker in `workers`, a batch of the announcements
/// waiting at a time in one statement. A batch that cannot be written goes back to the broker
/// after a backoff delay.
async fn consume_announcements(
    connection: &lapin::Connection,
    shared: &Loops,
    topology: &Topology,
) -> Result<()> {
    let mut stopped = shared.stopped.clone();
    let channel = broker::consumer_channel(connection, ANNOUNCEMENT_BATCH as u16).await?;
    let mut consumer = channel
        .basic_consume(
            topology.workers_queue().as_str().into(),
            "coordinator-worker-announcements".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming worker announcements")?;
    let mut delays = outage::backoff();
    loop {
        let Some(deliveries) = next_batch(
            &mut consumer,
            &mut stopped,
            ANNOUNCEMENT_BATCH,
            "worker announcements",
        )
        .await?
        else {
            return Ok(());
        };
        let announcements: Vec<WorkerAnnouncement> = deliveries
            .iter()
            .filter_map(
                |delivery| match WorkerAnnouncement::decode(&delivery.data) {
                    Ok(announcement) => Some(announcement),
                    // A snapshot that does not decode is worth nothing: the next one replaces it.
                    Err(error) => {
                        tracing::warn!(%error, "undecodable worker announcement dropped");
                        None
                    }
                },
            )
            .collect();
        match workers::record_latest(&shared.pool, &announcements).await {
            Ok(()) => {
                delays = outage::backoff();
                for delivery in &deliveries {
                    delivery.ack(BasicAckOptions::default()).await?;
                }
            }
            Err(error) => {
                shared.not_recorded("worker announcements", &error);
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
                for delivery in &deliveries {
                    broker::requeue(delivery).await?;
                }
            }
        }
    }
}

/// Consumes `queue`, writing each message to the database with `record` and acknowledging it
/// once written. A message that cannot be written yet goes back to the broker after a backoff
/// delay: an outage (or any other error) loses nothing.
async fn consume_into_database<F, Fut>(
    connection: &lapin::Connection,
    shared: &Loops,
    queue: &str,
    what: &'static str,
    record: F,
) -> Result<()>
where
    F: Fn(PgPool, Arc<lapin::message::Delivery>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut stopped = shared.stopped.clone();
    let channel = broker::consumer_channel(connection, 32).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("coordinator-{}", what.replace(' ', "-"))
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {what}"))?;
    let mut delays = outage::backoff();
    loop {
        let delivery = tokio::select! {
            _ = stopped.changed() => return Ok(()),
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else {
            bail!("the {what} consumer was cancelled")
        };
        let delivery = Arc::new(delivery.with_context(|| format!("receiving {what}"))?);
        match record(shared.pool.clone(), delivery.clone()).await {
            Ok(()) => {
                delays = outage::backoff();
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(error) => {
                shared.not_recorded(what, &error);
                requeue_after(&delivery, &mut delays).await?;
            }
        }
    }
}

/// Waits the next backoff delay, then hands the message back to the broker to be tried again.
async fn requeue_after(
    delivery: &lapin::message::Delivery,
    delays: &mut impl Iterator<Item = Duration>,
) -> Result<()> {
    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
    broker::requeue(delivery).await
}
