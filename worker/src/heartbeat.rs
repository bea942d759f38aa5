//! What a worker tells while it runs: the heartbeats of the attempt it holds, and its own
//! announcements.
//!
//! The coordinator presumes an attempt lost when it hears nothing of it for a lease; a
//! [`Heartbeat`] tells it every `heartbeat_secs` (from the job message) that the worker is alive,
//! and what service the job is waiting for, if any, so that `syncd` can show it. An
//! [`Announcer`] tells it, every few seconds and whenever it takes or finishes a job, who the
//! worker is and what it does, for `syncd workers`.
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

/// Publishes a message made from a value every `interval` and at once whenever the value
/// changes, until dropped.
pub struct Beacon<T> {
    value: watch::Sender<T>,
    task: JoinHandle<()>,
}

impl<T: Send + Sync + 'static> Beacon<T> {
    /// `first_at_once`: the first message goes out now rather than after one interval.
    pub fn start(
        publisher: Publisher,
        queue: String,
        message_id: String,
        interval: Duration,
        first_at_once: bool,
        initial: T,
        encode: impl Fn(&T) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let (value, mut changes) = watch::channel(initial);
        let task = tokio::spawn(async move {
            let first = if first_at_once {
                tokio::time::Instant::now()
            } else {
                tokio::time::Instant::now() + interval
            };
            let mut ticker = tokio::time::interval_at(first, interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let body = encode(&changes.borrow_and_update());
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
            interval,
            false,
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

/// Announces the worker until dropped: at once, every `interval_secs` of its announcement, and
/// whenever it takes or finishes a job.
pub struct Announcer(Beacon<Option<JobId>>);

impl Announcer {
    pub fn start(publisher: Publisher, queue: String, announcement: WorkerAnnouncement) -> Self {
        let interval = Duration::from_secs(u64::from(announcement.interval_secs.max(1)));
        Self(Beacon::start(
            publisher,
            queue,
            announcement.worker.clone(),
            interval,
            true,
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
