//! `penguiflow-worker`: run workers and operate queues from the command line.
//!
//! Exit codes: 0 on success, 1 on failure, 2 on bad usage; failures print one line on
//! stderr, with any password in it masked. `--json` outputs are stable and documented
//! in docs/cli.md.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use flow_core::redact::redact_text;

use crate::cli::Cli;

/// The process's allocator (feature `mimalloc`, on by default): much cheaper than
/// glibc's for the many small, short-lived allocations of one job (messages, flow
/// tasks, spans); see docs/performance.md.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A failure of one command: what to print, and whether it was bad usage (exit 2).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) usage: bool,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            usage: true,
        }
    }
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            usage: false,
        }
    }
}

impl From<flow_core::Error> for Failure {
    fn from(e: flow_core::Error) -> Self {
        let usage = matches!(
            e,
            flow_core::Error::InvalidQueueName { .. }
                | flow_core::Error::InvalidJob { .. }
                | flow_core::Error::PayloadTooLarge { .. }
        );
        Self {
            message: e.to_string(),
            usage,
        }
    }
}

impl From<worker_runtime::Error> for Failure {
    fn from(e: worker_runtime::Error) -> Self {
        let usage = matches!(e, worker_runtime::Error::Config { .. });
        Self {
            message: e.to_string(),
            usage,
        }
    }
}

/// Environment variables behind flags, to name them in error messages.
const ENV_OF_FLAG: &[(&str, &str)] = &[
    ("--url", "QUEUE_URL"),
    ("--queue", "WORKER_QUEUE"),
    ("--flow", "WORKER_FLOW"),
    ("--concurrency", "WORKER_CONCURRENCY"),
    ("--job-timeout", "JOB_TIMEOUT_S"),
    ("--lease", "LEASE_S"),
    ("--shutdown-timeout", "SHUTDOWN_TIMEOUT_S"),
    ("--health-addr", "HEALTH_ADDR"),
    ("--log-level", "LOG_LEVEL"),
    ("--log-format", "LOG_FORMAT"),
    ("--retry-base", "RETRY_BASE_S"),
    ("--retry-cap", "RETRY_CAP_S"),
    ("--long-lived", "WORKER_LONG_LIVED_RESTART_AFTER"),
    ("--prefetch", "WORKER_PREFETCH"),
];

/// One line for a clap error, naming the environment variable when the bad value came
/// from one.
fn one_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line")
        .trim()
        .trim_start_matches("error: ")
        .to_owned();
    let args: Vec<String> = std::env::args().collect();
    for (flag, env) in ENV_OF_FLAG {
        let on_command_line = args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if first.contains(&format!("'{flag}"))
            && !on_command_line
            && std::env::var_os(env).is_some()
        {
            return format!("{first} (from the environment variable {env})");
        }
    }
    first
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        ExitCode::from(2)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                _ => {
                    // A misplaced URL may be quoted back.
                    eprintln!("penguiflow-worker: error: {}", redact_text(&one_line(&e)));
                    ExitCode::from(2)
                }
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("penguiflow-worker: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // Messages name the backend by its redacted URL already; this also masks
            // anything URL-shaped a driver quoted.
            let line = f.message.replace('\n', " ");
            eprintln!("penguiflow-worker: error: {}", redact_text(&line));
            ExitCode::from(if f.usage { 2 } else { 1 })
        }
    }
}
