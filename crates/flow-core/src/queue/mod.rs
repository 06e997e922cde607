//! The `JobQueue` contract every backend implements, and the in-memory backend.
//!
//! The contract (design.md section 4), in short:
//!
//! * [`JobQueue::enqueue`] stores a job; it becomes *ready* at once or *scheduled* until its
//!   run-at time. Lower priority values run first, FIFO within one priority; priority and
//!   time never share one score. A live dedupe key returns the first job's id.
//! * [`JobQueue::fetch`] moves up to N ready jobs to *running* in one atomic step and hands
//!   each out with a [`Lease`] (deadline plus fencing token). A fetched job is never in two
//!   places and never nowhere. Each fetch counts one attempt.
//! * [`JobQueue::heartbeat`] extends a lease; [`JobQueue::complete`], [`JobQueue::retry`],
//!   [`JobQueue::fail`], [`JobQueue::release`] and [`JobQueue::mark_cancelled`] end it. A
//!   stale lease (the job was reclaimed and leased again, or already finished) is refused
//!   with [`Error::LeaseLost`], so one attempt's outcome is recorded at most once. The
//!   same outcome sent again with the same lease (a retry after a lost reply) is
//!   accepted without changing anything, so a worker learns its outcome was recorded.
//! * Fencing tokens are random 64-bit values drawn per lease, never a counter: a backend
//!   that loses recent writes in a crash cannot hand out a token an earlier holder has.
//! * [`JobQueue::fetch_held`] lets a prefetching worker lease jobs it will start later;
//!   held jobs are never charged an attempt or a lease expiry for waiting.
//! * [`JobQueue::reap`] reclaims expired leases: back to ready, or to the dead-letter set
//!   when the attempts are spent or the lease expired too often.
//! * Results, errors and states are readable by id for the retention time; dead letters
//!   are bounded, listed newest first, requeued or purged.
//!
//! Times are milliseconds since the Unix epoch ([`now_ms`]), so every backend and every
//! process agrees on them.

mod in_flight;
mod limits;
mod memory;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, FlowError};

pub use in_flight::{InFlight, InFlightGuard};
pub use limits::{
    MAX_DEDUPE_KEY_BYTES, MAX_FAILURE_CODE_BYTES, MAX_FAILURE_DETAILS_BYTES,
    MAX_FAILURE_MESSAGE_BYTES, MAX_HEADER_NAME_BYTES, MAX_HEADER_VALUE_BYTES, MAX_HEADERS,
    MAX_HEADERS_BYTES, MAX_JOBS_PER_CALL, MAX_QUEUE_NAME_BYTES, MAX_RECORD_OVERHEAD_BYTES,
    MAX_RESULT_BYTES, MAX_TENANT_BYTES, bound_result, bound_result_json, check_batch_len,
    json_size, truncated_marker,
};
pub use memory::MemoryQueue;

/// A job id: a UUIDv7, sortable by creation time and unique across processes.
pub type JobId = Uuid;

/// Default largest payload accepted at enqueue: 1 MiB of serialized JSON.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Default number of dead letters kept per queue.
pub const DEFAULT_DEAD_LETTER_LIMIT: usize = 10_000;
/// Default time results, errors and finished states are kept.
pub const DEFAULT_RESULT_RETENTION: Duration = Duration::from_secs(3600);
/// Default number of lease expiries after which a job is dead-lettered.
pub const DEFAULT_MAX_LEASE_EXPIRIES: u32 = 3;
/// Default job-level retries.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Dead-letter code of a job whose lease expired when it had no attempts left.
pub const CODE_LEASE_EXPIRED: &str = "LEASE_EXPIRED";
/// Dead-letter code of a job whose lease expired too many times (it keeps killing workers).
pub const CODE_LEASE_EXPIRED_TOO_OFTEN: &str = "LEASE_EXPIRED_TOO_OFTEN";
/// Dead-letter code of a stored record that cannot be decoded.
pub const CODE_CORRUPT_JOB: &str = "CORRUPT_JOB";

