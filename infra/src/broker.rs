//! RabbitMQ topology and confirmed publishing.
//!
//! ```text
//! {prefix}.jobs.{route}   quorum queue per route (`prompt`, `prior`, `generate.flux-dev`,
//!                         `generate.flux-depth-dev`, `score`); workers consume with manual acks
//! {prefix}.workers        worker announcements (latest state of each worker; messages expire
//!                         after a few minutes, since only the newest matters)
//! {prefix}.results        quorum queue of worker reports; the coordinator consumes it (no
//!                         delivery limit: a report waits out a database outage)
//! {prefix}.dead-letter    exchange (fanout) + queue: undecodable messages and messages that
//!                         were delivered `delivery_limit` times without an ack
//! ```
//!
//! Every message is persistent and published on a channel in confirm mode: `publish` returns
//! only once the broker has taken responsibility for the message. Work queues are quorum queues
//! because they count deliveries (`x-delivery-limit`) and so dead-letter a message that crashes
//! every worker that takes it, instead of looping forever.

use anyhow::{bail, Context, Result};
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use std::time::Duration;
use syncd_proto::messages::Route;

/// Broker settings, shared by the coordinator and the worker configuration files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:port/vhost`. Printed only with the password removed.
    pub url: secrecy::SecretString,
    /// Prefix of every queue and exchange name, so that several factories (or tests) can share
    /// one broker without seeing each other's messages.
    #[serde(default = "default_prefix")]
    pub queue_prefix: String,
    /// Deliveries of one message without an ack before the broker dead-letters it.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
}

fn default_prefix() -> String {
    "syncd".into()
}

/// Ten crashes: a kill storm or a few preemptions do not dead-letter a healthy job (hand-backs do
/// not count at all), while a job that really crashes workers stops after ten of them.
pub fn default_delivery_limit() -> u32 {
    10
}

/// How long a worker announcement waits for the coordinator before it expires.
const ANNOUNCEMENT_TTL_MS: i32 = 5 * 60 * 1000;

/// The names of every queue and exchange of one factory.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
}

impl Topology {
    pub fn new(config: &BrokerConfig) -> Self {
        Self {
            prefix: config.queue_prefix.clone(),
            delivery_limit: config.delivery_limit,
        }
    }

    pub fn job_queue(&self, route: Route) -> String {
        format!("{}.jobs.{route}", self.prefix)
    }

    pub fn workers_queue(&self) -> String {
        format!("{}.workers", self.prefix)
    }

