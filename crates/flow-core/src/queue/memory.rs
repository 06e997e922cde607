//! The in-memory backend: [`MemoryQueue`].
//!
//! Everything lives in one process, behind one [`std::sync::Mutex`] that is never held
//! across an `.await`. Every state change (enqueue, the move from ready to running,
//! completion, reaping) happens in one critical section, so the backend gives the same
//! guarantees as the server-side backends: a fetched job is never in two places and never
//! nowhere, and a stale lease never records an outcome.
//!
//! Layout per queue:
//!
//! * ready jobs in a `BTreeSet<(priority, seq, id)>`: lower priority first, FIFO within one
//!   priority by a sequence number taken when the job joins the line;
//! * scheduled jobs (delayed, or retries backing off) in a `BTreeSet<(run_at_ms, seq, id)>`,
//!   promoted to ready when due, so priority and time never share one score;
//! * running jobs in a set, scanned by [`JobQueue::reap`];
//! * dead letters in a `BTreeSet<(failed_at_ms, seq, id)>`, bounded by
//!   [`QueueOptions::dead_letter_limit`];
//! * completed and cancelled jobs in a time-ordered list, purged after
//!   [`QueueOptions::result_retention`].
//!
//! Nothing survives the process: use it for tests, development and single-process
//! deployments that accept losing queued work on exit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    CODE_LEASE_EXPIRED, CODE_LEASE_EXPIRED_TOO_OFTEN, CancelOutcome, DeadLetter, Failure,
    Heartbeat, JobId, JobInfo, JobQueue, JobState, Lease, LeasedJob, NewJob, QueueOptions,
    QueueStats, ReapReport, now_ms, validate_queue_name,
};
use crate::error::Error;

/// Error code recorded on a job cancelled before it ran, or one whose cancel request was
/// honoured when its worker handed it back.
const CODE_CANCELLED: &str = "CANCELLED";

