//! Telling an outage from a failure, in one place.
//!
//! When PostgreSQL, RabbitMQ, the S3 store or the LLM server cannot be reached (connection
//! refused or reset, a timeout, a 5xx, throttling), nothing is wrong with the work in hand: the
//! factory waits the outage out and goes on, and no job's attempts are spent on it. Everything
//! else is a failure of the work itself. [`classify`] is the only code that draws that line; it
//! knows each service's error type:
//!
//! | service | error | unreachable when |
//! | --- | --- | --- |
//! | database | `sqlx::Error` | I/O, TLS, pool timeout or closed, SQLSTATE class 08, 57P01-57P03, 53300 |
//! | broker | `lapin::Error` | I/O, a closed connection or channel, missed heartbeats, a hard AMQP error |
//! | storage | [`StorageError`] | no answer (connect, timeout, dropped connection), 5xx, 429, `SlowDown` |
//! | llm | [`Unreachable`] | set by the LLM client, which already tells transport errors and 5xx apart |
//!
//! [`Outages`] keeps the current outages of a process: it logs when one starts and ends, exports
//! `syncd_outage_active{service}` and `syncd_outage_seconds_total{service}`, and says since when
//! every service answered ([`Outages::healthy_since`]).

use crate::storage::StorageError;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
pub use syncd_proto::messages::Service;

/// Marks an error as `service` being unreachable, for services whose client has no error type of
/// its own that [`classify`] could read (the LLM client attaches it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {service} service is unreachable")]
pub struct Unreachable {
    pub service: Service,
}

/// The service whose outage caused `error`, or `None` when the error is the work's own.
pub fn classify(error: &anyhow::Error) -> Option<Service> {
    // A marker attached as context is found by anyhow's downcast, a typed cause by the chain.
    if let Some(marker) = error.downcast_ref::<Unreachable>() {
        return Some(marker.service);
    }
    error.chain().find_map(classify_cause).flatten()
}

/// `Some(verdict)` when `cause` is of a type this module knows; the verdict is the unreachable
/// service, if any. The first known cause in a chain decides.
fn classify_cause(cause: &(dyn std::error::Error + 'static)) -> Option<Option<Service>> {
    if let Some(marker) = cause.downcast_ref::<Unreachable>() {
        return Some(Some(marker.service));
    }
    if let Some(error) = cause.downcast_ref::<StorageError>() {
        return Some(error.is_unavailable().then_some(Service::Storage));
    }
    if let Some(error) = cause.downcast_ref::<lapin::Error>() {
        return Some(broker_unreachable(error).then_some(Service::Broker));
    }
    #[cfg(feature = "database")]
    if let Some(error) = cause.downcast_ref::<sqlx::Error>() {
        return Some(database_unreachable(error).then_some(Service::Database));
    }
    None
}

fn broker_unreachable(error: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::RuntimeShutdownError(_) => true,
        // Hard errors close the connection (320 CONNECTION_FORCED when the broker stops); soft
        // ones (404, 406) are about the request.
        ErrorKind::ProtocolError(_) => error.is_amqp_hard_error(),
        _ => false,
    }
}

#[cfg(feature = "database")]
fn database_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // 08: connection exception; 57P01-03: the server is shutting down or starting up;
            // 53300: too many connections.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Waits between tries while a service is down: exponential from 1 s to 10 s, each lengthened by
/// a random part of itself, so that many workers do not all knock at the same moment when it
/// comes back, and none waits more than 20 s after it did.
pub fn backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The outages one process is waiting out.
pub struct Outages {
    /// Who is waiting, for the logs: "coordinator" or a worker's name.
    observer: String,
    state: Mutex<OutageState>,
}

struct OutageState {
    /// Services down now, since when.
    down: BTreeMap<Service, Instant>,
    /// When each service last came back.
    recovered: BTreeMap<Service, Instant>,
    created: Instant,
}

/// An outage that ended.
#[derive(Debug, Clone, Copy)]
pub struct EndedOutage {
    pub service: Service,
    pub lasted: Duration,
}

