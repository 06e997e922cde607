//! The stateless worker pool over the in-memory queue: what a user of the pool notices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flow_core::queue::{self, Failure, JobQueue, JobState, MemoryQueue, NewJob};
use flow_core::{BoxError, Context, Flow, Message, Node, NodePolicy, create};
use serde::Deserialize;
use serde_json::{Value, json};
use worker_runtime::{RetryPolicy, StatsSnapshot, WorkerPool};

const Q: &str = "pool-test";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Directive {
    #[serde(default)]
    n: i64,
    #[serde(default)]
    fail_times: u32,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    sleep_ms: u64,
}

/// A flow that follows its payload's directions, like the command's `exercise` flow.
fn exercise_flow() -> Result<Flow, flow_core::Error> {
    let node = Node::new("exercise", |msg: Message, _ctx: Context| async move {
        let d: Directive = serde_json::from_value(msg.payload.clone()).map_err(|e| {
            Box::new(flow_core::InvalidPayload {
                type_name: "Directive",
                reason: e.to_string(),
            }) as BoxError
        })?;
        let attempt = msg.meta.get("attempt").and_then(Value::as_u64).unwrap_or(1) as u32;
        if d.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(d.sleep_ms)).await;
        }
        if d.panic {
            panic!("directed to panic");
        }
        if d.fail || attempt <= d.fail_times {
            return Err(format!("directed failure on attempt {attempt}").into());
        }
        Ok(Some(
            msg.with_payload(json!({"n": d.n, "attempt": attempt})),
        ))
    });
    create([node.to(&[])]).build()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(100),
        jitter: true,
    }
}

