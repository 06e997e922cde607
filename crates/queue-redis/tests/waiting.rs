//! Waiting without busy polling, counted on a server of our own: an idle fetch issues a
//! handful of commands however long it waits, an enqueue wakes it at once, and a fetch
//! or a batch completion is one script call.

use std::time::Duration;

use flow_core::queue::{JobQueue, NewJob, QueueOptions};
use queue_redis::RedisQueue;
use serde_json::json;
use test_support::redis::RedisServer;
use tokio::time::Instant;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Calls of `command` so far, from `INFO commandstats`.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let info = server
        .command(&["INFO", "commandstats"])
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Commands a client sent: script calls and blocking pops.
fn client_commands(server: &RedisServer) -> u64 {
    calls(server, "evalsha") + calls(server, "blpop") + calls(server, "ping")
}

#[test]
fn an_idle_fetch_issues_a_few_commands_and_wakes_at_once_on_enqueue() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        // Warm the pools so connection set-up is not counted.
        q.fetch(
            "idle",
            1,
            Duration::from_secs(30),
            Duration::from_millis(20),
        )
        .await
        .expect("fetch");

        let before = client_commands(&server);
        let started = Instant::now();
        let jobs = q
            .fetch("idle", 10, Duration::from_secs(30), Duration::from_secs(3))
            .await
            .expect("fetch");
        let waited = started.elapsed();
        let used = client_commands(&server) - before;
        assert!(jobs.is_empty());
        assert!(waited >= Duration::from_millis(2900), "waited {waited:?}");
        eprintln!("an idle fetch of 3s issued {used} commands");
        assert!(
            used <= 6,
            "an idle fetch of 3 s should issue a handful of commands, issued {used}"
        );

        // An enqueue wakes a waiting fetch at once.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let jobs = q
                    .fetch("idle", 1, Duration::from_secs(30), Duration::from_secs(10))
                    .await
                    .expect("fetch");
                (Instant::now(), jobs.len())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let enqueued = Instant::now();
        q.enqueue(NewJob::new("idle", json!(1)))
            .await
            .expect("enqueue");
        let (woke, n) = waiter.await.expect("waiter");
        assert_eq!(n, 1);
        let latency = woke - enqueued;
        eprintln!("enqueue-to-fetch latency of an idle fetch: {latency:?}");
        // Generous: a fetch that polled instead of blocking would take up to 5 s.
        assert!(latency < Duration::from_millis(500), "{latency:?}");
    });
}

#[test]
fn fetch_of_many_and_complete_many_are_one_script_call_each() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let before = calls(&server, "evalsha");
        q.enqueue_many((0..100).map(|n| NewJob::new("batch", json!(n))).collect())
            .await
            .expect("enqueue_many");
        assert_eq!(calls(&server, "evalsha") - before, 1, "enqueue_many of 100");

        let before = calls(&server, "evalsha");
        let jobs = q
            .fetch("batch", 100, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 100);
        assert_eq!(calls(&server, "evalsha") - before, 1, "fetch of 100");

        let before = calls(&server, "evalsha");
        let results = q
            .complete_many(
                jobs.iter()
                    .map(|j| (j.lease.clone(), json!("ok")))
                    .collect(),
            )
            .await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(
            calls(&server, "evalsha") - before,
            1,
            "complete_many of 100"
        );

        let before = calls(&server, "evalsha");
        let stats = q.stats("batch").await.expect("stats");
        assert_eq!(stats.completed, 100);
        assert_eq!(calls(&server, "evalsha") - before, 1, "stats");
    });
}