impl Outages {
    pub fn new(observer: impl Into<String>) -> Self {
        Self {
            observer: observer.into(),
            state: Mutex::new(OutageState {
                down: BTreeMap::new(),
                recovered: BTreeMap::new(),
                created: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutageState> {
        // The state is two plain maps updated in single statements: a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `service` did not answer; returns true when this starts a new outage.
    pub fn down(&self, service: Service, error: &anyhow::Error) -> bool {
        let started = match self.lock().down.entry(service) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(Instant::now());
                true
            }
        };
        if started {
            tracing::warn!(
                observer = %self.observer,
                %service,
                error = format!("{error:#}"),
                "{service} unreachable: waiting for it, no work is failed for it"
            );
            metrics::gauge!("syncd_outage_active", "service" => service.as_str()).set(1.0);
        }
        started
    }

    /// Records that `service` answered; returns the outage this ends, if there was one.
    pub fn up(&self, service: Service) -> Option<EndedOutage> {
        let started = {
            let mut state = self.lock();
            let started = state.down.remove(&service)?;
            state.recovered.insert(service, Instant::now());
            started
        };
        let lasted = started.elapsed();
        tracing::info!(
            observer = %self.observer,
            %service,
            seconds = lasted.as_secs_f64(),
            "{service} answers again after {:.1} s",
            lasted.as_secs_f64()
        );
        metrics::gauge!("syncd_outage_active", "service" => service.as_str()).set(0.0);
        metrics::counter!("syncd_outage_seconds_total", "service" => service.as_str())
            .increment(lasted.as_secs());
        Some(EndedOutage { service, lasted })
    }

    /// Whether any service is down now.
    pub fn any_down(&self) -> bool {
        !self.lock().down.is_empty()
    }

    /// Since when every one of `services` has answered (this process's start if none was ever
    /// down); `None` while one of them is down.
    pub fn healthy_since(&self, services: &[Service]) -> Option<Instant> {
        let state = self.lock();
        let mut since = state.created;
        for service in services {
            if state.down.contains_key(service) {
                return None;
            }
            if let Some(recovered) = state.recovered.get(service) {
                since = since.max(*recovered);
            }
        }
        Some(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_found_under_context() {
        let error = anyhow::Error::msg("connection refused")
            .context(Unreachable {
                service: Service::Llm,
            })
            .context("asking for captions");
        assert_eq!(classify(&error), Some(Service::Llm));
    }

    #[test]
    fn errors_of_the_work_are_not_outages() {
        let error = anyhow::anyhow!("the mesh has no triangles").context("rendering");
        assert_eq!(classify(&error), None);
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io), None, "a bare I/O error names no service");
    }

    #[test]
    fn broker_errors_that_close_the_connection_are_outages() {
        let io = lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )));
        assert_eq!(
            classify(&anyhow::Error::new(io).context("publishing")),
            Some(Service::Broker)
        );
        let closed = lapin::Error::from(lapin::ErrorKind::ChannelsLimitReached);
        assert_eq!(classify(&anyhow::Error::new(closed)), None);
    }

    #[cfg(feature = "database")]
    #[test]
    fn database_connection_errors_are_outages_and_query_errors_are_not() {
        let pool = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("starting a transaction");
        assert_eq!(classify(&pool), Some(Service::Database));
        let missing = anyhow::Error::new(sqlx::Error::RowNotFound);
        assert_eq!(classify(&missing), None);
    }

    #[test]
    fn an_outage_is_timed_from_its_first_report_and_ends_once() {
        let outages = Outages::new("test");
        let both = [Service::Storage, Service::Broker];
        let since = outages.healthy_since(&both).expect("healthy at start");
        let error = anyhow::anyhow!("down");
        assert!(outages.down(Service::Storage, &error));
        assert!(!outages.down(Service::Storage, &error), "the same outage");
        assert_eq!(outages.healthy_since(&both), None);
        assert_eq!(
            outages.healthy_since(&[Service::Broker]),
            Some(since),
            "other services are not affected"
        );
        std::thread::sleep(Duration::from_millis(20));
        let ended = outages.up(Service::Storage).expect("it was down");
        assert!(ended.lasted >= Duration::from_millis(20));
        assert!(outages.up(Service::Storage).is_none());
        assert!(outages.healthy_since(&both).expect("healthy again") > since);
    }

    #[test]
    fn backoff_stays_between_one_and_twenty_seconds_with_jitter() {
        let delays: Vec<Duration> = backoff().take(12).collect();
        assert_eq!(delays.len(), 12, "it never gives up");
        assert!(delays.iter().all(|delay| *delay >= Duration::from_secs(1)));
        assert!(delays.iter().all(|delay| *delay <= Duration::from_secs(20)));
        let distinct: std::collections::BTreeSet<Duration> = backoff().take(8).collect();
        assert!(distinct.len() > 4, "jittered: {distinct:?}");
    }
}
