//! A test kit, like PenguiFlow's `penguiflow.testkit`: run one message through a flow
//! without a queue and look at the outcome, the events and the error.
//!
//! ```
//! use flow_core::testkit::{run_one, simulate_error};
//! use flow_core::{create, Headers, Message, Node, NodePolicy};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flow_core::Error> {
//! let (flaky, sim) = simulate_error(1);
//! let node = Node::new("flaky", flaky).with_policy(
//!     NodePolicy::default().max_retries(1).backoff(Duration::from_millis(1), 2.0, None),
//! );
//! let flow = create([node.to(&[])]).build()?;
//! let run = run_one(flow, Message::new(json!("hi"), Headers::new("t")), Duration::from_secs(1)).await?;
//! assert_eq!(run.message().map(|m| m.payload.clone()), Some(json!("hi")));
//! assert_eq!(sim.attempts(), 2);
//! assert_eq!(run.event_types(), ["node_start", "node_error", "node_retry", "node_start", "node_success"]);
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{BoxError, Error, FlowError};
use crate::event::{EventKind, FlowEvent, Middleware};
use crate::flow::{Flow, Outcome};
use crate::message::Message;
use crate::node::NodeFn;

/// A middleware that keeps every event it sees, for assertions.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<FlowEvent>>,
}

impl Recorder {
    /// A new, empty recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every event so far, in delivery order.
    pub fn events(&self) -> Vec<FlowEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The events of one trace.
    pub fn events_for(&self, trace_id: &str) -> Vec<FlowEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.trace_id.as_deref() == Some(trace_id))
            .collect()
    }

    /// The `node_start` node names of a trace, consecutive repeats (retries) collapsed.
    pub fn node_sequence(&self, trace_id: &str) -> Vec<String> {
        node_sequence(&self.events_for(trace_id))
    }
}

#[async_trait]
impl Middleware for Recorder {
    async fn on_event(&self, event: &FlowEvent) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event.clone());
        }
    }
}

fn node_sequence(events: &[FlowEvent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events.iter().filter(|e| e.kind == EventKind::NodeStart) {
        if out.last() != Some(&e.node_name) {
            out.push(e.node_name.clone());
        }
    }
    out
}

/// The result of [`run_one`].
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The trace that ran.
    pub trace_id: String,
    /// What came out.
    pub outcome: Outcome,
    /// The events of the trace, in order.
    pub events: Vec<FlowEvent>,
}

impl RunResult {
    /// The output message, if the trace produced one.
    pub fn message(&self) -> Option<&Message> {
        match &self.outcome {
            Outcome::Message(m) => Some(m),
            _ => None,
        }
    }

    /// The error, if the trace failed.
    pub fn error(&self) -> Option<&FlowError> {
        match &self.outcome {
            Outcome::Error(e) => Some(e),
            _ => None,
        }
    }

    /// The `event_type` of each event, in order.
    pub fn event_types(&self) -> Vec<&'static str> {
        self.events.iter().map(|e| e.kind.as_str()).collect()
    }

    /// The `node_start` node names, consecutive repeats collapsed.
    pub fn node_sequence(&self) -> Vec<String> {
        node_sequence(&self.events)
    }
}

/// Runs `msg` through `flow` and waits up to `timeout` for its outcome; the flow is always
/// stopped afterwards. A timeout is [`Error::Timeout`].
pub async fn run_one(mut flow: Flow, msg: Message, timeout: Duration) -> Result<RunResult, Error> {
    let recorder = Recorder::new();
    flow.add_middleware(recorder.clone());
    let handle = flow.run()?;
    let trace_id = msg.trace_id.clone();
    let outcome = handle.call(msg, timeout).await;
    handle.stop().await;
    let outcome = outcome?;
    Ok(RunResult {
        events: recorder.events_for(&trace_id),
        trace_id,
        outcome,
    })
}

/// Asserts the `node_start` sequence of a run (retries collapsed).
///
/// # Panics
/// When the sequence differs, with both sequences in the message.
pub fn assert_node_sequence(run: &RunResult, expected: &[&str]) {
    let got = run.node_sequence();
    assert_eq!(got, expected, "node sequence of trace {}", run.trace_id);
}

/// Counts of a [`simulate_error`] node.
#[derive(Clone, Debug, Default)]
pub struct Simulation {
    attempts: Arc<AtomicU32>,
    failures: Arc<AtomicU32>,
}

impl Simulation {
    /// Calls so far.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::SeqCst)
    }
    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::SeqCst)
    }
}

/// A node function that fails its first `fail_times` calls, then echoes its input.
pub fn simulate_error(fail_times: u32) -> (impl NodeFn, Simulation) {
    let sim = Simulation::default();
    let s = sim.clone();
    let f = move |msg: Message, _ctx: crate::flow::Context| {
        let s = s.clone();
        async move {
            let n = s.attempts.fetch_add(1, Ordering::SeqCst);
            if n < fail_times {
                s.failures.fetch_add(1, Ordering::SeqCst);
                return Err::<Option<Message>, BoxError>(
                    format!("simulated failure {} of {fail_times}", n + 1).into(),
                );
            }
            Ok(Some(msg))
        }
    };
    (f, sim)
}
