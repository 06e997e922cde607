//! PostgreSQL-specific behaviour beyond the conformance suite: migrations, transactional
//! enqueue, wake-ups, dedupe races, large batches, schema isolation, TLS and secrets.

mod common;

use std::time::Duration;

use common::{builder, connect, fresh, fresh_queue_name, fresh_schema, shared_url};
use flow_core::queue::{JobQueue, JobState, NewJob, QueueOptions};
use queue_postgres::{ENQUEUE_CHUNK, PgQueue};
use serde_json::json;
use sqlx::Row;
use sqlx::postgres::PgListener;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// Four workers migrating the same fresh schema at once: one applies, the others wait on
/// the advisory lock and find it done; running it again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_are_safe_and_idempotent() {
    let url = shared_url();
    let schema = fresh_schema();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let b = builder(&url, &schema);
        tasks.push(tokio::spawn(async move {
            let q = b.connect().await.expect("connect");
            q.migrate().await.expect("concurrent migrate");
            q
        }));
    }
    let mut queues = Vec::new();
    for t in tasks {
        queues.push(t.await.expect("task"));
    }
    let q = &queues[0];
    q.migrate().await.expect("migrating again is a no-op");
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\"._sqlx_migrations WHERE success"
    )))
    .fetch_one(q.pool())
    .await
    .expect("migrations table");
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations directory")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(
        applied,
        i64::try_from(shipped).expect("count"),
        "each migration applied once"
    );
    let queue = fresh_queue_name("migrated");
    let id = q
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    let jobs = queues[3]
        .fetch(&queue, 1, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(jobs[0].id, id);
}

/// A job enqueued in a transaction exists iff the transaction commits, and its wake-up
/// is delivered only on commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_in_tx_commits_or_vanishes_with_the_transaction() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("tx");
    let mut listener = PgListener::connect(&shared_url()).await.expect("listener");
    listener.listen(q.channel()).await.expect("listen");

    // Rolled back: no job, no notification.
    let mut tx = q.pool().begin().await.expect("begin");
    let rolled_back = q
        .enqueue_in_tx(&mut tx, NewJob::new(&queue, json!({"n": 1})))
        .await
        .expect("enqueue in tx");
    sqlx::query("SELECT 1")
        .execute(&mut *tx)
        .await
        .expect("more work");
    tx.rollback().await.expect("rollback");
    assert_eq!(q.job(&queue, rolled_back).await.expect("job"), None);
    assert!(
        q.fetch(&queue, 10, LONG, Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    let leaked = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(
        leaked.is_err(),
        "a rolled-back enqueue sent a wake-up: {leaked:?}"
    );

    // Committed: visible after commit (not before, to others), fetchable, notified.
    let mut tx = q.pool().begin().await.expect("begin");
    let committed = q
        .enqueue_many_in_tx(
            &mut tx,
            vec![
                NewJob::new(&queue, json!({"n": 2})),
                NewJob::new(&queue, json!({"n": 3})),
            ],
        )
        .await
        .expect("enqueue in tx");
    assert_eq!(
        q.job(&queue, committed[0]).await.expect("job"),
        None,
        "not visible to others before commit"
    );
    tx.commit().await.expect("commit");
    let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a wake-up after commit")
        .expect("notification");
    assert_eq!(note.payload(), queue);
    let jobs = q
        .fetch(&queue, 10, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), committed);
}

/// A fetch waiting in one process wakes within milliseconds when another process
/// enqueues (LISTEN/NOTIFY), even with a poll interval far longer than the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_waiting_fetch_in_another_process() {
    let url = shared_url();
    let schema = fresh_schema();
    let worker = connect(builder(&url, &schema).poll_interval(Duration::from_secs(60))).await;
    let producer = connect(builder(&url, &schema)).await;
    let queue = fresh_queue_name("wake");
    // Let the worker's LISTEN connection come up.
    let waiter = {
        let (w, queue) = (worker.clone(), queue.clone());
        tokio::spawn(async move { w.fetch(&queue, 1, LONG, Duration::from_secs(20)).await })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while !worker.is_listening() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(worker.is_listening(), "the LISTEN connection came up");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let id = producer
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    let jobs = waiter.await.expect("task").expect("fetch");
    let took = start.elapsed();
    assert_eq!(jobs[0].id, id);
    assert!(took < Duration::from_secs(2), "woke after {took:?}");
}

