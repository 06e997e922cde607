//! The connection pool and the queue's own connections: pools too small to leave callers
//! a connection are refused; in small pools `pool()` and `enqueue_in_tx` callers get a
//! connection while workers fetch; the connections the queue keeps between statements
//! follow the pool's `max_lifetime` and `idle_timeout`.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{builder, connect, fresh_queue_name, fresh_schema, shared_url};
use flow_core::queue::{JobQueue, NewJob, QueueOptions};
use queue_postgres::{Error, MIN_MAX_CONNECTIONS, PgQueue};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

fn assert_names_max_connections(result: Result<PgQueue, Error>, what: &str) {
    match result {
        Err(e @ Error::Config(_)) => {
            let text = e.to_string();
            assert!(
                text.contains("max_connections") && text.contains("at least 2"),
                "{what}: {text}"
            );
        }
        Err(other) => panic!("{what}: expected a configuration error, got {other}"),
        Ok(_) => panic!("{what}: a pool too small was accepted"),
    }
}

/// Pools of 0 or 1 connection cannot serve the queue and its callers: the builder
/// refuses them before connecting (here to an address nothing listens on), and so do
/// `build_with_pool` and `from_pool`, with an error naming `max_connections`.
#[tokio::test]
async fn pools_too_small_are_refused_naming_max_connections() {
    assert_eq!(MIN_MAX_CONNECTIONS, 2);
    for n in [0, 1] {
        let result = PgQueue::builder("postgres://app:secret@127.0.0.1:1/none")
            .max_connections(n)
            .connect()
            .await;
        assert_names_max_connections(result, &format!("connect with {n}"));
    }
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy(&shared_url())
        .expect("lazy pool");
    assert_names_max_connections(
        PgQueue::builder(shared_url()).build_with_pool(one.clone()),
        "build_with_pool",
    );
    assert_names_max_connections(
        PgQueue::from_pool(one, QueueOptions::default()),
        "from_pool",
    );
    let two = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&shared_url())
        .expect("lazy pool");
    assert!(PgQueue::from_pool(two, QueueOptions::default()).is_ok());
}

/// Workers fetching, enqueueing and completing as fast as they can on pools of 2 and 3
/// connections: a caller still gets a connection from `pool()` for its own transaction
/// with `enqueue_in_tx` every time (within the acquire timeout), and the workers keep
/// going while the caller holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_pools_leave_callers_a_connection_while_workers_fetch() {
    for size in 2..=3 {
        let q = connect(
            builder(&shared_url(), &fresh_schema())
                .max_connections(size)
                .acquire_timeout(Duration::from_secs(3)),
        )
        .await;
        let queue = fresh_queue_name("small-pool");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (q, queue, stop, done) = (q.clone(), queue.clone(), stop.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    q.enqueue(NewJob::new(&queue, json!({"worker": true})))
                        .await
                        .map_err(|e| format!("worker enqueue: {e}"))?;
                    let jobs = q
                        .fetch(&queue, 2, LONG, Duration::from_millis(20))
                        .await
                        .map_err(|e| format!("worker fetch: {e}"))?;
                    for job in jobs {
                        q.complete(&job.lease, json!("ok"))
                            .await
                            .map_err(|e| format!("worker complete: {e}"))?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<(), String>(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ids = Vec::new();
        for i in 0..8 {
            let started = Instant::now();
            let mut tx =
                q.pool().begin().await.unwrap_or_else(|e| {
                    panic!("pool of {size}: caller {i} got no connection: {e}")
                });
            let id = q
                .enqueue_in_tx(&mut tx, NewJob::new(&queue, json!({"caller": i})))
                .await
                .unwrap_or_else(|e| panic!("pool of {size}: enqueue_in_tx {i}: {e}"));
            // Held while the workers go on.
            let before = done.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.commit().await.expect("commit");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "pool of {size}: caller {i} waited {:?}",
                started.elapsed()
            );
            ids.push((id, done.load(Ordering::Relaxed) - before));
        }
        let mut conn = q.pool().acquire().await.expect("a plain acquire");
        sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .expect("caller statement");
        drop(conn);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await
                .expect("worker task")
                .unwrap_or_else(|e| panic!("pool of {size}: {e}"));
        }
        assert!(
            done.load(Ordering::Relaxed) > ids.len(),
            "pool of {size}: workers completed only {} jobs",
            done.load(Ordering::Relaxed)
        );
        assert!(
            ids.iter().any(|(_, progress)| *progress > 0),
            "pool of {size}: the workers stood still while a caller held its connection"
        );
        for (id, _) in &ids {
            assert!(
                q.job(&queue, *id).await.expect("job").is_some(),
                "pool of {size}: the caller's job {id} is missing"
            );
        }
    }
}

