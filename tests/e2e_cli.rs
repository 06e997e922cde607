//! End-to-end: the real `penguiflow-worker` binary against throwaway Redis and
//! PostgreSQL servers (started by this test process; never the machine's shared ones).
//!
//! A mixed batch goes in through `enqueue --file`, a `run` child works it off, and the
//! outcome is read back through `status`, `job` and `dlq` exactly as an operator would;
//! then the dead letters are requeued, worked again and purged. Also: exit codes and
//! one-line errors for bad usage, unknown jobs and unreachable backends.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    Backend, Kind, MIXED_RUN_ARGS, Worker, attempts, cli, cli_env, closed_port, dead_code,
    dead_letters, enqueue_lines, enqueue_mixed_batch, expected, int, job, queue_name, status,
    wait_until_settled,
};
use serde_json::{Value, json};

/// Generous bound for working off the batch (the hang job alone takes the 1 s timeout).
const SETTLE: Duration = Duration::from_secs(40);

/// Starts a worker on `queue` with the mixed-batch flags, waits until nothing is ready,
/// scheduled or running, then stops it with SIGTERM (exit 0). Returns the final status.
fn work_off(url: &str, queue: &str) -> Value {
    let mut args = vec!["--queue", queue];
    args.extend_from_slice(MIXED_RUN_ARGS);
    let mut worker = Worker::start(url, &args, &[]);
    worker.health_addr();
    let settled = wait_until_settled(url, queue, &mut worker, SETTLE);
    worker.stop(Duration::from_secs(20));
    settled
}

fn assert_status(s: &Value, queue: &str, want: &[(&str, u64)]) {
    assert_eq!(s["queue"], queue, "status of the wrong queue: {s}");
    for (field, n) in want {
        assert_eq!(int(s, field), *n, "status field {field}: {s}");
    }
}

