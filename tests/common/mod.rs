//! Helpers of the end-to-end tests: throwaway servers, running the real
//! `penguiflow-worker` binary (one-shot commands and long-running workers), a small
//! HTTP client, the mixed job batch, and a strict Prometheus text-format parser.
//!
//! Every wait here is bounded; a worker child is killed when its guard is dropped.
//!
//! `PENGUIFLOW_WORKER_BIN`, when set, names another `penguiflow-worker` binary for
//! [`cli`] and [`Worker::start`] to run instead of the one cargo built (for instance a
//! build of an earlier commit, to see a test fail on the defect it covers).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::postgres::PgServer;
use test_support::redis::RedisServer;

/// The binary under test, built by cargo before the tests run.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_penguiflow-worker");

/// The binary [`cli`] and [`Worker::start`] run: `PENGUIFLOW_WORKER_BIN` when set and
/// not empty, else [`BIN`].
pub(crate) fn bin() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var("PENGUIFLOW_WORKER_BIN") {
        Ok(path) if !path.is_empty() => path,
        _ => BIN.to_owned(),
    })
}

/// How long a one-shot command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Throwaway servers: one of each per test process, started on first use.
// ---------------------------------------------------------------------------------------

/// The two backends every scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Redis,
    Postgres,
}

impl Backend {
    /// The URL of this process's throwaway server (started on first use; PostgreSQL
    /// migrated by `penguiflow-worker migrate`).
    pub(crate) fn url(self) -> String {
        match self {
            Backend::Redis => redis_url(),
            Backend::Postgres => postgres_url(),
        }
    }
}

/// A throwaway `redis-server` kept for the whole test process (its watchdog stops it
/// when the process exits).
pub(crate) fn redis_url() -> String {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            RedisServer::start()
                .unwrap_or_else(|e| panic!("cannot start a throwaway redis-server: {e}"))
        })
        .url()
}

/// A throwaway PostgreSQL server kept for the whole test process, with a database
/// `e2e` migrated through the command (`penguiflow-worker migrate`).
pub(crate) fn postgres_url() -> String {
    static SERVER: OnceLock<(PgServer, String)> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let server = PgServer::start()
                .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL server: {e}"));
            let url = server
                .create_database("e2e")
                .unwrap_or_else(|e| panic!("cannot create database e2e: {e}"));
            let out = cli(&["--url", &url, "migrate"]);
            out.assert_code(0, "penguiflow-worker migrate");
            // Twice: migrate is idempotent.
            cli(&["--url", &url, "migrate"]).assert_code(0, "penguiflow-worker migrate (again)");
            (server, url)
        })
        .1
        .clone()
}

/// A queue name of this test's own: `prefix-<pid>-<n>`.
pub(crate) fn queue_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh path in the system temporary directory, for a job file or a child's output:
/// `penguiflow-e2e-<pid>-<n>-<name>`. Whoever creates the file removes it.
pub(crate) fn scratch_file(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "penguiflow-e2e-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A loopback port nothing listens on (bound a moment ago, then released).
pub(crate) fn closed_port() -> u16 {
    test_support::common::free_port().unwrap_or_else(|e| panic!("no free port: {e}"))
}

// ---------------------------------------------------------------------------------------
// Running the binary.
// ---------------------------------------------------------------------------------------

/// Environment variables the binary reads; removed from every child so the tests do
/// not depend on the caller's environment (CI exports REDIS_URL and DATABASE_URL).
fn hermetic(cmd: &mut Command) {
    const NAMES: &[&str] = &[
        "QUEUE_URL",
        "REDIS_URL",
        "DATABASE_URL",
        "JOB_TIMEOUT_S",
        "LEASE_S",
        "SHUTDOWN_TIMEOUT_S",
        "HEALTH_ADDR",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "RETRY_BASE_S",
        "RETRY_CAP_S",
        "RUST_LOG",
    ];
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if NAMES.contains(&k) || k.starts_with("WORKER_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
}

/// What a finished one-shot command did.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) args: Vec<String>,
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) elapsed: Duration,
}

