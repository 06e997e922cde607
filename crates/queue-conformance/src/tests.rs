//! The clauses of the contract, one public async function each.
//!
//! Every function takes a [`QueueFactory`], builds the backend(s) it needs, works on queue
//! names of its own and panics (with a message naming the clause) when the backend breaks
//! the contract. [`conformance_tests!`](crate::conformance_tests) turns each into a test.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flow_core::Error;
use flow_core::queue::{
    CODE_LEASE_EXPIRED, CODE_LEASE_EXPIRED_TOO_OFTEN, CancelOutcome, Failure, JobId, JobInfo,
    JobQueue, JobState, Lease, LeasedJob, NewJob, QueueOptions, now_ms,
};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};
use uuid::Uuid;

use crate::QueueFactory;

/// A backend under test.
type Q = Arc<dyn JobQueue>;

/// A lease long enough never to expire during a test.
const LONG: Duration = Duration::from_secs(60);
/// How long helpers wait for a job that should be there.
const SETTLE: Duration = Duration::from_secs(3);
/// A short lease, for tests that let leases expire.
const SHORT_LEASE: Duration = Duration::from_millis(200);
/// How long to sleep so that a [`SHORT_LEASE`] has surely expired.
const PAST_SHORT_LEASE: Duration = Duration::from_millis(400);
/// Slack allowed between the suite's clock and the backend's when comparing times.
const CLOCK_SLACK_MS: i64 = 1_000;

// ---------------------------------------------------------------------------------------
// Helpers

/// A queue name of this test's own: `conf-<test>-<12 random hex digits>`.
fn qname(test: &str) -> String {
    let hex = Uuid::new_v4().simple().to_string();
    format!("conf-{test}-{}", &hex[..12])
}

async fn build(factory: &impl QueueFactory, opts: QueueOptions) -> Q {
    factory.build(opts).await
}

/// A backend with default options and one fresh queue name.
async fn setup(factory: &impl QueueFactory, test: &str) -> (Q, String) {
    (build(factory, QueueOptions::default()).await, qname(test))
}

fn job(queue: &str, n: u64) -> NewJob {
    NewJob::new(queue, json!({ "n": n }))
}

fn n_of(payload: &Value) -> u64 {
    payload["n"].as_u64().unwrap_or(u64::MAX)
}

/// Fetches exactly one job, waiting up to [`SETTLE`].
async fn fetch_one(q: &Q, queue: &str, lease: Duration) -> LeasedJob {
    let mut jobs = q
        .fetch(queue, 1, lease, SETTLE)
        .await
        .expect("fetch failed");
    assert_eq!(
        jobs.len(),
        1,
        "expected one job from {queue} within {SETTLE:?}"
    );
    jobs.remove(0)
}

/// Asserts that nothing can be fetched right now.
async fn assert_nothing_to_fetch(q: &Q, queue: &str, why: &str) {
    let jobs = q
        .fetch(queue, 10, LONG, Duration::ZERO)
        .await
        .expect("fetch failed");
    assert!(
        jobs.is_empty(),
        "{why}: fetch handed out {:?}",
        jobs.iter().map(|j| j.id).collect::<Vec<_>>()
    );
}

async fn info(q: &Q, queue: &str, id: JobId) -> JobInfo {
    q.job(queue, id)
        .await
        .expect("job() failed")
        .unwrap_or_else(|| panic!("job {id} of {queue} should be readable"))
}

#[track_caller]
fn assert_lease_lost<T: Debug>(result: Result<T, Error>, what: &str) {
    assert!(
        matches!(result, Err(Error::LeaseLost { .. })),
        "{what} with a stale lease should be Error::LeaseLost, got {result:?}"
    );
}

#[track_caller]
fn assert_invalid_name<T: Debug>(result: Result<T, Error>, what: &str, name: &str) {
    assert!(
        matches!(result, Err(Error::InvalidQueueName { .. })),
        "{what} on queue name {name:?} should be Error::InvalidQueueName, got {result:?}"
    );
}

/// Fetches one job and moves it to the dead-letter set with `code`.
async fn kill_one(q: &Q, queue: &str, code: &str) -> LeasedJob {
    let leased = fetch_one(q, queue, LONG).await;
    q.fail(
        &leased.lease,
        Failure::new(code, format!("{code} happened")),
    )
    .await
    .expect("fail");
    leased
}

// ---------------------------------------------------------------------------------------
// Enqueue

/// Ids are unique and sort in creation order; ids differ between jobs.
pub async fn enqueue_returns_unique_sortable_ids(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "ids").await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(q.enqueue(job(&queue, n)).await.expect("enqueue"));
        sleep(Duration::from_millis(2)).await;
    }
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "ids must be unique: {ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids created one after another must sort in creation order: {ids:?}"
    );
}

/// `job()` reads a new job back: ready, no attempts, everything as given.
pub async fn enqueued_job_reads_back_ready(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "readback").await;
    let before = now_ms();
    let id = q
        .enqueue(NewJob::new(&queue, json!({"hello": "world"})).max_retries(4))
        .await
        .expect("enqueue");
    let after = now_ms();
    let info = info(&q, &queue, id).await;
    assert_eq!(info.id, id);
    assert_eq!(info.queue, queue);
    assert_eq!(info.state, JobState::Ready);
    assert_eq!(info.attempts, 0);
    assert_eq!(info.max_retries, 4);
    assert_eq!(info.priority, 0);
    assert_eq!(info.tenant, "default");
    assert_eq!(info.payload, json!({"hello": "world"}));
    assert_eq!(info.result, None);
    assert_eq!(info.error, None);
    assert_eq!(info.finished_at_ms, None);
    assert_eq!(info.lease_expiries, 0);
    assert!(!info.cancel_requested);
    assert!(
        info.created_at_ms >= before - CLOCK_SLACK_MS
            && info.created_at_ms <= after + CLOCK_SLACK_MS,
        "created_at_ms {} outside [{before}, {after}]",
        info.created_at_ms
    );
    assert!(
        info.run_at_ms <= after + CLOCK_SLACK_MS,
        "a job without delay is runnable now"
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.scheduled, stats.running), (1, 0, 0));
}

/// `enqueue_many` returns one id per job, in input order.
pub async fn enqueue_many_returns_ids_in_order(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "many-order").await;
    let ids = q
        .enqueue_many((0..50).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue_many");
    assert_eq!(ids.len(), 50);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 50, "ids unique");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(n_of(&info(&q, &queue, *id).await.payload), n as u64);
    }
    let jobs = q.fetch(&queue, 50, LONG, SETTLE).await.expect("fetch");
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids,
        "one priority: fetched in enqueue order"
    );
}

/// One `enqueue_many` call takes at most `MAX_JOBS_PER_CALL` jobs: one more is refused
/// with `Error::InvalidJob` naming `jobs`, and nothing is stored.
pub async fn enqueue_many_over_the_call_limit_is_refused(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "call-limit").await;
    let jobs = (0..=flow_core::queue::MAX_JOBS_PER_CALL as u64)
        .map(|n| job(&queue, n))
        .collect();
    match q.enqueue_many(jobs).await {
        Err(Error::InvalidJob { option: "jobs", .. }) => {}
        other => panic!(
            "{} jobs in one call should be refused naming `jobs`, got {:?}",
            flow_core::queue::MAX_JOBS_PER_CALL + 1,
            other.map(|ids| ids.len())
        ),
    }
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(stats.ready, 0, "a refused call stores nothing");
}

/// A batch with one bad job stores nothing.
pub async fn enqueue_many_is_all_or_nothing(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            max_payload_bytes: 1024,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("many-atomic");
    let other = qname("many-atomic-other");

    let bad_name = vec![job(&queue, 1), job(&other, 2), job("bad name", 3)];
    assert_invalid_name(q.enqueue_many(bad_name).await, "enqueue_many", "bad name");

    let too_large = vec![
        job(&queue, 1),
        NewJob::new(&queue, json!("x".repeat(2000))),
        job(&queue, 3),
    ];
    let result = q.enqueue_many(too_large).await;
    assert!(
        matches!(result, Err(Error::PayloadTooLarge { .. })),
        "expected PayloadTooLarge, got {result:?}"
    );

    let bad_tenant = vec![job(&queue, 1), job(&queue, 2).tenant("")];
    let result = q.enqueue_many(bad_tenant).await;
    assert!(
        matches!(result, Err(Error::InvalidJob { .. })),
        "expected InvalidJob for an empty tenant, got {result:?}"
    );

    for name in [&queue, &other] {
        let stats = q.stats(name).await.expect("stats");
        assert_eq!(
            (stats.ready, stats.scheduled),
            (0, 0),
            "a refused batch must store nothing in {name}"
        );
    }
    assert_nothing_to_fetch(&q, &queue, "refused batches store nothing").await;

    let ids = q
        .enqueue_many(vec![job(&queue, 1), job(&queue, 2)])
        .await
        .expect("a good batch is accepted");
    assert_eq!(ids.len(), 2);
    assert!(
        q.enqueue_many(Vec::new())
            .await
            .expect("empty batch")
            .is_empty()
    );
}

const BAD_NAMES: &[&str] = &["", "has space", "a/b", "tab\there", "ünïcode", "semi;colon"];

/// Every operation refuses a bad queue name with `InvalidQueueName` and stores nothing.
pub async fn invalid_queue_names_are_refused(factory: impl QueueFactory) {
    let (q, good) = setup(&factory, "bad-names").await;
    let long = "a".repeat(129);
    let names: Vec<&str> = BAD_NAMES
        .iter()
        .copied()
        .chain(std::iter::once(long.as_str()))
        .collect();
    let id = Uuid::now_v7();
    for name in names {
        assert_invalid_name(q.enqueue(job(name, 1)).await, "enqueue", name);
        assert_invalid_name(
            q.enqueue_many(vec![job(&good, 1), job(name, 2)]).await,
            "enqueue_many",
            name,
        );
        assert_invalid_name(q.fetch(name, 1, LONG, Duration::ZERO).await, "fetch", name);
        assert_invalid_name(q.reap(name).await, "reap", name);
        assert_invalid_name(q.job(name, id).await, "job", name);
        assert_invalid_name(q.cancel(name, id).await, "cancel", name);
        assert_invalid_name(q.stats(name).await, "stats", name);
        assert_invalid_name(q.dead_letters(name, 0, 10).await, "dead_letters", name);
        assert_invalid_name(q.requeue_dead(name, id).await, "requeue_dead", name);
        assert_invalid_name(q.requeue_all_dead(name).await, "requeue_all_dead", name);
        assert_invalid_name(q.purge_dead(name).await, "purge_dead", name);
        assert_invalid_name(q.pause(name).await, "pause", name);
        assert_invalid_name(q.resume(name).await, "resume", name);
    }
    let stats = q.stats(&good).await.expect("stats");
    assert_eq!(stats.ready, 0, "refused batches store nothing");
}

/// Names of 1 and 128 characters and every allowed punctuation mark work.
pub async fn valid_queue_name_edge_cases_are_accepted(factory: impl QueueFactory) {
    let q = build(&factory, QueueOptions::default()).await;
    let base = qname("edge");
    let mut max_len = format!("{base}-");
    while max_len.len() < 128 {
        max_len.push('x');
    }
    let punctuation = format!("{base}.A_z:0-9");
    for name in [max_len.as_str(), punctuation.as_str()] {
        let id = q.enqueue(job(name, 1)).await.expect("enqueue");
        let leased = fetch_one(&q, name, LONG).await;
        assert_eq!(leased.id, id);
        assert_eq!(leased.queue, name);
        q.complete(&leased.lease, json!(null))
            .await
            .expect("complete");
    }
    // A one-character name is valid; it may be shared with other runs, so only the
    // validation is checked, not its content.
    q.stats("x").await.expect("a one-character name is valid");
}

