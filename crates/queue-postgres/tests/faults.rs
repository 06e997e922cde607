//! Fault tests, each against a throwaway PostgreSQL server of its own. Every test
//! counts completions per job and asserts zero jobs lost and zero outcomes recorded
//! twice:
//!
//! * a worker process killed with SIGKILL while holding leases;
//! * `pg_terminate_backend` on every worker connection mid-run (workers and their LISTEN
//!   connections reconnect by themselves);
//! * a fast shutdown and restart of the server mid-run;
//! * a crash (SIGKILL of the postmaster) and recovery of a durable server mid-run;
//! * stored rows that do not decode: dead-lettered with `CORRUPT_JOB`, the fetch goes on.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    Ledger, assert_each_completed_once, builder, connect, drain, drain_into, fresh_schema,
    start_server, wait_for_progress,
};
use flow_core::queue::{CODE_CORRUPT_JOB, JobId, JobQueue, JobState, NewJob};
use serde_json::json;
use test_support::postgres::PgServer;
use tokio::time::Instant;

/// Environment of the helper worker process.
const ENV_URL: &str = "PGQ_FAULT_URL";
const ENV_SCHEMA: &str = "PGQ_FAULT_SCHEMA";
const ENV_QUEUE: &str = "PGQ_FAULT_QUEUE";
/// Jobs the helper leases before it hangs.
const HELD: usize = 20;

/// Not a test on its own: the worker process of
/// [`sigkill_of_a_worker_holding_leases_loses_nothing`]. It leases jobs, says so on
/// stdout, and hangs until it is killed. Does nothing when run without its environment.
#[test]
#[ignore = "helper process of sigkill_of_a_worker_holding_leases_loses_nothing"]
fn helper_worker_that_leases_then_hangs() {
    let (Ok(url), Ok(schema), Ok(queue)) = (
        std::env::var(ENV_URL),
        std::env::var(ENV_SCHEMA),
        std::env::var(ENV_QUEUE),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let q = builder(&url, &schema).connect().await.expect("connect");
        let mut held = Vec::new();
        while held.len() < HELD {
            let jobs = q
                .fetch(
                    &queue,
                    HELD - held.len(),
                    Duration::from_secs(2),
                    Duration::from_secs(5),
                )
                .await
                .expect("fetch");
            held.extend(jobs);
        }
        println!("LEASED {}", held.len());
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
}

/// A worker process is killed with SIGKILL while it holds leases: the jobs come back
/// when the leases expire and are completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_worker_holding_leases_loses_nothing() {
    let server = start_server(PgServer::builder());
    let url = server.url();
    let schema = fresh_schema();
    let q = connect(builder(&url, &schema)).await;
    let queue = "sigkill";
    let ids = q
        .enqueue_many(
            (0..100)
                .map(|n| NewJob::new(queue, json!({ "n": n })))
                .collect(),
        )
        .await
        .expect("enqueue");

    let exe = std::env::current_exe().expect("current test binary");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "helper_worker_that_leases_then_hangs",
            "--nocapture",
        ])
        .env(ENV_URL, &url)
        .env(ENV_SCHEMA, &schema)
        .env(ENV_QUEUE, queue)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the helper worker");
    let stdout = child.stdout.take().expect("stdout");
    let leased = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("LEASED"))
    });
    let line = tokio::time::timeout(Duration::from_secs(60), leased)
        .await
        .expect("the helper leased its jobs in time")
        .expect("reader");
    assert_eq!(line.as_deref(), Some(format!("LEASED {HELD}").as_str()));
    assert_eq!(q.stats(queue).await.expect("stats").running, HELD as u64);
    child.kill().expect("SIGKILL the helper");
    child.wait().expect("reap the helper");

    let ledger = drain(
        std::slice::from_ref(&q),
        queue,
        4,
        ids.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_each_completed_once(&q, queue, &ids, &ledger).await;
    let mut retried = 0;
    for id in &ids {
        let info = q.job(queue, *id).await.expect("job").expect("kept");
        if info.attempts == 2 {
            assert_eq!(info.lease_expiries, 1, "{id}");
            retried += 1;
        }
    }
    assert_eq!(
        retried, HELD,
        "the killed worker's jobs ran a second attempt"
    );
}