impl Output {
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing everything, unless the exit code is `code`.
    pub(crate) fn assert_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "{what}: expected exit code {code}\n{}",
            self.describe()
        );
        self
    }

    /// stdout parsed as JSON, after checking the command succeeded.
    pub(crate) fn json(&self) -> Value {
        self.assert_code(0, "command");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.describe()))
    }

    /// The non-empty lines of stderr.
    pub(crate) fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "$ penguiflow-worker {}\nexit: {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs the binary with `args` to completion (bounded), stdin null.
pub(crate) fn cli(args: &[&str]) -> Output {
    cli_env(args, &[])
}

/// Runs the binary with `args` and extra environment variables.
pub(crate) fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out_path = scratch_file("cli.stdout");
    let err_path = scratch_file("cli.stderr");
    let mut cmd = Command::new(bin());
    hermetic(&mut cmd);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdout(file(&out_path))
        .stderr(file(&err_path));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin()));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "penguiflow-worker {} did not finish within {COMMAND_TIMEOUT:?}\n--- stderr ---\n{}",
                    args.join(" "),
                    read(&err_path)
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("cannot wait for penguiflow-worker: {e}"),
        }
    };
    let elapsed = started.elapsed();
    let out = Output {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed,
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    out
}

fn file(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `status --queue Q --json`.
pub(crate) fn status(url: &str, queue: &str) -> Value {
    cli(&["--url", url, "status", "--queue", queue, "--json"]).json()
}

/// `job --queue Q ID --json`.
pub(crate) fn job(url: &str, queue: &str, id: &str) -> Value {
    cli(&["--url", url, "job", "--queue", queue, id, "--json"]).json()
}

/// `dlq list --queue Q --json --limit 100`.
pub(crate) fn dead_letters(url: &str, queue: &str) -> Vec<Value> {
    match cli(&[
        "--url", url, "dlq", "list", "--queue", queue, "--json", "--limit", "100",
    ])
    .json()
    {
        Value::Array(items) => items,
        other => panic!("dlq list --json is not an array: {other}"),
    }
}

/// An integer field of a JSON object, or a panic naming it.
pub(crate) fn int(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a non-negative integer in {v}"))
}

/// Enqueues one job per line of `lines` with `enqueue --file` and `extra` flags;
/// returns the ids, in line order.
pub(crate) fn enqueue_lines(url: &str, queue: &str, lines: &[&str], extra: &[&str]) -> Vec<String> {
    let path = scratch_file("jobs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let path_text = path.display().to_string();
    let mut args = vec![
        "--url", url, "enqueue", "--queue", queue, "--file", &path_text,
    ];
    args.extend_from_slice(extra);
    let out = cli(&args);
    let _ = std::fs::remove_file(&path);
    out.assert_code(0, "enqueue --file");
    let ids: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    assert_eq!(
        ids.len(),
        lines.len(),
        "one id per line\n{}",
        out.describe()
    );
    ids
}

/// Waits until `status --json` shows no ready, scheduled or running job; returns it.
pub(crate) fn wait_until_settled(
    url: &str,
    queue: &str,
    worker: &mut Worker,
    timeout: Duration,
) -> Value {
    let started = Instant::now();
    loop {
        let s = status(url, queue);
        if int(&s, "ready") + int(&s, "scheduled") + int(&s, "running") == 0 {
            return s;
        }
        if let Some(code) = worker.try_exit() {
            panic!(
                "the worker exited early ({code:?}) with {s}\n{}",
                worker.logs()
            );
        }
        if started.elapsed() > timeout {
            panic!(
                "queue {queue} did not settle within {timeout:?}: {s}\n{}",
                worker.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// A long-running worker child.
// ---------------------------------------------------------------------------------------

/// `penguiflow-worker run ...` as a child process with stdout and stderr in files.
/// Dropping it kills the process if it still runs.
#[derive(Debug)]
pub(crate) struct Worker {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: Option<ExitStatus>,
    health: Option<SocketAddr>,
}

impl Worker {
    /// Starts `penguiflow-worker --url URL run ARGS --log-format json --log-level info
    /// --health-addr 127.0.0.1:0` (the kernel picks the port, which the worker logs in
    /// its "worker started" line, so no port can be taken in between).
    pub(crate) fn start(url: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let stdout = scratch_file("worker.stdout");
        let stderr = scratch_file("worker.stderr");
        let mut cmd = Command::new(bin());
        hermetic(&mut cmd);
        cmd.args(["--url", url, "run"])
            .args(args)
            .args(["--log-format", "json", "--log-level", "info"])
            .args(["--health-addr", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdout(file(&stdout))
            .stderr(file(&stderr));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} run: {e}", bin()));
        Self {
            child,
            stdout,
            stderr,
            exit: None,
            health: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker's stdout and stderr, for failure messages.
    pub(crate) fn logs(&self) -> String {
        format!(
            "--- worker {} stdout ---\n{}\n--- worker stderr ---\n{}",
            self.child.id(),
            read(&self.stdout),
            read(&self.stderr)
        )
    }

    /// The exit status if the process has ended.
    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// The address of its health server, read from its "worker started" log line
    /// (waits up to 30 s for start-up).
    pub(crate) fn health_addr(&mut self) -> SocketAddr {
        if let Some(addr) = self.health {
            return addr;
        }
        let started = Instant::now();
        loop {
            for line in read(&self.stderr).lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v["message"] == "worker started"
                    && let Some(addr) = v["health_addr"].as_str()
                {
                    let addr: SocketAddr = addr
                        .parse()
                        .unwrap_or_else(|e| panic!("bad health_addr {addr:?}: {e}"));
                    self.health = Some(addr);
                    return addr;
                }
            }
            if let Some(status) = self.try_exit() {
                panic!("the worker exited at start-up ({status})\n{}", self.logs());
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!(
                    "the worker did not log \"worker started\" within 30 s\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on its health server.
    pub(crate) fn get(&mut self, path: &str) -> HttpResponse {
        let addr = self.health_addr();
        http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()))
    }

    /// `GET /health` as JSON.
    pub(crate) fn health(&mut self) -> Value {
        let r = self.get("/health");
        assert_eq!(r.status, 200, "/health status\n{}", r.body);
        serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {}", r.body))
    }

    /// Waits (up to 30 s) until `/health/ready` answers 200: started, and its first
    /// backend stats request succeeded.
    pub(crate) fn wait_ready(&mut self) {
        let addr = self.health_addr();
        wait_for(
            "/health/ready 200",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let r = http_get(addr, "/health/ready")?;
                if r.status == 200 {
                    Ok(())
                } else {
                    Err(format!("{} {}", r.status, r.body))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with kill(1).
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(
            status.success(),
            "kill -s {name} {} failed",
            self.child.id()
        );
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return status.code();
            }
            if started.elapsed() > timeout {
                panic!(
                    "the worker did not exit within {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit with code 0.
    pub(crate) fn stop(&mut self, timeout: Duration) {
        self.signal("TERM");
        let code = self.wait_exit(timeout);
        assert_eq!(code, Some(0), "exit code after SIGTERM\n{}", self.logs());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test has already shown the logs in its panic message.
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Polls `f` every `every` until it returns `Ok`; after `timeout`, an error naming
/// `what` and what `f` last reported.
pub(crate) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let started = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) if started.elapsed() > timeout => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last: {last}"
                ));
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A small HTTP/1.1 client over a raw TCP stream.
// ---------------------------------------------------------------------------------------

/// Status, headers (lower-case names) and body of one response.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: String,
}

/// `GET path` with `Connection: close`, 5 s timeouts.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let timeout = Duration::from_secs(5);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("response is not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| "bad chunk header".to_owned())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or_else(|| "short chunk".to_owned())?;
        out.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| "chunk not followed by CRLF".to_owned())?;
    }
}

// ---------------------------------------------------------------------------------------
// The mixed batch of the `exercise` flow.
// ---------------------------------------------------------------------------------------

/// What a job of the mixed batch does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Success,
    FailOnce,
    AlwaysFail,
    Invalid,
    Panic,
    Hang,
}

/// The batch, one payload per line, enqueued with `--max-retries 1`.
pub(crate) const MIXED_BATCH: &[(Kind, &str)] = &[
    (Kind::Success, "{}"),
    (Kind::Success, r#"{"n": 1}"#),
    (Kind::FailOnce, r#"{"fail_times": 1}"#),
    (Kind::AlwaysFail, r#"{"fail": true}"#),
    (Kind::Invalid, r#""text""#),
    (Kind::Success, r#"{"n": 2}"#),
    (Kind::Invalid, "[1,2]"),
    (Kind::Panic, r#"{"panic": true}"#),
    (Kind::FailOnce, r#"{"fail_times": 1, "n": 3}"#),
    (Kind::Hang, r#"{"hang": true}"#),
    (Kind::Success, r#"{"n": 4}"#),
];

/// The flags of the worker that runs the batch.
pub(crate) const MIXED_RUN_ARGS: &[&str] = &[
    "--flow",
    "exercise",
    "--job-timeout",
    "1s",
    "--retry-base",
    "0.05",
    "--retry-cap",
    "0.2",
];

/// What the batch must come to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) completed: u64,
    pub(crate) dead: u64,
    /// Attempts that reached an outcome.
    pub(crate) processed: u64,
    pub(crate) succeeded: u64,
    /// Failed attempts scheduled again (all NODE_EXCEPTION).
    pub(crate) retried: u64,
    pub(crate) timeouts: u64,
    /// Dead letters by code.
    pub(crate) dead_by_code: BTreeMap<&'static str, u64>,
}

/// The dead-letter code a kind ends with, if it ends dead.
pub(crate) fn dead_code(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Success | Kind::FailOnce => None,
        Kind::AlwaysFail => Some("NODE_EXCEPTION"),
        Kind::Invalid => Some("INVALID_PAYLOAD"),
        Kind::Panic => Some("UNEXPECTED_ERROR"),
        Kind::Hang => Some("JOB_TIMEOUT"),
    }
}

/// Attempts a kind takes with `--max-retries 1` (only NODE_EXCEPTION is retried).
pub(crate) fn attempts(kind: Kind) -> u64 {
    match kind {
        Kind::FailOnce | Kind::AlwaysFail => 2,
        _ => 1,
    }
}

/// The expected outcome of [`MIXED_BATCH`], derived from the kinds.
pub(crate) fn expected() -> Expected {
    let mut e = Expected {
        completed: 0,
        dead: 0,
        processed: 0,
        succeeded: 0,
        retried: 0,
        timeouts: 0,
        dead_by_code: BTreeMap::new(),
    };
    for (kind, _) in MIXED_BATCH {
        e.processed += attempts(*kind);
        e.retried += attempts(*kind) - 1;
        match dead_code(*kind) {
            Some(code) => {
                e.dead += 1;
                *e.dead_by_code.entry(code).or_default() += 1;
            }
            None => {
                e.completed += 1;
                e.succeeded += 1;
            }
        }
        if *kind == Kind::Hang {
            e.timeouts += 1;
        }
    }
    e
}

/// Enqueues [`MIXED_BATCH`] with `--max-retries 1`; returns `(kind, payload, id)`.
pub(crate) fn enqueue_mixed_batch(url: &str, queue: &str) -> Vec<(Kind, &'static str, String)> {
    let lines: Vec<&str> = MIXED_BATCH.iter().map(|(_, l)| *l).collect();
    let ids = enqueue_lines(url, queue, &lines, &["--max-retries", "1"]);
    MIXED_BATCH
        .iter()
        .zip(ids)
        .map(|((k, l), id)| (*k, *l, id))
        .collect()
}

// The strict Prometheus text-format parser lives in prometheus.rs (shared by path
// with worker-runtime's observability tests).
pub(crate) mod prometheus;

/// Runs the text through Python's `prometheus_client.parser.text_string_to_metric_families`.
/// `None` (with the reason printed) when python3 or the package is missing.
pub(crate) fn python_parse(text: &str) -> Option<Result<usize, String>> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
n = 0
for fam in text_string_to_metric_families(sys.stdin.read()):
    n += len(fam.samples)
print(n)
"#;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    match Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "skipped the prometheus_client check: the package is not importable by {python} ({})",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
            );
            return None;
        }
        Err(e) => {
            println!("skipped the prometheus_client check: {python} is not runnable ({e})");
            return None;
        }
    }
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    {
        let mut stdin = child.stdin.take().expect("python stdin is piped");
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to {python}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {python}: {e}"));
    Some(if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .map_err(|e| format!("unexpected output from the parser: {e}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}
