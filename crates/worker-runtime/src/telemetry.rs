//! Logs and traces: a global `tracing` subscriber (JSON or human-readable logs, plus
//! OpenTelemetry export when the standard `OTEL_*` variables ask for it), W3C trace
//! context carried in job headers, and spans per job and per node attempt.
//!
//! * [`init`] installs the subscriber once at start-up and returns a [`TelemetryGuard`]
//!   that flushes spans on drop.
//! * Producers call [`inject_trace_context`] on a job's headers before enqueueing; the
//!   worker's [`job_span`] continues that trace.
//! * [`SpanMiddleware`] turns the flow engine's node events into one span per node
//!   attempt, children of the job span registered for the flow's trace id.
//! * Every log line, the worker's own and those of the drivers and other libraries, passes
//!   through [`flow_core::redact::redact_text`] before it is written: passwords in URLs
//!   and secret `key=value` pairs (`password=`, `sslpassword=`, ...) are masked.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use flow_core::queue::LeasedJob;
use flow_core::{EventKind, FlowEvent, Middleware};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanExporter};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::error::Error;
use crate::stats::AttemptOutcome;

/// `service.name` of exported spans when neither `OTEL_SERVICE_NAME` nor a `service.name`
/// in `OTEL_RESOURCE_ATTRIBUTES` is set.
pub const DEFAULT_SERVICE_NAME: &str = "penguiflow-worker";

/// The W3C `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// The `tracing` target of the job spans and node attempt spans made here.
pub const SPAN_TARGET: &str = "penguiflow::worker";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, event fields flattened to the top level, plus the
    /// current span's fields under `span`.
    Json,
    /// Human-readable single lines (colours on a terminal).
    Pretty,
    /// JSON unless the log stream is a terminal.
    #[default]
    Auto,
}

impl LogFormat {
    /// Resolves [`LogFormat::Auto`] for a stream that is (or is not) a terminal.
    pub fn resolve(self, is_terminal: bool) -> Self {
        match self {
            Self::Auto if is_terminal => Self::Pretty,
            Self::Auto => Self::Json,
            f => f,
        }
    }
}

impl FromStr for LogFormat {
    type Err = Error;
    /// Parses `json`, `pretty` or `auto` (any case); an error names `LOG_FORMAT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" | "text" => Ok(Self::Pretty),
            "auto" | "" => Ok(Self::Auto),
            other => Err(Error::Config {
                option: "LOG_FORMAT",
                reason: format!("unknown format {other:?}; use json, pretty or auto"),
            }),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Json => "json",
            Self::Pretty => "pretty",
            Self::Auto => "auto",
        })
    }
}

/// The stream log lines go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error (the default: keeps standard output free for command results
    /// such as `status --json`).
    #[default]
    Stderr,
    /// Standard output.
    Stdout,
}

impl LogTarget {
    fn is_terminal(self) -> bool {
        match self {
            Self::Stderr => std::io::stderr().is_terminal(),
            Self::Stdout => std::io::stdout().is_terminal(),
        }
    }
}

/// Logging settings for [`init`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `info,penguiflow::flow=debug`
    /// (`LOG_LEVEL`). Default `info`.
    pub level: String,
    /// The format (`LOG_FORMAT`). Default [`LogFormat::Auto`].
    pub format: LogFormat,
    /// Where lines go. Default [`LogTarget::Stderr`]; `Auto` looks at this stream.
    pub target: LogTarget,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Auto,
            target: LogTarget::Stderr,
        }
    }
}

/// OTLP trace export settings read from the standard environment variables. `Debug`
/// shows the endpoint redacted (it may carry credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The variable that switched export on (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`) and its value. The exporter reads the endpoint,
    /// headers, timeout and compression from the environment itself.
    pub endpoint: (&'static str, String),
    /// The service name to set, when the environment does not name the service.
    pub default_service_name: Option<&'static str>,
}

impl fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (variable, endpoint) = &self.endpoint;
        f.debug_struct("OtlpSettings")
            .field(
                "endpoint",
                &(variable, flow_core::redact::redact_url(endpoint)),
            )
            .field("default_service_name", &self.default_service_name)
            .finish()
    }
}

