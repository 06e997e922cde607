//! The stateless worker pool: a fresh flow per job, bounded concurrency, leases kept alive
//! by heartbeats, job-level retries, dead-lettering, and a drain on shutdown.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flow_core::queue::{Failure, JobQueue, Lease, LeasedJob, validate_queue_name};
use flow_core::{
    Flow, FlowError, FlowErrorCode, FlowHandle, Headers, Message, Middleware, Outcome,
};
use futures::FutureExt;
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::Error;
use crate::retry::{Classifier, CodeClassifier, Disposition, RetryPolicy};
use crate::stats::{AttemptOutcome, AttemptReport, JobObserver, PoolStats, StatsSnapshot};

/// Builds a fresh flow for each job.
pub type FlowFactory = Arc<dyn Fn() -> Result<Flow, flow_core::Error> + Send + Sync>;

/// Defaults of a pool, as design.md gives them.
pub mod defaults {
    use std::time::Duration;
    /// Jobs run at once.
    pub const CONCURRENCY: usize = 10;
    /// Bound on one attempt, from emit to outcome.
    pub const JOB_TIMEOUT: Duration = Duration::from_secs(300);
    /// Lease length; heartbeats renew it every third of it.
    pub const LEASE: Duration = Duration::from_secs(30);
    /// Time in-flight jobs get to finish after a shutdown signal.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Longest a fetch waits for work before asking again.
    pub const FETCH_WAIT: Duration = Duration::from_secs(1);
    /// Most leased jobs kept waiting for a free slot (see
    /// [`WorkerPoolBuilder::prefetch`](super::WorkerPoolBuilder::prefetch)).
    pub const PREFETCH: usize = 128;
    /// A pool prefetches only the jobs it expects to start within this time, judged
    /// from how long recent jobs ran.
    pub const PREFETCH_HORIZON: Duration = Duration::from_millis(50);
}

/// Configures a [`WorkerPool`].
pub struct WorkerPoolBuilder {
    queue: Arc<dyn JobQueue>,
    queue_name: String,
    factory: FlowFactory,
    concurrency: usize,
    job_timeout: Duration,
    lease: Duration,
    shutdown_timeout: Duration,
    fetch_wait: Duration,
    reap_interval: Option<Duration>,
    retry: RetryPolicy,
    classifier: Arc<dyn Classifier>,
    middlewares: Vec<Arc<dyn Middleware>>,
    observers: Vec<Arc<dyn JobObserver>>,
    long_lived: Option<u32>,
    spans: Option<Arc<crate::telemetry::SpanMiddleware>>,
    prefetch: usize,
}

impl fmt::Debug for WorkerPoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPoolBuilder")
            .field("queue_name", &self.queue_name)
            .field("concurrency", &self.concurrency)
            .field("job_timeout", &self.job_timeout)
            .field("lease", &self.lease)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("retry", &self.retry)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl WorkerPoolBuilder {
    /// Jobs run at once (default 10).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
    /// Bound on one attempt (default 300 s): on expiry the trace is cancelled and the
    /// attempt fails with `JOB_TIMEOUT`.
    pub fn job_timeout(mut self, d: Duration) -> Self {
        self.job_timeout = d;
        self
    }
    /// Lease length (default 30 s); heartbeats renew it every third.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }
    /// Time in-flight jobs get to finish after shutdown begins (default 30 s); then they
    /// are cancelled and handed back to the queue without counting the attempt.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }
    /// Most leased jobs kept waiting for a free slot (default 128; 0 turns prefetching
    /// off).
    ///
    /// Short jobs finish faster than a round trip to the backend, so a pool that asked for
    /// one job per free slot would spend most of its time waiting for the next fetch.
    /// With prefetching, one fetch brings the jobs for the free slots plus a few more,
    /// kept in order and started without another round trip as slots free up. The pool
    /// holds only as many extra jobs as it expects to start within 50 ms, judged from how
    /// long recent jobs ran: with jobs of a second or more it prefetches nothing, so long
    /// jobs never wait behind each other while another worker sits idle. A prefetched job
    /// holds its lease from the fetch; one that waited past a third of the lease has its
    /// lease renewed before it starts (and is dropped if the lease was lost), and
    /// prefetched jobs are handed back to the queue at once when shutdown begins, their
    /// attempt not counted.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }
    /// Longest one fetch waits for work (default 1 s).
    pub fn fetch_wait(mut self, d: Duration) -> Self {
        self.fetch_wait = d;
        self
    }
    /// How often this pool's reaper reclaims expired leases (default: half the lease).
    pub fn reap_interval(mut self, d: Duration) -> Self {
        self.reap_interval = Some(d);
        self
    }
    /// Backoff between job attempts.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.retry = p;
        self
    }
    /// Replaces the classifier deciding which failures retry.
    pub fn classifier(mut self, c: impl Classifier) -> Self {
        self.classifier = Arc::new(c);
        self
    }
    /// Attaches a middleware to every flow the factory builds.
    pub fn middleware(mut self, m: Arc<dyn Middleware>) -> Self {
        self.middlewares.push(m);
        self
    }
    /// Long-lived mode: one flow, built once, runs every job (jobs are told apart by
    /// trace id); it is rebuilt after `restart_after_failures` failed attempts or at once
    /// after an `UNEXPECTED_ERROR`. The default is a fresh flow per job, which isolates
    /// jobs better; use this when building the flow is expensive. Note that each node of
    /// a flow runs one message at a time, so a long-lived flow serialises its jobs node
    /// by node.
    pub fn long_lived(mut self, restart_after_failures: u32) -> Self {
        self.long_lived = Some(restart_after_failures.max(1));
        self
    }
    /// Attaches an OpenTelemetry [`SpanMiddleware`](crate::telemetry::SpanMiddleware):
    /// node attempts become child spans of each job's span.
    pub fn span_middleware(mut self, m: Arc<crate::telemetry::SpanMiddleware>) -> Self {
        self.middlewares.push(m.clone());
        self.spans = Some(m);
        self
    }
    /// Reports every finished attempt to `o`.
    pub fn observer(mut self, o: Arc<dyn JobObserver>) -> Self {
        self.observers.push(o);
        self
    }

    /// Checks the settings and builds the pool.
    pub fn build(self) -> Result<WorkerPool, Error> {
        validate_queue_name(&self.queue_name)?;
        let positive = |option: &'static str, d: Duration| {
            if d.is_zero() {
                Err(Error::Config {
                    option,
                    reason: "must be greater than zero".into(),
                })
            } else {
                Ok(())
            }
        };
        if self.concurrency == 0 || self.concurrency > Semaphore::MAX_PERMITS / 2 {
            return Err(Error::Config {
                option: "concurrency",
                reason: format!("must be between 1 and {}", Semaphore::MAX_PERMITS / 2),
            });
        }
        positive("job_timeout", self.job_timeout)?;
        positive("lease", self.lease)?;
        positive("fetch_wait", self.fetch_wait)?;
        if self.lease < Duration::from_millis(300) {
            return Err(Error::Config {
                option: "lease",
                reason: "must be at least 300ms so heartbeats can renew it".into(),
            });
        }
        let reap_interval = self
            .reap_interval
            .unwrap_or(self.lease / 2)
            .max(Duration::from_millis(100));
        Ok(WorkerPool {
            inner: Arc::new(Inner {
                queue: self.queue,
                queue_name: self.queue_name,
                factory: self.factory,
                concurrency: self.concurrency,
                job_timeout: self.job_timeout,
                lease: self.lease,
                shutdown_timeout: self.shutdown_timeout,
                fetch_wait: self.fetch_wait,
                reap_interval,
                retry: self.retry,
                classifier: self.classifier,
                middlewares: self.middlewares,
                observers: self.observers,
                shared_flow: self.long_lived.map(|restart_after| SharedFlow {
                    current: Mutex::new(None),
                    failures: AtomicU32::new(0),
                    restart_after,
                    restarts: AtomicU64::new(0),
                }),
                spans: self.spans,
                prefetch: self.prefetch,
                recent_run_ns: AtomicU64::new(0),
                completer: Mutex::new(None),
                starter: Mutex::new(None),
                stats: Arc::new(PoolStats::default()),
                draining: AtomicBool::new(false),
                degraded: AtomicBool::new(false),
            }),
        })
    }
}

