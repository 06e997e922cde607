//! `penguiflow-bench`: one benchmark workload against one backend, one run.
//!
//! `cargo xtask bench` starts the servers, runs every workload several times through this
//! binary (a fresh process each, so peak RSS belongs to one workload) and aggregates.
//!
//! ```text
//! penguiflow-bench --backend memory|redis|postgres [--url URL] --workload W [--n N]
//!                  [--concurrency C] [--rate R] [--seconds S]
//! ```
//!
//! Workloads: `enqueue-single`, `enqueue-bulk`, `drain` (with `--concurrency`),
//! `latency` (enqueue-to-start at `--rate` jobs/s), `idle` (backend commands per second
//! sent by an idle worker). Each prints `backend=... workload=... value=... unit=...`
//! lines on stdout.

mod backend;
mod workloads;

/// The same allocator as the `penguiflow-worker` binary, so the figures are the ones a
/// deployed worker gets.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::time::Duration;

/// Parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) backend: String,
    pub(crate) url: Option<String>,
    pub(crate) workload: String,
    pub(crate) n: usize,
    pub(crate) concurrency: usize,
    pub(crate) rate: u32,
    pub(crate) seconds: Duration,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        backend: "memory".into(),
        url: None,
        workload: String::new(),
        n: 20_000,
        concurrency: 16,
        rate: 200,
        seconds: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value("--backend")?,
            "--url" => a.url = Some(value("--url")?),
            "--workload" => a.workload = value("--workload")?,
            "--n" => a.n = value("--n")?.parse().map_err(|e| format!("--n: {e}"))?,
            "--concurrency" => {
                a.concurrency = value("--concurrency")?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--rate" => {
                a.rate = value("--rate")?
                    .parse()
                    .map_err(|e| format!("--rate: {e}"))?
            }
            "--seconds" => {
                a.seconds = Duration::from_secs_f64(
                    value("--seconds")?
                        .parse()
                        .map_err(|e| format!("--seconds: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.workload.is_empty() {
        return Err("--workload is required".into());
    }
    if a.n == 0 || a.concurrency == 0 || a.rate == 0 {
        return Err("--n, --concurrency and --rate must be positive".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("penguiflow-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("penguiflow-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Producers enqueue from a task on the runtime's worker threads, where a service's
    // handlers run: on the thread of `block_on`, every reply would first wake a worker
    // thread (the one polling the sockets) and then that thread, one more wake-up per
    // call. Worker pools run from `block_on` as the worker binary's `main` runs them.
    let outcome = if args.workload.starts_with("enqueue") {
        let task_args = args.clone();
        rt.block_on(async move {
            tokio::spawn(async move { workloads::run(&task_args).await })
                .await
                .map_err(|e| format!("the workload task failed: {e}"))?
        })
    } else {
        rt.block_on(workloads::run(&args))
    };
    match outcome {
        Ok(figures) => {
            for f in figures {
                println!(
                    "backend={} workload={} value={:.3} unit={}",
                    args.backend, f.workload, f.value, f.unit
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("penguiflow-bench: {} {}: {e}", args.backend, args.workload);
            ExitCode::FAILURE
        }
    }
}