/// Payloads over `max_payload_bytes` are refused; one exactly at the limit is accepted.
pub async fn payload_over_limit_is_refused(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            max_payload_bytes: 64,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("payload");
    // A JSON string of 62 characters serializes to 64 bytes with its quotes.
    let at_limit = json!("x".repeat(62));
    q.enqueue(NewJob::new(&queue, at_limit))
        .await
        .expect("a payload exactly at the limit is accepted");
    let result = q.enqueue(NewJob::new(&queue, json!("x".repeat(100)))).await;
    match result {
        Err(Error::PayloadTooLarge { size, limit }) => {
            assert_eq!(limit, 64);
            assert!(size > 64, "reported size {size}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let result = q
        .enqueue_many(vec![
            job(&queue, 1),
            NewJob::new(&queue, json!("y".repeat(100))),
        ])
        .await;
    assert!(
        matches!(result, Err(Error::PayloadTooLarge { .. })),
        "expected PayloadTooLarge, got {result:?}"
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(stats.ready, 1, "only the job at the limit is stored");
}

/// Every field of a job has a limit, the same on every backend (`flow_core::queue`'s
/// `MAX_*` constants): a job with a field exactly at its limit is accepted and reads back
/// whole; one byte (or one header) more is refused with `Error::InvalidJob` naming the
/// field, by `enqueue` and by `enqueue_many`, and a refused batch stores nothing. A
/// dedupe key at its limit still dedupes.
pub async fn fields_over_their_limits_are_refused_naming_the_field(factory: impl QueueFactory) {
    use flow_core::queue::{
        MAX_DEDUPE_KEY_BYTES, MAX_HEADER_NAME_BYTES, MAX_HEADER_VALUE_BYTES, MAX_HEADERS,
        MAX_HEADERS_BYTES, MAX_TENANT_BYTES,
    };
    let (q, queue) = setup(&factory, "field-limits").await;
    let batch_queue = qname("field-limits-batch");
    let base = || job(&queue, 1);
    let many_headers = |n: usize| (0..n).fold(base(), |j, i| j.header(format!("h{i}"), "v"));
    let half = MAX_HEADERS_BYTES / 2 - 1;
    let cases: Vec<(&str, &str, NewJob, NewJob)> = vec![
        (
            "tenant",
            "tenant",
            base().tenant("t".repeat(MAX_TENANT_BYTES)),
            base().tenant("t".repeat(MAX_TENANT_BYTES + 1)),
        ),
        (
            "dedupe key (bytes, not characters)",
            "dedupe_key",
            base().dedupe_key("é".repeat(MAX_DEDUPE_KEY_BYTES / 2)),
            base().dedupe_key(format!("{}k", "é".repeat(MAX_DEDUPE_KEY_BYTES / 2))),
        ),
        (
            "number of headers",
            "headers",
            many_headers(MAX_HEADERS),
            many_headers(MAX_HEADERS + 1),
        ),
        (
            "header name",
            "headers",
            base().header("n".repeat(MAX_HEADER_NAME_BYTES), "v"),
            base().header("n".repeat(MAX_HEADER_NAME_BYTES + 1), "v"),
        ),
        (
            "header value",
            "headers",
            base().header("baggage", "v".repeat(MAX_HEADER_VALUE_BYTES)),
            base().header("baggage", "v".repeat(MAX_HEADER_VALUE_BYTES + 1)),
        ),
        (
            "headers in all",
            "headers",
            base()
                .header("a", "v".repeat(half))
                .header("b", "v".repeat(half)),
            base()
                .header("a", "v".repeat(half))
                .header("b", "v".repeat(half))
                .header("c", ""),
        ),
    ];
    for (what, field, at_limit, over) in cases {
        let id = q
            .enqueue(at_limit.clone())
            .await
            .unwrap_or_else(|e| panic!("{what} exactly at its limit is accepted, got {e}"));
        let stored = info(&q, &queue, id).await;
        assert_eq!(
            (stored.tenant, stored.dedupe_key, stored.headers),
            (at_limit.tenant, at_limit.dedupe_key, at_limit.headers),
            "{what} at its limit reads back whole"
        );
        let result = q.enqueue(over.clone()).await;
        assert!(
            matches!(&result, Err(Error::InvalidJob { option, .. }) if *option == field),
            "{what} over its limit: expected InvalidJob naming {field}, got {result:?}"
        );
        let mut over_batch = over;
        over_batch.queue.clone_from(&batch_queue);
        let result = q
            .enqueue_many(vec![job(&batch_queue, 1), over_batch, job(&batch_queue, 3)])
            .await;
        assert!(
            matches!(&result, Err(Error::InvalidJob { option, .. }) if *option == field),
            "enqueue_many with {what} over its limit: expected InvalidJob naming {field}, got {result:?}"
        );
    }
    let stats = q.stats(&batch_queue).await.expect("stats");
    assert_eq!(
        (stats.ready, stats.scheduled),
        (0, 0),
        "refused batches store nothing"
    );
    let key = "é".repeat(MAX_DEDUPE_KEY_BYTES / 2);
    let first = q
        .enqueue(job(&queue, 7).dedupe_key(key.clone()))
        .await
        .expect("enqueue with a dedupe key at its limit");
    let second = q
        .enqueue(job(&queue, 8).dedupe_key(key))
        .await
        .expect("enqueue the same key again");
    assert_eq!(first, second, "a dedupe key at its limit dedupes");
}

/// What an attempt writes is bounded, never refused: a result over `MAX_RESULT_BYTES`
/// is stored as the truncation marker (with its original size), one at the limit
/// whole; a failure's message and details over their limits are stored cut down
/// exactly as `Failure::bounded` does it, by `retry`, `fail` and `mark_cancelled` alike.
pub async fn oversized_outcomes_are_stored_bounded(factory: impl QueueFactory) {
    use flow_core::queue::{MAX_FAILURE_MESSAGE_BYTES, MAX_RESULT_BYTES, truncated_marker};
    let (q, queue) = setup(&factory, "outcome-limits").await;
    q.enqueue_many((0..5).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue");
    let jobs = q.fetch(&queue, 5, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 5, "five jobs leased");
    let big = "m".repeat(100 * 1024);
    let failure = Failure {
        code: "NODE_EXCEPTION".into(),
        message: big.clone(),
        details: Some(json!({"message": big, "node_name": "summarise"})),
    };
    let bounded = failure.clone().bounded();
    assert!(bounded.message.len() <= MAX_FAILURE_MESSAGE_BYTES);

    // A JSON string of MAX_RESULT_BYTES - 2 characters takes exactly the limit.
    let at_limit = json!("r".repeat(MAX_RESULT_BYTES - 2));
    q.complete(&jobs[0].lease, at_limit.clone())
        .await
        .expect("complete at the limit");
    q.complete(&jobs[1].lease, json!("r".repeat(MAX_RESULT_BYTES)))
        .await
        .expect("complete over the limit is not refused");
    q.fail(&jobs[2].lease, failure.clone())
        .await
        .expect("fail with an oversized failure is not refused");
    q.retry(&jobs[3].lease, LONG, failure.clone())
        .await
        .expect("retry with an oversized failure is not refused");
    assert_eq!(
        q.cancel(&queue, jobs[4].id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    q.mark_cancelled(&jobs[4].lease, failure)
        .await
        .expect("mark_cancelled with an oversized failure is not refused");

    // (Compared without printing a megabyte on failure.)
    let kept = info(&q, &queue, jobs[0].id).await.result;
    assert!(
        kept.as_ref() == Some(&at_limit),
        "a result at the limit is kept whole, got {} bytes",
        kept.map_or(0, |v| v.to_string().len())
    );
    let over = info(&q, &queue, jobs[1].id).await;
    assert_eq!(over.state, JobState::Completed);
    let marker = truncated_marker(MAX_RESULT_BYTES + 2, MAX_RESULT_BYTES);
    assert!(
        over.result.as_ref() == Some(&marker),
        "a result over the limit is stored as the marker {marker}, got {} bytes",
        over.result.map_or(0, |v| v.to_string().len())
    );
    for (job, state) in [
        (&jobs[2], JobState::Dead),
        (&jobs[3], JobState::Scheduled),
        (&jobs[4], JobState::Cancelled),
    ] {
        let stored = info(&q, &queue, job.id).await;
        assert_eq!(stored.state, state);
        assert!(
            stored.error.as_ref() == Some(&bounded),
            "the {state} job's failure is stored bounded, got a message of {} bytes",
            stored.error.map_or(0, |e| e.message.len())
        );
    }
    let dead = q.dead_letters(&queue, 0, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error == bounded,
        "the dead letter's failure is bounded, got a message of {} bytes",
        dead[0].error.message.len()
    );
}

// ---------------------------------------------------------------------------------------
// Order and time

/// Lower priority values run first; FIFO within one priority.
pub async fn priority_lower_runs_first_fifo_within_priority(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "priority").await;
    // (priority, n) in enqueue order.
    let plan = [
        (5, 0),
        (0, 1),
        (-3, 2),
        (5, 3),
        (0, 4),
        (-3, 5),
        (10, 6),
        (0, 7),
    ];
    for &(priority, n) in &plan {
        q.enqueue(job(&queue, n).priority(priority))
            .await
            .expect("enqueue");
    }
    let mut expected = plan.to_vec();
    expected.sort_by_key(|&(priority, n)| (priority, n));
    let mut got = Vec::new();
    while got.len() < plan.len() {
        // Fetch one at a time and in small batches: both must respect the order.
        let max = if got.len() % 2 == 0 { 1 } else { 3 };
        let jobs = q.fetch(&queue, max, LONG, SETTLE).await.expect("fetch");
        assert!(!jobs.is_empty(), "jobs left to fetch");
        got.extend(jobs.iter().map(|j| (j.priority, n_of(&j.payload))));
    }
    assert_eq!(got, expected, "order is (priority asc, enqueue order)");
}

/// A delayed job is scheduled, not fetchable before its time, and fetchable after.
pub async fn delayed_job_waits_until_its_time(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "delay").await;
    let start = Instant::now();
    let id = q
        .enqueue(job(&queue, 1).delay(Duration::from_millis(500)))
        .await
        .expect("enqueue");
    let scheduled = info(&q, &queue, id).await;
    assert_eq!(scheduled.state, JobState::Scheduled);
    assert_nothing_to_fetch(&q, &queue, "a job delayed 500ms is not ready at once").await;
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.scheduled), (0, 1));
    // A fetch that waits well past its due time gets it, but not before its time.
    let leased = fetch_one(&q, &queue, LONG).await;
    assert_eq!(leased.id, id);
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "fetched {:?} after enqueue, before its 500ms delay",
        start.elapsed()
    );
    assert!(
        now_ms() + CLOCK_SLACK_MS / 10 >= scheduled.run_at_ms,
        "fetched before run_at"
    );
}

/// A run-at time in the past makes the job ready at once.
pub async fn run_at_in_the_past_is_ready(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "past").await;
    let id = q
        .enqueue(job(&queue, 1).run_at_ms(now_ms() - 60_000))
        .await
        .expect("enqueue");
    assert_eq!(info(&q, &queue, id).await.state, JobState::Ready);
    let jobs = q
        .fetch(&queue, 1, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(jobs.len(), 1, "a job due in the past is fetchable at once");
    assert_eq!(jobs[0].id, id);
}

/// `retry` with a delay records the failure, schedules the job and really waits.
pub async fn retry_with_delay_waits_and_records_failure(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "retry-delay").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let first = fetch_one(&q, &queue, LONG).await;
    assert_eq!(first.attempt, 1);
    let failure = Failure {
        code: "NODE_EXCEPTION".into(),
        message: "boom".into(),
        details: Some(json!({"node_name": "fetch"})),
    };
    let start = Instant::now();
    q.retry(&first.lease, Duration::from_millis(500), failure.clone())
        .await
        .expect("retry");
    let retried = info(&q, &queue, id).await;
    assert_eq!(retried.state, JobState::Scheduled);
    assert_eq!(retried.error.as_ref(), Some(&failure), "failure recorded");
    assert_eq!(retried.attempts, 1);
    assert_nothing_to_fetch(&q, &queue, "a retry delayed 500ms is not ready at once").await;
    let second = fetch_one(&q, &queue, LONG).await;
    assert_eq!(second.id, id);
    assert_eq!(second.attempt, 2, "the retry is attempt 2");
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "retry ran {:?} after retry(), before its 500ms delay",
        start.elapsed()
    );
}