/// Limits and retention times every backend takes.
///
/// ```
/// use flow_core::queue::QueueOptions;
/// use std::time::Duration;
/// let opts = QueueOptions { result_retention: Duration::from_secs(60), ..Default::default() };
/// assert_eq!(opts.dead_letter_limit, 10_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// Largest serialized payload accepted at enqueue.
    pub max_payload_bytes: usize,
    /// Dead letters kept per queue; the oldest are dropped (and counted) beyond it.
    pub dead_letter_limit: usize,
    /// How long results, errors and finished states stay readable.
    pub result_retention: Duration,
    /// Lease expiries after which a job goes to the dead-letter set with
    /// [`CODE_LEASE_EXPIRED_TOO_OFTEN`].
    pub max_lease_expiries: u32,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            dead_letter_limit: DEFAULT_DEAD_LETTER_LIMIT,
            result_retention: DEFAULT_RESULT_RETENTION,
            max_lease_expiries: DEFAULT_MAX_LEASE_EXPIRIES,
        }
    }
}

/// A fresh fencing token: 53 random bits, never 0. 53 bits fit every backend's number
/// type exactly (a Lua number in Redis scripts, PostgreSQL's `bigint`), and a collision
/// between two leases of one job is a one in 2^53 chance.
pub fn new_token() -> u64 {
    fastrand::u64(1..(1u64 << 53))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Checks a queue name: 1 to 128 characters of `[A-Za-z0-9._:-]`.
///
/// ```
/// use flow_core::queue::validate_queue_name;
/// assert!(validate_queue_name("emails:high").is_ok());
/// assert!(validate_queue_name("bad name").is_err());
/// ```
pub fn validate_queue_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "it is empty; use 1 to 128 characters of A-Z a-z 0-9 . _ : -"
    } else if name.len() > 128 {
        "it is longer than 128 characters"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        "only A-Z a-z 0-9 . _ : - are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidQueueName {
        name: name.to_owned(),
        reason,
    })
}

/// A job to enqueue. Build with [`NewJob::new`] and the chained setters.
///
/// ```
/// use flow_core::queue::NewJob;
/// use serde_json::json;
/// use std::time::Duration;
///
/// let job = NewJob::new("emails", json!({"to": "a@example.com"}))
///     .priority(-1)
///     .delay(Duration::from_secs(5))
///     .max_retries(5)
///     .tenant("acme")
///     .dedupe_key("welcome:42");
/// assert_eq!(job.queue, "emails");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The queue to put it in.
    pub queue: String,
    /// The JSON payload.
    pub payload: Value,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Lower runs first; FIFO within one priority.
    pub priority: i32,
    /// Do not run before this instant (epoch milliseconds, as the producer's clock reads
    /// it); `None` = no such bound. Set it with [`NewJob::run_at_ms()`] when the caller means
    /// an instant; for "in N seconds" use [`NewJob::delay()`], which the backend measures
    /// with its own clock, so a producer whose clock is off does not shift the job.
    pub run_at_ms: Option<i64>,
    /// Do not run before this many milliseconds after the backend stored the job, measured
    /// with the backend's own clock (the server's, for Redis and PostgreSQL); `None` = no
    /// delay. Set by [`NewJob::delay()`].
    ///
    /// When both this and `run_at_ms` are set (by assigning the fields; each
    /// setter clears the other), the job waits for the later of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Job-level retries after the first attempt.
    pub max_retries: u32,
    /// While a job with this key is live (not completed, dead or cancelled), enqueueing
    /// another with the same key returns the live job's id instead.
    pub dedupe_key: Option<String>,
    /// Headers carried with the job, such as W3C trace context (`traceparent`).
    pub headers: BTreeMap<String, String>,
}