async fn run_until<F>(pool: WorkerPool, done: F) -> StatsSnapshot
where
    F: Fn(&StatsSnapshot) -> bool + Send + 'static,
{
    let stats = pool.stats();
    let until = async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&stats.snapshot()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    pool.run(until).await.expect("pool runs").stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_ends_in_the_right_states() {
    // The panicking job's message and backtrace need not be printed: on a loaded machine a
    // debug build's backtrace can take longer than the 300 ms job timeout below, turning
    // UNEXPECTED_ERROR into JOB_TIMEOUT. (nextest runs each test in a process of its own.)
    std::panic::set_hook(Box::new(|_| {}));
    let queue = Arc::new(MemoryQueue::new());
    let mut ids = HashMap::new();
    for (name, payload, retries) in [
        ("ok", json!({"n": 1}), 2),
        ("fail_once", json!({"n": 2, "fail_times": 1}), 2),
        ("always_fail", json!({"fail": true}), 2),
        ("invalid", json!({"unexpected": "field"}), 2),
        ("not_an_object", json!("text"), 2),
        ("panic", json!({"panic": true}), 2),
        ("hang", json!({"sleep_ms": 60_000}), 2),
    ] {
        let id = queue
            .enqueue(NewJob::new(Q, payload).max_retries(retries))
            .await
            .expect("enqueue");
        ids.insert(name, id);
    }
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .concurrency(4)
        .job_timeout(Duration::from_millis(300))
        .retry_policy(fast_retry())
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded + s.failed >= 7).await;

    let job = |name: &str| {
        let q = queue.clone();
        let id = ids[name];
        async move { q.job(Q, id).await.expect("read").expect("exists") }
    };
    let ok = job("ok").await;
    assert_eq!(ok.state, JobState::Completed);
    assert_eq!(ok.result, Some(json!({"n": 1, "attempt": 1})));
    let once = job("fail_once").await;
    assert_eq!(once.state, JobState::Completed);
    assert_eq!(once.attempts, 2);
    let always = job("always_fail").await;
    assert_eq!(always.state, JobState::Dead);
    assert_eq!(always.attempts, 3, "max_retries 2 means 3 attempts");
    assert_eq!(always.error.as_ref().expect("error").code, "NODE_EXCEPTION");
    for name in ["invalid", "not_an_object"] {
        let j = job(name).await;
        assert_eq!(j.state, JobState::Dead, "{name}");
        assert_eq!(j.attempts, 1, "{name}: INVALID_PAYLOAD is never retried");
        assert_eq!(j.error.as_ref().expect("error").code, "INVALID_PAYLOAD");
    }
    let panicked = job("panic").await;
    assert_eq!(panicked.state, JobState::Dead);
    assert_eq!(panicked.attempts, 1);
    assert_eq!(
        panicked.error.as_ref().expect("error").code,
        "UNEXPECTED_ERROR"
    );
    let hang = job("hang").await;
    assert_eq!(hang.state, JobState::Dead);
    assert_eq!(hang.error.as_ref().expect("error").code, "JOB_TIMEOUT");

    assert_eq!(stats.succeeded, 2);
    assert_eq!(stats.failed, 5);
    assert_eq!(stats.retried, 3, "fail_once once, always_fail twice");
    assert_eq!(stats.timeouts, 1);
    assert_eq!(stats.processed, 10);
    assert_eq!(stats.active, 0);
    let dead = queue.dead_letters(Q, 0, 100).await.expect("dlq");
    assert_eq!(dead.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded_and_used() {
    let queue = Arc::new(MemoryQueue::new());
    let jobs: Vec<NewJob> = (0..40).map(|i| NewJob::new(Q, json!({"n": i}))).collect();
    queue.enqueue_many(jobs).await.expect("enqueue");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r2, p2) = (running.clone(), peak.clone());
    let factory = move || {
        let (r3, p3) = (r2.clone(), p2.clone());
        let node = Node::new("count", move |m: Message, _c: Context| {
            let (r4, p4) = (r3.clone(), p3.clone());
            async move {
                let now = r4.fetch_add(1, Ordering::SeqCst) + 1;
                p4.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                r4.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Some(m))
            }
        });
        create([node.to(&[])]).build()
    };
    let pool = WorkerPool::builder(queue.clone(), Q, factory)
        .concurrency(5)
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 40).await;
    assert_eq!(stats.succeeded, 40);
    assert_eq!(peak.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_retry_really_waits_for_its_backoff() {
    let queue = Arc::new(MemoryQueue::new());
    queue
        .enqueue(NewJob::new(Q, json!({"fail_times": 1})))
        .await
        .expect("enqueue");
    let times = Arc::new(Mutex::new(Vec::new()));
    let t2 = times.clone();
    let factory = move || {
        let t3 = t2.clone();
        let node = Node::new("stamp", move |m: Message, _c: Context| {
            let t4 = t3.clone();
            async move {
                let first = {
                    let mut t = t4.lock().expect("lock");
                    t.push(Instant::now());
                    t.len() == 1
                };
                if first {
                    return Err::<Option<Message>, BoxError>("first attempt fails".into());
                }
                Ok(Some(m))
            }
        });
        create([node.to(&[])]).build()
    };
    let pool = WorkerPool::builder(queue.clone(), Q, factory)
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(400),
            cap: Duration::from_secs(1),
            jitter: false,
        })
        .fetch_wait(Duration::from_millis(50))
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 1).await;
    assert_eq!(stats.retried, 1);
    let t = times.lock().expect("lock");
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= Duration::from_millis(400),
        "{:?}",
        t[1] - t[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_fetching_and_drains_in_flight_jobs() {
    let queue = Arc::new(MemoryQueue::new());
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| NewJob::new(Q, json!({"n": i, "sleep_ms": 400})))
        .collect();
    queue.enqueue_many(jobs).await.expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .concurrency(2)
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .expect("pool");
    let stats = pool.stats();
    let signal = async move {
        while stats.snapshot().active < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let report = pool.run(signal).await.expect("runs");
    assert_eq!(report.stats.succeeded, 2, "the two in-flight jobs finished");
    assert_eq!(report.handed_back, 0);
    let s = queue.stats(Q).await.expect("stats");
    assert_eq!((s.ready, s.running, s.completed), (8, 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_past_the_shutdown_timeout_are_handed_back_without_counting_the_attempt() {
    let queue = Arc::new(MemoryQueue::new());
    let id = queue
        .enqueue(NewJob::new(Q, json!({"sleep_ms": 60_000})))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .shutdown_timeout(Duration::from_millis(200))
        .build()
        .expect("pool");
    let stats = pool.stats();
    let signal = async move {
        while stats.snapshot().active < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let t0 = Instant::now();
    let report = pool.run(signal).await.expect("runs");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(report.handed_back, 1);
    assert_eq!(report.stats.released, 1);
    assert_eq!(report.stats.processed, 0);
    let job = queue.job(Q, id).await.expect("read").expect("exists");
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(job.attempts, 0, "a handed-back attempt does not count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_job_leased() {
    let queue = Arc::new(MemoryQueue::new());
    let id = queue
        .enqueue(NewJob::new(Q, json!({"sleep_ms": 1500})))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .lease(Duration::from_millis(400))
        .reap_interval(Duration::from_millis(100))
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 1).await;
    assert_eq!(stats.rescued, 0, "the lease never expired");
    assert_eq!(stats.lease_lost, 0);
    let job = queue.job(Q, id).await.expect("read").expect("exists");
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_brings_back_jobs_of_a_dead_worker() {
    let queue = Arc::new(MemoryQueue::new());
    let id = queue
        .enqueue(NewJob::new(Q, json!({"n": 7})))
        .await
        .expect("enqueue");
    // A worker that leased the job and died: nobody heartbeats this lease.
    let leased = queue
        .fetch(Q, 1, Duration::from_millis(300), Duration::from_secs(1))
        .await
        .expect("fetch");
    assert_eq!(leased.len(), 1);
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .reap_interval(Duration::from_millis(100))
        .fetch_wait(Duration::from_millis(50))
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 1).await;
    assert_eq!(stats.rescued, 1);
    let job = queue.job(Q, id).await.expect("read").expect("exists");
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempts, 2);
    assert!(matches!(
        queue.complete(&leased[0].lease, json!("late")).await,
        Err(flow_core::Error::LeaseLost { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_cancels_its_trace() {
    let queue = Arc::new(MemoryQueue::new());
    let id = queue
        .enqueue(NewJob::new(Q, json!({"sleep_ms": 60_000})))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .lease(Duration::from_millis(300))
        .build()
        .expect("pool");
    let q2 = queue.clone();
    let stats = pool.stats();
    let canceller = tokio::spawn(async move {
        while stats.snapshot().active < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        q2.cancel(Q, id).await
    });
    let stats = run_until(pool, |s| s.cancelled >= 1).await;
    assert_eq!(
        canceller.await.expect("task").expect("cancel"),
        flow_core::queue::CancelOutcome::Requested
    );
    assert_eq!(stats.cancelled, 1);
    let job = queue.job(Q, id).await.expect("read").expect("exists");
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.error.as_ref().expect("error").code, "TRACE_CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_factory_dead_letters_the_job_and_the_worker_goes_on() {
    let queue = Arc::new(MemoryQueue::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let factory = move || {
        if c2.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("factory bug on first call");
        }
        let n = Node::new("echo", |m: Message, _c: Context| async move {
            Ok::<_, BoxError>(Some(m))
        })
        .with_policy(NodePolicy::default());
        create([n.to(&[])]).build()
    };
    let first = queue
        .enqueue(NewJob::new(Q, json!(1)))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, factory)
        .concurrency(1)
        .build()
        .expect("pool");
    let q2 = queue.clone();
    let stats = pool.stats();
    tokio::spawn(async move {
        while stats.snapshot().failed < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        q2.enqueue(NewJob::new(Q, json!(2))).await
    });
    let stats = run_until(pool, |s| s.succeeded >= 1).await;
    assert_eq!((stats.failed, stats.succeeded), (1, 1));
    let job = queue.job(Q, first).await.expect("read").expect("exists");
    assert_eq!(job.error.as_ref().expect("error").code, "UNEXPECTED_ERROR");
}

#[test]
fn bad_settings_are_refused_with_their_name() {
    let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new());
    let err = WorkerPool::builder(queue.clone(), Q, exercise_flow)
        .concurrency(0)
        .build()
        .expect_err("zero concurrency");
    assert!(err.to_string().contains("concurrency"), "{err}");
    let err = WorkerPool::builder(queue.clone(), "bad queue", exercise_flow)
        .build()
        .expect_err("bad name");
    assert!(err.to_string().contains("bad queue"), "{err}");
    let err = WorkerPool::builder(queue, Q, exercise_flow)
        .job_timeout(Duration::ZERO)
        .build()
        .expect_err("zero timeout");
    assert!(err.to_string().contains("job_timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_mode_reuses_one_flow_and_restarts_it_after_failures() {
    let queue = Arc::new(MemoryQueue::new());
    let jobs: Vec<NewJob> = (0..20).map(|i| NewJob::new(Q, json!({"n": i}))).collect();
    queue.enqueue_many(jobs).await.expect("enqueue");
    let built = Arc::new(AtomicUsize::new(0));
    let b2 = built.clone();
    let factory = move || {
        b2.fetch_add(1, Ordering::SeqCst);
        exercise_flow()
    };
    let pool = WorkerPool::builder(queue.clone(), Q, factory.clone())
        .concurrency(4)
        .long_lived(2)
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 20).await;
    assert_eq!(stats.succeeded, 20);
    assert_eq!(built.load(Ordering::SeqCst), 1, "one flow served every job");

    let failing: Vec<NewJob> = (0..4)
        .map(|_| NewJob::new(Q, json!({"fail": true})).max_retries(0))
        .collect();
    queue.enqueue_many(failing).await.expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, factory)
        .concurrency(1)
        .long_lived(2)
        .build()
        .expect("pool");
    let probe = pool.clone();
    let stats = run_until(pool, |s| s.failed >= 4).await;
    assert_eq!(stats.failed, 4);
    assert_eq!(
        probe.flow_restarts(),
        2,
        "rebuilt after every second failure"
    );
    assert_eq!(
        built.load(Ordering::SeqCst),
        1 + 2,
        "first flow, then one after the first restart"
    );
}

/// A no-op flow that counts how many times each job (by payload `n`) ran, and sleeps
/// when the payload says so.
fn counting_flow(
    runs: Arc<Mutex<HashMap<i64, u32>>>,
) -> impl Fn() -> Result<Flow, flow_core::Error> + Send + Sync + 'static {
    move || {
        let runs = runs.clone();
        let node = Node::new("count", move |msg: Message, _ctx: Context| {
            let runs = runs.clone();
            async move {
                let n = msg.payload["n"].as_i64().unwrap_or(-1);
                *runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(n)
                    .or_insert(0) += 1;
                if let Some(ms) = msg.payload["sleep_ms"].as_u64() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Ok::<_, BoxError>(Some(msg))
            }
        });
        create([node.to(&[])]).build()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_jobs_are_handed_back_at_shutdown_without_counting_the_attempt() {
    // Short jobs make the pool prefetch; stopping it mid-drain must leave every job either
    // completed once or ready again with no attempt counted, and no lease behind.
    // A run can stop at the instant the prefetch buffer is empty, so try a few times.
    let mut released = 0;
    for round in 0..5 {
        let queue = Arc::new(MemoryQueue::new());
        let q = format!("prefetch-{round}");
        let ids = queue
            .enqueue_many(
                (0..2000)
                    .map(|i| NewJob::new(&q, json!({"n": i})))
                    .collect(),
            )
            .await
            .expect("enqueue");
        let runs = Arc::new(Mutex::new(HashMap::new()));
        let pool = WorkerPool::builder(queue.clone(), &q, counting_flow(runs.clone()))
            .concurrency(1)
            .build()
            .expect("pool");
        let stats = pool.stats();
        let report = pool
            .run(async move {
                while stats.snapshot().succeeded < 300 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("runs");
        let s = queue.stats(&q).await.expect("stats");
        assert_eq!(s.running, 0, "no lease left behind");
        assert_eq!(s.completed, report.stats.succeeded);
        assert_eq!(s.ready + s.completed, 2000, "nothing lost");
        for id in ids {
            let job = queue.job(&q, id).await.expect("read").expect("exists");
            match job.state {
                JobState::Completed => assert_eq!(job.attempts, 1),
                JobState::Ready => {
                    assert_eq!(job.attempts, 0, "a handed-back job keeps its attempts")
                }
                other => panic!("job in state {other:?}"),
            }
        }
        let runs = runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(runs.values().all(|&r| r == 1), "every job ran at most once");
        assert_eq!(runs.len() as u64, s.completed);
        released = report.stats.released;
        if released > 0 {
            break;
        }
    }
    assert!(
        released > 0,
        "the pool prefetched and handed prefetched jobs back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_prefetched_behind_a_long_one_are_handed_back_and_run_once() {
    // Job 60 runs for longer than the lease while the jobs prefetched with it wait. The
    // pool hands them back before their leases can expire (a third of the lease in), so
    // none is reclaimed by the reaper and none loses its lease; each job runs exactly
    // once and every job completes.
    let queue = Arc::new(MemoryQueue::new());
    let jobs = (0..120)
        .map(|i| {
            let payload = if i == 60 {
                json!({"n": i, "sleep_ms": 1200})
            } else {
                json!({"n": i})
            };
            NewJob::new(Q, payload)
        })
        .collect();
    queue.enqueue_many(jobs).await.expect("enqueue");
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let pool = WorkerPool::builder(queue.clone(), Q, counting_flow(runs.clone()))
        .concurrency(1)
        .lease(Duration::from_millis(300))
        .reap_interval(Duration::from_millis(50))
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded >= 120).await;
    assert_eq!(stats.succeeded, 120, "{stats:?}");
    let runs = runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(runs.len(), 120);
    let twice: Vec<_> = runs.iter().filter(|(_, r)| **r != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(
        (stats.lease_lost, stats.rescued),
        (0, 0),
        "no prefetched job waited out its lease: {stats:?}"
    );
    let s = queue.stats(Q).await.expect("stats");
    assert_eq!((s.ready, s.running, s.completed), (0, 0, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_jobs_are_not_prefetched_away_from_an_idle_worker() {
    // Two workers, one slot each, jobs of 300 ms: a worker must not hoard jobs it cannot
    // start soon, so both share the work.
    let queue = Arc::new(MemoryQueue::new());
    let jobs = (0..8)
        .map(|i| NewJob::new(Q, json!({"n": i, "sleep_ms": 300})))
        .collect();
    queue.enqueue_many(jobs).await.expect("enqueue");
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let build = |q: Arc<MemoryQueue>| {
        WorkerPool::builder(q, Q, counting_flow(runs.clone()))
            .concurrency(1)
            .build()
            .expect("pool")
    };
    let (a, b) = (build(queue.clone()), build(queue.clone()));
    let done = queue.clone();
    let until = move || {
        let q = done.clone();
        async move {
            while q.stats(Q).await.map(|s| s.completed).unwrap_or(0) < 8 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let (ra, rb) = tokio::join!(a.run(until()), b.run(until()));
    let (ra, rb) = (ra.expect("a runs"), rb.expect("b runs"));
    assert_eq!(ra.stats.succeeded + rb.stats.succeeded, 8);
    assert_eq!(
        (ra.stats.succeeded, rb.stats.succeeded),
        (4, 4),
        "work was shared"
    );
}

/// A backend that refuses outcomes over the documented limits (a store stricter than
/// the ones shipped, which bound what they are given): the pool must send them bounded.
struct Strict {
    inner: MemoryQueue,
    refused: AtomicUsize,
}

impl Strict {
    fn check(&self, what: &'static str, size: usize, limit: usize) -> Result<(), flow_core::Error> {
        if size <= limit {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::SeqCst);
        Err(flow_core::Error::InvalidJob {
            option: what,
            reason: format!("{size} bytes is over {limit}"),
        })
    }

    fn check_failure(&self, failure: &Failure) -> Result<(), flow_core::Error> {
        self.check(
            "message",
            failure.message.len(),
            queue::MAX_FAILURE_MESSAGE_BYTES,
        )?;
        let details = failure
            .details
            .as_ref()
            .map_or(0, |d| queue::json_size(d).unwrap_or(usize::MAX));
        self.check("details", details, queue::MAX_FAILURE_DETAILS_BYTES)
    }

    fn check_result(&self, result: &Value) -> Result<(), flow_core::Error> {
        let size = queue::json_size(result).unwrap_or(usize::MAX);
        self.check("result", size, queue::MAX_RESULT_BYTES)
    }
}

#[async_trait::async_trait]
impl JobQueue for Strict {
    async fn enqueue(&self, job: NewJob) -> Result<queue::JobId, flow_core::Error> {
        self.inner.enqueue(job).await
    }
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<queue::JobId>, flow_core::Error> {
        self.inner.enqueue_many(jobs).await
    }
    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<queue::LeasedJob>, flow_core::Error> {
        self.inner.fetch(queue, max, lease, wait).await
    }
    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<queue::LeasedJob>, flow_core::Error> {
        self.inner.fetch_held(queue, max, start, lease, wait).await
    }
    async fn mark_started(&self, leases: &[queue::Lease]) -> Result<(), flow_core::Error> {
        self.inner.mark_started(leases).await
    }
    async fn flush(&self) {
        self.inner.flush().await;
    }
    async fn heartbeat(
        &self,
        lease: &queue::Lease,
        extend: Duration,
    ) -> Result<queue::Heartbeat, flow_core::Error> {
        self.inner.heartbeat(lease, extend).await
    }
    async fn complete(&self, lease: &queue::Lease, result: Value) -> Result<(), flow_core::Error> {
        self.check_result(&result)?;
        self.inner.complete(lease, result).await
    }
    async fn complete_many(
        &self,
        items: Vec<(queue::Lease, Value)>,
    ) -> Vec<Result<(), flow_core::Error>> {
        let mut out = Vec::with_capacity(items.len());
        for (lease, result) in items {
            out.push(self.complete(&lease, result).await);
        }
        out
    }
    async fn retry(
        &self,
        lease: &queue::Lease,
        delay: Duration,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        self.check_failure(&failure)?;
        self.inner.retry(lease, delay, failure).await
    }
    async fn fail(&self, lease: &queue::Lease, failure: Failure) -> Result<(), flow_core::Error> {
        self.check_failure(&failure)?;
        self.inner.fail(lease, failure).await
    }
    async fn release(&self, lease: &queue::Lease) -> Result<(), flow_core::Error> {
        self.inner.release(lease).await
    }
    async fn mark_cancelled(
        &self,
        lease: &queue::Lease,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        self.check_failure(&failure)?;
        self.inner.mark_cancelled(lease, failure).await
    }
    async fn reap(&self, queue: &str) -> Result<queue::ReapReport, flow_core::Error> {
        self.inner.reap(queue).await
    }
    async fn job(
        &self,
        queue: &str,
        id: queue::JobId,
    ) -> Result<Option<queue::JobInfo>, flow_core::Error> {
        self.inner.job(queue, id).await
    }
    async fn cancel(
        &self,
        queue: &str,
        id: queue::JobId,
    ) -> Result<queue::CancelOutcome, flow_core::Error> {
        self.inner.cancel(queue, id).await
    }
    async fn stats(&self, queue: &str) -> Result<queue::QueueStats, flow_core::Error> {
        self.inner.stats(queue).await
    }
    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<queue::DeadLetter>, flow_core::Error> {
        self.inner.dead_letters(queue, offset, limit).await
    }
    async fn requeue_dead(&self, queue: &str, id: queue::JobId) -> Result<(), flow_core::Error> {
        self.inner.requeue_dead(queue, id).await
    }
    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        self.inner.requeue_all_dead(queue).await
    }
    async fn purge_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        self.inner.purge_dead(queue).await
    }
    async fn pause(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.inner.pause(queue).await
    }
    async fn resume(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.inner.resume(queue).await
    }
    async fn ping(&self) -> Result<(), flow_core::Error> {
        self.inner.ping().await
    }
}

/// Five mebibytes: far over every outcome limit.
const HUGE: usize = 5 * 1024 * 1024;

/// A flow returning a 5 MiB result, or failing with a 5 MiB message, as its payload says.
fn oversized_flow() -> Result<Flow, flow_core::Error> {
    let node = Node::new("oversized", |msg: Message, _ctx: Context| async move {
        if msg.payload["make"] == "result" {
            Ok(Some(msg.with_payload(json!("r".repeat(HUGE)))))
        } else {
            Err("e".repeat(HUGE).into())
        }
    });
    create([node.to(&[])]).build()
}

/// A flow that returns a 5 MiB result and one that fails with a 5 MiB message both get
/// their outcome recorded, even by a backend that refuses anything over the limits:
/// completed with the truncation marker, and dead with the message cut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_results_and_failures_are_recorded_bounded() {
    let queue = Arc::new(Strict {
        inner: MemoryQueue::new(),
        refused: AtomicUsize::new(0),
    });
    let big_result = queue
        .enqueue(NewJob::new(Q, json!({"make": "result"})))
        .await
        .expect("enqueue");
    let big_error = queue
        .enqueue(NewJob::new(Q, json!({"make": "error"})).max_retries(0))
        .await
        .expect("enqueue");
    let pool = WorkerPool::builder(queue.clone(), Q, oversized_flow)
        .concurrency(2)
        .retry_policy(fast_retry())
        .build()
        .expect("pool");
    let stats = run_until(pool, |s| s.succeeded + s.failed >= 2).await;
    assert_eq!(
        queue.refused.load(Ordering::SeqCst),
        0,
        "the pool sent an outcome over the limits"
    );
    assert_eq!((stats.succeeded, stats.failed), (1, 1));

    let done = queue
        .job(Q, big_result)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(done.state, JobState::Completed);
    let marker = queue::truncated_marker(HUGE + 2, queue::MAX_RESULT_BYTES);
    assert!(
        done.result.as_ref() == Some(&marker),
        "expected the marker {marker}, got {} bytes",
        done.result.map_or(0, |r| r.to_string().len())
    );

    let dead = queue
        .job(Q, big_error)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(dead.state, JobState::Dead);
    let error = dead.error.expect("error");
    assert_eq!(error.code, "NODE_EXCEPTION");
    assert!(error.message.len() <= queue::MAX_FAILURE_MESSAGE_BYTES);
    assert!(
        error.message.contains("eeee") && error.message.ends_with("bytes in all]"),
        "message cut with a note: ...{}",
        &error.message[error.message.len().saturating_sub(60)..]
    );
    let details = error.details.expect("details");
    assert!(queue::json_size(&details).unwrap_or(usize::MAX) <= queue::MAX_FAILURE_DETAILS_BYTES);
    assert_eq!(
        details["code"], "NODE_EXCEPTION",
        "details keep their fields"
    );
}