impl OtlpSettings {
    /// Reads the process environment; see [`OtlpSettings::from_lookup`].
    pub fn from_env() -> Result<Option<Self>, Error> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Decides from `lookup` (an environment) whether OTLP trace export is on: it is when
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set and
    /// not empty, `OTEL_SDK_DISABLED` is not `true`, and `OTEL_TRACES_EXPORTER` is not
    /// `none`. A protocol other than `grpc` is an error naming the variable (this build
    /// exports OTLP over gRPC only).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, Error> {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if let Some(e) = get("OTEL_TRACES_EXPORTER") {
            if e.eq_ignore_ascii_case("none") {
                return Ok(None);
            }
            if !e.eq_ignore_ascii_case("otlp") {
                return Err(Error::Config {
                    option: "OTEL_TRACES_EXPORTER",
                    reason: format!("{e:?} is not supported; use otlp or none"),
                });
            }
        }
        let endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(v), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v),
            (None, Some(v)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", v),
            (None, None) => return Ok(None),
        };
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = get(var) {
                if !p.eq_ignore_ascii_case("grpc") {
                    return Err(Error::Config {
                        option: var,
                        reason: format!(
                            "{p:?} is not supported; this build exports OTLP over grpc"
                        ),
                    });
                }
                break;
            }
        }
        let named = get("OTEL_SERVICE_NAME").is_some()
            || get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
                a.split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        Ok(Some(Self {
            endpoint,
            default_service_name: (!named).then_some(DEFAULT_SERVICE_NAME),
        }))
    }
}

/// Keeps the tracer provider of [`init`] alive; flushes and shuts it down when dropped
/// (or on [`TelemetryGuard::shutdown`]). Hold it in `main` until the end.
#[must_use = "dropping the guard shuts down trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("otlp", &self.provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether OTLP trace export is on.
    pub fn otlp_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and shuts the exporter down from async code: the blocking
    /// flush runs on Tokio's blocking pool while the runtime keeps driving the gRPC
    /// connection. The way to end a worker's `main`, on any runtime flavour.
    pub async fn shutdown_async(mut self) -> Result<(), Error> {
        let Some(p) = self.provider.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || p.shutdown())
            .await
            .map_err(|e| Error::Telemetry(format!("trace export shutdown: {e}")))?
            .map_err(|e| Error::Telemetry(format!("trace export shutdown: {e}")))
    }

    /// Flushes pending spans and shuts the exporter down, blocking the calling thread
    /// (call it outside async code, or see [`TelemetryGuard::shutdown_async`]).
    pub fn shutdown(mut self) -> Result<(), Error> {
        match self.provider.take() {
            Some(p) => p
                .shutdown()
                .map_err(|e| Error::Telemetry(format!("trace export shutdown: {e}"))),
            None => Ok(()),
        }
    }
}

