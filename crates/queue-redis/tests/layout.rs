//! Guarantees that live in the key layout, checked on the keys themselves: results are
//! deleted once past their retention (no TTL needed), a fetch that will wait registers
//! itself so that enqueues wake it, while nobody waiting means no wake-up tokens are
//! written, and jobs of a batch enqueue live in the body hash and their batch's list
//! until their fetch or cancel gives them a record of their own.

use std::time::Duration;

use flow_core::queue::{JobQueue, NewJob, QueueOptions};
use queue_redis::RedisQueue;
use serde_json::json;
use test_support::redis::RedisServer;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn int(server: &RedisServer, args: &[&str]) -> i64 {
    let reply = server.command(args).expect("command");
    reply
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("{args:?} answered {reply:?}"))
}

/// The key of the one batch list of `queue`.
fn batch_list(server: &RedisServer, queue: &str) -> String {
    let pattern = format!("{{pf:{queue}}}:batch:*");
    server
        .command(&["KEYS", &pattern])
        .expect("KEYS")
        .lines()
        .find(|l| l.contains(":batch:"))
        .expect("one batch list")
        .trim()
        .to_owned()
}

#[test]
fn finished_jobs_are_deleted_from_redis_after_their_retention() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let opts = QueueOptions {
            result_retention: Duration::from_millis(300),
            ..QueueOptions::default()
        };
        let q = RedisQueue::connect(&server.url(), opts)
            .await
            .expect("connect");
        let ids = q
            .enqueue_many((0..5).map(|n| NewJob::new("kept", json!(n))).collect())
            .await
            .expect("enqueue");
        let jobs = q
            .fetch("kept", 5, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        let done = q
            .complete_many(
                jobs.iter()
                    .map(|j| (j.lease.clone(), json!("ok")))
                    .collect(),
            )
            .await;
        assert!(done.iter().all(Result::is_ok));
        let key = |id: &flow_core::queue::JobId| format!("{{pf:kept}}:job:{id}");
        assert_eq!(int(&server, &["EXISTS", &key(&ids[0])]), 1);
        // Finished jobs carry no TTL: the purge deletes them.
        assert_eq!(int(&server, &["PTTL", &key(&ids[0])]), -1);
        assert_eq!(int(&server, &["ZCARD", "{pf:kept}:completed"]), 5);

        tokio::time::sleep(Duration::from_millis(400)).await;
        // Any fetch (or reap, enqueue, cancel) on the queue purges what is past retention.
        q.fetch("kept", 1, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        for id in &ids {
            assert_eq!(int(&server, &["EXISTS", &key(id)]), 0, "{id} deleted");
        }
        assert_eq!(int(&server, &["ZCARD", "{pf:kept}:completed"]), 0);
        assert!(q.job("kept", ids[0]).await.expect("job").is_none());

        // The same through the reaper alone.
        let id = q
            .enqueue(NewJob::new("kept", json!("x")))
            .await
            .expect("enqueue");
        let jobs = q
            .fetch("kept", 1, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        q.complete(&jobs[0].lease, json!(1))
            .await
            .expect("complete");
        tokio::time::sleep(Duration::from_millis(400)).await;
        q.reap("kept").await.expect("reap");
        assert_eq!(int(&server, &["EXISTS", &key(&id)]), 0);
    });
}

#[test]
fn enqueues_write_wake_up_tokens_only_while_a_fetch_waits() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        // Nobody waits: no tokens, however many enqueues.
        for n in 0..5 {
            q.enqueue(NewJob::new("tokens", json!(n)))
                .await
                .expect("enqueue");
        }
        assert_eq!(int(&server, &["LLEN", "{pf:tokens}:signal"]), 0);
        let jobs = q
            .fetch("tokens", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 5);

        // A waiting fetch is woken by the next enqueue.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                q.fetch(
                    "tokens",
                    1,
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                )
                .await
                .expect("fetch")
                .len()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = tokio::time::Instant::now();
        q.enqueue(NewJob::new("tokens", json!("wake")))
            .await
            .expect("enqueue");
        assert_eq!(waiter.await.expect("waiter"), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
    });
}

