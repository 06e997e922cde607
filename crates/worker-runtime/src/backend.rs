//! Picking a queue backend from a URL.
//!
//! | scheme | backend | cargo feature |
//! |---|---|---|
//! | `memory://` | the in-process [`MemoryQueue`] (tests, demos; nothing is shared between processes) | always |
//! | `redis://`, `rediss://`, `redis+cluster://` | Redis, Redis Cluster | `redis` |
//! | `postgres://`, `postgresql://` | PostgreSQL | `postgres` |
//!
//! URLs are never logged or shown with their secrets: see [`redact_url`].

use std::sync::Arc;

use flow_core::queue::{JobQueue, MemoryQueue, QueueOptions};

use crate::error::Error;

/// The URL with its secrets replaced by `***`, for logs and error messages: the
/// workspace's one redaction, [`flow_core::redact::redact_url`].
///
/// ```
/// use worker_runtime::backend::redact_url;
/// assert_eq!(redact_url("redis://user:s3cret@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("postgres://host/db?password=s3cret"), "postgres://host/db?password=***");
/// ```
pub use flow_core::redact::redact_url;

/// The kind of backend a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `memory://`
    Memory,
    /// `redis://`, `rediss://`, `redis+cluster://`
    Redis,
    /// `postgres://`, `postgresql://`
    Postgres,
}

impl BackendKind {
    /// The kind a URL names, from its scheme.
    pub fn of(url: &str) -> Result<Self, Error> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "memory" => Ok(Self::Memory),
            "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => Ok(Self::Redis),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(Error::Config {
                option: "url",
                reason: format!(
                    "{:?} has an unknown scheme: use memory://, redis://, rediss://, redis+cluster:// or postgres://",
                    redact_url(url)
                ),
            }),
        }
    }
}

/// Connects to the backend a URL names. PostgreSQL schemas are not migrated here: run
/// `penguiflow-worker migrate` (or [`migrate`]) once per deploy.
pub async fn connect(url: &str, opts: QueueOptions) -> Result<Arc<dyn JobQueue>, Error> {
    match BackendKind::of(url)? {
        BackendKind::Memory => Ok(Arc::new(MemoryQueue::with_options(opts))),
        BackendKind::Redis => connect_redis(url, opts).await,
        BackendKind::Postgres => connect_postgres(url, opts).await,
    }
}

/// Applies the PostgreSQL schema migrations (idempotent; safe from several workers at
/// once). Other backends need none.
pub async fn migrate(url: &str) -> Result<&'static str, Error> {
    match BackendKind::of(url)? {
        BackendKind::Postgres => migrate_postgres(url).await,
        BackendKind::Memory | BackendKind::Redis => Ok("nothing to migrate for this backend"),
    }
}

#[cfg_attr(all(feature = "redis", feature = "postgres"), allow(dead_code))]
fn not_built(feature: &'static str) -> Error {
    Error::Config {
        option: "url",
        reason: format!(
            "this build has no {feature} backend: rebuild with the `{feature}` cargo feature"
        ),
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &str, opts: QueueOptions) -> Result<Arc<dyn JobQueue>, Error> {
    let q = queue_redis::RedisQueue::connect(url, opts)
        .await
        .map_err(|e| Error::Queue(flow_core::Error::from(e)))?;
    Ok(Arc::new(q))
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(_url: &str, _opts: QueueOptions) -> Result<Arc<dyn JobQueue>, Error> {
    Err(not_built("redis"))
}

#[cfg(feature = "postgres")]
async fn connect_postgres(url: &str, opts: QueueOptions) -> Result<Arc<dyn JobQueue>, Error> {
    let q = queue_postgres::PgQueue::connect(url, opts)
        .await
        .map_err(|e| Error::Queue(flow_core::Error::from(e)))?;
    Ok(Arc::new(q))
}

#[cfg(not(feature = "postgres"))]
async fn connect_postgres(_url: &str, _opts: QueueOptions) -> Result<Arc<dyn JobQueue>, Error> {
    Err(not_built("postgres"))
}

#[cfg(feature = "postgres")]
async fn migrate_postgres(url: &str) -> Result<&'static str, Error> {
    let q = queue_postgres::PgQueue::connect(url, QueueOptions::default())
        .await
        .map_err(|e| Error::Queue(flow_core::Error::from(e)))?;
    q.migrate()
        .await
        .map_err(|e| Error::Queue(flow_core::Error::from(e)))?;
    Ok("migrations applied")
}

#[cfg(not(feature = "postgres"))]
async fn migrate_postgres(_url: &str) -> Result<&'static str, Error> {
    Err(not_built("postgres"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_backends() {
        assert_eq!(BackendKind::of("memory://").ok(), Some(BackendKind::Memory));
        assert_eq!(BackendKind::of("rediss://h").ok(), Some(BackendKind::Redis));
        assert_eq!(
            BackendKind::of("postgresql://h").ok(),
            Some(BackendKind::Postgres)
        );
        for url in [
            "mysql://u:secret@h",
            "mysql://u:sec/ret@h",
            "mysql://h/db?password=secret",
        ] {
            let err = BackendKind::of(url).expect_err("unknown");
            assert!(!err.to_string().contains("sec"), "{err}");
        }
    }
}
