//! A worker binary built on worker-runtime: the topic-generation flow, a pool of 8, the
//! `/health` and `/metrics` server, JSON logs, OpenTelemetry when configured, and a clean
//! drain on SIGTERM.
//!
//! ```text
//! QUEUE_URL=redis://127.0.0.1:6379 cargo run --example topic_worker
//! QUEUE_URL=postgres://postgres@127.0.0.1:5432/jobs cargo run --example topic_worker
//! ```
//!
//! Press Ctrl-C once to drain, twice to exit at once.

mod topics;

use std::sync::Arc;
use std::time::Duration;

use flow_core::queue::QueueOptions;
use worker_runtime::http::{self, HealthState};
use worker_runtime::manager::shutdown_signal;
use worker_runtime::metrics::{DEFAULT_REFRESH_INTERVAL, Metrics, spawn_queue_stats_refresher};
use worker_runtime::telemetry::{self, LogConfig, SpanMiddleware};
use worker_runtime::{WorkerPool, backend};

use topics::{FakeModel, topic_flow};

const QUEUE: &str = "topics";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = telemetry::init(&LogConfig::default())?;
    let url = std::env::var("QUEUE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if backend::BackendKind::of(&url)? == backend::BackendKind::Postgres {
        backend::migrate(&url).await?;
    }
    let queue = backend::connect(&url, QueueOptions::default()).await?;

    // The model client is built once and shared by every flow through a closure.
    let model = Arc::new(FakeModel {
        latency: Duration::from_millis(20),
        fail_one_in: 10,
    });
    let metrics = Arc::new(Metrics::new());
    metrics.register_queue(QUEUE);
    let pool = WorkerPool::builder(Arc::clone(&queue), QUEUE, move || {
        topic_flow(Arc::clone(&model))
    })
    .concurrency(8)
    .job_timeout(Duration::from_secs(60))
    .observer(metrics.clone())
    .middleware(metrics.clone())
    .span_middleware(Arc::new(SpanMiddleware::new()))
    .build()?;
    metrics.watch_pool(QUEUE, pool.stats());

    let (refresher, backend_health) = spawn_queue_stats_refresher(
        metrics.clone(),
        Arc::clone(&queue),
        vec![QUEUE.into()],
        DEFAULT_REFRESH_INTERVAL,
    );
    let (p1, p2) = (pool.clone(), pool.clone());
    let state = HealthState::new(pool.stats(), metrics, backend_health)
        .draining(move || p1.is_draining())
        .pool_degraded(move || p2.is_degraded());
    let addr = std::env::var("HEALTH_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let (listener, bound) = http::bind(addr.parse()?).await?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve_on(listener, state, async {
        let _ = http_stopped.await;
    }));
    tracing::info!(url = %backend::redact_url(&url), health = %bound, "topic worker started");

    let report = pool.run(shutdown_signal()).await?;
    let _ = stop_http.send(());
    server.await??;
    refresher.abort();
    tracing::info!(
        succeeded = report.stats.succeeded,
        failed = report.stats.failed,
        "topic worker stopped"
    );
    telemetry.shutdown_async().await?;
    Ok(())
}