/// A job stored in the layout older versions wrote (one field per value, no `job`
/// field) goes through every step: fetch, retry, release, lease expiry and reaping,
/// completion, and reads back whole.
#[test]
fn a_job_of_the_older_layout_goes_through_every_step() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let id = uuid::Uuid::now_v7();
        let key = format!("{{pf:old}}:job:{id}");
        let reply = server
            .command(&[
                "HSET",
                &key,
                "state",
                "ready",
                "payload",
                r#"{"old":true}"#,
                "tenant",
                "acme",
                "priority",
                "-3",
                "max_retries",
                "2",
                "attempts",
                "0",
                "lease_expiries",
                "0",
                "cancel_requested",
                "0",
                "token",
                "0",
                "created_at_ms",
                "1700000000000",
                "run_at_ms",
                "1700000000000",
                "headers",
                r#"{"traceparent":"t"}"#,
                "seq",
                "7",
                "ready_since_ms",
                "1700000000000",
            ])
            .expect("HSET");
        assert!(reply.starts_with(':'), "{reply}");
        let member = format!("{:016}{id}", 7);
        server
            .command(&["ZADD", "{pf:old}:ready", "-3", &member])
            .expect("ZADD");
        server
            .command(&[
                "ZADD",
                "{pf:old}:ready_since",
                "1700000000000",
                &id.to_string(),
            ])
            .expect("ZADD");
        let lease = Duration::from_secs(30);

        let fetch = |lease: Duration| {
            let q = q.clone();
            async move {
                let jobs = q
                    .fetch("old", 1, lease, Duration::ZERO)
                    .await
                    .expect("fetch");
                assert_eq!(jobs.len(), 1, "the older job is handed out");
                jobs.into_iter().next().expect("one job")
            }
        };
        let job = fetch(lease).await;
        assert_eq!(job.id, id);
        assert_eq!(job.payload, json!({"old": true}));
        assert_eq!((job.tenant.as_str(), job.priority), ("acme", -3));
        assert_eq!((job.attempt, job.max_retries), (1, 2));
        assert_eq!(job.enqueued_at_ms, 1_700_000_000_000);
        assert_eq!(
            job.headers.get("traceparent").map(String::as_str),
            Some("t")
        );

        // Retried at once: ready again with its priority (read from its own field).
        q.retry(
            &job.lease,
            Duration::ZERO,
            flow_core::queue::Failure::new("X", "again"),
        )
        .await
        .expect("retry");
        let ready = server
            .command(&["ZRANGE", "{pf:old}:ready", "0", "-1", "WITHSCORES"])
            .expect("ZRANGE");
        assert!(
            ready.contains(&id.to_string()) && ready.lines().any(|l| l.trim() == "-3"),
            "{ready}"
        );
        // Released: back in its place.
        let job = fetch(lease).await;
        assert_eq!(job.attempt, 2);
        q.release(&job.lease).await.expect("release");
        // Leased briefly and reclaimed by the reaper: ready again, the attempt counted.
        let job = fetch(Duration::from_millis(1)).await;
        assert_eq!(job.attempt, 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = q.reap("old").await.expect("reap");
        assert_eq!(report.requeued, vec![id]);
        let job = fetch(lease).await;
        assert_eq!(job.attempt, 3);
        q.complete(&job.lease, json!("done"))
            .await
            .expect("complete");

        let info = q.job("old", id).await.expect("job").expect("kept");
        assert_eq!(info.state, flow_core::queue::JobState::Completed);
        assert_eq!(info.payload, json!({"old": true}));
        assert_eq!((info.priority, info.max_retries), (-3, 2));
        assert_eq!(info.result, Some(json!("done")));
    });
}