impl Drop for TelemetryGuard {
    /// Shuts the exporter down. Inside a multi-threaded Tokio runtime the blocking flush
    /// runs through `block_in_place`; on a current-thread runtime nothing can drive the
    /// gRPC connection while the only thread waits, so prefer
    /// [`TelemetryGuard::shutdown_async`] there.
    fn drop(&mut self) {
        let Some(p) = self.provider.take() else {
            return;
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi_thread {
            tokio::task::block_in_place(|| p.shutdown())
        } else {
            p.shutdown()
        };
        if let Err(e) = result {
            eprintln!(
                "penguiflow: trace export shutdown failed: {}",
                flow_core::redact::redact_text(&e.to_string())
            );
        }
    }
}

/// Installs the global `tracing` subscriber: the log layer filtered by `cfg.level`, and
/// an OpenTelemetry layer exporting spans over OTLP/gRPC when [`OtlpSettings::from_env`]
/// says so (off by default). Also sets the global W3C trace-context propagator and, with
/// export on, the global tracer provider.
///
/// Call it once, inside the Tokio runtime when OTLP export may be on (the gRPC exporter
/// needs it). A bad `LOG_LEVEL` or `OTEL_*` value is an [`Error::Config`] naming it; a
/// second call is an [`Error::Telemetry`].
pub fn init(cfg: &LogConfig) -> Result<TelemetryGuard, Error> {
    let filter = parse_filter(&cfg.level)?;
    let otlp = OtlpSettings::from_env()?;
    let format = cfg.format.resolve(cfg.target.is_terminal());
    let ansi = format == LogFormat::Pretty && cfg.target.is_terminal();
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::with_capacity(2);
    let log_layer = match cfg.target {
        LogTarget::Stderr => fmt_layer(format, ansi, std::io::stderr),
        LogTarget::Stdout => fmt_layer(format, ansi, std::io::stdout),
    };
    layers.push(log_layer.with_filter(filter).boxed());
    let provider = match &otlp {
        Some(settings) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| {
                    Error::Telemetry(format!(
                        "OTLP exporter for {}={}: {e}",
                        settings.endpoint.0,
                        flow_core::redact::redact_url(&settings.endpoint.1)
                    ))
                })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource(settings.default_service_name))
                .build();
            layers.push(otel_layer(&provider).with_filter(otel_filter()).boxed());
            Some(provider)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| Error::Telemetry(format!("a global subscriber is already set: {e}")))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        if let Some((var, endpoint)) = otlp.as_ref().map(|s| &s.endpoint) {
            tracing::info!(variable = *var, endpoint = %flow_core::redact::redact_url(endpoint), "exporting traces over OTLP/gRPC");
        }
    }
    Ok(TelemetryGuard { provider })
}

/// Parses an `EnvFilter` directive; an error names `LOG_LEVEL`.
pub fn parse_filter(level: &str) -> Result<EnvFilter, Error> {
    let level = if level.trim().is_empty() {
        "info"
    } else {
        level.trim()
    };
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(level)
        .map_err(|e| Error::Config {
            option: "LOG_LEVEL",
            reason: format!("{level:?} is not a valid filter: {e}"),
        })
}

/// The log layer for `format` (resolve [`LogFormat::Auto`] first; it means JSON here),
/// writing to `writer`. JSON lines carry `timestamp`, `level`, `target`, the event's
/// fields at the top level (`message`, `job_id`, `queue`, ...), and the current span's
/// fields under `span`. Every line passes through
/// [`redact_text`](flow_core::redact::redact_text) on its way to `writer`, so a password
/// quoted by any library is masked.
pub fn fmt_layer<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(Redacting(writer))
            .boxed(),
        LogFormat::Json | LogFormat::Auto => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(Redacting(writer))
            .boxed(),
    }
}

/// What the OpenTelemetry layer records: `info` and above, without the HTTP/2 and gRPC
/// plumbing the exporter itself uses.
fn otel_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

fn resource(default_service_name: Option<&'static str>) -> Resource {
    let b = Resource::builder();
    match default_service_name {
        Some(n) => b.with_service_name(n).build(),
        None => b.build(),
    }
}

fn otel_layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("penguiflow-worker"))
}

/// An OpenTelemetry layer exporting to `exporter` through a simple (synchronous) span
/// processor, and its provider: for tests (with `InMemorySpanExporter`) and for
/// embedding in a subscriber of your own. Shut the provider down when done.
///
/// ```
/// use opentelemetry_sdk::trace::InMemorySpanExporterBuilder;
/// use tracing_subscriber::layer::SubscriberExt;
/// use worker_runtime::telemetry::otel_layer_with_exporter;
///
/// let exporter = InMemorySpanExporterBuilder::new().build();
/// let (layer, provider) = otel_layer_with_exporter(exporter.clone());
/// let subscriber = tracing_subscriber::registry().with(layer);
/// tracing::subscriber::with_default(subscriber, || {
///     let _s = tracing::info_span!("work").entered();
/// });
/// assert_eq!(exporter.get_finished_spans().unwrap().len(), 1);
/// provider.shutdown().unwrap();
/// ```
pub fn otel_layer_with_exporter<S, E>(
    exporter: E,
) -> (OpenTelemetryLayer<S, SdkTracer>, SdkTracerProvider)
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    E: SpanExporter + 'static,
{
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(resource(Some(DEFAULT_SERVICE_NAME)))
        .build();
    (otel_layer(&provider), provider)
}

