//! End-to-end: SIGTERM and SIGINT handling of `penguiflow-worker run` against throwaway
//! Redis and PostgreSQL servers, with jobs in flight.
//!
//! * SIGTERM while long jobs run: fetching stops, `/health` says `draining` and
//!   `/health/ready` answers 503, the running jobs finish, the process exits 0, the jobs
//!   never fetched are still ready, none lost.
//! * SIGTERM with a shutdown timeout shorter than the jobs: they are cancelled and handed
//!   back (ready, attempt not counted), exit 0.
//! * A second SIGTERM during the drain exits at once with 130; the leases run out and a
//!   second worker completes every job.

mod common;

use std::time::{Duration, Instant};

use common::{
    Backend, Worker, enqueue_lines, int, job, queue_name, status, wait_for, wait_until_settled,
};
use serde_json::Value;

/// Waits until the worker's `/health` shows `n` active jobs.
fn wait_active(worker: &mut Worker, n: u64) -> Value {
    wait_for(
        &format!("{n} active jobs on /health"),
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let h = worker.health();
            if h["active_jobs"] == n {
                Ok(h)
            } else {
                Err(h.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()))
}

/// Waits until `/health` says draining and `/health/ready` answers 503 (with the
/// reason); returns the `/health` body seen then.
fn wait_draining(worker: &mut Worker) -> Value {
    wait_for(
        "/health draining and /health/ready 503",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let ready = worker.get("/health/ready");
            let h = worker.health();
            if ready.status == 503 && h["status"] == "draining" {
                assert!(
                    ready.body.contains("draining"),
                    "ready body: {}",
                    ready.body
                );
                Ok(h)
            } else {
                Err(format!(
                    "ready {} {:?}, health {h}",
                    ready.status, ready.body
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()))
}

/// The states of `ids` as `(state, attempts)` pairs, in order.
fn states(url: &str, queue: &str, ids: &[String]) -> Vec<(String, u64)> {
    ids.iter()
        .map(|id| {
            let j = job(url, queue, id);
            (
                j["state"].as_str().expect("state").to_owned(),
                int(&j, "attempts"),
            )
        })
        .collect()
}

fn count(states: &[(String, u64)], state: &str, attempts: u64) -> usize {
    states
        .iter()
        .filter(|(s, a)| s == state && *a == attempts)
        .count()
}

/// SIGTERM with 4 of 6 long jobs running: drains, exits 0, 4 completed, 2 still ready.
fn sigterm_drains(backend: Backend) {
    let url = backend.url();
    let q = queue_name("drain");
    let mut worker = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            "4",
            "--shutdown-timeout",
            "10s",
        ],
        &[],
    );
    // Ready (first backend stats request done) before there is work, so the status
    // seen with the jobs running is settled.
    worker.wait_ready();
    let ids = enqueue_lines(&url, &q, &[r#"{"sleep_ms": 3000}"#; 6], &[]);
    let h = wait_active(&mut worker, 4);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(worker.get("/health/ready").status, 200);

    worker.signal("TERM");
    let h = wait_draining(&mut worker);
    assert_eq!(
        h["active_jobs"], 4,
        "the in-flight jobs keep running while draining: {h}"
    );
    assert_eq!(h["draining"], true, "{h}");
    assert_eq!(
        worker.get("/health/live").status,
        200,
        "live while draining"
    );
    let metrics = worker.get("/metrics").body;
    assert!(
        metrics.contains("\npenguiflow_worker_draining 1\n"),
        "penguiflow_worker_draining is 1 while draining:\n{metrics}"
    );

    let code = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "exit code after the drain\n{}",
        worker.logs()
    );
    assert!(
        worker.logs().contains("\"handed_back\":0"),
        "nothing handed back\n{}",
        worker.logs()
    );

    let s = status(&url, &q);
    for (field, n) in [
        ("completed", 4),
        ("ready", 2),
        ("running", 0),
        ("scheduled", 0),
        ("dead", 0),
    ] {
        assert_eq!(int(&s, field), n, "{field} after the drain: {s}");
    }
    let st = states(&url, &q, &ids);
    assert_eq!(count(&st, "completed", 1), 4, "{st:?}");
    assert_eq!(count(&st, "ready", 0), 2, "never fetched: {st:?}");
}

#[test]
fn sigterm_drains_in_flight_jobs_redis() {
    sigterm_drains(Backend::Redis);
}

#[test]
fn sigterm_drains_in_flight_jobs_postgres() {
    sigterm_drains(Backend::Postgres);
}

/// SIGTERM with a 0.5 s shutdown timeout and jobs of 30 s: handed back, exit 0.
fn sigterm_hands_back(backend: Backend) {
    let url = backend.url();
    let q = queue_name("handback");
    let ids = enqueue_lines(&url, &q, &[r#"{"sleep_ms": 30000}"#; 6], &[]);
    let mut worker = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            "4",
            "--shutdown-timeout",
            "0.5s",
        ],
        &[],
    );
    wait_active(&mut worker, 4);
    let signalled = Instant::now();
    worker.signal("TERM");
    let code = worker.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit code after handing back\n{}",
        worker.logs()
    );
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM: the jobs were not cut at the 0.5 s shutdown timeout\n{}",
        worker.logs()
    );
    assert!(
        worker.logs().contains("\"handed_back\":4"),
        "4 jobs handed back\n{}",
        worker.logs()
    );

    let s = status(&url, &q);
    for (field, n) in [
        ("ready", 6),
        ("running", 0),
        ("scheduled", 0),
        ("completed", 0),
        ("dead", 0),
    ] {
        assert_eq!(int(&s, field), n, "{field} after handing back: {s}");
    }
    let st = states(&url, &q, &ids);
    assert_eq!(
        count(&st, "ready", 0),
        6,
        "all ready with attempts 0: {st:?}"
    );
}