/// In poll-only mode (PgBouncer transaction pooling) a waiting fetch still finds work
/// from another process, within its poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_mode_finds_work_by_polling() {
    let url = shared_url();
    let schema = fresh_schema();
    let worker = connect(
        builder(&url, &schema)
            .poll_only(true)
            .poll_interval(Duration::from_millis(100))
            .statement_cache_capacity(0),
    )
    .await;
    let producer = connect(builder(&url, &schema)).await;
    let queue = fresh_queue_name("poll");
    let waiter = {
        let (w, queue) = (worker.clone(), queue.clone());
        tokio::spawn(async move { w.fetch(&queue, 1, LONG, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let id = producer
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    let jobs = waiter.await.expect("task").expect("fetch");
    assert_eq!(jobs[0].id, id);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(!worker.is_listening(), "poll-only never listens");
}

/// Many producers racing with the same dedupe key create exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_dedupe_keys_make_one_job() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("dedupe-race");
    let mut tasks = Vec::new();
    for n in 0..16 {
        let (q, queue) = (q.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            q.enqueue(NewJob::new(&queue, json!(n)).dedupe_key("same"))
                .await
                .expect("enqueue")
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one job for one live key: {ids:?}");
    assert_eq!(q.stats(&queue).await.expect("stats").ready, 1);
}

/// A batch larger than one statement is still all or nothing, and keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_span_statements_in_one_transaction() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("large");
    let n = ENQUEUE_CHUNK * 2 + 17;
    let mut jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new(&queue, json!({ "n": i })))
        .collect();
    jobs.push(NewJob::new("bad name", json!(0)));
    assert!(
        q.enqueue_many(jobs).await.is_err(),
        "one bad job refuses the batch"
    );
    assert_eq!(q.stats(&queue).await.expect("stats").ready, 0);

    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new(&queue, json!({ "n": i })))
        .collect();
    let ids = q.enqueue_many(jobs).await.expect("enqueue_many");
    assert_eq!(ids.len(), n);
    assert_eq!(q.stats(&queue).await.expect("stats").ready, n as u64);
    let first = q
        .fetch(&queue, 3, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(
        first.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids[..3].to_vec(),
        "FIFO across statements"
    );
    let last = q
        .job(&queue, ids[n - 1])
        .await
        .expect("job")
        .expect("stored");
    assert_eq!(last.payload, json!({ "n": n - 1 }));
}

/// Two schemas in one database are two independent queue systems.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_isolated() {
    let a = fresh(QueueOptions::default()).await;
    let b = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("iso");
    let id = a
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    assert_eq!(b.job(&queue, id).await.expect("job"), None);
    assert_eq!(b.stats(&queue).await.expect("stats").ready, 0);
    assert_eq!(a.stats(&queue).await.expect("stats").ready, 1);
}

/// A fetch dropped while its statement runs hands its jobs back without counting the
/// attempt, so nothing waits for a lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_fetch_hands_jobs_back() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("dropped");
    let ids = q
        .enqueue_many((0..200).map(|i| NewJob::new(&queue, json!(i))).collect())
        .await
        .expect("enqueue");
    // Drop fetches at many points, including while their statement is in flight.
    let mut dropped = 0;
    for i in 0..200u64 {
        let cut = Duration::from_micros(50 + (i * 37) % 2000);
        if let Ok(answer) =
            tokio::time::timeout(cut, q.fetch(&queue, 4, LONG, Duration::ZERO)).await
        {
            // Not dropped in time: hand the jobs back ourselves.
            for job in answer.expect("fetch") {
                q.release(&job.lease).await.expect("release");
            }
        } else {
            dropped += 1;
        }
    }
    assert!(dropped > 0, "some fetches were dropped");
    // Every job is ready again (or was never taken) once the hand-backs finished.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = q.stats(&queue).await.expect("stats");
        if stats.running == 0 {
            assert_eq!(stats.ready, 200, "{stats:?}");
            break;
        }
        assert!(Instant::now() < until, "leases still held: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        let info = q.job(&queue, *id).await.expect("job").expect("kept");
        assert_eq!((info.state, info.attempts), (JobState::Ready, 0), "{id}");
    }
}

/// Stats, fetch and reap stay index-driven with many finished rows present: the
/// partial indexes hold only live (and dead) rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_rows_stay_out_of_the_hot_indexes() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("finished");
    let schema = q.schema().to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".jobs (id, queue, state, priority, run_at_ms, ready_since_ms,
             created_at_ms, finished_at_ms, max_retries, tenant, payload, result)
         SELECT gen_random_uuid(), $1, 3, 0, 0, 0, 0,
                (extract(epoch FROM now()) * 1000)::bigint, 3, 'default', '{{}}', 'null'
         FROM generate_series(1, 50000)"
    )))
    .bind(&queue)
    .execute(q.pool())
    .await
    .expect("insert finished rows");
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{schema}\".jobs")))
        .execute(q.pool())
        .await
        .expect("analyze");
    let id = q
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    let start = Instant::now();
    for _ in 0..20 {
        q.stats(&queue).await.expect("stats");
    }
    let per_stats = start.elapsed() / 20;
    let jobs = q
        .fetch(&queue, 1, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(jobs[0].id, id);
    let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT id FROM \"{schema}\".jobs WHERE queue = 'x' AND state = 0
         ORDER BY priority, seq LIMIT 10"
    )))
    .fetch_all(q.pool())
    .await
    .expect("explain")
    .iter()
    .map(|r| r.try_get::<String, _>(0).expect("plan line"))
    .collect();
    assert!(
        plan.iter().any(|l| l.contains("jobs_ready")),
        "the ready scan uses the partial index: {plan:#?}"
    );
    // Generous: a count over 50k rows would take tens of milliseconds on its own.
    assert!(
        per_stats < Duration::from_millis(50),
        "stats took {per_stats:?}"
    );
}

