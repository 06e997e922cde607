//! The `queue-conformance` suite against PostgreSQL: one test per clause.
//!
//! The server is `DATABASE_URL` when set (`cargo xtask ci` provides one), else a
//! throwaway server started once for this test binary from the local PostgreSQL
//! binaries. Every factory call gets a fresh schema `t_<random>` in that database, so
//! nothing depends on other runs or on the machine's shared server. The clauses that cut
//! connections mid-call reach the same server through a loopback proxy
//! (`test_support::proxy`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_conformance::{ConnectionFaults, WithFaults};
use queue_postgres::PgQueue;
use test_support::postgres::PgServer;
use test_support::proxy::{Cuts, TcpProxy, via};

/// The database URL: `DATABASE_URL`, or a throwaway server kept for the whole binary
/// (its watchdog stops it when the process exits).
fn database_url() -> String {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            let server = PgServer::start().unwrap_or_else(|e| {
                panic!("set DATABASE_URL or install PostgreSQL to run these tests: {e}")
            });
            let url = server.url();
            // Kept until the process exits; the watchdog then stops the server.
            Box::leak(Box::new(server));
            url
        })
        .clone()
}

async fn queue_at(url: String, opts: QueueOptions) -> Arc<dyn JobQueue> {
    let schema = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let queue = PgQueue::builder(url)
        .schema(schema)
        .max_connections(4)
        .queue_options(opts)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
    queue
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    Arc::new(queue)
}

async fn fresh_queue(opts: QueueOptions) -> Arc<dyn JobQueue> {
    queue_at(database_url(), opts).await
}

/// Backends whose connections pass through one proxy in front of the server.
struct ProxyFaults;

impl ProxyFaults {
    /// The proxy (started on first use) and the URL that reaches the server through it.
    fn proxy() -> &'static (TcpProxy, Cuts, String) {
        static PROXY: OnceLock<(TcpProxy, Cuts, String)> = OnceLock::new();
        PROXY.get_or_init(|| {
            let cuts = Cuts::new();
            let server = database_url();
            let (_, upstream) = via(&server, 0).unwrap_or_else(|e| panic!("{e}"));
            let proxy = TcpProxy::start(upstream, cuts.clone()).unwrap_or_else(|e| panic!("{e}"));
            let (proxied, _) = via(&server, proxy.port()).unwrap_or_else(|e| panic!("{e}"));
            (proxy, cuts, proxied)
        })
    }
}

impl ConnectionFaults for ProxyFaults {
    fn build(&self, opts: QueueOptions) -> Pin<Box<dyn Future<Output = Arc<dyn JobQueue>> + Send>> {
        Box::pin(queue_at(Self::proxy().2.clone(), opts))
    }

    fn cut_after_marker(&self, marker: &[u8], after: usize) {
        Self::proxy().1.cut_after_marker(marker, after);
    }

    fn heal(&self, marker: &[u8]) -> usize {
        Self::proxy().1.heal(marker)
    }
}

queue_conformance::conformance_tests!(WithFaults {
    factory: |opts: QueueOptions| fresh_queue(opts),
    faults: ProxyFaults,
});
