//! Metrics, the health server and traces, checked from the outside: the exposition text
//! through a strict parser written here (and Python's `prometheus_client` and `promtool`
//! when installed), the HTTP routes over loopback, and spans through an in-memory
//! OpenTelemetry exporter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use flow_core::queue::{
    CancelOutcome, DeadLetter, Failure, Heartbeat, JobId, JobInfo, JobQueue, Lease, LeasedJob,
    MemoryQueue, NewJob, QueueStats, ReapReport,
};
use flow_core::{BoxError, Context, Flow, Message, Middleware, Node, NodePolicy, create};
use opentelemetry::trace::{SpanId, Status, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, InMemorySpanExporterBuilder, SpanData};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::layer::SubscriberExt;
use worker_runtime::http::{self, HealthState};
use worker_runtime::metrics::{self, BackendHealth, CONTENT_TYPE, Metrics};
use worker_runtime::telemetry::{self, SpanMiddleware};
use worker_runtime::{
    AttemptOutcome, AttemptReport, JobObserver, PoolStats, RetryPolicy, WorkerPool,
};

// The strict Prometheus text-format parser, shared with the end-to-end tests.
#[path = "../../../tests/common/prometheus.rs"]
mod prometheus;
use prometheus::{parse_strict, sample as value};

fn report(queue: &str, outcome: AttemptOutcome, code: Option<&str>, ms: u64) -> AttemptReport {
    AttemptReport {
        job_id: "0190aaaa-0000-7000-8000-000000000000".into(),
        queue: queue.into(),
        tenant: "acme".into(),
        attempt: 1,
        outcome,
        code: code.map(str::to_owned),
        duration: Duration::from_millis(ms),
    }
}

fn node_event(
    kind: flow_core::EventKind,
    node: &str,
    trace: &str,
    attempt: u32,
    latency_ms: Option<f64>,
) -> flow_core::FlowEvent {
    flow_core::FlowEvent {
        kind,
        ts: 0.0,
        node_name: node.into(),
        node_id: format!("{node}-id"),
        trace_id: Some(trace.into()),
        attempt,
        latency_ms,
        queue_depth_in: 0,
        queue_depth_out: 0,
        outgoing_edges: 0,
        queue_maxsize: 64,
        trace_pending: None,
        trace_inflight: 0,
        trace_cancelled: false,
        extra: serde_json::Map::new(),
    }
}

/// A registry with every kind of sample, including label values that need escaping.
async fn sample_metrics() -> Metrics {
    use flow_core::EventKind::*;
    let m = Metrics::new();
    m.register_queue("emails");
    m.attempt_finished(&report("emails", AttemptOutcome::Succeeded, None, 12));
    m.attempt_finished(&report("emails", AttemptOutcome::Succeeded, None, 250));
    m.attempt_finished(&report(
        "emails",
        AttemptOutcome::Retried,
        Some("NODE_TIMEOUT"),
        5000,
    ));
    m.attempt_finished(&report(
        "emails",
        AttemptOutcome::DeadLettered,
        Some("JOB_TIMEOUT"),
        400_000,
    ));
    m.attempt_finished(&report(
        "emails",
        AttemptOutcome::DeadLettered,
        Some("INVALID_PAYLOAD"),
        1,
    ));
    m.attempt_finished(&report(
        "emails",
        AttemptOutcome::Cancelled,
        Some("TRACE_CANCELLED"),
        3,
    ));
    m.attempt_finished(&report("emails", AttemptOutcome::Released, None, 30_000));
    m.attempt_finished(&report("emails", AttemptOutcome::LeaseLost, None, 31_000));
    m.attempt_finished(&report(
        "weird\"q\\x\ny",
        AttemptOutcome::DeadLettered,
        Some("MY \"CODE\""),
        7,
    ));
    m.leases_rescued("emails", 2);
    m.record_queue_stats(&QueueStats {
        queue: "emails".into(),
        ready: 7,
        scheduled: 2,
        running: 1,
        completed: 40,
        dead: 3,
        paused: true,
        oldest_ready_age_s: 12.5,
        dead_dropped: 4,
    });
    m.set_backend_up("emails", true);
    for (kind, lat) in [
        (NodeStart, Some(0.0)),
        (NodeSuccess, Some(3.5)),
        (NodeError, Some(1.0)),
        (NodeTimeout, Some(2000.0)),
        (NodeRetry, None),
        (NodeFailed, Some(2000.0)),
    ] {
        m.on_event(&node_event(kind, "summarise", "t1", 0, lat))
            .await;
    }
    m.on_event(&node_event(
        NodeSuccess,
        "odd \\ \"node\"\nname é",
        "t1",
        0,
        Some(0.2),
    ))
    .await;
    m
}