struct Inner {
    queue: Arc<dyn JobQueue>,
    queue_name: String,
    factory: FlowFactory,
    concurrency: usize,
    job_timeout: Duration,
    lease: Duration,
    shutdown_timeout: Duration,
    fetch_wait: Duration,
    reap_interval: Duration,
    retry: RetryPolicy,
    classifier: Arc<dyn Classifier>,
    middlewares: Vec<Arc<dyn Middleware>>,
    observers: Vec<Arc<dyn JobObserver>>,
    shared_flow: Option<SharedFlow>,
    spans: Option<Arc<crate::telemetry::SpanMiddleware>>,
    prefetch: usize,
    /// Moving average of how long recent jobs ran (ns; 0 until one has run).
    recent_run_ns: AtomicU64,
    completer: Mutex<Option<mpsc::UnboundedSender<CompleteRequest>>>,
    /// Leases of held jobs that started, on their way to the starter (see [`starter_loop`]).
    starter: Mutex<Option<mpsc::UnboundedSender<Lease>>>,
    stats: Arc<PoolStats>,
    draining: AtomicBool,
    degraded: AtomicBool,
}

/// Runs jobs of one queue through a fresh flow each, `concurrency` at a time.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use flow_core::queue::{JobQueue, MemoryQueue, NewJob};
/// use flow_core::{create, BoxError, Context, Message, Node};
/// use worker_runtime::WorkerPool;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = Arc::new(MemoryQueue::new());
/// queue.enqueue(NewJob::new("demo", serde_json::json!({"n": 1}))).await?;
/// let pool = WorkerPool::builder(queue.clone(), "demo", || {
///     let echo = Node::new("echo", |m: Message, _c: Context| async move { Ok::<_, BoxError>(Some(m)) });
///     create([echo.to(&[])]).build()
/// })
/// .concurrency(4)
/// .build()?;
/// let stats = pool.stats();
/// // Stop once the job is done; a real worker stops on SIGTERM.
/// let done = async move {
///     while stats.snapshot().succeeded < 1 { tokio::time::sleep(Duration::from_millis(5)).await }
/// };
/// let report = pool.run(done).await?;
/// assert_eq!(report.stats.succeeded, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPool")
            .field("queue", &self.inner.queue_name)
            .field("concurrency", &self.inner.concurrency)
            .field("stats", &self.inner.stats.snapshot())
            .finish()
    }
}

/// What [`WorkerPool::run`] returns once drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolReport {
    /// Final counters.
    pub stats: StatsSnapshot,
    /// Jobs still running at the end of the shutdown timeout, cancelled and handed back.
    pub handed_back: u64,
}

enum Ended {
    Success(Value),
    Failed(FlowError),
    CancelRequested,
    Released,
    LeaseLost,
}

impl WorkerPool {
    /// Starts configuring a pool that fetches from `queue_name` on `queue` and runs each
    /// job through a flow built by `factory`.
    pub fn builder<F>(
        queue: Arc<dyn JobQueue>,
        queue_name: impl Into<String>,
        factory: F,
    ) -> WorkerPoolBuilder
    where
        F: Fn() -> Result<Flow, flow_core::Error> + Send + Sync + 'static,
    {
        WorkerPoolBuilder {
            queue,
            queue_name: queue_name.into(),
            factory: Arc::new(factory),
            concurrency: defaults::CONCURRENCY,
            job_timeout: defaults::JOB_TIMEOUT,
            lease: defaults::LEASE,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            fetch_wait: defaults::FETCH_WAIT,
            reap_interval: None,
            retry: RetryPolicy::default(),
            classifier: Arc::new(CodeClassifier::default()),
            middlewares: Vec::new(),
            observers: Vec::new(),
            long_lived: None,
            spans: None,
            prefetch: defaults::PREFETCH,
        }
    }

