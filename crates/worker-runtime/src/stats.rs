//! Counters of a worker pool, and the observer hook that metrics exporters plug into.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Live counters of one pool. Shared with HTTP handlers through an `Arc`.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub(crate) processed: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) rescued: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
}

/// A point-in-time copy of [`PoolStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Attempts that reached an outcome (succeeded, failed, retried or cancelled).
    pub processed: u64,
    /// Attempts that completed the job.
    pub succeeded: u64,
    /// Jobs moved to the dead-letter set.
    pub failed: u64,
    /// Attempts scheduled to run again.
    pub retried: u64,
    /// Attempts that ended in `NODE_TIMEOUT` or `JOB_TIMEOUT`.
    pub timeouts: u64,
    /// Jobs cancelled on request while running.
    pub cancelled: u64,
    /// Jobs handed back to the queue at shutdown (attempt not counted).
    pub released: u64,
    /// Attempts whose lease was lost (reclaimed elsewhere): outcome not recorded here.
    pub lease_lost: u64,
    /// Expired leases this pool's reaper reclaimed.
    pub rescued: u64,
    /// Jobs running now.
    pub active: u64,
    /// Fetches that failed (backend trouble).
    pub fetch_errors: u64,
}

impl PoolStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            processed: l(&self.processed),
            succeeded: l(&self.succeeded),
            failed: l(&self.failed),
            retried: l(&self.retried),
            timeouts: l(&self.timeouts),
            cancelled: l(&self.cancelled),
            released: l(&self.released),
            lease_lost: l(&self.lease_lost),
            rescued: l(&self.rescued),
            active: l(&self.active),
            fetch_errors: l(&self.fetch_errors),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How one attempt ended, as an observer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The job completed.
    Succeeded,
    /// Scheduled to run again.
    Retried,
    /// Moved to the dead-letter set.
    DeadLettered,
    /// Cancelled on request.
    Cancelled,
    /// Handed back at shutdown.
    Released,
    /// The lease was lost; another worker owns the job.
    LeaseLost,
}

/// One finished attempt, reported to [`JobObserver`]s.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptReport {
    /// The job.
    pub job_id: String,
    /// Its queue.
    pub queue: String,
    /// Its tenant.
    pub tenant: String,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The error code when it failed.
    pub code: Option<String>,
    /// Wall time of the attempt.
    pub duration: Duration,
}

/// Gets a report of every attempt a pool finishes (for metrics and audit logs). Called
/// inline: keep it fast.
pub trait JobObserver: Send + Sync + 'static {
    /// Called once per finished attempt.
    fn attempt_finished(&self, report: &AttemptReport);
    /// Called when the reaper reclaimed `count` expired leases.
    fn leases_rescued(&self, _queue: &str, _count: u64) {}
}