/// `retry` with no delay makes the job ready at once.
pub async fn retry_without_delay_is_ready_at_once(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "retry-now").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let first = fetch_one(&q, &queue, LONG).await;
    q.retry(&first.lease, Duration::ZERO, Failure::new("X", "again"))
        .await
        .expect("retry");
    let jobs = q
        .fetch(&queue, 1, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert_eq!(jobs.len(), 1, "a retry without delay is ready at once");
    assert_eq!(jobs[0].id, id);
    assert_eq!(jobs[0].attempt, 2);
    assert_eq!(
        info(&q, &queue, id).await.error.map(|e| e.code),
        Some("X".to_owned())
    );
}

// ---------------------------------------------------------------------------------------
// Dedupe

/// A second enqueue with a live dedupe key returns the first id and stores nothing.
pub async fn dedupe_key_returns_live_job_id(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "dedupe").await;
    let first = q
        .enqueue(job(&queue, 1).dedupe_key("welcome:42"))
        .await
        .expect("enqueue");
    let again = q
        .enqueue(job(&queue, 2).dedupe_key("welcome:42"))
        .await
        .expect("enqueue");
    assert_eq!(again, first, "live key returns the first job's id");
    let other = q
        .enqueue(job(&queue, 3).dedupe_key("welcome:43"))
        .await
        .expect("enqueue");
    assert_ne!(other, first);
    assert_eq!(q.stats(&queue).await.expect("stats").ready, 2);
    assert_eq!(
        n_of(&info(&q, &queue, first).await.payload),
        1,
        "first kept"
    );
    assert_eq!(
        info(&q, &queue, first).await.dedupe_key.as_deref(),
        Some("welcome:42")
    );

    // Still live while running and while scheduled for a retry.
    let leased = q
        .fetch(&queue, 2, LONG, SETTLE)
        .await
        .expect("fetch")
        .into_iter()
        .find(|j| j.id == first)
        .expect("first job fetched");
    let while_running = q
        .enqueue(job(&queue, 4).dedupe_key("welcome:42"))
        .await
        .expect("enqueue");
    assert_eq!(while_running, first, "a running job's key is live");
    q.retry(
        &leased.lease,
        Duration::from_secs(30),
        Failure::new("X", "x"),
    )
    .await
    .expect("retry");
    let while_scheduled = q
        .enqueue(job(&queue, 5).dedupe_key("welcome:42"))
        .await
        .expect("enqueue");
    assert_eq!(while_scheduled, first, "a scheduled job's key is live");
}

/// Once the job holding a key completed, died or was cancelled, the key is free again.
pub async fn dedupe_key_is_free_once_job_finished(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "dedupe-free").await;

    let completed = q
        .enqueue(job(&queue, 1).dedupe_key("k"))
        .await
        .expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    q.complete(&leased.lease, json!("done"))
        .await
        .expect("complete");
    let dead = q
        .enqueue(job(&queue, 2).dedupe_key("k"))
        .await
        .expect("enqueue");
    assert_ne!(dead, completed, "a completed job's key is free");

    let leased = fetch_one(&q, &queue, LONG).await;
    assert_eq!(leased.id, dead);
    q.fail(&leased.lease, Failure::new("X", "x"))
        .await
        .expect("fail");
    let cancelled = q
        .enqueue(job(&queue, 3).dedupe_key("k"))
        .await
        .expect("enqueue");
    assert_ne!(cancelled, dead, "a dead job's key is free");

    assert_eq!(
        q.cancel(&queue, cancelled).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let fourth = q
        .enqueue(job(&queue, 4).dedupe_key("k"))
        .await
        .expect("enqueue");
    assert_ne!(fourth, cancelled, "a cancelled job's key is free");
    assert_eq!(info(&q, &queue, fourth).await.state, JobState::Ready);
}

/// Within one `enqueue_many`, a repeated key returns the first job's id.
pub async fn dedupe_applies_within_enqueue_many(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "dedupe-many").await;
    let ids = q
        .enqueue_many(vec![
            job(&queue, 1).dedupe_key("a"),
            job(&queue, 2).dedupe_key("a"),
            job(&queue, 3).dedupe_key("b"),
            job(&queue, 4),
        ])
        .await
        .expect("enqueue_many");
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], ids[1], "same key in one batch: one job");
    assert_ne!(ids[0], ids[2]);
    assert_ne!(ids[2], ids[3]);
    assert_eq!(q.stats(&queue).await.expect("stats").ready, 3);
    let again = q
        .enqueue_many(vec![job(&queue, 5).dedupe_key("b")])
        .await
        .expect("enqueue_many");
    assert_eq!(again, vec![ids[2]], "a batch sees keys of earlier jobs");
}

/// Dedupe keys are scoped per queue.
pub async fn dedupe_keys_are_scoped_per_queue(factory: impl QueueFactory) {
    let q = build(&factory, QueueOptions::default()).await;
    let a = qname("dedupe-scope-a");
    let b = qname("dedupe-scope-b");
    let in_a = q
        .enqueue(job(&a, 1).dedupe_key("same"))
        .await
        .expect("enqueue");
    let in_b = q
        .enqueue(job(&b, 2).dedupe_key("same"))
        .await
        .expect("enqueue");
    assert_ne!(in_a, in_b, "the same key in two queues makes two jobs");
    assert_eq!(q.stats(&a).await.expect("stats").ready, 1);
    assert_eq!(q.stats(&b).await.expect("stats").ready, 1);
}

// ---------------------------------------------------------------------------------------
// Fetch

/// An empty fetch waits (about) its bound and returns nothing.
pub async fn fetch_waits_up_to_bound_and_returns_empty(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "fetch-wait").await;
    let start = Instant::now();
    let jobs = q
        .fetch(&queue, 5, LONG, Duration::from_millis(500))
        .await
        .expect("fetch");
    let took = start.elapsed();
    assert!(jobs.is_empty());
    assert!(
        took >= Duration::from_millis(400),
        "fetch should wait for its bound (500ms), returned after {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "fetch should return soon after its bound (500ms), took {took:?}"
    );
    let start = Instant::now();
    let jobs = q
        .fetch(&queue, 5, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    assert!(jobs.is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "a zero wait returns at once"
    );
}

/// A waiting fetch returns promptly when a job is enqueued, not at its bound.
pub async fn fetch_wakes_promptly_on_enqueue(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "fetch-wake").await;
    let waiter = {
        let q = q.clone();
        let queue = queue.clone();
        tokio::spawn(async move { q.fetch(&queue, 1, LONG, Duration::from_secs(5)).await })
    };
    sleep(Duration::from_millis(300)).await;
    let enqueued = Instant::now();
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let jobs = waiter.await.expect("fetch task panicked").expect("fetch");
    let took = enqueued.elapsed();
    assert_eq!(jobs.len(), 1, "the waiting fetch gets the job");
    assert_eq!(jobs[0].id, id);
    assert!(
        took < Duration::from_secs(2),
        "the waiting fetch should wake on enqueue, took {took:?} (bound 5s)"
    );
}

/// A waiting fetch returns a delayed job once it is due, within its wait.
pub async fn fetch_wakes_when_delayed_job_is_due(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "fetch-due").await;
    let start = Instant::now();
    let id = q
        .enqueue(job(&queue, 1).delay(Duration::from_millis(400)))
        .await
        .expect("enqueue");
    let jobs = q
        .fetch(&queue, 1, LONG, Duration::from_secs(5))
        .await
        .expect("fetch");
    let took = start.elapsed();
    assert_eq!(jobs.len(), 1, "the delayed job comes during the wait");
    assert_eq!(jobs[0].id, id);
    assert!(
        took >= Duration::from_millis(300),
        "fetched after {took:?}, before the 400ms delay"
    );
    assert!(
        took < Duration::from_secs(4),
        "a due job should be handed out soon after its time, took {took:?}"
    );
}

/// `fetch(max = N)` hands out at most N jobs; `max = 0` hands out none.
pub async fn fetch_returns_at_most_max(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "fetch-max").await;
    q.enqueue_many((0..10).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue_many");
    let none = q
        .fetch(&queue, 0, LONG, Duration::from_millis(100))
        .await
        .expect("fetch");
    assert!(none.is_empty(), "max 0 fetches nothing");
    let three = q.fetch(&queue, 3, LONG, SETTLE).await.expect("fetch");
    assert_eq!(three.len(), 3);
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.running), (7, 3));
    let mut rest = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while rest.len() < 7 && Instant::now() < deadline {
        let got = q.fetch(&queue, 100, LONG, SETTLE).await.expect("fetch");
        assert!(got.len() <= 100);
        rest.extend(got);
    }
    assert_eq!(rest.len(), 7, "the other 7 jobs");
    let all: HashSet<JobId> = three.iter().chain(&rest).map(|j| j.id).collect();
    assert_eq!(all.len(), 10, "no job handed out twice");
}

/// Each fetch counts one attempt and hands out a lease with a deadline and a new token.
pub async fn fetch_counts_attempts_and_issues_leases(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "lease").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let before = now_ms();
    let first = fetch_one(&q, &queue, Duration::from_secs(30)).await;
    let after = now_ms();
    assert_eq!(first.id, id);
    assert_eq!(first.attempt, 1);
    assert_eq!(first.lease.job_id, id);
    assert_eq!(first.lease.queue, queue);
    let expires = first.lease.expires_at_ms;
    assert!(
        expires >= before + 30_000 - CLOCK_SLACK_MS && expires <= after + 30_000 + CLOCK_SLACK_MS,
        "lease deadline {expires} should be about now + 30s ({before}..{after})"
    );
    let running = info(&q, &queue, id).await;
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.attempts, 1);

    q.retry(&first.lease, Duration::ZERO, Failure::new("X", "x"))
        .await
        .expect("retry");
    let second = fetch_one(&q, &queue, LONG).await;
    assert_eq!(second.attempt, 2);
    assert_ne!(
        second.lease.token, first.lease.token,
        "every lease gets a new fencing token"
    );
    assert_eq!(info(&q, &queue, id).await.attempts, 2);
}

