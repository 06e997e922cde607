//! `cargo xtask chaos`: three worker processes of the real `penguiflow-worker` binary
//! drain a mixed batch while faults are injected round after round (SIGKILL and restart
//! of a worker, every server-side client connection killed, a server restart), then the
//! tool counts: jobs enqueued, completed, dead, lost, outcomes recorded twice, executions
//! per job, and the time to recover after each fault. It exits non-zero when a job is
//! lost or an outcome was recorded twice.
//!
//! Executions are counted from the `exercise` flow's execution log
//! (`PENGUIFLOW_EXECUTION_LOG`), outside the queue; recorded outcomes from the workers'
//! JSON logs (`job_succeeded`, `job_dead`, `job_cancelled`, written after the backend
//! accepted the outcome).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use test_support::common::{free_port, temp_dir};
use test_support::postgres::PgServer;
use test_support::redis::{RedisServer, ServerConfig};

const QUEUE: &str = "chaos";
const WORKERS: usize = 3;

/// Options of one chaos run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChaosArgs {
    /// Backends to torture.
    pub(crate) backends: Vec<String>,
    /// Rounds of the three faults.
    pub(crate) rounds: usize,
    /// One round, a smaller batch.
    pub(crate) quick: bool,
}

/// Parses `[--backend redis|postgres|all] [--rounds N] [--quick]`.
pub(crate) fn parse(args: &[String]) -> Result<ChaosArgs, String> {
    let mut out = ChaosArgs {
        backends: vec!["redis".into(), "postgres".into()],
        rounds: 3,
        quick: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => {
                let v = it.next().ok_or("--backend needs a value")?;
                out.backends = match v.as_str() {
                    "all" => vec!["redis".into(), "postgres".into()],
                    "redis" | "postgres" => vec![v.clone()],
                    other => {
                        return Err(format!("unknown backend `{other}` (redis, postgres, all)"));
                    }
                };
            }
            "--rounds" => {
                out.rounds = it
                    .next()
                    .ok_or("--rounds needs a value")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?;
                if out.rounds == 0 {
                    return Err("--rounds must be positive".into());
                }
            }
            "--quick" => out.quick = true,
            other => return Err(format!("unknown chaos argument `{other}`")),
        }
    }
    if out.quick {
        out.rounds = 1;
    }
    Ok(out)
}

/// The server under test.
enum Server {
    Redis(RedisServer),
    Postgres(PgServer),
}

impl Server {
    fn start(backend: &str) -> Result<(Self, String), String> {
        match backend {
            "redis" => {
                let s =
                    RedisServer::start_with(ServerConfig::durable()).map_err(|e| e.to_string())?;
                let url = s.url();
                Ok((Self::Redis(s), url))
            }
            _ => {
                let s = PgServer::builder()
                    .max_connections(200)
                    .start()
                    .map_err(|e| e.to_string())?;
                let url = s.create_database("chaos").map_err(|e| e.to_string())?;
                Ok((Self::Postgres(s), url))
            }
        }
    }

    fn kill_client_connections(&self) -> Result<(), String> {
        match self {
            Self::Redis(s) => s
                .command(&["CLIENT", "KILL", "TYPE", "normal"])
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Self::Postgres(s) => s
                .psql(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE pid <> pg_backend_pid() AND datname = 'chaos'",
                )
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    fn restart(&mut self) -> Result<(), String> {
        match self {
            Self::Redis(s) => s.restart().map_err(|e| e.to_string()),
            Self::Postgres(s) => {
                s.stop_fast().map_err(|e| e.to_string())?;
                s.start_again().map_err(|e| e.to_string())
            }
        }
    }

    fn restart_label(&self) -> &'static str {
        match self {
            Self::Redis(_) => "server restart (appendfsync always)",
            Self::Postgres(_) => "server restart (fast shutdown)",
        }
    }
}

/// One worker process and where its output goes.
struct Worker {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Run {
    bin: PathBuf,
    url: String,
    dir: PathBuf,
    exec_log: PathBuf,
}

impl Run {
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("QUEUE_URL", &self.url)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "penguiflow-worker {} failed: {}",
                args.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn_worker(&self, index: usize, generation: usize) -> Result<Worker, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let log = self.dir.join(format!("worker-{index}-{generation}.log"));
        let file = File::create(&log).map_err(|e| e.to_string())?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(&self.bin)
            .args([
                "run",
                "--queue",
                QUEUE,
                "--flow",
                "exercise",
                "--concurrency",
                "8",
                "--job-timeout",
                "2s",
                "--lease",
                "2s",
                "--shutdown-timeout",
                "5s",
                "--retry-base",
                "0.1",
                "--retry-cap",
                "0.5",
                "--log-format",
                "json",
                "--health-addr",
                &addr,
            ])
            .env("QUEUE_URL", &self.url)
            .env("PENGUIFLOW_EXECUTION_LOG", &self.exec_log)
            .env("LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        Ok(Worker {
            child: Some(child),
            port,
            log,
        })
    }

