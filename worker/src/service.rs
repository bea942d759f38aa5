//! The job loop: consume jobs of the configured kinds, one at a time, and for each one report
//! `Started`, run it (heartbeating meanwhile), report the outcome, then acknowledge the message.
//!
//! A run that failed because a service was unreachable (`syncd_infra::outage::classify`) is not
//! reported: the worker keeps the message, waits for the service with jittered backoff, saying
//! in its heartbeats what it waits for, and runs the job again. An outage never costs a job an
//! attempt.
//!
//! Acknowledging last is what makes a crash harmless: a worker killed while it holds a job never
//! acked it, so the broker redelivers it to another worker, whose result the coordinator counts
//! once. A message that cannot be decoded is rejected to the dead-letter queue at once: retrying
//! it could never help.
//!
//! A worker takes jobs from each of its routes (a job kind, or a generation model family it
//! loaded) one at a time, and holds no other job's message while it runs one, so a worker busy
//! for minutes keeps nothing an idle worker could start. When it is free it first pulls
//! (`basic.get`) from its routes in turn, starting with the one after its last job's, so that
//! every route is served; only when all are empty does it subscribe to them (prefetch 1 each)
//! and wait. The first job to arrive ends the subscriptions; a message handed to another route's
//! subscription in that same instant goes straight back to its queue. Pulling while work is
//! queued keeps such returns rare: each counts as a delivery towards the queue's delivery limit.
//!
//! A job that fails on the device (libtorch out of memory, a CUDA error) is reported as a
//! transient failure like any other; after `device_failure_limit` of them in a row the worker
//! stops taking jobs and [`Worker::run`] returns [`DeviceFailing`], for the binary to exit with
//! status 3 and the worker's supervisor to restart it on a fresh device context.
//!
//! The worker announces itself on the workers queue (see `heartbeat::Announcer`) while it is
//! connected, and says when it stops.

use crate::config::WorkerConfig;
use crate::heartbeat::{Announcer, Heartbeat};
use crate::runner::{JobContext, JobError, JobRunner};
use anyhow::{bail, Context, Result};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncd_infra::broker::{self, BrokerConfig, Publisher, Topology};
use syncd_infra::metrics::Readiness;
use syncd_infra::outage::{self, Outages, Service};
use syncd_infra::storage::Storage;
use syncd_infra::telemetry;
use syncd_proto::lineage::Provenance;
use syncd_proto::messages::{
    JobKind, JobMessage, JobOutput, ReportEvent, Route, WorkerAnnouncement, WorkerReport,
    WorkerState, WIRE_VERSION,
};
use tokio::sync::watch;
use tracing::Instrument;

/// What running a job came to.
type Outcome = Result<JobOutput, JobError>;

/// Everything the loop needs, built from the worker's configuration by [`Worker::new`].
pub struct Worker {
    pub name: String,
    pub broker: BrokerConfig,
    pub context: JobContext,
    pub runners: Vec<Arc<dyn JobRunner>>,
    /// On shutdown, how long the current job may go on before it is handed back.
    pub shutdown_grace: Duration,
    /// Jobs in a row that may fail on the device before the worker stops.
    pub device_failure_limit: u32,
    /// What the worker announces of itself; `state` and `current_job` are filled in as it runs.
    pub announcement: WorkerAnnouncement,
    pub status: WorkerStatus,
}

/// What the worker's probes read, made before the models load so that `/healthz` answers
/// meanwhile.
#[derive(Clone)]
pub struct WorkerStatus {
    /// The services this worker is waiting for.
    pub outages: Arc<Outages>,
    /// Set while the worker is connected and taking jobs.
    taking_jobs: Arc<AtomicBool>,
}