/// 16 concurrent fetchers over 10,000 jobs: each job leased to one holder at a time and
/// completed exactly once.
pub async fn concurrent_fetchers_lease_each_job_once(factory: impl QueueFactory) {
    const JOBS: usize = 10_000;
    const WORKERS: usize = 16;
    const CHUNK: usize = 500;
    let (q, queue) = setup(&factory, "concurrent").await;
    let held: Arc<Mutex<HashSet<JobId>>> = Arc::default();
    let done: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
    let duplicates = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (q, queue) = (q.clone(), queue.clone());
        let (held, done) = (held.clone(), done.clone());
        let (duplicates, completed) = (duplicates.clone(), completed.clone());
        workers.push(tokio::spawn(async move {
            while completed.load(Ordering::SeqCst) < JOBS {
                let jobs = q
                    .fetch(&queue, 25, LONG, Duration::from_millis(200))
                    .await
                    .expect("fetch");
                for j in &jobs {
                    if !held.lock().expect("lock").insert(j.id) {
                        duplicates.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let results = if w % 2 == 0 {
                    q.complete_many(jobs.iter().map(|j| (j.lease.clone(), json!(w))).collect())
                        .await
                } else {
                    let mut results = Vec::new();
                    for j in &jobs {
                        results.push(q.complete(&j.lease, json!(w)).await);
                    }
                    results
                };
                for (j, result) in jobs.iter().zip(results) {
                    result.unwrap_or_else(|e| panic!("complete of {} failed: {e}", j.id));
                    held.lock().expect("lock").remove(&j.id);
                    *done.lock().expect("lock").entry(j.id).or_insert(0) += 1;
                    completed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    let mut ids = Vec::with_capacity(JOBS);
    for start in (0..JOBS).step_by(CHUNK) {
        let chunk = (start..start + CHUNK)
            .map(|n| job(&queue, n as u64))
            .collect();
        ids.extend(q.enqueue_many(chunk).await.expect("enqueue_many"));
    }
    for worker in workers {
        worker.await.expect("worker panicked");
    }

    assert_eq!(
        duplicates.load(Ordering::SeqCst),
        0,
        "a job was leased to two holders at once"
    );
    let done = done.lock().expect("lock").clone();
    let twice: Vec<_> = done.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    let missing = ids.iter().filter(|id| !done.contains_key(id)).count();
    assert_eq!(missing, 0, "{missing} jobs never completed");
    assert_eq!(done.len(), JOBS);
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(
        (stats.completed, stats.ready, stats.running, stats.dead),
        (JOBS as u64, 0, 0, 0),
        "stats after draining: {stats:?}"
    );
}

/// Fetch futures dropped at random points (timeouts) never lose a job: every job is
/// still completed exactly once, after reclaiming any lease whose answer was dropped.
pub async fn dropped_fetch_never_loses_a_job(factory: impl QueueFactory) {
    const JOBS: usize = 200;
    let (q, queue) = setup(&factory, "dropped-fetch").await;
    let done: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
    let dropped = Arc::new(AtomicUsize::new(0));
    let lease = Duration::from_millis(500);

    let record = |done: &Mutex<HashMap<JobId, usize>>, id: JobId| {
        *done.lock().expect("lock").entry(id).or_insert(0) += 1;
    };

    let mut workers = Vec::new();
    for w in 0..8usize {
        let (q, queue, done, dropped) = (q.clone(), queue.clone(), done.clone(), dropped.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..60usize {
                let cut = Duration::from_micros(((w * 7919 + i * 104_729) % 3000) as u64);
                match tokio::time::timeout(
                    cut,
                    q.fetch(&queue, 4, lease, Duration::from_millis(20)),
                )
                .await
                {
                    Err(_) => {
                        dropped.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(result) => {
                        for j in result.expect("fetch") {
                            match q.complete(&j.lease, json!("phase1")).await {
                                Ok(()) => record(&done, j.id),
                                Err(Error::LeaseLost { .. }) => {}
                                Err(e) => panic!("complete failed: {e}"),
                            }
                        }
                    }
                }
            }
        }));
    }
    let mut ids = Vec::new();
    for chunk in 0..20u64 {
        let batch = (0..10).map(|n| job(&queue, chunk * 10 + n)).collect();
        ids.extend(q.enqueue_many(batch).await.expect("enqueue_many"));
        sleep(Duration::from_millis(3)).await;
    }
    for worker in workers {
        worker.await.expect("worker panicked");
    }

    // Drain: reclaim leases whose fetch answer was dropped, then finish everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.lock().expect("lock").len() < JOBS && Instant::now() < deadline {
        q.reap(&queue).await.expect("reap");
        let jobs = q
            .fetch(&queue, 64, LONG, Duration::from_millis(200))
            .await
            .expect("fetch");
        for j in jobs {
            q.complete(&j.lease, json!("phase2"))
                .await
                .expect("complete");
            record(&done, j.id);
        }
    }
    let done = done.lock().expect("lock").clone();
    let twice: Vec<_> = done.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !done.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "jobs lost after {} dropped fetches: {missing:?}",
        dropped.load(Ordering::SeqCst)
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(
        (stats.completed, stats.ready, stats.running),
        (JOBS as u64, 0, 0)
    );
}

// ---------------------------------------------------------------------------------------
// Leases

/// Heartbeats keep a lease alive past its first deadline, so the reaper leaves it.
pub async fn heartbeat_extends_lease(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "heartbeat").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, Duration::from_millis(400)).await;
    let mut deadline = leased.lease.expires_at_ms;
    for _ in 0..3 {
        sleep(Duration::from_millis(250)).await;
        let hb = q
            .heartbeat(&leased.lease, Duration::from_secs(2))
            .await
            .expect("heartbeat on a live lease");
        assert!(
            hb.expires_at_ms > deadline,
            "heartbeat moves the deadline forward"
        );
        assert!(!hb.cancel_requested);
        deadline = hb.expires_at_ms;
    }
    // 750ms after a 400ms lease: only the heartbeats keep it.
    let report = q.reap(&queue).await.expect("reap");
    assert_eq!(report.total(), 0, "a heartbeated lease is not reclaimed");
    assert_eq!(info(&q, &queue, id).await.state, JobState::Running);
    q.complete(&leased.lease, json!("ok"))
        .await
        .expect("complete after heartbeats");
}

/// A lease reclaimed by the reaper and leased again is refused for every operation;
/// the new holder's outcome is the one recorded.
pub async fn stale_lease_is_refused(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            max_lease_expiries: 10,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("stale");
    let id = q
        .enqueue(job(&queue, 1).max_retries(5))
        .await
        .expect("enqueue");
    let old = fetch_one(&q, &queue, SHORT_LEASE).await;
    sleep(PAST_SHORT_LEASE).await;
    let report = q.reap(&queue).await.expect("reap");
    assert_eq!(report.requeued, vec![id]);
    let new = fetch_one(&q, &queue, LONG).await;
    assert_eq!(new.id, id);
    assert_ne!(new.lease.token, old.lease.token);

    let stale = &old.lease;
    assert_lease_lost(q.heartbeat(stale, LONG).await, "heartbeat");
    assert_lease_lost(q.complete(stale, json!("old")).await, "complete");
    assert_lease_lost(
        q.retry(stale, Duration::ZERO, Failure::new("X", "x")).await,
        "retry",
    );
    assert_lease_lost(q.fail(stale, Failure::new("X", "x")).await, "fail");
    assert_lease_lost(q.release(stale).await, "release");
    assert_lease_lost(
        q.mark_cancelled(stale, Failure::new("TRACE_CANCELLED", "x"))
            .await,
        "mark_cancelled",
    );
    let untouched = info(&q, &queue, id).await;
    assert_eq!(
        untouched.state,
        JobState::Running,
        "refused calls change nothing"
    );
    assert_eq!(untouched.attempts, 2);

    q.complete(&new.lease, json!("new"))
        .await
        .expect("the new holder completes");
    let finished = info(&q, &queue, id).await;
    assert_eq!(finished.state, JobState::Completed);
    assert_eq!(finished.result, Some(json!("new")));
    assert_lease_lost(
        q.complete(stale, json!("old")).await,
        "complete after the end",
    );
    assert_eq!(info(&q, &queue, id).await.result, Some(json!("new")));
}

/// A lease whose job already finished records nothing more.
pub async fn finished_lease_is_refused(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "finished").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    q.complete(&leased.lease, json!(1)).await.expect("complete");
    q.complete(&leased.lease, json!(2))
        .await
        .expect("a second complete is a replay: accepted, and it changes nothing");
    assert_lease_lost(
        q.fail(&leased.lease, Failure::new("X", "x")).await,
        "fail after complete",
    );
    assert_lease_lost(
        q.retry(&leased.lease, Duration::ZERO, Failure::new("X", "x"))
            .await,
        "retry after complete",
    );
    assert_lease_lost(q.release(&leased.lease).await, "release after complete");
    assert_lease_lost(
        q.heartbeat(&leased.lease, LONG).await,
        "heartbeat after complete",
    );
    let info = info(&q, &queue, id).await;
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.result, Some(json!(1)));
    assert_nothing_to_fetch(&q, &queue, "a completed job never comes back").await;
}

/// Leases with a wrong token, job or queue are refused.
pub async fn forged_lease_is_refused(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "forged").await;
    q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    let wrong_token = Lease {
        token: leased.lease.token.wrapping_add(1_000_003),
        ..leased.lease.clone()
    };
    assert_lease_lost(q.complete(&wrong_token, json!(0)).await, "wrong token");
    let wrong_job = Lease {
        job_id: Uuid::now_v7(),
        ..leased.lease.clone()
    };
    assert_lease_lost(q.complete(&wrong_job, json!(0)).await, "unknown job");
    let wrong_queue = Lease {
        queue: qname("forged-other"),
        ..leased.lease.clone()
    };
    assert_lease_lost(q.heartbeat(&wrong_queue, LONG).await, "wrong queue");
    q.complete(&leased.lease, json!("real"))
        .await
        .expect("the real lease still works");
}

/// A lease that expired but was not yet reclaimed or leased again may still complete.
pub async fn expired_unreclaimed_lease_can_still_complete(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "late-complete").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, SHORT_LEASE).await;
    sleep(PAST_SHORT_LEASE).await;
    q.complete(&leased.lease, json!("late"))
        .await
        .expect("an expired lease nobody reclaimed still records its outcome");
    assert_eq!(info(&q, &queue, id).await.state, JobState::Completed);
    assert_eq!(q.reap(&queue).await.expect("reap").total(), 0);
}

