//! The worker's HTTP server (axum): health for people and load balancers, probes for
//! Kubernetes, and Prometheus metrics.
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 and JSON `{status, active_jobs, queue_depth, stats, ...}`; `status` is `healthy`, `degraded` or `draining` |
//! | `GET /health/live` | 200 `ok` while the process serves HTTP (never depends on the backend) |
//! | `GET /health/ready` | 200 `ready`; 503 while draining or while the backend is unreachable |
//! | `GET /metrics` | 200, Prometheus text format 0.0.4 |
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use flow_core::queue::{JobQueue, MemoryQueue};
//! use worker_runtime::http::{self, HealthState};
//! use worker_runtime::metrics::{spawn_queue_stats_refresher, Metrics, DEFAULT_REFRESH_INTERVAL};
//! use worker_runtime::WorkerPool;
//!
//! # async fn demo(pool: WorkerPool, queue: Arc<dyn JobQueue>) -> Result<(), worker_runtime::Error> {
//! let metrics = Arc::new(Metrics::new()); // also attached to the pool as observer + middleware
//! metrics.watch_pool(pool.queue_name(), pool.stats());
//! let (_refresher, backend) = spawn_queue_stats_refresher(
//!     metrics.clone(), queue, vec![pool.queue_name().to_owned()], DEFAULT_REFRESH_INTERVAL);
//! let p = pool.clone();
//! let state = HealthState::new(pool.stats(), metrics, backend)
//!     .draining(move || p.is_draining());
//! let (listener, addr) = http::bind(([127, 0, 0, 1], 8080).into()).await?;
//! println!("health on http://{addr}/health");
//! http::serve_on(listener, state, std::future::pending()).await
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::metrics::{
    BackendHealth, BackendStatus, CONTENT_TYPE, FailureWindow, Metrics, WindowSnapshot,
};
use crate::stats::{PoolStats, StatsSnapshot};

/// Default failure ratio over the last minute above which `/health` says `degraded`.
pub const DEFAULT_FAILURE_THRESHOLD: f64 = 0.5;
/// Default least number of attempts in the last minute before the failure ratio counts.
pub const DEFAULT_MIN_ATTEMPTS: u64 = 10;

type Flag = Arc<dyn Fn() -> bool + Send + Sync>;

/// Everything the handlers read. Cheap to clone.
#[derive(Clone)]
pub struct HealthState {
    stats: Arc<PoolStats>,
    metrics: Arc<Metrics>,
    backend: Arc<BackendHealth>,
    window: Arc<FailureWindow>,
    draining: Flag,
    pool_degraded: Flag,
    failure_threshold: f64,
    min_attempts: u64,
}

impl fmt::Debug for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthState")
            .field("stats", &self.stats.snapshot())
            .field("backend", &self.backend.status())
            .field("draining", &(self.draining)())
            .field("failure_threshold", &self.failure_threshold)
            .field("min_attempts", &self.min_attempts)
            .finish_non_exhaustive()
    }
}

impl HealthState {
    /// State over a pool's counters, the metrics registry (whose
    /// [`FailureWindow`] gives the recent failure ratio:
    /// attach the registry to the pool as an observer) and the backend reachability kept
    /// by the stats refresher. Never draining until [`HealthState::draining`] says how to
    /// tell.
    pub fn new(stats: Arc<PoolStats>, metrics: Arc<Metrics>, backend: Arc<BackendHealth>) -> Self {
        let window = metrics.failure_window();
        Self {
            stats,
            metrics,
            backend,
            window,
            draining: Arc::new(|| false),
            pool_degraded: Arc::new(|| false),
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            min_attempts: DEFAULT_MIN_ATTEMPTS,
        }
    }

    /// How to tell the worker is draining, such as `move || pool.is_draining()` or a
    /// flag the signal handler sets.
    pub fn draining(mut self, f: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.draining = Arc::new(f);
        self
    }

    /// An extra backend trouble signal, such as `move || pool.is_degraded()` (the last
    /// fetch failed): while true the backend counts as unreachable.
    pub fn pool_degraded(mut self, f: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.pool_degraded = Arc::new(f);
        self
    }

