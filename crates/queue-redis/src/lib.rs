//! # queue-redis
//!
//! The [`JobQueue`](flow_core::queue::JobQueue) contract on Redis and Redis Cluster:
//! [`RedisQueue`].
//!
//! * **One script per step.** Enqueue (with dedupe), fetch-and-lease, heartbeat,
//!   complete, retry, fail, release, cancel, reap, requeue and purge are each one Lua
//!   script, loaded once and called by hash (`EVALSHA`, reloaded after `NOSCRIPT`). A
//!   fetch promotes due scheduled jobs, leases up to N ready jobs and returns them in one
//!   round trip; `complete_many` records many outcomes in one, each fenced on its own.
//! * **One slot per queue.** Every key of queue `q` starts with the hash tag
//!   `{<prefix>:q}` (prefix `pf` by default), so the backend runs unchanged on a Redis
//!   Cluster.
//! * **Server time.** Lease deadlines, due times and retention use the Redis server's
//!   clock (`TIME` inside the scripts), so workers with skewed clocks agree.
//! * **No busy polling.** An idle fetch blocks on a per-queue signal list (`BLPOP`, on a
//!   connection of its own) that enqueues, retries and requeues push to, and wakes for
//!   the next scheduled job on its own. Dropping a fetch never loses a job: the move
//!   from ready to leased happens inside one script.
//! * **Bounded.** Dead letters are capped per queue (oldest dropped and counted);
//!   results expire after their retention; stats cost a constant number of commands.
//! * **Secrets stay secret.** Errors and `Debug` output show URLs with the password
//!   replaced by `***` ([`redact_url`]).
//!
//! URLs: `redis://`, `rediss://` (feature `tls`), and `redis+cluster://host:port,...` for a
//! cluster; see [`RedisConfig`]. The key layout, the scripts and the failure behaviour are
//! described in `docs/redis.md`.

mod config;
mod conn;
mod error;
mod queue;
mod reply;
mod scripts;

pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEY_PREFIX, DEFAULT_POOL_SIZE, DEFAULT_WAIT_POOL_SIZE,
    RedisConfig, redact_url,
};
pub use error::Error;
pub use queue::RedisQueue;
