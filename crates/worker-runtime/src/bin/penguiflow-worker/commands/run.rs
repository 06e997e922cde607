//! `penguiflow-worker run`.

use std::sync::Arc;

use worker_runtime::backend::redact_url;
use worker_runtime::flows::{BUILTIN_FLOWS, builtin};
use worker_runtime::manager::shutdown_signal;
use worker_runtime::{RetryPolicy, WorkerPool};

use crate::Failure;
use crate::cli::RunArgs;

pub(crate) async fn run(url: &str, a: RunArgs) -> Result<(), Failure> {
    super::queue_name(&a.queue)?;
    let Some(factory) = builtin(&a.flow) else {
        return Err(Failure::usage(format!(
            "unknown flow {:?}: built-in flows are {}; real flows are Rust code built on worker-runtime (see examples/)",
            a.flow,
            BUILTIN_FLOWS.join(", ")
        )));
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&a.log_level))
        .try_init();
    let queue = super::connect(url).await?;
    tracing::info!(url = %redact_url(url), queue = %a.queue, flow = %a.flow, concurrency = a.concurrency, "starting worker");
    let mut builder = WorkerPool::builder(Arc::clone(&queue), a.queue.clone(), factory)
        .concurrency(a.concurrency as usize)
        .job_timeout(a.job_timeout)
        .lease(a.lease)
        .shutdown_timeout(a.shutdown_timeout)
        .retry_policy(RetryPolicy {
            base: a.retry_base,
            cap: a.retry_cap,
            jitter: true,
        });
    if let Some(n) = a.long_lived {
        builder = builder.long_lived(n);
    }
    let pool = builder.build()?;
    let report = pool.run(shutdown_signal()).await?;
    tracing::info!(
        processed = report.stats.processed,
        handed_back = report.handed_back,
        "worker stopped"
    );
    Ok(())
}