/// Longest wait a fetch honours when the caller passes something absurd (about a year).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// An in-memory [`JobQueue`].
///
/// Cheap to share: wrap it in an [`Arc`] and hand clones to producers, workers and the
/// reaper. Fetch waits are woken by enqueues, requeues and resumes, and by the due time of
/// the next scheduled job, so idle workers do not spin.
///
/// ```
/// use flow_core::queue::{JobQueue, MemoryQueue, NewJob};
/// use serde_json::json;
/// use std::time::Duration;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let q = MemoryQueue::new();
/// let id = q.enqueue(NewJob::new("emails", json!({"to": "a@example.com"}))).await?;
/// let jobs = q.fetch("emails", 10, Duration::from_secs(30), Duration::ZERO).await?;
/// assert_eq!(jobs[0].id, id);
/// q.complete(&jobs[0].lease, json!("sent")).await?;
/// assert_eq!(q.job("emails", id).await?.unwrap().result, Some(json!("sent")));
/// # Ok::<(), flow_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryQueue {
    opts: QueueOptions,
    inner: Mutex<Inner>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryQueue {
    /// An empty queue with the default [`QueueOptions`].
    pub fn new() -> Self {
        Self::with_options(QueueOptions::default())
    }

    /// An empty queue with the given limits and retention times.
    pub fn with_options(opts: QueueOptions) -> Self {
        Self {
            opts,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The options this queue was built with.
    pub fn options(&self) -> &QueueOptions {
        &self.opts
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied transition behind
        // (every step validates before it mutates), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retention_ms(&self) -> i64 {
        duration_ms(self.opts.result_retention)
    }

    /// Turns a refused outcome into success when it is a replay: the job is in `states`
    /// (what the outcome leads to) and still carries this lease's token, so this lease's
    /// holder recorded it already (its reply was lost). The reaper zeroes the token of a
    /// lease it takes back, so a reclaimed lease never passes.
    fn or_replayed<T: Default>(
        &self,
        result: Result<T, Error>,
        lease: &Lease,
        states: &[JobState],
    ) -> Result<T, Error> {
        match result {
            Err(Error::LeaseLost { .. })
                if self.lock().jobs.get(&lease.job_id).is_some_and(|rec| {
                    rec.info.queue == lease.queue
                        && rec.token == lease.token
                        && lease.token != 0
                        && states.contains(&rec.info.state)
                }) =>
            {
                Ok(T::default())
            }
            other => other,
        }
    }

    /// Runs `f` on the fenced job of `lease` and the state of its queue, under the lock.
    fn with_lease<T>(
        &self,
        lease: &Lease,
        f: impl FnOnce(&mut Ctx<'_>, JobId, i64) -> T,
    ) -> Result<T, Error> {
        validate_queue_name(&lease.queue)?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        let fenced = inner.jobs.get(&lease.job_id).is_some_and(|rec| {
            rec.info.queue == lease.queue
                && rec.info.state == JobState::Running
                && rec.token == lease.token
        });
        if !fenced {
            return Err(lease_lost(lease));
        }
        let now = now_ms();
        let mut ctx = inner.ctx(&lease.queue, &self.opts);
        Ok(f(&mut ctx, lease.job_id, now))
    }
}

/// Everything behind the lock.
#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<JobId, JobRec>,
    queues: HashMap<String, QState>,
    /// Global sequence for FIFO order and dead-letter tie-breaks.
    seq: u64,
}

impl Inner {
    /// Borrows the job map, the counters and one queue's state (created if new) at once.
    fn ctx<'a>(&'a mut self, queue: &str, opts: &'a QueueOptions) -> Ctx<'a> {
        let q = self.queues.entry(queue.to_owned()).or_default();
        Ctx {
            jobs: &mut self.jobs,
            q,
            seq: &mut self.seq,
            opts,
        }
    }

    /// Like [`Inner::ctx`] but only for a queue that already exists.
    fn existing_ctx<'a>(&'a mut self, queue: &str, opts: &'a QueueOptions) -> Option<Ctx<'a>> {
        let q = self.queues.get_mut(queue)?;
        Some(Ctx {
            jobs: &mut self.jobs,
            q,
            seq: &mut self.seq,
            opts,
        })
    }
}

/// One queue's indexes and counters.
#[derive(Debug, Default)]
struct QState {
    /// `(priority, seq, id)`: the fetch order.
    ready: BTreeSet<(i32, u64, JobId)>,
    /// `(ready_since_ms, seq, id)`: the same jobs by age, for `oldest_ready_age_s`.
    ready_age: BTreeSet<(i64, u64, JobId)>,
    /// `(run_at_ms, seq, id)`: jobs waiting for their time.
    scheduled: BTreeSet<(i64, u64, JobId)>,
    /// Leased jobs.
    running: HashSet<JobId>,
    /// `(failed_at_ms, seq, id)`: the dead-letter set, oldest first.
    dead: BTreeSet<(i64, u64, JobId)>,
    /// `(finished_at_ms, id)` of completed and cancelled jobs, for retention purges.
    finished: VecDeque<(i64, JobId)>,
    /// Completed jobs still kept.
    completed: u64,
    /// Dead letters dropped because the set was full.
    dead_dropped: u64,
    /// Dedupe key to the job that holds it (checked for liveness on use).
    dedupe: HashMap<String, JobId>,
    paused: bool,
    /// Wakes fetchers waiting on this queue.
    notify: Arc<Notify>,
}

/// A stored job: its public view plus the bookkeeping that places it in the indexes.
#[derive(Debug)]
struct JobRec {
    info: JobInfo,
    /// Place in line within its priority.
    seq: u64,
    /// When it last became ready (epoch ms).
    ready_since_ms: i64,
    /// Fencing token of the current (or last) lease; 0 before the first fetch and after
    /// the reaper took the lease back.
    token: u64,
    /// Leased but held by its worker, not started (see [`JobQueue::fetch_held`]).
    held: bool,
    /// How often its worker died while it was held (uncharged up to the lease expiry
    /// limit; past it such deaths are charged, so a job that kills its worker right after
    /// starting from a prefetch, before the start was reported, is still caught).
    held_expiries: u32,
    /// Lease deadline while running (epoch ms).
    lease_expires_at_ms: i64,
    /// Key in the dead-letter set while dead.
    dead_key: Option<(i64, u64)>,
}

impl JobRec {
    fn leased(&self) -> LeasedJob {
        LeasedJob {
            id: self.info.id,
            queue: self.info.queue.clone(),
            payload: self.info.payload.clone(),
            tenant: self.info.tenant.clone(),
            priority: self.info.priority,
            attempt: self.info.attempts,
            max_retries: self.info.max_retries,
            headers: self.info.headers.clone(),
            enqueued_at_ms: self.info.created_at_ms,
            lease: Lease {
                job_id: self.info.id,
                queue: self.info.queue.clone(),
                token: self.token,
                expires_at_ms: self.lease_expires_at_ms,
            },
        }
    }

    fn dead_letter(&self) -> DeadLetter {
        DeadLetter {
            id: self.info.id,
            queue: self.info.queue.clone(),
            error: self
                .info
                .error
                .clone()
                .unwrap_or_else(|| Failure::new("UNKNOWN", "no failure was recorded")),
            attempts: self.info.attempts,
            failed_at_ms: self
                .dead_key
                .map(|(t, _)| t)
                .or(self.info.finished_at_ms)
                .unwrap_or(0),
            payload: self.info.payload.clone(),
            tenant: self.info.tenant.clone(),
        }
    }

    /// Whether a finished record has outlived the retention time (dead jobs never do).
    fn expired(&self, now: i64, retention_ms: i64) -> bool {
        matches!(self.info.state, JobState::Completed | JobState::Cancelled)
            && self
                .info
                .finished_at_ms
                .is_some_and(|t| t.saturating_add(retention_ms) <= now)
    }
}

/// The job map, the global counters and one queue, borrowed together under the lock.
struct Ctx<'a> {
    jobs: &'a mut HashMap<JobId, JobRec>,
    q: &'a mut QState,
    seq: &'a mut u64,
    opts: &'a QueueOptions,
}

impl Ctx<'_> {
    fn next_seq(&mut self) -> u64 {
        *self.seq += 1;
        *self.seq
    }

    /// Stores a validated new job (or finds the live job holding its dedupe key).
    fn insert(&mut self, job: NewJob, now: i64) -> JobId {
        if let Some(key) = &job.dedupe_key
            && let Some(&existing) = self.q.dedupe.get(key)
            && self
                .jobs
                .get(&existing)
                .is_some_and(|r| !r.info.state.is_terminal())
        {
            return existing;
        }
        let id = Uuid::now_v7();
        // A delay counts from `now`, this backend's clock when it stores the job.
        let run_at = job.due_at_ms(now).unwrap_or(now);
        if let Some(key) = &job.dedupe_key {
            self.q.dedupe.insert(key.clone(), id);
        }
        let rec = JobRec {
            info: JobInfo {
                id,
                queue: job.queue,
                state: JobState::Ready,
                attempts: 0,
                max_retries: job.max_retries,
                priority: job.priority,
                tenant: job.tenant,
                payload: job.payload,
                result: None,
                error: None,
                created_at_ms: now,
                run_at_ms: run_at,
                finished_at_ms: None,
                lease_expiries: 0,
                cancel_requested: false,
                dedupe_key: job.dedupe_key,
                headers: job.headers,
            },
            seq: 0,
            ready_since_ms: now,
            token: 0,
            held: false,
            held_expiries: 0,
            lease_expires_at_ms: 0,
            dead_key: None,
        };
        self.jobs.insert(id, rec);
        if run_at > now {
            self.make_scheduled(id, run_at);
        } else {
            self.make_ready(id, true, now);
        }
        id
    }

    /// Puts a job in the ready line. `fresh` takes a new place at the back of its
    /// priority; otherwise it keeps the place it had (a release or a reclaimed lease).
    fn make_ready(&mut self, id: JobId, fresh: bool, now: i64) {
        let seq = if fresh { Some(self.next_seq()) } else { None };
        let Some(rec) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some(seq) = seq {
            rec.seq = seq;
        }
        rec.info.state = JobState::Ready;
        rec.ready_since_ms = now;
        self.q.ready.insert((rec.info.priority, rec.seq, id));
        self.q.ready_age.insert((now, rec.seq, id));
    }

    fn make_scheduled(&mut self, id: JobId, run_at: i64) {
        let seq = self.next_seq();
        let Some(rec) = self.jobs.get_mut(&id) else {
            return;
        };
        rec.seq = seq;
        rec.info.state = JobState::Scheduled;
        rec.info.run_at_ms = run_at;
        self.q.scheduled.insert((run_at, seq, id));
    }

    /// Moves due scheduled jobs to ready, in due order.
    fn promote(&mut self, now: i64) {
        while let Some(&(run_at, seq, id)) = self.q.scheduled.first() {
            if run_at > now {
                break;
            }
            self.q.scheduled.pop_first();
            let Some(rec) = self.jobs.get_mut(&id) else {
                continue;
            };
            rec.info.state = JobState::Ready;
            // Ready since its due time, even if nobody looked until later.
            rec.ready_since_ms = run_at;
            self.q.ready.insert((rec.info.priority, seq, id));
            self.q.ready_age.insert((run_at, seq, id));
        }
    }

    /// Leases up to `max` ready jobs; those after the first `start` are held.
    fn take(&mut self, max: usize, start: usize, lease_ms: i64, now: i64) -> Vec<LeasedJob> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((_, seq, id)) = self.q.ready.pop_first() else {
                break;
            };
            let Some(rec) = self.jobs.get_mut(&id) else {
                continue;
            };
            self.q.ready_age.remove(&(rec.ready_since_ms, seq, id));
            rec.token = super::new_token();
            rec.held = out.len() >= start;
            rec.info.attempts = rec.info.attempts.saturating_add(1);
            rec.info.state = JobState::Running;
            rec.lease_expires_at_ms = now.saturating_add(lease_ms);
            self.q.running.insert(id);
            out.push(rec.leased());
        }
        out
    }

    /// Takes a ready or scheduled job out of its index.
    fn unqueue(&mut self, id: JobId) {
        let Some(rec) = self.jobs.get(&id) else {
            return;
        };
        match rec.info.state {
            JobState::Ready => {
                self.q.ready.remove(&(rec.info.priority, rec.seq, id));
                self.q.ready_age.remove(&(rec.ready_since_ms, rec.seq, id));
            }
            JobState::Scheduled => {
                self.q.scheduled.remove(&(rec.info.run_at_ms, rec.seq, id));
            }
            JobState::Running => {
                self.q.running.remove(&id);
            }
            _ => {}
        }
    }

    /// Frees the dedupe key of a job that left the live states.
    fn release_dedupe(&mut self, id: JobId) {
        if let Some(key) = self.jobs.get(&id).and_then(|r| r.info.dedupe_key.as_ref())
            && self.q.dedupe.get(key) == Some(&id)
        {
            self.q.dedupe.remove(key);
        }
    }

    /// Ends a running job's lease.
    fn end_lease(&mut self, id: JobId) {
        self.q.running.remove(&id);
    }

    /// Completed or cancelled: kept for the retention time.
    fn finish(&mut self, id: JobId, state: JobState, now: i64) {
        self.release_dedupe(id);
        let Some(rec) = self.jobs.get_mut(&id) else {
            return;
        };
        rec.info.state = state;
        rec.info.finished_at_ms = Some(now);
        if state == JobState::Completed {
            self.q.completed += 1;
        }
        self.q.finished.push_back((now, id));
    }

    /// Cancels a job whose worker handed it back after a cancel was requested.
    fn cancel_handed_back(&mut self, id: JobId, now: i64, how: &str) {
        if let Some(rec) = self.jobs.get_mut(&id) {
            rec.info.error = Some(Failure::new(
                CODE_CANCELLED,
                format!("cancel was requested while it was running; {how}"),
            ));
        }
        self.finish(id, JobState::Cancelled, now);
    }

    /// Moves a job (already out of the ready, scheduled and running indexes) to the
    /// dead-letter set, dropping the oldest dead letters beyond the limit.
    fn kill(&mut self, id: JobId, failure: Failure, now: i64) {
        self.release_dedupe(id);
        let seq = self.next_seq();
        let Some(rec) = self.jobs.get_mut(&id) else {
            return;
        };
        rec.info.state = JobState::Dead;
        rec.info.error = Some(failure);
        rec.info.finished_at_ms = Some(now);
        rec.dead_key = Some((now, seq));
        self.q.dead.insert((now, seq, id));
        while self.q.dead.len() > self.opts.dead_letter_limit {
            let Some((_, _, dropped)) = self.q.dead.pop_first() else {
                break;
            };
            self.jobs.remove(&dropped);
            self.q.dead_dropped += 1;
        }
    }

    /// Brings a dead job back to ready with its attempts reset.
    fn revive(&mut self, id: JobId, now: i64) {
        let Some(rec) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some((t, s)) = rec.dead_key.take() {
            self.q.dead.remove(&(t, s, id));
        }
        rec.info.attempts = 0;
        rec.token = 0;
        rec.held = false;
        rec.held_expiries = 0;
        rec.info.lease_expiries = 0;
        rec.info.cancel_requested = false;
        rec.info.finished_at_ms = None;
        rec.info.result = None;
        rec.info.run_at_ms = now;
        // Take the dedupe key back unless another live job holds it now.
        if let Some(key) = rec.info.dedupe_key.clone() {
            let held = self
                .q
                .dedupe
                .get(&key)
                .and_then(|other| self.jobs.get(other))
                .is_some_and(|r| !r.info.state.is_terminal());
            if !held {
                self.q.dedupe.insert(key, id);
            }
        }
        self.make_ready(id, true, now);
    }

    /// Drops completed and cancelled records older than the retention time.
    fn purge_finished(&mut self, now: i64) {
        let retention = duration_ms(self.opts.result_retention);
        while let Some(&(t, id)) = self.q.finished.front() {
            if t.saturating_add(retention) > now {
                break;
            }
            self.q.finished.pop_front();
            if self
                .jobs
                .get(&id)
                .is_some_and(|r| r.info.finished_at_ms == Some(t) && r.expired(now, retention))
            {
                self.remove_finished(id);
            }
        }
    }

    /// Removes a completed or cancelled record, keeping the counters right.
    fn remove_finished(&mut self, id: JobId) {
        if let Some(rec) = self.jobs.remove(&id)
            && rec.info.state == JobState::Completed
        {
            self.q.completed = self.q.completed.saturating_sub(1);
        }
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn lease_lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        job_id: lease.job_id.to_string(),
    }
}

