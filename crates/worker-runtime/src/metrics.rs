//! Prometheus metrics of a worker, in the classic text exposition format 0.0.4.
//!
//! [`Metrics`] is a small registry of its own (no global state, so tests and several
//! pools in one process do not interfere) with a hand-written encoder: the format is
//! tiny, and the maintained Rust clients either emit OpenMetrics only (prometheus-client,
//! which promtool 2.42 and the classic parsers reject) or hang off a global recorder
//! (metrics + metrics-exporter-prometheus). See `docs/observability.md` for every metric.
//!
//! It is fed from three places:
//!
//! * as a [`JobObserver`] attached with [`WorkerPoolBuilder::observer`](crate::WorkerPoolBuilder::observer):
//!   one report per finished attempt (outcome counters, job durations) and the reaper's
//!   rescued leases;
//! * as a [`Middleware`] attached with [`WorkerPoolBuilder::middleware`](crate::WorkerPoolBuilder::middleware):
//!   every [`FlowEvent`] (node event counters, node attempt durations);
//! * by [`spawn_queue_stats_refresher`], which reads [`JobQueue::stats`] on an interval:
//!   queue depth by state, oldest ready age, paused, dropped dead letters and backend
//!   reachability ([`BackendHealth`]).
//!
//! ```
//! use std::sync::Arc;
//! use worker_runtime::metrics::Metrics;
//!
//! let metrics = Arc::new(Metrics::new());
//! metrics.register_queue("emails");
//! let text = metrics.render();
//! assert!(text.contains("penguiflow_jobs_processed_total{queue=\"emails\"} 0\n"));
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flow_core::queue::{JobQueue, QueueStats};
use flow_core::{EventKind, FlowEvent, Middleware};
use tokio::task::JoinHandle;

use crate::stats::{AttemptOutcome, AttemptReport, JobObserver, PoolStats};

/// The content type of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram bucket upper bounds, in seconds, for job and node durations: 1 ms to 5 min.
pub const DURATION_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Default interval of [`spawn_queue_stats_refresher`].
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Most label sets one metric keeps; new ones beyond it are dropped and counted in
/// `penguiflow_metric_series_dropped_total{metric}` (protects against unbounded custom
/// error codes or generated node names).
pub const MAX_SERIES_PER_METRIC: usize = 1000;

