//! The conformance suite against a standalone Redis: the server at `REDIS_URL` (set by
//! `cargo xtask ci`), else a throwaway `redis-server` started once for this test binary.
//! Every backend gets a key prefix of its own, so tests never see each other's keys or
//! anything an earlier run left.

use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_redis::{RedisConfig, RedisQueue};
use test_support::redis::RedisServer;

fn url() -> String {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return url;
    }
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER
        .get_or_init(|| RedisServer::start().unwrap_or_else(|e| panic!("{e} (or set REDIS_URL)")))
        .url()
}

queue_conformance::conformance_tests!(|opts: QueueOptions| async move {
    let prefix = format!("conf-{}", uuid::Uuid::new_v4().simple());
    let config = RedisConfig::from_url(&url())
        .expect("REDIS_URL is a valid Redis URL")
        .key_prefix(prefix)
        .queue_options(opts);
    Arc::new(
        RedisQueue::with_config(config)
            .await
            .expect("connect to Redis"),
    ) as Arc<dyn JobQueue>
});
