//! Quickstart: a two-node flow run by a worker pool over the embedded in-memory queue.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It enqueues a few hundred jobs (some fail once and succeed on retry, some always fail,
//! a few carry a payload the flow cannot decode), runs the pool until the queue is empty,
//! and prints what happened. No server needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flow_core::queue::{JobQueue, MemoryQueue, NewJob};
use flow_core::{BoxError, Context, Flow, Node, NodePolicy, create};
use serde::{Deserialize, Serialize};
use serde_json::json;
use worker_runtime::{RetryPolicy, WorkerPool};

const QUEUE: &str = "quickstart";

/// What producers enqueue.
#[derive(Deserialize)]
struct TopicRequest {
    topic: String,
    /// Demo switch: fail the first attempt of this job.
    #[serde(default)]
    flaky: bool,
    /// Demo switch: fail every attempt of this job.
    #[serde(default)]
    broken: bool,
}

/// What the first node hands to the second.
#[derive(Serialize, Deserialize)]
struct Outline {
    topic: String,
    points: Vec<String>,
}

/// What the job returns.
#[derive(Serialize)]
struct Summary {
    topic: String,
    summary: String,
}

/// Builds a fresh two-node flow: `outline` then `summarise`.
fn topic_flow() -> Result<Flow, flow_core::Error> {
    let outline = Node::new(
        "outline",
        |msg: flow_core::Message, _ctx: Context| async move {
            let req: TopicRequest = serde_json::from_value(msg.payload.clone()).map_err(|e| {
                Box::new(flow_core::InvalidPayload {
                    type_name: "TopicRequest",
                    reason: e.to_string(),
                }) as BoxError
            })?;
            // The pool puts the attempt number (1-based) in the message metadata.
            let attempt = msg
                .meta
                .get("attempt")
                .and_then(|v| v.as_u64())
                .unwrap_or(1);
            if req.broken || (req.flaky && attempt == 1) {
                return Err(format!("upstream model unavailable (attempt {attempt})").into());
            }
            let points = (1..=3)
                .map(|i| format!("{} point {i}", req.topic))
                .collect();
            let outline = Outline {
                topic: req.topic,
                points,
            };
            Ok(Some(msg.with_payload(serde_json::to_value(outline)?)))
        },
    )
    .with_policy(NodePolicy::default().timeout(Duration::from_secs(5)));

    let summarise = Node::typed("summarise", |o: Outline, _ctx: Context| async move {
        Ok::<_, BoxError>(Summary {
            summary: o.points.join("; "),
            topic: o.topic,
        })
    })
    .with_policy(NodePolicy::default().timeout(Duration::from_secs(5)));

    create([outline.to(&[&summarise]), summarise.to(&[])]).build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = Arc::new(MemoryQueue::new());

    let mut jobs = Vec::new();
    for i in 0..300 {
        let payload = match i % 50 {
            7 | 17 | 27 | 37 | 47 => json!({"topic": format!("topic {i}"), "flaky": true}),
            9 | 29 => json!({"topic": format!("topic {i}"), "broken": true}),
            13 => json!({"title": "no topic field"}),
            _ => json!({"topic": format!("topic {i}")}),
        };
        jobs.push(NewJob::new(QUEUE, payload).max_retries(2));
    }
    let enqueued = queue.enqueue_many(jobs).await?.len();

    let pool = WorkerPool::builder(queue.clone(), QUEUE, topic_flow)
        .concurrency(16)
        .job_timeout(Duration::from_secs(10))
        // Short backoff so the demo finishes quickly; production defaults are 1 s .. 60 s.
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            jitter: true,
        })
        .build()?;

    // Stop when nothing is left to do; a real worker stops on SIGTERM instead.
    let q = queue.clone();
    let drained = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match q.stats(QUEUE).await {
                Ok(s) if s.ready + s.scheduled + s.running == 0 => return,
                _ => {}
            }
        }
    };
    let started = Instant::now();
    let report = pool.run(drained).await?;
    let elapsed = started.elapsed();

    let stats = queue.stats(QUEUE).await?;
    let s = report.stats;
    println!("PenguiFlow worker quickstart (in-memory queue)");
    println!("  enqueued   {enqueued}");
    println!(
        "  processed  {} attempts in {:.2}s",
        s.processed,
        elapsed.as_secs_f64()
    );
    println!("  succeeded  {}", s.succeeded);
    println!("  retried    {}", s.retried);
    println!("  dead       {}", s.failed);
    println!(
        "  queue now  ready={} scheduled={} running={} completed={} dead={}",
        stats.ready, stats.scheduled, stats.running, stats.completed, stats.dead
    );
    let dead = queue.dead_letters(QUEUE, 0, 1).await?;
    if let Some(d) = dead.first() {
        println!(
            "  one dead letter: job {} after {} attempt(s): [{}] {}",
            d.id, d.attempts, d.error.code, d.error.message
        );
    }
    if s.succeeded + s.failed != enqueued as u64 {
        return Err(format!(
            "expected every job to finish, got {} of {enqueued}",
            s.succeeded + s.failed
        )
        .into());
    }
    Ok(())
}