/// Length of the window [`FailureWindow`] looks at.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One histogram series: per-bucket (non-cumulative) counts, sum and count.
#[derive(Clone, Debug)]
struct HistogramData {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for HistogramData {
    fn default() -> Self {
        Self {
            buckets: vec![0; DURATION_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl HistogramData {
    fn observe(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// A metric with a fixed set of label names and one value per label set.
struct Family<V> {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, V>>,
    overflowed: AtomicBool,
}

impl<V: Default> Family<V> {
    const fn new(
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            kind,
            labels,
            series: Mutex::new(BTreeMap::new()),
            overflowed: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the series of `values` (created at default when new). Returns false
    /// when the series was new and the family is full (nothing done).
    fn with(&self, values: &[&str], f: impl FnOnce(&mut V)) -> bool {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let key: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
        let mut series = lock(&self.series);
        if let Some(v) = series.get_mut(&key) {
            f(v);
            return true;
        }
        if series.len() >= MAX_SERIES_PER_METRIC {
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    metric = self.name,
                    limit = MAX_SERIES_PER_METRIC,
                    "too many label sets for a metric; new ones are dropped"
                );
            }
            return false;
        }
        let mut v = V::default();
        f(&mut v);
        series.insert(key, v);
        true
    }

    fn write_header(&self, out: &mut String) {
        let _ = write!(out, "# HELP {} ", self.name);
        escape_help(self.help, out);
        let _ = writeln!(out, "\n# TYPE {} {}", self.name, self.kind.as_str());
    }
}

fn write_labels(out: &mut String, names: &[&str], values: &[String], extra: Option<(&str, &str)>) {
    if names.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let pairs = names
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .chain(extra);
    for (n, v) in pairs {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(n);
        out.push_str("=\"");
        escape_label_value(v, out);
        out.push('"');
    }
    out.push('}');
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes a HELP text: backslash and line feed.
fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Formats a sample value the way Prometheus parses it (`+Inf`, `-Inf`, `NaN`).
fn write_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

trait Encode {
    fn encode(&self, fam: &Family<Self>, labels: &[String], out: &mut String)
    where
        Self: Sized;
}

impl Encode for u64 {
    fn encode(&self, fam: &Family<Self>, labels: &[String], out: &mut String) {
        out.push_str(fam.name);
        write_labels(out, fam.labels, labels, None);
        let _ = writeln!(out, " {self}");
    }
}

impl Encode for f64 {
    fn encode(&self, fam: &Family<Self>, labels: &[String], out: &mut String) {
        out.push_str(fam.name);
        write_labels(out, fam.labels, labels, None);
        out.push(' ');
        write_f64(out, *self);
        out.push('\n');
    }
}

impl Encode for HistogramData {
    fn encode(&self, fam: &Family<Self>, labels: &[String], out: &mut String) {
        let mut cumulative = 0;
        let mut le = String::new();
        for (bound, n) in DURATION_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n;
            le.clear();
            write_f64(&mut le, *bound);
            let _ = write!(out, "{}_bucket", fam.name);
            write_labels(out, fam.labels, labels, Some(("le", &le)));
            let _ = writeln!(out, " {cumulative}");
        }
        let _ = write!(out, "{}_bucket", fam.name);
        write_labels(out, fam.labels, labels, Some(("le", "+Inf")));
        let _ = writeln!(out, " {}", self.count);
        let _ = write!(out, "{}_sum", fam.name);
        write_labels(out, fam.labels, labels, None);
        out.push(' ');
        write_f64(out, self.sum);
        out.push('\n');
        let _ = write!(out, "{}_count", fam.name);
        write_labels(out, fam.labels, labels, None);
        let _ = writeln!(out, " {}", self.count);
    }
}

impl<V: Encode + Default> Family<V> {
    fn encode(&self, out: &mut String) {
        self.write_header(out);
        for (labels, v) in lock(&self.series).iter() {
            v.encode(self, labels, out);
        }
    }
}

type Counter = Family<u64>;
type Gauge = Family<f64>;
type Histogram = Family<HistogramData>;

const Q: &[&str] = &["queue"];
const QC: &[&str] = &["queue", "code"];

/// Queue states reported in `penguiflow_queue_depth{state}`.
pub const QUEUE_STATES: [&str; 5] = ["ready", "scheduled", "running", "completed", "dead"];

/// The worker's Prometheus registry. Share it as an `Arc<Metrics>`; attach it to a pool
/// as observer and middleware; serve [`Metrics::render`] (the HTTP server in
/// [`crate::http`] does).
pub struct Metrics {
    processed: Counter,
    succeeded: Counter,
    failed: Counter,
    retried: Counter,
    timeouts: Counter,
    cancelled: Counter,
    released: Counter,
    lease_lost: Counter,
    rescued: Counter,
    dead_dropped: Counter,
    fetch_errors: Counter,
    active: Gauge,
    depth: Gauge,
    oldest_ready: Gauge,
    paused: Gauge,
    worker_up: Gauge,
    draining: Gauge,
    backend_up: Gauge,
    job_duration: Histogram,
    node_duration: Histogram,
    node_events: Counter,
    series_dropped: Counter,
    pools: Mutex<Vec<(String, Arc<PoolStats>)>>,
    window: Arc<FailureWindow>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("pools", &lock(&self.pools).len())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry; `penguiflow_worker_up` is 1.
    pub fn new() -> Self {
        let m = Self {
            processed: Family::new(
                "penguiflow_jobs_processed_total",
                "Job attempts that reached an outcome (succeeded, retried, dead-lettered or cancelled).",
                Kind::Counter,
                Q,
            ),
            succeeded: Family::new(
                "penguiflow_jobs_succeeded_total",
                "Job attempts that completed the job.",
                Kind::Counter,
                Q,
            ),
            failed: Family::new(
                "penguiflow_jobs_failed_total",
                "Jobs moved to the dead-letter set, by error code.",
                Kind::Counter,
                QC,
            ),
            retried: Family::new(
                "penguiflow_jobs_retried_total",
                "Job attempts that failed and were scheduled to run again, by error code.",
                Kind::Counter,
                QC,
            ),
            timeouts: Family::new(
                "penguiflow_jobs_timeouts_total",
                "Job attempts that ended in NODE_TIMEOUT or JOB_TIMEOUT.",
                Kind::Counter,
                QC,
            ),
            cancelled: Family::new(
                "penguiflow_jobs_cancelled_total",
                "Running jobs cancelled on request.",
                Kind::Counter,
                Q,
            ),
            released: Family::new(
                "penguiflow_jobs_released_total",
                "Jobs handed back to the queue at shutdown (attempt not counted).",
                Kind::Counter,
                Q,
            ),
            lease_lost: Family::new(
                "penguiflow_jobs_lease_lost_total",
                "Attempts whose lease was lost to another worker; their outcome was dropped.",
                Kind::Counter,
                Q,
            ),
            rescued: Family::new(
                "penguiflow_jobs_rescued_total",
                "Expired leases reclaimed by this worker's reaper (their worker died or stalled).",
                Kind::Counter,
                Q,
            ),
            dead_dropped: Family::new(
                "penguiflow_dead_letters_dropped_total",
                "Dead letters dropped because the dead-letter set was full, as the backend counts them.",
                Kind::Counter,
                Q,
            ),
            fetch_errors: Family::new(
                "penguiflow_fetch_errors_total",
                "Fetches from the backend that failed.",
                Kind::Counter,
                Q,
            ),
            active: Family::new(
                "penguiflow_jobs_active",
                "Jobs running in this worker now.",
                Kind::Gauge,
                Q,
            ),
            depth: Family::new(
                "penguiflow_queue_depth",
                "Jobs in the queue by state, from the backend's stats.",
                Kind::Gauge,
                &["queue", "state"],
            ),
            oldest_ready: Family::new(
                "penguiflow_queue_oldest_ready_age_seconds",
                "Age of the oldest ready job, from the backend's stats (0 when none).",
                Kind::Gauge,
                Q,
            ),
            paused: Family::new(
                "penguiflow_queue_paused",
                "1 when the queue is paused, else 0.",
                Kind::Gauge,
                Q,
            ),
            worker_up: Family::new(
                "penguiflow_worker_up",
                "1 while this worker process runs.",
                Kind::Gauge,
                &[],
            ),
            draining: Family::new(
                "penguiflow_worker_draining",
                "1 once this worker stopped fetching to shut down, else 0.",
                Kind::Gauge,
                &[],
            ),
            backend_up: Family::new(
                "penguiflow_backend_up",
                "1 when the last stats request to the backend succeeded, else 0.",
                Kind::Gauge,
                Q,
            ),
            job_duration: Family::new(
                "penguiflow_job_duration_seconds",
                "Wall time of job attempts, by outcome.",
                Kind::Histogram,
                &["queue", "outcome"],
            ),
            node_duration: Family::new(
                "penguiflow_node_duration_seconds",
                "Wall time of node attempts (success, error or timeout).",
                Kind::Histogram,
                &["node"],
            ),
            node_events: Family::new(
                "penguiflow_node_events_total",
                "Flow events by node and event type.",
                Kind::Counter,
                &["node", "event_type"],
            ),
            series_dropped: Family::new(
                "penguiflow_metric_series_dropped_total",
                "Samples not recorded because their metric reached its label set limit.",
                Kind::Counter,
                &["metric"],
            ),
            pools: Mutex::new(Vec::new()),
            window: Arc::new(FailureWindow::new()),
        };
        m.set_worker_up(true);
        m.set_draining(false);
        m
    }

    fn counter_add(&self, c: &Counter, labels: &[&str], n: u64) {
        if !c.with(labels, |v| *v += n) {
            self.series_dropped.with(&[c.name], |v| *v += 1);
        }
    }

    /// Sets a counter kept elsewhere (the backend's or the pool's). A lower value than
    /// before is passed on as is: Prometheus reads it as a counter reset.
    fn counter_set(&self, c: &Counter, labels: &[&str], n: u64) {
        if !c.with(labels, |v| *v = n) {
            self.series_dropped.with(&[c.name], |v| *v += 1);
        }
    }

    fn gauge_set(&self, g: &Gauge, labels: &[&str], x: f64) {
        if !g.with(labels, |v| *v = x) {
            self.series_dropped.with(&[g.name], |v| *v += 1);
        }
    }

    fn observe(&self, h: &Histogram, labels: &[&str], seconds: f64) {
        if !h.with(labels, |v| v.observe(seconds)) {
            self.series_dropped.with(&[h.name], |v| *v += 1);
        }
    }

    /// Creates the per-queue series of `queue` at zero, so `rate()` and alerts see them
    /// from the first scrape. Called by [`Metrics::watch_pool`] and the stats refresher.
    pub fn register_queue(&self, queue: &str) {
        for c in [
            &self.processed,
            &self.succeeded,
            &self.cancelled,
            &self.released,
            &self.lease_lost,
            &self.rescued,
            &self.dead_dropped,
            &self.fetch_errors,
        ] {
            self.counter_add(c, &[queue], 0);
        }
        self.gauge_set(&self.active, &[queue], 0.0);
    }

    /// Reads `penguiflow_jobs_active` and `penguiflow_fetch_errors_total` of `queue` from
    /// a pool's live counters at every render.
    pub fn watch_pool(&self, queue: &str, stats: Arc<PoolStats>) {
        self.register_queue(queue);
        let mut pools = lock(&self.pools);
        pools.retain(|(q, _)| q != queue);
        pools.push((queue.to_owned(), stats));
    }

    /// Sets the queue gauges (depth by state, oldest ready age, paused) and the dropped
    /// dead letters counter from one backend stats answer.
    pub fn record_queue_stats(&self, s: &QueueStats) {
        let q = s.queue.as_str();
        let counts = [s.ready, s.scheduled, s.running, s.completed, s.dead];
        for (state, n) in QUEUE_STATES.iter().zip(counts) {
            self.gauge_set(&self.depth, &[q, state], n as f64);
        }
        self.gauge_set(&self.oldest_ready, &[q], s.oldest_ready_age_s.max(0.0));
        self.gauge_set(&self.paused, &[q], if s.paused { 1.0 } else { 0.0 });
        self.counter_set(&self.dead_dropped, &[q], s.dead_dropped);
    }

    /// Sets `penguiflow_backend_up{queue}`.
    pub fn set_backend_up(&self, queue: &str, up: bool) {
        self.gauge_set(&self.backend_up, &[queue], if up { 1.0 } else { 0.0 });
    }

    /// Sets `penguiflow_worker_up` (1 from creation).
    pub fn set_worker_up(&self, up: bool) {
        self.gauge_set(&self.worker_up, &[], if up { 1.0 } else { 0.0 });
    }

    /// Sets `penguiflow_worker_draining` (the HTTP server does it from its draining flag
    /// before each scrape).
    pub fn set_draining(&self, draining: bool) {
        self.gauge_set(&self.draining, &[], if draining { 1.0 } else { 0.0 });
    }

    /// The recent failure ratio fed by [`JobObserver::attempt_finished`], for health.
    pub fn failure_window(&self) -> Arc<FailureWindow> {
        Arc::clone(&self.window)
    }

    /// Renders every metric in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.encode(&mut out);
        out
    }

    /// Appends every metric to `out` in the Prometheus text format 0.0.4.
    pub fn encode(&self, out: &mut String) {
        let pools: Vec<(String, Arc<PoolStats>)> = lock(&self.pools).clone();
        for (queue, stats) in &pools {
            let snap = stats.snapshot();
            self.gauge_set(&self.active, &[queue], snap.active as f64);
            self.counter_set(&self.fetch_errors, &[queue], snap.fetch_errors);
        }
        for c in [
            &self.processed,
            &self.succeeded,
            &self.failed,
            &self.retried,
            &self.timeouts,
            &self.cancelled,
            &self.released,
            &self.lease_lost,
            &self.rescued,
            &self.dead_dropped,
            &self.fetch_errors,
        ] {
            c.encode(out);
        }
        for g in [
            &self.active,
            &self.depth,
            &self.oldest_ready,
            &self.paused,
            &self.backend_up,
            &self.worker_up,
            &self.draining,
        ] {
            g.encode(out);
        }
        self.job_duration.encode(out);
        self.node_duration.encode(out);
        self.node_events.encode(out);
        self.series_dropped.encode(out);
    }
}

/// The `outcome` label of `penguiflow_job_duration_seconds`.
pub const fn outcome_label(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Succeeded => "succeeded",
        AttemptOutcome::Retried => "retried",
        AttemptOutcome::DeadLettered => "dead_lettered",
        AttemptOutcome::Cancelled => "cancelled",
        AttemptOutcome::Released => "released",
        AttemptOutcome::LeaseLost => "lease_lost",
    }
}

fn is_timeout(code: Option<&str>) -> bool {
    matches!(code, Some("NODE_TIMEOUT" | "JOB_TIMEOUT"))
}

impl JobObserver for Metrics {
    fn attempt_finished(&self, r: &AttemptReport) {
        let q = r.queue.as_str();
        let code = r.code.as_deref().unwrap_or("UNKNOWN");
        match r.outcome {
            AttemptOutcome::Succeeded => {
                self.counter_add(&self.processed, &[q], 1);
                self.counter_add(&self.succeeded, &[q], 1);
            }
            AttemptOutcome::Retried => {
                self.counter_add(&self.processed, &[q], 1);
                self.counter_add(&self.retried, &[q, code], 1);
            }
            AttemptOutcome::DeadLettered => {
                self.counter_add(&self.processed, &[q], 1);
                self.counter_add(&self.failed, &[q, code], 1);
            }
            AttemptOutcome::Cancelled => {
                self.counter_add(&self.processed, &[q], 1);
                self.counter_add(&self.cancelled, &[q], 1);
            }
            AttemptOutcome::Released => self.counter_add(&self.released, &[q], 1),
            AttemptOutcome::LeaseLost => self.counter_add(&self.lease_lost, &[q], 1),
        }
        if is_timeout(r.code.as_deref()) {
            self.counter_add(&self.timeouts, &[q, code], 1);
        }
        self.observe(
            &self.job_duration,
            &[q, outcome_label(r.outcome)],
            r.duration.as_secs_f64(),
        );
        self.window.attempt_finished(r);
    }

    fn leases_rescued(&self, queue: &str, count: u64) {
        self.counter_add(&self.rescued, &[queue], count);
    }
}

#[async_trait]
impl Middleware for Metrics {
    async fn on_event(&self, ev: &FlowEvent) {
        let node = ev.node_name.as_str();
        self.counter_add(&self.node_events, &[node, ev.kind.as_str()], 1);
        if matches!(
            ev.kind,
            EventKind::NodeSuccess | EventKind::NodeError | EventKind::NodeTimeout
        ) && let Some(ms) = ev.latency_ms
        {
            self.observe(&self.node_duration, &[node], ms / 1000.0);
        }
    }
}

/// Attempts and failures of the last [`FAILURE_WINDOW`], in per-second buckets: the
/// failure ratio `/health` looks at.
///
/// An attempt counts when it reached an outcome (succeeded, retried, dead-lettered or
/// cancelled; not handed back at shutdown, not lost to another worker). It counts as a
/// failure when it was dead-lettered or ended in `NODE_TIMEOUT` / `JOB_TIMEOUT` (once,
/// even when both).
#[derive(Debug)]
pub struct FailureWindow {
    start: Instant,
    buckets: Mutex<Vec<WindowBucket>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct WindowBucket {
    second: u64,
    attempts: u64,
    failures: u64,
}

/// What [`FailureWindow::snapshot`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct WindowSnapshot {
    /// Attempts that reached an outcome in the window.
    pub attempts: u64,
    /// Of those, dead-lettered or timed out.
    pub failures: u64,
}

impl WindowSnapshot {
    /// `failures / attempts` (0 when there were no attempts).
    pub fn ratio(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.failures as f64 / self.attempts as f64
        }
    }
}

impl Default for FailureWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl FailureWindow {
    /// An empty window.
    pub fn new() -> Self {
        let n = FAILURE_WINDOW.as_secs() as usize;
        Self {
            start: Instant::now(),
            buckets: Mutex::new(vec![WindowBucket::default(); n]),
        }
    }

    fn now_second(&self) -> u64 {
        // Start at 1 so a fresh bucket (second 0) never looks current.
        self.start.elapsed().as_secs() + 1
    }

    /// Records one attempt that reached an outcome.
    pub fn record(&self, failed: bool) {
        self.record_at(self.now_second(), failed);
    }

    fn record_at(&self, second: u64, failed: bool) {
        let mut b = lock(&self.buckets);
        let len = b.len() as u64;
        let slot = &mut b[(second % len) as usize];
        if slot.second != second {
            *slot = WindowBucket {
                second,
                ..WindowBucket::default()
            };
        }
        slot.attempts += 1;
        slot.failures += u64::from(failed);
    }

    /// Attempts and failures of the last minute.
    pub fn snapshot(&self) -> WindowSnapshot {
        self.snapshot_at(self.now_second())
    }

    fn snapshot_at(&self, now: u64) -> WindowSnapshot {
        let b = lock(&self.buckets);
        let len = b.len() as u64;
        b.iter()
            .filter(|x| x.second != 0 && x.second + len > now && x.second <= now)
            .fold(WindowSnapshot::default(), |acc, x| WindowSnapshot {
                attempts: acc.attempts + x.attempts,
                failures: acc.failures + x.failures,
            })
    }
}

impl JobObserver for FailureWindow {
    fn attempt_finished(&self, r: &AttemptReport) {
        let counted = matches!(
            r.outcome,
            AttemptOutcome::Succeeded
                | AttemptOutcome::Retried
                | AttemptOutcome::DeadLettered
                | AttemptOutcome::Cancelled
        );
        if counted {
            let failed = r.outcome == AttemptOutcome::DeadLettered || is_timeout(r.code.as_deref());
            self.record(failed);
        }
    }
}

/// Reachability of the queue backend, as the stats refresher last saw it. Read by
/// `/health` and `/health/ready`.
#[derive(Debug)]
pub struct BackendHealth {
    interval: Duration,
    state: Mutex<BackendState>,
}

#[derive(Debug, Default)]
struct BackendState {
    last_ok: Option<Instant>,
    last_error: Option<(Instant, String)>,
    last_attempt_ok: bool,
    queues: BTreeMap<String, QueueStats>,
}

/// A point-in-time view of [`BackendHealth`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackendStatus {
    /// The last refresh succeeded and is no older than 3 refresh intervals.
    pub reachable: bool,
    /// Seconds since the last successful refresh (`None` before the first).
    pub last_ok_age_s: Option<f64>,
    /// The last error (passwords in URLs redacted), if the last refresh failed.
    pub last_error: Option<String>,
    /// Ready plus scheduled jobs over the served queues, from the last successful stats.
    pub queue_depth: u64,
}

impl BackendHealth {
    /// Tracks a backend refreshed every `refresh_interval`; it counts as unreachable
    /// until the first success and when the last success is older than 3 intervals.
    pub fn new(refresh_interval: Duration) -> Self {
        Self {
            interval: refresh_interval,
            state: Mutex::new(BackendState::default()),
        }
    }