    fn status(&self) -> Result<BTreeMap<String, f64>, String> {
        let text = self.cli(&["status", "--queue", QUEUE, "--json"])?;
        let mut m = BTreeMap::new();
        for key in ["ready", "scheduled", "running", "completed", "dead"] {
            let v =
                json_number(&text, key).ok_or_else(|| format!("status has no {key}: {text}"))?;
            m.insert(key.to_owned(), v);
        }
        Ok(m)
    }

    fn done(&self) -> Result<u64, String> {
        let s = self.status()?;
        Ok((s["completed"] + s["dead"]) as u64)
    }
}

/// The number after `"key":` in a JSON text (std only: no JSON parser in xtask).
fn json_number(text: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\"");
    let at = text.find(&pat)? + pat.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| {
            !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == 'E' || c == '+')
        })
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `"key":` in a JSON text.
fn json_string<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let at = text.find(&pat)? + pat.len();
    let end = text[at..].find('"')?;
    Some(&text[at..at + end])
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_millis(300),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// Waits until `f` holds, up to `limit`; returns how long it took.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The mixed batch: what each job is, and what its end should be.
fn batch(n: usize) -> (String, usize, usize) {
    let mut lines = String::new();
    let (mut completes, mut dies) = (0, 0);
    for i in 0..n {
        let line = match i % 50 {
            0..=29 => {
                completes += 1;
                format!("{{\"n\": {i}, \"sleep_ms\": {}}}", 10 + (i * 37) % 140)
            }
            30..=34 => {
                completes += 1;
                format!("{{\"n\": {i}, \"fail_times\": 1, \"sleep_ms\": 20}}")
            }
            35..=39 => {
                dies += 1;
                format!("{{\"n\": {i}, \"fail\": true}}")
            }
            40..=42 => {
                dies += 1;
                format!("\"not an object {i}\"")
            }
            43..=44 => {
                dies += 1;
                "[1, 2, 3]".to_owned()
            }
            45..=47 => {
                dies += 1;
                format!("{{\"n\": {i}, \"panic\": true}}")
            }
            _ => {
                dies += 1;
                format!("{{\"n\": {i}, \"hang\": true}}")
            }
        };
        lines.push_str(&line);
        lines.push('\n');
    }
    (lines, completes, dies)
}

struct Report {
    backend: String,
    enqueued: usize,
    completed: u64,
    dead: u64,
    unfinished: u64,
    lost: u64,
    twice: usize,
    expected: (usize, usize),
    executions_mean: f64,
    executions_max: usize,
    never_ran: usize,
    recoveries: Vec<(String, Option<Duration>)>,
}

fn build_binary(root: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> building penguiflow-worker");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "worker-runtime",
            "--bin",
            "penguiflow-worker",
        ])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err("building penguiflow-worker failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug").join("penguiflow-worker"))
}

/// The quick run of `cargo xtask ci`: one round of each fault on both backends.
pub(crate) fn ci_step(root: &Path) -> Result<(), String> {
    let args = ChaosArgs {
        backends: vec!["redis".into(), "postgres".into()],
        rounds: 1,
        quick: true,
    };
    if run(&args, root) == ExitCode::SUCCESS {
        Ok(())
    } else {
        Err("the quick chaos run failed (see the tables above)".into())
    }
}

