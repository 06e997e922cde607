//! The worker pool when its backend misbehaves or its prefetch guesses wrong: no job is
//! charged for a run it never had, a job stops once its lease is gone, a drain ends on
//! time whatever the backend does, and an outcome whose reply was lost is counted as
//! what it was. The backend is the real in-memory queue, wrapped to freeze or to lose
//! replies on command.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flow_core::Error;
use flow_core::queue::{
    CancelOutcome, DeadLetter, Failure, Heartbeat, JobId, JobInfo, JobQueue, JobState, Lease,
    LeasedJob, MemoryQueue, NewJob, QueueOptions, QueueStats, ReapReport,
};
use flow_core::{BoxError, Context, Flow, Message, Node, create};
use serde_json::{Value, json};
use worker_runtime::{StatsSnapshot, WorkerPool};

const Q: &str = "pool-faults";

/// Sleeps `sleep_ms` from the payload, then echoes it. Counts runs that saw their trace
/// cancelled.
fn sleeper(cancelled: Arc<AtomicUsize>) -> impl Fn() -> Result<Flow, flow_core::Error> {
    move || {
        let cancelled = cancelled.clone();
        let node = Node::new("sleep", move |msg: Message, ctx: Context| {
            let cancelled = cancelled.clone();
            async move {
                let ms = msg.payload["sleep_ms"].as_u64().unwrap_or(0);
                if ms > 0 {
                    let guard = CountOnDrop(cancelled);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    std::mem::forget(guard);
                }
                let _ = ctx;
                Ok::<_, BoxError>(Some(msg))
            }
        });
        create([node.to(&[])]).build()
    }
}

/// Counts a node run that was dropped (its trace cancelled) before it finished.
struct CountOnDrop(Arc<AtomicUsize>);
impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn run_until<F>(pool: WorkerPool, limit: Duration, done: F) -> StatsSnapshot
where
    F: Fn(&StatsSnapshot) -> bool + Send + 'static,
{
    let stats = pool.stats();
    let until = async move {
        let deadline = Instant::now() + limit;
        while !done(&stats.snapshot()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    pool.run(until).await.expect("pool runs").stats
}

/// A real queue that can be frozen (every call hangs, as with a backend stopped by
/// SIGSTOP) or made to lose the reply of its next completions (recorded, then answered
/// with a connection error).
struct Faulty {
    inner: MemoryQueue,
    frozen: AtomicBool,
    lose_complete_replies: AtomicUsize,
}

impl Faulty {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryQueue::with_options(QueueOptions::default()),
            frozen: AtomicBool::new(false),
            lose_complete_replies: AtomicUsize::new(0),
        })
    }
    async fn gate(&self) {
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
    fn lose_reply(&self) -> bool {
        self.lose_complete_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn connection_reset() -> Error {
    Error::Unavailable("connection reset by peer (injected)".into())
}

#[async_trait]
impl JobQueue for Faulty {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        self.gate().await;
        self.inner.enqueue(job).await
    }
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        self.gate().await;
        self.inner.enqueue_many(jobs).await
    }
    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        self.gate().await;
        self.inner.fetch(queue, max, lease, wait).await
    }
    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, Error> {
        self.gate().await;
        self.inner.fetch_held(queue, max, start, lease, wait).await
    }
    async fn mark_started(&self, leases: &[Lease]) -> Result<(), Error> {
        self.gate().await;
        self.inner.mark_started(leases).await
    }
    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat, Error> {
        self.gate().await;
        self.inner.heartbeat(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), Error> {
        self.gate().await;
        let r = self.inner.complete(lease, result).await;
        if r.is_ok() && self.lose_reply() {
            return Err(connection_reset());
        }
        r
    }
    async fn complete_many(&self, items: Vec<(Lease, Value)>) -> Vec<Result<(), Error>> {
        self.gate().await;
        let results = self.inner.complete_many(items).await;
        if results.iter().all(Result::is_ok) && self.lose_reply() {
            return results.iter().map(|_| Err(connection_reset())).collect();
        }
        results
    }
    async fn retry(&self, lease: &Lease, delay: Duration, failure: Failure) -> Result<(), Error> {
        self.gate().await;
        self.inner.retry(lease, delay, failure).await
    }
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        self.gate().await;
        self.inner.fail(lease, failure).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.gate().await;
        self.inner.release(lease).await
    }
    async fn mark_cancelled(&self, lease: &Lease, failure: Failure) -> Result<(), Error> {
        self.gate().await;
        self.inner.mark_cancelled(lease, failure).await
    }
    async fn reap(&self, queue: &str) -> Result<ReapReport, Error> {
        self.gate().await;
        self.inner.reap(queue).await
    }
    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, Error> {
        self.inner.job(queue, id).await
    }
    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, Error> {
        self.inner.cancel(queue, id).await
    }
    async fn stats(&self, queue: &str) -> Result<QueueStats, Error> {
        self.inner.stats(queue).await
    }
    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        self.inner.dead_letters(queue, offset, limit).await
    }
    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), Error> {
        self.inner.requeue_dead(queue, id).await
    }
    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, Error> {
        self.inner.requeue_all_dead(queue).await
    }
    async fn purge_dead(&self, queue: &str) -> Result<u64, Error> {
        self.inner.purge_dead(queue).await
    }
    async fn pause(&self, queue: &str) -> Result<(), Error> {
        self.inner.pause(queue).await
    }
    async fn resume(&self, queue: &str) -> Result<(), Error> {
        self.inner.resume(queue).await
    }
    async fn ping(&self) -> Result<(), Error> {
        self.gate().await;
        self.inner.ping().await
    }
}