    /// The live counters (cheap to clone, for health and metrics handlers).
    pub fn stats(&self) -> Arc<PoolStats> {
        Arc::clone(&self.inner.stats)
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Whether the last fetch or reap failed (backend unreachable).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// How many times the long-lived flow was rebuilt (0 in the default mode).
    pub fn flow_restarts(&self) -> u64 {
        self.inner
            .shared_flow
            .as_ref()
            .map_or(0, |s| s.restarts.load(Ordering::Relaxed))
    }

    /// The queue this pool serves.
    pub fn queue_name(&self) -> &str {
        &self.inner.queue_name
    }

    /// Runs until `shutdown` resolves, then stops fetching at once, gives in-flight jobs
    /// the shutdown timeout, cancels what is left and hands it back to the queue.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<PoolReport, Error> {
        let inner = &self.inner;
        let stop_fetching = CancellationToken::new();
        let hard_cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(inner.concurrency));
        let slots = Slots {
            permits,
            recording: Arc::new(Semaphore::new(inner.concurrency.saturating_mul(2).max(64))),
            prefetched: Arc::new(Mutex::new(VecDeque::new())),
            refill: Arc::new(tokio::sync::Mutex::new(None)),
        };

        let (complete_tx, complete_rx) = mpsc::unbounded_channel();
        *inner.completer.lock().unwrap_or_else(|p| p.into_inner()) = Some(complete_tx);
        let completer = tokio::spawn(completer_loop(
            Arc::clone(&inner.queue),
            complete_rx,
            inner.lease,
        ));
        let (start_tx, start_rx) = mpsc::unbounded_channel();
        *inner.starter.lock().unwrap_or_else(|p| p.into_inner()) = Some(start_tx);
        let starter = tokio::spawn(starter_loop(
            Arc::clone(&inner.queue),
            start_rx,
            inner.lease,
        ));
        let reaper = tokio::spawn(reaper_loop(Arc::clone(inner), stop_fetching.clone()));
        let keeper = tokio::spawn(keeper_loop(
            Arc::clone(inner),
            slots.clone(),
            stop_fetching.clone(),
        ));
        let mut fetcher = Box::pin(fetch_loop(
            Arc::clone(inner),
            slots.clone(),
            tracker.clone(),
            stop_fetching.clone(),
            hard_cancel.clone(),
        ));
        tokio::pin!(shutdown);
        tokio::select! {
            _ = &mut shutdown => {}
            _ = &mut fetcher => {}
        }
        inner.draining.store(true, Ordering::Relaxed);
        stop_fetching.cancel();
        // Everything from here ends by `deadline`, whatever the backend does: in-flight
        // jobs get the shutdown timeout less a reserve for handing them back, and every
        // wait on the backend is bounded by what is left. What cannot be handed back in
        // time comes back when its lease runs out.
        let began = Instant::now();
        let deadline = began + inner.shutdown_timeout;
        let reserve = (inner.shutdown_timeout / 5).min(Duration::from_secs(2));
        // The fetch loop is cancel-safe: a fetch dropped mid-way never loses a job.
        drop(fetcher);
        reaper.abort();
        // The keeper stops at its next look; a hand-back it has begun finishes first, so
        // none of its jobs is left between the prefetch and the queue.
        let mut keeper = keeper;
        if tokio::time::timeout_at(deadline.into(), &mut keeper)
            .await
            .is_err()
        {
            keeper.abort();
        }
        // A background prefetch still running lands its jobs first, then all are handed back.
        if tokio::time::timeout_at(deadline.into(), slots.settle())
            .await
            .is_err()
        {
            tracing::warn!(queue = %inner.queue_name,
                "a prefetch did not finish before the shutdown timeout; its jobs come back when their leases expire");
        }
        let parked: Vec<Parked> = slots
            .prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        if !parked.is_empty() {
            let released = release_parked(inner, &parked, deadline).await;
            inner
                .stats
                .released
                .fetch_add(released as u64, Ordering::Relaxed);
            tracing::info!(queue = %inner.queue_name, jobs = released,
                "handed prefetched jobs back to the queue");
        }
        tracker.close();
        let active = inner.stats.snapshot().active;
        tracing::info!(
            active,
            timeout_s = inner.shutdown_timeout.as_secs_f64(),
            "draining: no more fetches"
        );
        let mut handed_back = 0;
        let jobs_until = (deadline - reserve).max(Instant::now());
        if tokio::time::timeout_at(jobs_until.into(), tracker.wait())
            .await
            .is_err()
        {
            handed_back = inner.stats.snapshot().active;
            tracing::warn!(
                jobs = handed_back,
                "shutdown timeout reached: cancelling and handing back jobs"
            );
            hard_cancel.cancel();
            if tokio::time::timeout_at(deadline.into(), tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(queue = %inner.queue_name,
                    "the backend did not take every outcome before the shutdown timeout; those jobs come back when their leases expire");
            }
        }
        // Every job has recorded its outcome (or given up): the completer has nothing
        // left to do once what it holds is sent.
        inner
            .completer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        inner
            .starter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut completer = completer;
        if tokio::time::timeout_at(deadline.into(), &mut completer)
            .await
            .is_err()
        {
            completer.abort();
        }
        let mut starter = starter;
        if tokio::time::timeout_at(deadline.into(), &mut starter)
            .await
            .is_err()
        {
            starter.abort();
        }
        // Hand-backs the backend runs in the background (a fetch dropped above) finish
        // before the process may exit.
        let _ = tokio::time::timeout_at(deadline.into(), inner.queue.flush()).await;
        tracing::debug!(
            took_ms = began.elapsed().as_millis() as u64,
            "drain finished"
        );
        Ok(PoolReport {
            stats: inner.stats.snapshot(),
            handed_back,
        })
    }
}

async fn reaper_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(inner.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner.queue.reap(&inner.queue_name).await {
            Ok(report) if report.total() > 0 => {
                let n = report.total() as u64;
                inner.stats.rescued.fetch_add(n, Ordering::Relaxed);
                for o in &inner.observers {
                    o.leases_rescued(&inner.queue_name, n);
                }
                tracing::warn!(queue = %inner.queue_name, requeued = report.requeued.len(),
                    dead = report.dead.len(), "reclaimed expired leases");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(queue = %inner.queue_name, error = %e, "reaper could not reach the queue")
            }
        }
    }
}