struct HeaderInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_ascii_lowercase(), value);
    }
}

struct HeaderExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).or_else(|| {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        })
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes W3C `traceparent` (and `tracestate` when there is one) for the current span
/// into a job's headers, so the worker's job span continues the producer's trace. Falls
/// back to the current OpenTelemetry context when the current `tracing` span carries
/// none; writes nothing when there is no sampled-or-not valid span context at all (no
/// OpenTelemetry layer installed, or outside any span).
///
/// ```
/// use flow_core::queue::NewJob;
/// use worker_runtime::telemetry::inject_trace_context;
///
/// let mut job = NewJob::new("emails", serde_json::json!({"to": "a@example.com"}));
/// inject_trace_context(&mut job.headers);
/// // then: queue.enqueue(job).await?
/// ```
pub fn inject_trace_context(headers: &mut BTreeMap<String, String>) {
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        inject_context(&cx, headers);
    } else {
        inject_context(&opentelemetry::Context::current(), headers);
    }
}

/// Writes W3C trace context for `span` into `headers` (see [`inject_trace_context`]).
pub fn inject_span_context(span: &Span, headers: &mut BTreeMap<String, String>) {
    inject_context(&span.context(), headers);
}

fn inject_context(cx: &opentelemetry::Context, headers: &mut BTreeMap<String, String>) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Reads W3C trace context from job headers (names matched without regard to case). The
/// result has no valid span context when the headers carry none or a malformed one.
pub fn extract_trace_context(headers: &BTreeMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The flow trace id a pool runs a job's attempt under: the job id as 32 lowercase hex
/// digits, `-`, and the attempt number (`0193f0c4...9e-2`), so two attempts never share a
/// trace on a long-lived flow. This is the `trace_id` of log lines and [`FlowEvent`]s,
/// not the OpenTelemetry trace id (which continues the producer's trace; it is the job
/// span's `otel_trace_id`).
pub fn flow_trace_id(job: &LeasedJob) -> String {
    format!("{}-{}", job.id.simple(), job.attempt)
}

/// The span for one attempt of a job: name `job` (exported as `process {queue}`, kind
/// consumer) with fields `job_id`, `queue`, `tenant`, `attempt`, `trace_id` (the flow's,
/// see [`flow_trace_id`]), and `otel_trace_id`; `outcome` and `code` are recorded at the
/// end with [`record_job_outcome`]. When the job's headers carry a `traceparent`, the span
/// continues that trace as a child of the producer's span.
///
/// Enter it (`.instrument(span)`) around the whole attempt, and register it with a
/// [`SpanMiddleware`] so node attempts become its children.
pub fn job_span(job: &LeasedJob) -> Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "job",
        otel.name = %format_args!("process {}", job.queue),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        job_id = %job.id,
        queue = %job.queue,
        tenant = %job.tenant,
        attempt = job.attempt,
        trace_id = %flow_trace_id(job),
        otel_trace_id = Empty,
        outcome = Empty,
        code = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let parent = extract_trace_context(&job.headers);
    if parent.span().span_context().is_valid()
        && let Err(e) = span.set_parent(parent)
    {
        tracing::debug!(job_id = %job.id, error = %e, "could not continue the producer's trace");
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("otel_trace_id", tracing::field::display(sc.trace_id()));
    }
    span
}

/// Records how an attempt ended on its [`job_span`]: `outcome` (`succeeded`, `retried`,
/// `dead_lettered`, `cancelled`, `released`, `lease_lost`), `code` when there is one, and
/// an error status for dead-lettered and retried attempts.
pub fn record_job_outcome(span: &Span, outcome: AttemptOutcome, code: Option<&str>) {
    span.record("outcome", crate::metrics::outcome_label(outcome));
    if let Some(c) = code {
        span.record("code", c);
    }
    match outcome {
        AttemptOutcome::DeadLettered | AttemptOutcome::Retried => {
            span.record("otel.status_description", code.unwrap_or("failed"));
        }
        AttemptOutcome::Succeeded => {
            span.record("otel.status_code", "ok");
        }
        _ => {}
    }
}