    pub fn results_queue(&self) -> String {
        format!("{}.results", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// Declares every exchange and queue. Idempotent: declaring an existing queue with the same
    /// arguments is a no-op, so every process declares on start-up.
    pub async fn declare(&self, channel: &Channel) -> Result<()> {
        let dead_letter_exchange = self.dead_letter_exchange();
        channel
            .exchange_declare(
                dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {dead_letter_exchange}"))?;
        let dead_letter_queue = self.dead_letter_queue();
        declare_quorum_queue(channel, &dead_letter_queue, FieldTable::default()).await?;
        channel
            .queue_bind(
                dead_letter_queue.as_str().into(),
                dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {dead_letter_queue}"))?;

        let mut dead_lettering = FieldTable::default();
        dead_lettering.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(dead_letter_exchange.as_str())),
        );
        // The results queue has no delivery limit: the coordinator hands a report back when its
        // database is unreachable, and an outage must not turn reports into dead letters.
        declare_quorum_queue(channel, &self.results_queue(), dead_lettering.clone()).await?;
        let mut work_queue = dead_lettering;
        work_queue.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        for route in Route::ALL {
            declare_quorum_queue(channel, &self.job_queue(route), work_queue.clone()).await?;
        }
        // Announcements are snapshots: an old one is worth nothing once a newer one exists, so
        // they expire instead of piling up while the coordinator is away.
        let mut announcements = FieldTable::default();
        announcements.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongInt(ANNOUNCEMENT_TTL_MS),
        );
        declare_quorum_queue(channel, &self.workers_queue(), announcements).await?;
        Ok(())
    }
}

async fn declare_quorum_queue(
    channel: &Channel,
    name: &str,
    mut arguments: FieldTable,
) -> Result<()> {
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .with_context(|| format!("declaring queue {name}"))?;
    Ok(())
}

/// Connects to the broker, retrying for up to `patience` so that a process started before the
/// broker (docker compose, a restart) waits instead of crashing.
pub async fn connect(config: &BrokerConfig, patience: Duration) -> Result<Connection> {
    use secrecy::ExposeSecret;
    let deadline = tokio::time::Instant::now() + patience;
    let mut delays = crate::outage::backoff();
    loop {
        let delay = delays.next().unwrap_or(Duration::from_secs(1));
        match Connection::connect(config.url.expose_secret(), ConnectionProperties::default()).await
        {
            Ok(connection) => return Ok(connection),
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(%error, "rabbitmq not reachable yet, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                return Err(error).context("cannot connect to rabbitmq (check broker.url)")
            }
        }
    }
}

/// A channel in confirm mode for publishing.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        Ok(Self { channel })
    }

    /// Publishes a persistent message to a queue and waits for the broker's confirm. A
    /// `traceparent` travels in the message's headers (see [`crate::telemetry`]).
    pub async fn publish(
        &self,
        queue: &str,
        message_id: &str,
        body: &[u8],
        traceparent: Option<&str>,
    ) -> Result<()> {
        let properties = message_properties(message_id, traceparent);
        self.publish_with(queue, properties, body).await
    }

    /// Publishes every message at once and waits for their confirms together, for at most
    /// `timeout`: one round trip to the broker for the whole batch instead of one per message.
    /// Returns, in order, whether the broker took each message; an error only when the batch
    /// could not be sent at all.
    pub async fn publish_all(
        &self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Result<Vec<Result<()>>> {
        let mut confirmations = Vec::with_capacity(messages.len());
        for message in messages {
            let properties = message_properties(message.message_id, message.traceparent);
            confirmations.push(self.send(message.queue, properties, message.body).await?);
        }
        let confirmed = tokio::time::timeout(
            timeout,
            futures::future::join_all(confirmations.into_iter().zip(messages).map(
                |(confirmation, message)| async move {
                    let confirmation = confirmation.await.with_context(|| {
                        format!(
                            "waiting for the broker to confirm a message to {}",
                            message.queue
                        )
                    })?;
                    check_confirmation(message.queue, confirmation)
                },
            )),
        )
        .await
        .map_err(|elapsed| {
            anyhow::Error::new(elapsed)
                .context(crate::outage::Unreachable {
                    service: crate::outage::Service::Broker,
                })
                .context(format!(
                    "the broker did not confirm a batch within {timeout:?}"
                ))
        })?;
        Ok(confirmed)
    }

    /// Hands a delivered job back to `queue` without it counting as a delivery: a copy (same
    /// body and properties, less the broker's own `x-` headers) is published and confirmed, and
    /// only then is the original acknowledged.
    ///
    /// A quorum queue counts every return of a message (`nack`, a closed channel) towards its
    /// delivery limit, which is there to catch a job that crashes the workers taking it. A job
    /// a worker gives up on purpose (shutdown, preemption, a message that raced in while it took
    /// another) crashed nothing, and a job preempted that often must not be dead-lettered.
    /// Should the worker die between the confirm and the ack, the job is queued twice; the
    /// coordinator applies a report only for the attempt it awaits, and only once.
    pub async fn hand_back(&self, queue: &str, delivery: &lapin::message::Delivery) -> Result<()> {
        let mut properties = delivery.properties.clone();
        if let Some(headers) = properties.headers() {
            let kept: std::collections::BTreeMap<_, _> = headers
                .inner()
                .iter()
                .filter(|(key, _)| !key.as_str().starts_with("x-"))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            properties = properties.with_headers(kept.into());
        }
        self.publish_with(queue, properties, &delivery.data).await?;
        delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .context("acknowledging a job handed back as a copy")?;
        Ok(())
    }

    async fn publish_with(
        &self,
        queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<()> {
        let confirmation = self
            .send(queue, properties, body)
            .await?
            .await
            .with_context(|| format!("waiting for the broker to confirm a message to {queue}"))?;
        check_confirmation(queue, confirmation)
    }

    /// Sends a mandatory message to `queue`; the broker's confirm comes with the returned future.
    async fn send(
        &self,
        queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<lapin::PublisherConfirm> {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .with_context(|| format!("publishing to {queue}"))
    }
}

/// One message of [`Publisher::publish_all`].
pub struct Outgoing<'a> {
    pub queue: &'a str,
    pub message_id: &'a str,
    pub body: &'a [u8],
    /// Travels in the message's headers (see [`crate::telemetry`]).
    pub traceparent: Option<&'a str>,
}

/// A persistent JSON message with its id, and its trace context in the headers.
fn message_properties(message_id: &str, traceparent: Option<&str>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into());
    match traceparent {
        Some(traceparent) => {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from(crate::telemetry::TRACEPARENT),
                AMQPValue::LongString(LongString::from(traceparent)),
            );
            properties.with_headers(headers)
        }
        None => properties,
    }
}

/// Whether the broker took a message: acknowledged, and routed to its queue.
fn check_confirmation(queue: &str, confirmation: lapin::Confirmation) -> Result<()> {
    if !confirmation.is_ack() {
        bail!("the broker refused a message to {queue}");
    }
    if confirmation.take_message().is_some() {
        bail!("queue {queue} does not exist (message returned unroutable)");
    }
    Ok(())
}

/// The `traceparent` header of a delivered message, if it has one.
pub fn traceparent(delivery: &lapin::message::Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    let (_, value) = headers
        .inner()
        .iter()
        .find(|(key, _)| key.as_str() == crate::telemetry::TRACEPARENT)?;
    match value {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(value) => Some(value.as_str().to_string()),
        _ => None,
    }
}

/// Hands a delivered message back to its queue, for this consumer or another to take again. On
/// a queue with a delivery limit this counts as a delivery: workers use [`Publisher::hand_back`].
pub async fn requeue(delivery: &lapin::message::Delivery) -> Result<()> {
    delivery
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .context("handing a message back to the broker")?;
    Ok(())
}

/// Opens a consuming channel with the given prefetch. Long GPU jobs use 1, so that a worker
/// never holds a second job it cannot start.
pub async fn consumer_channel(connection: &Connection, prefetch: u16) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("setting prefetch")?;
    Ok(channel)
}
