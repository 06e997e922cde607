//! Connecting to the backend under test, and reading its own command counters.

use std::sync::Arc;

use flow_core::queue::{JobQueue, MemoryQueue, QueueOptions};

/// How to count what the backend receives.
enum Counter {
    None,
    /// Redis `INFO stats` `total_commands_processed`.
    Redis(redis::aio::MultiplexedConnection),
    /// PostgreSQL `pg_stat_database.xact_commit + xact_rollback` of the bench database.
    Postgres(sqlx::PgPool),
}

/// The queue under test, and a way to count the commands it receives.
pub(crate) struct Backend {
    pub(crate) queue: Arc<dyn JobQueue>,
    counter: Counter,
}

impl Backend {
    pub(crate) async fn connect(kind: &str, url: Option<&str>) -> Result<Self, String> {
        let opts = QueueOptions::default();
        let need_url = || url.ok_or_else(|| format!("--url is required for the {kind} backend"));
        match kind {
            "memory" => Ok(Self {
                queue: Arc::new(MemoryQueue::with_options(opts)),
                counter: Counter::None,
            }),
            "redis" => {
                let url = need_url()?;
                let q = queue_redis::RedisQueue::connect(url, opts)
                    .await
                    .map_err(|e| e.to_string())?;
                let conn = redis::Client::open(url)
                    .map_err(|e| e.to_string())?
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Self {
                    queue: Arc::new(q),
                    counter: Counter::Redis(conn),
                })
            }
            "postgres" => {
                let url = need_url()?;
                let q = queue_postgres::PgQueue::connect(url, opts)
                    .await
                    .map_err(|e| e.to_string())?;
                q.migrate().await.map_err(|e| e.to_string())?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Self {
                    queue: Arc::new(q),
                    counter: Counter::Postgres(pool),
                })
            }
            other => Err(format!("unknown backend {other:?}")),
        }
    }

    /// The backend's count of commands (Redis) or transactions (PostgreSQL) so far, when
    /// it keeps one. Reading it costs one command or transaction of its own.
    pub(crate) async fn command_count(&self) -> Result<Option<u64>, String> {
        match &self.counter {
            Counter::None => Ok(None),
            Counter::Redis(conn) => {
                let mut c = conn.clone();
                let info: String = redis::cmd("INFO")
                    .arg("stats")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                let n = info
                    .lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or("INFO stats has no total_commands_processed")?;
                Ok(Some(n))
            }
            Counter::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                sqlx::query("SELECT pg_stat_clear_snapshot()")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                let n: i64 = sqlx::query_scalar(
                    "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
                     WHERE datname = current_database()",
                )
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                Ok(Some(n.max(0) as u64))
            }
        }
    }
}
