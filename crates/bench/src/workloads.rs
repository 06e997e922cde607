//! The workloads. Payloads are `{"n": i}`, flows are no-ops, as the peers ran.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flow_core::queue::NewJob;
use flow_core::{BoxError, Context, Flow, Message, Node, create};
use serde_json::json;
use worker_runtime::WorkerPool;

use crate::Args;
use crate::backend::Backend;

/// One measured figure.
pub(crate) struct Figure {
    pub(crate) workload: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
}

fn fig(workload: impl Into<String>, value: f64, unit: &'static str) -> Figure {
    Figure {
        workload: workload.into(),
        value,
        unit,
    }
}

const BULK_CHUNK: usize = 1000;

fn queue_name(workload: &str) -> String {
    format!(
        "bench-{workload}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn noop_flow() -> Result<Flow, flow_core::Error> {
    let noop = Node::new("noop", |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m))
    });
    create([noop.to(&[])]).build()
}

fn jobs(queue: &str, from: usize, to: usize) -> Vec<NewJob> {
    (from..to)
        .map(|i| NewJob::new(queue, json!({ "n": i })))
        .collect()
}

async fn enqueue_bulk(b: &Backend, queue: &str, n: usize) -> Result<(), String> {
    let mut i = 0;
    while i < n {
        let end = (i + BULK_CHUNK).min(n);
        b.queue
            .enqueue_many(jobs(queue, i, end))
            .await
            .map_err(|e| e.to_string())?;
        i = end;
    }
    Ok(())
}

/// Peak resident set size of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) async fn run(args: &Args) -> Result<Vec<Figure>, String> {
    let b = Backend::connect(&args.backend, args.url.as_deref()).await?;
    match args.workload.as_str() {
        "enqueue-single" => {
            let q = queue_name("w1s");
            let t0 = Instant::now();
            for i in 0..args.n {
                b.queue
                    .enqueue(NewJob::new(&q, json!({ "n": i })))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let rate = args.n as f64 / t0.elapsed().as_secs_f64();
            Ok(vec![fig("enqueue_single", rate, "jobs/s")])
        }
        "enqueue-bulk" => {
            let q = queue_name("w1b");
            let t0 = Instant::now();
            enqueue_bulk(&b, &q, args.n).await?;
            let rate = args.n as f64 / t0.elapsed().as_secs_f64();
            Ok(vec![fig("enqueue_bulk", rate, "jobs/s")])
        }
        "drain" => {
            let q = queue_name("w2");
            enqueue_bulk(&b, &q, args.n).await?;
            let pool = WorkerPool::builder(b.queue.clone(), q.clone(), noop_flow)
                .concurrency(args.concurrency)
                .build()
                .map_err(|e| e.to_string())?;
            let stats = pool.stats();
            let n = args.n as u64;
            let t0 = Instant::now();
            let done = async move {
                while stats.snapshot().succeeded < n {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            };
            let report = pool.run(done).await.map_err(|e| e.to_string())?;
            let secs = t0.elapsed().as_secs_f64();
            if report.stats.succeeded < n {
                return Err(format!("drained {} of {n}", report.stats.succeeded));
            }
            let mut out = vec![fig(
                format!("drain_c{}", args.concurrency),
                n as f64 / secs,
                "jobs/s",
            )];
            if let Some(rss) = peak_rss_mib() {
                out.push(fig(format!("peak_rss_c{}", args.concurrency), rss, "MiB"));
            }
            Ok(out)
        }
        "latency" => latency(&b, args).await,
        "idle" => {
            let q = queue_name("idle");
            let pool = WorkerPool::builder(b.queue.clone(), q, noop_flow)
                .concurrency(args.concurrency)
                .build()
                .map_err(|e| e.to_string())?;
            let secs = args.seconds;
            let handle = tokio::spawn(pool.run(tokio::time::sleep(secs + Duration::from_secs(1))));
            // Let the pool settle into its idle wait, then count for `secs`.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = b.command_count().await?;
            tokio::time::sleep(secs).await;
            let after = b.command_count().await?;
            handle
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            match (before, after) {
                (Some(x), Some(y)) => {
                    // Subtract the counter reads themselves (one each).
                    let n = y.saturating_sub(x).saturating_sub(1);
                    Ok(vec![fig(
                        "idle_commands",
                        n as f64 / secs.as_secs_f64(),
                        "cmds/s",
                    )])
                }
                _ => Ok(vec![]),
            }
        }
        other => Err(format!(
            "unknown workload {other:?} (enqueue-single, enqueue-bulk, drain, latency, idle)"
        )),
    }
}

/// Enqueue-to-start latency: jobs enqueued at a steady rate to a running pool; each
/// job's flow notes when it started. The clock is this process's, for both ends.
async fn latency(b: &Backend, args: &Args) -> Result<Vec<Figure>, String> {
    let q = queue_name("w3");
    let samples: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let s2 = samples.clone();
    let factory = move || {
        let s3 = s2.clone();
        let node = Node::new("stamp", move |m: Message, _c: Context| {
            let s4 = s3.clone();
            async move {
                let now = epoch_us();
                if let (Some(t), Ok(mut s)) =
                    (m.payload.get("t").and_then(|v| v.as_u64()), s4.lock())
                {
                    s.push(now.saturating_sub(t));
                }
                Ok::<_, BoxError>(Some(m))
            }
        });
        create([node.to(&[])]).build()
    };
    let pool = WorkerPool::builder(b.queue.clone(), q.clone(), factory)
        .concurrency(args.concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    let stats = pool.stats();
    let total = (args.rate as f64 * args.seconds.as_secs_f64()).max(1.0) as u64;
    let running = tokio::spawn(pool.run(async move {
        while stats.snapshot().succeeded < total {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }));
    // Give the pool time to reach its idle wait, as a real worker would be.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let every = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        b.queue
            .enqueue(NewJob::new(&q, json!({ "n": i, "t": epoch_us() })))
            .await
            .map_err(|e| e.to_string())?;
    }
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .map_err(|_| "jobs did not all run within 60 s".to_owned())?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut v = samples.lock().map_err(|e| e.to_string())?.clone();
    if v.is_empty() {
        return Err("no latency samples".into());
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    Ok(vec![
        fig("latency_p50", pct(0.50), "ms"),
        fig("latency_p99", pct(0.99), "ms"),
        fig("latency_max", pct(1.0), "ms"),
    ])
}
