//! The conformance suite against a standalone Redis: the server at `REDIS_URL` (set by
//! `cargo xtask ci`), else a throwaway `redis-server` started once for this test binary.
//! Every backend gets a key prefix of its own, so tests never see each other's keys or
//! anything an earlier run left. The clauses that cut connections mid-call reach the
//! same server through a loopback proxy (`test_support::proxy`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_conformance::{ConnectionFaults, WithFaults};
use queue_redis::{RedisConfig, RedisQueue};
use test_support::proxy::{Cuts, TcpProxy, via};
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

async fn connect(url: String, opts: QueueOptions) -> Arc<dyn JobQueue> {
    let prefix = format!("conf-{}", uuid::Uuid::new_v4().simple());
    let config = RedisConfig::from_url(&url)
        .expect("REDIS_URL is a valid Redis URL")
        .key_prefix(prefix)
        .queue_options(opts);
    Arc::new(
        RedisQueue::with_config(config)
            .await
            .expect("connect to Redis"),
    ) as Arc<dyn JobQueue>
}

/// Backends whose connections pass through one proxy in front of the server.
struct ProxyFaults;

impl ProxyFaults {
    /// The proxy (started on first use) and the URL that reaches the server through it.
    fn proxy() -> &'static (TcpProxy, Cuts, String) {
        static PROXY: OnceLock<(TcpProxy, Cuts, String)> = OnceLock::new();
        PROXY.get_or_init(|| {
            let cuts = Cuts::new();
            let server = url();
            let (_, upstream) = via(&server, 0).unwrap_or_else(|e| panic!("{e}"));
            let proxy = TcpProxy::start(upstream, cuts.clone()).unwrap_or_else(|e| panic!("{e}"));
            let (proxied, _) = via(&server, proxy.port()).unwrap_or_else(|e| panic!("{e}"));
            (proxy, cuts, proxied)
        })
    }
}

impl ConnectionFaults for ProxyFaults {
    fn build(&self, opts: QueueOptions) -> Pin<Box<dyn Future<Output = Arc<dyn JobQueue>> + Send>> {
        Box::pin(connect(Self::proxy().2.clone(), opts))
    }

    fn cut_after_marker(&self, marker: &[u8], after: usize) {
        Self::proxy().1.cut_after_marker(marker, after);
    }

    fn heal(&self, marker: &[u8]) -> usize {
        Self::proxy().1.heal(marker)
    }
}

queue_conformance::conformance_tests!(WithFaults {
    factory: |opts: QueueOptions| connect(url(), opts),
    faults: ProxyFaults,
});