impl NewJob {
    /// A job for `queue` with `payload`, tenant `default`, priority 0, runnable now,
    /// [`DEFAULT_MAX_RETRIES`] retries, no dedupe key.
    pub fn new(queue: impl Into<String>, payload: Value) -> Self {
        Self {
            queue: queue.into(),
            payload,
            tenant: "default".to_owned(),
            priority: 0,
            run_at_ms: None,
            delay_ms: None,
            max_retries: DEFAULT_MAX_RETRIES,
            dedupe_key: None,
            headers: BTreeMap::new(),
        }
    }
    /// Sets the priority (lower runs first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    /// Runs no earlier than `delay` after the backend stores it, by the backend's clock
    /// (sets `delay_ms`, clears `run_at_ms`). The delay travels as a
    /// duration, so a producer whose clock is off still gets the delay it asked for.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self.run_at_ms = None;
        self
    }
    /// Runs no earlier than the instant `run_at_ms` (epoch milliseconds, compared with the
    /// backend's clock; sets `run_at_ms`, clears `delay_ms`).
    pub fn run_at_ms(mut self, run_at_ms: i64) -> Self {
        self.run_at_ms = Some(run_at_ms);
        self.delay_ms = None;
        self
    }
    /// When the job is due, given the backend's clock `now_ms` at the moment it stores the
    /// job: the later of `run_at_ms` and `now_ms` plus `delay_ms`, or
    /// `None` when neither is set (due at once). Backends call this with their own clock.
    ///
    /// ```
    /// use flow_core::queue::NewJob;
    /// use serde_json::json;
    /// use std::time::Duration;
    ///
    /// let job = NewJob::new("q", json!(1)).delay(Duration::from_secs(30));
    /// assert_eq!(job.due_at_ms(1_000_000), Some(1_030_000));
    /// let job = NewJob::new("q", json!(1)).run_at_ms(5_000);
    /// assert_eq!(job.due_at_ms(1_000_000), Some(5_000));
    /// assert_eq!(NewJob::new("q", json!(1)).due_at_ms(1_000_000), None);
    /// // Both set: the later of the two.
    /// let mut both = NewJob::new("q", json!(1)).run_at_ms(5_000);
    /// both.delay_ms = Some(10_000);
    /// assert_eq!(both.due_at_ms(1_000), Some(11_000));
    /// assert_eq!(both.due_at_ms(-9_000), Some(5_000));
    /// ```
    pub fn due_at_ms(&self, now_ms: i64) -> Option<i64> {
        let relative = self
            .delay_ms
            .map(|d| now_ms.saturating_add(i64::try_from(d).unwrap_or(i64::MAX)));
        match (self.run_at_ms, relative) {
            (Some(at), Some(after)) => Some(at.max(after)),
            (at, after) => at.or(after),
        }
    }
    /// Sets the number of job-level retries.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }
    /// Sets the tenant.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }
    /// Sets the dedupe key.
    pub fn dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }
    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Checks the queue name, the payload's serialized size against
    /// `max_payload_bytes` ([`Error::PayloadTooLarge`]), and every other field against
    /// its limit ([`NewJob::validate_fields`]: [`Error::InvalidJob`] naming the field).
    /// Every backend calls it (or its parts) before storing anything.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), Error> {
        validate_queue_name(&self.queue)?;
        let size = json_size(&self.payload).map_err(|e| Error::InvalidJob {
            option: "payload",
            reason: e.to_string(),
        })?;
        if size > max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size,
                limit: max_payload_bytes,
            });
        }
        self.validate_fields()
    }
}

/// The right to record one attempt's outcome, handed out by [`JobQueue::fetch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// Its queue.
    pub queue: String,
    /// Fencing token: a fresh random non-zero value every time the job is leased.
    pub token: u64,
    /// When the lease runs out (epoch milliseconds) unless extended.
    pub expires_at_ms: i64,
}

