//! The conformance suite against a three-master Redis Cluster: the nodes listed in
//! `REDIS_CLUSTER_URLS` (comma-separated, set by `cargo xtask ci`), else a throwaway
//! cluster started once for this test binary. Every backend gets a key prefix of its
//! own, so its queues land on slots all over the cluster. The clauses that cut
//! connections mid-call use a throwaway cluster of their own whose nodes announce
//! loopback proxies as their addresses (`test_support::proxy::ProxiedCluster`), so every
//! connection of the cluster client passes through a proxy that can cut it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_conformance::{ConnectionFaults, WithFaults};
use queue_redis::{RedisConfig, RedisQueue};
use test_support::proxy::ProxiedCluster;
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

async fn connect(urls: Vec<String>, opts: QueueOptions) -> Arc<dyn JobQueue> {
    let prefix = format!("conf-{}", uuid::Uuid::new_v4().simple());
    let config = RedisConfig::cluster(urls)
        .expect("REDIS_CLUSTER_URLS lists valid Redis URLs")
        .key_prefix(prefix)
        .queue_options(opts);
    let queue = RedisQueue::with_config(config)
        .await
        .expect("connect to Redis Cluster");
    assert!(queue.is_cluster());
    Arc::new(queue) as Arc<dyn JobQueue>
}

/// Backends on a cluster of their own, reached through a proxy per node.
struct ProxyFaults;

impl ProxyFaults {
    fn cluster() -> &'static ProxiedCluster {
        static CLUSTER: OnceLock<ProxiedCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            ProxiedCluster::start(3)
                .unwrap_or_else(|e| panic!("cannot start a cluster behind proxies: {e}"))
        })
    }
}

impl ConnectionFaults for ProxyFaults {
    fn build(&self, opts: QueueOptions) -> Pin<Box<dyn Future<Output = Arc<dyn JobQueue>> + Send>> {
        Box::pin(connect(Self::cluster().urls(), opts))
    }

    fn cut_after_marker(&self, marker: &[u8], after: usize) {
        Self::cluster().cuts().cut_after_marker(marker, after);
    }

    fn heal(&self, marker: &[u8]) -> usize {
        Self::cluster().cuts().heal(marker)
    }
}

queue_conformance::conformance_tests!(WithFaults {
    factory: |opts: QueueOptions| connect(urls(), opts),
    faults: ProxyFaults,
});