/// The reaper puts an expired job back to ready with the attempt counted and the
/// reason recorded; the next fetch is attempt 2.
pub async fn reaped_job_returns_ready_with_attempt_counted(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "reaped").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let first = fetch_one(&q, &queue, SHORT_LEASE).await;
    assert_eq!(first.attempt, 1);
    assert_eq!(
        q.reap(&queue).await.expect("reap").total(),
        0,
        "a live lease is not reclaimed"
    );
    sleep(PAST_SHORT_LEASE).await;
    let report = q.reap(&queue).await.expect("reap");
    assert_eq!(report.requeued, vec![id]);
    assert!(report.dead.is_empty());
    let back = info(&q, &queue, id).await;
    assert_eq!(back.state, JobState::Ready);
    assert_eq!(back.attempts, 1, "the lost attempt stays counted");
    assert_eq!(back.lease_expiries, 1);
    assert_eq!(
        back.error.as_ref().map(|e| e.code.as_str()),
        Some(CODE_LEASE_EXPIRED),
        "the reason is recorded"
    );
    let second = fetch_one(&q, &queue, LONG).await;
    assert_eq!(second.id, id);
    assert_eq!(second.attempt, 2);
    assert_eq!(info(&q, &queue, id).await.attempts, 2);
    assert_eq!(
        q.reap(&queue).await.expect("reap").total(),
        0,
        "reaping twice reclaims nothing more"
    );
}

/// A job whose lease expired with no attempts left goes to the dead-letter set with
/// `CODE_LEASE_EXPIRED`.
pub async fn reaper_dead_letters_job_without_attempts_left(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "reaped-dead").await;
    let id = q
        .enqueue(job(&queue, 1).max_retries(0))
        .await
        .expect("enqueue");
    fetch_one(&q, &queue, SHORT_LEASE).await;
    sleep(PAST_SHORT_LEASE).await;
    let report = q.reap(&queue).await.expect("reap");
    assert_eq!(report.dead, vec![id]);
    assert!(report.requeued.is_empty());
    let dead = info(&q, &queue, id).await;
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(
        dead.error.as_ref().map(|e| e.code.as_str()),
        Some(CODE_LEASE_EXPIRED)
    );
    let letters = q.dead_letters(&queue, 0, 10).await.expect("dead_letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, id);
    assert_eq!(letters[0].error.code, CODE_LEASE_EXPIRED);
    assert_nothing_to_fetch(&q, &queue, "a dead job is not fetched").await;
}

/// A job whose lease expired `max_lease_expiries` times is dead-lettered with
/// `CODE_LEASE_EXPIRED_TOO_OFTEN`, even with retries left.
pub async fn lease_expiring_too_often_dead_letters(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            max_lease_expiries: 2,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("too-often");
    let id = q
        .enqueue(job(&queue, 1).max_retries(10))
        .await
        .expect("enqueue");
    fetch_one(&q, &queue, SHORT_LEASE).await;
    sleep(PAST_SHORT_LEASE).await;
    assert_eq!(q.reap(&queue).await.expect("reap").requeued, vec![id]);
    let second = fetch_one(&q, &queue, SHORT_LEASE).await;
    assert_eq!(second.attempt, 2);
    sleep(PAST_SHORT_LEASE).await;
    let report = q.reap(&queue).await.expect("reap");
    assert_eq!(report.dead, vec![id], "second expiry of 2 allowed: dead");
    let dead = info(&q, &queue, id).await;
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.lease_expiries, 2);
    assert_eq!(
        dead.error.as_ref().map(|e| e.code.as_str()),
        Some(CODE_LEASE_EXPIRED_TOO_OFTEN)
    );
    let letters = q.dead_letters(&queue, 0, 10).await.expect("dead_letters");
    assert_eq!(letters[0].error.code, CODE_LEASE_EXPIRED_TOO_OFTEN);
}

/// `release` hands a job back ready without counting the attempt.
pub async fn release_does_not_count_attempt(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "release").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let first = fetch_one(&q, &queue, LONG).await;
    assert_eq!(first.attempt, 1);
    q.release(&first.lease).await.expect("release");
    let back = info(&q, &queue, id).await;
    assert_eq!(back.state, JobState::Ready);
    assert_eq!(back.attempts, 0, "a released attempt is not counted");
    assert_eq!(back.error, None, "a release is not a failure");
    let again = fetch_one(&q, &queue, LONG).await;
    assert_eq!(again.id, id);
    assert_eq!(again.attempt, 1);
    assert_ne!(again.lease.token, first.lease.token);
    assert_lease_lost(
        q.complete(&first.lease, json!(0)).await,
        "complete after release",
    );
}

/// Jobs fetched *held* (`fetch_held`: leased to a worker that will start them later)
/// are never charged for waiting: when the lease of a held job runs out, the reaper puts
/// it back to ready with its attempt taken back and no lease expiry counted, even with
/// `max_retries(0)`. A job marked started is charged as usual.
pub async fn held_jobs_are_not_charged_when_their_lease_expires(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "held").await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            q.enqueue(job(&queue, n).max_retries(0))
                .await
                .expect("enqueue"),
        );
    }
    let jobs = q
        .fetch_held(&queue, 4, 1, SHORT_LEASE, SETTLE)
        .await
        .expect("fetch_held");
    assert_eq!(jobs.len(), 4, "fetch_held leases every job asked for");
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids,
        "in line order"
    );
    // The worker starts the second job from its prefetch and says so; then it dies.
    q.mark_started(std::slice::from_ref(&jobs[1].lease))
        .await
        .expect("mark_started");
    sleep(PAST_SHORT_LEASE).await;
    let report = q.reap(&queue).await.expect("reap");
    let mut dead = report.dead.clone();
    dead.sort();
    let mut started = vec![ids[0], ids[1]];
    started.sort();
    assert_eq!(
        dead, started,
        "the started jobs had no attempts left: dead of their lease"
    );
    let mut requeued = report.requeued.clone();
    requeued.sort();
    let mut held = vec![ids[2], ids[3]];
    held.sort();
    assert_eq!(requeued, held, "the held jobs go back to ready");
    for &id in &ids[2..] {
        let back = info(&q, &queue, id).await;
        assert_eq!(back.state, JobState::Ready);
        assert_eq!(back.attempts, 0, "a held job is not charged an attempt");
        assert_eq!(back.lease_expiries, 0, "nor a lease expiry");
    }
    for &id in &ids[..2] {
        let dead = info(&q, &queue, id).await;
        assert_eq!(dead.state, JobState::Dead);
        assert_eq!(
            dead.error.as_ref().map(|e| e.code.as_str()),
            Some(CODE_LEASE_EXPIRED)
        );
    }
    // The held jobs run again as attempt 1, and their old leases are dead.
    let again = q.fetch(&queue, 10, LONG, SETTLE).await.expect("fetch");
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    assert!(again.iter().all(|j| j.attempt == 1));
    assert_lease_lost(
        q.complete(&jobs[2].lease, json!(0)).await,
        "complete with a held lease the reaper took back",
    );
    for j in &again {
        q.complete(&j.lease, json!("ok")).await.expect("complete");
    }
    // A held job that finishes is recorded like any other; `release` of a held job
    // charges nothing either.
    let a = q.enqueue(job(&queue, 10)).await.expect("enqueue");
    let b = q.enqueue(job(&queue, 11)).await.expect("enqueue");
    let pair = q
        .fetch_held(&queue, 2, 0, LONG, SETTLE)
        .await
        .expect("fetch_held");
    assert_eq!(pair.len(), 2);
    q.complete(&pair[0].lease, json!("done"))
        .await
        .expect("complete a held job");
    q.release(&pair[1].lease).await.expect("release a held job");
    assert_eq!(info(&q, &queue, a).await.state, JobState::Completed);
    let released = info(&q, &queue, b).await;
    assert_eq!((released.state, released.attempts), (JobState::Ready, 0));
}

/// A held job that heartbeats has started (only a running job heartbeats): its lease
/// expiring is charged. And a job held by workers that keep dying is uncharged only up to
/// `max_lease_expiries` times; after that its deaths are charged like any other, so a
/// job that kills its worker right after starting from a prefetch (before the start was
/// reported) is still dead-lettered.
pub async fn held_jobs_are_charged_once_started_or_past_the_expiry_limit(
    factory: impl QueueFactory,
) {
    let q = build(
        &factory,
        QueueOptions {
            max_lease_expiries: 2,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("held-charged");
    let beating = q
        .enqueue(job(&queue, 1).max_retries(0))
        .await
        .expect("enqueue");
    let held = q
        .fetch_held(&queue, 1, 0, SHORT_LEASE, SETTLE)
        .await
        .expect("fetch_held");
    assert_eq!(held.len(), 1);
    q.heartbeat(&held[0].lease, SHORT_LEASE)
        .await
        .expect("heartbeat");
    sleep(PAST_SHORT_LEASE).await;
    assert_eq!(q.reap(&queue).await.expect("reap").dead, vec![beating]);

    let poison = q
        .enqueue(job(&queue, 2).max_retries(10))
        .await
        .expect("enqueue");
    for round in 1..=2u32 {
        let held = q
            .fetch_held(&queue, 1, 0, SHORT_LEASE, SETTLE)
            .await
            .expect("fetch_held");
        assert_eq!(held.len(), 1);
        sleep(PAST_SHORT_LEASE).await;
        assert_eq!(q.reap(&queue).await.expect("reap").requeued, vec![poison]);
        let back = info(&q, &queue, poison).await;
        assert_eq!(
            (back.attempts, back.lease_expiries),
            (0, 0),
            "held death {round} of 2 allowed is not charged"
        );
    }
    let held = q
        .fetch_held(&queue, 1, 0, SHORT_LEASE, SETTLE)
        .await
        .expect("fetch_held");
    assert_eq!(held.len(), 1);
    sleep(PAST_SHORT_LEASE).await;
    assert_eq!(q.reap(&queue).await.expect("reap").requeued, vec![poison]);
    let charged = info(&q, &queue, poison).await;
    assert_eq!(
        (charged.attempts, charged.lease_expiries),
        (1, 1),
        "past the limit a held death is charged"
    );
}

/// A fetch whose caller went away after the backend leased its jobs hands them back at
/// once, their attempt not counted: with `max_retries(0)` and a lease far longer than
/// the test, every job still runs (as attempt 1) and nothing is dead-lettered, without
/// any reaping.
pub async fn dropped_fetch_hands_its_jobs_back_uncharged(factory: impl QueueFactory) {
    const JOBS: u64 = 120;
    let (q, queue) = setup(&factory, "dropped-handback").await;
    let mut ids = Vec::new();
    for chunk in 0..(JOBS / 10) {
        let batch = (0..10)
            .map(|n| job(&queue, chunk * 10 + n).max_retries(0))
            .collect();
        ids.extend(q.enqueue_many(batch).await.expect("enqueue_many"));
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut cutters = Vec::new();
    for w in 0..6usize {
        let (q, queue, dropped) = (q.clone(), queue.clone(), dropped.clone());
        cutters.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..40usize {
                // Cut the fetch at spread-out points: before, during and after the
                // backend leased its jobs.
                let cut = Duration::from_micros(((w * 7919 + i * 104_729) % 2500) as u64);
                match tokio::time::timeout(cut, q.fetch(&queue, 3, LONG, Duration::ZERO)).await {
                    Err(_) => {
                        dropped.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(result) => {
                        for j in result.expect("fetch") {
                            assert_eq!(j.attempt, 1, "job {} charged before it ran", j.id);
                            q.complete(&j.lease, json!("cut")).await.expect("complete");
                            got.push(j.id);
                        }
                    }
                }
            }
            got
        }));
    }
    let mut done: HashMap<JobId, usize> = HashMap::new();
    for c in cutters {
        for id in c.await.expect("cutter panicked") {
            *done.entry(id).or_insert(0) += 1;
        }
    }
    q.flush().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < ids.len() && Instant::now() < deadline {
        for j in q
            .fetch(&queue, 50, LONG, Duration::from_millis(100))
            .await
            .expect("fetch")
        {
            assert_eq!(
                j.attempt, 1,
                "job {} was charged for a fetch nobody read",
                j.id
            );
            q.complete(&j.lease, json!("rest")).await.expect("complete");
            *done.entry(j.id).or_insert(0) += 1;
        }
    }
    let missing: Vec<_> = ids.iter().filter(|id| !done.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} jobs stayed leased to nobody after {} dropped fetches (no reaper ran): {missing:?}",
        missing.len(),
        ids.len(),
        dropped.load(Ordering::SeqCst)
    );
    assert!(done.values().all(|&c| c == 1), "a job ran twice");
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.dead, stats.running, stats.ready), (0, 0, 0));
}

