//! End-to-end: what `penguiflow-worker run` reports about a real run against throwaway
//! Redis and PostgreSQL servers.
//!
//! * `/metrics` after the mixed batch: parsed by a strict classic-format parser (and by
//!   Python's `prometheus_client` when installed), values equal to the jobs processed,
//!   queue depths from the backend's stats refresher; `/health` with the same numbers.
//!   The test prints a real `status --json`, `/health` body and `/metrics` excerpt
//!   (`cargo test --test e2e_observability -- --nocapture`).
//! * Traces: the worker exports over OTLP/gRPC to an in-process mock collector; a job
//!   enqueued with `--header traceparent=...` is processed in a `process <queue>` span of
//!   the producer's trace, child of the producer's span, with node spans below it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::prometheus::{family, parse_strict, sample, sum};
use common::{
    Backend, MIXED_RUN_ARGS, Worker, cli, enqueue_mixed_batch, expected, int, python_parse,
    queue_name, wait_for, wait_until_settled,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// /metrics and /health
// ---------------------------------------------------------------------------------------

/// Families shown in the printed excerpt.
const EXCERPT: &[&str] = &[
    "penguiflow_jobs_processed_total",
    "penguiflow_jobs_succeeded_total",
    "penguiflow_jobs_failed_total",
    "penguiflow_jobs_retried_total",
    "penguiflow_jobs_timeouts_total",
    "penguiflow_jobs_active",
    "penguiflow_queue_depth",
    "penguiflow_job_duration_seconds",
];

/// The lines of `text` that belong to the [`EXCERPT`] families (histograms: `+Inf`
/// bucket, `_sum` and `_count` only).
fn excerpt(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let name = match line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            Some(rest) => rest.split(' ').next().unwrap_or(""),
            None => line.split(['{', ' ']).next().unwrap_or(""),
        };
        let keep = EXCERPT.iter().any(|f| {
            name == *f
                || (name.starts_with(f)
                    && (name == format!("{f}_sum")
                        || name == format!("{f}_count")
                        || (name == format!("{f}_bucket") && line.contains("le=\"+Inf\""))))
        });
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn metrics_and_health(backend: Backend) {
    let url = backend.url();
    let q = queue_name("observed");
    let jobs = enqueue_mixed_batch(&url, &q);
    let exp = expected();
    let mut args = vec!["--queue", q.as_str()];
    args.extend_from_slice(MIXED_RUN_ARGS);
    let mut worker = Worker::start(&url, &args, &[]);
    wait_until_settled(&url, &q, &mut worker, Duration::from_secs(40));

    // Queue depths come from the backend's stats, refreshed every 5 s: wait for the
    // refresh after the last job (and for the counters of the last attempt).
    let ql = [("queue", q.as_str())];
    let (response, fams) = wait_for(
        "/metrics to show the finished batch",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let r = worker.get("/metrics");
            let fams = parse_strict(&r.body)
                .unwrap_or_else(|e| panic!("the strict parser rejects /metrics: {e}\n{}", r.body));
            let depth = |state: &str| {
                sample(
                    &fams,
                    "penguiflow_queue_depth",
                    &[("queue", &q), ("state", state)],
                )
            };
            let processed = sample(&fams, "penguiflow_jobs_processed_total", &ql);
            if depth("completed") == Some(exp.completed as f64)
                && depth("dead") == Some(exp.dead as f64)
                && processed == Some(exp.processed as f64)
            {
                Ok((r, fams))
            } else {
                Err(format!(
                    "completed {:?} dead {:?} processed {processed:?}",
                    depth("completed"),
                    depth("dead")
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()));
    let text = &response.body;
    assert_eq!(
        response.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "content type of /metrics"
    );

    // Types.
    for (name, kind) in [
        ("penguiflow_jobs_processed_total", "counter"),
        ("penguiflow_jobs_succeeded_total", "counter"),
        ("penguiflow_jobs_failed_total", "counter"),
        ("penguiflow_jobs_retried_total", "counter"),
        ("penguiflow_jobs_timeouts_total", "counter"),
        ("penguiflow_jobs_rescued_total", "counter"),
        ("penguiflow_dead_letters_dropped_total", "counter"),
        ("penguiflow_jobs_active", "gauge"),
        ("penguiflow_queue_depth", "gauge"),
        ("penguiflow_job_duration_seconds", "histogram"),
        ("penguiflow_node_duration_seconds", "histogram"),
    ] {
        assert_eq!(family(&fams, name).kind, kind, "type of {name}");
    }

    // Values equal to the jobs processed.
    let v = |name: &str, labels: &[(&str, &str)]| {
        sample(&fams, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?}\n{text}"))
    };
    assert_eq!(
        v("penguiflow_jobs_processed_total", &ql),
        exp.processed as f64
    );
    assert_eq!(
        v("penguiflow_jobs_succeeded_total", &ql),
        exp.succeeded as f64
    );
    for (code, n) in &exp.dead_by_code {
        assert_eq!(
            v(
                "penguiflow_jobs_failed_total",
                &[("queue", &q), ("code", code)]
            ),
            *n as f64,
            "failed_total{{code={code}}}"
        );
    }
    assert_eq!(
        sum(&fams, "penguiflow_jobs_failed_total", &ql),
        exp.dead as f64
    );
    assert_eq!(
        v(
            "penguiflow_jobs_retried_total",
            &[("queue", &q), ("code", "NODE_EXCEPTION")]
        ),
        exp.retried as f64
    );
    assert_eq!(
        sum(&fams, "penguiflow_jobs_retried_total", &ql),
        exp.retried as f64
    );
    assert_eq!(
        v(
            "penguiflow_jobs_timeouts_total",
            &[("queue", &q), ("code", "JOB_TIMEOUT")]
        ),
        exp.timeouts as f64
    );
    assert_eq!(
        sum(&fams, "penguiflow_jobs_timeouts_total", &ql),
        exp.timeouts as f64
    );
    assert_eq!(v("penguiflow_jobs_rescued_total", &ql), 0.0);
    assert_eq!(v("penguiflow_jobs_active", &ql), 0.0);
    for (state, n) in [
        ("completed", exp.completed),
        ("dead", exp.dead),
        ("ready", 0),
        ("scheduled", 0),
        ("running", 0),
    ] {
        assert_eq!(
            v("penguiflow_queue_depth", &[("queue", &q), ("state", state)]),
            n as f64,
            "queue_depth{{state={state}}}"
        );
    }
    assert_eq!(
        sum(&fams, "penguiflow_job_duration_seconds_count", &ql),
        exp.processed as f64,
        "one duration per attempt"
    );
    for (outcome, n) in [
        ("succeeded", exp.succeeded),
        ("retried", exp.retried),
        ("dead_lettered", exp.dead),
    ] {
        assert_eq!(
            v(
                "penguiflow_job_duration_seconds_count",
                &[("queue", &q), ("outcome", outcome)]
            ),
            n as f64,
            "job_duration_seconds_count{{outcome={outcome}}}"
        );
    }
    assert_eq!(v("penguiflow_backend_up", &ql), 1.0);
    assert_eq!(v("penguiflow_worker_up", &[]), 1.0);
    assert_eq!(v("penguiflow_worker_draining", &[]), 0.0);

    // The same text through Python's prometheus_client, when it is installed.
    if let Some(parsed) = python_parse(text) {
        let n =
            parsed.unwrap_or_else(|e| panic!("prometheus_client rejects /metrics: {e}\n{text}"));
        let ours: usize = fams.iter().map(|f| f.samples.len()).sum();
        assert_eq!(
            n, ours,
            "prometheus_client and the strict parser count the same samples"
        );
    }

    // /health: the same numbers.
    let health = worker.get("/health");
    assert_eq!(health.status, 200);
    let h: Value = serde_json::from_str(&health.body).expect("/health is JSON");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["active_jobs"], 0, "{h}");
    assert_eq!(h["queue_depth"], 0, "ready + scheduled: {h}");
    for (field, n) in [
        ("processed", exp.processed),
        ("succeeded", exp.succeeded),
        ("failed", exp.dead),
        ("timeouts", exp.timeouts),
        ("retried", exp.retried),
    ] {
        assert_eq!(int(&h["stats"], field), n, "/health stats.{field}: {h}");
    }

    let status_out = cli(&["--url", &url, "status", "--queue", &q, "--json"]);
    let s = status_out.json();
    assert_eq!(int(&s, "completed"), exp.completed, "{s}");
    assert_eq!(int(&s, "dead"), exp.dead, "{s}");
    assert_eq!(jobs.len() as u64, exp.completed + exp.dead);

    worker.stop(Duration::from_secs(20));

    println!("==== {backend:?}: penguiflow-worker status --queue {q} --json");
    print!("{}", status_out.stdout);
    println!("==== {backend:?}: GET /health");
    println!("{}", health.body);
    println!("==== {backend:?}: GET /metrics (excerpt)");
    print!("{}", excerpt(text));
}

#[test]
fn metrics_and_health_match_the_jobs_processed_redis() {
    metrics_and_health(Backend::Redis);
}

#[test]
fn metrics_and_health_match_the_jobs_processed_postgres() {
    metrics_and_health(Backend::Postgres);
}

// ---------------------------------------------------------------------------------------
// Traces through a mock OTLP/gRPC collector
// ---------------------------------------------------------------------------------------

/// Spans received, with the `service.name` of their resource.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A string, integer or boolean attribute as text.
fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random-enough id of `n` hex digits (never all zero).
fn fresh_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(n);
    s.replace_range(0..1, "a");
    s
}

/// Starts the collector on 127.0.0.1:0; returns its port. Runs until `rt` is dropped.
fn start_collector(rt: &tokio::runtime::Runtime, collector: Collector) -> u16 {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the mock collector");
    let port = listener.local_addr().expect("collector address").port();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    rt.spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                TraceServiceServer::new(collector),
                incoming,
                std::future::pending::<()>(),
            )
            .await
        {
            eprintln!("mock OTLP collector stopped: {e}");
        }
    });
    port
}