/// A pool whose connections all carry `app` as their `application_name`.
async fn named_pool(app: &str, options: PgPoolOptions) -> PgPool {
    let connect = PgConnectOptions::from_str(&shared_url())
        .expect("url")
        .application_name(app);
    options
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(connect)
        .await
        .expect("pool")
}

/// The server's backends of `app`: (pid, age in milliseconds).
async fn backends(observer: &PgPool, app: &str) -> Vec<(i32, f64)> {
    sqlx::query_as(
        "SELECT pid, (extract(epoch FROM clock_timestamp() - backend_start) * 1000)::float8
         FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(app)
    .fetch_all(observer)
    .await
    .expect("pg_stat_activity")
}

fn app_name(test: &str) -> String {
    format!("{test}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// With `max_lifetime` = 1 s and workers busy for 5 s, no connection of the queue's
/// pool, the ones the queue keeps between statements included, lives much longer than
/// its lifetime: the connections in use are replaced by new backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_connections_are_replaced_after_max_lifetime() {
    let app = app_name("lifetime");
    let pool = named_pool(
        &app,
        PgPoolOptions::new()
            .max_connections(4)
            .max_lifetime(Duration::from_secs(1))
            .idle_timeout(None),
    )
    .await;
    let q = PgQueue::builder(shared_url())
        .schema(fresh_schema())
        .poll_only(true)
        .build_with_pool(pool)
        .expect("queue");
    q.migrate().await.expect("migrate");
    let observer = PgPoolOptions::new()
        .max_connections(1)
        .connect(&shared_url())
        .await
        .expect("observer");
    let queue = fresh_queue_name("lifetime");
    let until = Instant::now() + Duration::from_secs(5);
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (q, queue) = (q.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                q.enqueue(NewJob::new(&queue, json!(1)))
                    .await
                    .expect("enqueue");
                for job in q
                    .fetch(&queue, 1, LONG, Duration::ZERO)
                    .await
                    .expect("fetch")
                {
                    q.complete(&job.lease, json!(1)).await.expect("complete");
                }
            }
        }));
    }
    let mut oldest_ms: f64 = 0.0;
    let mut first_pids = Vec::new();
    let mut last_pids = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = backends(&observer, &app).await;
        if first_pids.is_empty() {
            first_pids = seen.iter().map(|(pid, _)| *pid).collect();
        }
        last_pids = seen.iter().map(|(pid, _)| *pid).collect();
        oldest_ms = seen.iter().map(|(_, age)| *age).fold(oldest_ms, f64::max);
    }
    for w in workers {
        w.await.expect("worker");
    }
    assert!(!first_pids.is_empty(), "the queue used no connection");
    assert!(
        first_pids.iter().all(|pid| !last_pids.contains(pid)),
        "connections outlived max_lifetime: {first_pids:?} still in {last_pids:?}"
    );
    // Lifetime 1 s, checked every quarter of it in the queue and every second in the
    // pool: well under 3 s (the test ran 5 s).
    assert!(
        oldest_ms < 3_000.0,
        "a connection lived {oldest_ms:.0} ms with max_lifetime 1 s"
    );
}

/// With `idle_timeout` = 500 ms, the connections the queue took for a burst of work are
/// closed once it goes quiet, without any further call on the queue; afterwards it
/// works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_connections_are_closed_after_idle_timeout() {
    let app = app_name("idle");
    let pool = named_pool(
        &app,
        PgPoolOptions::new()
            .max_connections(4)
            .idle_timeout(Duration::from_millis(500))
            .max_lifetime(None),
    )
    .await;
    let q = PgQueue::builder(shared_url())
        .schema(fresh_schema())
        .poll_only(true)
        .build_with_pool(pool)
        .expect("queue");
    q.migrate().await.expect("migrate");
    let observer = PgPoolOptions::new()
        .max_connections(1)
        .connect(&shared_url())
        .await
        .expect("observer");
    let queue = fresh_queue_name("idle");
    let mut burst = Vec::new();
    for _ in 0..6 {
        let (q, queue) = (q.clone(), queue.clone());
        burst.push(tokio::spawn(async move {
            for _ in 0..20 {
                q.enqueue(NewJob::new(&queue, json!(1)))
                    .await
                    .expect("enqueue");
            }
        }));
    }
    for b in burst {
        b.await.expect("burst");
    }
    assert!(
        !backends(&observer, &app).await.is_empty(),
        "the burst used no connection"
    );
    // Quiet: no call on the queue from here on.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = backends(&observer, &app).await;
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = backends(&observer, &app).await;
    }
    assert!(
        left.is_empty(),
        "connections idle for 5 s with idle_timeout 500 ms: {left:?}"
    );
    q.enqueue(NewJob::new(&queue, json!(2)))
        .await
        .expect("enqueue after the idle time");
    let jobs = q
        .fetch(&queue, 200, LONG, Duration::ZERO)
        .await
        .expect("fetch after the idle time");
    assert_eq!(jobs.len(), 121);
}