/// An outcome sent again with the same lease after it was recorded (the first reply was
/// lost) is accepted and changes nothing, so the worker counts it as what it was. A
/// lease the reaper took back is refused, also when the job's state would match.
pub async fn outcome_sent_again_after_a_lost_reply_is_accepted(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "replay").await;
    for n in 0..4 {
        q.enqueue(job(&queue, n)).await.expect("enqueue");
    }
    let jobs = q.fetch(&queue, 4, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 4);
    let failure = Failure::new("NODE_EXCEPTION", "boom");
    q.complete(&jobs[0].lease, json!("first"))
        .await
        .expect("complete");
    q.complete(&jobs[0].lease, json!("second"))
        .await
        .expect("the same completion sent again is accepted");
    let done = info(&q, &queue, jobs[0].id).await;
    assert_eq!(
        (done.state, done.result),
        (JobState::Completed, Some(json!("first")))
    );
    let many = q
        .complete_many(vec![(jobs[0].lease.clone(), json!("third"))])
        .await;
    assert!(
        matches!(many.as_slice(), [Ok(())]),
        "complete_many replay: {many:?}"
    );

    q.fail(&jobs[1].lease, failure.clone()).await.expect("fail");
    q.fail(&jobs[1].lease, failure.clone())
        .await
        .expect("the same fail sent again is accepted");
    assert_eq!(q.stats(&queue).await.expect("stats").dead, 1, "dead once");

    q.retry(&jobs[2].lease, Duration::from_secs(30), failure.clone())
        .await
        .expect("retry");
    q.retry(&jobs[2].lease, Duration::from_secs(30), failure.clone())
        .await
        .expect("the same retry sent again is accepted");
    let retried = info(&q, &queue, jobs[2].id).await;
    assert_eq!((retried.state, retried.attempts), (JobState::Scheduled, 1));

    q.cancel(&queue, jobs[3].id).await.expect("cancel");
    let cancelled = Failure::new("TRACE_CANCELLED", "cancelled");
    q.mark_cancelled(&jobs[3].lease, cancelled.clone())
        .await
        .expect("mark_cancelled");
    q.mark_cancelled(&jobs[3].lease, cancelled)
        .await
        .expect("the same mark_cancelled sent again is accepted");

    // A reclaimed lease: the job is ready again, as a retry would leave it, but the
    // reaper took the lease back, so nothing sent with it passes.
    let id = q.enqueue(job(&queue, 9)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, SHORT_LEASE).await;
    assert_eq!(leased.id, id);
    sleep(PAST_SHORT_LEASE).await;
    assert_eq!(q.reap(&queue).await.expect("reap").requeued, vec![id]);
    assert_lease_lost(
        q.retry(&leased.lease, Duration::ZERO, failure.clone())
            .await,
        "retry with a reclaimed lease",
    );
    assert_lease_lost(
        q.release(&leased.lease).await,
        "release with a reclaimed lease",
    );
    assert_lease_lost(
        q.complete(&leased.lease, json!(0)).await,
        "complete with a reclaimed lease",
    );
}

/// Every lease of a job gets a token of its own, never 0.
pub async fn every_lease_gets_a_fresh_token(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "tokens").await;
    q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let leased = fetch_one(&q, &queue, LONG).await;
        assert_ne!(leased.lease.token, 0);
        assert!(
            seen.insert(leased.lease.token),
            "token {} handed out twice",
            leased.lease.token
        );
        q.release(&leased.lease).await.expect("release");
    }
}

// ---------------------------------------------------------------------------------------
// Results

/// `complete` stores the result, readable by id.
pub async fn complete_stores_result(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "result").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    let before = now_ms();
    q.complete(&leased.lease, json!({"answer": 42, "list": [1, 2]}))
        .await
        .expect("complete");
    let done = info(&q, &queue, id).await;
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result, Some(json!({"answer": 42, "list": [1, 2]})));
    assert_eq!(done.attempts, 1);
    let finished = done.finished_at_ms.expect("finished_at_ms set");
    assert!(finished >= before - CLOCK_SLACK_MS && finished <= now_ms() + CLOCK_SLACK_MS);
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.completed, stats.running, stats.ready), (1, 0, 0));
    assert_nothing_to_fetch(&q, &queue, "a completed job is not fetched").await;
}

/// `complete_many` fences each lease on its own.
pub async fn complete_many_fences_per_job(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "complete-many").await;
    q.enqueue_many((0..3).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue_many");
    let jobs = q.fetch(&queue, 3, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 3);
    q.complete(&jobs[1].lease, json!("first"))
        .await
        .expect("complete");
    let results = q
        .complete_many(
            jobs.iter()
                .map(|j| {
                    (
                        j.lease.clone(),
                        json!(format!("batch-{}", n_of(&j.payload))),
                    )
                })
                .collect(),
        )
        .await;
    assert_eq!(results.len(), 3, "one answer per item");
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        results[1].is_ok(),
        "an item completed before with the same lease is a replay: {:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert_eq!(
        info(&q, &queue, jobs[1].id).await.result,
        Some(json!("first")),
        "the replayed item changed nothing"
    );
    // A stale item among fresh ones is refused on its own.
    let x = q.enqueue(job(&queue, 7)).await.expect("enqueue");
    let y = q.enqueue(job(&queue, 8)).await.expect("enqueue");
    let stale = fetch_one(&q, &queue, LONG).await;
    assert_eq!(stale.id, x);
    q.release(&stale.lease).await.expect("release");
    let both = q.fetch(&queue, 2, LONG, SETTLE).await.expect("fetch");
    assert_eq!(both.iter().map(|j| j.id).collect::<Vec<_>>(), vec![x, y]);
    let results = q
        .complete_many(vec![
            (stale.lease.clone(), json!("stale")),
            (both[1].lease.clone(), json!("fresh")),
        ])
        .await;
    assert!(
        matches!(results[0], Err(Error::LeaseLost { .. })),
        "the stale item is refused: {:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "{:?}", results[1]);
    assert_eq!(info(&q, &queue, x).await.state, JobState::Running);
    assert_eq!(info(&q, &queue, y).await.result, Some(json!("fresh")));
    let n0 = n_of(&jobs[0].payload);
    assert_eq!(
        info(&q, &queue, jobs[0].id).await.result,
        Some(json!(format!("batch-{n0}")))
    );
    assert!(q.complete_many(Vec::new()).await.is_empty());
}

/// Completed and cancelled jobs are forgotten after the retention time; dead ones stay.
pub async fn results_expire_after_retention(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            result_retention: Duration::from_millis(300),
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("retention");
    let completed = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    q.complete(&leased.lease, json!("kept for a while"))
        .await
        .expect("complete");
    let dead = q.enqueue(job(&queue, 2)).await.expect("enqueue");
    kill_one(&q, &queue, "BROKEN").await;
    let cancelled = q.enqueue(job(&queue, 3)).await.expect("enqueue");
    q.cancel(&queue, cancelled).await.expect("cancel");

    assert_eq!(
        info(&q, &queue, completed).await.result,
        Some(json!("kept for a while")),
        "readable within the retention time"
    );
    assert_eq!(info(&q, &queue, cancelled).await.state, JobState::Cancelled);

    sleep(Duration::from_millis(700)).await;
    q.reap(&queue).await.expect("reap");
    assert_eq!(
        q.job(&queue, completed).await.expect("job"),
        None,
        "a completed job is forgotten after the retention time"
    );
    assert_eq!(
        q.job(&queue, cancelled).await.expect("job"),
        None,
        "a cancelled job is forgotten after the retention time"
    );
    assert_eq!(
        info(&q, &queue, dead).await.state,
        JobState::Dead,
        "dead jobs stay while in the dead-letter set"
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.completed, stats.dead), (0, 1));
}

// ---------------------------------------------------------------------------------------
// Dead letters

/// `fail` moves the job to the dead-letter set with its failure.
pub async fn fail_moves_job_to_dead_letters(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "fail").await;
    let id = q
        .enqueue(NewJob::new(&queue, json!({"doc": 7})).tenant("acme"))
        .await
        .expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    let failure = Failure {
        code: "INVALID_PAYLOAD".into(),
        message: "missing field `user`".into(),
        details: Some(json!({"code": "INVALID_PAYLOAD", "metadata": {"attempt": 1}})),
    };
    let before = now_ms();
    q.fail(&leased.lease, failure.clone()).await.expect("fail");
    let after = now_ms();
    let dead = info(&q, &queue, id).await;
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.error.as_ref(), Some(&failure));
    let letters = q.dead_letters(&queue, 0, 10).await.expect("dead_letters");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.id, id);
    assert_eq!(letter.queue, queue);
    assert_eq!(letter.error, failure);
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.payload, json!({"doc": 7}));
    assert_eq!(letter.tenant, "acme");
    assert!(
        letter.failed_at_ms >= before - CLOCK_SLACK_MS
            && letter.failed_at_ms <= after + CLOCK_SLACK_MS
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.dead, stats.running, stats.ready), (1, 0, 0));
    assert_nothing_to_fetch(&q, &queue, "a dead job is not fetched").await;
}

/// Dead letters are listed newest first, with offset and limit.
pub async fn dead_letters_newest_first_with_paging(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "dead-paging").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        q.enqueue(job(&queue, n)).await.expect("enqueue");
        ids.push(kill_one(&q, &queue, "BROKEN").await.id);
        sleep(Duration::from_millis(5)).await;
    }
    let newest_first: Vec<JobId> = ids.iter().rev().copied().collect();
    let all = q.dead_letters(&queue, 0, 100).await.expect("dead_letters");
    assert_eq!(
        all.iter().map(|d| d.id).collect::<Vec<_>>(),
        newest_first,
        "newest first"
    );
    let page = |offset: usize, limit: usize| {
        let q = q.clone();
        let queue = queue.clone();
        async move {
            q.dead_letters(&queue, offset, limit)
                .await
                .expect("dead_letters")
                .into_iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(0, 2).await, newest_first[0..2]);
    assert_eq!(page(2, 2).await, newest_first[2..4]);
    assert_eq!(page(4, 2).await, newest_first[4..5]);
    assert!(page(5, 2).await.is_empty());
    assert!(page(0, 0).await.is_empty());
}