/// A connection error for a URL with a password never shows the password.
#[tokio::test]
async fn connection_errors_never_show_the_password() {
    let port = test_support::common::free_port().expect("port");
    let url = format!("postgres://app:hunter2-s3cret@127.0.0.1:{port}/db?sslmode=disable");
    let err = PgQueue::builder(&url)
        .acquire_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("nothing listens there");
    let shown = format!("{err} / {err:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("127.0.0.1"), "says where: {shown}");
    assert!(
        err.is_transient(),
        "refused connections are transient: {shown}"
    );
    let core: flow_core::Error = err.into();
    let shown = format!("{core} / {core:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(matches!(core, flow_core::Error::Unavailable(_)), "{shown}");

    let builder = PgQueue::builder(format!("postgres://app:hunter2-s3cret@127.0.0.1:{port}/db"));
    assert!(!format!("{builder:?}").contains("hunter2"));
}

/// `sslmode=require` works against a server with TLS on (rustls); the session is
/// encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sslmode_require() {
    let server = common::start_server(test_support::postgres::PgServer::builder().tls());
    let url = format!("{}?sslmode=require", server.url());
    let q = connect(builder(&url, &fresh_schema())).await;
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(q.pool())
            .await
            .expect("pg_stat_ssl");
    assert!(encrypted, "the connection uses TLS");
    let queue = fresh_queue_name("tls");
    let id = q
        .enqueue(NewJob::new(&queue, json!(1)))
        .await
        .expect("enqueue");
    let jobs = q
        .fetch(&queue, 1, LONG, Duration::from_secs(2))
        .await
        .expect("fetch");
    assert_eq!(jobs[0].id, id);
}

/// Bulk batches go in by COPY: awkward text (tabs, newlines, backslashes, quotes,
/// unicode) in tenants, payloads and headers comes back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_enqueue_keeps_awkward_text_intact() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("awkward");
    let tenant = "t\tab\\x\nnl\r;\"q\"";
    let payload = |i: usize| {
        json!({
            "i": i,
            "text": "back\\slash \\N tab\t nl\n quote\" é ✓ \u{1F600}",
            "nested": {"k\tey": ["\\", "\\\\", "\\t"]},
        })
    };
    let jobs: Vec<NewJob> = (0..40)
        .map(|i| {
            NewJob::new(&queue, payload(i))
                .tenant(tenant)
                .priority(i as i32 % 3)
                .header("trace\tparent", "a\\b\nc")
        })
        .collect();
    let ids = q.enqueue_many(jobs).await.expect("bulk enqueue");
    for (i, id) in ids.iter().enumerate() {
        let info = q.job(&queue, *id).await.expect("job").expect("stored");
        assert_eq!(info.payload, payload(i));
        assert_eq!(info.tenant, tenant);
        assert_eq!(info.priority, i as i32 % 3);
        assert_eq!(
            info.headers.get("trace\tparent").map(String::as_str),
            Some("a\\b\nc")
        );
        assert_eq!(info.state, JobState::Ready);
    }
    let leased = q
        .fetch(&queue, 40, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(leased.len(), 40);
    assert!(
        leased
            .windows(2)
            .all(|w| (w[0].priority, w[0].enqueued_at_ms) <= (w[1].priority, w[1].enqueued_at_ms)),
        "priority order"
    );
}

/// While a backlog keeps fetches on their fast path, a due scheduled job of higher
/// priority still comes out soon after its time (a full fetch runs at least every
/// 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_jobs_are_not_starved_by_a_backlog() {
    let q = fresh(QueueOptions::default()).await;
    let queue = fresh_queue_name("starve");
    q.enqueue_many(
        (0..3000)
            .map(|i| NewJob::new(&queue, json!(i)).priority(5))
            .collect(),
    )
    .await
    .expect("backlog");
    let delay = Duration::from_millis(300);
    let start = Instant::now();
    let urgent = q
        .enqueue(NewJob::new(&queue, json!("urgent")).delay(delay))
        .await
        .expect("enqueue");
    let mut fetched_before = 0;
    loop {
        let jobs = q
            .fetch(&queue, 1, LONG, Duration::ZERO)
            .await
            .expect("fetch");
        assert!(
            !jobs.is_empty(),
            "the backlog ran out before the urgent job came"
        );
        if jobs[0].id == urgent {
            break;
        }
        fetched_before += 1;
        q.complete(&jobs[0].lease, json!(null))
            .await
            .expect("complete");
    }
    let took = start.elapsed();
    assert!(took >= delay - Duration::from_millis(50), "early: {took:?}");
    assert!(
        took < delay + Duration::from_secs(1),
        "the due job waited {took:?} behind the backlog ({fetched_before} fetched first)"
    );
}