/// Fast jobs teach the pool that jobs take a millisecond, so it prefetches a crowd of
/// them behind two jobs that then run for several leases. The jobs held waiting must not
/// lose their leases and die (`max_retries(0)`) without ever running: every job
/// completes, as attempt 1, and the dead-letter set stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_held_behind_slow_ones_are_never_charged_for_waiting() {
    let queue = Arc::new(MemoryQueue::new());
    let fast = |n: u64| NewJob::new(Q, json!({ "n": n })).max_retries(0);
    queue
        .enqueue_many((0..400).map(fast).collect())
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, sleeper(Arc::default()))
        .concurrency(2)
        .lease(Duration::from_millis(900))
        .build()
        .expect("pool");
    let stats = pool.stats();
    let producer = {
        let queue = queue.clone();
        async move {
            // Once the pool has learnt how short jobs are: two slow jobs, then more fast.
            while stats.snapshot().succeeded < 400 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut jobs: Vec<NewJob> = (0..2)
                .map(|n| NewJob::new(Q, json!({ "n": 1000 + n, "sleep_ms": 3000 })).max_retries(0))
                .collect();
            jobs.extend((500..800).map(fast));
            queue.enqueue_many(jobs).await.expect("enqueue");
        }
    };
    let (stats, ()) = tokio::join!(
        run_until(pool, Duration::from_secs(30), |s| s.succeeded >= 702),
        producer
    );
    let q = queue.stats(Q).await.expect("stats");
    assert_eq!(
        q.dead,
        0,
        "jobs died without running: {:?}",
        queue.dead_letters(Q, 0, 5).await.expect("dead letters")
    );
    assert_eq!(stats.succeeded, 702, "{stats:?}");
    assert_eq!(stats.lease_lost, 0, "{stats:?}");
    assert_eq!(q.completed, 702);
}

/// A backend that stops answering (frozen) while a job runs: once the lease is gone by
/// the worker's clock, the job's trace is cancelled instead of running on beside the
/// worker that will get the job next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stops_when_its_lease_runs_out_without_a_heartbeat() {
    let queue = Faulty::new();
    let id = queue
        .enqueue(NewJob::new(Q, json!({ "sleep_ms": 20_000 })))
        .await
        .expect("enqueue");
    let cancelled = Arc::new(AtomicUsize::new(0));
    let pool = WorkerPool::builder(queue.clone(), Q, sleeper(cancelled.clone()))
        .concurrency(1)
        .lease(Duration::from_millis(600))
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .expect("pool");
    let q = queue.clone();
    let started = Instant::now();
    let watcher = {
        let cancelled = cancelled.clone();
        async move {
            // Let it start, then freeze the backend.
            while q.job(Q, id).await.expect("job").map(|j| j.state) != Some(JobState::Running) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            q.frozen.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(5);
            while cancelled.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let report = tokio::time::timeout(Duration::from_secs(10), pool.run(watcher))
        .await
        .expect("the pool drained in time")
        .expect("pool runs");
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        1,
        "the job's trace was cancelled once its lease ran out"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "cancelled about a lease after the freeze, took {:?}",
        started.elapsed()
    );
    assert_eq!(report.stats.lease_lost, 1, "{:?}", report.stats);
}

/// SIGTERM while the backend is frozen: the drain still ends within the shutdown
/// timeout (jobs cancelled, hand-backs abandoned: their leases expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_within_the_shutdown_timeout_when_the_backend_freezes() {
    let queue = Faulty::new();
    for n in 0..4 {
        queue
            .enqueue(NewJob::new(Q, json!({ "n": n, "sleep_ms": 20_000 })))
            .await
            .expect("enqueue");
    }
    let pool = WorkerPool::builder(queue.clone(), Q, sleeper(Arc::default()))
        .concurrency(2)
        .lease(Duration::from_secs(30))
        .shutdown_timeout(Duration::from_millis(1500))
        .build()
        .expect("pool");
    let q = queue.clone();
    let signal = async move {
        while q.stats(Q).await.expect("stats").running < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        q.frozen.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = pool.stats();
    let signalled = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mark = signalled.clone();
    let signal = async move {
        signal.await;
        *mark.lock().expect("lock") = Some(Instant::now());
    };
    let report = tokio::time::timeout(Duration::from_secs(10), pool.run(signal))
        .await
        .expect("the drain must not hang on a frozen backend")
        .expect("pool runs");
    let took = signalled
        .lock()
        .expect("lock")
        .expect("signalled")
        .elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "the drain took {took:?}, past the 1.5 s shutdown timeout"
    );
    assert_eq!(report.handed_back, 2, "{:?}", stats.snapshot());
}

/// The reply to a completion is lost (the connection reset after the backend recorded
/// it): the worker sends it again, the backend accepts the replay, and the job counts as
/// succeeded, not as a lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_reply_was_lost_counts_as_succeeded() {
    let queue = Faulty::new();
    queue.lose_complete_replies.store(1, Ordering::SeqCst);
    let id = queue
        .enqueue(NewJob::new(Q, json!({ "n": 1 })))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, sleeper(Arc::default()))
        .concurrency(1)
        .build()
        .expect("pool");
    let stats = run_until(pool, Duration::from_secs(10), |s| {
        s.succeeded + s.lease_lost >= 1
    })
    .await;
    assert_eq!(queue.lose_complete_replies.load(Ordering::SeqCst), 0);
    assert_eq!((stats.succeeded, stats.lease_lost), (1, 0), "{stats:?}");
    let job = queue.job(Q, id).await.expect("job").expect("exists");
    assert_eq!(job.state, JobState::Completed);
}