    /// The refresh interval given at creation.
    pub fn refresh_interval(&self) -> Duration {
        self.interval
    }

    /// Records a successful refresh with the stats of the queues (empty after a ping).
    pub fn record_success(&self, stats: &[QueueStats]) {
        let mut s = lock(&self.state);
        s.last_ok = Some(Instant::now());
        s.last_attempt_ok = true;
        for st in stats {
            s.queues.insert(st.queue.clone(), st.clone());
        }
    }

    /// Keeps the stats of the queues that answered during a refresh that failed for others.
    fn store_partial(&self, stats: Vec<QueueStats>) {
        let mut s = lock(&self.state);
        for st in stats {
            s.queues.insert(st.queue.clone(), st);
        }
    }

    /// Records a failed refresh (or ping). The message is redacted of URL passwords.
    pub fn record_failure(&self, error: &str) {
        let mut s = lock(&self.state);
        s.last_attempt_ok = false;
        s.last_error = Some((
            Instant::now(),
            flow_core::redact::redact_text(error).into_owned(),
        ));
    }

    /// Whether the backend counts as reachable now.
    pub fn is_reachable(&self) -> bool {
        self.status().reachable
    }

    /// The last stats of each queue.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        lock(&self.state).queues.values().cloned().collect()
    }

    /// Reachability, last error and queue depth.
    pub fn status(&self) -> BackendStatus {
        let s = lock(&self.state);
        let age = s.last_ok.map(|t| t.elapsed());
        let fresh = age.is_some_and(|a| a <= self.interval.saturating_mul(3));
        BackendStatus {
            reachable: s.last_attempt_ok && fresh,
            last_ok_age_s: age.map(|a| a.as_secs_f64()),
            last_error: if s.last_attempt_ok {
                None
            } else {
                s.last_error.as_ref().map(|(_, e)| e.clone())
            },
            queue_depth: s.queues.values().map(|q| q.ready + q.scheduled).sum(),
        }
    }
}

/// Asks the backend for the stats of every queue in `queues` (or pings it when `queues`
/// is empty), each request bounded by `timeout`; updates `metrics` and `health`. Returns
/// whether everything answered.
pub async fn refresh_queue_stats(
    metrics: &Metrics,
    queue: &dyn JobQueue,
    queues: &[String],
    health: &BackendHealth,
    timeout: Duration,
) -> bool {
    if queues.is_empty() {
        return match tokio::time::timeout(timeout, queue.ping()).await {
            Ok(Ok(())) => {
                health.record_success(&[]);
                true
            }
            Ok(Err(e)) => {
                health.record_failure(&e.to_string());
                false
            }
            Err(_) => {
                health.record_failure(&format!("ping timed out after {timeout:?}"));
                false
            }
        };
    }
    let mut ok = Vec::with_capacity(queues.len());
    let mut first_error = None;
    for name in queues {
        let err = match tokio::time::timeout(timeout, queue.stats(name)).await {
            Ok(Ok(stats)) => {
                metrics.record_queue_stats(&stats);
                metrics.set_backend_up(name, true);
                ok.push(stats);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("stats of queue {name} timed out after {timeout:?}"),
        };
        metrics.set_backend_up(name, false);
        first_error.get_or_insert(err);
    }
    match first_error {
        None => {
            health.record_success(&ok);
            true
        }
        Some(e) => {
            health.store_partial(ok);
            health.record_failure(&e);
            false
        }
    }
}

/// Spawns a task that refreshes the stats of `queues` every `every` (use
/// [`DEFAULT_REFRESH_INTERVAL`]; at least 100 ms), first at once. Returns the task (abort
/// it to stop) and the backend reachability it keeps up to date. Changes of
/// reachability are logged once each way. Must be called inside a Tokio runtime.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use flow_core::queue::{JobQueue, MemoryQueue};
/// use worker_runtime::metrics::{spawn_queue_stats_refresher, Metrics};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let metrics = Arc::new(Metrics::new());
/// let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new());
/// let (task, backend) =
///     spawn_queue_stats_refresher(metrics.clone(), queue, vec!["emails".into()], Duration::from_secs(5));
/// while !backend.is_reachable() { tokio::time::sleep(Duration::from_millis(5)).await }
/// assert!(metrics.render().contains("penguiflow_queue_depth{queue=\"emails\",state=\"ready\"} 0"));
/// task.abort();
/// # }
/// ```
pub fn spawn_queue_stats_refresher(
    metrics: Arc<Metrics>,
    queue: Arc<dyn JobQueue>,
    queues: Vec<String>,
    every: Duration,
) -> (JoinHandle<()>, Arc<BackendHealth>) {
    let every = every.max(Duration::from_millis(100));
    let health = Arc::new(BackendHealth::new(every));
    for q in &queues {
        metrics.register_queue(q);
    }
    let h = Arc::clone(&health);
    let timeout = every.max(Duration::from_secs(1));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_ok = true;
        loop {
            tick.tick().await;
            let ok = refresh_queue_stats(&metrics, queue.as_ref(), &queues, &h, timeout).await;
            if ok != was_ok {
                if ok {
                    tracing::info!("queue backend reachable again");
                } else {
                    let error = h.status().last_error.unwrap_or_default();
                    tracing::warn!(error = %error, "queue backend unreachable: stats failed");
                }
                was_ok = ok;
            }
        }
    });
    (task, health)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_help() {
        let mut s = String::new();
        escape_label_value("a\\b\"c\nd", &mut s);
        assert_eq!(s, "a\\\\b\\\"c\\nd");
        let mut h = String::new();
        escape_help("x\\y\nz\"", &mut h);
        assert_eq!(h, "x\\\\y\\nz\"");
    }

