//! `penguiflow-worker run`: a worker with its health and metrics server.

use std::sync::Arc;

use worker_runtime::backend::redact_url;
use worker_runtime::flows::{BUILTIN_FLOWS, builtin};
use worker_runtime::http::{self, HealthState};
use worker_runtime::manager::shutdown_signal;
use worker_runtime::metrics::{DEFAULT_REFRESH_INTERVAL, Metrics, spawn_queue_stats_refresher};
use worker_runtime::telemetry::{self, LogConfig, LogFormat, SpanMiddleware};
use worker_runtime::{RetryPolicy, WorkerPool};

use crate::Failure;
use crate::cli::{LogFormatArg, RunArgs};

/// Longest the health server and the telemetry exporter get to finish after the pool
/// drained.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) async fn run(url: &str, a: RunArgs) -> Result<(), Failure> {
    super::queue_name(&a.queue)?;
    let Some(factory) = builtin(&a.flow) else {
        return Err(Failure::usage(format!(
            "unknown flow {:?}: built-in flows are {}; real flows are Rust code built on worker-runtime (see examples/)",
            a.flow,
            BUILTIN_FLOWS.join(", ")
        )));
    };
    let format = match a.log_format {
        LogFormatArg::Auto => LogFormat::Auto,
        LogFormatArg::Json => LogFormat::Json,
        LogFormatArg::Pretty => LogFormat::Pretty,
    };
    let telemetry = telemetry::init(&LogConfig {
        level: a.log_level.clone(),
        format,
        ..LogConfig::default()
    })
    .map_err(|e| Failure::usage(e.to_string()))?;

    // Bind the health port before anything else, so a taken port stops start-up at once.
    let (listener, health_addr) = http::bind(a.health_addr)
        .await
        .map_err(|e| Failure::failed(e.to_string()))?;
    let queue = super::connect(url).await?;

    let metrics = Arc::new(Metrics::new());
    metrics.register_queue(&a.queue);
    let spans = Arc::new(SpanMiddleware::new());
    let mut builder = WorkerPool::builder(Arc::clone(&queue), a.queue.clone(), factory)
        .concurrency(a.concurrency as usize)
        .prefetch(a.prefetch as usize)
        .job_timeout(a.job_timeout)
        .lease(a.lease)
        .shutdown_timeout(a.shutdown_timeout)
        .retry_policy(RetryPolicy {
            base: a.retry_base,
            cap: a.retry_cap,
            jitter: true,
        })
        .observer(metrics.clone())
        .middleware(metrics.clone())
        .span_middleware(spans);
    if let Some(n) = a.long_lived {
        builder = builder.long_lived(n);
    }
    let pool = builder.build()?;
    metrics.watch_pool(&a.queue, pool.stats());
    metrics.set_worker_up(true);

    let (refresher, backend) = spawn_queue_stats_refresher(
        metrics.clone(),
        Arc::clone(&queue),
        vec![a.queue.clone()],
        DEFAULT_REFRESH_INTERVAL,
    );
    let (p1, p2) = (pool.clone(), pool.clone());
    let state = HealthState::new(pool.stats(), metrics.clone(), backend)
        .draining(move || p1.is_draining())
        .pool_degraded(move || p2.is_degraded());
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve_on(listener, state, async {
        let _ = http_stopped.await;
    }));

    tracing::info!(
        url = %redact_url(url),
        queue = %a.queue,
        flow = %a.flow,
        concurrency = a.concurrency,
        job_timeout_s = a.job_timeout.as_secs_f64(),
        lease_s = a.lease.as_secs_f64(),
        shutdown_timeout_s = a.shutdown_timeout.as_secs_f64(),
        health_addr = %health_addr,
        otlp = telemetry.otlp_enabled(),
        "worker started"
    );
    let metrics_for_drain = metrics.clone();
    let signal = async move {
        shutdown_signal().await;
        metrics_for_drain.set_draining(true);
    };
    let result = pool.run(signal).await;
    let _ = stop_http.send(());
    // The pool kept to the shutdown timeout; what is left must not wait on a client or a
    // collector that does not answer.
    match tokio::time::timeout(EXIT_GRACE, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "health server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "health server task failed"),
        Err(_) => tracing::warn!("health server connections still open at exit; closing them"),
    }
    refresher.abort();
    let report = result?;
    tracing::info!(
        processed = report.stats.processed,
        succeeded = report.stats.succeeded,
        failed = report.stats.failed,
        retried = report.stats.retried,
        handed_back = report.handed_back,
        "worker stopped"
    );
    match tokio::time::timeout(EXIT_GRACE, telemetry.shutdown_async()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!(
            "penguiflow-worker: warning: {}",
            flow_core::redact::redact_text(&e.to_string())
        ),
        Err(_) => eprintln!(
            "penguiflow-worker: warning: telemetry export did not finish within {}s at exit",
            EXIT_GRACE.as_secs()
        ),
    }
    Ok(())
}