fn not_found(queue: &str, id: JobId) -> Error {
    Error::JobNotFound {
        queue: queue.to_owned(),
        job_id: id.to_string(),
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        job.validate(self.opts.max_payload_bytes)?;
        let now = now_ms();
        let queue = job.queue.clone();
        let (id, notify) = {
            let mut guard = self.lock();
            let mut ctx = guard.ctx(&queue, &self.opts);
            ctx.purge_finished(now);
            let id = ctx.insert(job, now);
            (id, ctx.q.notify.clone())
        };
        notify.notify_waiters();
        Ok(id)
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        super::check_batch_len(jobs.len())?;
        for job in &jobs {
            job.validate(self.opts.max_payload_bytes)?;
        }
        let now = now_ms();
        let mut ids = Vec::with_capacity(jobs.len());
        let mut wake: HashMap<String, Arc<Notify>> = HashMap::new();
        {
            let mut guard = self.lock();
            for job in jobs {
                let queue = job.queue.clone();
                let mut ctx = guard.ctx(&queue, &self.opts);
                if let Entry::Vacant(slot) = wake.entry(queue) {
                    ctx.purge_finished(now);
                    slot.insert(ctx.q.notify.clone());
                }
                ids.push(ctx.insert(job, now));
            }
        }
        for notify in wake.values() {
            notify.notify_waiters();
        }
        Ok(ids)
    }

    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        self.fetch_held(queue, max, max, lease, wait).await
    }

    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        validate_queue_name(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let lease_ms = duration_ms(lease);
        let started = Instant::now();
        let deadline = started + wait.min(MAX_WAIT);
        let notify = self.lock().ctx(queue, &self.opts).q.notify.clone();
        loop {
            // Register for wake-ups before looking, so an enqueue between the look and
            // the wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let next_due_ms = {
                let mut guard = self.lock();
                let mut ctx = guard.ctx(queue, &self.opts);
                let now = now_ms();
                ctx.promote(now);
                if ctx.q.paused {
                    None
                } else {
                    // Taken and returned with no await in between: dropping this future
                    // can never strand a leased job.
                    let jobs = ctx.take(max, start, lease_ms, now);
                    if !jobs.is_empty() {
                        return Ok(jobs);
                    }
                    ctx.q
                        .scheduled
                        .first()
                        .map(|&(run_at, _, _)| (run_at - now).max(1))
                }
            };

            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = match next_due_ms {
                Some(ms) => deadline.min(now + Duration::from_millis(ms.unsigned_abs())),
                None => deadline,
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn mark_started(&self, leases: &[Lease]) -> Result<(), Error> {
        for lease in leases {
            validate_queue_name(&lease.queue)?;
        }
        let mut guard = self.lock();
        for lease in leases {
            if let Some(rec) = guard.jobs.get_mut(&lease.job_id).filter(|rec| {
                rec.info.queue == lease.queue
                    && rec.info.state == JobState::Running
                    && rec.token == lease.token
            }) {
                rec.held = false;
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat, Error> {
        self.with_lease(lease, |ctx, id, now| {
            let expires_at_ms = now.saturating_add(duration_ms(extend));
            match ctx.jobs.get_mut(&id) {
                Some(rec) => {
                    rec.lease_expires_at_ms = expires_at_ms;
                    // Only a running job heartbeats: a held one has started.
                    rec.held = false;
                    Heartbeat {
                        expires_at_ms,
                        cancel_requested: rec.info.cancel_requested,
                    }
                }
                None => Heartbeat {
                    expires_at_ms,
                    cancel_requested: false,
                },
            }
        })
    }

    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), Error> {
        let result = super::bound_result(result);
        let done = self.with_lease(lease, |ctx, id, now| {
            ctx.end_lease(id);
            if let Some(rec) = ctx.jobs.get_mut(&id) {
                rec.info.result = Some(result);
            }
            ctx.finish(id, JobState::Completed, now);
        });
        self.or_replayed(done, lease, &[JobState::Completed])
    }

    async fn retry(&self, lease: &Lease, delay: Duration, failure: Failure) -> Result<(), Error> {
        let failure = failure.bounded();
        let woke = self.with_lease(lease, |ctx, id, now| {
            ctx.end_lease(id);
            let cancel_requested = ctx.jobs.get(&id).is_some_and(|r| r.info.cancel_requested);
            if cancel_requested {
                ctx.cancel_handed_back(id, now, "it was not retried");
                return None;
            }
            if let Some(rec) = ctx.jobs.get_mut(&id) {
                rec.info.error = Some(failure);
                rec.held = false;
            }
            let run_at = now.saturating_add(duration_ms(delay));
            if run_at > now {
                ctx.make_scheduled(id, run_at);
            } else if let Some(rec) = ctx.jobs.get_mut(&id) {
                rec.info.run_at_ms = now;
                ctx.make_ready(id, true, now);
            }
            Some(ctx.q.notify.clone())
        });
        let woke = self.or_replayed(
            woke,
            lease,
            &[JobState::Scheduled, JobState::Ready, JobState::Cancelled],
        )?;
        if let Some(notify) = woke {
            notify.notify_waiters();
        }
        Ok(())
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        let failure = failure.bounded();
        let done = self.with_lease(lease, |ctx, id, now| {
            ctx.end_lease(id);
            ctx.kill(id, failure, now);
        });
        self.or_replayed(done, lease, &[JobState::Dead])
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let woke = self.with_lease(lease, |ctx, id, now| {
            ctx.end_lease(id);
            let cancel_requested = ctx.jobs.get(&id).is_some_and(|r| r.info.cancel_requested);
            if cancel_requested {
                ctx.cancel_handed_back(id, now, "it was handed back and will not run again");
                return None;
            }
            if let Some(rec) = ctx.jobs.get_mut(&id) {
                rec.info.attempts = rec.info.attempts.saturating_sub(1);
                rec.held = false;
            }
            // Keeps its place in line: it was already at the front when it was fetched.
            ctx.make_ready(id, false, now);
            Some(ctx.q.notify.clone())
        });
        let woke = self.or_replayed(woke, lease, &[JobState::Ready, JobState::Cancelled])?;
        if let Some(notify) = woke {
            notify.notify_waiters();
        }
        Ok(())
    }

    async fn mark_cancelled(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        let failure = failure.bounded();
        let done = self.with_lease(lease, |ctx, id, now| {
            ctx.end_lease(id);
            if let Some(rec) = ctx.jobs.get_mut(&id) {
                rec.info.error = Some(failure);
            }
            ctx.finish(id, JobState::Cancelled, now);
        });
        self.or_replayed(done, lease, &[JobState::Cancelled])
    }

    async fn reap(&self, queue: &str) -> Result<ReapReport, Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let mut report = ReapReport::default();
        let notify = {
            let mut guard = self.lock();
            let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
                return Ok(report);
            };
            let mut expired: Vec<JobId> = ctx
                .q
                .running
                .iter()
                .copied()
                .filter(|id| {
                    ctx.jobs
                        .get(id)
                        .is_none_or(|r| r.lease_expires_at_ms <= now)
                })
                .collect();
            expired.sort_unstable();
            let max_expiries = ctx.opts.max_lease_expiries;
            for id in expired {
                ctx.end_lease(id);
                let Some(rec) = ctx.jobs.get_mut(&id) else {
                    continue;
                };
                // The lease is taken back: an outcome sent with it is refused from now on,
                // also as a replay.
                rec.token = 0;
                if std::mem::take(&mut rec.held)
                    && !rec.info.cancel_requested
                    && rec.held_expiries < ctx.opts.max_lease_expiries
                {
                    rec.held_expiries += 1;
                    // Held by a worker that never started it: back in its old place, the
                    // attempt taken back and no expiry counted.
                    rec.info.attempts = rec.info.attempts.saturating_sub(1);
                    ctx.make_ready(id, false, now);
                    report.requeued.push(id);
                    continue;
                }
                rec.info.lease_expiries = rec.info.lease_expiries.saturating_add(1);
                let expiries = rec.info.lease_expiries;
                let attempts = rec.info.attempts;
                let max_retries = rec.info.max_retries;
                if rec.info.cancel_requested {
                    ctx.cancel_handed_back(id, now, "its lease expired and it will not run again");
                } else if expiries >= max_expiries {
                    let failure = Failure::new(
                        CODE_LEASE_EXPIRED_TOO_OFTEN,
                        format!(
                            "the lease expired {expiries} times (limit {max_expiries}): the job \
                             keeps losing its worker, so it was dead-lettered instead of retried"
                        ),
                    );
                    ctx.kill(id, failure, now);
                    report.dead.push(id);
                } else if attempts > max_retries {
                    let failure = Failure::new(
                        CODE_LEASE_EXPIRED,
                        format!(
                            "the lease expired during attempt {attempts} of {} and no attempts \
                             are left",
                            u64::from(max_retries) + 1
                        ),
                    );
                    ctx.kill(id, failure, now);
                    report.dead.push(id);
                } else {
                    rec.info.error = Some(Failure::new(
                        CODE_LEASE_EXPIRED,
                        format!(
                            "the lease expired during attempt {attempts} (its worker stopped \
                             heartbeating); the job was put back to ready"
                        ),
                    ));
                    // Back in its old place: it already waited its turn once.
                    ctx.make_ready(id, false, now);
                    report.requeued.push(id);
                }
            }
            ctx.purge_finished(now);
            ctx.q.notify.clone()
        };
        if !report.requeued.is_empty() {
            notify.notify_waiters();
        }
        Ok(report)
    }

    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let retention = self.retention_ms();
        let mut guard = self.lock();
        let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
            return Ok(None);
        };
        let Some(rec) = ctx.jobs.get(&id).filter(|r| r.info.queue == queue) else {
            return Ok(None);
        };
        if rec.expired(now, retention) {
            ctx.remove_finished(id);
            return Ok(None);
        }
        Ok(Some(rec.info.clone()))
    }

    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let retention = self.retention_ms();
        let mut guard = self.lock();
        let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
            return Err(not_found(queue, id));
        };
        let Some(rec) = ctx.jobs.get_mut(&id).filter(|r| r.info.queue == queue) else {
            return Err(not_found(queue, id));
        };
        if rec.expired(now, retention) {
            ctx.remove_finished(id);
            return Err(not_found(queue, id));
        }
        match rec.info.state {
            JobState::Ready | JobState::Scheduled => {
                rec.info.error = Some(Failure::new(CODE_CANCELLED, "cancelled before it ran"));
                ctx.unqueue(id);
                ctx.finish(id, JobState::Cancelled, now);
                Ok(CancelOutcome::Cancelled)
            }
            JobState::Running => {
                rec.info.cancel_requested = true;
                Ok(CancelOutcome::Requested)
            }
            JobState::Completed | JobState::Dead | JobState::Cancelled => {
                Ok(CancelOutcome::AlreadyFinished)
            }
        }
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let mut guard = self.lock();
        let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
            return Ok(QueueStats {
                queue: queue.to_owned(),
                ..QueueStats::default()
            });
        };
        ctx.promote(now);
        ctx.purge_finished(now);
        let q = &*ctx.q;
        let oldest_ready_age_s = q
            .ready_age
            .first()
            .map(|&(since, _, _)| (now - since).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready: q.ready.len() as u64,
            scheduled: q.scheduled.len() as u64,
            running: q.running.len() as u64,
            completed: q.completed,
            dead: q.dead.len() as u64,
            paused: q.paused,
            oldest_ready_age_s,
            dead_dropped: q.dead_dropped,
        })
    }

    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        validate_queue_name(queue)?;
        let guard = self.lock();
        let Some(q) = guard.queues.get(queue) else {
            return Ok(Vec::new());
        };
        Ok(q.dead
            .iter()
            .rev()
            .skip(offset)
            .take(limit)
            .filter_map(|(_, _, id)| guard.jobs.get(id).map(JobRec::dead_letter))
            .collect())
    }

    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let notify = {
            let mut guard = self.lock();
            let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
                return Err(not_found(queue, id));
            };
            let state = match ctx.jobs.get(&id).filter(|r| r.info.queue == queue) {
                None => return Err(not_found(queue, id)),
                Some(rec) if rec.expired(now, self.retention_ms()) => {
                    return Err(not_found(queue, id));
                }
                Some(rec) => rec.info.state,
            };
            if state != JobState::Dead {
                return Err(Error::InvalidState {
                    job_id: id.to_string(),
                    state: state.as_str().to_owned(),
                    operation: "requeue it as a dead letter",
                });
            }
            ctx.revive(id, now);
            ctx.q.notify.clone()
        };
        notify.notify_waiters();
        Ok(())
    }

    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, Error> {
        validate_queue_name(queue)?;
        let now = now_ms();
        let (count, notify) = {
            let mut guard = self.lock();
            let Some(mut ctx) = guard.existing_ctx(queue, &self.opts) else {
                return Ok(0);
            };
            // Oldest first, so they line up in the order they died.
            let ids: Vec<JobId> = ctx.q.dead.iter().map(|&(_, _, id)| id).collect();
            for &id in &ids {
                ctx.revive(id, now);
            }
            (ids.len() as u64, ctx.q.notify.clone())
        };
        if count > 0 {
            notify.notify_waiters();
        }
        Ok(count)
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, Error> {
        validate_queue_name(queue)?;
        let mut guard = self.lock();
        let Some(ctx) = guard.existing_ctx(queue, &self.opts) else {
            return Ok(0);
        };
        let dead = std::mem::take(&mut ctx.q.dead);
        for &(_, _, id) in &dead {
            ctx.jobs.remove(&id);
        }
        Ok(dead.len() as u64)
    }

    async fn pause(&self, queue: &str) -> Result<(), Error> {
        validate_queue_name(queue)?;
        self.lock().ctx(queue, &self.opts).q.paused = true;
        Ok(())
    }

    async fn resume(&self, queue: &str) -> Result<(), Error> {
        validate_queue_name(queue)?;
        let notify = {
            let mut guard = self.lock();
            let ctx = guard.ctx(queue, &self.opts);
            ctx.q.paused = false;
            ctx.q.notify.clone()
        };
        notify.notify_waiters();
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Memory-specific behaviour; the contract itself is proven by the
    //! `queue-conformance` suite (`tests/conformance_memory.rs`).

    use super::*;
    use serde_json::json;

    const LONG: Duration = Duration::from_secs(60);

    async fn fetch_one(q: &MemoryQueue, queue: &str) -> LeasedJob {
        let mut jobs = q
            .fetch(queue, 1, LONG, Duration::from_secs(2))
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 1, "expected one job");
        jobs.remove(0)
    }

    #[tokio::test]
    async fn released_job_keeps_its_place_in_line() {
        let q = MemoryQueue::new();
        let a = q.enqueue(NewJob::new("q", json!("a"))).await.expect("a");
        let b = q.enqueue(NewJob::new("q", json!("b"))).await.expect("b");
        let first = fetch_one(&q, "q").await;
        assert_eq!(first.id, a);
        q.release(&first.lease).await.expect("release");
        assert_eq!(
            fetch_one(&q, "q").await.id,
            a,
            "released job goes first again"
        );
        assert_eq!(fetch_one(&q, "q").await.id, b);
    }

    #[tokio::test]
    async fn fencing_tokens_are_fresh_for_every_lease() {
        let q = MemoryQueue::new();
        q.enqueue(NewJob::new("a", json!(1))).await.expect("a");
        q.enqueue(NewJob::new("b", json!(2))).await.expect("b");
        q.enqueue(NewJob::new("a", json!(3))).await.expect("a");
        let t1 = fetch_one(&q, "a").await.lease.token;
        let t2 = fetch_one(&q, "b").await.lease.token;
        let t3 = fetch_one(&q, "a").await.lease.token;
        assert!(t1 != t2 && t2 != t3 && t1 != t3, "{t1} {t2} {t3}");
        assert!([t1, t2, t3].iter().all(|t| *t != 0));
    }

    #[tokio::test]
    async fn cancel_request_is_honoured_when_the_job_is_handed_back() {
        let q = MemoryQueue::with_options(QueueOptions {
            max_lease_expiries: 10,
            ..QueueOptions::default()
        });
        let ids = q
            .enqueue_many(vec![
                NewJob::new("q", json!(1)),
                NewJob::new("q", json!(2)),
                NewJob::new("q", json!(3)),
            ])
            .await
            .expect("enqueue");
        let jobs = q
            .fetch("q", 3, Duration::from_millis(100), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 3);
        for id in &ids {
            assert_eq!(
                q.cancel("q", *id).await.expect("cancel"),
                CancelOutcome::Requested
            );
        }
        q.release(&jobs[0].lease).await.expect("release");
        q.retry(&jobs[1].lease, Duration::ZERO, Failure::new("X", "x"))
            .await
            .expect("retry");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = q.reap("q").await.expect("reap");
        assert!(report.requeued.is_empty() && report.dead.is_empty());
        for id in &ids {
            let info = q.job("q", *id).await.expect("job").expect("kept");
            assert_eq!(info.state, JobState::Cancelled, "{id}");
            assert_eq!(info.error.expect("error").code, CODE_CANCELLED);
        }
        let stats = q.stats("q").await.expect("stats");
        assert_eq!((stats.ready, stats.running), (0, 0));
    }

    #[tokio::test]
    async fn retention_purge_frees_memory() {
        let q = MemoryQueue::with_options(QueueOptions {
            result_retention: Duration::from_millis(50),
            ..QueueOptions::default()
        });
        for i in 0..10 {
            q.enqueue(NewJob::new("q", json!(i)))
                .await
                .expect("enqueue");
        }
        let jobs = q.fetch("q", 10, LONG, Duration::ZERO).await.expect("fetch");
        for (i, job) in jobs.iter().enumerate() {
            if i % 2 == 0 {
                q.complete(&job.lease, json!(i)).await.expect("complete");
            } else {
                q.mark_cancelled(&job.lease, Failure::new("TRACE_CANCELLED", "c"))
                    .await
                    .expect("cancel");
            }
        }
        assert_eq!(q.lock().jobs.len(), 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        q.reap("q").await.expect("reap");
        let inner = q.lock();
        assert_eq!(inner.jobs.len(), 0);
        assert_eq!(inner.queues.get("q").map(|s| s.completed), Some(0));
    }

    #[tokio::test]
    async fn requeued_dead_job_takes_its_dedupe_key_back_only_when_free() {
        let q = MemoryQueue::new();
        let first = q
            .enqueue(NewJob::new("q", json!(1)).dedupe_key("k"))
            .await
            .expect("enqueue");
        let job = fetch_one(&q, "q").await;
        q.fail(&job.lease, Failure::new("X", "x"))
            .await
            .expect("fail");
        let second = q
            .enqueue(NewJob::new("q", json!(2)).dedupe_key("k"))
            .await
            .expect("enqueue");
        assert_ne!(first, second);
        q.requeue_dead("q", first).await.expect("requeue");
        // The key stays with the live second job.
        let again = q
            .enqueue(NewJob::new("q", json!(3)).dedupe_key("k"))
            .await
            .expect("enqueue");
        assert_eq!(again, second);
    }

    #[tokio::test]
    async fn absurd_wait_and_lease_do_not_overflow() {
        let q = MemoryQueue::new();
        q.enqueue(NewJob::new("q", json!(1)))
            .await
            .expect("enqueue");
        let jobs = q
            .fetch("q", 1, Duration::MAX, Duration::MAX)
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].lease.expires_at_ms, i64::MAX);
        let hb = q
            .heartbeat(&jobs[0].lease, Duration::MAX)
            .await
            .expect("heartbeat");
        assert_eq!(hb.expires_at_ms, i64::MAX);
    }

    #[tokio::test]
    async fn stats_of_unknown_queue_do_not_create_it() {
        let q = MemoryQueue::new();
        let stats = q.stats("nobody").await.expect("stats");
        assert_eq!(stats.queue, "nobody");
        assert!(q.lock().queues.is_empty());
    }
}
