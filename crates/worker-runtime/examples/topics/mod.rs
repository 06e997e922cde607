//! The topic-generation flow shared by the `topic_worker` and `long_lived_worker`
//! examples: `plan` → `research` → `write`, as in the worker-integration guide.
//!
//! The "model" is a stand-in with a latency and a rate of transient failures, passed in
//! through a closure (dependencies go in closures, never in message metadata).

use std::sync::Arc;
use std::time::Duration;

use flow_core::{BoxError, Context, Flow, Node, NodePolicy, create};
use serde::{Deserialize, Serialize};

/// What producers enqueue.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TopicRequest {
    /// The topic to write about.
    pub(crate) topic: String,
    /// How many sections to plan.
    #[serde(default = "default_sections")]
    pub(crate) sections: usize,
}

fn default_sections() -> usize {
    3
}

#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    topic: String,
    sections: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Research {
    topic: String,
    notes: Vec<String>,
}

/// What the job returns.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Article {
    /// The topic.
    pub(crate) topic: String,
    /// One paragraph per planned section.
    pub(crate) paragraphs: Vec<String>,
}

/// A stand-in for a language model: answers after `latency`, and fails transiently
/// once in `fail_one_in` calls (0: never).
#[derive(Debug, Clone)]
pub(crate) struct FakeModel {
    /// Time per call.
    pub(crate) latency: Duration,
    /// One call in this many fails with a transient error.
    pub(crate) fail_one_in: u32,
}

impl FakeModel {
    async fn complete(&self, prompt: &str) -> Result<String, BoxError> {
        tokio::time::sleep(self.latency).await;
        if self.fail_one_in > 0 && fastrand::u32(0..self.fail_one_in) == 0 {
            return Err("model overloaded (HTTP 529), try again".into());
        }
        Ok(format!("[{} words about {prompt}]", 40 + prompt.len() % 20))
    }
}

/// A fresh `plan → research → write` flow calling `model`.
pub(crate) fn topic_flow(model: Arc<FakeModel>) -> Result<Flow, flow_core::Error> {
    // Every node that calls the model gets a timeout and a couple of node-level
    // retries; job-level retries (the worker's) come on top, so keep both small.
    let policy = NodePolicy::default()
        .timeout(Duration::from_secs(10))
        .max_retries(2)
        .backoff(Duration::from_millis(50), 2.0, Some(Duration::from_secs(1)));

    let m = Arc::clone(&model);
    let plan = Node::typed("plan", move |req: TopicRequest, _ctx: Context| {
        let m = Arc::clone(&m);
        async move {
            let n = req.sections.clamp(1, 10);
            let outline = m.complete(&format!("an outline of {}", req.topic)).await?;
            let sections = (1..=n)
                .map(|i| format!("{} part {i} {outline}", req.topic))
                .collect();
            Ok::<_, BoxError>(Plan {
                topic: req.topic,
                sections,
            })
        }
    })
    .with_policy(policy.clone());

    let m = Arc::clone(&model);
    let research = Node::typed("research", move |plan: Plan, ctx: Context| {
        let m = Arc::clone(&m);
        async move {
            let mut notes = Vec::with_capacity(plan.sections.len());
            for s in &plan.sections {
                if ctx.cancellation().is_cancelled() {
                    return Err("cancelled".into());
                }
                notes.push(m.complete(&format!("facts on {s}")).await?);
            }
            Ok::<_, BoxError>(Research {
                topic: plan.topic,
                notes,
            })
        }
    })
    .with_policy(policy.clone());

    let m = Arc::clone(&model);
    let write = Node::typed("write", move |r: Research, _ctx: Context| {
        let m = Arc::clone(&m);
        async move {
            let mut paragraphs = Vec::with_capacity(r.notes.len());
            for note in &r.notes {
                paragraphs.push(m.complete(&format!("a paragraph from {note}")).await?);
            }
            Ok::<_, BoxError>(Article {
                topic: r.topic,
                paragraphs,
            })
        }
    })
    .with_policy(policy);

    create([plan.to(&[&research]), research.to(&[&write]), write.to(&[])]).build()
}
