//! A delay is measured by the database's clock, not the producer's: against a throwaway
//! PostgreSQL server whose clock runs five minutes ahead of this process (started under
//! libfaketime), a job delayed 30 s is scheduled, not ready, on every enqueue path: one
//! job, a small batch (the `INSERT ... unnest` statement), a bulk batch (`COPY`), and
//! `enqueue_in_tx`. A job given an instant keeps that instant, which the server's clock
//! has already passed.
//!
//! Always starts its own server (a shifted clock cannot be had from `DATABASE_URL`); needs
//! libfaketime (Debian: `apt-get install faketime`).

mod common;

use std::time::Duration;

use flow_core::queue::{JobId, JobQueue, JobState, NewJob, now_ms};
use queue_postgres::PgQueue;
use serde_json::json;
use test_support::clock::shifted_clock_env;
use test_support::postgres::PgServer;

use common::{builder, connect, fresh_queue_name, fresh_schema, start_server};

/// How far the server's clock runs ahead of ours.
const AHEAD_S: i64 = 300;
const DELAY: Duration = Duration::from_secs(30);

fn server_ahead() -> PgServer {
    let env = shifted_clock_env(AHEAD_S)
        .unwrap_or_else(|e| panic!("this test runs PostgreSQL with a shifted clock: {e}"));
    let mut b = PgServer::builder();
    for (name, value) in env {
        b = b.env(name, value);
    }
    start_server(b)
}

async fn assert_scheduled(q: &PgQueue, queue: &str, id: JobId, what: &str) {
    let info = q
        .job(queue, id)
        .await
        .expect("job")
        .unwrap_or_else(|| panic!("{what}: job {id} should exist"));
    assert_eq!(
        info.state,
        JobState::Scheduled,
        "{what}: a job delayed 30 s on a server 5 min ahead of the producer must wait; \
         run_at_ms is {} ms after created_at_ms",
        info.run_at_ms - info.created_at_ms
    );
    assert_eq!(
        info.run_at_ms - info.created_at_ms,
        30_000,
        "{what}: due 30 s after the server stored it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_count_from_the_database_clock() {
    let server = server_ahead();
    let q = connect(builder(&server.url(), &fresh_schema())).await;
    let queue = fresh_queue_name("skew");

    // The server's clock really is ahead of ours.
    let info_of = |id| {
        let q = q.clone();
        let queue = queue.clone();
        async move { q.job(&queue, id).await.expect("job").expect("exists") }
    };
    let probe = q
        .enqueue(NewJob::new(&queue, json!("probe")))
        .await
        .expect("enqueue");
    let skew = info_of(probe).await.created_at_ms - now_ms();
    assert!(
        (AHEAD_S * 1000 - 10_000..=AHEAD_S * 1000 + 10_000).contains(&skew),
        "the server should run {AHEAD_S} s ahead, it runs {skew} ms ahead"
    );

    let one = q
        .enqueue(NewJob::new(&queue, json!(1)).delay(DELAY))
        .await
        .expect("enqueue");
    assert_scheduled(&q, &queue, one, "enqueue").await;

    let small = q
        .enqueue_many(vec![
            NewJob::new(&queue, json!(2)).delay(DELAY),
            NewJob::new(&queue, json!(3)).delay(DELAY),
        ])
        .await
        .expect("enqueue_many");
    for id in small {
        assert_scheduled(&q, &queue, id, "enqueue_many (INSERT)").await;
    }

    let bulk = q
        .enqueue_many(
            (0..40)
                .map(|n| NewJob::new(&queue, json!(n)).delay(DELAY))
                .collect(),
        )
        .await
        .expect("enqueue_many");
    for id in bulk {
        assert_scheduled(&q, &queue, id, "enqueue_many (COPY)").await;
    }

    let mut tx = q.pool().begin().await.expect("begin");
    let in_tx = q
        .enqueue_in_tx(&mut tx, NewJob::new(&queue, json!("tx")).delay(DELAY))
        .await
        .expect("enqueue_in_tx");
    let many_in_tx = q
        .enqueue_many_in_tx(
            &mut tx,
            (0..40)
                .map(|n| NewJob::new(&queue, json!(n)).delay(DELAY))
                .collect(),
        )
        .await
        .expect("enqueue_many_in_tx");
    tx.commit().await.expect("commit");
    assert_scheduled(&q, &queue, in_tx, "enqueue_in_tx").await;
    for id in many_in_tx {
        assert_scheduled(&q, &queue, id, "enqueue_many_in_tx (COPY)").await;
    }

    // An instant is an instant: 30 s from now by our clock has passed on the server's.
    let instant = q
        .enqueue(NewJob::new(&queue, json!("instant")).run_at_ms(now_ms() + 30_000))
        .await
        .expect("enqueue");
    assert_eq!(info_of(instant).await.state, JobState::Ready);

    let stats = q.stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.scheduled), (2, 84), "{stats:?}");
    let ready = q
        .fetch(&queue, 100, Duration::from_secs(60), Duration::ZERO)
        .await
        .expect("fetch");
    let mut got: Vec<JobId> = ready.iter().map(|j| j.id).collect();
    got.sort_unstable();
    let mut want = vec![probe, instant];
    want.sort_unstable();
    assert_eq!(got, want, "only the probe and the past instant are ready");
}