impl WorkerStatus {
    pub fn new(name: &str) -> Self {
        Self {
            outages: Arc::new(Outages::new(name)),
            taking_jobs: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `/readyz`: taking jobs, and every service answers.
    pub fn readiness(&self) -> Readiness {
        let status = self.clone();
        Arc::new(move || status.taking_jobs.load(Ordering::Relaxed) && !status.outages.any_down())
    }
}

impl Worker {
    /// What made a runner's results: this worker, its host, and the runner's models (with their
    /// weights' hashes), device and precision, and this build's version. `None` for a runner
    /// without models.
    fn provenance(&self, runner: &dyn JobRunner) -> Option<Provenance> {
        let setup = runner.model_setup()?;
        Some(Provenance {
            worker: self.name.clone(),
            host: self.announcement.host.clone(),
            device: setup.device,
            dtype: setup.dtype,
            code_version: crate::identity::CODE_VERSION.to_string(),
            models: setup.models,
        })
    }

    /// The worker of `config` running `runners`, announcing what they loaded.
    pub fn new(
        config: &WorkerConfig,
        runners: Vec<Arc<dyn JobRunner>>,
        status: WorkerStatus,
    ) -> Self {
        let name = config.name();
        let announcement = WorkerAnnouncement {
            version: WIRE_VERSION,
            worker: name.clone(),
            host: hostname::get()
                .map(|host| host.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into()),
            device: config.worker.device.clone(),
            models: runners.iter().flat_map(|runner| runner.models()).collect(),
            routes: runners
                .iter()
                .flat_map(|runner| runner.routes())
                .map(|route| route.to_string())
                .collect(),
            state: WorkerState::Idle,
            current_job: None,
            interval_secs: config.worker.announce_secs,
        };
        Self {
            name: name.clone(),
            broker: config.broker.clone(),
            context: JobContext {
                storage: Storage::new(&config.storage),
                worker: name,
            },
            runners,
            shutdown_grace: Duration::from_secs(config.worker.shutdown_grace_secs),
            device_failure_limit: config.worker.device_failure_limit,
            announcement,
            status,
        }
    }
}

/// The worker's device failed `failures` jobs in a row: it stopped taking jobs.
#[derive(Debug, thiserror::Error)]
#[error(
    "the device failed {failures} jobs in a row ([worker] device_failure_limit): stopping, for \
     the worker's supervisor to restart it"
)]
pub struct DeviceFailing {
    pub failures: u32,
}

/// One route's queue, pulled from or subscribed to while the worker is free.
struct RouteConsumer {
    route: Route,
    queue: String,
    tag: String,
    channel: Channel,
    consumer: Option<Consumer>,
}

impl RouteConsumer {
    /// Takes the first job waiting in the route's queue, if any, without subscribing.
    async fn pull(&self) -> Result<Option<Delivery>> {
        let message = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await
            .with_context(|| format!("taking a job from {}", self.queue))?;
        Ok(message.map(|message| message.delivery))
    }

    async fn subscribe(&mut self) -> Result<()> {
        if self.consumer.is_none() {
            let consumer = self
                .channel
                .basic_consume(
                    self.queue.as_str().into(),
                    self.tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("consuming {}", self.queue))?;
            self.consumer = Some(consumer);
        }
        Ok(())
    }

    /// Ends the subscription, handing back every message the broker sent before it heard so.
    async fn unsubscribe(&mut self, publisher: &Publisher) -> Result<()> {
        let Some(mut consumer) = self.consumer.take() else {
            return Ok(());
        };
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
            .with_context(|| format!("unsubscribing from {}", self.queue))?;
        // Deliveries precede the cancel's confirmation on the connection, so they are already
        // here: take what is ready, never wait.
        while let Some(Some(delivery)) = consumer.next().now_or_never() {
            if let Ok(delivery) = delivery {
                publisher.hand_back(&self.queue, &delivery).await?;
            }
        }
        Ok(())
    }
}

/// Counts the device failures of consecutive jobs.
#[derive(Default)]
struct DeviceHealth {
    failures_in_a_row: u32,
}

impl DeviceHealth {
    /// Records a job's outcome; true when the device failed `limit` jobs in a row.
    fn record(&mut self, outcome: &Result<JobOutput, JobError>, limit: u32) -> bool {
        match outcome {
            Ok(_) => self.failures_in_a_row = 0,
            Err(error) if error.device_fault => self.failures_in_a_row += 1,
            // A job's own failure says nothing about the device.
            Err(_) => {}
        }
        limit > 0 && self.failures_in_a_row >= limit
    }
}