/// Every worker connection (pool and LISTEN) is terminated by the server, three times,
/// while workers drain: they reconnect by themselves and finish, and the LISTEN
/// connection comes back (a waiting fetch is woken by NOTIFY again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_reconnect_and_lose_nothing() {
    let server = start_server(PgServer::builder());
    let url = server.create_database("faults").expect("database");
    let schema = fresh_schema();
    let long_poll = |b: queue_postgres::PgQueueBuilder| b.poll_interval(Duration::from_secs(60));
    let a = connect(long_poll(builder(&url, &schema))).await;
    let b = connect(long_poll(builder(&url, &schema))).await;
    let queue = "terminate";
    let ids = a
        .enqueue_many(
            (0..3000)
                .map(|n| NewJob::new(queue, json!({ "n": n })))
                .collect(),
        )
        .await
        .expect("enqueue");

    let ledger = Ledger::default();
    let kills = {
        let server_url = server.url();
        let ledger = ledger.clone();
        let total = ids.len();
        tokio::spawn(async move {
            let admin = sqlx::PgPool::connect(&server_url).await.expect("admin");
            let mut killed = 0i64;
            for step in 1..=3 {
                // Mid-run: at 20 %, 40 % and 60 % of the drain.
                let target = total * step / 5;
                while ledger.len() < target {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(
                    ledger.len() < total,
                    "the drain finished before fault {step}"
                );
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = 'faults' AND pid <> pg_backend_pid()",
                )
                .fetch_one(&admin)
                .await
                .expect("terminate");
                killed += n;
            }
            killed
        })
    };
    drain_into(
        &ledger,
        &[a.clone(), b.clone()],
        queue,
        6,
        ids.len(),
        Duration::from_secs(120),
    )
    .await;
    let killed = kills.await.expect("killer");
    // Each round ends both pools' connections and both LISTEN connections.
    assert!(killed >= 3 * 4, "connections were terminated ({killed})");
    assert_each_completed_once(&a, queue, &ids, &ledger).await;

    // The LISTEN connection came back: with a 60 s poll interval, only NOTIFY can wake
    // this fetch in time.
    let until = Instant::now() + Duration::from_secs(20);
    while !b.is_listening() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.is_listening(), "LISTEN reconnected");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            b.fetch("after", 1, Duration::from_secs(30), Duration::from_secs(30))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let id = a
        .enqueue(NewJob::new("after", json!(1)))
        .await
        .expect("enqueue");
    let jobs = waiter.await.expect("task").expect("fetch");
    assert_eq!(jobs[0].id, id);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woken after {:?}",
        start.elapsed()
    );
}

/// Runs a drain while `fault` is applied to the server from another thread; asserts
/// nothing was lost or recorded twice.
async fn drain_through(server: PgServer, async_leases: bool, fault: fn(&mut PgServer)) {
    let url = server.url();
    let schema = fresh_schema();
    let a = connect(builder(&url, &schema).async_commit_leases(async_leases)).await;
    let b = connect(builder(&url, &schema).async_commit_leases(async_leases)).await;
    let queue = "restart";
    let ids: Vec<JobId> = a
        .enqueue_many(
            (0..3000)
                .map(|n| NewJob::new(queue, json!({ "n": n })))
                .collect(),
        )
        .await
        .expect("enqueue");
    let server = Arc::new(Mutex::new(server));
    let ledger = Ledger::default();
    let faulting = {
        let (server, ledger) = (server.clone(), ledger.clone());
        let total = ids.len();
        tokio::task::spawn_blocking(move || {
            // Mid-run: a third of the jobs are done.
            let done = wait_for_progress(&ledger, total / 3);
            assert!(done < total, "the drain finished before the fault");
            let mut server = server.lock().expect("server");
            fault(&mut server);
            std::thread::sleep(Duration::from_millis(700));
            server.start_again().expect("start again");
            done
        })
    };
    drain_into(
        &ledger,
        &[a.clone(), b.clone()],
        queue,
        6,
        ids.len(),
        Duration::from_secs(120),
    )
    .await;
    let done_at_fault = faulting.await.expect("fault thread");
    eprintln!(
        "fault applied with {done_at_fault} of {} jobs done",
        ids.len()
    );
    assert_each_completed_once(&a, queue, &ids, &ledger).await;
}