#[test]
fn a_batch_waits_in_the_body_hash_and_every_step_reads_it_there() {
    use flow_core::queue::{CancelOutcome, JobState};
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let ids = q
            .enqueue_many(
                (0..4)
                    .map(|n| NewJob::new("batch", json!({ "n": n })).tenant("acme"))
                    .collect(),
            )
            .await
            .expect("enqueue");
        let key = |id: &flow_core::queue::JobId| format!("{{pf:batch}}:job:{id}");
        // One HSET for the records, one list of ids, one member in the ready line and
        // one ready time for the whole batch: nothing per job but a field and a list item.
        assert_eq!(int(&server, &["HLEN", "{pf:batch}:body"]), 4);
        assert_eq!(int(&server, &["ZCARD", "{pf:batch}:ready"]), 1);
        assert_eq!(int(&server, &["EXISTS", "{pf:batch}:ready_since"]), 0);
        assert_eq!(int(&server, &["ZCARD", "{pf:batch}:batch_since"]), 1);
        assert!(
            server
                .command(&["HGET", "{pf:batch}:meta", "batched"])
                .expect("HGET")
                .ends_with("\r\n4\r\n"),
            "meta.batched counts the batch"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stats = q.stats("batch").await.expect("stats");
        assert_eq!(stats.ready, 4);
        assert!(
            stats.oldest_ready_age_s >= 0.03,
            "the batch's age: {stats:?}"
        );
        for id in &ids {
            assert_eq!(
                int(&server, &["EXISTS", &key(id)]),
                0,
                "{id} has no key yet"
            );
        }
        // Read where it waits.
        let info = q.job("batch", ids[1]).await.expect("job").expect("found");
        assert_eq!(info.state, JobState::Ready);
        assert_eq!(info.payload, json!({ "n": 1 }));
        assert_eq!((info.tenant.as_str(), info.attempts), ("acme", 0));
        // Cancelled where it waits: it gets a record of its own, leaves its batch's
        // list, and no longer counts as ready.
        let list = batch_list(&server, "batch");
        assert_eq!(int(&server, &["LLEN", &list]), 4);
        assert_eq!(
            q.cancel("batch", ids[1]).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        assert_eq!(int(&server, &["HLEN", "{pf:batch}:body"]), 3);
        assert_eq!(int(&server, &["LLEN", &list]), 3);
        assert_eq!(q.stats("batch").await.expect("stats").ready, 3);
        let info = q.job("batch", ids[1]).await.expect("job").expect("found");
        assert_eq!(info.state, JobState::Cancelled);
        assert_eq!(info.payload, json!({ "n": 1 }));
        // Leased in order, the cancelled one skipped; the fetch writes each record.
        let jobs = q
            .fetch("batch", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        let got: Vec<_> = jobs.iter().map(|j| j.id).collect();
        assert_eq!(got, vec![ids[0], ids[2], ids[3]]);
        assert!(jobs.iter().all(|j| j.attempt == 1 && j.tenant == "acme"));
        assert_eq!(jobs[1].payload, json!({ "n": 2 }));
        // The batch is gone, and with it its ready time and its count.
        for gone in ["body", "ready", "batch_since"] {
            assert_eq!(
                int(&server, &["EXISTS", &format!("{{pf:batch}}:{gone}")]),
                0,
                "{gone} is gone"
            );
        }
        assert_eq!(int(&server, &["HEXISTS", "{pf:batch}:meta", "batched"]), 0);
        let info = q.job("batch", ids[2]).await.expect("job").expect("found");
        assert_eq!((info.state, info.attempts), (JobState::Running, 1));
        // Handed back, it waits in its own record, in its old place.
        q.release(&jobs[0].lease).await.expect("release");
        let again = q
            .fetch("batch", 1, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(again[0].id, ids[0]);
        assert_eq!(again[0].payload, json!({ "n": 0 }));
        // A batch record that cannot be decoded is dead-lettered, and the fetch goes on.
        let more = q
            .enqueue_many(
                (10..12)
                    .map(|n| NewJob::new("batch", json!({ "n": n })))
                    .collect(),
            )
            .await
            .expect("enqueue");
        server
            .command(&["HSET", "{pf:batch}:body", &more[0].to_string(), "garbage"])
            .expect("HSET");
        let jobs = q
            .fetch("batch", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch goes on");
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![more[1]]);
        let info = q.job("batch", more[0]).await.expect("job").expect("found");
        assert_eq!(info.state, JobState::Dead);
        assert_eq!(info.error.map(|e| e.code), Some("CORRUPT_JOB".to_owned()));
        assert_eq!(q.stats("batch").await.expect("stats").ready, 0);
    });
}

#[test]
fn batches_keep_the_line_in_order() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let fetch = |n: usize| {
            let q = q.clone();
            async move {
                q.fetch("line", n, Duration::from_secs(30), Duration::ZERO)
                    .await
                    .expect("fetch")
            }
        };
        // Priorities, a deduplicated job and a scheduled one between batch jobs: each
        // run of one priority is a batch, and the line is the one a job at a time would
        // give (priority first, lower first, then the order of the call).
        let jobs = (0..10)
            .map(|n| {
                let job = NewJob::new("line", json!(n));
                match n {
                    3 | 4 => job.priority(-5),
                    5 => job.dedupe_key("d"),
                    7 => job.delay(Duration::from_secs(60)),
                    _ => job,
                }
            })
            .collect();
        q.enqueue_many(jobs).await.expect("enqueue");
        assert_eq!(q.stats("line").await.expect("stats").ready, 9);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.extend(fetch(1).await);
        }
        // A job handed back in the middle of its batch goes back before the rest of it.
        q.release(&order[2].lease).await.expect("release");
        order.pop();
        order.extend(fetch(2).await);
        q.release(&order[3].lease).await.expect("release");
        order.pop();
        order.extend(fetch(10).await);
        let got: Vec<_> = order.iter().map(|j| j.payload.clone()).collect();
        assert_eq!(got, [3, 4, 0, 1, 2, 5, 6, 8, 9].map(|n| json!(n)).to_vec());
        assert!(fetch(10).await.is_empty());
        assert_eq!(q.stats("line").await.expect("stats").ready, 0);
    });
}