    #[test]
    fn formats_special_floats() {
        for (v, want) in [
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
            (0.0025, "0.0025"),
            (300.0, "300"),
        ] {
            let mut s = String::new();
            write_f64(&mut s, v);
            assert_eq!(s, want);
        }
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let m = Metrics::new();
        m.observe(&m.node_duration, &["n"], 0.0005);
        m.observe(&m.node_duration, &["n"], 0.003);
        m.observe(&m.node_duration, &["n"], 1000.0);
        let text = m.render();
        assert!(
            text.contains("penguiflow_node_duration_seconds_bucket{node=\"n\",le=\"0.001\"} 1\n")
        );
        assert!(
            text.contains("penguiflow_node_duration_seconds_bucket{node=\"n\",le=\"0.005\"} 2\n")
        );
        assert!(
            text.contains("penguiflow_node_duration_seconds_bucket{node=\"n\",le=\"300\"} 2\n")
        );
        assert!(
            text.contains("penguiflow_node_duration_seconds_bucket{node=\"n\",le=\"+Inf\"} 3\n")
        );
        assert!(text.contains("penguiflow_node_duration_seconds_count{node=\"n\"} 3\n"));
        assert!(text.contains("penguiflow_node_duration_seconds_sum{node=\"n\"} 1000.0035\n"));
    }