    /// Failure ratio over the last minute above which the worker is degraded (default
    /// 0.5; clamped to 0..=1).
    pub fn failure_threshold(mut self, ratio: f64) -> Self {
        self.failure_threshold = if ratio.is_nan() {
            DEFAULT_FAILURE_THRESHOLD
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self
    }

    /// Least attempts in the last minute before the ratio counts (default 10).
    pub fn min_attempts(mut self, n: u64) -> Self {
        self.min_attempts = n;
        self
    }

    /// Uses another failure window than the metrics registry's.
    pub fn failure_window(mut self, window: Arc<FailureWindow>) -> Self {
        self.window = window;
        self
    }

    /// Computes the `/health` body.
    pub fn report(&self) -> HealthReport {
        let stats = self.stats.snapshot();
        let backend = self.backend.status();
        let pool_degraded = (self.pool_degraded)();
        let window = self.window.snapshot();
        let draining = (self.draining)();
        let backend_reachable = backend.reachable && !pool_degraded;
        let mut reasons = Vec::new();
        // Before the first stats refresh there is nothing to report yet: the worker
        // connected at start-up, so that is not a reason to call it degraded (readiness
        // still waits for the first refresh).
        let checked = backend.last_ok_age_s.is_some() || backend.last_error.is_some();
        if !backend.reachable && checked {
            reasons.push("backend unreachable".to_owned());
        }
        if pool_degraded {
            reasons.push("fetch from the backend failing".to_owned());
        }
        if window.attempts >= self.min_attempts.max(1) && window.ratio() > self.failure_threshold {
            reasons.push(format!(
                "failure ratio {:.2} over the last minute is above {:.2}",
                window.ratio(),
                self.failure_threshold
            ));
        }
        let status = if draining {
            Status::Draining
        } else if reasons.is_empty() {
            Status::Healthy
        } else {
            Status::Degraded
        };
        HealthReport {
            status,
            active_jobs: stats.active,
            queue_depth: backend.queue_depth,
            stats,
            draining,
            backend_reachable,
            backend,
            last_minute: window,
            reasons,
        }
    }

    /// Whether `/health/ready` answers 200: not draining and the backend reachable.
    pub fn ready(&self) -> Result<(), &'static str> {
        if (self.draining)() {
            Err("draining")
        } else if !self.backend.is_reachable() || (self.pool_degraded)() {
            Err("backend unreachable")
        } else {
            Ok(())
        }
    }
}

/// The `status` of `/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Serving normally.
    Healthy,
    /// The backend is unreachable or the recent failure ratio is above the threshold.
    Degraded,
    /// Shutdown has begun: no more fetches.
    Draining,
}

/// The `/health` body. `status`, `active_jobs`, `queue_depth` and `stats` (`processed`,
/// `succeeded`, `failed`, `timeouts`, `retried` and more) are the stable fields; the rest
/// explain the status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthReport {
    /// `healthy`, `degraded` or `draining`.
    pub status: Status,
    /// Jobs running in this worker.
    pub active_jobs: u64,
    /// Ready plus scheduled jobs of the served queues, from the last backend stats.
    pub queue_depth: u64,
    /// This worker's counters since start.
    pub stats: StatsSnapshot,
    /// Whether shutdown has begun.
    pub draining: bool,
    /// Whether the backend counts as reachable (stats fresh and fetches working).
    pub backend_reachable: bool,
    /// What the stats refresher last saw.
    pub backend: BackendStatus,
    /// Attempts and failures over the last minute.
    pub last_minute: WindowSnapshot,
    /// Why the status is degraded (empty when healthy).
    pub reasons: Vec<String>,
}

/// The router with the four routes, for embedding in a server of your own.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<HealthState>) -> Json<HealthReport> {
    Json(state.report())
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<HealthState>) -> Response {
    match state.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HealthState>) -> Response {
    state.metrics.set_draining((state.draining)());
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Binds `addr` (port 0 picks a free port) and returns the listener with the address it
/// got.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Http {
        addr: addr.to_string(),
        source,
    })?;
    Ok((listener, local))
}

/// Serves the routes on `listener` until `shutdown` resolves, then finishes the requests
/// in flight and returns. Keep it running while the pool drains, so probes see
/// `draining`.
pub async fn serve_on(
    listener: TcpListener,
    state: HealthState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "(unknown)".to_owned(), |a| a.to_string());
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::Http { addr, source })
}

/// Binds `addr` and serves until `shutdown` resolves ([`bind`] then [`serve_on`]).
pub async fn serve(
    addr: SocketAddr,
    state: HealthState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (listener, local) = bind(addr).await?;
    tracing::info!(addr = %local, "health and metrics server listening");
    serve_on(listener, state, shutdown).await
}