/// A [`MakeWriter`] whose writers pass every log line through
/// [`redact_text`](flow_core::redact::redact_text) before handing it on.
#[derive(Clone, Debug)]
struct Redacting<W>(W);

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Redacting<W> {
    type Writer = RedactingLine<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingLine(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingLine(self.0.make_writer_for(meta))
    }
}

/// The writer of [`Redacting`]: the log layer writes each formatted line in one call.
#[derive(Debug)]
struct RedactingLine<W>(W);

impl<W: std::io::Write> std::io::Write for RedactingLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        match flow_core::redact::redact_text(&text) {
            Cow::Borrowed(_) if matches!(text, Cow::Borrowed(_)) => self.0.write_all(buf)?,
            masked => self.0.write_all(masked.as_bytes())?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type AttemptKey = (String, u32);

struct JobEntry {
    span: Span,
    open: HashMap<AttemptKey, Vec<Span>>,
}

/// A [`Middleware`] that opens one span per node attempt (`node_start`) and closes it on
/// `node_success`, `node_error`, `node_timeout` or `node_trace_cancelled`, recording
/// `outcome` (`success`, `error`, `timeout`, `cancelled`), `latency_ms` and, on failure,
/// an error status with the exception text. Spans are named `node` (exported as
/// `node {node_name}`), carry `node_name`, `node_id`, `trace_id` and `attempt`
/// (0-based, as in FlowEvents), and are children of the job span registered for the
/// event's trace id. Events of traces no job is registered for are ignored.
///
/// The pool registers each job before running its flow and unregisters it after the
/// outcome is recorded; attempts still open then (the flow was stopped) end with outcome
/// `abandoned`.
///
/// ```
/// use std::sync::Arc;
/// use worker_runtime::telemetry::SpanMiddleware;
///
/// let spans = Arc::new(SpanMiddleware::new());
/// let job_span = tracing::info_span!("job");
/// {
///     let _registered = spans.enter_job("0190aa", &job_span);
///     // ... run the flow with `spans` attached as a middleware ...
/// } // unregistered here
/// assert_eq!(spans.registered_jobs(), 0);
/// ```
#[derive(Default)]
pub struct SpanMiddleware {
    jobs: Mutex<HashMap<String, JobEntry>>,
}

impl fmt::Debug for SpanMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanMiddleware")
            .field("jobs", &lock(&self.jobs).len())
            .finish()
    }
}

impl SpanMiddleware {
    /// A middleware with no job registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes node attempts of flow trace `trace_id` children of `job_span` (replacing
    /// any earlier registration of the same trace id).
    pub fn register_job(&self, trace_id: &str, job_span: &Span) {
        let old = lock(&self.jobs).insert(
            trace_id.to_owned(),
            JobEntry {
                span: job_span.clone(),
                open: HashMap::new(),
            },
        );
        if let Some(old) = old {
            close_abandoned(old);
        }
    }

    /// Forgets `trace_id`; node attempt spans still open end with outcome `abandoned`.
    pub fn unregister_job(&self, trace_id: &str) {
        let old = lock(&self.jobs).remove(trace_id);
        if let Some(old) = old {
            close_abandoned(old);
        }
    }

    /// Registers `trace_id` until the returned guard is dropped.
    pub fn enter_job(self: &Arc<Self>, trace_id: &str, job_span: &Span) -> JobRegistration {
        self.register_job(trace_id, job_span);
        JobRegistration {
            middleware: Arc::clone(self),
            trace_id: trace_id.to_owned(),
        }
    }