impl Worker {
    /// Runs until `shutdown` resolves, reconnecting to the broker when the connection fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        if self.runners.is_empty() {
            bail!("this worker has no job kinds to run");
        }
        let (stop, stopped) = watch::channel(false);
        let work = async {
            // Failures in a row count across broker sessions: a reconnection heals no device.
            let mut device = DeviceHealth::default();
            loop {
                match self.session(stopped.clone(), &mut device).await {
                    Ok(()) => return Ok(()),
                    Err(error) if error.is::<DeviceFailing>() => return Err(error),
                    Err(error) => {
                        if outage::classify(&error) == Some(Service::Broker) {
                            self.status.outages.down(Service::Broker, &error);
                        } else {
                            tracing::error!(
                                error = format!("{error:#}"),
                                "broker session failed; reconnecting"
                            );
                        }
                        let mut stopped = stopped.clone();
                        tokio::select! {
                            _ = stopped.wait_for(|stop| *stop) => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }
            }
        };
        tokio::pin!(work);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut work => result,
            _ = &mut shutdown => {
                tracing::info!("shutting down: finishing the current job");
                let _ = stop.send(true);
                work.await
            }
        }
    }

    /// One broker connection's worth of work.
    async fn session(
        &self,
        mut stopped: watch::Receiver<bool>,
        device: &mut DeviceHealth,
    ) -> Result<()> {
        let connection = broker::connect(&self.broker, Duration::from_secs(60)).await?;
        self.status.outages.up(Service::Broker);
        let topology = Topology::new(&self.broker);
        topology
            .declare(&connection.create_channel().await?)
            .await?;
        let publisher = Publisher::open(&connection).await?;

        let mut runners: HashMap<JobKind, Arc<dyn JobRunner>> = HashMap::new();
        let mut consumers = Vec::new();
        for runner in &self.runners {
            runners.insert(runner.kind(), runner.clone());
            for route in runner.routes() {
                consumers.push(RouteConsumer {
                    route,
                    queue: topology.job_queue(route),
                    tag: format!("{}-{route}", self.name),
                    channel: broker::consumer_channel(&connection, 1).await?,
                    consumer: None,
                });
            }
        }
        let routes: Vec<Route> = consumers.iter().map(|consumer| consumer.route).collect();
        tracing::info!(worker = %self.name, ?routes, "taking jobs");
        let announcer = Announcer::start(
            publisher.clone(),
            topology.workers_queue(),
            self.announcement.clone(),
        );
        self.status.taking_jobs.store(true, Ordering::Relaxed);
        let result = self
            .take_jobs(
                &runners,
                &mut consumers,
                (&publisher, &topology, &announcer),
                device,
                &mut stopped,
            )
            .await;
        self.status.taking_jobs.store(false, Ordering::Relaxed);
        drop(announcer);
        if result.is_ok()
            || result
                .as_ref()
                .is_err_and(|error| error.is::<DeviceFailing>())
        {
            let goodbye = WorkerAnnouncement {
                state: WorkerState::Stopped,
                current_job: None,
                ..self.announcement.clone()
            };
            let _ = publisher
                .publish(
                    &topology.workers_queue(),
                    &self.name,
                    &goodbye.encode(),
                    None,
                )
                .await;
            let _ = connection.close(200, "worker stopping".into()).await;
        }
        result
    }

    /// Takes one job at a time until shutdown.
    async fn take_jobs(
        &self,
        runners: &HashMap<JobKind, Arc<dyn JobRunner>>,
        routes: &mut [RouteConsumer],
        (publisher, topology, announcer): (&Publisher, &Topology, &Announcer),
        device: &mut DeviceHealth,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let mut first = 0;
        loop {
            if *stopped.borrow() {
                return Ok(());
            }
            let Some((delivery, route)) = self.next_job(routes, publisher, first, stopped).await?
            else {
                return Ok(());
            };
            first = (route + 1) % routes.len();
            let outcome = self
                .handle(runners, publisher, topology, delivery, announcer, stopped)
                .await?;
            if let Some(outcome) = outcome {
                if device.record(&outcome, self.device_failure_limit) {
                    let failing = DeviceFailing {
                        failures: device.failures_in_a_row,
                    };
                    tracing::error!(error = %failing, "stopping");
                    return Err(failing.into());
                }
            }
        }
    }

    /// The next job and the index of its route: pulled from the routes in turn starting at
    /// `first`, or, when all are empty, the first to arrive on any of them. `None` on shutdown.
    async fn next_job(
        &self,
        routes: &mut [RouteConsumer],
        publisher: &Publisher,
        first: usize,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Option<(Delivery, usize)>> {
        for offset in 0..routes.len() {
            let index = (first + offset) % routes.len();
            if let Some(delivery) = routes[index].pull().await? {
                return Ok(Some((delivery, index)));
            }
        }
        for route in routes.iter_mut() {
            route.subscribe().await?;
        }
        let arrived = {
            let next = routes.iter_mut().enumerate().map(|(index, route)| {
                let stream = route.consumer.as_mut().expect("subscribed above");
                Box::pin(stream.next().map(move |delivery| (delivery, index)))
            });
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => None,
                (arrived, _, _) = futures::future::select_all(next) => Some(arrived),
            }
        };
        let taken = match arrived {
            None => None,
            Some((None, index)) => {
                bail!(
                    "the broker cancelled the consumer of {}",
                    routes[index].queue
                )
            }
            Some((Some(delivery), index)) => Some((delivery.context("receiving a job")?, index)),
        };
        // The taken job left its stream above: whatever the streams still hold arrived before
        // the cancels and goes back to its queue. (Comparing delivery tags here would be wrong:
        // they count per channel, and every route has a channel of its own.)
        for route in routes.iter_mut() {
            route.unsubscribe(publisher).await?;
        }
        Ok(taken)
    }

    /// Runs one delivered job; its outcome, unless it was handed back or undecodable.
    async fn handle(
        &self,
        runners: &HashMap<JobKind, Arc<dyn JobRunner>>,
        publisher: &Publisher,
        topology: &Topology,
        delivery: Delivery,
        announcer: &Announcer,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Option<Outcome>> {
        let job = match JobMessage::decode(&delivery.data) {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(%error, "undecodable job sent to the dead-letter queue");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                return Ok(None);
            }
        };
        let Some(runner) = runners.get(&job.kind()) else {
            // A message on a queue of a kind this worker consumes always decodes to that kind;
            // anything else was published to the wrong queue and belongs in the dead letters.
            tracing::warn!(job = %job.job_id, kind = %job.kind(), "job of the wrong kind for its queue");
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            return Ok(None);
        };
        let span = tracing::info_span!(
            "job",
            job = %job.job_id,
            object = %job.object_id,
            kind = %job.kind(),
            attempt = job.attempt
        );
        // The job's trace: the group's, continued from the message (see `syncd_infra::telemetry`).
        telemetry::follow(&span, broker::traceparent(&delivery).as_deref());
        announcer.holding(Some(job.job_id));
        let outcome = self
            .execute(
                runner.as_ref(),
                publisher,
                topology,
                &job,
                delivery,
                stopped,
            )
            .instrument(span)
            .await;
        announcer.holding(None);
        outcome
    }

    /// Reports, runs and acknowledges one decoded job. A run that fails because a service is
    /// unreachable is no failure: the worker keeps the job, waits until the service answers
    /// (heartbeating what it waits for), and runs it again.
    async fn execute(
        &self,
        runner: &dyn JobRunner,
        publisher: &Publisher,
        topology: &Topology,
        job: &JobMessage,
        delivery: Delivery,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Option<Outcome>> {
        tracing::info!(redelivered = delivery.redelivered, "job started");
        let results = topology.results_queue();
        self.report(publisher, &results, job, ReportEvent::Started)
            .await?;
        let heartbeat = Heartbeat::start(
            publisher.clone(),
            results.clone(),
            Arc::from(self.name.as_str()),
            job,
        );

        let started = Instant::now();
        let mut delays = outage::backoff();
        let mut waiting_for = None;
        let outcome = loop {
            let Some(outcome) = self.run_once(runner, job, stopped).await else {
                return self.hand_back(publisher, topology, job, &delivery).await;
            };
            let service = match &outcome {
                Err(error) => outage::classify(&error.error),
                Ok(_) => None,
            };
            if waiting_for != service {
                if let Some(ended) = waiting_for {
                    self.status.outages.up(ended);
                }
                if let (Some(service), Err(error)) = (service, &outcome) {
                    self.status.outages.down(service, &error.error);
                }
                heartbeat.waiting_for(service);
                waiting_for = service;
            }
            let Some(service) = service else {
                break outcome;
            };
            if !self.wait_for(service, &mut delays, stopped).await {
                return self.hand_back(publisher, topology, job, &delivery).await;
            }
            tracing::info!(%service, "trying the job again");
        };
        drop(heartbeat);
        let duration_ms = started.elapsed().as_millis() as u64;
        let kind = job.kind().as_str();
        let event = match &outcome {
            Ok(output) => {
                tracing::info!(duration_ms, "job succeeded");
                metrics::counter!("syncd_worker_jobs_total", "kind" => kind, "outcome" => "succeeded").increment(1);
                ReportEvent::Succeeded {
                    output: output.clone(),
                    duration_ms,
                    provenance: self.provenance(runner),
                }
            }
            Err(JobError {
                failure,
                error,
                device_fault,
            }) => {
                let error = format!("{error:#}");
                tracing::warn!(duration_ms, ?failure, device_fault, %error, "job failed");
                let outcome = if *device_fault {
                    "device_failed"
                } else {
                    "failed"
                };
                metrics::counter!("syncd_worker_jobs_total", "kind" => kind, "outcome" => outcome)
                    .increment(1);
                ReportEvent::Failed {
                    failure: *failure,
                    error,
                    duration_ms,
                }
            }
        };
        metrics::histogram!("syncd_worker_job_seconds", "kind" => kind)
            .record(duration_ms as f64 / 1000.0);
        self.report(publisher, &results, job, event).await?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("acknowledging a job")?;
        Ok(Some(outcome))
    }

    /// Gives a job the worker started back to its queue (shutdown, or a shutdown while waiting
    /// out an outage), without it counting as a delivery.
    async fn hand_back(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        job: &JobMessage,
        delivery: &Delivery,
    ) -> Result<Option<Outcome>> {
        publisher
            .hand_back(&topology.job_queue(job.payload.route()), delivery)
            .await?;
        Ok(None)
    }

    /// Runs the job once; `None` when a shutdown's grace period ran out first.
    async fn run_once(
        &self,
        runner: &dyn JobRunner,
        job: &JobMessage,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let work = runner.run(job, &self.context);
        tokio::pin!(work);
        tokio::select! {
            outcome = &mut work => Some(outcome),
            _ = stopped.wait_for(|stop| *stop) => {
                tokio::select! {
                    outcome = &mut work => Some(outcome),
                    _ = tokio::time::sleep(self.shutdown_grace) => {
                        tracing::warn!("shutdown grace period over: handing the job back");
                        None
                    }
                }
            }
        }
    }

    /// Waits until `service` may answer again: after each delay the store is probed; for a
    /// service without a probe, trying the job again is the probe. False on shutdown.
    async fn wait_for(
        &self,
        service: Service,
        delays: &mut impl Iterator<Item = Duration>,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        for delay in delays {
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            if service != Service::Storage {
                return true;
            }
            match self.context.storage.probe().await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "the store still does not answer"
                    )
                }
            }
        }
        true
    }

    async fn report(
        &self,
        publisher: &Publisher,
        queue: &str,
        job: &JobMessage,
        event: ReportEvent,
    ) -> Result<()> {
        let report = WorkerReport {
            version: WIRE_VERSION,
            job_id: job.job_id,
            attempt: job.attempt,
            worker: self.name.clone(),
            event,
        };
        // Within the job's span: the report continues the job's trace, to its application.
        let traceparent = telemetry::traceparent(&tracing::Span::current());
        publisher
            .publish(
                queue,
                &job.job_id.to_string(),
                &report.encode(),
                traceparent.as_deref(),
            )
            .await
    }
}
