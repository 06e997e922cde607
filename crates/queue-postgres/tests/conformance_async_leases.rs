//! The `queue-conformance` suite against PostgreSQL with leases committed asynchronously
//! (`PgQueueBuilder::async_commit_leases`): the contract holds the same.
//!
//! The server is `DATABASE_URL` when set (`cargo xtask ci` provides one), else a
//! throwaway server started once for this test binary from the local PostgreSQL
//! binaries. Every factory call gets a fresh schema `t_<random>` in that database, so
//! nothing depends on other runs or on the machine's shared server.

use std::sync::{Arc, OnceLock};

use flow_core::queue::{JobQueue, QueueOptions};
use queue_postgres::PgQueue;
use test_support::postgres::PgServer;

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

async fn fresh_queue(opts: QueueOptions) -> Arc<dyn JobQueue> {
    let schema = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let queue = PgQueue::builder(database_url())
        .schema(schema)
        .max_connections(4)
        .async_commit_leases(true)
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

queue_conformance::conformance_tests!(|opts: QueueOptions| fresh_queue(opts));