    #[test]
    fn series_limit_drops_and_counts() {
        let m = Metrics::new();
        for i in 0..MAX_SERIES_PER_METRIC + 5 {
            m.counter_add(&m.failed, &["q", &format!("CODE_{i}")], 1);
        }
        assert_eq!(lock(&m.failed.series).len(), MAX_SERIES_PER_METRIC);
        assert!(m.render().contains(
            "penguiflow_metric_series_dropped_total{metric=\"penguiflow_jobs_failed_total\"} 5\n"
        ));
    }

    #[test]
    fn failure_window_forgets_old_seconds() {
        let w = FailureWindow::new();
        for _ in 0..10 {
            w.record_at(5, true);
        }
        w.record_at(30, false);
        assert_eq!(
            w.snapshot_at(30),
            WindowSnapshot {
                attempts: 11,
                failures: 10
            }
        );
        // Second 5 is out of the window at second 65; second 30 is still in.
        assert_eq!(
            w.snapshot_at(65),
            WindowSnapshot {
                attempts: 1,
                failures: 0
            }
        );
        // A bucket slot reused by a later second starts over.
        w.record_at(65, true);
        assert_eq!(w.snapshot_at(65).failures, 1);
        assert_eq!(w.snapshot_at(200), WindowSnapshot::default());
    }

    #[test]
    fn backend_health_goes_stale() {
        let h = BackendHealth::new(Duration::from_millis(10));
        assert!(!h.is_reachable(), "unknown until the first refresh");
        h.record_success(&[QueueStats {
            queue: "q".into(),
            ready: 2,
            scheduled: 3,
            running: 7,
            ..QueueStats::default()
        }]);
        let s = h.status();
        assert!(s.reachable);
        assert_eq!(s.queue_depth, 5);
        h.record_failure("connect to redis://user:secret@host:6379/0 refused");
        let s = h.status();
        assert!(!s.reachable);
        let e = s.last_error.unwrap_or_default();
        assert!(!e.contains("secret"), "{e}");
        h.record_success(&[]);
        assert!(h.is_reachable());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!h.is_reachable(), "stale after 3 intervals");
    }
}