    /// Jobs registered now.
    pub fn registered_jobs(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// Node attempt spans open now.
    pub fn open_attempts(&self) -> usize {
        lock(&self.jobs)
            .values()
            .map(|j| j.open.values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

fn close_abandoned(entry: JobEntry) {
    for span in entry.open.into_values().flatten() {
        span.record("outcome", "abandoned");
    }
}

/// Unregisters a job from its [`SpanMiddleware`] when dropped; from
/// [`SpanMiddleware::enter_job`].
#[must_use = "the job is unregistered when this guard is dropped"]
pub struct JobRegistration {
    middleware: Arc<SpanMiddleware>,
    trace_id: String,
}

impl fmt::Debug for JobRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobRegistration")
            .field("trace_id", &self.trace_id)
            .finish()
    }
}

impl Drop for JobRegistration {
    fn drop(&mut self) {
        self.middleware.unregister_job(&self.trace_id);
    }
}

/// Longest exception text put in a span status.
const MAX_STATUS_LEN: usize = 512;

#[async_trait]
impl Middleware for SpanMiddleware {
    async fn on_event(&self, ev: &FlowEvent) {
        let Some(trace) = ev.trace_id.as_deref() else {
            return;
        };
        let key = (ev.node_id.clone(), ev.attempt);
        match ev.kind {
            EventKind::NodeStart => {
                let mut jobs = lock(&self.jobs);
                let Some(job) = jobs.get_mut(trace) else {
                    return;
                };
                let span = tracing::info_span!(
                    target: SPAN_TARGET,
                    parent: &job.span,
                    "node",
                    otel.name = %format_args!("node {}", ev.node_name),
                    otel.kind = "internal",
                    otel.status_code = Empty,
                    otel.status_description = Empty,
                    node_name = %ev.node_name,
                    node_id = %ev.node_id,
                    trace_id = %trace,
                    attempt = ev.attempt,
                    outcome = Empty,
                    latency_ms = Empty,
                );
                job.open.entry(key).or_default().push(span);
            }
            EventKind::NodeSuccess
            | EventKind::NodeError
            | EventKind::NodeTimeout
            | EventKind::NodeTraceCancelled => {
                let span = {
                    let mut jobs = lock(&self.jobs);
                    let Some(job) = jobs.get_mut(trace) else {
                        return;
                    };
                    let Some(list) = job.open.get_mut(&key) else {
                        return;
                    };
                    let span = if list.is_empty() {
                        None
                    } else {
                        Some(list.remove(0))
                    };
                    if list.is_empty() {
                        job.open.remove(&key);
                    }
                    span
                };
                let Some(span) = span else { return };
                let outcome = match ev.kind {
                    EventKind::NodeSuccess => "success",
                    EventKind::NodeError => "error",
                    EventKind::NodeTimeout => "timeout",
                    _ => "cancelled",
                };
                span.record("outcome", outcome);
                if let Some(ms) = ev.latency_ms {
                    span.record("latency_ms", ms);
                }
                match ev.kind {
                    EventKind::NodeSuccess => {
                        span.record("otel.status_code", "ok");
                    }
                    EventKind::NodeError | EventKind::NodeTimeout => {
                        let text = ev
                            .extra
                            .get("exception")
                            .and_then(|v| v.as_str())
                            .unwrap_or(outcome);
                        let text: String = text.chars().take(MAX_STATUS_LEN).collect();
                        span.record("otel.status_description", text.as_str());
                    }
                    _ => {}
                }
                drop(span);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_flatten_event_fields_and_carry_the_span() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(
            fmt_layer(LogFormat::Json, false, buf.clone())
                .with_filter(parse_filter("debug").expect("filter")),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "job",
                job_id = "j1",
                queue = "q",
                tenant = "t",
                attempt = 2u32
            );
            let _e = span.enter();
            tracing::warn!(
                job_id = "j1",
                latency_ms = 1.5,
                event_type = "job_retry",
                code = "NODE_EXCEPTION",
                "job attempt failed"
            );
            tracing::info!(target: "penguiflow::flow", event_type = "node_success", node_name = "n", trace_id = "abc", attempt = 0u32, latency_ms = 2.0, "node_success");
        });
        let text = String::from_utf8(lock(&buf.0).clone()).expect("utf8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let a = &lines[0];
        assert_eq!(a["level"], "WARN");
        assert_eq!(a["message"], "job attempt failed");
        assert_eq!(a["event_type"], "job_retry");
        assert_eq!(a["code"], "NODE_EXCEPTION");
        assert_eq!(a["latency_ms"], 1.5);
        assert_eq!(a["span"]["name"], "job");
        assert_eq!(a["span"]["queue"], "q");
        assert_eq!(a["span"]["attempt"], 2);
        assert!(a.get("spans").is_none());
        let b = &lines[1];
        assert_eq!(b["target"], "penguiflow::flow");
        assert_eq!(b["node_name"], "n");
        assert_eq!(b["trace_id"], "abc");
    }

    #[test]
    fn log_format_parses_and_resolves() {
        assert_eq!("JSON".parse::<LogFormat>().ok(), Some(LogFormat::Json));
        assert_eq!("pretty".parse::<LogFormat>().ok(), Some(LogFormat::Pretty));
        assert_eq!("auto".parse::<LogFormat>().ok(), Some(LogFormat::Auto));
        let err = "yaml"
            .parse::<LogFormat>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("LOG_FORMAT"), "{err}");
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Pretty);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        let err = parse_filter("info,=[")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("LOG_LEVEL"), "{err}");
        assert!(parse_filter("warn,penguiflow::flow=debug").is_ok());
    }

