//! Fencing tokens survive a crash that loses the last leases.
//!
//! With asynchronous lease commits (`async_commit_leases`), a server crash loses the WAL
//! of the last leases: the rows and everything the transactions touched go back to
//! their state before those leases, but the leases' holders still run and will send
//! outcomes. The test plays that rewind exactly (the job's row and the database's
//! counters put back as they were before the lease) and checks that the next lease's
//! token is one the old holder does not have, so its outcome is refused.

mod common;

use std::time::Duration;

use common::fresh;
use flow_core::Error as QueueError;
use flow_core::queue::{JobQueue, JobState, NewJob, QueueOptions};
use serde_json::json;
use sqlx::Row;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_that_loses_the_last_leases_never_lets_an_old_holder_win() {
    let q = fresh(QueueOptions::default()).await;
    let s = q.schema().to_owned();
    let queue = "tokens";
    for round in 0..5 {
        let id = q
            .enqueue(NewJob::new(queue, json!({ "round": round })))
            .await
            .expect("enqueue");
        // What the lost WAL would restore: the row before the lease, and the counters.
        let sequence = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT last_value, is_called FROM \"{s}\".lease_token"
        )))
        .fetch_one(q.pool())
        .await
        .expect("read the token sequence");
        let (last, called): (i64, bool) = (sequence.get(0), sequence.get(1));
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT state, attempts, token FROM \"{s}\".jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_one(q.pool())
        .await
        .expect("read the job");
        let (state, attempts, token): (i16, i32, i64) = (row.get(0), row.get(1), row.get(2));

        let first = q
            .fetch(queue, 1, Duration::from_secs(60), Duration::from_secs(2))
            .await
            .expect("fetch")
            .pop()
            .expect("a job to lease");
        assert_eq!(first.id, id);

        // The crash: the lease's writes are gone.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{s}\".jobs SET state = $2, attempts = $3, token = $4,
                 lease_expires_at_ms = NULL, held = false
             WHERE id = $1"
        )))
        .bind(id)
        .bind(state)
        .bind(attempts)
        .bind(token)
        .execute(q.pool())
        .await
        .expect("rewind the job");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval('\"{s}\".lease_token', $1, $2)"
        )))
        .bind(last)
        .bind(called)
        .execute(q.pool())
        .await
        .expect("rewind the token sequence");

        let second = q
            .fetch(queue, 1, Duration::from_secs(60), Duration::from_secs(2))
            .await
            .expect("fetch")
            .pop()
            .expect("the job again");
        assert_eq!(second.id, id);
        assert_ne!(
            first.lease.token, second.lease.token,
            "round {round}: the lease after the crash reuses the lost lease's token"
        );
        assert!(
            matches!(
                q.complete(&first.lease, json!("stale")).await,
                Err(QueueError::LeaseLost { .. })
            ),
            "round {round}: the holder of the lost lease recorded its outcome over the new holder"
        );
        q.complete(&second.lease, json!("new"))
            .await
            .expect("the new holder completes");
        let info = q.job(queue, id).await.expect("job").expect("exists");
        assert_eq!(
            (info.state, info.result),
            (JobState::Completed, Some(json!("new")))
        );
    }
}
