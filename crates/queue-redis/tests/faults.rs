//! Fault tests, each against throwaway servers of its own. Each asserts the two figures
//! that matter: jobs lost (must be 0) and outcomes recorded twice (must be 0).
//!
//! * a worker process killed with SIGKILL while holding leases;
//! * `CLIENT KILL` of every client connection while workers drain a queue;
//! * Redis killed and restarted mid-run with `appendonly yes`, `appendfsync always`;
//! * malformed job records written straight into Redis.
//!
//! The SIGKILL test re-runs this test binary as the worker process: the ignored test
//! [`fault_worker_process`] acts as the worker when `FAULT_WORKER_URL` is set.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flow_core::Error as QueueError;
use flow_core::queue::{CODE_CORRUPT_JOB, JobId, JobQueue, JobState, NewJob, QueueOptions};
use queue_redis::{RedisConfig, RedisQueue};
use serde_json::json;
use test_support::redis::{RedisServer, ServerConfig};
use tokio::time::{Instant, sleep};

/// Lease of the drain workers: short, so leases lost with a dropped reply come back soon.
const LEASE: Duration = Duration::from_secs(1);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn server(config: ServerConfig) -> RedisServer {
    RedisServer::start_with(config).unwrap_or_else(|e| panic!("{e}"))
}

/// Options that let a job survive several lost leases (each fault can cost one).
fn options() -> QueueOptions {
    QueueOptions {
        max_lease_expiries: 20,
        ..QueueOptions::default()
    }
}

async fn connect(url: &str, prefix: &str) -> Arc<RedisQueue> {
    let config = RedisConfig::from_url(url)
        .expect("valid URL")
        .key_prefix(prefix)
        .queue_options(options());
    Arc::new(RedisQueue::with_config(config).await.expect("connect"))
}

fn jobs(queue: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::new(queue, json!({ "n": i })).max_retries(10))
        .collect()
}

/// Successful completions per job, as the workers saw them.
#[derive(Default)]
struct Ledger(Mutex<HashMap<JobId, usize>>);

impl Ledger {
    fn record(&self, id: JobId) {
        *self.0.lock().expect("ledger").entry(id).or_insert(0) += 1;
    }

    fn twice(&self) -> Vec<(JobId, usize)> {
        self.0
            .lock()
            .expect("ledger")
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (*id, *n))
            .collect()
    }
}

