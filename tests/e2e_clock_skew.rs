//! `enqueue --delay` from a producer whose clock is five minutes slow, against Redis and
//! PostgreSQL: the delay is measured by the server's clock, so a job delayed 30 s is
//! scheduled, due 30 s after the server stored it, not ready at once (one job, and a
//! `--file` of 40). The producer runs under libfaketime (Debian: `apt-get install
//! faketime`); the checks run with the machine's clock.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::{Backend, cli_env, int, job, queue_name, scratch_file, status};
use serde_json::Value;
use test_support::clock::shifted_clock_env;

/// How far the producer's clock runs behind.
const BEHIND_S: i64 = 300;

fn slow_clock() -> Vec<(String, String)> {
    shifted_clock_env(-BEHIND_S)
        .unwrap_or_else(|e| panic!("this test runs a producer with a slow clock: {e}"))
}

fn epoch_ms(v: &Value, field: &str) -> i64 {
    let text = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"));
    let t = humantime::parse_rfc3339(text)
        .unwrap_or_else(|e| panic!("{field} {text:?} is not RFC 3339: {e}"));
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds between the time in a UUIDv7 and now.
fn id_age_ms(id: &str) -> i64 {
    let id: uuid::Uuid = id.parse().unwrap_or_else(|e| panic!("{id:?}: {e}"));
    let (secs, nanos) = id
        .get_timestamp()
        .unwrap_or_else(|| panic!("{id} is not a UUIDv7"))
        .to_unix();
    let made = Duration::new(secs, nanos);
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(0) - i64::try_from(made.as_millis()).unwrap_or(0)
}

fn assert_scheduled_30s(url: &str, queue: &str, id: &str, what: &str) {
    let j = job(url, queue, id);
    assert_eq!(
        j["state"], "scheduled",
        "{what}: a job delayed 30 s by a producer 5 min slow must wait: {j}"
    );
    let waits = epoch_ms(&j, "run_at") - epoch_ms(&j, "created_at");
    assert_eq!(
        waits, 30_000,
        "{what}: due 30 s after the server stored it: {j}"
    );
}

fn delay_from_a_slow_producer(backend: Backend) {
    let url = backend.url();
    let queue = queue_name("skew");
    let env = slow_clock();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let out = cli_env(
        &[
            "--url",
            &url,
            "enqueue",
            "--queue",
            &queue,
            "--delay",
            "30s",
            r#"{"n": 0}"#,
        ],
        &env,
    );
    out.assert_code(0, "enqueue --delay under a slow clock");
    let id = out.stdout.trim().to_owned();
    // The producer's clock really was slow: its id carries its time.
    let age = id_age_ms(&id);
    assert!(
        (BEHIND_S * 1000 - 20_000..=BEHIND_S * 1000 + 20_000).contains(&age),
        "the producer's clock should be {BEHIND_S} s behind; its id is {age} ms old"
    );
    assert_scheduled_30s(&url, &queue, &id, "enqueue --delay");

    let path = scratch_file("skew.jsonl");
    let lines: Vec<String> = (1..=40).map(|n| format!(r#"{{"n": {n}}}"#)).collect();
    std::fs::write(&path, lines.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let path_text = path.display().to_string();
    let out = cli_env(
        &[
            "--url", &url, "enqueue", "--queue", &queue, "--delay", "30s", "--file", &path_text,
        ],
        &env,
    );
    let _ = std::fs::remove_file(&path);
    out.assert_code(0, "enqueue --delay --file under a slow clock");
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids.len(), 40, "{}", out.describe());
    for id in [ids[0], ids[39]] {
        assert_scheduled_30s(&url, &queue, id, "enqueue --delay --file");
    }
    let s = status(&url, &queue);
    assert_eq!(
        (int(&s, "ready"), int(&s, "scheduled")),
        (0, 41),
        "every delayed job waits: {s}"
    );
}

#[test]
fn redis_delay_from_a_slow_producer_waits_by_the_server_clock() {
    delay_from_a_slow_producer(Backend::Redis);
}

#[test]
fn postgres_delay_from_a_slow_producer_waits_by_the_server_clock() {
    delay_from_a_slow_producer(Backend::Postgres);
}
