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
//! Each kind is consumed on its own channel with prefetch 1, so the worker holds at most one
//! unstarted job per kind and never hoards work that other workers could do.

use crate::heartbeat::Heartbeat;
use crate::runner::{JobContext, JobError, JobRunner};
use anyhow::{bail, Context, Result};
use futures::stream::{SelectAll, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncd_infra::broker::{self, BrokerConfig, Publisher, Topology};
use syncd_infra::outage::{self, Outages, Service};
use syncd_proto::messages::{
    JobKind, JobMessage, JobOutput, ReportEvent, WorkerReport, WIRE_VERSION,
};
use tokio::sync::watch;
use tracing::Instrument;

/// Everything the loop needs, built by the binary from its configuration.
pub struct Worker {
    pub name: String,
    pub broker: BrokerConfig,
    pub context: JobContext,
    pub runners: Vec<Arc<dyn JobRunner>>,
    /// On shutdown, how long the current job may go on before it is handed back.
    pub shutdown_grace: Duration,
    /// The services this worker is waiting for.
    pub outages: Arc<Outages>,
}

impl Worker {
    /// Runs until `shutdown` resolves, reconnecting to the broker when the connection fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        if self.runners.is_empty() {
            bail!("this worker has no job kinds to run");
        }
        let (stop, stopped) = watch::channel(false);
        let work = async {
            loop {
                match self.session(stopped.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(error) => {
                        if outage::classify(&error) == Some(Service::Broker) {
                            self.outages.down(Service::Broker, &error);
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
    async fn session(&self, mut stopped: watch::Receiver<bool>) -> Result<()> {
        let connection = broker::connect(&self.broker, Duration::from_secs(60)).await?;
        self.outages.up(Service::Broker);
        let topology = Topology::new(&self.broker);
        topology
            .declare(&connection.create_channel().await?)
            .await?;
        let publisher = Publisher::open(&connection).await?;

        let mut runners: HashMap<JobKind, Arc<dyn JobRunner>> = HashMap::new();
        let mut deliveries = SelectAll::new();
        for runner in &self.runners {
            let kind = runner.kind();
            let channel = broker::consumer_channel(&connection, 1).await?;
            let consumer = channel
                .basic_consume(
                    topology.job_queue(kind).as_str().into(),
                    format!("{}-{kind}", self.name).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("consuming {kind} jobs"))?;
            deliveries.push(consumer);
            runners.insert(kind, runner.clone());
        }
        tracing::info!(worker = %self.name, kinds = ?runners.keys().collect::<Vec<_>>(), "taking jobs");

        loop {
            let delivery = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break,
                delivery = deliveries.next() => delivery,
            };
            let Some(delivery) = delivery else {
                bail!("the broker cancelled the consumers")
            };
            let delivery = delivery.context("receiving a job")?;
            self.handle(&runners, &publisher, &topology, delivery, &mut stopped)
                .await?;
        }
        let _ = connection.close(200, "worker stopping".into()).await;
        Ok(())
    }

    async fn handle(
        &self,
        runners: &HashMap<JobKind, Arc<dyn JobRunner>>,
        publisher: &Publisher,
        topology: &Topology,
        delivery: Delivery,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let job = match JobMessage::decode(&delivery.data) {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(%error, "undecodable job sent to the dead-letter queue");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                return Ok(());
            }
        };
        let Some(runner) = runners.get(&job.kind()) else {
            // A message on a queue of a kind this worker consumes always decodes to that kind;
            // anything else was published to the wrong queue and belongs in the dead letters.
            tracing::warn!(job = %job.job_id, kind = %job.kind(), "job of the wrong kind for its queue");
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            return Ok(());
        };
        let span = tracing::info_span!(
            "job",
            job = %job.job_id,
            object = %job.object_id,
            kind = %job.kind(),
            attempt = job.attempt
        );
        self.execute(
            runner.as_ref(),
            publisher,
            topology,
            &job,
            delivery,
            stopped,
        )
        .instrument(span)
        .await
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
    ) -> Result<()> {
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
                return broker::requeue(&delivery).await;
            };
            let service = match &outcome {
                Err(error) => outage::classify(&error.error),
                Ok(_) => None,
            };
            if waiting_for != service {
                if let Some(ended) = waiting_for {
                    self.outages.up(ended);
                }
                if let (Some(service), Err(error)) = (service, &outcome) {
                    self.outages.down(service, &error.error);
                }
                heartbeat.waiting_for(service);
                waiting_for = service;
            }
            let Some(service) = service else {
                break outcome;
            };
            if !self.wait_for(service, &mut delays, stopped).await {
                return broker::requeue(&delivery).await;
            }
            tracing::info!(%service, "trying the job again");
        };
        drop(heartbeat);
        let duration_ms = started.elapsed().as_millis() as u64;
        let kind = job.kind().as_str();
        let event = match outcome {
            Ok(output) => {
                tracing::info!(duration_ms, "job succeeded");
                metrics::counter!("syncd_worker_jobs_total", "kind" => kind, "outcome" => "succeeded").increment(1);
                ReportEvent::Succeeded {
                    output,
                    duration_ms,
                }
            }
            Err(JobError { failure, error }) => {
                let error = format!("{error:#}");
                tracing::warn!(duration_ms, ?failure, %error, "job failed");
                metrics::counter!("syncd_worker_jobs_total", "kind" => kind, "outcome" => "failed")
                    .increment(1);
                ReportEvent::Failed {
                    failure,
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
        Ok(())
    }

    /// Runs the job once; `None` when a shutdown's grace period ran out first.
    async fn run_once(
        &self,
        runner: &dyn JobRunner,
        job: &JobMessage,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<Result<JobOutput, JobError>> {
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
        publisher
            .publish(queue, &job.job_id.to_string(), &report.encode())
            .await
    }
}
