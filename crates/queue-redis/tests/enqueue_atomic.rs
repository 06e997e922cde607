//! How `enqueue_many` reaches Redis: a call of one script chunk is one script call; a
//! larger call, or one naming several queues, is one `MULTI`/`EXEC` transaction on a
//! standalone server; on a cluster, a call naming several queues is staged per queue and
//! then stored queue by queue, and leaves no staged keys behind. (That a call cut mid-way
//! stores nothing is the conformance clause `enqueue_many_cut_mid_call_stores_nothing`.)

use std::collections::HashSet;
use std::time::Duration;

use flow_core::queue::{JobQueue, NewJob, QueueOptions};
use queue_redis::RedisQueue;
use serde_json::json;
use test_support::redis::{RedisCluster, RedisServer};

/// `calls=` of `cmdstat_<name>` in `INFO commandstats`.
fn calls(server: &RedisServer, name: &str) -> u64 {
    let info = server
        .command(&["INFO", "commandstats"])
        .unwrap_or_else(|e| panic!("INFO: {e}"));
    let prefix = format!("cmdstat_{name}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn jobs(queue: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::new(queue, json!({ "n": i })))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chunk_is_one_script_call_and_more_is_one_transaction() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let q = RedisQueue::connect(&server.url(), QueueOptions::default())
        .await
        .expect("connect");
    let count = |name| calls(&server, name);
    let before = (count("evalsha"), count("multi"), count("exec"));

    let ids = q.enqueue_many(jobs("one", 400)).await.expect("400 jobs");
    assert_eq!(ids.len(), 400);
    assert_eq!(
        (count("evalsha"), count("multi"), count("exec")),
        (before.0 + 1, before.1, before.2),
        "one chunk: one script call, no transaction"
    );

    let ids = q.enqueue_many(jobs("big", 1200)).await.expect("1,200 jobs");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1200);
    assert_eq!(
        (count("evalsha"), count("multi"), count("exec")),
        (before.0 + 4, before.1 + 1, before.2 + 1),
        "three chunks: one transaction of three script calls"
    );

    let mut mixed = jobs("left", 10);
    mixed.extend(jobs("right", 10));
    let ids = q.enqueue_many(mixed).await.expect("two queues");
    assert_eq!(ids.len(), 20);
    assert_eq!(
        (count("evalsha"), count("multi"), count("exec")),
        (before.0 + 6, before.1 + 2, before.2 + 2),
        "two queues on one server: one transaction"
    );
    for (queue, n) in [("one", 400), ("big", 1200), ("left", 10), ("right", 10)] {
        assert_eq!(q.stats(queue).await.expect("stats").ready, n, "{queue}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_call_of_several_queues_is_staged_then_stored_whole() {
    let mut cluster = RedisCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let q = RedisQueue::connect_cluster(cluster.urls(), QueueOptions::default())
        .await
        .expect("connect");
    let holder = q
        .enqueue(NewJob::new("b", json!("holder")).dedupe_key("d"))
        .await
        .expect("enqueue");

    // Queue a: 600 jobs (more than one script chunk), priorities 1 and 0 interleaved in
    // runs; queue b: a key held by a live job, twice; queue c: a delayed job.
    let mut batch: Vec<NewJob> = (0..600)
        .map(|i| NewJob::new("a", json!({ "n": i })).priority(i32::from((i / 100) % 2 == 0)))
        .collect();
    batch.push(NewJob::new("b", json!("dup 1")).dedupe_key("d"));
    batch.push(NewJob::new("c", json!("later")).delay(Duration::from_secs(60)));
    batch.push(NewJob::new("b", json!("dup 2")).dedupe_key("d"));
    batch.push(NewJob::new("b", json!("own")));
    let ids = q.enqueue_many(batch).await.expect("enqueue_many");
    assert_eq!(ids.len(), 604);
    assert_eq!(
        (ids[600], ids[602]),
        (holder, holder),
        "dedupe: the live holder"
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        603,
        "every other job has an id of its own"
    );
    for (i, id) in ids.iter().enumerate().take(600) {
        if i % 97 == 0 {
            let info = q.job("a", *id).await.expect("job").expect("stored");
            assert_eq!(info.payload["n"], i, "ids in input order");
        }
    }
    let (a, b, c) = (
        q.stats("a").await.expect("stats"),
        q.stats("b").await.expect("stats"),
        q.stats("c").await.expect("stats"),
    );
    assert_eq!(
        (a.ready, b.ready, c.ready, c.scheduled),
        (600, 2, 0, 1),
        "{a:?} {b:?} {c:?}"
    );

    // The line of a: priority 0 first (jobs 100-199, 300-399, 500-599), FIFO within.
    let leased = q
        .fetch("a", 1000, Duration::from_secs(60), Duration::ZERO)
        .await
        .expect("fetch");
    let order: Vec<u64> = leased
        .iter()
        .map(|j| j.payload["n"].as_u64().unwrap_or(u64::MAX))
        .collect();
    let want: Vec<u64> = (100..200)
        .chain(300..400)
        .chain(500..600)
        .chain(0..100)
        .chain(200..300)
        .chain(400..500)
        .collect();
    assert_eq!(order, want, "priority, then the order of the call");

    // Nothing staged is left on any node.
    for node in cluster.nodes() {
        let keys = node
            .command(&["KEYS", "*:staged:*"])
            .unwrap_or_else(|e| panic!("KEYS: {e}"));
        assert!(keys.starts_with("*0"), "staged keys left behind: {keys}");
    }
}