/// `requeue_dead` makes the job ready again with attempts and lease expiries reset.
pub async fn requeue_dead_resets_attempts(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "requeue").await;
    let id = q
        .enqueue(job(&queue, 1).max_retries(1))
        .await
        .expect("enqueue");
    let first = fetch_one(&q, &queue, LONG).await;
    q.retry(&first.lease, Duration::ZERO, Failure::new("X", "x"))
        .await
        .expect("retry");
    let second = fetch_one(&q, &queue, LONG).await;
    assert_eq!(second.attempt, 2);
    q.fail(&second.lease, Failure::new("X", "spent"))
        .await
        .expect("fail");
    assert_eq!(info(&q, &queue, id).await.attempts, 2);

    q.requeue_dead(&queue, id).await.expect("requeue_dead");
    let back = info(&q, &queue, id).await;
    assert_eq!(back.state, JobState::Ready);
    assert_eq!(back.attempts, 0, "attempts reset");
    assert_eq!(back.lease_expiries, 0);
    assert_eq!(back.finished_at_ms, None);
    assert!(
        q.dead_letters(&queue, 0, 10)
            .await
            .expect("dead_letters")
            .is_empty(),
        "no longer a dead letter"
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.dead, stats.ready), (0, 1));
    let again = fetch_one(&q, &queue, LONG).await;
    assert_eq!(again.id, id);
    assert_eq!(again.attempt, 1, "a fresh start");
    assert!(again.can_retry());
}

/// `requeue_dead` refuses unknown jobs (`JobNotFound`) and live ones (`InvalidState`).
pub async fn requeue_dead_refuses_unknown_and_live_jobs(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "requeue-refused").await;
    let unknown = q.requeue_dead(&queue, Uuid::now_v7()).await;
    assert!(
        matches!(unknown, Err(Error::JobNotFound { .. })),
        "unknown id: {unknown:?}"
    );
    let ready = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let result = q.requeue_dead(&queue, ready).await;
    assert!(
        matches!(result, Err(Error::InvalidState { .. })),
        "ready job: {result:?}"
    );
    let leased = fetch_one(&q, &queue, LONG).await;
    let result = q.requeue_dead(&queue, ready).await;
    assert!(
        matches!(result, Err(Error::InvalidState { .. })),
        "running job: {result:?}"
    );
    q.complete(&leased.lease, json!(1)).await.expect("complete");
    let result = q.requeue_dead(&queue, ready).await;
    assert!(
        matches!(result, Err(Error::InvalidState { .. })),
        "completed job: {result:?}"
    );
    assert_eq!(info(&q, &queue, ready).await.state, JobState::Completed);
}

/// `requeue_all_dead` and `purge_dead` act on every dead letter and return the count.
pub async fn requeue_all_dead_and_purge_dead_count(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "requeue-all").await;
    assert_eq!(q.requeue_all_dead(&queue).await.expect("requeue_all"), 0);
    assert_eq!(q.purge_dead(&queue).await.expect("purge"), 0);
    q.enqueue_many((0..3).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue_many");
    for _ in 0..3 {
        kill_one(&q, &queue, "BROKEN").await;
    }
    assert_eq!(q.stats(&queue).await.expect("stats").dead, 3);
    assert_eq!(q.requeue_all_dead(&queue).await.expect("requeue_all"), 3);
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.dead, stats.ready), (0, 3));
    let jobs = q.fetch(&queue, 10, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 3, "every requeued job is fetchable");
    assert!(jobs.iter().all(|j| j.attempt == 1), "attempts reset");

    let purged: Vec<JobId> = jobs[..2].iter().map(|j| j.id).collect();
    for j in &jobs[..2] {
        q.fail(&j.lease, Failure::new("X", "x"))
            .await
            .expect("fail");
    }
    q.complete(&jobs[2].lease, json!(1))
        .await
        .expect("complete");
    assert_eq!(q.purge_dead(&queue).await.expect("purge"), 2);
    assert!(
        q.dead_letters(&queue, 0, 10)
            .await
            .expect("dead_letters")
            .is_empty()
    );
    assert_eq!(q.stats(&queue).await.expect("stats").dead, 0);
    for id in purged {
        assert_eq!(
            q.job(&queue, id).await.expect("job"),
            None,
            "purged dead letters are deleted"
        );
    }
    assert_eq!(
        info(&q, &queue, jobs[2].id).await.state,
        JobState::Completed,
        "purge touches only dead letters"
    );
}

/// Beyond `dead_letter_limit`, the oldest dead letters are dropped and counted.
pub async fn dead_letter_limit_drops_oldest(factory: impl QueueFactory) {
    let q = build(
        &factory,
        QueueOptions {
            dead_letter_limit: 5,
            ..QueueOptions::default()
        },
    )
    .await;
    let queue = qname("dead-limit");
    let mut ids = Vec::new();
    for n in 0..8 {
        q.enqueue(job(&queue, n)).await.expect("enqueue");
        ids.push(kill_one(&q, &queue, "BROKEN").await.id);
        sleep(Duration::from_millis(5)).await;
    }
    let letters = q.dead_letters(&queue, 0, 100).await.expect("dead_letters");
    let kept: Vec<JobId> = ids[3..].iter().rev().copied().collect();
    assert_eq!(
        letters.iter().map(|d| d.id).collect::<Vec<_>>(),
        kept,
        "the newest 5 are kept, newest first"
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(stats.dead, 5);
    assert_eq!(stats.dead_dropped, 3, "dropped dead letters are counted");
    for id in &ids[..3] {
        assert_eq!(
            q.job(&queue, *id).await.expect("job"),
            None,
            "a dropped dead letter is gone"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Cancel

/// Cancelling a ready or scheduled job makes it cancelled; it never runs.
pub async fn cancel_ready_and_scheduled_jobs(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "cancel").await;
    let ready = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let scheduled = q
        .enqueue(job(&queue, 2).delay(Duration::from_millis(300)))
        .await
        .expect("enqueue");
    let keep = q.enqueue(job(&queue, 3)).await.expect("enqueue");
    for id in [ready, scheduled] {
        assert_eq!(
            q.cancel(&queue, id).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        let cancelled = info(&q, &queue, id).await;
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(cancelled.finished_at_ms.is_some());
        assert_eq!(
            q.cancel(&queue, id).await.expect("cancel"),
            CancelOutcome::AlreadyFinished,
            "cancelling twice changes nothing"
        );
    }
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.scheduled), (1, 0));
    sleep(Duration::from_millis(500)).await;
    let jobs = q
        .fetch(&queue, 10, LONG, Duration::from_millis(100))
        .await
        .expect("fetch");
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![keep],
        "cancelled jobs are never fetched"
    );
}

/// Cancelling a running job asks its holder (through the heartbeat) to cancel; the
/// holder records it with `mark_cancelled`.
pub async fn cancel_running_job_is_requested(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "cancel-running").await;
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    let hb = q.heartbeat(&leased.lease, LONG).await.expect("heartbeat");
    assert!(!hb.cancel_requested);
    assert_eq!(
        q.cancel(&queue, id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    let requested = info(&q, &queue, id).await;
    assert_eq!(
        requested.state,
        JobState::Running,
        "it keeps running until it stops"
    );
    assert!(requested.cancel_requested);
    let hb = q.heartbeat(&leased.lease, LONG).await.expect("heartbeat");
    assert!(hb.cancel_requested, "the heartbeat tells the holder");
    assert_eq!(
        q.cancel(&queue, id).await.expect("cancel"),
        CancelOutcome::Requested,
        "asking twice is still a request"
    );
    let failure = Failure::new("TRACE_CANCELLED", "cancelled on request");
    q.mark_cancelled(&leased.lease, failure.clone())
        .await
        .expect("mark_cancelled");
    let cancelled = info(&q, &queue, id).await;
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.error, Some(failure));
    assert!(cancelled.finished_at_ms.is_some());
    assert_eq!(
        q.cancel(&queue, id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished
    );
    assert_lease_lost(
        q.heartbeat(&leased.lease, LONG).await,
        "heartbeat after cancel",
    );
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.running, stats.ready), (0, 0));
    assert_nothing_to_fetch(&q, &queue, "a cancelled job never comes back").await;
}

/// Cancelling an unknown job is `JobNotFound`; a finished one is `AlreadyFinished`.
pub async fn cancel_unknown_job_is_not_found(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "cancel-unknown").await;
    let result = q.cancel(&queue, Uuid::now_v7()).await;
    assert!(
        matches!(result, Err(Error::JobNotFound { .. })),
        "unknown id: {result:?}"
    );
    let id = q.enqueue(job(&queue, 1)).await.expect("enqueue");
    let leased = fetch_one(&q, &queue, LONG).await;
    q.complete(&leased.lease, json!(1)).await.expect("complete");
    assert_eq!(
        q.cancel(&queue, id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished
    );
    q.enqueue(job(&queue, 2)).await.expect("enqueue");
    let dead = kill_one(&q, &queue, "BROKEN").await;
    assert_eq!(
        q.cancel(&queue, dead.id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished
    );
    assert_eq!(info(&q, &queue, dead.id).await.state, JobState::Dead);
}

// ---------------------------------------------------------------------------------------
// Stats, pause

/// Stats count ready, scheduled, running, completed and dead jobs.
pub async fn stats_count_every_state(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "stats").await;
    q.enqueue_many((0..4).map(|n| job(&queue, n)).collect())
        .await
        .expect("enqueue_many");
    q.enqueue(job(&queue, 10).delay(Duration::from_secs(60)))
        .await
        .expect("enqueue");
    let jobs = q.fetch(&queue, 3, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 3);
    q.complete(&jobs[0].lease, json!(1))
        .await
        .expect("complete");
    q.fail(&jobs[1].lease, Failure::new("X", "x"))
        .await
        .expect("fail");
    q.enqueue(job(&queue, 20)).await.expect("enqueue");
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!(stats.queue, queue);
    assert_eq!(stats.ready, 2, "{stats:?}");
    assert_eq!(stats.scheduled, 1, "{stats:?}");
    assert_eq!(stats.running, 1, "{stats:?}");
    assert_eq!(stats.completed, 1, "{stats:?}");
    assert_eq!(stats.dead, 1, "{stats:?}");
    assert!(!stats.paused);
    assert_eq!(stats.dead_dropped, 0);
}

/// A scheduled job whose time has come counts as ready.
pub async fn stats_count_due_scheduled_jobs_as_ready(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "stats-due").await;
    q.enqueue(job(&queue, 1).delay(Duration::from_millis(300)))
        .await
        .expect("enqueue");
    let before = q.stats(&queue).await.expect("stats");
    assert_eq!((before.ready, before.scheduled), (0, 1));
    sleep(Duration::from_millis(600)).await;
    let after = q.stats(&queue).await.expect("stats");
    assert_eq!(
        (after.ready, after.scheduled),
        (1, 0),
        "a due job is ready: {after:?}"
    );
}

/// Stats report the age of the oldest ready job, 0 when none is ready.
pub async fn stats_report_oldest_ready_age(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "stats-age").await;
    let empty = q.stats(&queue).await.expect("stats");
    assert_eq!(empty.oldest_ready_age_s, 0.0);
    q.enqueue(job(&queue, 1)).await.expect("enqueue");
    sleep(Duration::from_millis(400)).await;
    q.enqueue(job(&queue, 2).priority(-5))
        .await
        .expect("enqueue");
    let stats = q.stats(&queue).await.expect("stats");
    assert!(
        stats.oldest_ready_age_s >= 0.3 && stats.oldest_ready_age_s < 60.0,
        "the oldest ready job waited about 0.4s (whatever its priority), got {}",
        stats.oldest_ready_age_s
    );
    let jobs = q.fetch(&queue, 10, LONG, SETTLE).await.expect("fetch");
    assert_eq!(jobs.len(), 2);
    let drained = q.stats(&queue).await.expect("stats");
    assert_eq!(drained.oldest_ready_age_s, 0.0, "no ready job: age 0");
}

