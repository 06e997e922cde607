//! End-to-end: jobs are neither charged for time they did not run nor stranded, and a
//! drain ends on time, through `penguiflow-worker run` against throwaway Redis and
//! PostgreSQL servers.
//!
//! * Jobs held (prefetched) behind slow ones: a worker that learned jobs take a
//!   millisecond holds a batch behind two jobs that outlast the lease; with
//!   `--max-retries 0` every job still completes, none dies of its lease.
//! * Hanging and panicking jobs behind fast ones on three workers: they dead-letter as
//!   JOB_TIMEOUT and UNEXPECTED_ERROR, never as lease expiries; when one worker is
//!   SIGKILLed while they run, only the jobs it was running may die of their lease.
//! * SIGTERM in the middle of a drain, again and again, with a lease long enough that no
//!   reaper could hide a stranded job: after each exit nothing is leased to nobody, and
//!   in the end every job completed on its first attempt.
//! * A frozen backend (server SIGSTOPped) during a drain: the worker still exits 0 within
//!   the shutdown timeout plus a second of grace.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Backend, Worker, cli, enqueue_lines, int, job, queue_name, status, wait_for, wait_until_settled,
};
use serde_json::Value;
use test_support::postgres::PgServer;
use test_support::redis::RedisServer;

/// Waits until `status --json` of `queue` satisfies `done`; fails (with the logs of the
/// `workers`, which must all keep running) after `timeout`.
fn wait_status(
    url: &str,
    queue: &str,
    what: &str,
    timeout: Duration,
    workers: &mut [&mut Worker],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let s = status(url, queue);
        if done(&s) {
            return s;
        }
        for w in workers.iter_mut() {
            if let Some(code) = w.try_exit() {
                panic!("a worker exited early ({code:?}) with {s}\n{}", w.logs());
            }
        }
        if started.elapsed() > timeout {
            let logs: Vec<String> = workers.iter().map(|w| w.logs()).collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}: {s}\n{}",
                logs.join("\n")
            );
        }
        // Not too often: each look runs the command, and the workers share the CPU with it.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every dead letter of `queue` (`dlq list --json`, one page large enough for these
/// scenarios), as `id -> (code, attempts)`.
fn dead_by_id(url: &str, queue: &str) -> BTreeMap<String, (String, u64)> {
    let out = cli(&[
        "--url", url, "dlq", "list", "--queue", queue, "--json", "--limit", "1000",
    ]);
    let Value::Array(items) = out.json() else {
        panic!("dlq list --json is not an array\n{}", out.describe());
    };
    items
        .iter()
        .map(|d| {
            let id = d["id"].as_str().expect("dead letter id").to_owned();
            let code = d["code"].as_str().expect("dead letter code").to_owned();
            (id, (code, int(d, "attempts")))
        })
        .collect()
}

/// How many dead letters carry each code.
fn count_codes(dead: &BTreeMap<String, (String, u64)>) -> BTreeMap<String, usize> {
    let mut by_code = BTreeMap::new();
    for (code, _) in dead.values() {
        *by_code.entry(code.clone()).or_default() += 1;
    }
    by_code
}