/// What the fetch loop and the jobs share: the run slots, the bound on outcomes being
/// recorded, and the prefetched jobs waiting for a slot.
#[derive(Clone)]
struct Slots {
    /// One permit per job running a flow (`concurrency`).
    permits: Arc<Semaphore>,
    /// One permit per outcome being recorded after its flow finished: bounds the work a
    /// slow backend can let pile up.
    recording: Arc<Semaphore>,
    /// Leased jobs held waiting for a free slot, oldest first.
    prefetched: Arc<Mutex<VecDeque<Parked>>>,
    /// The background fetch topping up `prefetched`, while one runs. An async mutex so
    /// that a wait for it that is dropped midway leaves the handle in place for the next.
    refill: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// A job held (prefetched) waiting for a free slot.
struct Parked {
    job: LeasedJob,
    /// When the fetch that leased it was sent: its lease runs at least until this instant
    /// plus the lease length, by the backend's clock as much as ours.
    leased_at: Instant,
}

impl Slots {
    fn pop(&self) -> Option<Parked> {
        self.prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Starts a background fetch when the prefetched jobs run low, so the next ones are
    /// on their way before the slots run dry. It never waits for work: when the queue
    /// is empty the fetch loop's own (waiting) fetch takes over.
    fn top_up(&self, inner: &Arc<Inner>) {
        let target = prefetch_target(inner);
        if target == 0 {
            return;
        }
        let have = self
            .prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if have > target / 2 {
            return;
        }
        // Someone waiting for the current one holds the lock: no new one now.
        let Ok(mut refill) = self.refill.try_lock() else {
            return;
        };
        if refill.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let inner = Arc::clone(inner);
        let prefetched = Arc::clone(&self.prefetched);
        let want = target - have + 1;
        *refill = Some(tokio::spawn(async move {
            let leased_at = Instant::now();
            // Every job of a top-up is held: it starts when a slot frees up.
            match inner
                .queue
                .fetch_held(&inner.queue_name, want, 0, inner.lease, Duration::ZERO)
                .await
            {
                Ok(jobs) => {
                    prefetched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(jobs.into_iter().map(|job| Parked { job, leased_at }));
                }
                // The fetch loop's own fetch will meet the same error and back off.
                Err(e) => tracing::debug!(queue = %inner.queue_name, error = %e, "prefetch failed"),
            }
        }));
    }

    /// Waits for the background fetch, if one runs, so its jobs are in `prefetched`.
    /// Cancel-safe: dropped midway, it leaves the fetch for the next wait to find, so the
    /// shutdown's wait cannot miss one that lands its jobs later.
    async fn settle(&self) {
        let mut refill = self.refill.lock().await;
        if let Some(h) = refill.as_mut() {
            let _ = h.await;
        }
        *refill = None;
    }
}

/// How many jobs beyond the free slots one fetch should bring: as many as the pool
/// expects to start within [`defaults::PREFETCH_HORIZON`], at most `prefetch`.
fn prefetch_target(inner: &Inner) -> usize {
    let recent = inner.recent_run_ns.load(Ordering::Relaxed);
    if inner.prefetch == 0 || recent == 0 {
        return 0;
    }
    let horizon = defaults::PREFETCH_HORIZON.as_nanos() as u64;
    let n = horizon.saturating_mul(inner.concurrency as u64) / recent;
    usize::try_from(n).unwrap_or(usize::MAX).min(inner.prefetch)
}

/// Folds one job's run time into the moving average that sizes prefetching.
fn note_run_time(inner: &Inner, took: Duration) {
    let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
    let old = inner.recent_run_ns.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - old / 8 + sample / 8
    };
    inner.recent_run_ns.store(new.max(1), Ordering::Relaxed);
}

async fn fetch_loop(
    inner: Arc<Inner>,
    slots: Slots,
    tracker: TaskTracker,
    stop: CancellationToken,
    hard_cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let start = |job: LeasedJob, leased_at: Instant, held: bool, permit: OwnedSemaphorePermit| {
        let inner = Arc::clone(&inner);
        let hard = hard_cancel.clone();
        let recording = Arc::clone(&slots.recording);
        tracker.spawn(run_job(
            inner, job, leased_at, held, hard, permit, recording,
        ));
    };
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = Arc::clone(&slots.permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        // A prefetched job starts without a round trip; when a background prefetch is
        // on its way, its jobs are nearer than a fetch of our own.
        let mut parked = slots.pop();
        if parked.is_none() {
            slots.settle().await;
            parked = slots.pop();
        }
        if let Some(Parked { job, leased_at }) = parked {
            // It was held: the backend charges its lease only once told it started (see
            // `heartbeat_until_lost`).
            start(job, leased_at, true, first);
            slots.top_up(&inner);
            continue;
        }
        let mut held = vec![first];
        while let Ok(p) = Arc::clone(&slots.permits).try_acquire_owned() {
            held.push(p);
        }
        let want = held.len() + prefetch_target(&inner);
        let leased_at = Instant::now();
        // The first `held.len()` jobs start now; the rest are held for the next free slots.
        let fetched = tokio::select! {
            _ = stop.cancelled() => return,
            r = inner.queue.fetch_held(
                &inner.queue_name, want, held.len(), inner.lease, inner.fetch_wait,
            ) => r,
        };
        match fetched {
            Ok(jobs) => {
                // The leases were granted by the fetch's last round, which may come long
                // after the fetch was sent when it waited for work: count them from
                // shortly before the answer came (a round takes far less than this),
                // never from before the fetch was sent.
                let leased_at = leased_at.max(
                    Instant::now()
                        .checked_sub(LEASE_ROUND_SLACK)
                        .unwrap_or(leased_at),
                );
                if inner.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(queue = %inner.queue_name, "queue reachable again");
                }
                backoff = Duration::from_millis(100);
                let short = jobs.len() < want;
                let mut jobs = jobs.into_iter();
                for permit in held {
                    match jobs.next() {
                        Some(job) => start(job, leased_at, false, permit),
                        None => break,
                    }
                }
                // No await between the fetch and here: a shutdown that drops this loop
                // finds every leased job either started or in `prefetched`.
                slots
                    .prefetched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(jobs.map(|job| Parked { job, leased_at }));
                if short {
                    // The queue is drained: let the jobs just started run before the next
                    // fetch is sent, since it will only wait (an idle worker's latency).
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                PoolStats::inc(&inner.stats.fetch_errors);
                inner.degraded.store(true, Ordering::Relaxed);
                tracing::warn!(queue = %inner.queue_name, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "fetch failed; backing off");
                drop(held);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() * 0.5)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The trace id a job's attempt runs under (see [`crate::telemetry::flow_trace_id`]).
fn trace_id_for(job: &LeasedJob) -> String {
    crate::telemetry::flow_trace_id(job)
}

fn job_message(job: &LeasedJob) -> Message {
    let mut meta = Map::new();
    meta.insert("job_id".into(), json!(job.id.to_string()));
    meta.insert("queue".into(), json!(job.queue));
    meta.insert("attempt".into(), json!(job.attempt));
    meta.insert("max_retries".into(), json!(job.max_retries));
    if !job.headers.is_empty() {
        meta.insert("headers".into(), json!(job.headers));
    }
    let mut headers = Headers::new(job.tenant.clone());
    headers.priority = job.priority;
    let mut msg = Message::new(job.payload.clone(), headers).with_trace_id(trace_id_for(job));
    msg.meta = meta;
    msg
}

/// Renews the lease of a prefetched job that waited past a third of it, as its heartbeat
/// would have if it had been running. Returns when the lease now runs out (by our clock,
/// conservatively), or how the job ends if it must not start.
async fn renew_if_stale(
    inner: &Inner,
    job: &LeasedJob,
    leased_at: Instant,
) -> Result<Instant, Ended> {
    if leased_at.elapsed() < inner.lease / 3 {
        return Ok(leased_at + inner.lease);
    }
    let sent = Instant::now();
    // Our count of the lease is conservative: the backend's may run a little longer, so
    // the renewal gets at least a third of a lease to answer.
    let left = (leased_at + inner.lease)
        .saturating_duration_since(sent)
        .max(inner.lease / 3);
    match tokio::time::timeout(left, inner.queue.heartbeat(&job.lease, inner.lease)).await {
        Ok(Ok(hb)) if hb.cancel_requested => Err(Ended::CancelRequested),
        Ok(Ok(_)) => Ok(sent + inner.lease),
        Ok(Err(flow_core::Error::LeaseLost { .. })) => Err(Ended::LeaseLost),
        Ok(Err(e)) => {
            // Run it while the lease lasts: the heartbeats of the run keep trying.
            tracing::warn!(job_id = %job.id, error = %e, "could not renew a prefetched job's lease");
            Ok(leased_at + inner.lease)
        }
        Err(_) => Err(Ended::LeaseLost),
    }
}

/// Hands held jobs back to the queue (ready again, attempt not counted), all at once,
/// giving up at `deadline`; returns how many went back.
async fn release_parked(inner: &Inner, parked: &[Parked], deadline: Instant) -> usize {
    let release = futures::future::join_all(parked.iter().map(|p| {
        ack(inner, &p.job.lease, "release", || {
            inner.queue.release(&p.job.lease)
        })
    }));
    match tokio::time::timeout_at(deadline.into(), release).await {
        Ok(done) => done.into_iter().filter(|ok| *ok).count(),
        Err(_) => 0,
    }
}

/// Keeps held jobs from outliving their leases: a job that has waited in the pool for a
/// third of its lease (its slot is taken by jobs that run longer than the recent ones
/// did) is handed back, ready for any worker, its attempt not counted. Without this a
/// held job would lose its lease while it waited and be charged for a run it never had.
async fn keeper_loop(inner: Arc<Inner>, slots: Slots, stop: CancellationToken) {
    let every = (inner.lease / 6).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stale: Vec<Parked> = {
            let mut parked = slots.prefetched.lock().unwrap_or_else(|p| p.into_inner());
            let waited_too_long = |p: &Parked| p.leased_at.elapsed() >= inner.lease / 3;
            if !parked.iter().any(waited_too_long) {
                continue;
            }
            let (stale, fresh): (Vec<Parked>, Vec<Parked>) =
                parked.drain(..).partition(waited_too_long);
            parked.extend(fresh);
            stale
        };
        let n = stale.len();
        let deadline = Instant::now() + inner.lease / 3;
        let released = release_parked(&inner, &stale, deadline).await;
        tracing::debug!(queue = %inner.queue_name, jobs = n, released,
            "prefetched jobs waited a third of their lease: handed back to the queue");
    }
}

/// Runs one job in its slot, then frees the slot and records the outcome: recording
/// overlaps the next job, bounded by a `recording` permit.
async fn run_job(
    inner: Arc<Inner>,
    job: LeasedJob,
    leased_at: Instant,
    held: bool,
    hard_cancel: CancellationToken,
    permit: OwnedSemaphorePermit,
    recording: Arc<Semaphore>,
) {
    let span = crate::telemetry::job_span(&job);
    let registration = inner
        .spans
        .as_ref()
        .map(|m| m.enter_job(&trace_id_for(&job), &span));
    let job_span = span.clone();
    async move {
        PoolStats::inc(&inner.stats.active);
        let started = Instant::now();
        // Whether a flow ran: exits that ran none stay out of the run-time average that
        // sizes prefetching.
        let ran = AtomicBool::new(false);
        let run = async {
            match renew_if_stale(&inner, &job, leased_at).await {
                Err(ended) => ended,
                Ok(valid_until) => {
                    ran.store(true, Ordering::Relaxed);
                    execute(&inner, &job, &hard_cancel, valid_until, held).await
                }
            }
        };
        let ended = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(e) => e,
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                Ended::Failed(
                    FlowError::new(
                        FlowErrorCode::UnexpectedError,
                        format!("the job panicked: {text}"),
                    )
                    .with_trace(trace_id_for(&job)),
                )
            }
        };
        drop(registration);
        let took = started.elapsed();
        if ran.load(Ordering::Relaxed) && !matches!(ended, Ended::LeaseLost | Ended::Released) {
            note_run_time(&inner, took);
        }
        inner.stats.active.fetch_sub(1, Ordering::Relaxed);
        // The flow is done: free the slot for the next job while this outcome is recorded.
        let recording = recording.acquire_owned().await.ok();
        drop(permit);
        let (outcome, code) = record(&inner, &job, ended, took).await;
        drop(recording);
        crate::telemetry::record_job_outcome(&job_span, outcome, code.as_deref());
    }
    .instrument(span)
    .await
}

fn build_flow(inner: &Inner) -> Result<Flow, FlowError> {
    let built = std::panic::catch_unwind(AssertUnwindSafe(|| (inner.factory)()));
    match built {
        Ok(Ok(mut flow)) => {
            for m in &inner.middlewares {
                flow.add_middleware(Arc::clone(m));
            }
            Ok(flow)
        }
        Ok(Err(e)) => Err(FlowError::new(
            FlowErrorCode::UnexpectedError,
            format!("the flow factory failed: {e}"),
        )),
        Err(_) => Err(FlowError::new(
            FlowErrorCode::UnexpectedError,
            "the flow factory panicked",
        )),
    }
}

async fn execute(
    inner: &Inner,
    job: &LeasedJob,
    hard_cancel: &CancellationToken,
    valid_until: Instant,
    held: bool,
) -> Ended {
    let trace = trace_id_for(job);
    let (handle, owned) = match &inner.shared_flow {
        None => match start_flow(inner) {
            Ok(h) => (h, true),
            Err(e) => return Ended::Failed(e.with_trace(trace)),
        },
        Some(shared) => match shared.handle(inner) {
            Ok(h) => (h, false),
            Err(e) => return Ended::Failed(e.with_trace(trace)),
        },
    };
    let ended = run_on(inner, job, hard_cancel, &handle, &trace, valid_until, held).await;
    if owned {
        handle.stop().await;
    } else if let Some(shared) = &inner.shared_flow {
        shared.record(&ended);
    }
    ended
}

fn start_flow(inner: &Inner) -> Result<FlowHandle, FlowError> {
    build_flow(inner)?.run().map_err(|e| {
        FlowError::new(
            FlowErrorCode::UnexpectedError,
            format!("the flow did not start: {e}"),
        )
    })
}

/// The long-lived flow of a pool in long-lived mode: one flow shared by every job,
/// rebuilt after `restart_after` failed attempts or any `UNEXPECTED_ERROR`.
struct SharedFlow {
    current: Mutex<Option<FlowHandle>>,
    failures: AtomicU32,
    restart_after: u32,
    restarts: AtomicU64,
}

impl SharedFlow {
    fn handle(&self, inner: &Inner) -> Result<FlowHandle, FlowError> {
        let mut slot = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = slot.as_ref().filter(|h| !h.is_stopped()) {
            return Ok(h.clone());
        }
        let h = start_flow(inner)?;
        *slot = Some(h.clone());
        Ok(h)
    }

