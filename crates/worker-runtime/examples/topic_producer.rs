//! Enqueues topic-generation jobs, as a web service would.
//!
//! ```text
//! QUEUE_URL=redis://127.0.0.1:6379 cargo run --example topic_producer -- 100
//! ```
//!
//! Each job carries W3C trace context in its headers when the producer runs inside a
//! traced span, so the worker's spans continue the producer's trace.

use std::collections::BTreeMap;

use flow_core::queue::{NewJob, QueueOptions};
use serde_json::json;
use worker_runtime::backend;
use worker_runtime::telemetry::inject_trace_context;

const QUEUE: &str = "topics";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("QUEUE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("the job count {a:?}: {e}"))?,
        None => 20,
    };
    let queue = backend::connect(&url, QueueOptions::default()).await?;
    let topics = [
        "rust async",
        "job queues",
        "tracing",
        "postgres",
        "redis cluster",
    ];
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let mut headers = BTreeMap::new();
        inject_trace_context(&mut headers);
        let mut job = NewJob::new(
            QUEUE,
            json!({"topic": format!("{} #{i}", topics[i % topics.len()]), "sections": 3}),
        )
        .tenant(if i % 2 == 0 { "acme" } else { "globex" })
        .max_retries(2)
        .dedupe_key(format!("topic-{i}"));
        job.headers = headers;
        jobs.push(job);
    }
    let ids = queue.enqueue_many(jobs).await?;
    println!(
        "enqueued {} topic jobs on {QUEUE:?} ({})",
        ids.len(),
        backend::redact_url(&url)
    );
    if let Some(first) = ids.first() {
        println!("follow one: penguiflow-worker job --queue {QUEUE} {first}");
    }
    Ok(())
}