#[test]
fn batch_entries_of_the_wrong_type_never_stop_a_fetch() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        let ids = q
            .enqueue_many((0..3).map(|n| NewJob::new("wt", json!(n))).collect())
            .await
            .expect("enqueue");
        // A job waiting in the body hash is live: requeueing it as a dead letter is
        // refused as for any live job, not answered "not found".
        match q.requeue_dead("wt", ids[0]).await {
            Err(flow_core::Error::InvalidState { state, .. }) => assert_eq!(state, "ready"),
            other => panic!("expected InvalidState, got {other:?}"),
        }
        // The batch's list of ids replaced by a string: the fetch goes on, and once
        // the line has run dry the jobs that lost their batch get their own records and
        // places, in order. Nothing is lost.
        let list = batch_list(&server, "wt");
        server.command(&["DEL", &list]).expect("DEL");
        server.command(&["SET", &list, "not a list"]).expect("SET");
        let jobs = q
            .fetch("wt", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch goes on");
        assert!(jobs.is_empty());
        assert_eq!(int(&server, &["EXISTS", "{pf:wt}:body"]), 0);
        // The damaged list is kept aside for inspection.
        let aside = list.replace(":batch:", ":corrupt:batch:");
        assert_eq!(int(&server, &["EXISTS", &aside]), 1);
        assert_eq!(q.stats("wt").await.expect("stats").ready, 3);
        let jobs = q
            .fetch("wt", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
        assert_eq!(int(&server, &["ZCARD", "{pf:wt}:running"]), 3);
        let stats = q.stats("wt").await.expect("stats");
        assert_eq!((stats.ready, stats.running), (0, 3));

        // The body hash itself replaced by a string: a batch enqueue still stores every
        // job (each with a record of its own), with its scheduled and deduplicated
        // companions indexed, and they are leased in order.
        server
            .command(&["SET", "{pf:wt}:body", "not a hash"])
            .expect("SET");
        let more = q
            .enqueue_many(vec![
                NewJob::new("wt", json!("a")),
                NewJob::new("wt", json!("b")).dedupe_key("k"),
                NewJob::new("wt", json!("c")),
            ])
            .await
            .expect("enqueue goes on");
        let jobs = q
            .fetch("wt", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch goes on");
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), more);
        assert_eq!(jobs[2].payload, json!("c"));
    });
}