/// A leased job, as a worker receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeasedJob {
    /// The job's id.
    pub id: JobId,
    /// Its queue.
    pub queue: String,
    /// The payload.
    pub payload: Value,
    /// The tenant.
    pub tenant: String,
    /// The priority.
    pub priority: i32,
    /// This attempt's number, starting at 1.
    pub attempt: u32,
    /// Job-level retries allowed: attempts run up to `max_retries + 1`.
    pub max_retries: u32,
    /// Headers given at enqueue.
    pub headers: BTreeMap<String, String>,
    /// When it was enqueued (epoch milliseconds).
    pub enqueued_at_ms: i64,
    /// The lease.
    pub lease: Lease,
}

impl LeasedJob {
    /// Whether another attempt is allowed after this one.
    pub fn can_retry(&self) -> bool {
        self.attempt <= self.max_retries
    }
}

/// Why an attempt failed: a code, a message and optional details (a FlowError payload).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Machine-readable code, such as `NODE_EXCEPTION`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Extra details, such as [`FlowError::to_payload`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl Failure {
    /// A failure with a code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            details: None,
        }
    }
}

impl From<&FlowError> for Failure {
    fn from(e: &FlowError) -> Self {
        Self {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
            details: Some(e.to_payload()),
        }
    }
}

/// The state of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be fetched.
    Ready,
    /// Waiting for its run-at time (delayed, or a retry backing off).
    Scheduled,
    /// Leased to a worker.
    Running,
    /// Finished with a result.
    Completed,
    /// In the dead-letter set.
    Dead,
    /// Cancelled before or while running.
    Cancelled,
}

impl JobState {
    /// The lowercase name used in JSON and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
    /// Completed, dead or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Dead | Self::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about one job, as [`JobQueue::job`] returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The id.
    pub id: JobId,
    /// The queue.
    pub queue: String,
    /// Current state.
    pub state: JobState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Job-level retries allowed.
    pub max_retries: u32,
    /// Priority.
    pub priority: i32,
    /// Tenant.
    pub tenant: String,
    /// Payload.
    pub payload: Value,
    /// The result, once completed.
    pub result: Option<Value>,
    /// The last failure: the dead-letter reason, a retry's reason, or a cancellation.
    pub error: Option<Failure>,
    /// When enqueued (epoch ms).
    pub created_at_ms: i64,
    /// When runnable (epoch ms).
    pub run_at_ms: i64,
    /// When it reached a terminal state (epoch ms).
    pub finished_at_ms: Option<i64>,
    /// How many times its lease expired.
    pub lease_expiries: u32,
    /// Whether a cancel was asked while it was running.
    pub cancel_requested: bool,
    /// The dedupe key.
    pub dedupe_key: Option<String>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
}

/// One entry of the dead-letter set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The job's id.
    pub id: JobId,
    /// The queue.
    pub queue: String,
    /// Why it died.
    pub error: Failure,
    /// Attempts it had.
    pub attempts: u32,
    /// When it died (epoch ms).
    pub failed_at_ms: i64,
    /// Its payload.
    pub payload: Value,
    /// Its tenant.
    pub tenant: String,
}

/// Counts of one queue, cheap to compute whatever its size.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Ready to fetch.
    pub ready: u64,
    /// Waiting for their time.
    pub scheduled: u64,
    /// Leased.
    pub running: u64,
    /// Completed and still kept.
    pub completed: u64,
    /// In the dead-letter set.
    pub dead: u64,
    /// Whether the queue is paused.
    pub paused: bool,
    /// Age of the oldest ready job, in seconds (0 when none).
    pub oldest_ready_age_s: f64,
    /// Dead letters dropped because the set was full, since the queue existed.
    pub dead_dropped: u64,
}

/// What [`JobQueue::reap`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapReport {
    /// Jobs put back to ready.
    pub requeued: Vec<JobId>,
    /// Jobs dead-lettered (attempts spent or lease expired too often).
    pub dead: Vec<JobId>,
}

impl ReapReport {
    /// Total jobs reclaimed.
    pub fn total(&self) -> usize {
        self.requeued.len() + self.dead.len()
    }
}

/// The answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The new lease deadline (epoch ms).
    pub expires_at_ms: i64,
    /// Someone asked to cancel this job: the worker should cancel its trace and call
    /// [`JobQueue::mark_cancelled`].
    pub cancel_requested: bool,
}

