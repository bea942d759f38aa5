//! One active coordinator at a time: the leader holds a PostgreSQL advisory lock, every other
//! coordinator stands by and takes over when the lock is free.
//!
//! The loops of [`crate::service`] are singletons: two results consumers would each keep a
//! near-duplicate cache the other does not see, two completion loops would pack one dataset
//! twice. So a coordinator runs them only while it holds the session-level advisory lock
//! `(LOCK_CLASS, LOCK_OBJECT)` on a connection of its own, outside the pool. A standby keeps that
//! connection open and tries the lock every `loops.leadership_interval_ms`.
//!
//! - **Takeover.** A leader that dies (SIGKILL, a lost host) closes its session, or PostgreSQL
//!   ends it once TCP keepalives go unanswered (set to about 25 s on the lock session); the lock
//!   is then free and the next standby's try takes it: about one interval after the session
//!   ends, plus the grace below (7 s with the default interval of 1 s).
//! - **No two leaders.** A leader checks every interval that its session still holds the lock,
//!   and stops its loops as soon as a check fails or does not answer within five intervals: it
//!   gives them one more interval to finish, then aborts them. A new leader waits seven intervals
//!   after taking the lock before it starts its loops, so a leader whose session was ended by the
//!   server (an administrator, a server restart, an outage) has stopped first.
//! - **Shutdown.** A leader that stops on purpose releases the lock once its loops have stopped,
//!   so a standby takes over at its next try.
//!
//! Advisory locks belong to one database, so factories sharing a PostgreSQL server in different
//! databases do not contend. The lock sessions are named `syncd-coordinator <host> <pid>`
//! (`application_name`), which is how [`coordinators`] tells the leader from the standbys.

use crate::config::DatabaseConfig;
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;
use syncd_infra::outage::{self, Outages, Service, Unreachable};

/// The advisory lock of the active coordinator, in PostgreSQL's two-key form (`pg_locks` shows it
/// as `classid = 1937337955, objid = 1, objsubid = 2`). `LOCK_CLASS` is "sync" in ASCII; the
/// migrator's lock uses the one-key form, so the two never meet.
pub const LOCK_CLASS: i32 = 0x7379_6e63;
pub const LOCK_OBJECT: i32 = 1;

/// The `application_name` prefix of every coordinator's lock session.
const SESSION_PREFIX: &str = "syncd-coordinator";

/// A coordinator that wants to lead.
pub struct Candidate {
    options: PgConnectOptions,
    timing: Timing,
    name: String,
}

/// How often the lock is tried and checked, and how long a try or check may take.
#[derive(Clone, Copy, Debug)]
struct Timing {
    interval: Duration,
    /// Five intervals: a try or check not answered by then counts as a database outage.
    answer_timeout: Duration,
}

impl Timing {
    fn new(interval: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(100));
        Self {
            interval,
            answer_timeout: 5 * interval,
        }
    }

    /// How long a new leader waits before starting: the previous leader, if the server ended its
    /// session, sees its next check fail within one interval plus a check's time-out, and has
    /// stopped its loops one interval later.
    fn takeover_grace(&self) -> Duration {
        2 * self.interval + self.answer_timeout
    }

    /// `work`, or a database outage when it does not answer in time: a session behind a network
    /// partition never fails by itself.
    async fn answer_in_time<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.answer_timeout, work).await {
            Ok(result) => result,
            Err(elapsed) => Err(anyhow::Error::new(elapsed)
                .context(Unreachable {
                    service: Service::Database,
                })
                .context(format!(
                    "the lock session did not answer in {:?}",
                    self.answer_timeout
                ))),
        }
    }
}

/// The lock held: this coordinator leads until [`Leadership::lost`] resolves or it releases.
pub struct Leadership {
    connection: PgConnection,
    timing: Timing,
}

impl Candidate {
    /// A candidate connecting like `database`, trying (and, once leading, checking) the lock
    /// every `interval`.
    pub fn new(database: &DatabaseConfig, interval: Duration) -> Result<Self> {
        let host = hostname::get()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown-host".into());
        let name = format!("{SESSION_PREFIX} {host} {}", std::process::id());
        let options = PgConnectOptions::from_str(database.url.expose_secret())
            .context("invalid database.url")?
            .application_name(&name)
            // A session whose client vanished without closing its socket (a host lost, a
            // partition) would hold the lock until the kernel gives up on it, hours later.
            .options([
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]);
        Ok(Self {
            options,
            timing: Timing::new(interval),
            name,
        })
    }

    /// How often the lock is tried and checked (at least 100 ms, whatever was configured).
    pub fn interval(&self) -> Duration {
        self.timing.interval
    }

