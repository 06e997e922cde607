//! # worker-runtime
//!
//! Runs PenguiFlow-style flows off a durable [`JobQueue`](flow_core::queue::JobQueue):
//!
//! * [`WorkerPool`]: the stateless pool (a fresh flow per job, the recommended pattern),
//!   with bounded concurrency, a job timeout that cancels the trace (`JOB_TIMEOUT`),
//!   heartbeats that keep leases alive, a reaper for leases of dead workers, job-level
//!   retry with capped exponential backoff and jitter for the codes a [`Classifier`]
//!   allows (by default `NODE_TIMEOUT` and `NODE_EXCEPTION`), dead-lettering for the rest,
//!   panic isolation, and a drain on shutdown.
//! * [`PoolStats`] and [`JobObserver`]: counters and per-attempt reports for health
//!   checks and metrics.
//!
//! Node-level retries (inside one attempt) and job-level retries (the whole flow again,
//! later) multiply; see [`retry`].

pub mod backend;
pub mod error;
pub mod flows;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod pool;
pub mod retry;
pub mod stats;
pub mod telemetry;

pub use error::Error;
pub use http::{HealthReport, HealthState};
pub use metrics::{BackendHealth, Metrics, spawn_queue_stats_refresher};
pub use pool::{FlowFactory, PoolReport, WorkerPool, WorkerPoolBuilder, defaults};
pub use retry::{Classifier, CodeClassifier, Disposition, RetryPolicy};
pub use stats::{AttemptOutcome, AttemptReport, JobObserver, PoolStats, StatsSnapshot};
pub use telemetry::{LogConfig, LogFormat, SpanMiddleware, TelemetryGuard};