    #[test]
    fn otlp_switch_follows_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(OtlpSettings::from_lookup(env(&[])).ok(), Some(None));
        let on =
            OtlpSettings::from_lookup(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]))
                .ok()
                .flatten();
        assert_eq!(
            on,
            Some(OtlpSettings {
                endpoint: ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317".into()),
                default_service_name: Some(DEFAULT_SERVICE_NAME),
            })
        );
        let traces = OtlpSettings::from_lookup(env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SERVICE_NAME", "billing"),
        ]))
        .ok()
        .flatten();
        assert_eq!(
            traces.map(|s| (s.endpoint.0, s.default_service_name)),
            Some(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None))
        );
        assert_eq!(
            OtlpSettings::from_lookup(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "TRUE"),
            ]))
            .ok(),
            Some(None)
        );
        assert_eq!(
            OtlpSettings::from_lookup(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ]))
            .ok(),
            Some(None)
        );
        let err = OtlpSettings::from_lookup(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{err}");
        let named = OtlpSettings::from_lookup(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, service.name=x",
            ),
        ]))
        .ok()
        .flatten();
        assert_eq!(named.and_then(|s| s.default_service_name), None);
    }

    #[test]
    fn otlp_settings_never_show_endpoint_credentials() {
        let settings = OtlpSettings::from_lookup(|k| {
            (k == "OTEL_EXPORTER_OTLP_ENDPOINT")
                .then(|| "https://tenant:Hunter2x@collector:4317".to_owned())
        })
        .ok()
        .flatten()
        .expect("export on");
        let shown = format!("{settings:?}");
        assert!(!shown.contains("Hunter2x"), "{shown}");
        assert!(
            shown.contains("https://tenant:***@collector:4317"),
            "{shown}"
        );
    }

    #[test]
    fn log_lines_of_any_library_are_redacted() {
        for format in [LogFormat::Json, LogFormat::Pretty] {
            let buf = Buf::default();
            let sub = tracing_subscriber::registry().with(
                fmt_layer(format, false, buf.clone())
                    .with_filter(parse_filter("trace").expect("filter")),
            );
            tracing::subscriber::with_default(sub, || {
                tracing::warn!(target: "sqlx::postgres", url = "postgres://app:Hunter2x@db/jobs?sslpassword=Hunter3y", "connecting");
                tracing::debug!(target: "redis", "lost redis://:Hunter/4z@cache:6379, retrying");
                tracing::info!(job_id = "j1", "nothing to hide here");
            });
            let text = String::from_utf8(lock(&buf.0).clone()).expect("utf8");
            for secret in ["Hunter2x", "Hunter3y", "Hunter/4z", "4z@"] {
                assert!(!text.contains(secret), "{format:?}: {text}");
            }
            assert!(text.contains("postgres://app:***@db/jobs"), "{text}");
            assert!(text.contains("redis://:***@cache:6379"), "{text}");
            assert!(text.contains("nothing to hide here"), "{text}");
            if format == LogFormat::Json {
                for line in text.lines() {
                    let _: serde_json::Value =
                        serde_json::from_str(line).expect("still one JSON object per line");
                }
            }
        }
    }
}
