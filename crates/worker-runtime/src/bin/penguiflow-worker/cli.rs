//! Command-line definitions of `penguiflow-worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Production workers for PenguiFlow-style flows on durable job queues.
#[derive(Debug, Parser)]
#[command(name = "penguiflow-worker", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Queue backend URL: memory://, redis://, rediss://, redis+cluster://, postgres://.
    /// Defaults to QUEUE_URL, then REDIS_URL, then DATABASE_URL.
    #[arg(long, global = true, env = "QUEUE_URL", hide_env_values = true)]
    pub(crate) url: Option<String>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a worker until SIGTERM or SIGINT (a second signal exits at once).
    Run(RunArgs),
    /// Enqueue one job (PAYLOAD_JSON) or one job per line of a file (--file).
    Enqueue(EnqueueArgs),
    /// Show a queue's counts.
    Status(StatusArgs),
    /// Show one job.
    Job(JobArgs),
    /// List, requeue or purge dead letters.
    Dlq(DlqArgs),
    /// Pause or resume a queue.
    Queue(QueueArgs),
    /// Apply the PostgreSQL schema migrations (idempotent).
    Migrate,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormatArg {
    /// JSON lines when stdout is not a terminal, pretty otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Queue to work on.
    #[arg(long, env = "WORKER_QUEUE")]
    pub(crate) queue: String,
    /// Flow to run: a built-in flow (echo, exercise).
    #[arg(long, env = "WORKER_FLOW")]
    pub(crate) flow: String,
    /// Jobs run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) concurrency: u32,
    /// Bound on one attempt (e.g. 300s, 5m; a bare number is seconds).
    #[arg(long, env = "JOB_TIMEOUT_S", default_value = "300", value_parser = parse_duration)]
    pub(crate) job_timeout: Duration,
    /// Lease length; heartbeats renew it every third.
    #[arg(long, env = "LEASE_S", default_value = "30", value_parser = parse_duration)]
    pub(crate) lease: Duration,
    /// Time in-flight jobs get to finish after SIGTERM before they are handed back.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_S", default_value = "30", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,
    /// Address of the /health and /metrics server.
    #[arg(long, env = "HEALTH_ADDR", default_value = "127.0.0.1:8080")]
    pub(crate) health_addr: SocketAddr,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter directive).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub(crate) log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Auto, ignore_case = true)]
    pub(crate) log_format: LogFormatArg,
    /// Job-level retry backoff base (delay after the first failed attempt).
    #[arg(long, env = "RETRY_BASE_S", default_value = "1", value_parser = parse_duration)]
    pub(crate) retry_base: Duration,
    /// Largest job-level retry backoff.
    #[arg(long, env = "RETRY_CAP_S", default_value = "60", value_parser = parse_duration)]
    pub(crate) retry_cap: Duration,
    /// Reuse one flow for every job, rebuilt after this many failed attempts (default:
    /// a fresh flow per job).
    #[arg(long, env = "WORKER_LONG_LIVED_RESTART_AFTER")]
    pub(crate) long_lived: Option<u32>,
    /// Most leased jobs kept waiting for a free slot (0: off). Only as many as recent job
    /// durations say will start within 50 ms are fetched ahead.
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 128, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub(crate) prefetch: u32,
}

#[derive(Debug, Args)]
pub(crate) struct EnqueueArgs {
    /// Queue to put the job in.
    #[arg(long)]
    pub(crate) queue: String,
    /// Priority: lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) priority: i32,
    /// Run no earlier than this after the backend stores the job, by the backend's clock
    /// (e.g. 30s, 5m; a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) delay: Option<Duration>,
    /// Job-level retries after the first attempt.
    #[arg(long, default_value_t = flow_core::queue::DEFAULT_MAX_RETRIES)]
    pub(crate) max_retries: u32,
    /// Tenant.
    #[arg(long, default_value = "default")]
    pub(crate) tenant: String,
    /// While a job with this key is live, enqueueing again returns its id.
    #[arg(long)]
    pub(crate) dedupe_key: Option<String>,
    /// A header carried with the job, as KEY=VALUE (repeatable), such as a W3C
    /// `traceparent=00-<trace id>-<span id>-01` the worker's spans continue.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    /// A file with one JSON payload per line (blank lines are skipped).
    #[arg(long, conflicts_with = "payload")]
    pub(crate) file: Option<PathBuf>,
    /// The job's payload, as JSON.
    #[arg(required_unless_present = "file")]
    pub(crate) payload: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Queue to show.
    #[arg(long)]
    pub(crate) queue: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct JobArgs {
    /// Queue of the job.
    #[arg(long)]
    pub(crate) queue: String,
    /// The job's id.
    pub(crate) job_id: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What to do with dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DlqAction {
    /// List dead letters, newest first.
    List,
    /// Put dead jobs back to ready, attempts reset.
    Requeue,
    /// Delete every dead letter of the queue.
    Purge,
}

#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// list, requeue or purge.
    pub(crate) action: DlqAction,
    /// Queue.
    #[arg(long)]
    pub(crate) queue: String,
    /// One job (requeue).
    pub(crate) job_id: Option<String>,
    /// Every dead job of the queue (requeue, purge).
    #[arg(long, conflicts_with = "job_id")]
    pub(crate) all: bool,
    /// How many to list.
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: usize,
    /// How many to skip (list).
    #[arg(long, default_value_t = 0)]
    pub(crate) offset: usize,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Pause or resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum QueueAction {
    /// Fetch hands out nothing; enqueue still works.
    Pause,
    /// Undo pause.
    Resume,
}

#[derive(Debug, Args)]
pub(crate) struct QueueArgs {
    /// pause or resume.
    pub(crate) action: QueueAction,
    /// Queue.
    #[arg(long)]
    pub(crate) queue: String,
}

/// A job header: `KEY=VALUE`, the key not empty (the value may be).
pub(crate) fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not a header: use KEY=VALUE")),
    }
}

/// A duration: a bare number is seconds (`30`, `0.5`), else humantime (`30s`, `5m`, `250ms`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a duration of zero or more seconds"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s, 5m or 250ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn headers_are_key_equals_value() {
        assert_eq!(
            parse_header("traceparent=00-ab-cd-01"),
            Ok(("traceparent".to_owned(), "00-ab-cd-01".to_owned()))
        );
        assert_eq!(parse_header("k="), Ok(("k".to_owned(), String::new())));
        assert_eq!(
            parse_header("k=a=b"),
            Ok(("k".to_owned(), "a=b".to_owned()))
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("=v").is_err());
    }
}