#[test]
fn a_batch_job_of_the_layout_before_batch_lists_still_runs() {
    use flow_core::queue::{CancelOutcome, JobId, JobState};
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        // Two jobs as the layout before batch lists stored them: the record in body as
        // <seq><batch><job field>, a ready member each, a batch count and ready time.
        let ids: Vec<JobId> = [
            "00000000-0000-4000-8000-000000000001",
            "00000000-0000-4000-8000-000000000002",
        ]
        .iter()
        .map(|id| id.parse().expect("uuid"))
        .collect();
        let batch = "0000000000000001";
        for (n, id) in ids.iter().enumerate() {
            let seq = format!("{:016}", n + 1);
            let record = format!("{seq}{batch}1767225600000,0,3,[\"acme\",{{}},{{\"n\":{n}}}]");
            let id = id.to_string();
            server
                .command(&["HSET", "{pf:old}:body", &id, &record])
                .expect("HSET");
            server
                .command(&["ZADD", "{pf:old}:ready", "0", &format!("{seq}{id}")])
                .expect("ZADD");
        }
        server
            .command(&["HSET", "{pf:old}:meta", "seq", "2"])
            .expect("HSET");
        server
            .command(&["HSET", "{pf:old}:batches", batch, "2"])
            .expect("HSET");
        server
            .command(&["ZADD", "{pf:old}:batch_since", "1767225600000", batch])
            .expect("ZADD");

        assert_eq!(q.stats("old").await.expect("stats").ready, 2);
        let info = q.job("old", ids[0]).await.expect("job").expect("found");
        assert_eq!(info.state, JobState::Ready);
        assert_eq!(info.payload, json!({ "n": 0 }));
        assert_eq!(info.tenant, "acme");
        assert_eq!(
            q.cancel("old", ids[1]).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        let info = q.job("old", ids[1]).await.expect("job").expect("found");
        assert_eq!(info.state, JobState::Cancelled);
        assert_eq!(info.payload, json!({ "n": 1 }));
        assert_eq!(int(&server, &["ZCARD", "{pf:old}:ready"]), 1);
        assert_eq!(q.stats("old").await.expect("stats").ready, 1);

        let jobs = q
            .fetch("old", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch");
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[0]]);
        assert_eq!(
            (jobs[0].attempt, jobs[0].payload.clone()),
            (1, json!({ "n": 0 }))
        );
        // The line ran dry: the old batch entries are gone with the records.
        for gone in ["body", "batches", "batch_since", "ready"] {
            assert_eq!(
                int(&server, &["EXISTS", &format!("{{pf:old}}:{gone}")]),
                0,
                "{gone} is gone"
            );
        }
        let stats = q.stats("old").await.expect("stats");
        assert_eq!((stats.ready, stats.running), (0, 1));
        q.complete(&jobs[0].lease, json!("done"))
            .await
            .expect("complete");
    });
}

#[test]
fn damaged_batch_keys_lose_no_job() {
    use std::collections::HashSet;
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let q = RedisQueue::connect(&server.url(), QueueOptions::default())
            .await
            .expect("connect");
        // Keys that only feed stats, of the wrong type or content: enqueue, cancel,
        // stats and fetch all go on, and every job is leased in order.
        server
            .command(&["SET", "{pf:st}:batch_since", "not a zset"])
            .expect("SET");
        server
            .command(&["HSET", "{pf:st}:meta", "batched", "not a number"])
            .expect("HSET");
        let ids = q
            .enqueue_many(vec![
                NewJob::new("st", json!("a")),
                NewJob::new("st", json!("b")).dedupe_key("k"),
                NewJob::new("st", json!("c")),
                NewJob::new("st", json!("d")),
            ])
            .await
            .expect("enqueue goes on");
        assert_eq!(
            q.cancel("st", ids[2]).await.expect("cancel goes on"),
            flow_core::queue::CancelOutcome::Cancelled
        );
        q.stats("st").await.expect("stats goes on");
        // A key of another type under the id of a job waiting in a batch: set aside
        // when the job is leased, and the job runs.
        server
            .command(&["SET", &format!("{{pf:st}}:job:{}", ids[3]), "not a hash"])
            .expect("SET");
        let jobs = q
            .fetch("st", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("fetch goes on");
        assert_eq!(
            jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[0], ids[1], ids[3]]
        );
        assert_eq!(jobs[2].payload, json!("d"));
        assert_eq!(
            int(
                &server,
                &["EXISTS", &format!("{{pf:st}}:corrupt:{}", ids[3])]
            ),
            1
        );

        // The whole ready line lost: once a fetch finds it empty, the jobs waiting in
        // batches go back in line a thousand at a time, and every one is leased once.
        let ids = q
            .enqueue_many((0..1_200).map(|n| NewJob::new("lost", json!(n))).collect())
            .await
            .expect("enqueue");
        server.command(&["DEL", "{pf:lost}:ready"]).expect("DEL");
        let mut leased = Vec::new();
        for _ in 0..10 {
            let jobs = q
                .fetch("lost", 1_000, Duration::from_secs(30), Duration::ZERO)
                .await
                .expect("fetch");
            leased.extend(jobs.into_iter().map(|j| j.id));
        }
        assert_eq!(leased.len(), 1_200, "each job leased once");
        assert_eq!(
            leased.iter().collect::<HashSet<_>>(),
            ids.iter().collect::<HashSet<_>>()
        );
        assert_eq!(int(&server, &["EXISTS", "{pf:lost}:body"]), 0);
        let stats = q.stats("lost").await.expect("stats");
        assert_eq!((stats.ready, stats.running), (0, 1_200));
    });
}