/// Runs the chaos rounds and prints the table.
pub(crate) fn run(args: &ChaosArgs, root: &Path) -> ExitCode {
    let bin = match build_binary(root) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cargo xtask chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reports = Vec::new();
    for backend in &args.backends {
        match run_backend(backend, args, &bin) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("error: cargo xtask chaos ({backend}): {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!();
    println!(
        "| backend | enqueued | completed | dead | lost | recorded twice | unfinished | executions per job (mean / max) | expected completed / dead |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} / {} | {} / {} |",
            r.backend,
            r.enqueued,
            r.completed,
            r.dead,
            r.lost,
            r.twice,
            r.unfinished,
            r.executions_mean,
            r.executions_max,
            r.expected.0,
            r.expected.1
        );
    }
    println!();
    println!("| backend | fault | time to recover |");
    println!("|---|---|---:|");
    for r in &reports {
        for (fault, t) in &r.recoveries {
            let t = t.map_or("not recovered".to_owned(), |d| {
                format!("{:.2}s", d.as_secs_f64())
            });
            println!("| {} | {fault} | {t} |", r.backend);
        }
    }
    let bad = reports
        .iter()
        .any(|r| r.lost > 0 || r.twice > 0 || r.unfinished > 0);
    for r in &reports {
        println!(
            "backend={} chaos enqueued={} completed={} dead={} lost={} recorded_twice={} unfinished={} never_ran={}",
            r.backend, r.enqueued, r.completed, r.dead, r.lost, r.twice, r.unfinished, r.never_ran
        );
    }
    if bad {
        eprintln!("error: cargo xtask chaos: jobs were lost, left unfinished or recorded twice");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_backend(backend: &str, args: &ChaosArgs, bin: &Path) -> Result<Report, String> {
    eprintln!("==> chaos on {backend}: starting the server");
    let (mut server, url) = Server::start(backend)?;
    let dir = temp_dir("penguiflow-chaos").map_err(|e| e.to_string())?;
    let run = Run {
        bin: bin.to_owned(),
        url,
        exec_log: dir.join("executions.log"),
        dir,
    };
    if backend == "postgres" {
        run.cli(&["migrate"])?;
    }
    let n = if args.quick { 200 } else { 600 };
    let (lines, completes, dies) = batch(n);
    let jobs_file = run.dir.join("jobs.jsonl");
    std::fs::write(&jobs_file, lines).map_err(|e| e.to_string())?;
    let ids = run.cli(&[
        "enqueue",
        "--queue",
        QUEUE,
        "--max-retries",
        "2",
        "--file",
        &jobs_file.display().to_string(),
    ])?;
    let enqueued: Vec<String> = ids.lines().map(str::to_owned).collect();
    if enqueued.len() != n {
        return Err(format!("enqueued {} of {n} jobs", enqueued.len()));
    }

    let mut logs = Vec::new();
    let mut workers: Vec<Worker> = Vec::new();
    for i in 0..WORKERS {
        workers.push(run.spawn_worker(i, 0)?);
    }
    for w in &workers {
        if wait_for(Duration::from_secs(30), || http_ok(w.port, "/health/ready")).is_none() {
            return Err(format!("worker on port {} never became ready", w.port));
        }
    }
    let mut recoveries = Vec::new();
    for (generation, round) in (1..).zip(0..args.rounds) {
        std::thread::sleep(Duration::from_millis(800));
        // 1. SIGKILL a worker, then start a new one in its place.
        let idx = round % WORKERS;
        eprintln!("==> round {}: SIGKILL worker {idx}", round + 1);
        let mut old = std::mem::replace(&mut workers[idx], run.spawn_worker(idx, generation)?);
        if let Some(mut c) = old.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        logs.push(old.log.clone());
        let port = workers[idx].port;
        recoveries.push((
            format!("round {}: worker SIGKILL, replacement ready", round + 1),
            wait_for(Duration::from_secs(30), || http_ok(port, "/health/ready")),
        ));
        std::thread::sleep(Duration::from_millis(800));

        // 2. Kill every client connection on the server side.
        eprintln!("==> round {}: killing every client connection", round + 1);
        let before = run.done()?;
        server.kill_client_connections()?;
        recoveries.push((
            format!(
                "round {}: all client connections killed, progress again",
                round + 1
            ),
            progress_after(&run, before, n as u64),
        ));

        // 3. Restart the server.
        eprintln!("==> round {}: {}", round + 1, server.restart_label());
        let before = run.done()?;
        let t0 = Instant::now();
        server.restart()?;
        let rest = progress_after(&run, before, n as u64);
        recoveries.push((
            format!(
                "round {}: {}, progress again",
                round + 1,
                server.restart_label()
            ),
            rest.map(|d| d + t0.elapsed().saturating_sub(d)),
        ));
    }

    eprintln!("==> waiting for the batch to finish");
    let finished = wait_for(Duration::from_secs(120), || {
        run.status()
            .map(|s| s["ready"] + s["scheduled"] + s["running"] == 0.0)
            .unwrap_or(false)
    });
    if finished.is_none() {
        eprintln!("warning: the batch did not finish within 120 s");
    }
    for w in &mut workers {
        if let Some(c) = w.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }
    for w in &mut workers {
        if let Some(mut c) = w.child.take() {
            let ok = wait_for(Duration::from_secs(15), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if ok.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        logs.push(w.log.clone());
    }
    let s = run.status()?;
    let (completed, dead) = (s["completed"] as u64, s["dead"] as u64);
    let unfinished = (s["ready"] + s["scheduled"] + s["running"]) as u64;
    let lost = (n as u64).saturating_sub(completed + dead + unfinished);

    // Outcomes recorded, per job, from every worker's log.
    let mut recorded: HashMap<String, usize> = HashMap::new();
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Some(ev) = json_string(line, "event_type") else {
                continue;
            };
            if matches!(ev, "job_succeeded" | "job_dead" | "job_cancelled")
                && let Some(id) = json_string(line, "job_id")
            {
                *recorded.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    let twice = recorded.values().filter(|&&c| c > 1).count();

    // Executions per job, from the execution log.
    let mut executions: HashMap<String, usize> = HashMap::new();
    let text = std::fs::read_to_string(&run.exec_log).unwrap_or_default();
    for line in text.lines() {
        if let Some((id, _attempt)) = line.split_once(' ') {
            *executions.entry(id.to_owned()).or_default() += 1;
        }
    }
    let never_ran = enqueued
        .iter()
        .filter(|id| !executions.contains_key(*id))
        .count();
    let total: usize = executions.values().sum();
    Ok(Report {
        backend: backend.to_owned(),
        enqueued: n,
        completed,
        dead,
        unfinished,
        lost,
        twice,
        expected: (completes, dies),
        executions_mean: total as f64 / n as f64,
        executions_max: executions.values().copied().max().unwrap_or(0),
        never_ran,
        recoveries,
    })
}

/// Waits until more jobs are done than `before` (or all are); returns how long it took.
fn progress_after(run: &Run, before: u64, total: u64) -> Option<Duration> {
    wait_for(Duration::from_secs(60), || {
        run.done()
            .map(|d| d > before || d >= total)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let a = parse(&s(&["--backend", "redis", "--rounds", "5"])).expect("parses");
        assert_eq!((a.backends.len(), a.rounds, a.quick), (1, 5, false));
        let a = parse(&s(&["--quick"])).expect("parses");
        assert_eq!((a.backends.len(), a.rounds), (2, 1));
        assert!(parse(&s(&["--backend", "mysql"])).is_err());
        assert!(parse(&s(&["--rounds", "0"])).is_err());
    }

    #[test]
    fn reads_json_fields_without_a_parser() {
        let t = r#"{"completed": 12, "dead": 3.0, "event_type":"job_dead","job_id":"abc"}"#;
        assert_eq!(json_number(t, "completed"), Some(12.0));
        assert_eq!(json_number(t, "dead"), Some(3.0));
        assert_eq!(json_string(t, "event_type"), Some("job_dead"));
        assert_eq!(json_string(t, "job_id"), Some("abc"));
        assert_eq!(json_number(t, "missing"), None);
    }

    #[test]
    fn batch_has_every_kind_and_counts_its_ends() {
        let (lines, completes, dies) = batch(100);
        assert_eq!(lines.lines().count(), 100);
        assert_eq!(completes + dies, 100);
        for needle in [
            "fail_times",
            "\"fail\"",
            "panic",
            "hang",
            "not an object",
            "[1, 2, 3]",
        ] {
            assert!(lines.contains(needle), "{needle}");
        }
    }
}
