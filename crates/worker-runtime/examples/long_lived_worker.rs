//! A long-lived flow worker: one topic-generation flow, built once, runs every job; it
//! is rebuilt after 5 failed attempts or at once after a panic. Use this shape when
//! building the flow is expensive (loading a model, warming a cache); otherwise prefer a
//! fresh flow per job (`topic_worker`).
//!
//! ```text
//! QUEUE_URL=redis://127.0.0.1:6379 cargo run --example long_lived_worker
//! ```

mod topics;

use std::sync::Arc;
use std::time::Duration;

use flow_core::queue::QueueOptions;
use worker_runtime::manager::shutdown_signal;
use worker_runtime::telemetry::{self, LogConfig};
use worker_runtime::{WorkerPool, backend};

use topics::{FakeModel, topic_flow};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = telemetry::init(&LogConfig::default())?;
    let url = std::env::var("QUEUE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if backend::BackendKind::of(&url)? == backend::BackendKind::Postgres {
        backend::migrate(&url).await?;
    }
    let queue = backend::connect(&url, QueueOptions::default()).await?;
    let model = Arc::new(FakeModel {
        latency: Duration::from_millis(20),
        fail_one_in: 10,
    });
    let pool = WorkerPool::builder(queue, "topics", move || topic_flow(Arc::clone(&model)))
        .concurrency(8)
        .long_lived(5)
        .build()?;
    let probe = pool.clone();
    let report = pool.run(shutdown_signal()).await?;
    tracing::info!(
        succeeded = report.stats.succeeded,
        restarts = probe.flow_restarts(),
        "long-lived worker stopped"
    );
    telemetry.shutdown_async().await?;
    Ok(())
}
