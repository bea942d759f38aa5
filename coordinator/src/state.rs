//! The state machines of jobs, runs, objects and group decisions. Every state change in the
//! coordinator goes through their `can_become`, so the legal transitions live in this one place.
//! The job machine:
//!
//! ```text
//!            dispatch             Started            Succeeded
//! pending ───────────► queued ───────────► running ───────────► succeeded
//!    ▲                  │  ▲                 │
//!    │                  │  └── retry due ──┐ │ Failed (transient, attempts left),
//!    │                  │                  │ │ lease expired
//!    │                  └────────────────► retry_wait ◄───┘
//!    │                  │                                 │ Failed (permanent / no attempts left)
//!    │ admin retry      └─────────────────────────────────┴──► failed
//!    ├──────────────────────────────────────────────────────── failed, dead_lettered
//!    │                                broker dead-lettered ──► dead_lettered
//! any non-terminal state ── run cancelled ──► cancelled
//! ```
//!
//! A job in `queued` may also succeed or fail directly: the `Started` report is informative and
//! can be overtaken or lost without harm.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created, waiting for the dispatcher (its run must be active).
    Pending,
    /// Written to the outbox for its current attempt; on its way to or waiting in the queue.
    Queued,
    /// A worker reported that it started the current attempt.
    Running,
    /// The last attempt failed transiently; the next one waits for `not_before`.
    RetryWait,
    Succeeded,
    /// Failed permanently, or transiently with no attempts left. An admin can retry it.
    Failed,
    /// The broker gave up on the message (undecodable, or too many deliveries without an ack).
    DeadLettered,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Queued,
        JobState::Running,
        JobState::RetryWait,
        JobState::Succeeded,
        JobState::Failed,
        JobState::DeadLettered,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::RetryWait => "retry_wait",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::DeadLettered => "dead_lettered",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Terminal states need an admin to change (retry); nothing automatic leaves them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::DeadLettered | JobState::Cancelled
        )
    }

    /// States in which a worker may hold the job's current attempt.
    pub fn is_in_flight(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }

    /// The legal transitions. A self-transition `Running -> Running` is a redelivery of the same
    /// attempt to another worker (the first one died holding it).
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Pending, Queued)
                | (Queued, Running)
                | (Running, Running)
                | (
                    Queued | Running,
                    Succeeded | RetryWait | Failed | DeadLettered
                )
                | (RetryWait, Queued)
                | (Failed | DeadLettered, Pending)
                | (Pending | Queued | Running | RetryWait, Cancelled)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown job state {s:?} in the database"))
    }
}

/// The life of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Jobs are dispatched.
    Active,
    /// No new job is dispatched; jobs already queued finish and their results are kept.
    Paused,
    /// Pending and waiting jobs are cancelled; results of jobs still in flight are discarded.
    Cancelled,
    /// Every object reached a terminal state and the dataset is complete.
    Completed,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Active => "active",
            RunState::Paused => "paused",
            RunState::Cancelled => "cancelled",
            RunState::Completed => "completed",
        }
    }

    pub fn can_become(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Active, Paused)
                | (Paused, Active)
                | (Active | Paused, Cancelled)
                | (Active, Completed)
                // An admin retried some of a completed run's failed jobs: it runs again.
                | (Completed, Active)
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunState {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            RunState::Active,
            RunState::Paused,
            RunState::Cancelled,
            RunState::Completed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| anyhow::anyhow!("unknown run state {s:?} in the database"))
    }
}

/// Where an object stands. `active` until every group it can produce is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    Active,
    /// All its groups were generated, scored and decided.
    Done,
    /// A job of the object failed for good (after its retries).
    Failed,
    /// The object cannot be used (a broken or unsupported asset, no usable view triplet).
    Skipped,
    Cancelled,
}

impl ObjectState {
    pub const ALL: [ObjectState; 5] = [
        ObjectState::Active,
        ObjectState::Done,
        ObjectState::Failed,
        ObjectState::Skipped,
        ObjectState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectState::Active => "active",
            ObjectState::Done => "done",
            ObjectState::Failed => "failed",
            ObjectState::Skipped => "skipped",
            ObjectState::Cancelled => "cancelled",
        }
    }

    /// An active object ends once (done, failed, skipped, or cancelled with its run); an admin
    /// retry of one of its jobs makes an ended object other than a cancelled one active again.
    pub fn can_become(self, next: ObjectState) -> bool {
        use ObjectState::*;
        matches!(
            (self, next),
            (Active, Done | Failed | Skipped | Cancelled) | (Done | Failed | Skipped, Active)
        )
    }
}

/// A group's decision: `pending` until it is scored (or a job of it fails for good).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Pending,
    /// Passed the filters and is no near duplicate: it goes into the dataset.
    Accepted,
    /// Failed the filters (aesthetics, pair similarity).
    Rejected,
    /// Passed the filters but is too close to a group accepted before it.
    NearDuplicate,
    /// A job of the group failed for good, or its images could not be packed.
    Failed,
}

impl Decision {
    pub const ALL: [Decision; 5] = [
        Decision::Pending,
        Decision::Accepted,
        Decision::Rejected,
        Decision::NearDuplicate,
        Decision::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pending => "pending",
            Decision::Accepted => "accepted",
            Decision::Rejected => "rejected",
            Decision::NearDuplicate => "near_duplicate",
            Decision::Failed => "failed",
        }
    }

    /// A pending group is decided once; an accepted one can still fail (its images turn out
    /// missing when its shard is packed); a failed one is pending again after an admin retry.
    pub fn can_become(self, next: Decision) -> bool {
        use Decision::*;
        matches!(
            (self, next),
            (Pending, Accepted | Rejected | NearDuplicate | Failed)
                | (Accepted, Failed)
                | (Failed, Pending)
        )
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Decision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decision::ALL
            .into_iter()
            .find(|decision| decision.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown group decision {s:?} in the database"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_only_leave_through_an_admin_retry() {
        for from in JobState::ALL
            .into_iter()
            .filter(|state| state.is_terminal())
        {
            for to in JobState::ALL {
                let allowed = from.can_become(to);
                let admin_retry = matches!(from, JobState::Failed | JobState::DeadLettered)
                    && to == JobState::Pending;
                assert_eq!(allowed, admin_retry, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_happy_path_is_legal() {
        let path = [
            JobState::Pending,
            JobState::Queued,
            JobState::Running,
            JobState::RetryWait,
            JobState::Queued,
            JobState::Succeeded,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} -> {}", pair[0], pair[1]);
        }
        assert!(!JobState::Pending.can_become(JobState::Succeeded));
        assert!(!JobState::Succeeded.can_become(JobState::Cancelled));
    }

    #[test]
    fn an_object_ends_once_and_only_a_retry_reopens_it() {
        for from in ObjectState::ALL {
            for to in ObjectState::ALL {
                let expected = match from {
                    ObjectState::Active => to != ObjectState::Active,
                    ObjectState::Cancelled => false,
                    _ => to == ObjectState::Active,
                };
                assert_eq!(from.can_become(to), expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
        }
        for decision in Decision::ALL {
            assert_eq!(decision.as_str().parse::<Decision>().unwrap(), decision);
        }
        assert!("lost".parse::<JobState>().is_err());
    }
}
