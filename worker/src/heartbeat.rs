//! Heartbeats of the attempt a worker holds.
//!
//! The coordinator presumes an attempt lost when it hears nothing of it for a lease; a
//! [`Heartbeat`] tells it every `heartbeat_secs` (from the job message) that the worker is alive,
//! and what service the job is waiting for, if any, so that `syncd` can show it. A heartbeat that
//! cannot be published is only logged: the job goes on, and the report at its end is what counts.

use std::sync::Arc;
use std::time::Duration;
use syncd_infra::broker::Publisher;
use syncd_proto::messages::{JobMessage, ReportEvent, Service, WorkerReport, WIRE_VERSION};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Sends heartbeats until dropped.
pub struct Heartbeat {
    waiting_for: watch::Sender<Option<Service>>,
    task: JoinHandle<()>,
}

impl Heartbeat {
    pub fn start(publisher: Publisher, queue: String, worker: Arc<str>, job: &JobMessage) -> Self {
        let (waiting_for, mut changes) = watch::channel(None);
        let interval = Duration::from_secs(u64::from(job.heartbeat_secs.max(1)));
        let (job_id, attempt) = (job.job_id, job.attempt);
        let task = tokio::spawn(async move {
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let report = WorkerReport {
                    version: WIRE_VERSION,
                    job_id,
                    attempt,
                    worker: worker.to_string(),
                    event: ReportEvent::Heartbeat {
                        waiting_for: *changes.borrow_and_update(),
                    },
                };
                if let Err(error) = publisher
                    .publish(&queue, &job_id.to_string(), &report.encode())
                    .await
                {
                    tracing::warn!(error = format!("{error:#}"), "heartbeat not sent");
                }
            }
        });
        Self { waiting_for, task }
    }

    /// Says (at once, and in every later heartbeat) which service the job waits for.
    pub fn waiting_for(&self, service: Option<Service>) {
        self.waiting_for.send_replace(service);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