#[test]
fn otlp_spans_continue_the_producers_trace_redis() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the mock collector");
    let collector = Collector::default();
    let port = start_collector(&rt, collector.clone());

    let url = Backend::Redis.url();
    let q = queue_name("traced");
    let service = format!("e2e-worker-{}", std::process::id());

    // Two producers' spans: one job that succeeds, one that fails once and is retried.
    let (trace_a, parent_a) = (fresh_hex(32), fresh_hex(16));
    let (trace_b, parent_b) = (fresh_hex(32), fresh_hex(16));
    let enqueue = |trace: &str, parent: &str, payload: &str| -> String {
        let header = format!("traceparent=00-{trace}-{parent}-01");
        let out = cli(&[
            "--url",
            &url,
            "enqueue",
            "--queue",
            &q,
            "--max-retries",
            "1",
            "--header",
            &header,
            payload,
        ]);
        out.assert_code(0, "enqueue --header traceparent=...");
        out.stdout.trim().to_owned()
    };
    let id_a = enqueue(&trace_a, &parent_a, r#"{"n": 1}"#);
    let id_b = enqueue(&trace_b, &parent_b, r#"{"fail_times": 1}"#);

    let endpoint = format!("http://127.0.0.1:{port}");
    let mut worker = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--retry-base",
            "0.05",
            "--retry-cap",
            "0.2",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", &service),
        ],
    );
    worker.health_addr();
    assert!(
        worker.logs().contains("\"otlp\":true"),
        "the worker says OTLP export is on\n{}",
        worker.logs()
    );
    let s = wait_until_settled(&url, &q, &mut worker, Duration::from_secs(30));
    assert_eq!(int(&s, "completed"), 2, "{s}");
    // Spans are flushed when the worker stops.
    worker.stop(Duration::from_secs(30));

    let process_name = format!("process {q}");
    let spans = wait_for(
        "the process spans of both jobs at the collector",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let spans = collector.spans();
            let n = spans.iter().filter(|(_, s)| s.name == process_name).count();
            if n >= 3 {
                Ok(spans)
            } else {
                Err(format!("{n} process spans"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()));
    let describe = || {
        spans
            .iter()
            .map(|(svc, s)| {
                format!(
                    "{svc} {:?} trace={} span={} parent={}",
                    s.name,
                    hex(&s.trace_id),
                    hex(&s.span_id),
                    hex(&s.parent_span_id)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (svc, _) in &spans {
        assert_eq!(svc, &service, "service.name of every span");
    }

    let process_spans = |trace: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == process_name && hex(&s.trace_id) == trace)
            .collect()
    };
    let node_children = |parent: &Span| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };

    // Job A: one attempt, in the producer's trace, child of the producer's span.
    let a = process_spans(&trace_a);
    assert_eq!(a.len(), 1, "one process span in trace A:\n{}", describe());
    let a = a[0];
    assert_eq!(
        hex(&a.parent_span_id),
        parent_a,
        "parent of job A's span:\n{}",
        describe()
    );
    assert_eq!(a.kind, span::SpanKind::Consumer as i32, "job span kind");
    assert_eq!(
        attr(&a.attributes, "job_id").as_deref(),
        Some(id_a.as_str())
    );
    assert_eq!(attr(&a.attributes, "queue").as_deref(), Some(q.as_str()));
    assert_eq!(attr(&a.attributes, "tenant").as_deref(), Some("default"));
    assert_eq!(attr(&a.attributes, "attempt").as_deref(), Some("1"));
    assert_eq!(attr(&a.attributes, "outcome").as_deref(), Some("succeeded"));
    let nodes = node_children(a);
    assert!(
        !nodes.is_empty(),
        "node spans under job A's span:\n{}",
        describe()
    );
    for n in &nodes {
        assert_eq!(n.name, "node exercise", "{}", describe());
        assert_eq!(n.kind, span::SpanKind::Internal as i32);
        assert_eq!(
            attr(&n.attributes, "node_name").as_deref(),
            Some("exercise")
        );
        assert_eq!(attr(&n.attributes, "outcome").as_deref(), Some("success"));
    }

    // Job B: two attempts, both continuing B's producer span; the first one failed.
    let mut b = process_spans(&trace_b);
    assert_eq!(b.len(), 2, "two process spans in trace B:\n{}", describe());
    b.sort_by_key(|s| attr(&s.attributes, "attempt"));
    for s in &b {
        assert_eq!(
            hex(&s.parent_span_id),
            parent_b,
            "parent of job B's spans:\n{}",
            describe()
        );
        assert_eq!(
            attr(&s.attributes, "job_id").as_deref(),
            Some(id_b.as_str())
        );
        assert!(
            !node_children(s).is_empty(),
            "node spans under each attempt:\n{}",
            describe()
        );
    }
    assert_eq!(
        attr(&b[0].attributes, "outcome").as_deref(),
        Some("retried")
    );
    assert_eq!(
        attr(&b[0].attributes, "code").as_deref(),
        Some("NODE_EXCEPTION")
    );
    assert_eq!(
        b[0].status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error as i32),
        "the failed attempt's span status"
    );
    assert_eq!(
        attr(&b[1].attributes, "outcome").as_deref(),
        Some("succeeded")
    );
    let failed_nodes = node_children(b[0]);
    assert!(
        failed_nodes
            .iter()
            .any(|n| attr(&n.attributes, "outcome").as_deref() == Some("error")),
        "a node span with outcome error under the failed attempt:\n{}",
        describe()
    );
    assert_ne!(trace_a, trace_b);
    let by_trace: BTreeMap<String, usize> = spans
        .iter()
        .filter(|(_, s)| s.name == process_name || s.name.starts_with("node "))
        .fold(BTreeMap::new(), |mut m, (_, s)| {
            *m.entry(hex(&s.trace_id)).or_default() += 1;
            m
        });
    assert_eq!(
        by_trace.keys().collect::<Vec<_>>().len(),
        2,
        "every job and node span belongs to one of the producers' traces:\n{}",
        describe()
    );
    assert!(by_trace.contains_key(&trace_a) && by_trace.contains_key(&trace_b));
    drop(rt);
}
