//! [`FlowEvent`]s: what the engine reports about every node attempt, retry, failure,
//! deadline skip and cancellation, delivered in order to [`Middleware`]s.

use async_trait::async_trait;
use serde_json::{Map, Value};

/// The kind of a [`FlowEvent`]; [`EventKind::as_str`] gives PenguiFlow's `event_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// Before each attempt of a node.
    NodeStart,
    /// After an attempt succeeded and its outputs were handed downstream.
    NodeSuccess,
    /// An attempt returned an error.
    NodeError,
    /// An attempt ran past the node's timeout.
    NodeTimeout,
    /// Before the backoff sleep of a retry; `attempt` is the next attempt.
    NodeRetry,
    /// The node gave up: retries exhausted or a non-retryable error.
    NodeFailed,
    /// A message arrived after its deadline; the node did not run.
    DeadlineSkip,
    /// The first `cancel()` of an active trace.
    TraceCancelStart,
    /// A node dequeued a message of a cancelled trace and dropped it.
    TraceCancelDrop,
    /// An in-flight attempt was cancelled with its trace.
    NodeTraceCancelled,
    /// The last message of a cancelled trace is gone.
    TraceCancelFinish,
    /// A node's worker was stopped by `stop()`.
    NodeCancelled,
}

impl EventKind {
    /// PenguiFlow's `event_type` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NodeStart => "node_start",
            Self::NodeSuccess => "node_success",
            Self::NodeError => "node_error",
            Self::NodeTimeout => "node_timeout",
            Self::NodeRetry => "node_retry",
            Self::NodeFailed => "node_failed",
            Self::DeadlineSkip => "deadline_skip",
            Self::TraceCancelStart => "trace_cancel_start",
            Self::TraceCancelDrop => "trace_cancel_drop",
            Self::NodeTraceCancelled => "node_trace_cancelled",
            Self::TraceCancelFinish => "trace_cancel_finish",
            Self::NodeCancelled => "node_cancelled",
        }
    }

    /// The log level PenguiFlow uses for this kind.
    pub const fn level(self) -> tracing::Level {
        match self {
            Self::NodeStart | Self::NodeCancelled => tracing::Level::DEBUG,
            Self::NodeError | Self::NodeFailed => tracing::Level::ERROR,
            Self::NodeTimeout => tracing::Level::WARN,
            _ => tracing::Level::INFO,
        }
    }
}

/// One runtime event, with PenguiFlow's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowEvent {
    /// What happened.
    pub kind: EventKind,
    /// When, in seconds since the Unix epoch.
    pub ts: f64,
    /// The node (or `OpenSea` / `Rookery` for trace-level events).
    pub node_name: String,
    /// The node's id (or `OpenSea` / `Rookery`).
    pub node_id: String,
    /// The trace, when the event belongs to one.
    pub trace_id: Option<String>,
    /// The attempt number (0-based, as in PenguiFlow).
    pub attempt: u32,
    /// Latency of the attempt in milliseconds, when measured.
    pub latency_ms: Option<f64>,
    /// Messages waiting in the node's input queue.
    pub queue_depth_in: usize,
    /// Messages waiting in the input queues of the node's successors.
    pub queue_depth_out: usize,
    /// Number of outgoing edges.
    pub outgoing_edges: usize,
    /// Capacity of the flow's queues (0 = unbounded).
    pub queue_maxsize: usize,
    /// Messages of the trace still queued or in process.
    pub trace_pending: Option<usize>,
    /// Attempts of the trace currently running.
    pub trace_inflight: usize,
    /// Whether the trace is cancelled.
    pub trace_cancelled: bool,
    /// Kind-specific facts: `exception`, `sleep_s`, `flow_error`, `deadline_s`, `pending`.
    pub extra: Map<String, Value>,
}

impl FlowEvent {
    /// Input plus output queue depth.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth_in + self.queue_depth_out
    }

    /// The FlowError payload carried by `node_failed` events.
    pub fn error_payload(&self) -> Option<&Value> {
        self.extra.get("flow_error")
    }

    /// PenguiFlow's `to_payload()`: `ts, event, node_name, node_id, trace_id, latency_ms,
    /// q_depth_in, q_depth_out, q_depth_total, outgoing, queue_maxsize, attempt,
    /// trace_inflight, trace_cancelled`, `trace_pending` when set, then `extra` merged.
    pub fn to_payload(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ts".into(), self.ts.into());
        m.insert("event".into(), self.kind.as_str().into());
        m.insert("node_name".into(), self.node_name.clone().into());
        m.insert("node_id".into(), self.node_id.clone().into());
        m.insert(
            "trace_id".into(),
            self.trace_id.clone().map_or(Value::Null, Value::String),
        );
        m.insert(
            "latency_ms".into(),
            self.latency_ms.map_or(Value::Null, Value::from),
        );
        m.insert("q_depth_in".into(), self.queue_depth_in.into());
        m.insert("q_depth_out".into(), self.queue_depth_out.into());
        m.insert("q_depth_total".into(), self.queue_depth().into());
        m.insert("outgoing".into(), self.outgoing_edges.into());
        m.insert("queue_maxsize".into(), self.queue_maxsize.into());
        m.insert("attempt".into(), self.attempt.into());
        m.insert("trace_inflight".into(), self.trace_inflight.into());
        m.insert("trace_cancelled".into(), self.trace_cancelled.into());
        if let Some(p) = self.trace_pending {
            m.insert("trace_pending".into(), p.into());
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// Receives every [`FlowEvent`] of a flow, awaited in registration order, inline in the
/// task that produced the event: keep it fast.
#[async_trait]
pub trait Middleware: Send + Sync + 'static {
    /// Called once per event.
    async fn on_event(&self, event: &FlowEvent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_uses_penguiflow_keys_and_merges_extra() {
        let mut extra = Map::new();
        extra.insert("sleep_s".into(), json!(0.5));
        let ev = FlowEvent {
            kind: EventKind::NodeRetry,
            ts: 1.0,
            node_name: "n".into(),
            node_id: "id".into(),
            trace_id: Some("t".into()),
            attempt: 1,
            latency_ms: None,
            queue_depth_in: 2,
            queue_depth_out: 3,
            outgoing_edges: 1,
            queue_maxsize: 64,
            trace_pending: Some(1),
            trace_inflight: 0,
            trace_cancelled: false,
            extra,
        };
        let p = Value::Object(ev.to_payload());
        assert_eq!(p["event"], "node_retry");
        assert_eq!(p["q_depth_total"], 5);
        assert_eq!(p["outgoing"], 1);
        assert_eq!(p["trace_pending"], 1);
        assert_eq!(p["latency_ms"], Value::Null);
        assert_eq!(p["sleep_s"], 0.5);
        assert_eq!(EventKind::NodeFailed.level(), tracing::Level::ERROR);
        assert_eq!(EventKind::NodeTimeout.level(), tracing::Level::WARN);
    }
}