/// What [`JobQueue::cancel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job was ready or scheduled and is now cancelled; it will not run.
    Cancelled,
    /// The job is running; its worker was asked to cancel it.
    Requested,
    /// The job had already finished; nothing changed.
    AlreadyFinished,
}

/// A durable job queue. Implemented by the in-memory, Redis and PostgreSQL backends and
/// proven by the `queue-conformance` suite.
///
/// Operations on one job take the queue name (or the lease, which carries it), so a
/// backend can keep a queue's data together (one Redis Cluster slot, say).
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Enqueues one job and returns its id (or the live job's id for a duplicate dedupe key).
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error>;

    /// Enqueues many jobs at once, of one queue or several; ids are returned in input
    /// order (a job whose dedupe key a live job holds gets that job's id).
    ///
    /// All or nothing. A job that fails validation stores none of them. A call that fails
    /// for any other reason (its connection cut mid-way, the server gone) leaves none of
    /// its jobs stored, or, when only its reply was lost, all of them stored once; never
    /// some. The error cannot tell which: give jobs dedupe keys to make sending them
    /// again safe either way. At most [`MAX_JOBS_PER_CALL`] jobs per call. Backends: memory (one
    /// lock), PostgreSQL (one transaction), Redis (one script call, or one `MULTI`/`EXEC`
    /// transaction of several).
    ///
    /// The one exception is Redis Cluster with a call naming queues in different hash
    /// slots, which no single atomic step there can span: every queue's jobs are first
    /// staged in its own slot, where nothing sees them (a failure while staging stores
    /// nothing), and then stored queue by queue, one short step each. A failure in that
    /// last step (after the client's own retries) can leave the queues stored before it
    /// stored; the error names them. Each queue's jobs are still all or nothing.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error>;

    /// Leases up to `max` ready jobs of `queue` for `lease`, waiting up to `wait` for the
    /// first one. Returns an empty vector when none came in time or the queue is paused.
    /// Dropping the returned future never loses a job.
    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error>;

    /// Like [`JobQueue::fetch`], for a worker that prefetches: only the first `start` jobs
    /// returned are *started* (their attempt runs now); the rest are *held*: leased to the
    /// caller, waiting in it for a free slot.
    ///
    /// A held job is charged nothing for the wait. When its lease expires before the
    /// caller reported it started with [`JobQueue::mark_started`] (the worker was killed
    /// while it only held the job), [`JobQueue::reap`] puts it back to ready with the
    /// attempt taken back and no lease expiry counted. [`JobQueue::release`] hands it back
    /// the same way. Once marked started, it is an ordinary running job. Outcomes
    /// ([`JobQueue::complete`] and the others) are accepted for held jobs too.
    ///
    /// The default counts every job as started (a backend that cannot tell the two apart).
    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        let _ = start;
        self.fetch(queue, max, lease, wait).await
    }

    /// Records that held jobs (see [`JobQueue::fetch_held`]) have started, so a lease that
    /// expires from now on counts as an attempt and a lease expiry. Fenced per lease: a
    /// stale lease, or a job that is no longer running, is left alone without an error.
    async fn mark_started(&self, leases: &[Lease]) -> Result<(), Error> {
        let _ = leases;
        Ok(())
    }

    /// Finishes background work this handle started and the caller should not cut short,
    /// such as handing back the jobs of a fetch whose caller went away. A worker calls it
    /// (under a timeout) before its process exits. The default has nothing to wait for.
    async fn flush(&self) {}

    /// Extends a lease to now plus `extend`.
    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat, Error>;

    /// Records the result and ends the lease.
    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), Error>;

    /// Completes several leases at once; each is fenced on its own and gets its own answer.
    async fn complete_many(&self, items: Vec<(Lease, Value)>) -> Vec<Result<(), Error>> {
        let mut out = Vec::with_capacity(items.len());
        for (lease, value) in items {
            out.push(self.complete(&lease, value).await);
        }
        out
    }

    /// Schedules another attempt after `delay`, recording why this one failed.
    async fn retry(&self, lease: &Lease, delay: Duration, failure: Failure) -> Result<(), Error>;

    /// Moves the job to the dead-letter set.
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), Error>;

    /// Hands the job back untouched (shutdown): ready again, this attempt not counted.
    async fn release(&self, lease: &Lease) -> Result<(), Error>;

    /// Records that a running job was cancelled on request (state cancelled).
    async fn mark_cancelled(&self, lease: &Lease, failure: Failure) -> Result<(), Error>;

    /// Reclaims expired leases of `queue`.
    async fn reap(&self, queue: &str) -> Result<ReapReport, Error>;

    /// Reads one job.
    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, Error>;

    /// Cancels a ready or scheduled job, or asks a running one to cancel.
    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, Error>;

    /// Counts of one queue.
    async fn stats(&self, queue: &str) -> Result<QueueStats, Error>;

    /// Dead letters, newest first, skipping `offset`, at most `limit`.
    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error>;

    /// Puts one dead job back to ready with its attempts reset.
    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), Error>;

    /// Puts every dead job of the queue back to ready; returns how many.
    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, Error>;

    /// Deletes every dead letter of the queue; returns how many.
    async fn purge_dead(&self, queue: &str) -> Result<u64, Error>;

    /// Pauses a queue: fetch hands out nothing; enqueue still works.
    async fn pause(&self, queue: &str) -> Result<(), Error>;

    /// Resumes a paused queue.
    async fn resume(&self, queue: &str) -> Result<(), Error>;

    /// Checks the backend answers (for readiness probes).
    async fn ping(&self) -> Result<(), Error>;
}