fn mixed_batch(backend: Backend) {
    let url = backend.url();
    let q = queue_name("mixed");
    let jobs = enqueue_mixed_batch(&url, &q);
    let exp = expected();
    let total = jobs.len() as u64;
    assert_status(
        &status(&url, &q),
        &q,
        &[("ready", total), ("completed", 0), ("dead", 0)],
    );

    // Work it off with a real worker; SIGTERM once settled must exit 0.
    let s = work_off(&url, &q);
    assert_status(
        &s,
        &q,
        &[
            ("ready", 0),
            ("scheduled", 0),
            ("running", 0),
            ("completed", exp.completed),
            ("dead", exp.dead),
        ],
    );
    assert_eq!(s["paused"], false, "{s}");
    assert_eq!(exp.completed + exp.dead, total, "none lost");

    // Dead letters: one per dead job, with its code, attempts and payload, newest first.
    let dead = dead_letters(&url, &q);
    assert_eq!(dead.len() as u64, exp.dead, "dlq list: {dead:#?}");
    let by_id: BTreeMap<&str, &Value> = dead
        .iter()
        .map(|d| (d["id"].as_str().expect("dead letter id"), d))
        .collect();
    for (kind, payload, id) in &jobs {
        match dead_code(*kind) {
            Some(code) => {
                let d = by_id
                    .get(id.as_str())
                    .unwrap_or_else(|| panic!("{kind:?} job {id} not in the dlq: {dead:#?}"));
                assert_eq!(d["code"], code, "{kind:?}: {d}");
                assert_eq!(
                    int(d, "attempts"),
                    attempts(*kind),
                    "{kind:?} attempts: {d}"
                );
                let want: Value = serde_json::from_str(payload).expect("batch payloads are JSON");
                assert_eq!(d["payload"], want, "{kind:?} payload: {d}");
                assert_eq!(d["tenant"], "default", "{d}");
                assert!(
                    d["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{kind:?} message: {d}"
                );
            }
            None => assert!(
                !by_id.contains_key(id.as_str()),
                "{kind:?} job {id} is in the dlq"
            ),
        }
    }
    let mut by_code: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &dead {
        *by_code
            .entry(d["code"].as_str().expect("code"))
            .or_default() += 1;
    }
    assert_eq!(by_code, exp.dead_by_code, "dead letters by code");
    let failed_at: Vec<&str> = dead
        .iter()
        .map(|d| d["failed_at"].as_str().expect("failed_at"))
        .collect();
    assert!(
        failed_at.windows(2).all(|w| w[0] >= w[1]),
        "dlq list is not newest first: {failed_at:?}"
    );

    // `job --json` for one of each kind.
    let first = |kind: Kind| -> &(Kind, &str, String) {
        jobs.iter()
            .find(|(k, _, _)| *k == kind)
            .expect("the batch holds every kind")
    };
    for kind in [
        Kind::Success,
        Kind::FailOnce,
        Kind::AlwaysFail,
        Kind::Invalid,
        Kind::Panic,
        Kind::Hang,
    ] {
        let (_, payload, id) = first(kind);
        let j = job(&url, &q, id);
        let payload: Value = serde_json::from_str(payload).expect("batch payloads are JSON");
        assert_eq!(j["id"], id.as_str(), "{j}");
        assert_eq!(j["queue"], q.as_str(), "{j}");
        assert_eq!(
            int(&j, "attempts"),
            attempts(kind),
            "{kind:?} attempts: {j}"
        );
        assert_eq!(int(&j, "max_retries"), 1, "{j}");
        assert_eq!(j["tenant"], "default", "{j}");
        assert_eq!(j["payload"], payload, "{j}");
        assert!(j["finished_at"].is_string(), "{kind:?} finished_at: {j}");
        match dead_code(kind) {
            None => {
                assert_eq!(j["state"], "completed", "{kind:?}: {j}");
                assert_eq!(
                    j["result"],
                    json!({"ok": true, "attempt": attempts(kind), "payload": payload}),
                    "{kind:?} result"
                );
            }
            Some(code) => {
                assert_eq!(j["state"], "dead", "{kind:?}: {j}");
                assert_eq!(j["error"]["code"], code, "{kind:?}: {j}");
                assert!(j.get("result").is_none(), "{kind:?} has a result: {j}");
            }
        }
    }

    // Requeue one dead letter by id, then the rest with --all: ready again, attempts reset.
    let (_, _, invalid_id) = first(Kind::Invalid);
    let out = cli(&[
        "--url", &url, "dlq", "requeue", "--queue", &q, invalid_id, "--json",
    ]);
    assert_eq!(out.json(), json!({"requeued": 1}), "{}", out.describe());
    assert_status(
        &status(&url, &q),
        &q,
        &[
            ("ready", 1),
            ("dead", exp.dead - 1),
            ("completed", exp.completed),
        ],
    );
    let j = job(&url, &q, invalid_id);
    assert_eq!(j["state"], "ready", "{j}");
    assert_eq!(int(&j, "attempts"), 0, "attempts reset: {j}");

    let out = cli(&["--url", &url, "dlq", "requeue", "--queue", &q, "--all"]);
    out.assert_code(0, "dlq requeue --all");
    assert_eq!(out.stdout.trim(), format!("requeued {}", exp.dead - 1));
    assert_status(
        &status(&url, &q),
        &q,
        &[
            ("ready", exp.dead),
            ("dead", 0),
            ("completed", exp.completed),
        ],
    );
    assert!(
        dead_letters(&url, &q).is_empty(),
        "the dlq is empty after requeue --all"
    );

    // Worked again, they die again with the same codes and attempts counted from zero.
    let s = work_off(&url, &q);
    assert_status(&s, &q, &[("completed", exp.completed), ("dead", exp.dead)]);
    let again = dead_letters(&url, &q);
    assert_eq!(again.len() as u64, exp.dead, "{again:#?}");
    for d in &again {
        let id = d["id"].as_str().expect("id");
        let (kind, _, _) = jobs
            .iter()
            .find(|(_, _, i)| i == id)
            .unwrap_or_else(|| panic!("unknown dead letter {d}"));
        assert_eq!(d["code"], dead_code(*kind).expect("a dead kind"), "{d}");
        assert_eq!(
            int(d, "attempts"),
            attempts(*kind),
            "attempts reset by requeue: {d}"
        );
    }

    // Purge empties the set.
    let out = cli(&[
        "--url", &url, "dlq", "purge", "--queue", &q, "--all", "--json",
    ]);
    assert_eq!(
        out.json(),
        json!({"purged": exp.dead}),
        "{}",
        out.describe()
    );
    assert_status(
        &status(&url, &q),
        &q,
        &[("ready", 0), ("dead", 0), ("completed", exp.completed)],
    );
    assert!(
        dead_letters(&url, &q).is_empty(),
        "the dlq is empty after purge"
    );
}

#[test]
fn mixed_batch_redis() {
    mixed_batch(Backend::Redis);
}

#[test]
fn mixed_batch_postgres() {
    mixed_batch(Backend::Postgres);
}

/// A malformed line in `--file`: exit 2, the line number on stderr, nothing enqueued.
fn malformed_file_line(backend: Backend) {
    let url = backend.url();
    let q = queue_name("malformed");
    let path = common::scratch_file("malformed.jsonl");
    std::fs::write(&path, "{\"n\": 1}\n\n{\"n\": 2}\n{\"n\": \n{\"n\": 4}\n")
        .expect("write the file");
    let out = cli(&[
        "--url",
        &url,
        "enqueue",
        "--queue",
        &q,
        "--file",
        &path.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&path);
    out.assert_code(2, "enqueue --file with a malformed line");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one stderr line\n{}", out.describe());
    assert!(
        lines[0].starts_with("penguiflow-worker: error:") && lines[0].contains("line 4"),
        "stderr names line 4\n{}",
        out.describe()
    );
    assert!(
        out.stdout.trim().is_empty(),
        "no ids printed\n{}",
        out.describe()
    );
    let s = status(&url, &q);
    assert_status(
        &s,
        &q,
        &[
            ("ready", 0),
            ("scheduled", 0),
            ("running", 0),
            ("completed", 0),
            ("dead", 0),
        ],
    );

    // The same lines without the bad one go in whole.
    let ids = enqueue_lines(&url, &q, &["{\"n\": 1}", "{\"n\": 2}"], &[]);
    assert_eq!(ids.len(), 2);
    assert_status(&status(&url, &q), &q, &[("ready", 2)]);
}

#[test]
fn malformed_file_line_enqueues_nothing_redis() {
    malformed_file_line(Backend::Redis);
}

#[test]
fn malformed_file_line_enqueues_nothing_postgres() {
    malformed_file_line(Backend::Postgres);
}

/// Asserts exit code `code` and exactly one stderr line starting with the prefix.
fn assert_one_line_error(out: &common::Output, code: i32, what: &str) -> String {
    out.assert_code(code, what);
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "{what}: one stderr line\n{}",
        out.describe()
    );
    assert!(
        lines[0].starts_with("penguiflow-worker: error: "),
        "{what}: the line starts with the prefix\n{}",
        out.describe()
    );
    lines[0].to_owned()
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    // No server is needed: usage is checked before connecting (the URL is unreachable).
    let url = format!("redis://127.0.0.1:{}", closed_port());

    let out = cli(&["--url", &url, "status", "--queue", "q", "--bogus-flag"]);
    let line = assert_one_line_error(&out, 2, "unknown flag");
    assert!(line.contains("--bogus-flag"), "{line}");

    let out = cli(&["--url", &url, "status", "--queue", "no spaces allowed"]);
    let line = assert_one_line_error(&out, 2, "invalid queue name");
    assert!(line.contains("queue name"), "{line}");

    let out = cli(&["--url", &url, "enqueue", "--queue", "q", "{not json"]);
    assert_one_line_error(&out, 2, "malformed PAYLOAD_JSON");

    let out = cli(&[
        "--url", &url, "enqueue", "--queue", "q", "--header", "novalue", "{}",
    ]);
    let line = assert_one_line_error(&out, 2, "malformed --header");
    assert!(line.contains("KEY=VALUE"), "{line}");

    let out = cli(&["--url", &url, "job", "--queue", "q", "not-a-uuid"]);
    assert_one_line_error(&out, 2, "job id that is not a UUID");

    let out = cli_env(
        &["--url", &url, "run", "--queue", "q", "--flow", "exercise"],
        &[("WORKER_CONCURRENCY", "abc")],
    );
    let line = assert_one_line_error(&out, 2, "WORKER_CONCURRENCY=abc");
    assert!(
        line.contains("WORKER_CONCURRENCY"),
        "names the variable: {line}"
    );

    let out = cli_env(
        &["--url", &url, "run", "--queue", "q", "--flow", "exercise"],
        &[("JOB_TIMEOUT_S", "soon")],
    );
    let line = assert_one_line_error(&out, 2, "JOB_TIMEOUT_S=soon");
    assert!(line.contains("JOB_TIMEOUT_S"), "names the variable: {line}");

    let out = cli(&[
        "--url",
        &url,
        "run",
        "--queue",
        "q",
        "--flow",
        "no-such-flow",
    ]);
    let line = assert_one_line_error(&out, 2, "unknown flow");
    assert!(line.contains("no-such-flow"), "{line}");

    let out = cli(&["--url", "ftp://example/x", "status", "--queue", "q"]);
    assert_one_line_error(&out, 2, "unknown URL scheme");
}

fn unknown_job(backend: Backend) {
    let url = backend.url();
    let q = queue_name("unknown");
    let id = "01a216cb-e50d-7204-b3c7-000000000000";
    let out = cli(&["--url", &url, "job", "--queue", &q, id, "--json"]);
    let line = assert_one_line_error(&out, 1, "unknown job id");
    assert!(line.contains(id) && line.contains("not found"), "{line}");
    assert!(out.stdout.is_empty(), "{}", out.describe());

    let out = cli(&["--url", &url, "dlq", "requeue", "--queue", &q, id]);
    assert_one_line_error(&out, 1, "dlq requeue of an unknown job id");
}

#[test]
fn unknown_job_id_exits_1_redis() {
    unknown_job(Backend::Redis);
}

#[test]
fn unknown_job_id_exits_1_postgres() {
    unknown_job(Backend::Postgres);
}

#[test]
fn unreachable_backend_exits_1_with_one_line_and_no_password() {
    let port = closed_port();
    // (URL, bound on the time to fail). PostgreSQL's pool keeps retrying a refused
    // connection until its acquire timeout (5 s), so it gets a wider bound.
    let cases = [
        (
            format!("redis://:SECRETPW@127.0.0.1:{port}"),
            Duration::from_secs(5),
        ),
        (
            format!("postgres://u:SECRETPW@127.0.0.1:{port}/x"),
            Duration::from_secs(15),
        ),
    ];
    for (url, bound) in &cases {
        let commands = if url.starts_with("redis") {
            vec![
                vec!["--url", url.as_str(), "status", "--queue", "q", "--json"],
                vec!["--url", url.as_str(), "enqueue", "--queue", "q", "{}"],
            ]
        } else {
            vec![vec![
                "--url",
                url.as_str(),
                "status",
                "--queue",
                "q",
                "--json",
            ]]
        };
        for args in commands {
            let out = cli(&args);
            let line = assert_one_line_error(&out, 1, "unreachable backend");
            assert!(
                !out.stderr.contains("SECRETPW") && !out.stdout.contains("SECRETPW"),
                "the password leaked\n{}",
                out.describe()
            );
            assert!(
                line.contains(&format!("127.0.0.1:{port}")),
                "names the server: {line}"
            );
            assert!(
                out.elapsed < *bound,
                "took {:?} (bound {bound:?})\n{}",
                out.elapsed,
                out.describe()
            );
        }
    }
}
