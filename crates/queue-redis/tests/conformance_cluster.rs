//! The conformance suite against a three-master Redis Cluster: the nodes listed in
//! `REDIS_CLUSTER_URLS` (comma-separated, set by `cargo xtask ci`), else a throwaway
//! cluster started once for this test binary. Every backend gets a key prefix of its
//! own, so its queues land on slots all over the cluster.

use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_redis::{RedisConfig, RedisQueue};
use test_support::redis::RedisCluster;

fn urls() -> Vec<String> {
    if let Ok(list) = std::env::var("REDIS_CLUSTER_URLS") {
        return list.split(',').map(|u| u.trim().to_owned()).collect();
    }
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            RedisCluster::start(3).unwrap_or_else(|e| panic!("{e} (or set REDIS_CLUSTER_URLS)"))
        })
        .urls()
}

queue_conformance::conformance_tests!(|opts: QueueOptions| async move {
    let prefix = format!("conf-{}", uuid::Uuid::new_v4().simple());
    let config = RedisConfig::cluster(urls())
        .expect("REDIS_CLUSTER_URLS lists valid Redis URLs")
        .key_prefix(prefix)
        .queue_options(opts);
    let queue = RedisQueue::with_config(config)
        .await
        .expect("connect to Redis Cluster");
    assert!(queue.is_cluster());
    Arc::new(queue) as Arc<dyn JobQueue>
});