#[async_trait]
impl<Q: JobQueue + ?Sized> JobQueue for std::sync::Arc<Q> {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        (**self).enqueue(job).await
    }
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        (**self).enqueue_many(jobs).await
    }
    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        (**self).fetch(queue, max, lease, wait).await
    }
    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        (**self).fetch_held(queue, max, start, lease, wait).await
    }
    async fn mark_started(&self, leases: &[Lease]) -> Result<(), Error> {
        (**self).mark_started(leases).await
    }
    async fn flush(&self) {
        (**self).flush().await
    }
    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat, Error> {
        (**self).heartbeat(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), Error> {
        (**self).complete(lease, result).await
    }
    async fn complete_many(&self, items: Vec<(Lease, Value)>) -> Vec<Result<(), Error>> {
        (**self).complete_many(items).await
    }
    async fn retry(&self, lease: &Lease, delay: Duration, failure: Failure) -> Result<(), Error> {
        (**self).retry(lease, delay, failure).await
    }
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        (**self).fail(lease, failure).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        (**self).release(lease).await
    }
    async fn mark_cancelled(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        (**self).mark_cancelled(lease, failure).await
    }
    async fn reap(&self, queue: &str) -> Result<ReapReport, Error> {
        (**self).reap(queue).await
    }
    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, Error> {
        (**self).job(queue, id).await
    }
    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, Error> {
        (**self).cancel(queue, id).await
    }
    async fn stats(&self, queue: &str) -> Result<QueueStats, Error> {
        (**self).stats(queue).await
    }
    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        (**self).dead_letters(queue, offset, limit).await
    }
    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), Error> {
        (**self).requeue_dead(queue, id).await
    }
    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, Error> {
        (**self).requeue_all_dead(queue).await
    }
    async fn purge_dead(&self, queue: &str) -> Result<u64, Error> {
        (**self).purge_dead(queue).await
    }
    async fn pause(&self, queue: &str) -> Result<(), Error> {
        (**self).pause(queue).await
    }
    async fn resume(&self, queue: &str) -> Result<(), Error> {
        (**self).resume(queue).await
    }
    async fn ping(&self) -> Result<(), Error> {
        (**self).ping().await
    }
}