    fn record(&self, ended: &Ended) {
        let unexpected = match ended {
            Ended::Failed(e) => e.code == FlowErrorCode::UnexpectedError,
            _ => false,
        };
        if !matches!(ended, Ended::Failed(_)) {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if unexpected || n >= self.restart_after {
            let old = self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if old.is_some() {
                self.failures.store(0, Ordering::SeqCst);
                self.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(failures = n, unexpected, "restarting the long-lived flow");
            }
            // In-flight jobs keep their clones; the old flow stops when the last is dropped.
        }
    }
}

async fn run_on(
    inner: &Inner,
    job: &LeasedJob,
    hard_cancel: &CancellationToken,
    handle: &FlowHandle,
    trace: &str,
    valid_until: Instant,
    held: bool,
) -> Ended {
    let trace = trace.to_owned();
    let heartbeat = heartbeat_until_lost(inner, &job.lease, valid_until, held);
    tokio::pin!(heartbeat);
    let ended = tokio::select! {
        r = handle.call(job_message(job), inner.job_timeout) => match r {
            Ok(Outcome::Message(m)) => Ended::Success(m.payload),
            Ok(Outcome::NoOutput) => Ended::Success(Value::Null),
            Ok(Outcome::Error(e)) => Ended::Failed(e),
            Ok(_) => Ended::Success(Value::Null),
            Err(flow_core::Error::Timeout(t)) => Ended::Failed(
                FlowError::new(FlowErrorCode::JobTimeout,
                    format!("job did not finish within its timeout of {:.3}s", t.as_secs_f64()))
                    .with_trace(trace.clone())
                    .with_meta("timeout_s", t.as_secs_f64()),
            ),
            Err(e) => Ended::Failed(
                FlowError::new(FlowErrorCode::UnexpectedError, format!("the flow failed: {e}"))
                    .with_trace(trace.clone()),
            ),
        },
        hb = &mut heartbeat => {
            handle.cancel(&trace).await;
            hb
        }
        _ = hard_cancel.cancelled() => {
            handle.cancel(&trace).await;
            Ended::Released
        }
    };
    ended
}

/// Renews the lease every third of its length; resolves only when the lease is lost or a
/// cancel was requested.
///
/// The lease is held until `valid_until` (by our clock: the instant a renewal was sent
/// plus the lease length, never later than the backend's own deadline). A failed renewal
/// is tried again sooner, and each one is bounded by the time the lease has left. When
/// the lease runs out without a successful renewal (a partition, a frozen backend), the
/// job has lost it: another worker may run it now, so this one stops (its outcome would
/// be refused anyway).
///
/// A job started from the prefetch (`held`) is still held for the backend. One that is
/// still running after [`START_REPORT_AFTER`] (or a sixth of the lease, if shorter) is
/// reported started through the starter (see [`starter_loop`]); its first heartbeat says
/// the same. A job that ends sooner needs no report: its outcome says it ran. So short
/// jobs cost the backend nothing for it, and a job that kills its worker within that
/// time is caught by the backend's cap on held expiries instead.
async fn heartbeat_until_lost(
    inner: &Inner,
    lease: &Lease,
    mut valid_until: Instant,
    held: bool,
) -> Ended {
    let every = (inner.lease / 3).max(Duration::from_millis(100));
    let again = (every / 4).max(Duration::from_millis(50));
    let mut next = Instant::now() + every;
    let mut report_at = held.then(|| Instant::now() + START_REPORT_AFTER.min(inner.lease / 6));
    loop {
        let wake = report_at.map_or(next, |r| r.min(next)).min(valid_until);
        tokio::time::sleep_until(wake.into()).await;
        if report_at.is_some_and(|r| Instant::now() >= r) {
            report_at = None;
            report_started(inner, lease);
            if Instant::now() < next.min(valid_until) {
                continue;
            }
        }
        let sent = Instant::now();
        if sent >= valid_until {
            tracing::warn!(job_id = %lease.job_id, queue = %lease.queue, event_type = "lease_lost",
                "the lease ran out without a successful heartbeat; cancelling the job");
            return Ended::LeaseLost;
        }
        let answer = tokio::time::timeout(
            valid_until - sent,
            inner.queue.heartbeat(lease, inner.lease),
        )
        .await;
        match answer {
            Ok(Ok(hb)) if hb.cancel_requested => return Ended::CancelRequested,
            Ok(Ok(_)) => {
                valid_until = sent + inner.lease;
                next = sent + every;
            }
            Ok(Err(flow_core::Error::LeaseLost { .. })) => return Ended::LeaseLost,
            Ok(Err(e)) => {
                tracing::warn!(job_id = %lease.job_id, error = %e, "heartbeat failed; will try again");
                next = Instant::now() + again;
            }
            Err(_) => next = Instant::now(),
        }
    }
}

async fn record(
    inner: &Inner,
    job: &LeasedJob,
    ended: Ended,
    duration: Duration,
) -> (AttemptOutcome, Option<String>) {
    let lease = &job.lease;
    let stats = &inner.stats;
    let latency_ms = duration.as_secs_f64() * 1000.0;
    let (outcome, code) = match ended {
        Ended::Success(result) => {
            // Bounded, so an oversized result is stored as a marker instead of failing.
            let result = flow_core::queue::bound_result(result);
            // Completions go through the pool's completer, which records every completion
            // that is waiting in one `complete_many` call (fenced per job); a failure there
            // falls back to recording this one alone, with retries.
            let r = match complete_batched(inner, lease, result.clone()).await {
                Ok(()) => true,
                Err(_) => {
                    ack(inner, lease, "complete", || {
                        inner.queue.complete(lease, result.clone())
                    })
                    .await
                }
            };
            if r {
                PoolStats::inc(&stats.processed);
                PoolStats::inc(&stats.succeeded);
                tracing::info!(job_id = %job.id, queue = %job.queue, tenant = %job.tenant, attempt = job.attempt,
                    latency_ms, event_type = "job_succeeded", "job succeeded");
                (AttemptOutcome::Succeeded, None)
            } else {
                PoolStats::inc(&stats.lease_lost);
                (AttemptOutcome::LeaseLost, None)
            }
        }
        Ended::Failed(error) => {
            let code = error.code.as_str().to_owned();
            if matches!(
                error.code,
                FlowErrorCode::NodeTimeout | FlowErrorCode::JobTimeout
            ) {
                PoolStats::inc(&stats.timeouts);
            }
            let failure = Failure::from(&error).bounded();
            let retry = inner.classifier.classify(&error) == Disposition::Retry && job.can_retry();
            if retry {
                let delay = inner.retry.delay(job.attempt);
                let ok = ack(inner, lease, "retry", || {
                    inner.queue.retry(lease, delay, failure.clone())
                })
                .await;
                if ok {
                    PoolStats::inc(&stats.processed);
                    PoolStats::inc(&stats.retried);
                    tracing::warn!(job_id = %job.id, queue = %job.queue, tenant = %job.tenant, attempt = job.attempt,
                        latency_ms, code = %code, message = %failure.message, retry_in_ms = delay.as_millis() as u64,
                        event_type = "job_retry", "job attempt failed; will retry");
                    (AttemptOutcome::Retried, Some(code))
                } else {
                    PoolStats::inc(&stats.lease_lost);
                    (AttemptOutcome::LeaseLost, Some(code))
                }
            } else {
                let ok = ack(inner, lease, "fail", || {
                    inner.queue.fail(lease, failure.clone())
                })
                .await;
                if ok {
                    PoolStats::inc(&stats.processed);
                    PoolStats::inc(&stats.failed);
                    tracing::error!(job_id = %job.id, queue = %job.queue, tenant = %job.tenant, attempt = job.attempt,
                        latency_ms, code = %code, message = %failure.message,
                        event_type = "job_dead", "job failed; moved to the dead-letter set");
                    (AttemptOutcome::DeadLettered, Some(code))
                } else {
                    PoolStats::inc(&stats.lease_lost);
                    (AttemptOutcome::LeaseLost, Some(code))
                }
            }
        }
        Ended::CancelRequested => {
            let failure = Failure::new(
                FlowErrorCode::TraceCancelled.as_str(),
                "cancelled on request while running",
            );
            let ok = ack(inner, lease, "mark_cancelled", || {
                inner.queue.mark_cancelled(lease, failure.clone())
            })
            .await;
            if ok {
                PoolStats::inc(&stats.processed);
                PoolStats::inc(&stats.cancelled);
                tracing::info!(job_id = %job.id, queue = %job.queue, attempt = job.attempt,
                    event_type = "job_cancelled", "job cancelled on request");
                (
                    AttemptOutcome::Cancelled,
                    Some(FlowErrorCode::TraceCancelled.as_str().to_owned()),
                )
            } else {
                PoolStats::inc(&stats.lease_lost);
                (AttemptOutcome::LeaseLost, None)
            }
        }
        Ended::Released => {
            if ack(inner, lease, "release", || inner.queue.release(lease)).await {
                PoolStats::inc(&stats.released);
                tracing::info!(job_id = %job.id, queue = %job.queue, attempt = job.attempt,
                    event_type = "job_released", "job handed back to the queue at shutdown");
            }
            (AttemptOutcome::Released, None)
        }
        Ended::LeaseLost => {
            PoolStats::inc(&stats.lease_lost);
            tracing::warn!(job_id = %job.id, queue = %job.queue, attempt = job.attempt,
                event_type = "lease_lost", "lease lost: another worker owns this job now; outcome dropped");
            (AttemptOutcome::LeaseLost, None)
        }
    };
    let report = AttemptReport {
        job_id: job.id.to_string(),
        queue: job.queue.clone(),
        tenant: job.tenant.clone(),
        attempt: job.attempt,
        outcome,
        code,
        duration,
    };
    for o in &inner.observers {
        o.attempt_finished(&report);
    }
    (report.outcome, report.code)
}

/// A completion waiting for the completer.
struct CompleteRequest {
    lease: Lease,
    result: Value,
    reply: oneshot::Sender<Result<(), flow_core::Error>>,
}

/// How long a job started from the prefetch runs before the pool reports it started
/// (see [`heartbeat_until_lost`]).
const START_REPORT_AFTER: Duration = Duration::from_secs(1);

/// How long before a fetch's answer its leases are taken to have begun (see the fetch
/// loop): more than one leasing round takes.
const LEASE_ROUND_SLACK: Duration = Duration::from_millis(100);

/// Most completions recorded in one call.
const MAX_COMPLETE_BATCH: usize = 256;

/// Records completions in batches: it takes one request, then every other request
/// already waiting, and records them all with one `complete_many` call. While a call is
/// in flight, new requests queue up for the next one, so batches grow with load and a
/// lone completion is never delayed (group commit). Each call is bounded by `bound`: one
/// the backend does not answer in time fails, and the jobs behind it fall back to
/// recording their outcomes one by one (see [`ack`]).
async fn completer_loop(
    queue: Arc<dyn JobQueue>,
    mut rx: mpsc::UnboundedReceiver<CompleteRequest>,
    bound: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut items = vec![(first.lease, first.result)];
        let mut replies = vec![first.reply];
        while items.len() < MAX_COMPLETE_BATCH {
            match rx.try_recv() {
                Ok(r) => {
                    items.push((r.lease, r.result));
                    replies.push(r.reply);
                }
                Err(_) => break,
            }
        }
        let n = items.len();
        let results = match tokio::time::timeout(bound, queue.complete_many(items)).await {
            Ok(results) => results,
            Err(_) => (0..n)
                .map(|_| Err(backend_silent("complete_many", bound)))
                .collect(),
        };
        let mut results = results.into_iter();
        for reply in replies {
            let r = results.next().unwrap_or_else(|| {
                Err(flow_core::Error::Backend(
                    format!("complete_many answered fewer than {n} results").into(),
                ))
            });
            let _ = reply.send(r);
        }
    }
}

/// Tells the backend which held (prefetched) jobs have started (those still running a
/// moment after they started, see [`heartbeat_until_lost`]), in batches like the
/// completer's: one `mark_started` call for every report waiting, one call in flight at
/// a time, beside the completions rather than in their way. A report that
/// fails is not retried: should this worker die, those jobs come back uncharged (and the
/// backend's cap on held expiries still catches a job that keeps killing its workers).
async fn starter_loop(
    queue: Arc<dyn JobQueue>,
    mut rx: mpsc::UnboundedReceiver<Lease>,
    bound: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut started = vec![first];
        while started.len() < MAX_COMPLETE_BATCH {
            match rx.try_recv() {
                Ok(lease) => started.push(lease),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(bound, queue.mark_started(&started)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(jobs = started.len(), error = %e,
                "could not report prefetched jobs as started"),
            Err(_) => tracing::debug!(
                jobs = started.len(),
                "reporting prefetched jobs as started timed out"
            ),
        }
    }
}

/// The error of a backend call that got no answer within `bound`: transient, so the
/// caller tries again while the lease lasts. The call may still have taken effect; every
/// outcome is safe to send again (a replay with the same lease is accepted).
fn backend_silent(what: &str, bound: Duration) -> flow_core::Error {
    flow_core::Error::Unavailable(
        format!(
            "{what}: the backend did not answer within {:.3}s",
            bound.as_secs_f64()
        )
        .into(),
    )
}

/// Tells the starter a held job has started (see [`starter_loop`]).
fn report_started(inner: &Inner, lease: &Lease) {
    let sender = inner
        .starter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(sender) = sender {
        let _ = sender.send(lease.clone());
    }
}

/// Completes through the pool's completer (see [`completer_loop`]); completes directly
/// when the pool is not running.
async fn complete_batched(
    inner: &Inner,
    lease: &Lease,
    result: Value,
) -> Result<(), flow_core::Error> {
    let (tx, rx) = oneshot::channel();
    let sender = inner
        .completer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(sender) = sender else {
        return inner.queue.complete(lease, result).await;
    };
    let request = CompleteRequest {
        lease: lease.clone(),
        result,
        reply: tx,
    };
    if let Err(mpsc::error::SendError(req)) = sender.send(request) {
        return inner.queue.complete(lease, req.result).await;
    }
    match rx.await {
        Ok(r) => r,
        Err(_) => Err(flow_core::Error::Backend(
            "the completer stopped before answering".into(),
        )),
    }
}

/// Records an outcome, retrying transient backend errors until the lease would have
/// expired. Returns false when the outcome could not be recorded (lease lost, or the
/// backend stayed down: the lease then expires and the job comes back).
async fn ack<'a, F, Fut>(inner: &'a Inner, lease: &Lease, what: &'static str, mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), flow_core::Error>> + 'a,
{
    let give_up = Instant::now() + inner.lease;
    let mut backoff = Duration::from_millis(50);
    loop {
        // Bounded: a frozen backend must not hold the job (and a drain) forever. An
        // answer that did not come may still have been recorded; sending the outcome
        // again is safe, since a replay with the same lease is accepted.
        let left = give_up.saturating_duration_since(Instant::now());
        let answer = match tokio::time::timeout(left.max(Duration::from_millis(10)), op()).await {
            Ok(answer) => answer,
            Err(_) => Err(backend_silent(what, left)),
        };
        match answer {
            Ok(()) => return true,
            Err(flow_core::Error::LeaseLost { .. }) => {
                tracing::warn!(job_id = %lease.job_id, op = what,
                    "lease is stale: the job was reclaimed by another worker; outcome not recorded");
                return false;
            }
            Err(e) if e.is_transient() && Instant::now() + backoff < give_up => {
                tracing::warn!(job_id = %lease.job_id, op = what, error = %e, "could not record outcome; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(job_id = %lease.job_id, op = what, error = %e,
                    "could not record outcome; the lease will expire and the job will run again");
                return false;
            }
        }
    }
}