/// Stats of a queue never used are all zero.
pub async fn stats_of_unknown_queue_are_zero(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "stats-unknown").await;
    let stats = q.stats(&queue).await.expect("stats of an unknown queue");
    assert_eq!(stats.queue, queue);
    assert_eq!(
        (
            stats.ready,
            stats.scheduled,
            stats.running,
            stats.completed,
            stats.dead,
            stats.dead_dropped
        ),
        (0, 0, 0, 0, 0, 0)
    );
    assert!(!stats.paused);
    assert_eq!(stats.oldest_ready_age_s, 0.0);
    assert!(
        q.dead_letters(&queue, 0, 10)
            .await
            .expect("dead_letters")
            .is_empty()
    );
    assert_eq!(q.reap(&queue).await.expect("reap").total(), 0);
}

/// A paused queue accepts jobs but hands none out; resuming wakes waiting fetchers.
pub async fn pause_stops_fetch_and_resume_restarts_it(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "pause").await;
    q.pause(&queue).await.expect("pause");
    let id = q
        .enqueue(job(&queue, 1))
        .await
        .expect("enqueue works while paused");
    let stats = q.stats(&queue).await.expect("stats");
    assert!(stats.paused);
    assert_eq!(stats.ready, 1);
    let jobs = q
        .fetch(&queue, 10, LONG, Duration::from_millis(300))
        .await
        .expect("fetch");
    assert!(jobs.is_empty(), "a paused queue hands out nothing");
    q.pause(&queue).await.expect("pausing twice is fine");

    let waiter = {
        let q = q.clone();
        let queue = queue.clone();
        tokio::spawn(async move { q.fetch(&queue, 10, LONG, Duration::from_secs(5)).await })
    };
    sleep(Duration::from_millis(200)).await;
    q.resume(&queue).await.expect("resume");
    let jobs = waiter.await.expect("fetch task panicked").expect("fetch");
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![id],
        "after resume the waiting fetch gets the job"
    );
    assert!(!q.stats(&queue).await.expect("stats").paused);
    q.resume(&queue).await.expect("resuming twice is fine");
}

// ---------------------------------------------------------------------------------------
// Everything else

/// Tenant, headers, priority, retries and payload come back as given.
pub async fn headers_and_tenant_round_trip(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "headers").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let payload = json!({"user": {"id": 42, "tags": ["a", "b"]}, "text": "héllo ✓"});
    let before = now_ms();
    let id = q
        .enqueue(
            NewJob::new(&queue, payload.clone())
                .tenant("acme")
                .priority(7)
                .max_retries(9)
                .header("traceparent", traceparent)
                .header("x-request-id", "req-1")
                .dedupe_key("hdr"),
        )
        .await
        .expect("enqueue");
    let after = now_ms();
    let leased = fetch_one(&q, &queue, LONG).await;
    assert_eq!(leased.id, id);
    assert_eq!(leased.queue, queue);
    assert_eq!(leased.tenant, "acme");
    assert_eq!(leased.priority, 7);
    assert_eq!(leased.max_retries, 9);
    assert_eq!(leased.payload, payload);
    assert_eq!(leased.headers.len(), 2);
    assert_eq!(
        leased.headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    assert_eq!(
        leased.headers.get("x-request-id").map(String::as_str),
        Some("req-1")
    );
    assert!(
        leased.enqueued_at_ms >= before - CLOCK_SLACK_MS
            && leased.enqueued_at_ms <= after + CLOCK_SLACK_MS
    );
    let stored = info(&q, &queue, id).await;
    assert_eq!(stored.tenant, "acme");
    assert_eq!(stored.headers, leased.headers);
    assert_eq!(stored.payload, payload);
    assert_eq!(stored.dedupe_key.as_deref(), Some("hdr"));
    assert_eq!(stored.created_at_ms, leased.enqueued_at_ms);
}

/// Queues are isolated: jobs, ids, pause state, stats and dead letters.
pub async fn queues_are_isolated(factory: impl QueueFactory) {
    let q = build(&factory, QueueOptions::default()).await;
    let a = qname("iso-a");
    let b = qname("iso-b");
    let in_a = q.enqueue(job(&a, 1)).await.expect("enqueue");
    assert_nothing_to_fetch(&q, &b, "another queue's job").await;
    assert_eq!(
        q.job(&b, in_a).await.expect("job"),
        None,
        "id of another queue"
    );
    let result = q.cancel(&b, in_a).await;
    assert!(
        matches!(result, Err(Error::JobNotFound { .. })),
        "cancel through another queue: {result:?}"
    );
    assert_eq!(info(&q, &a, in_a).await.state, JobState::Ready);

    q.pause(&a).await.expect("pause");
    let in_b = q.enqueue(job(&b, 2)).await.expect("enqueue");
    let leased = fetch_one(&q, &b, LONG).await;
    assert_eq!(
        leased.id, in_b,
        "pausing one queue leaves the other running"
    );
    q.fail(&leased.lease, Failure::new("X", "x"))
        .await
        .expect("fail");
    assert!(
        q.dead_letters(&a, 0, 10)
            .await
            .expect("dead_letters")
            .is_empty()
    );
    assert_eq!(q.requeue_all_dead(&a).await.expect("requeue_all"), 0);
    let sa = q.stats(&a).await.expect("stats");
    let sb = q.stats(&b).await.expect("stats");
    assert_eq!((sa.ready, sa.dead, sa.paused), (1, 0, true));
    assert_eq!((sb.ready, sb.dead, sb.paused), (0, 1, false));
    q.resume(&a).await.expect("resume");
    assert_eq!(fetch_one(&q, &a, LONG).await.id, in_a);
}

/// `job()` of an id that never existed is `None`, not an error.
pub async fn job_of_unknown_id_is_none(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "unknown-id").await;
    assert_eq!(q.job(&queue, Uuid::now_v7()).await.expect("job"), None);
    q.enqueue(job(&queue, 1)).await.expect("enqueue");
    assert_eq!(q.job(&queue, Uuid::now_v7()).await.expect("job"), None);
}

/// `ping` answers.
pub async fn ping_answers(factory: impl QueueFactory) {
    let q = build(&factory, QueueOptions::default()).await;
    q.ping().await.expect("ping");
}

// ---------------------------------------------------------------------------------------
// Delays and the backend's clock

/// A delay counts from the backend's own clock, not the producer's: `job()` reports a
/// delayed job scheduled, with its run-at time exactly the delay after its creation time
/// (the backend's clock when it stored the job), whether the job came alone, in a batch
/// between ready jobs, or among 40 delayed jobs of one batch; with both an instant and a
/// delay, the later of the two counts.
pub async fn delay_counts_from_the_backend_clock(factory: impl QueueFactory) {
    let (q, queue) = setup(&factory, "delay-clock").await;
    let delay = Duration::from_secs(60);
    let delay_ms = 60_000;
    let single = q
        .enqueue(job(&queue, 0).delay(delay))
        .await
        .expect("enqueue");
    // An instant an hour ago and a delay: the delay is later, so it counts.
    let mut both = job(&queue, 4).run_at_ms(now_ms() - 3_600_000);
    both.delay_ms = Some(60_000);
    let mixed = q
        .enqueue_many(vec![
            job(&queue, 1),
            job(&queue, 2).delay(delay),
            job(&queue, 3),
            both,
        ])
        .await
        .expect("enqueue_many");
    let bulk = q
        .enqueue_many((10..50).map(|n| job(&queue, n).delay(delay)).collect())
        .await
        .expect("enqueue_many of delayed jobs");
    let delayed = [single, mixed[1], mixed[3]].into_iter().chain(bulk);
    for id in delayed {
        let info = info(&q, &queue, id).await;
        assert_eq!(
            info.state,
            JobState::Scheduled,
            "job {} delayed 60 s should be scheduled",
            n_of(&info.payload)
        );
        let waits = info.run_at_ms - info.created_at_ms;
        assert!(
            (delay_ms..=delay_ms + CLOCK_SLACK_MS).contains(&waits),
            "job {} delayed 60 s: run_at_ms is {waits} ms after created_at_ms, expected \
             the delay measured from the backend's clock at enqueue",
            n_of(&info.payload)
        );
    }
    for id in [mixed[0], mixed[2]] {
        assert_eq!(info(&q, &queue, id).await.state, JobState::Ready);
    }
    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.scheduled), (2, 43), "{stats:?}");
    let jobs = q
        .fetch(&queue, 10, LONG, Duration::ZERO)
        .await
        .expect("fetch");
    let mut got: Vec<u64> = jobs.iter().map(|j| n_of(&j.payload)).collect();
    got.sort_unstable();
    assert_eq!(got, [1, 3], "only the jobs without a delay are ready");
}

// ---------------------------------------------------------------------------------------
// Connection faults

/// An `enqueue_many` call whose connection is cut part-way, and stays cut for it, fails
/// and stores nothing, in any of the queues it names, even when the jobs sent before the
/// cut would have made whole script calls or statements on their own (1,500 jobs of
/// about 250 bytes for one queue and 10 for another; 250 kB may go out after the first
/// queue's name, over every connection, nothing more); the same call sent again stores
/// every job once. Runs only with [`QueueFactory::faults`].
pub async fn enqueue_many_cut_mid_call_stores_nothing(factory: impl QueueFactory) {
    let Some(faults) = factory.faults() else {
        eprintln!(
            "note: enqueue_many_cut_mid_call_stores_nothing skipped: this backend has no \
             connection faults to inject"
        );
        return;
    };
    let q = faults.build(QueueOptions::default()).await;
    let queue = qname("many-cut");
    let other = qname("many-cut-other");
    let pad = "x".repeat(200);
    let jobs = || -> Vec<NewJob> {
        (0..1500)
            .map(|n| NewJob::new(&queue, json!({ "n": n, "pad": pad })))
            .chain((0..10).map(|n| job(&other, n)))
            .collect()
    };

    faults.cut_after_marker(queue.as_bytes(), 250_000);
    let result = q.enqueue_many(jobs()).await;
    let cuts = faults.heal(queue.as_bytes());
    assert!(
        cuts >= 1,
        "the call's connection should have been cut: no connection carried the queue name"
    );
    assert!(
        result.is_err(),
        "an enqueue_many whose connection was cut, and stayed cut, must fail, got {} ids",
        result.map_or(0, |ids| ids.len())
    );
    for name in [&queue, &other] {
        let stats = q.stats(name).await.expect("stats after the cut");
        assert_eq!(
            (stats.ready, stats.scheduled),
            (0, 0),
            "a call cut part-way must store nothing in {name}: all or nothing"
        );
    }
    assert_nothing_to_fetch(&q, &queue, "a call cut part-way stores nothing").await;

    let ids = q
        .enqueue_many(jobs())
        .await
        .expect("the same call, sent again without faults");
    assert_eq!(ids.len(), 1510);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1510, "ids unique");
    let (a, b) = (
        q.stats(&queue).await.expect("stats"),
        q.stats(&other).await.expect("stats"),
    );
    assert_eq!((a.ready, b.ready), (1500, 10), "every job stored once");
    assert_eq!(n_of(&info(&q, &queue, ids[1499]).await.payload), 1499);
    assert_eq!(n_of(&info(&q, &other, ids[1500]).await.payload), 0);
}
