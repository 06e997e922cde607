//! Helpers shared by the PostgreSQL integration and fault tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flow_core::Error;
use flow_core::queue::{JobId, JobQueue, JobState, Lease, QueueOptions};
use queue_postgres::{PgQueue, PgQueueBuilder};
use serde_json::json;
use test_support::postgres::PgServer;
use tokio::time::Instant;

/// `DATABASE_URL`, or a throwaway server shared by this test binary.
pub fn shared_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        let server = start_server(PgServer::builder());
        let url = server.url();
        // Kept until the process exits; its watchdog then stops it.
        Box::leak(Box::new(server));
        url
    })
    .clone()
}

/// Starts a throwaway server, or panics saying what to install.
pub fn start_server(builder: test_support::postgres::PgServerBuilder) -> PgServer {
    builder
        .start()
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL server: {e}"))
}

/// A schema name of this run's own.
pub fn fresh_schema() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A queue name of this test's own.
pub fn fresh_queue_name(test: &str) -> String {
    format!("{test}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A builder for `url` with a small pool.
pub fn builder(url: &str, schema: &str) -> PgQueueBuilder {
    PgQueue::builder(url)
        .schema(schema)
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
}

/// Connects and migrates.
pub async fn connect(builder: PgQueueBuilder) -> PgQueue {
    let queue = builder
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    queue
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    queue
}

/// A queue with a fresh schema on the shared server.
pub async fn fresh(opts: QueueOptions) -> PgQueue {
    connect(builder(&shared_url(), &fresh_schema()).queue_options(opts)).await
}

/// Completions recorded per job by a drain: the number of `complete` calls that took
/// effect for each job.
#[derive(Clone, Debug, Default)]
pub struct Ledger(Arc<Mutex<HashMap<JobId, usize>>>);

impl Ledger {
    pub fn record(&self, id: JobId) {
        *self.0.lock().expect("ledger").entry(id).or_insert(0) += 1;
    }
    pub fn len(&self) -> usize {
        self.0.lock().expect("ledger").len()
    }
    pub fn snapshot(&self) -> HashMap<JobId, usize> {
        self.0.lock().expect("ledger").clone()
    }
}

/// Completes a leased job, resolving ambiguous failures: when the call fails (the
/// connection died mid-statement, the server restarted), it is retried; a later
/// `LeaseLost` is resolved by reading the job: completed with this lease's token in
/// the result means this call took effect. Records the completion in `ledger` when it
/// took effect.
pub async fn complete_once(q: &PgQueue, lease: &Lease, ledger: &Ledger) {
    let result = json!({ "token": lease.token });
    let mut failed_before = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match q.complete(lease, result.clone()).await {
            Ok(()) => {
                ledger.record(lease.job_id);
                return;
            }
            Err(Error::LeaseLost { .. }) => {
                if failed_before
                    && let Ok(Some(info)) = q.job(&lease.queue, lease.job_id).await
                    && info.state == JobState::Completed
                    && info.result.as_ref() == Some(&result)
                {
                    ledger.record(lease.job_id);
                }
                return;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "complete kept failing for a minute: {e}"
                );
                failed_before = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs `workers` fetch/complete loops (with a reaper) until `expected` jobs were
/// completed or `limit` passed. Errors from the backend are retried, as a worker would.
pub async fn drain(
    queues: &[PgQueue],
    queue: &str,
    workers: usize,
    expected: usize,
    limit: Duration,
) -> Ledger {
    let ledger = Ledger::default();
    drain_into(&ledger, queues, queue, workers, expected, limit).await;
    ledger
}

/// Like [`drain`], recording into `ledger` (so a fault can be timed on its progress).
pub async fn drain_into(
    ledger: &Ledger,
    queues: &[PgQueue],
    queue: &str,
    workers: usize,
    expected: usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let q = queues[w % queues.len()].clone();
        let queue = queue.to_owned();
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_reap = Instant::now();
            while ledger.len() < expected && Instant::now() < deadline {
                if last_reap.elapsed() > Duration::from_millis(250) {
                    let _ = q.reap(&queue).await;
                    last_reap = Instant::now();
                }
                match q
                    .fetch(
                        &queue,
                        8,
                        Duration::from_secs(2),
                        Duration::from_millis(200),
                    )
                    .await
                {
                    Ok(jobs) => {
                        for job in jobs {
                            complete_once(&q, &job.lease, &ledger).await;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("drain worker panicked");
    }
}

/// Blocks until `ledger` holds at least `n` jobs (or 60 s passed); returns how many.
pub fn wait_for_progress(ledger: &Ledger, n: usize) -> usize {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while ledger.len() < n && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
    ledger.len()
}

/// Asserts every id was completed exactly once and reads back completed.
pub async fn assert_each_completed_once(q: &PgQueue, queue: &str, ids: &[JobId], ledger: &Ledger) {
    let done = ledger.snapshot();
    let twice: Vec<_> = done.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "outcomes recorded twice: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !done.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} jobs lost: {missing:?}",
        missing.len()
    );
    assert_eq!(done.len(), ids.len(), "completions of unknown jobs");
    for id in ids {
        let info = q
            .job(queue, *id)
            .await
            .expect("job")
            .unwrap_or_else(|| panic!("job {id} vanished"));
        assert_eq!(info.state, JobState::Completed, "job {id}");
    }
    let stats = q.stats(queue).await.expect("stats");
    assert_eq!(
        (
            stats.completed,
            stats.ready,
            stats.scheduled,
            stats.running,
            stats.dead
        ),
        (ids.len() as u64, 0, 0, 0, 0),
        "{stats:?}"
    );
}