/// A worker loop that tolerates errors: reap now and then, fetch, complete in a batch,
/// retry after a short pause whenever the backend fails.
async fn worker(
    q: Arc<RedisQueue>,
    queue: String,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicUsize>,
) {
    let mut last_reap = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if last_reap.elapsed() >= Duration::from_millis(250) {
            last_reap = Instant::now();
            if q.reap(&queue).await.is_err() {
                errors.fetch_add(1, Ordering::SeqCst);
            }
        }
        let jobs = match q.fetch(&queue, 10, LEASE, Duration::from_millis(200)).await {
            Ok(jobs) => jobs,
            Err(_) => {
                errors.fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let items = jobs
            .iter()
            .map(|j| (j.lease.clone(), json!({"attempt": j.attempt})))
            .collect();
        for (job, result) in jobs.iter().zip(q.complete_many(items).await) {
            match result {
                Ok(()) => ledger.record(job.id),
                // Reclaimed and leased again elsewhere: the other holder records it.
                Err(QueueError::LeaseLost { .. }) => {}
                // The reply was lost: the outcome may or may not be recorded; the final
                // check reads the job's state from Redis.
                Err(_) => {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

/// Drain workers running [`worker`] against one queue, and what they saw.
struct Drain {
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicUsize>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drain {
    /// Starts `n` workers on `queue`.
    fn start(n: usize, q: &Arc<RedisQueue>, queue: &str) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicUsize::new(0));
        let workers = (0..n)
            .map(|_| {
                tokio::spawn(worker(
                    q.clone(),
                    queue.to_owned(),
                    ledger.clone(),
                    stop.clone(),
                    errors.clone(),
                ))
            })
            .collect();
        Self {
            ledger,
            stop,
            errors,
            workers,
        }
    }

    /// Lets the workers run until every id in `ids` is completed (or `within` passes),
    /// stops them, then asserts: none lost, none completed twice. Returns the number of
    /// errors the workers saw and retried.
    async fn finish(
        self,
        q: &Arc<RedisQueue>,
        queue: &str,
        ids: &[JobId],
        within: Duration,
    ) -> usize {
        let deadline = Instant::now() + within;
        let mut pending: HashSet<JobId> = ids.iter().copied().collect();
        while !pending.is_empty() && Instant::now() < deadline {
            sleep(Duration::from_millis(200)).await;
            let mut still = HashSet::new();
            for id in &pending {
                match q.job(queue, *id).await {
                    Ok(Some(info)) if info.state == JobState::Completed => {}
                    _ => {
                        still.insert(*id);
                    }
                }
            }
            pending = still;
        }
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await.expect("worker panicked");
        }
        let mut lost = Vec::new();
        for id in ids {
            let info = q.job(queue, *id).await.expect("job()");
            match info {
                Some(info) if info.state == JobState::Completed => {}
                other => lost.push((*id, other.map(|i| i.state))),
            }
        }
        assert!(
            lost.is_empty(),
            "{} jobs lost or not completed: {lost:?}",
            lost.len()
        );
        let twice = self.ledger.twice();
        assert!(twice.is_empty(), "outcomes recorded twice: {twice:?}");
        let stats = q.stats(queue).await.expect("stats");
        assert_eq!(
            (stats.ready, stats.running, stats.dead),
            (0, 0, 0),
            "{stats:?}"
        );
        self.errors.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// A worker process killed with SIGKILL while holding leases.

/// Not a test on its own: the worker process of
/// [`worker_killed_with_sigkill_loses_nothing`]. Leases jobs with a short lease, says
/// how many on stdout, then hangs without heartbeating until it is killed.
#[test]
#[ignore = "helper process for worker_killed_with_sigkill_loses_nothing"]
fn fault_worker_process() {
    let (Ok(url), Ok(prefix), Ok(queue)) = (
        std::env::var("FAULT_WORKER_URL"),
        std::env::var("FAULT_WORKER_PREFIX"),
        std::env::var("FAULT_WORKER_QUEUE"),
    ) else {
        return;
    };
    runtime().block_on(async {
        let q = connect(&url, &prefix).await;
        let jobs = q
            .fetch(
                &queue,
                20,
                Duration::from_millis(1500),
                Duration::from_secs(5),
            )
            .await
            .expect("fetch");
        println!("LEASED {}", jobs.len());
        sleep(Duration::from_secs(600)).await;
    });
}

#[test]
fn worker_killed_with_sigkill_loses_nothing() {
    let server = server(ServerConfig::default());
    let prefix = "fault-sigkill";
    let queue = "jobs";
    runtime().block_on(async {
        let q = connect(&server.url(), prefix).await;
        let ids = q.enqueue_many(jobs(queue, 60)).await.expect("enqueue");

        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "fault_worker_process",
                "--nocapture",
            ])
            .env("FAULT_WORKER_URL", server.url())
            .env("FAULT_WORKER_PREFIX", prefix)
            .env("FAULT_WORKER_QUEUE", queue)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the worker process");
        let stdout = child.stdout.take().expect("worker stdout");
        let leased = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| line.strip_prefix("LEASED ").map(str::to_owned))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .await
        .expect("reader")
        .expect("the worker reports its leases");
        assert_eq!(leased, 20, "the worker leased a full batch");
        assert_eq!(q.stats(queue).await.expect("stats").running, 20);
        child.kill().expect("SIGKILL the worker");
        child.wait().expect("reap the worker process");

        // Nothing comes back before the leases expire...
        let report = q.reap(queue).await.expect("reap");
        assert_eq!(report.total(), 0, "live leases are not reclaimed");

        let errors = Drain::start(2, &q, queue)
            .finish(&q, queue, &ids, Duration::from_secs(30))
            .await;

        // ...and afterwards the killed worker's jobs ran again, as attempt 2.
        let mut second_attempts = 0;
        for id in &ids {
            let info = q.job(queue, *id).await.expect("job").expect("kept");
            if info.attempts == 2 {
                second_attempts += 1;
                assert_eq!(info.lease_expiries, 1, "{id}");
            }
        }
        assert_eq!(
            second_attempts, 20,
            "the 20 leased jobs came back once each"
        );
        assert_eq!(errors, 0);
    });
}

// ---------------------------------------------------------------------------------------
// CLIENT KILL of every connection mid-run.

#[test]
fn client_kill_mid_run_workers_reconnect_and_lose_nothing() {
    let server = server(ServerConfig::default());
    let queue = "jobs";
    runtime().block_on(async {
        let q = connect(&server.url(), "fault-client-kill").await;
        let mut ids = Vec::new();
        for chunk in 0..4 {
            ids.extend(
                q.enqueue_many(jobs(queue, 500))
                    .await
                    .unwrap_or_else(|e| panic!("enqueue chunk {chunk}: {e}")),
            );
        }
        let drain = Drain::start(4, &q, queue);

        // Kill every client connection three times while the workers drain.
        let mut killed = 0;
        for _ in 0..3 {
            sleep(Duration::from_millis(150)).await;
            let reply = server
                .command(&["CLIENT", "KILL", "TYPE", "normal"])
                .expect("CLIENT KILL");
            killed += reply
                .trim_start_matches(':')
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
        assert!(killed > 0, "CLIENT KILL found connections to kill");
        let errors = drain.finish(&q, queue, &ids, Duration::from_secs(60)).await;
        // The pools replaced their broken connections: plain calls work again.
        q.ping().await.expect("ping after the kills");
        eprintln!("client kill: {killed} connections killed, {errors} errors seen and retried");
    });
}

// ---------------------------------------------------------------------------------------
// Redis killed and restarted mid-run with appendonly yes, appendfsync always.

#[test]
fn redis_restarted_mid_run_with_aof_loses_no_acknowledged_job() {
    let mut server = Some(server(ServerConfig::durable()));
    let url = server.as_ref().map(RedisServer::url).expect("server");
    let queue = "jobs";
    let rt = runtime();
    rt.block_on(async {
        let q = connect(&url, "fault-restart").await;
        let drain = Drain::start(3, &q, queue);

        // A producer enqueueing one job at a time; only acknowledged ids count.
        let producing = Arc::new(AtomicBool::new(true));
        let acked: Arc<Mutex<Vec<JobId>>> = Arc::default();
        let producer = {
            let (q, producing, acked) = (q.clone(), producing.clone(), acked.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while producing.load(Ordering::SeqCst) {
                    match q
                        .enqueue(NewJob::new(queue, json!({ "n": n })).max_retries(10))
                        .await
                    {
                        Ok(id) => acked.lock().expect("acked").push(id),
                        Err(_) => sleep(Duration::from_millis(20)).await,
                    }
                    n += 1;
                }
            })
        };

        sleep(Duration::from_millis(700)).await;
        let mut taken = server.take().expect("server");
        let restarted = tokio::task::spawn_blocking(move || {
            taken.kill();
            std::thread::sleep(Duration::from_millis(300));
            taken.restart().map(|()| taken)
        })
        .await
        .expect("restart task");
        server = Some(restarted.unwrap_or_else(|e| panic!("restart: {e}")));
        sleep(Duration::from_millis(700)).await;
        producing.store(false, Ordering::SeqCst);
        producer.await.expect("producer");

        let ids = acked.lock().expect("acked").clone();
        assert!(ids.len() > 50, "the producer got work in: {}", ids.len());
        let errors = drain.finish(&q, queue, &ids, Duration::from_secs(60)).await;
        eprintln!(
            "restart: {} acknowledged jobs, all completed once; {errors} errors seen and retried",
            ids.len()
        );
    });
    drop(server);
}

// ---------------------------------------------------------------------------------------
// Malformed records written straight into Redis.

#[test]
fn malformed_records_are_dead_lettered_and_fetch_goes_on() {
    let server = server(ServerConfig::default());
    let prefix = "fault-corrupt";
    let queue = "jobs";
    let base = format!("{{{prefix}:{queue}}}");
    runtime().block_on(async {
        let q = connect(&server.url(), prefix).await;
        let before = q
            .enqueue(NewJob::new(queue, json!("good-1")))
            .await
            .expect("enqueue");

        // Records in the layout of the `job` field, and in the layout of one field per
        // value that records written before it have (still read).
        let bad_json = uuid::Uuid::now_v7();
        let missing = uuid::Uuid::now_v7();
        let bad_headers = uuid::Uuid::now_v7();
        let packed_bad_json = uuid::Uuid::now_v7();
        let packed_bad_number = uuid::Uuid::now_v7();
        let packed_bad_headers = uuid::Uuid::now_v7();
        let legacy_good = uuid::Uuid::now_v7();
        let wrong_type = uuid::Uuid::now_v7();
        let orphan = uuid::Uuid::now_v7();
        let client = redis::Client::open(server.url()).expect("client");
        let mut raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        let complete_fields = |payload: &str, headers: &str| {
            vec![
                ("state", "ready".to_owned()),
                ("payload", payload.to_owned()),
                ("tenant", "acme".to_owned()),
                ("priority", "0".to_owned()),
                ("max_retries", "3".to_owned()),
                ("attempts", "0".to_owned()),
                ("lease_expiries", "0".to_owned()),
                ("cancel_requested", "0".to_owned()),
                ("created_at_ms", "1700000000000".to_owned()),
                ("run_at_ms", "1700000000000".to_owned()),
                ("headers", headers.to_owned()),
            ]
        };
        let records: Vec<(uuid::Uuid, Vec<(&str, String)>)> = vec![
            (bad_json, complete_fields("{not json", "{}")),
            (
                missing,
                vec![("state", "ready".to_owned()), ("priority", "0".to_owned())],
            ),
            (bad_headers, complete_fields("{\"ok\":true}", "[1,2]")),
            (
                packed_bad_json,
                vec![
                    ("state", "ready".to_owned()),
                    ("job", "1700000000000,0,3,[\"acme\",{},{not json".to_owned()),
                ],
            ),
            (
                packed_bad_number,
                vec![
                    ("state", "ready".to_owned()),
                    ("job", "1700000000000,high,3,[\"acme\",{},1]".to_owned()),
                ],
            ),
            (
                packed_bad_headers,
                vec![
                    ("state", "ready".to_owned()),
                    ("job", "1700000000000,0,3,[\"acme\",[1,2],1]".to_owned()),
                ],
            ),
            (legacy_good, complete_fields("{\"legacy\":true}", "{}")),
        ];
        for (id, fields) in &records {
            let key = format!("{base}:job:{id}");
            let _: () = redis::cmd("HSET")
                .arg(&key)
                .arg(fields.as_slice())
                .query_async(&mut raw)
                .await
                .expect("HSET");
        }
        let _: () = redis::cmd("SET")
            .arg(format!("{base}:job:{wrong_type}"))
            .arg("not a hash")
            .query_async(&mut raw)
            .await
            .expect("SET");
        // Into the ready line, the way the layout says: score = priority, member =
        // 16-digit sequence number then id.
        let ids = records
            .iter()
            .map(|(id, _)| *id)
            .chain([wrong_type, orphan]);
        for (seq, id) in (1_000_001u64..).zip(ids) {
            let _: () = redis::cmd("ZADD")
                .arg(format!("{base}:ready"))
                .arg(0)
                .arg(format!("{seq:016}{id}"))
                .query_async(&mut raw)
                .await
                .expect("ZADD");
        }
        let after = q
            .enqueue(NewJob::new(queue, json!("good-2")))
            .await
            .expect("enqueue");

        // One fetch wide enough for everything: the good jobs come out, the rest is set
        // aside; nothing errors.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 3 && Instant::now() < deadline {
            let jobs = q
                .fetch(
                    queue,
                    10,
                    Duration::from_secs(60),
                    Duration::from_millis(500),
                )
                .await
                .expect("fetch goes on past corrupt records");
            got.extend(jobs.into_iter().map(|j| j.id));
        }
        got.sort_unstable();
        let mut good = vec![before, after, legacy_good];
        good.sort_unstable();
        assert_eq!(
            got, good,
            "the good jobs are handed out, one in the older layout too"
        );

        let letters = q.dead_letters(queue, 0, 10).await.expect("dead_letters");
        let dead: HashMap<JobId, _> = letters.iter().map(|d| (d.id, d)).collect();
        for (id, what) in [
            (bad_json, "payload is not valid JSON"),
            (missing, "payload is missing"),
            (bad_headers, "headers are not a JSON object"),
            (
                packed_bad_json,
                "[tenant, headers, payload] is not valid JSON",
            ),
            (packed_bad_number, "the priority is missing or not a number"),
            (
                packed_bad_headers,
                "the headers are not a JSON object of strings",
            ),
            (wrong_type, "not a hash"),
        ] {
            let letter = dead
                .get(&id)
                .unwrap_or_else(|| panic!("{id} ({what}) is in the dead-letter set"));
            assert_eq!(letter.error.code, CODE_CORRUPT_JOB, "{what}");
            assert!(
                letter.error.message.contains(what),
                "the message says what is wrong ({what}): {}",
                letter.error.message
            );
            let info = q.job(queue, id).await.expect("job").expect("kept");
            assert_eq!(info.state, JobState::Dead);
        }
        assert!(
            !dead.contains_key(&orphan),
            "an orphan index entry has nothing to keep"
        );
        assert_eq!(letters.len(), 7);
        // The corrupt payload is kept (as text) for whoever inspects the dead letters.
        assert_eq!(dead[&bad_json].payload, json!("{not json"));
        assert_eq!(
            dead[&packed_bad_json].payload,
            json!("1700000000000,0,3,[\"acme\",{},{not json")
        );
        // The value of the wrong-type key is kept aside, not lost.
        let kept: String = redis::cmd("GET")
            .arg(format!("{base}:corrupt:{wrong_type}"))
            .query_async(&mut raw)
            .await
            .expect("GET");
        assert_eq!(kept, "not a hash");

        let stats = q.stats(queue).await.expect("stats");
        assert_eq!(
            (stats.ready, stats.running, stats.dead),
            (0, 3, 7),
            "{stats:?}"
        );
        // Requeueing a corrupt letter sends it back to the dead-letter set, not a worker.
        q.requeue_dead(queue, bad_json).await.expect("requeue");
        let again = q
            .fetch(queue, 10, Duration::from_secs(60), Duration::ZERO)
            .await
            .expect("fetch");
        assert!(again.is_empty());
        assert_eq!(
            q.job(queue, bad_json).await.expect("job").map(|i| i.state),
            Some(JobState::Dead)
        );
    });
}

// ---------------------------------------------------------------------------------------
// The script cache flushed under a running queue.

#[test]
fn scripts_are_loaded_again_after_script_flush() {
    let server = server(ServerConfig::default());
    runtime().block_on(async {
        let q = connect(&server.url(), "fault-flush").await;
        let id = q
            .enqueue(NewJob::new("jobs", json!(1)))
            .await
            .expect("enqueue");
        let reply = server.command(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
        assert!(reply.starts_with("+OK"), "{reply}");
        // Every script is gone; the next calls get NOSCRIPT, load them and go on.
        let jobs = q
            .fetch("jobs", 1, Duration::from_secs(30), Duration::from_secs(1))
            .await
            .expect("fetch after SCRIPT FLUSH");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, id);
        q.complete(&jobs[0].lease, json!("ok"))
            .await
            .expect("complete");
        assert_eq!(q.stats("jobs").await.expect("stats").completed, 1);
    });
}
