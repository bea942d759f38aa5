//! What a worker tells while it runs: the heartbeats of the attempt it holds, and its own
//! announcements.
//!
//! The coordinator presumes an attempt lost when it hears nothing of it for a lease; a
//! [`Heartbeat`] tells it every `heartbeat_secs` (from the job message) that the worker is alive,
//! and what service the job is waiting for, if any, so that `syncd` can show it. An
//! [`Announcer`] tells it, every few seconds and whenever it takes or finishes a job (a second
//! apart at least), who the worker is and what it does, for `syncd workers`.
//!
//! Both are [`Beacon`]s: a message that cannot be published is only logged. The job goes on,
//! and the report at its end (or the next announcement) is what counts.

use std::sync::Arc;
use std::time::Duration;
use syncd_infra::broker::Publisher;
use syncd_proto::messages::{
    JobMessage, ReportEvent, Service, WorkerAnnouncement, WorkerReport, WorkerState, WIRE_VERSION,
};
use syncd_proto::JobId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// When a [`Beacon`] publishes.
pub struct Cadence {
    /// Between messages when the value does not change.
    pub interval: Duration,
    /// The first message goes out at once rather than after one interval.
    pub first_at_once: bool,
    /// Between two messages at least, however often the value changes: the latest value goes
    /// out once this has passed. A worker whose jobs take milliseconds would otherwise send a
    /// message for every job it takes and every one it finishes.
    pub min_spacing: Duration,
}

/// Publishes a message made from a value every `cadence.interval` and, no sooner than
/// `cadence.min_spacing` after the one before, whenever the value changes, until dropped.
pub struct Beacon<T> {
    value: watch::Sender<T>,
    task: JoinHandle<()>,
}

impl<T: Send + Sync + 'static> Beacon<T> {
    pub fn start(
        publisher: Publisher,
        queue: String,
        message_id: String,
        cadence: Cadence,
        initial: T,
        encode: impl Fn(&T) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let (value, mut changes) = watch::channel(initial);
        let task = tokio::spawn(async move {
            let first = if cadence.first_at_once {
                tokio::time::Instant::now()
            } else {
                tokio::time::Instant::now() + cadence.interval
            };
            let mut ticker = tokio::time::interval_at(first, cadence.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_sent: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                if let Some(last_sent) = last_sent {
                    // Changes made meanwhile are all in the one message sent after.
                    tokio::time::sleep_until(last_sent + cadence.min_spacing).await;
                }
                let body = encode(&changes.borrow_and_update());
                last_sent = Some(tokio::time::Instant::now());
                if let Err(error) = publisher.publish(&queue, &message_id, &body, None).await {
                    tracing::warn!(error = format!("{error:#}"), queue, "not sent");
                }
            }
        });
        Self { value, task }
    }

    /// Publishes the new value at once, and in every later message.
    pub fn set(&self, value: T) {
        self.value.send_replace(value);
    }
}

impl<T> Drop for Beacon<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends an attempt's heartbeats until dropped.
pub struct Heartbeat(Beacon<Option<Service>>);

impl Heartbeat {
    pub fn start(publisher: Publisher, queue: String, worker: Arc<str>, job: &JobMessage) -> Self {
        let interval = Duration::from_secs(u64::from(job.heartbeat_secs.max(1)));
        let (job_id, attempt) = (job.job_id, job.attempt);
        Self(Beacon::start(
            publisher,
            queue,
            job_id.to_string(),
            Cadence {
                interval,
                first_at_once: false,
                // A change of what the job waits for is told at once.
                min_spacing: Duration::ZERO,
            },
            None,
            move |waiting_for| {
                WorkerReport {
                    version: WIRE_VERSION,
                    job_id,
                    attempt,
                    worker: worker.to_string(),
                    event: ReportEvent::Heartbeat {
                        waiting_for: *waiting_for,
                    },
                }
                .encode()
            },
        ))
    }

    /// Says (at once, and in every later heartbeat) which service the job waits for.
    pub fn waiting_for(&self, service: Option<Service>) {
        self.0.set(service);
    }
}

/// Announcements are for `syncd workers` to show: one a second at most keeps it current, and
/// keeps a worker of millisecond jobs from sending two for every job.
const ANNOUNCEMENT_MIN_SPACING: Duration = Duration::from_secs(1);

/// Announces the worker until dropped: at once, every `interval_secs` of its announcement, and
/// whenever it takes or finishes a job, [`ANNOUNCEMENT_MIN_SPACING`] after the one before at
/// least.
pub struct Announcer(Beacon<Option<JobId>>);

impl Announcer {
    pub fn start(publisher: Publisher, queue: String, announcement: WorkerAnnouncement) -> Self {
        let interval = Duration::from_secs(u64::from(announcement.interval_secs.max(1)));
        Self(Beacon::start(
            publisher,
            queue,
            announcement.worker.clone(),
            Cadence {
                interval,
                first_at_once: true,
                min_spacing: ANNOUNCEMENT_MIN_SPACING,
            },
            None,
            move |job: &Option<JobId>| busy_with(&announcement, *job).encode(),
        ))
    }

    /// The job the worker holds now, if any.
    pub fn holding(&self, job: Option<JobId>) {
        self.0.set(job);
    }
}

/// The announcement of a worker holding `job` (idle without one).
pub fn busy_with(announcement: &WorkerAnnouncement, job: Option<JobId>) -> WorkerAnnouncement {
    WorkerAnnouncement {
        state: match job {
            Some(_) => WorkerState::Busy,
            None => WorkerState::Idle,
        },
        current_job: job,
        ..announcement.clone()
    }
}