    /// This coordinator's lock session name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until this coordinator holds the lock, standing by while another one does. Database
    /// outages are waited out (marked in `outages`, and written down in `pool` once over); other
    /// errors are returned.
    pub async fn acquire(&self, outages: &Outages, pool: &PgPool) -> Result<Leadership> {
        let mut connection: Option<PgConnection> = None;
        let mut delays = outage::backoff();
        let mut standing_by = false;
        loop {
            let tried = self
                .timing
                .answer_in_time(self.try_lock(&mut connection))
                .await;
            if tried.is_ok() {
                crate::outages::answered(pool, outages, &[Service::Database]).await;
            }
            match tried {
                Ok(true) => {
                    let connection = connection.take().context("the lock session")?;
                    let grace = self.timing.takeover_grace();
                    tracing::info!(
                        session = %self.name,
                        ?grace,
                        "this coordinator holds the leader lock; leading after a grace period"
                    );
                    tokio::time::sleep(grace).await;
                    return Ok(Leadership {
                        connection,
                        timing: self.timing,
                    });
                }
                Ok(false) => {
                    delays = outage::backoff();
                    if !standing_by {
                        standing_by = true;
                        tracing::info!(
                            session = %self.name,
                            "another coordinator leads; standing by"
                        );
                    }
                    tokio::time::sleep(self.timing.interval).await;
                }
                Err(error) if outage::classify(&error) == Some(Service::Database) => {
                    outages.down(Service::Database, &error);
                    // The session may be half-dead: start again on a fresh one.
                    connection = None;
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One try of the lock on `connection`, opening it first if there is none.
    async fn try_lock(&self, connection: &mut Option<PgConnection>) -> Result<bool> {
        if connection.is_none() {
            *connection = Some(
                self.options
                    .connect()
                    .await
                    .context("connecting the coordinator's lock session to PostgreSQL")?,
            );
        }
        let session = connection.as_mut().context("the lock session")?;
        sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1, $2) AS "held!""#,
            LOCK_CLASS,
            LOCK_OBJECT
        )
        .fetch_one(session)
        .await
        .context("trying the leader lock")
    }
}

impl Leadership {
    /// Resolves when this coordinator may no longer lead: its session no longer holds the lock,
    /// failed, or did not answer a check in time. The error says which.
    pub async fn lost(&mut self) -> anyhow::Error {
        loop {
            tokio::time::sleep(self.timing.interval).await;
            match self
                .timing
                .answer_in_time(holds_lock(&mut self.connection))
                .await
            {
                Ok(true) => {}
                Ok(false) => return anyhow!("the leader lock is no longer held by this session"),
                Err(error) => return error.context("the leader lock's session failed"),
            }
        }
    }

    /// Gives the lock up (closing the session also would, but a clean unlock is immediate).
    pub async fn release(mut self) {
        let unlocked =
            sqlx::query_scalar!("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, LOCK_OBJECT)
                .fetch_one(&mut self.connection);
        if let Err(error) = self
            .timing
            .answer_in_time(async { Ok(unlocked.await?) })
            .await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                "the leader lock was not released; it is freed when its session closes"
            );
        }
        let _ = tokio::time::timeout(self.timing.answer_timeout, self.connection.close()).await;
    }
}

/// Whether `connection`'s session holds the leader lock.
async fn holds_lock(connection: &mut PgConnection) -> Result<bool> {
    // The lock's two int4 keys are stored as oids: their bits, read unsigned.
    sqlx::query_scalar!(
        r#"SELECT EXISTS (
               SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                 AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = 2
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
               AS "held!""#,
        i64::from(LOCK_CLASS),
        i64::from(LOCK_OBJECT)
    )
    .fetch_one(connection)
    .await
    .context("checking the leader lock")
}

/// A coordinator connected to the database, as `syncd coordinators` lists it.
#[derive(Debug, Serialize)]
pub struct CoordinatorRow {
    /// `syncd-coordinator <host> <pid>`.
    pub session: String,
    /// The address it connects from (none over a Unix socket).
    pub address: Option<String>,
    /// When its lock session started.
    pub connected_at: DateTime<Utc>,
    /// `leading` or `standing by`.
    pub role: &'static str,
}

/// The coordinators whose lock sessions are open now, the leader first.
pub async fn coordinators(pool: &PgPool) -> Result<Vec<CoordinatorRow>> {
    let rows = sqlx::query!(
        r#"SELECT a.application_name AS "session!", host(a.client_addr) AS address,
                  a.backend_start AS "connected_at!",
                  EXISTS (SELECT 1 FROM pg_locks l
                          WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
                            AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid
                            AND l.objsubid = 2 AND l.database = a.datid) AS "leading!"
           FROM pg_stat_activity a
           WHERE a.datname = current_database() AND a.application_name LIKE $3
           ORDER BY 4 DESC, a.backend_start"#,
        i64::from(LOCK_CLASS),
        i64::from(LOCK_OBJECT),
        format!("{SESSION_PREFIX} %")
    )
    .fetch_all(pool)
    .await
    .context("listing the coordinators' lock sessions")?;
    Ok(rows
        .into_iter()
        .map(|row| CoordinatorRow {
            session: row.session,
            address: row.address,
            connected_at: row.connected_at,
            role: if row.leading {
                "leading"
            } else {
                "standing by"
            },
        })
        .collect())
}
