//! The coordinator service: background loops over the database and the broker, run until a
//! shutdown signal.
//!
//! | loop | does |
//! | --- | --- |
//! | dispatcher | due jobs -> `queued` + outbox rows |
//! | relay | outbox rows -> RabbitMQ (confirmed) |
//! | results | worker reports -> job state, next jobs, decisions |
//! | dead letters | dead-lettered messages -> `dead_letters` rows, jobs `dead_lettered` |
//! | reaper | expired leases -> retry |
//! | completion | finished runs -> dataset in S3, run `completed` |
//! | metrics | gauges for Prometheus |
//!
//! Database-only loops log errors and go on. The broker loops share one connection; when it
//! fails they are restarted on a fresh one, and messages not yet acknowledged are redelivered
//! by the broker.

use crate::config::CoordinatorConfig;
use crate::results::ReportHandler;
use crate::{completion, db, dead_letters, dispatcher, reaper, relay};
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;
use syncd_infra::broker::{self, Publisher, Topology};
use syncd_infra::storage::Storage;
use syncd_proto::messages::WorkerReport;
use tokio::sync::watch;

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(config: CoordinatorConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let pool = db::connect(&config.database).await?;
    let storage = Storage::new(&config.storage);
    storage.ensure_bucket().await?;
    let topology = Topology::new(&config.broker);
    if let Some(listen) = config.metrics.listen {
        syncd_infra::metrics::serve(listen)?;
    }

    let (stop, stopped) = watch::channel(false);
    let loops = &config.loops;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (pool, topology, limit) = (pool.clone(), topology.clone(), loops.max_queued_per_kind);
        tasks.spawn(every(
            "dispatcher",
            loops.dispatch_interval_ms,
            stopped.clone(),
            move || {
                let (pool, topology) = (pool.clone(), topology.clone());
                async move {
                    dispatcher::dispatch_due(&pool, &topology, limit)
                        .await
                        .map(drop)
                }
            },
        ));
    }
    {
        let pool = pool.clone();
        tasks.spawn(every(
            "reaper",
            loops.reaper_interval_ms,
            stopped.clone(),
            move || {
                let pool = pool.clone();
                async move { reaper::reap_expired(&pool).await.map(drop) }
            },
        ));
    }
    {
        let (pool, storage) = (pool.clone(), storage.clone());
        tasks.spawn(every(
            "completion",
            loops.completion_interval_ms,
            stopped.clone(),
            move || {
                let (pool, storage) = (pool.clone(), storage.clone());
                async move { completion::complete_finished_runs(&pool, &storage).await }
            },
        ));
    }
    {
        let pool = pool.clone();
        tasks.spawn(every("metrics", 5_000, stopped.clone(), move || {
            let pool = pool.clone();
            async move { crate::metrics::update_gauges(&pool).await }
        }));
    }
    tasks.spawn(broker_loops(
        config.clone(),
        pool.clone(),
        topology,
        stopped.clone(),
    ));

    tracing::info!("coordinator running");
    shutdown.await;
    tracing::info!("shutting down: finishing the current messages");
    let _ = stop.send(true);
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(error)) = result {
            tracing::error!(error = format!("{error:#}"), "loop ended with an error");
        }
    }
    pool.close().await;
    Ok(())
}

/// Calls `step` every `interval_ms` until shutdown; errors are logged, not fatal.
async fn every<F, Fut>(
    name: &'static str,
    interval_ms: u64,
    mut stopped: watch::Receiver<bool>,
    mut step: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms.max(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return Ok(()),
            _ = ticker.tick() => {
                if let Err(error) = step().await {
                    tracing::warn!(task = name, error = format!("{error:#}"), "loop step failed");
                }
            }
        }
    }
}

/// The loops that need the broker, restarted on a fresh connection whenever it fails.
async fn broker_loops(
    config: CoordinatorConfig,
    pool: PgPool,
    topology: Topology,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let attempt = async {
            let connection = broker::connect(&config.broker, Duration::from_secs(60)).await?;
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            let publisher = Publisher::open(&connection).await?;
            let relay = every(
                "relay",
                config.loops.relay_interval_ms,
                stopped.clone(),
                || {
                    let (pool, publisher) = (pool.clone(), publisher.clone());
                    async move {
                        // An outbox backlog is drained at once, not one batch per tick.
                        while relay::relay_batch(&pool, &publisher).await? > 0 {}
                        Ok(())
                    }
                },
            );
            let result = tokio::select! {
                result = relay => result,
                result = consume_results(&connection, &pool, &topology, stopped.clone()) => result,
                result = consume_dead_letters(&connection, &pool, &topology, stopped.clone()) => result,
            };
            let _ = connection.close(200, "coordinator stopping".into()).await;
            result
        };
        match attempt.await {
            Ok(()) if *stopped.borrow() => return Ok(()),
            Ok(()) => tracing::warn!("broker loops ended; reconnecting"),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "broker connection failed; reconnecting"
            ),
        }
        tokio::select! {
            _ = stopped.changed() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn consume_results(
    connection: &lapin::Connection,
    pool: &PgPool,
    topology: &Topology,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let channel = broker::consumer_channel(connection, 32).await?;
    let mut consumer = channel
        .basic_consume(
            topology.results_queue().as_str().into(),
            "coordinator-results".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming results")?;
    let mut handler = ReportHandler::default();
    loop {
        let delivery = tokio::select! {
            _ = stopped.changed() => return Ok(()),
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else {
            bail!("the results consumer was cancelled")
        };
        let delivery = delivery.context("receiving a report")?;
        let report = match WorkerReport::decode(&delivery.data) {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%error, "undecodable report sent to the dead-letter queue");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                continue;
            }
        };
        match handler.apply(pool, &report).await {
            Ok(applied) => {
                tracing::debug!(job = %report.job_id, ?applied, "report applied");
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(error) => {
                // The database is unreachable or refused the change: hand the report back to the
                // broker and try again shortly. Nothing was committed, so nothing is half-done.
                handler.forget();
                tracing::error!(job = %report.job_id, error = format!("{error:#}"), "cannot apply a report; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
}

async fn consume_dead_letters(
    connection: &lapin::Connection,
    pool: &PgPool,
    topology: &Topology,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let channel = broker::consumer_channel(connection, 32).await?;
    let mut consumer = channel
        .basic_consume(
            topology.dead_letter_queue().as_str().into(),
            "coordinator-dead-letters".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming dead letters")?;
    loop {
        let delivery = tokio::select! {
            _ = stopped.changed() => return Ok(()),
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else {
            bail!("the dead-letter consumer was cancelled")
        };
        let delivery = delivery.context("receiving a dead letter")?;
        let (queue, reason) = dead_letters::death_reason(delivery.properties.headers().as_ref());
        match dead_letters::record(pool, queue, &reason, &delivery.data).await {
            Ok(()) => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot record a dead letter; will retry"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
}