#[tokio::test]
async fn exposition_parses_strictly_with_the_documented_metrics() {
    let m = sample_metrics().await;
    let text = m.render();
    let fams = parse_strict(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    let kinds: BTreeMap<&str, &str> = fams
        .iter()
        .map(|f| (f.name.as_str(), f.kind.as_str()))
        .collect();
    for (name, kind) in [
        ("penguiflow_jobs_processed_total", "counter"),
        ("penguiflow_jobs_succeeded_total", "counter"),
        ("penguiflow_jobs_failed_total", "counter"),
        ("penguiflow_jobs_retried_total", "counter"),
        ("penguiflow_jobs_timeouts_total", "counter"),
        ("penguiflow_jobs_cancelled_total", "counter"),
        ("penguiflow_jobs_released_total", "counter"),
        ("penguiflow_jobs_lease_lost_total", "counter"),
        ("penguiflow_jobs_rescued_total", "counter"),
        ("penguiflow_dead_letters_dropped_total", "counter"),
        ("penguiflow_jobs_active", "gauge"),
        ("penguiflow_queue_depth", "gauge"),
        ("penguiflow_queue_oldest_ready_age_seconds", "gauge"),
        ("penguiflow_queue_paused", "gauge"),
        ("penguiflow_worker_up", "gauge"),
        ("penguiflow_backend_up", "gauge"),
        ("penguiflow_job_duration_seconds", "histogram"),
        ("penguiflow_node_duration_seconds", "histogram"),
        ("penguiflow_node_events_total", "counter"),
    ] {
        assert_eq!(kinds.get(name), Some(&kind), "{name}");
    }
    let q = [("queue", "emails")];
    assert_eq!(
        value(&fams, "penguiflow_jobs_processed_total", &q),
        Some(6.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_succeeded_total", &q),
        Some(2.0)
    );
    assert_eq!(
        value(
            &fams,
            "penguiflow_jobs_failed_total",
            &[("queue", "emails"), ("code", "JOB_TIMEOUT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fams,
            "penguiflow_jobs_retried_total",
            &[("queue", "emails"), ("code", "NODE_TIMEOUT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fams,
            "penguiflow_jobs_timeouts_total",
            &[("queue", "emails"), ("code", "JOB_TIMEOUT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fams,
            "penguiflow_jobs_timeouts_total",
            &[("queue", "emails"), ("code", "NODE_TIMEOUT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_cancelled_total", &q),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_released_total", &q),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_lease_lost_total", &q),
        Some(1.0)
    );
    assert_eq!(value(&fams, "penguiflow_jobs_rescued_total", &q), Some(2.0));
    assert_eq!(
        value(&fams, "penguiflow_dead_letters_dropped_total", &q),
        Some(4.0)
    );
    for (state, n) in [
        ("ready", 7.0),
        ("scheduled", 2.0),
        ("running", 1.0),
        ("completed", 40.0),
        ("dead", 3.0),
    ] {
        assert_eq!(
            value(
                &fams,
                "penguiflow_queue_depth",
                &[("queue", "emails"), ("state", state)]
            ),
            Some(n)
        );
    }
    assert_eq!(
        value(&fams, "penguiflow_queue_oldest_ready_age_seconds", &q),
        Some(12.5)
    );
    assert_eq!(value(&fams, "penguiflow_queue_paused", &q), Some(1.0));
    assert_eq!(value(&fams, "penguiflow_backend_up", &q), Some(1.0));
    assert_eq!(value(&fams, "penguiflow_worker_up", &[]), Some(1.0));
    // Escaped label values come back intact.
    assert_eq!(
        value(
            &fams,
            "penguiflow_jobs_failed_total",
            &[("queue", "weird\"q\\x\ny"), ("code", "MY \"CODE\"")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fams,
            "penguiflow_node_events_total",
            &[
                ("node", "odd \\ \"node\"\nname é"),
                ("event_type", "node_success")
            ]
        ),
        Some(1.0)
    );
    // Job durations: 400 s lands only in +Inf.
    let dl = [("queue", "emails"), ("outcome", "dead_lettered")];
    assert_eq!(
        value(&fams, "penguiflow_job_duration_seconds_count", &dl),
        Some(2.0)
    );
    let le300 = [
        ("queue", "emails"),
        ("outcome", "dead_lettered"),
        ("le", "300"),
    ];
    assert_eq!(
        value(&fams, "penguiflow_job_duration_seconds_bucket", &le300),
        Some(1.0)
    );
    // Node durations: success, error and timeout only (not start, not failed).
    assert_eq!(
        value(
            &fams,
            "penguiflow_node_duration_seconds_count",
            &[("node", "summarise")]
        ),
        Some(3.0)
    );
    for ev in [
        "node_start",
        "node_success",
        "node_error",
        "node_timeout",
        "node_retry",
        "node_failed",
    ] {
        assert_eq!(
            value(
                &fams,
                "penguiflow_node_events_total",
                &[("node", "summarise"), ("event_type", ev)]
            ),
            Some(1.0),
            "{ev}"
        );
    }
    // Never labelled by trace, job or tenant.
    for f in &fams {
        for s in &f.samples {
            for k in s.labels.keys() {
                assert!(
                    !["trace_id", "job_id", "tenant"].contains(&k.as_str()),
                    "{s:?}"
                );
            }
        }
    }
}

#[test]
fn the_strict_parser_rejects_what_it_should() {
    for bad in [
        "# HELP a_total x\n# TYPE a_total counter\na_total{q=\"x} 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total{q=\"\\t\"} 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total 1",
        "# TYPE a_total counter\na_total 1\n",
        "# HELP a_total x\n# TYPE a_total counter\nb_total 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total{q=\"1\",} 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total -1\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
    ] {
        assert!(parse_strict(bad).is_err(), "accepted {bad:?}");
    }
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

const PY_PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": fam.name, "type": fam.type,
                "samples": [[s.name, s.labels, repr(float(s.value))] for s in fam.samples]})
print(json.dumps(out))
"#;

/// Python's `prometheus_client` classic parser (pip install prometheus-client) reads our
/// text and finds exactly the samples the strict parser found. Skipped with a message
/// when Python or the package is missing.
#[tokio::test]
async fn prometheus_client_python_parser_accepts_the_text() {
    let probe = std::process::Command::new(python())
        .args(["-c", "import prometheus_client"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipped: python prometheus_client missing (pip install prometheus-client==0.26.0): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: {} not runnable: {e}", python());
            return;
        }
    }
    let text = sample_metrics().await.render();
    let mut child = std::process::Command::new(python())
        .args(["-c", PY_PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "prometheus_client rejected the text: {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json from python");
    let mut py = BTreeSet::new();
    let mut py_types = BTreeMap::new();
    for fam in &parsed {
        for s in fam["samples"].as_array().expect("samples") {
            let name = s[0].as_str().expect("name").to_owned();
            let labels: BTreeMap<String, String> =
                serde_json::from_value(s[1].clone()).expect("labels");
            let v: f64 = s[2].as_str().expect("value").parse().expect("float");
            py_types.insert(name.clone(), fam["type"].as_str().expect("type").to_owned());
            py.insert((name, labels, v.to_bits()));
        }
    }
    let fams = parse_strict(&text).expect("strict");
    let mut ours = BTreeSet::new();
    for f in &fams {
        for s in &f.samples {
            assert_eq!(py_types.get(&s.name), Some(&f.kind), "type of {}", s.name);
            ours.insert((s.name.clone(), s.labels.clone(), s.value.to_bits()));
        }
    }
    assert_eq!(py, ours);
}

/// `promtool check metrics` (from the Debian prometheus package, or $PROMTOOL) accepts
/// the text. Skipped with a message when promtool is missing.
#[tokio::test]
async fn promtool_accepts_the_text() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let text = sample_metrics().await.render();
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: {promtool} not runnable ({e}); set PROMTOOL or install prometheus");
            return;
        }
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Metrics fed by a real pool.
// ---------------------------------------------------------------------------------------

fn work_flow() -> Result<Flow, flow_core::Error> {
    let node = Node::new("work", |msg: Message, _ctx: Context| async move {
        if msg
            .payload
            .get("fail")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Err::<Option<Message>, BoxError>("directed failure".into());
        }
        Ok(Some(msg))
    });
    create([node.to(&[])]).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_metrics_equal_the_pool_counters() {
    const QN: &str = "obs-pool";
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..3 {
        queue
            .enqueue(NewJob::new(QN, json!({"n": i})))
            .await
            .expect("enqueue");
    }
    queue
        .enqueue(NewJob::new(QN, json!({"fail": true})).max_retries(1))
        .await
        .expect("enqueue");
    let metrics = Arc::new(Metrics::new());
    let pool = WorkerPool::builder(queue.clone(), QN, work_flow)
        .concurrency(2)
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
            jitter: false,
        })
        .observer(metrics.clone())
        .middleware(metrics.clone())
        .build()
        .expect("pool");
    metrics.watch_pool(QN, pool.stats());
    let stats = pool.stats();
    let done = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while stats.snapshot().processed < 5 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let report = pool.run(done).await.expect("run");
    let s = report.stats;
    assert_eq!(
        (s.processed, s.succeeded, s.retried, s.failed),
        (5, 3, 1, 1)
    );
    let text = metrics.render();
    let fams = parse_strict(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let q = [("queue", QN)];
    let qc = [("queue", QN), ("code", "NODE_EXCEPTION")];
    assert_eq!(
        value(&fams, "penguiflow_jobs_processed_total", &q),
        Some(s.processed as f64)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_succeeded_total", &q),
        Some(s.succeeded as f64)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_retried_total", &qc),
        Some(s.retried as f64)
    );
    assert_eq!(
        value(&fams, "penguiflow_jobs_failed_total", &qc),
        Some(s.failed as f64)
    );
    assert_eq!(value(&fams, "penguiflow_jobs_active", &q), Some(0.0));
    assert_eq!(value(&fams, "penguiflow_fetch_errors_total", &q), Some(0.0));
    let sum_counts: f64 = ["succeeded", "retried", "dead_lettered"]
        .iter()
        .filter_map(|o| {
            value(
                &fams,
                "penguiflow_job_duration_seconds_count",
                &[("queue", QN), ("outcome", o)],
            )
        })
        .sum();
    assert_eq!(sum_counts, 5.0);
    let ev = |t: &str| {
        value(
            &fams,
            "penguiflow_node_events_total",
            &[("node", "work"), ("event_type", t)],
        )
    };
    assert_eq!(ev("node_start"), Some(5.0));
    assert_eq!(ev("node_success"), Some(3.0));
    assert_eq!(ev("node_error"), Some(2.0));
    assert_eq!(
        value(
            &fams,
            "penguiflow_node_duration_seconds_count",
            &[("node", "work")]
        ),
        Some(5.0)
    );
    let w = metrics.failure_window().snapshot();
    assert_eq!((w.attempts, w.failures), (5, 1));
}

// ---------------------------------------------------------------------------------------
// Queue stats refresher and backend reachability.
// ---------------------------------------------------------------------------------------

/// A MemoryQueue whose stats and ping fail while `down` is set.
struct Flaky {
    inner: MemoryQueue,
    down: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), flow_core::Error> {
        if self.down.load(Ordering::SeqCst) {
            Err(flow_core::Error::Unavailable(
                "connection refused (redis://worker:hunter2@10.0.0.9:6379)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl JobQueue for Flaky {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, flow_core::Error> {
        self.inner.enqueue(job).await
    }
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, flow_core::Error> {
        self.inner.enqueue_many(jobs).await
    }
    async fn fetch(
        &self,
        q: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, flow_core::Error> {
        self.inner.fetch(q, max, lease, wait).await
    }
    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
    ) -> Result<Heartbeat, flow_core::Error> {
        self.inner.heartbeat(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), flow_core::Error> {
        self.inner.complete(lease, result).await
    }
    async fn retry(
        &self,
        lease: &Lease,
        delay: Duration,
        f: Failure,
    ) -> Result<(), flow_core::Error> {
        self.inner.retry(lease, delay, f).await
    }
    async fn fail(&self, lease: &Lease, f: Failure) -> Result<(), flow_core::Error> {
        self.inner.fail(lease, f).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), flow_core::Error> {
        self.inner.release(lease).await
    }
    async fn mark_cancelled(&self, lease: &Lease, f: Failure) -> Result<(), flow_core::Error> {
        self.inner.mark_cancelled(lease, f).await
    }
    async fn reap(&self, q: &str) -> Result<ReapReport, flow_core::Error> {
        self.inner.reap(q).await
    }
    async fn job(&self, q: &str, id: JobId) -> Result<Option<JobInfo>, flow_core::Error> {
        self.inner.job(q, id).await
    }
    async fn cancel(&self, q: &str, id: JobId) -> Result<CancelOutcome, flow_core::Error> {
        self.inner.cancel(q, id).await
    }
    async fn stats(&self, q: &str) -> Result<QueueStats, flow_core::Error> {
        self.check()?;
        self.inner.stats(q).await
    }
    async fn dead_letters(
        &self,
        q: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, flow_core::Error> {
        self.inner.dead_letters(q, offset, limit).await
    }
    async fn requeue_dead(&self, q: &str, id: JobId) -> Result<(), flow_core::Error> {
        self.inner.requeue_dead(q, id).await
    }
    async fn requeue_all_dead(&self, q: &str) -> Result<u64, flow_core::Error> {
        self.inner.requeue_all_dead(q).await
    }
    async fn purge_dead(&self, q: &str) -> Result<u64, flow_core::Error> {
        self.inner.purge_dead(q).await
    }
    async fn pause(&self, q: &str) -> Result<(), flow_core::Error> {
        self.inner.pause(q).await
    }
    async fn resume(&self, q: &str) -> Result<(), flow_core::Error> {
        self.inner.resume(q).await
    }
    async fn ping(&self) -> Result<(), flow_core::Error> {
        self.check()?;
        self.inner.ping().await
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn refresher_sets_depth_from_backend_stats_and_tracks_reachability() {
    const QN: &str = "obs-depth";
    let flaky = Arc::new(Flaky {
        inner: MemoryQueue::new(),
        down: AtomicBool::new(false),
    });
    for i in 0..2 {
        flaky
            .enqueue(NewJob::new(QN, json!({"n": i})))
            .await
            .expect("enqueue");
    }
    flaky
        .enqueue(NewJob::new(QN, json!({"n": 9})).delay(Duration::from_secs(3600)))
        .await
        .expect("enqueue");
    let m = Arc::new(Metrics::new());
    let (task, backend) = metrics::spawn_queue_stats_refresher(
        m.clone(),
        flaky.clone(),
        vec![QN.to_owned()],
        Duration::from_millis(100),
    );
    wait_until("first refresh", || backend.is_reachable()).await;
    assert_eq!(backend.status().queue_depth, 3);
    let fams = parse_strict(&m.render()).expect("strict");
    let l = |state| [("queue", QN), ("state", state)];
    assert_eq!(
        value(&fams, "penguiflow_queue_depth", &l("ready")),
        Some(2.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_queue_depth", &l("scheduled")),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "penguiflow_backend_up", &[("queue", QN)]),
        Some(1.0)
    );

    flaky.down.store(true, Ordering::SeqCst);
    wait_until("unreachable", || !backend.is_reachable()).await;
    let status = backend.status();
    let err = status.last_error.unwrap_or_default();
    assert!(err.contains("connection refused"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    // The last known depth stays; backend_up drops to 0.
    assert_eq!(status.queue_depth, 3);
    let fams = parse_strict(&m.render()).expect("strict");
    assert_eq!(
        value(&fams, "penguiflow_backend_up", &[("queue", QN)]),
        Some(0.0)
    );

    flaky.down.store(false, Ordering::SeqCst);
    wait_until("reachable again", || backend.is_reachable()).await;
    task.abort();
}

#[tokio::test]
async fn refresher_without_queues_pings() {
    let flaky = Arc::new(Flaky {
        inner: MemoryQueue::new(),
        down: AtomicBool::new(true),
    });
    let backend = BackendHealth::new(Duration::from_secs(5));
    let m = Metrics::new();
    assert!(
        !metrics::refresh_queue_stats(&m, flaky.as_ref(), &[], &backend, Duration::from_secs(1))
            .await
    );
    assert!(!backend.is_reachable());
    flaky.down.store(false, Ordering::SeqCst);
    assert!(
        metrics::refresh_queue_stats(&m, flaky.as_ref(), &[], &backend, Duration::from_secs(1))
            .await
    );
    assert!(backend.is_reachable());
}

// ---------------------------------------------------------------------------------------
// The HTTP server over loopback, with a hand-written HTTP/1.1 client.
// ---------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("reply in time")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), worker_runtime::Error>>,
}

async fn start(state: HealthState) -> Server {
    let (listener, addr) = http::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    assert_ne!(addr.port(), 0);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(http::serve_on(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .expect("join");
        assert!(r.is_ok(), "{r:?}");
    }
}

fn healthy_backend() -> Arc<BackendHealth> {
    let b = Arc::new(BackendHealth::new(Duration::from_secs(5)));
    b.record_success(&[
        QueueStats {
            queue: "a".into(),
            ready: 4,
            scheduled: 1,
            running: 3,
            ..QueueStats::default()
        },
        QueueStats {
            queue: "b".into(),
            ready: 2,
            dead: 9,
            ..QueueStats::default()
        },
    ]);
    b
}

#[tokio::test]
async fn health_routes_answer_over_loopback() {
    let metrics = Arc::new(Metrics::new());
    let backend = healthy_backend();
    let draining = Arc::new(AtomicBool::new(false));
    let d = draining.clone();
    let state = HealthState::new(
        Arc::new(PoolStats::default()),
        metrics.clone(),
        backend.clone(),
    )
    .draining(move || d.load(Ordering::SeqCst));
    let srv = start(state).await;

    let r = get(srv.addr, "/health").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("application/json"));
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["active_jobs"], 0);
    assert_eq!(body["queue_depth"], 7, "ready + scheduled over the queues");
    for k in ["processed", "succeeded", "failed", "timeouts", "retried"] {
        assert_eq!(body["stats"][k], 0, "{k} in {body}");
    }
    assert_eq!(body["backend_reachable"], true);

    let r = get(srv.addr, "/health/live").await;
    assert_eq!((r.status, r.body.trim()), (200, "ok"));
    let r = get(srv.addr, "/health/ready").await;
    assert_eq!(r.status, 200);

    let r = get(srv.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], CONTENT_TYPE);
    let fams = parse_strict(&r.body).expect("strict");
    assert_eq!(value(&fams, "penguiflow_worker_draining", &[]), Some(0.0));

    assert_eq!(get(srv.addr, "/nope").await.status, 404);

    draining.store(true, Ordering::SeqCst);
    let r = get(srv.addr, "/health").await;
    assert_eq!(r.status, 200, "/health answers 200 whatever the status");
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(body["status"], "draining");
    let r = get(srv.addr, "/health/ready").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("draining"));
    assert_eq!(get(srv.addr, "/health/live").await.status, 200);
    let fams = parse_strict(&get(srv.addr, "/metrics").await.body).expect("strict");
    assert_eq!(value(&fams, "penguiflow_worker_draining", &[]), Some(1.0));

    srv.stop().await;
}

#[tokio::test]
async fn degraded_on_backend_trouble_or_a_high_failure_ratio() {
    let metrics = Arc::new(Metrics::new());
    let backend = healthy_backend();
    let fetch_failing = Arc::new(AtomicBool::new(false));
    let f = fetch_failing.clone();
    let state = HealthState::new(
        Arc::new(PoolStats::default()),
        metrics.clone(),
        backend.clone(),
    )
    .pool_degraded(move || f.load(Ordering::SeqCst))
    .failure_threshold(0.5)
    .min_attempts(10);
    let srv = start(state.clone()).await;
    let status = |b: &str| -> String {
        let v: Value = serde_json::from_str(b).expect("json");
        v["status"].as_str().unwrap_or_default().to_owned()
    };

    backend.record_failure("stats: connection reset");
    let r = get(srv.addr, "/health").await;
    assert_eq!((r.status, status(&r.body)), (200, "degraded".to_owned()));
    assert!(r.body.contains("backend unreachable"), "{}", r.body);
    assert_eq!(get(srv.addr, "/health/ready").await.status, 503);
    assert_eq!(
        get(srv.addr, "/health/live").await.status,
        200,
        "liveness ignores the backend"
    );

    backend.record_success(&[]);
    assert_eq!(status(&get(srv.addr, "/health").await.body), "healthy");
    fetch_failing.store(true, Ordering::SeqCst);
    assert_eq!(status(&get(srv.addr, "/health").await.body), "degraded");
    assert_eq!(get(srv.addr, "/health/ready").await.status, 503);
    fetch_failing.store(false, Ordering::SeqCst);
    assert_eq!(get(srv.addr, "/health/ready").await.status, 200);

    // One failure out of one attempt is not enough to call it degraded.
    metrics.attempt_finished(&report(
        "a",
        AttemptOutcome::DeadLettered,
        Some("NODE_EXCEPTION"),
        5,
    ));
    assert_eq!(status(&get(srv.addr, "/health").await.body), "healthy");
    // 6 failures (dead letters and timeouts) of 11 attempts: above 0.5.
    for _ in 0..4 {
        metrics.attempt_finished(&report("a", AttemptOutcome::Succeeded, None, 5));
    }
    for _ in 0..3 {
        metrics.attempt_finished(&report(
            "a",
            AttemptOutcome::Retried,
            Some("NODE_TIMEOUT"),
            5,
        ));
    }
    metrics.attempt_finished(&report(
        "a",
        AttemptOutcome::Retried,
        Some("NODE_EXCEPTION"),
        5,
    ));
    // Not counted: handed back or lost leases.
    metrics.attempt_finished(&report("a", AttemptOutcome::Released, None, 5));
    metrics.attempt_finished(&report("a", AttemptOutcome::LeaseLost, None, 5));
    assert_eq!(
        status(&get(srv.addr, "/health").await.body),
        "healthy",
        "4 of 9"
    );
    metrics.attempt_finished(&report(
        "a",
        AttemptOutcome::DeadLettered,
        Some("JOB_TIMEOUT"),
        5,
    ));
    metrics.attempt_finished(&report(
        "a",
        AttemptOutcome::DeadLettered,
        Some("NODE_EXCEPTION"),
        5,
    ));
    let r = get(srv.addr, "/health").await;
    let v: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["status"], "degraded", "{v}");
    assert_eq!(v["last_minute"]["attempts"], 11);
    assert_eq!(v["last_minute"]["failures"], 6);
    // A failure ratio alone keeps the worker ready: the backend is fine.
    assert_eq!(get(srv.addr, "/health/ready").await.status, 200);
    assert_eq!(state.report().status, http::Status::Degraded);
    srv.stop().await;
}

#[tokio::test]
async fn serve_reports_a_port_in_use() {
    let (_held, addr) = http::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let state = HealthState::new(
        Arc::new(PoolStats::default()),
        Arc::new(Metrics::new()),
        healthy_backend(),
    );
    let err = http::serve(addr, state, std::future::ready(())).await.err();
    let text = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains(&addr.to_string()), "{text}");
}

// ---------------------------------------------------------------------------------------
// Traces: in-memory exporter, no global subscriber.
// ---------------------------------------------------------------------------------------

fn capture() -> (
    InMemorySpanExporter,
    opentelemetry_sdk::trace::SdkTracerProvider,
    impl tracing::Subscriber + Send + Sync,
) {
    let exporter = InMemorySpanExporterBuilder::new().build();
    let (layer, provider) = telemetry::otel_layer_with_exporter(exporter.clone());
    let subscriber = tracing_subscriber::registry().with(layer);
    (exporter, provider, subscriber)
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn leased(headers: BTreeMap<String, String>) -> LeasedJob {
    let id = JobId::now_v7();
    LeasedJob {
        id,
        queue: "emails".into(),
        payload: json!({"secret": "never in spans"}),
        tenant: "acme".into(),
        priority: 0,
        attempt: 2,
        max_retries: 3,
        headers,
        enqueued_at_ms: 0,
        lease: Lease {
            job_id: id,
            queue: "emails".into(),
            token: 1,
            expires_at_ms: 0,
        },
    }
}

#[test]
fn a_job_span_continues_the_producers_trace() {
    let (exporter, provider, subscriber) = capture();
    let job = tracing::subscriber::with_default(subscriber, || {
        let producer = tracing::info_span!("enqueue");
        let mut headers = BTreeMap::new();
        producer.in_scope(|| telemetry::inject_trace_context(&mut headers));
        drop(producer);
        assert!(headers.contains_key("traceparent"), "{headers:?}");
        let job = leased(headers);
        let span = telemetry::job_span(&job);
        span.in_scope(|| tracing::info!("working"));
        telemetry::record_job_outcome(&span, AttemptOutcome::Succeeded, None);
        drop(span);
        job
    });
    let spans = exporter.get_finished_spans().expect("spans");
    let producer = spans
        .iter()
        .find(|s| s.name == "enqueue")
        .expect("producer span");
    let consumer = spans
        .iter()
        .find(|s| s.name == "process emails")
        .expect("job span");
    assert_eq!(
        consumer.span_context.trace_id(),
        producer.span_context.trace_id()
    );
    assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
    assert!(consumer.parent_span_is_remote);
    assert_eq!(consumer.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(attr(consumer, "job_id"), Some(job.id.to_string()));
    assert_eq!(attr(consumer, "queue").as_deref(), Some("emails"));
    assert_eq!(attr(consumer, "tenant").as_deref(), Some("acme"));
    assert_eq!(attr(consumer, "attempt").as_deref(), Some("2"));
    assert_eq!(
        attr(consumer, "trace_id"),
        Some(format!("{}-2", job.id.simple()))
    );
    assert_eq!(
        attr(consumer, "otel_trace_id"),
        Some(producer.span_context.trace_id().to_string())
    );
    assert_eq!(attr(consumer, "outcome").as_deref(), Some("succeeded"));
    assert_eq!(consumer.status, Status::Ok);
    assert!(
        consumer
            .attributes
            .iter()
            .all(|kv| !kv.value.to_string().contains("never in spans"))
    );
    provider.shutdown().expect("shutdown");
}

#[test]
fn a_job_without_trace_headers_starts_a_new_trace_and_failures_mark_the_span() {
    let (exporter, provider, subscriber) = capture();
    tracing::subscriber::with_default(subscriber, || {
        let mut headers = BTreeMap::new();
        telemetry::inject_trace_context(&mut headers); // outside any span: nothing
        assert!(headers.is_empty());
        headers.insert("traceparent".into(), "garbage".into());
        let span = telemetry::job_span(&leased(headers));
        telemetry::record_job_outcome(&span, AttemptOutcome::DeadLettered, Some("NODE_EXCEPTION"));
    });
    let spans = exporter.get_finished_spans().expect("spans");
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.parent_span_id, SpanId::INVALID);
    assert_ne!(s.span_context.trace_id(), TraceId::INVALID);
    assert_eq!(attr(s, "outcome").as_deref(), Some("dead_lettered"));
    assert_eq!(attr(s, "code").as_deref(), Some("NODE_EXCEPTION"));
    assert!(matches!(&s.status, Status::Error { description } if description == "NODE_EXCEPTION"));
    provider.shutdown().expect("shutdown");
}

#[test]
fn inject_without_an_otel_layer_writes_nothing() {
    let mut headers = BTreeMap::new();
    let subscriber = tracing_subscriber::registry();
    tracing::subscriber::with_default(subscriber, || {
        let _s = tracing::info_span!("enqueue").entered();
        telemetry::inject_trace_context(&mut headers);
    });
    assert!(headers.is_empty(), "{headers:?}");
}

/// A flow whose `flaky` node fails its first attempt (retried at node level), then
/// passes to `done`.
fn traced_flow(spans: Arc<SpanMiddleware>) -> Result<Flow, flow_core::Error> {
    let calls = Arc::new(AtomicU32::new(0));
    let flaky = Node::new("flaky", move |msg: Message, _ctx: Context| {
        let calls = calls.clone();
        async move {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err::<Option<Message>, BoxError>("first attempt fails".into());
            }
            Ok(Some(msg))
        }
    })
    .with_policy(NodePolicy::default().max_retries(1).backoff(
        Duration::from_millis(1),
        1.0,
        None,
    ));
    let done = Node::new("done", |msg: Message, _ctx: Context| async move {
        Ok::<_, BoxError>(Some(msg))
    });
    let mut flow = create([flaky.to(&[&done]), done.to(&[])]).build()?;
    flow.add_middleware(spans);
    Ok(flow)
}

#[tokio::test]
async fn node_attempt_spans_are_children_of_the_job_span() {
    let (exporter, provider, subscriber) = capture();
    let _default = tracing::subscriber::set_default(subscriber);
    let spans = Arc::new(SpanMiddleware::new());
    let job = leased(BTreeMap::new());
    let trace = telemetry::flow_trace_id(&job);
    let job_span = telemetry::job_span(&job);
    {
        let _registered = spans.enter_job(&trace, &job_span);
        let handle = traced_flow(spans.clone())
            .expect("flow")
            .run()
            .expect("run");
        let msg = Message::new(json!({"n": 1}), flow_core::Headers::new("acme"))
            .with_trace_id(trace.clone());
        let out = handle
            .call(msg, Duration::from_secs(10))
            .await
            .expect("outcome");
        assert!(matches!(out, flow_core::Outcome::Message(_)), "{out:?}");
        handle.stop().await;
        assert_eq!(spans.open_attempts(), 0);
    }
    assert_eq!(spans.registered_jobs(), 0);
    telemetry::record_job_outcome(&job_span, AttemptOutcome::Succeeded, None);
    drop(job_span);

    let finished = exporter.get_finished_spans().expect("spans");
    let job_data = finished
        .iter()
        .find(|s| s.name == "process emails")
        .expect("job span");
    let mut nodes: Vec<&SpanData> = finished
        .iter()
        .filter(|s| s.name.starts_with("node "))
        .collect();
    nodes.sort_by_key(|s| s.start_time);
    let summary: Vec<(String, Option<String>, Option<String>)> = nodes
        .iter()
        .map(|s| (s.name.to_string(), attr(s, "attempt"), attr(s, "outcome")))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("node flaky".into(), Some("0".into()), Some("error".into())),
            (
                "node flaky".into(),
                Some("1".into()),
                Some("success".into())
            ),
            ("node done".into(), Some("0".into()), Some("success".into())),
        ]
    );
    for n in &nodes {
        assert_eq!(
            n.parent_span_id,
            job_data.span_context.span_id(),
            "{}",
            n.name
        );
        assert_eq!(n.span_context.trace_id(), job_data.span_context.trace_id());
        assert_eq!(attr(n, "trace_id"), Some(trace.clone()));
        assert!(attr(n, "latency_ms").is_some());
    }
    assert!(
        matches!(&nodes[0].status, Status::Error { description } if description.contains("first attempt fails"))
    );
    assert_eq!(nodes[1].status, Status::Ok);
    provider.shutdown().expect("shutdown");
}

#[tokio::test]
async fn unregistering_closes_open_attempts_and_unknown_traces_are_ignored() {
    use flow_core::EventKind::*;
    let (exporter, provider, subscriber) = capture();
    let _default = tracing::subscriber::set_default(subscriber);
    let spans = SpanMiddleware::new();
    let job_span = tracing::info_span!("job");
    spans.register_job("t1", &job_span);
    spans
        .on_event(&node_event(NodeStart, "slow", "t1", 0, Some(0.0)))
        .await;
    spans
        .on_event(&node_event(NodeStart, "other", "t-unknown", 0, Some(0.0)))
        .await;
    spans
        .on_event(&node_event(NodeSuccess, "other", "t-unknown", 0, Some(1.0)))
        .await;
    assert_eq!(spans.open_attempts(), 1);
    spans.unregister_job("t1");
    assert_eq!((spans.open_attempts(), spans.registered_jobs()), (0, 0));
    drop(job_span);
    let finished = exporter.get_finished_spans().expect("spans");
    let names: Vec<&str> = finished.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("node ")).count(),
        1,
        "{names:?}"
    );
    let slow = finished
        .iter()
        .find(|s| s.name == "node slow")
        .expect("slow");
    assert_eq!(attr(slow, "outcome").as_deref(), Some("abandoned"));
    provider.shutdown().expect("shutdown");
}