/// `n` copies of `line`.
fn lines(line: &'static str, n: usize) -> Vec<&'static str> {
    vec![line; n]
}

// ---------------------------------------------------------------------------------------
// Held jobs behind slow ones (issue 13, item 1).
// ---------------------------------------------------------------------------------------

/// Concurrency 2, lease 1 s: 400 fast jobs teach the worker that jobs take about a
/// millisecond, so when 2 jobs of 3 s arrive followed by 300 fast ones it fetches the two
/// slow ones plus a batch it holds for the next free slot, which comes only 3 s later.
/// A held job must not lose its lease while it waits, nor be charged for it: with
/// `--max-retries 0` a reclaimed lease would dead-letter it as LEASE_EXPIRED although it
/// never ran.
fn held_jobs_behind_slow_ones(backend: Backend) {
    let url = backend.url();
    let q = queue_name("held");
    let mut worker = Worker::start(
        &url,
        &[
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            "2",
            "--lease",
            "1s",
        ],
        &[],
    );
    worker.wait_ready();
    enqueue_lines(&url, &q, &lines("{}", 400), &["--max-retries", "0"]);
    wait_status(
        &url,
        &q,
        "the 400 fast jobs completed",
        Duration::from_secs(30),
        &mut [&mut worker],
        |s| int(s, "completed") == 400,
    );

    let mut batch = lines(r#"{"sleep_ms": 3000}"#, 2);
    batch.extend(lines(r#"{"fast": true}"#, 300));
    let ids = enqueue_lines(&url, &q, &batch, &["--max-retries", "0"]);
    let s = wait_until_settled(&url, &q, &mut worker, Duration::from_secs(40));
    let dead = dead_by_id(&url, &q);
    assert!(
        dead.is_empty(),
        "no job held behind the slow ones may die: {:?}\n{s}\n{}",
        count_codes(&dead),
        worker.logs()
    );
    assert_eq!(int(&s, "completed"), 702, "every job completed: {s}");
    assert_eq!(int(&s, "dead"), 0, "{s}");
    // The slow jobs and the first jobs held behind them ran once each.
    for id in ids.iter().take(20) {
        let j = job(&url, &q, id);
        assert_eq!(j["state"], "completed", "{j}");
        assert_eq!(int(&j, "attempts"), 1, "{j}");
    }
    worker.stop(Duration::from_secs(20));
}

#[test]
fn held_jobs_behind_slow_ones_all_complete_redis() {
    held_jobs_behind_slow_ones(Backend::Redis);
}

#[test]
fn held_jobs_behind_slow_ones_all_complete_postgres() {
    held_jobs_behind_slow_ones(Backend::Postgres);
}

// ---------------------------------------------------------------------------------------
// Hanging and panicking jobs behind fast ones, three workers (issue 13, item 1).
// ---------------------------------------------------------------------------------------

/// Fast jobs enqueued in one batch, then one by one.
const FAST_BATCH: u64 = 300;
const FAST_ONE_BY_ONE: u64 = 60;
const FAST_JOBS: u64 = FAST_BATCH + FAST_ONE_BY_ONE;
const HANGING: usize = 50;
const PANICKING: usize = 50;

/// Three workers at concurrency 16, `--job-timeout 2s --lease 4s`: fast jobs, then 50
/// hanging and 50 panicking jobs with `--max-retries 0`. The fast jobs come in a batch,
/// then one at a time, each of which runs alone in about a millisecond: that teaches
/// the workers that jobs are quick (16 at once on a shared CPU would look slower), so
/// the worker that wakes first for the second batch takes all of it, runs 16 hanging
/// jobs and holds the rest, for up to three rounds of the 2 s job timeout. Held jobs
/// must not die of their lease while they wait. With `kill`, the worker running the
/// most jobs is SIGKILLed while they run: only those jobs may die of their lease (their
/// attempt had started); the jobs it held come back uncharged and end with their own
/// codes elsewhere.
fn bad_jobs_behind_fast_ones(backend: Backend, kill: bool) {
    let url = backend.url();
    let q = queue_name(if kill { "bad-kill" } else { "bad" });
    let args = [
        "--queue",
        &q,
        "--flow",
        "exercise",
        "--concurrency",
        "16",
        "--job-timeout",
        "2s",
        "--lease",
        "4s",
    ];
    // No backtraces: symbolising the first one takes a debug build seconds, long enough
    // for a panicking job to run into the 2 s job timeout instead.
    let env = [("RUST_BACKTRACE", "0")];
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start(&url, &args, &env)).collect();
    for w in &mut workers {
        w.wait_ready();
    }
    enqueue_lines(
        &url,
        &q,
        &lines("{}", FAST_BATCH as usize),
        &["--max-retries", "0"],
    );
    for _ in 0..FAST_ONE_BY_ONE {
        enqueue_lines(&url, &q, &["{}"], &["--max-retries", "0"]);
    }
    {
        let mut all: Vec<&mut Worker> = workers.iter_mut().collect();
        wait_status(
            &url,
            &q,
            "the fast jobs completed",
            Duration::from_secs(30),
            &mut all,
            |s| int(s, "completed") == FAST_JOBS,
        );
    }

    let mut batch = lines(r#"{"hang": true}"#, HANGING);
    batch.extend(lines(r#"{"panic": true}"#, PANICKING));
    let ids = enqueue_lines(&url, &q, &batch, &["--max-retries", "0"]);
    let (hanging, panicking) = ids.split_at(HANGING);

    // With `kill`: the worker running the most jobs, and how many it ran.
    let mut killed: Option<(usize, u64)> = None;
    if kill {
        let (index, active) = wait_for(
            "a worker running 16 jobs",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                let active: Vec<u64> = workers
                    .iter_mut()
                    .map(|w| w.health()["active_jobs"].as_u64().unwrap_or(0))
                    .collect();
                match active.iter().position(|&n| n == 16) {
                    Some(i) => Ok((i, active[i])),
                    None => Err(format!("active jobs per worker: {active:?}")),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // Its slots are full of hanging jobs that run for 2 s: none can end (and no held
        // job can start) between the count and the kill.
        workers[index].signal("KILL");
        workers[index].wait_exit(Duration::from_secs(10));
        killed = Some((index, active));
    }

    let mut alive: Vec<&mut Worker> = workers
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| killed.is_none_or(|(k, _)| k != *i))
        .map(|(_, w)| w)
        .collect();
    let total = FAST_JOBS + (HANGING + PANICKING) as u64;
    let s = wait_status(
        &url,
        &q,
        "every job finished",
        Duration::from_secs(60),
        &mut alive,
        |s| {
            int(s, "ready") + int(s, "scheduled") + int(s, "running") == 0
                && int(s, "completed") + int(s, "dead") == total
        },
    );
    let logs: String = alive.iter().map(|w| w.logs()).collect();
    assert_eq!(int(&s, "completed"), FAST_JOBS, "{s}");
    assert_eq!(
        int(&s, "dead"),
        (HANGING + PANICKING) as u64,
        "nothing lost: {s}"
    );

    let dead = dead_by_id(&url, &q);
    let codes = count_codes(&dead);
    let lease_expired = codes.get("LEASE_EXPIRED").copied().unwrap_or(0);
    let allowed = killed.map_or(0, |(_, active)| active as usize);
    println!("dead letters by code: {codes:?}; jobs the killed worker was running: {allowed}");
    let may = if kill {
        format!("at most {allowed} may (the jobs the killed worker was running)")
    } else {
        "none may".to_owned()
    };
    assert!(
        lease_expired <= allowed,
        "{lease_expired} jobs died of their lease, {may}; dead letters by code: {codes:?}\n{logs}"
    );
    for (set, code) in [(hanging, "JOB_TIMEOUT"), (panicking, "UNEXPECTED_ERROR")] {
        for id in set {
            let Some((got, attempts)) = dead.get(id) else {
                panic!("job {id} is not a dead letter; by code: {codes:?}");
            };
            if got == "LEASE_EXPIRED" && kill {
                continue;
            }
            assert_eq!(
                (got.as_str(), *attempts),
                (code, 1),
                "job {id}; dead letters by code: {codes:?}\n{logs}"
            );
        }
    }
    for w in alive {
        w.stop(Duration::from_secs(20));
    }
}

#[test]
fn hanging_and_panicking_jobs_die_of_their_own_codes_redis() {
    bad_jobs_behind_fast_ones(Backend::Redis, false);
}

#[test]
fn hanging_and_panicking_jobs_die_of_their_own_codes_postgres() {
    bad_jobs_behind_fast_ones(Backend::Postgres, false);
}

#[test]
fn a_sigkilled_worker_loses_only_the_jobs_it_ran_redis() {
    bad_jobs_behind_fast_ones(Backend::Redis, true);
}

#[test]
fn a_sigkilled_worker_loses_only_the_jobs_it_ran_postgres() {
    bad_jobs_behind_fast_ones(Backend::Postgres, true);
}

// ---------------------------------------------------------------------------------------
// SIGTERM with a fetch in flight (issue 13, item 4).
// ---------------------------------------------------------------------------------------

const BACKLOG: usize = 4000;
const ROUNDS: u64 = 10;

/// A backlog of quick jobs (`--max-retries 0`) drained by workers that are SIGTERMed
/// 100 to 300 ms after they are ready, ten times in a row; the lease is 60 s, so a job
/// leased by a fetch whose reply was dropped (or whose hand-back the exit cut short)
/// would stay running. After each exit nothing may be running; in the end a last worker
/// completes the rest and every job ran once, as its first attempt.
fn sigterm_mid_drain(backend: Backend) {
    let url = backend.url();
    let q = queue_name("term");
    let ids = enqueue_lines(
        &url,
        &q,
        &lines(r#"{"quick": true}"#, BACKLOG),
        &["--max-retries", "0"],
    );
    let mut completed = 0;
    for round in 0..ROUNDS {
        // Every other round one slot without prefetching: the worker's fetch is in flight
        // almost all the time, and the drain has next to nothing to wait for before the
        // process exits. The others: four slots, without and with prefetching.
        let (concurrency, prefetch) = match round % 4 {
            0 | 2 => ("1", "0"),
            1 => ("4", "0"),
            _ => ("4", "128"),
        };
        let args = [
            "--queue",
            &q,
            "--flow",
            "exercise",
            "--concurrency",
            concurrency,
            "--prefetch",
            prefetch,
            "--lease",
            "60s",
            "--shutdown-timeout",
            "10s",
        ];
        let mut worker = Worker::start(&url, &args, &[]);
        worker.wait_ready();
        std::thread::sleep(Duration::from_millis(100 + round * 200 / ROUNDS));
        worker.stop(Duration::from_secs(20));
        let s = status(&url, &q);
        assert_eq!(
            int(&s, "running"),
            0,
            "round {round}: jobs leased to a worker that has exited: {s}\n{}",
            worker.logs()
        );
        assert_eq!(int(&s, "dead"), 0, "round {round}: {s}\n{}", worker.logs());
        assert_eq!(
            int(&s, "completed") + int(&s, "ready"),
            BACKLOG as u64,
            "round {round}: nothing lost: {s}"
        );
        completed = int(&s, "completed");
    }
    assert!(
        completed > 0 && completed < BACKLOG as u64,
        "the rounds stopped workers mid-drain ({completed} of {BACKLOG} completed)"
    );

    let mut last = Worker::start(
        &url,
        &["--queue", &q, "--flow", "exercise", "--concurrency", "32"],
        &[],
    );
    let s = wait_until_settled(&url, &q, &mut last, Duration::from_secs(60));
    assert_eq!(int(&s, "completed"), BACKLOG as u64, "{s}");
    assert_eq!(int(&s, "dead"), 0, "{s}");
    last.stop(Duration::from_secs(20));
    for id in ids.iter().step_by(BACKLOG / 50) {
        let j = job(&url, &q, id);
        assert_eq!(j["state"], "completed", "{j}");
        assert_eq!(
            int(&j, "attempts"),
            1,
            "a job handed back at SIGTERM ran once, charged once: {j}"
        );
    }
}

#[test]
fn sigterm_mid_drain_strands_nothing_redis() {
    sigterm_mid_drain(Backend::Redis);
}

#[test]
fn sigterm_mid_drain_strands_nothing_postgres() {
    sigterm_mid_drain(Backend::Postgres);
}

// ---------------------------------------------------------------------------------------
// A frozen backend during the drain (issue 13, item 9).
// ---------------------------------------------------------------------------------------

/// A throwaway server of the test's own, so it can be frozen.
enum OwnServer {
    Redis(RedisServer),
    Postgres(PgServer, String),
}

impl OwnServer {
    fn start(backend: Backend) -> Self {
        match backend {
            Backend::Redis => OwnServer::Redis(
                RedisServer::start()
                    .unwrap_or_else(|e| panic!("cannot start a throwaway redis-server: {e}")),
            ),
            Backend::Postgres => {
                let server = PgServer::start()
                    .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e}"));
                let url = server
                    .create_database("frozen")
                    .unwrap_or_else(|e| panic!("cannot create database frozen: {e}"));
                cli(&["--url", &url, "migrate"]).assert_code(0, "penguiflow-worker migrate");
                OwnServer::Postgres(server, url)
            }
        }
    }

    fn url(&self) -> String {
        match self {
            OwnServer::Redis(s) => s.url(),
            OwnServer::Postgres(_, url) => url.clone(),
        }
    }

    /// The server's processes (for PostgreSQL: the postmaster and its children).
    fn pids(&self) -> Vec<u32> {
        match self {
            OwnServer::Redis(s) => s.pid().into_iter().collect(),
            OwnServer::Postgres(s, _) => s.pids(),
        }
    }

    /// SIGSTOPs every process of the server; the guard SIGCONTs them when dropped.
    fn freeze(&self) -> Frozen<'_> {
        let pids = self.pids();
        assert!(!pids.is_empty(), "the server runs no process");
        // The postmaster first, so it forks no backend after the list was read; then
        // everything it has (a backend may have started in between).
        signal(&pids[..1], "STOP");
        let pids = self.pids();
        signal(&pids, "STOP");
        let frozen = Frozen { server: self };
        for pid in pids {
            wait_for(
                &format!("process {pid} of the server stopped"),
                Duration::from_secs(5),
                Duration::from_millis(10),
                || match process_state(pid) {
                    Some('T') | None => Ok(()),
                    other => Err(format!("state {other:?}")),
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        frozen
    }
}

/// A frozen server: SIGCONT on drop (also when the test fails), before the server is
/// dropped and stopped.
struct Frozen<'a> {
    server: &'a OwnServer,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let pids = self.server.pids();
        let _ = Command::new("kill")
            .arg("-CONT")
            .args(pids.iter().map(u32::to_string))
            .stdin(Stdio::null())
            .status();
    }
}

/// The state letter of process `pid` (`T` when stopped), from `/proc/<pid>/stat`;
/// `None` when it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

fn signal(pids: &[u32], name: &str) {
    let status = Command::new("kill")
        .args(["-s", name])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -s {name} {pids:?} failed");
}

/// Four 30 s jobs running, the server SIGSTOPped, then SIGTERM with
/// `--shutdown-timeout 3s`: heartbeats, hand-backs and everything else the drain asks
/// of the backend get no answer, and the worker must still exit 0 within the shutdown
/// timeout plus a second of grace (and a little for process start-up and exit).
fn frozen_backend(backend: Backend) {
    const SHUTDOWN: Duration = Duration::from_secs(3);
    const GRACE: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(500);
    let server = OwnServer::start(backend);
    let url = server.url();
    let q = queue_name("frozen");
    enqueue_lines(&url, &q, &lines(r#"{"sleep_ms": 30000}"#, 4), &[]);
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
            "3s",
        ],
        &[],
    );
    wait_for(
        "4 active jobs on /health",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let h = worker.health();
            if h["active_jobs"] == 4 {
                Ok(())
            } else {
                Err(h.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()));

    let frozen = server.freeze();
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    worker.signal("TERM");
    // Waits a while past the bound, to tell a late exit from none.
    let wait = SHUTDOWN + GRACE + Duration::from_secs(5);
    let exit = wait_for(
        "the worker to exit",
        wait,
        Duration::from_millis(10),
        || worker.try_exit().ok_or_else(|| "still running".to_owned()),
    );
    let took = signalled.elapsed();
    let Ok(exit) = exit else {
        panic!(
            "the worker still ran {took:?} after SIGTERM with the backend frozen (shutdown \
             timeout {SHUTDOWN:?})\n{}",
            worker.logs()
        );
    };
    println!("exited {took:?} after SIGTERM with the backend frozen");
    assert_eq!(
        exit.code(),
        Some(0),
        "exit code of a drain against a frozen backend\n{}",
        worker.logs()
    );
    assert!(
        took <= SHUTDOWN + GRACE + SLACK,
        "the worker exited {took:?} after SIGTERM with the backend frozen (shutdown timeout \
         {SHUTDOWN:?})\n{}",
        worker.logs()
    );
    drop(frozen);

    // Nothing lost: the jobs are still there (running until their leases run out, or
    // handed back).
    let s = status(&url, &q);
    assert_eq!(
        int(&s, "ready") + int(&s, "running"),
        4,
        "the 4 jobs are still there after the server thawed: {s}"
    );
}

#[test]
fn a_drain_ends_on_time_with_the_backend_frozen_redis() {
    frozen_backend(Backend::Redis);
}

#[test]
fn a_drain_ends_on_time_with_the_backend_frozen_postgres() {
    frozen_backend(Backend::Postgres);
}