#[test]
fn sigterm_past_shutdown_timeout_hands_jobs_back_redis() {
    sigterm_hands_back(Backend::Redis);
}

#[test]
fn sigterm_past_shutdown_timeout_hands_jobs_back_postgres() {
    sigterm_hands_back(Backend::Postgres);
}

/// A second SIGTERM during the drain exits 130 at once; after the 1 s leases run out a
/// second worker reclaims the jobs and completes all of them.
fn second_sigterm(backend: Backend) {
    let url = backend.url();
    let q = queue_name("second");
    // 4 s jobs: long enough that the drain cannot end before the second SIGTERM.
    let ids = enqueue_lines(&url, &q, &[r#"{"sleep_ms": 4000}"#; 6], &[]);
    let mut first = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            "4",
            "--lease",
            "1s",
            "--shutdown-timeout",
            "30s",
        ],
        &[],
    );
    wait_active(&mut first, 4);
    first.signal("TERM");
    wait_draining(&mut first);
    let signalled = Instant::now();
    first.signal("TERM");
    let code = first.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert_eq!(
        code,
        Some(130),
        "exit code after a second SIGTERM\n{}",
        first.logs()
    );
    assert!(
        took < Duration::from_secs(3),
        "the second SIGTERM took {took:?} to end the process\n{}",
        first.logs()
    );
    let s = status(&url, &q);
    assert_eq!(int(&s, "running") + int(&s, "ready"), 6, "none lost: {s}");
    assert_eq!(int(&s, "completed"), 0, "{s}");

    let mut second = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            "10",
            "--lease",
            "1s",
        ],
        &[],
    );
    let s = wait_until_settled(&url, &q, &mut second, Duration::from_secs(40));
    for (field, n) in [("completed", 6), ("dead", 0), ("ready", 0), ("running", 0)] {
        assert_eq!(int(&s, field), n, "{field} after the second worker: {s}");
    }
    let h = second.health();
    assert_eq!(
        h["stats"]["rescued"], 4,
        "the second worker's reaper reclaimed the 4 expired leases: {h}"
    );
    assert_eq!(h["stats"]["succeeded"], 6, "{h}");
    second.stop(Duration::from_secs(20));

    let st = states(&url, &q, &ids);
    assert_eq!(
        count(&st, "completed", 2),
        4,
        "the 4 interrupted jobs completed on their second attempt: {st:?}"
    );
    assert_eq!(count(&st, "completed", 1), 2, "{st:?}");
}

#[test]
fn second_sigterm_exits_130_and_jobs_come_back_redis() {
    second_sigterm(Backend::Redis);
}

#[test]
fn second_sigterm_exits_130_and_jobs_come_back_postgres() {
    second_sigterm(Backend::Postgres);
}