/// A fast shutdown and restart of the server mid-run loses nothing and doubles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fast_restart_of_the_server_loses_nothing() {
    let server = start_server(PgServer::builder());
    drain_through(server, false, |s| s.stop_fast().expect("fast shutdown")).await;
}

/// A crash of a durable server (SIGKILL of the postmaster) and its recovery mid-run:
/// every committed change survives; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_and_recovery_of_a_durable_server_loses_nothing() {
    let server = start_server(PgServer::builder().durable());
    drain_through(server, false, |s| s.kill().expect("SIGKILL the postmaster")).await;
}

/// The same crash with leases committed asynchronously: leases granted just before the
/// crash may be forgotten (their jobs run again), but nothing is lost and no outcome is
/// recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_with_async_commit_leases_loses_nothing() {
    let server = start_server(PgServer::builder().durable());
    drain_through(server, true, |s| s.kill().expect("SIGKILL the postmaster")).await;
}

/// Rows whose payload or headers cannot be decoded are dead-lettered with
/// `CORRUPT_JOB` and a message naming the column; the fetch hands out the good jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_dead_lettered_and_fetch_goes_on() {
    let server = start_server(PgServer::builder());
    let schema = fresh_schema();
    let q = connect(builder(&server.url(), &schema)).await;
    let queue = "corrupt";
    let good_before = q
        .enqueue(NewJob::new(queue, json!({"n": 0})))
        .await
        .expect("enqueue");
    // Valid jsonb that does not decode: a number out of range for JSON parsers, and
    // headers that are not an object of strings.
    let corrupt: Vec<(JobId, &str, &str)> = vec![
        (uuid::Uuid::now_v7(), r#"{"n": 1e400}"#, "{}"),
        (uuid::Uuid::now_v7(), r#"{"n": 2}"#, r#"{"traceparent": 7}"#),
        (
            uuid::Uuid::now_v7(),
            r#"{"n": 3}"#,
            r#"["not", "a", "map"]"#,
        ),
    ];
    for (id, payload, headers) in &corrupt {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".jobs (id, queue, state, priority, run_at_ms,
                 ready_since_ms, created_at_ms, max_retries, tenant, payload, headers)
             VALUES ($1, $2, 0, 0, 0, 0, 0, 3, 'default', $3::jsonb, $4::jsonb)"
        )))
        .bind(id)
        .bind(queue)
        .bind(payload)
        .bind(headers)
        .execute(q.pool())
        .await
        .expect("insert a corrupt row");
    }
    let good_after = q
        .enqueue(NewJob::new(queue, json!({"n": 9})))
        .await
        .expect("enqueue");

    let jobs = q
        .fetch(queue, 10, Duration::from_secs(30), Duration::from_secs(2))
        .await
        .expect("fetch goes on past corrupt rows");
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![good_before, good_after],
        "the good jobs, in order"
    );
    for job in &jobs {
        q.complete(&job.lease, json!("ok")).await.expect("complete");
    }
    let letters = q.dead_letters(queue, 0, 10).await.expect("dead_letters");
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.error.code, CODE_CORRUPT_JOB);
        assert!(
            letter.error.message.contains("column payload")
                || letter.error.message.contains("column headers"),
            "the message names the column: {}",
            letter.error.message
        );
        let info = q.job(queue, letter.id).await.expect("job").expect("kept");
        assert_eq!(info.state, JobState::Dead);
    }
    let stats = q.stats(queue).await.expect("stats");
    assert_eq!(
        (stats.dead, stats.completed, stats.ready, stats.running),
        (3, 2, 0, 0)
    );
    assert!(
        q.fetch(queue, 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch")
            .is_empty()
    );
    // A corrupt row that is still ready reads as an error, not as garbage.
    let (id, payload, headers) = (uuid::Uuid::now_v7(), r#"{"n": 1e400}"#, "{}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".jobs (id, queue, state, priority, run_at_ms,
             ready_since_ms, created_at_ms, max_retries, tenant, payload, headers)
         VALUES ($1, $2, 1, 0, 9000000000000, 0, 0, 3, 'default', $3::jsonb, $4::jsonb)"
    )))
    .bind(id)
    .bind(queue)
    .bind(payload)
    .bind(headers)
    .execute(q.pool())
    .await
    .expect("insert");
    let read = q.job(queue, id).await;
    assert!(
        matches!(read, Err(flow_core::Error::Corrupt { .. })),
        "{read:?}"
    );
}
