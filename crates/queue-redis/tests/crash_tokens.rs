//! Fencing tokens survive a crash that loses the last writes.
//!
//! A Redis server without `appendfsync always` loses the writes since its last
//! snapshot when it crashes. Leases handed out in that window are forgotten by the
//! server, but their holders still run and will send outcomes. The next leases must
//! carry tokens those holders do not have, so a stale holder's outcome never wins.

use std::time::Duration;

use flow_core::Error as QueueError;
use flow_core::queue::{JobQueue, JobState, LeasedJob, NewJob, QueueOptions};
use queue_redis::{RedisConfig, RedisQueue};
use serde_json::json;
use test_support::redis::RedisServer;

/// Retries `op` while the server is coming back (connections broken by the restart).
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn fetch_one(q: &RedisQueue, queue: &str) -> LeasedJob {
    let mut jobs = eventually("fetch", || {
        q.fetch(queue, 1, Duration::from_secs(60), Duration::from_secs(2))
    })
    .await;
    assert_eq!(jobs.len(), 1, "one job to lease");
    jobs.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_that_loses_the_last_leases_never_lets_an_old_holder_win() {
    let mut server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(&server.url())
        .expect("valid URL")
        .key_prefix("crash")
        .queue_options(QueueOptions::default());
    let q = RedisQueue::with_config(config).await.expect("connect");
    let queue = "tokens";
    let mut stale = Vec::new();
    for round in 0..5 {
        let id = q
            .enqueue(NewJob::new(queue, json!({ "round": round })))
            .await
            .expect("enqueue");
        // The snapshot the server will come back from: the job ready, unleased.
        server.command(&["SAVE"]).expect("SAVE");
        let first = fetch_one(&q, queue).await;
        assert_eq!(first.id, id);
        // The crash: every write since the snapshot is lost, this lease among them.
        server.kill();
        server.restart().unwrap_or_else(|e| panic!("{e}"));
        let second = fetch_one(&q, queue).await;
        assert_eq!(second.id, id, "the job is leased again after the crash");
        assert_ne!(
            first.lease.token, second.lease.token,
            "round {round}: the lease after the crash reuses the lost lease's token"
        );
        let refused = eventually("complete with the lost lease", || async {
            match q.complete(&first.lease, json!("stale")).await {
                Err(QueueError::LeaseLost { .. }) => Ok(true),
                Ok(()) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await;
        assert!(
            refused,
            "round {round}: the holder of the lost lease recorded its outcome over the new holder"
        );
        eventually("complete with the new lease", || {
            q.complete(&second.lease, json!("new"))
        })
        .await;
        let info = q.job(queue, id).await.expect("job").expect("exists");
        assert_eq!(
            (info.state, info.result),
            (JobState::Completed, Some(json!("new")))
        );
        stale.push(first.lease);
    }
    for lease in &stale {
        assert!(
            matches!(
                q.heartbeat(lease, Duration::from_secs(1)).await,
                Err(QueueError::LeaseLost { .. })
            ),
            "a lost lease stays lost"
        );
    }
}