#[test]
fn more_idle_fetches_than_wait_connections_still_get_their_jobs() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let config = queue_redis::RedisConfig::from_url(&server.url())
            .expect("valid URL")
            .wait_pool_size(1);
        let q = RedisQueue::with_config(config).await.expect("connect");
        let fetchers: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move {
                    q.fetch("few", 1, Duration::from_secs(30), Duration::from_secs(3))
                        .await
                        .expect("fetch")
                        .len()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        q.enqueue_many((0..3).map(|n| NewJob::new("few", json!(n))).collect())
            .await
            .expect("enqueue");
        let mut got = 0;
        for fetcher in fetchers {
            got += fetcher.await.expect("fetcher");
        }
        assert_eq!(got, 3, "each waiting fetch got a job, blocking or polling");
    });
}

/// Back-to-back idle fetches (what an idle worker pool does) block on the signal list and
/// look again only every few seconds, yet an enqueue from another client wakes them at
/// once, a job scheduled for later is handed out when due, and a job whose wake-up token
/// was lost is still found within about 5 seconds.
#[test]
fn back_to_back_idle_fetches_look_rarely_and_miss_nothing() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let other = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let lease = Duration::from_secs(30);
        let wait = Duration::from_millis(500);
        q.fetch("quiet", 1, lease, Duration::from_millis(20))
            .await
            .expect("fetch");

        // Six idle fetches of 0.5 s: one look at most, and a BLPOP each.
        let scripts = calls(&server, "evalsha");
        let pops = calls(&server, "blpop");
        for _ in 0..6 {
            assert!(
                q.fetch("quiet", 1, lease, wait)
                    .await
                    .expect("fetch")
                    .is_empty()
            );
        }
        let (scripts, pops) = (
            calls(&server, "evalsha") - scripts,
            calls(&server, "blpop") - pops,
        );
        eprintln!("six idle fetches of 0.5 s: {scripts} scripts, {pops} BLPOPs");
        assert!(scripts <= 1, "{scripts} scripts");
        assert!(pops <= 7, "{pops} BLPOPs");

        // An enqueue by another client wakes a quiet fetch at once.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let jobs = q
                    .fetch("quiet", 1, lease, Duration::from_secs(3))
                    .await
                    .expect("fetch");
                (Instant::now(), jobs.len())
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let enqueued = Instant::now();
        other
            .enqueue(NewJob::new("quiet", json!("now")))
            .await
            .expect("enqueue");
        let (woke, n) = waiter.await.expect("waiter");
        assert_eq!(n, 1);
        assert!(
            woke - enqueued < Duration::from_millis(500),
            "{:?}",
            woke - enqueued
        );

        // A job scheduled for later (by another client, while this one is quiet) is
        // handed out when due.
        assert!(
            q.fetch("quiet", 1, lease, wait)
                .await
                .expect("fetch")
                .is_empty()
        );
        let due = Instant::now() + Duration::from_millis(800);
        other
            .enqueue(NewJob::new("quiet", json!("later")).delay(Duration::from_millis(800)))
            .await
            .expect("enqueue");
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < due + Duration::from_secs(3) {
            got = q.fetch("quiet", 1, lease, wait).await.expect("fetch");
        }
        assert_eq!(got.len(), 1, "the delayed job is handed out");
        assert!(Instant::now() < due + Duration::from_millis(700));

        // A job whose wake-up token is lost (a fetch dropped in its BLPOP can take one) is
        // found by the next look, at most about 5 s after the last one.
        assert!(
            q.fetch("quiet", 1, lease, wait)
                .await
                .expect("fetch")
                .is_empty()
        );
        let last_look = Instant::now();
        other
            .enqueue(NewJob::new("quiet", json!("lost token")))
            .await
            .expect("enqueue");
        server.command(&["DEL", "{pf:quiet}:signal"]).expect("DEL");
        let mut got = Vec::new();
        while got.is_empty() && last_look.elapsed() < Duration::from_secs(8) {
            got = q.fetch("quiet", 1, lease, wait).await.expect("fetch");
        }
        assert_eq!(got.len(), 1, "found without its token");
        assert!(
            last_look.elapsed() < Duration::from_millis(6_500),
            "{:?}",
            last_look.elapsed()
        );
    });
}
