//! Errors: [`FlowError`], the terminal failure of a trace (data, stored with a job), and
//! [`Error`], what this crate's functions return when a call itself fails.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A boxed error, as node functions return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The code of a [`FlowError`]. Serialises as its string form (`"NODE_TIMEOUT"`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FlowErrorCode {
    /// A node's attempts all timed out (the runtime's timer, not the node's own errors).
    NodeTimeout,
    /// A node's attempts all failed with an error.
    NodeException,
    /// The trace was cancelled.
    TraceCancelled,
    /// The message's deadline passed before a node could run it.
    DeadlineExceeded,
    /// The worker's job timeout expired.
    JobTimeout,
    /// The payload does not decode into the flow's input type. Never retried.
    InvalidPayload,
    /// A panic or an internal failure: a bug, never retried by default.
    UnexpectedError,
    /// PenguiFlow's hop budget code (controller loops).
    HopBudgetExhausted,
    /// PenguiFlow's token budget code (controller loops).
    TokenBudgetExhausted,
    /// Any other code, as PenguiFlow accepts arbitrary strings.
    Custom(String),
}

impl FlowErrorCode {
    /// The wire form, such as `"NODE_TIMEOUT"`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::NodeTimeout => "NODE_TIMEOUT",
            Self::NodeException => "NODE_EXCEPTION",
            Self::TraceCancelled => "TRACE_CANCELLED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::JobTimeout => "JOB_TIMEOUT",
            Self::InvalidPayload => "INVALID_PAYLOAD",
            Self::UnexpectedError => "UNEXPECTED_ERROR",
            Self::HopBudgetExhausted => "HOP_BUDGET_EXHAUSTED",
            Self::TokenBudgetExhausted => "TOKEN_BUDGET_EXHAUSTED",
            Self::Custom(s) => s,
        }
    }

    /// Parses a wire form; unknown strings become [`FlowErrorCode::Custom`].
    pub fn parse(s: &str) -> Self {
        match s {
            "NODE_TIMEOUT" => Self::NodeTimeout,
            "NODE_EXCEPTION" => Self::NodeException,
            "TRACE_CANCELLED" => Self::TraceCancelled,
            "DEADLINE_EXCEEDED" => Self::DeadlineExceeded,
            "JOB_TIMEOUT" => Self::JobTimeout,
            "INVALID_PAYLOAD" => Self::InvalidPayload,
            "UNEXPECTED_ERROR" => Self::UnexpectedError,
            "HOP_BUDGET_EXHAUSTED" => Self::HopBudgetExhausted,
            "TOKEN_BUDGET_EXHAUSTED" => Self::TokenBudgetExhausted,
            other => Self::Custom(other.to_owned()),
        }
    }
}

impl fmt::Display for FlowErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FlowErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FlowErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// The terminal failure of a trace, in PenguiFlow's shape.
///
/// ```
/// use flow_core::{FlowError, FlowErrorCode};
///
/// let err = FlowError::new(FlowErrorCode::NodeException, "Node 'fetch' raised IoError: reset")
///     .with_node("fetch", "n1");
/// let payload = err.to_payload();
/// assert_eq!(payload["code"], "NODE_EXCEPTION");
/// assert_eq!(payload["node_name"], "fetch");
/// assert!(payload.get("trace_id").is_none()); // absent fields are left out
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("[{code}] {message}")]
pub struct FlowError {
    /// What kind of failure.
    pub code: FlowErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The trace that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The node that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The id of the node that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The type name of the underlying error, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception_type: Option<String>,
    /// Extra facts: `attempt`, `latency_ms`, `timeout_s`, `exception_repr`, ...
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

impl FlowError {
    /// An error with a code and a message and nothing else.
    pub fn new(code: FlowErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            trace_id: None,
            node_name: None,
            node_id: None,
            exception_type: None,
            metadata: Map::new(),
        }
    }

    /// Sets the trace id.
    pub fn with_trace(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }

    /// Sets the node name and id.
    pub fn with_node(mut self, name: impl Into<String>, id: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self.node_id = Some(id.into());
        self
    }

    /// Adds one metadata entry.
    pub fn with_meta(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// PenguiFlow's `to_payload()`: `code` and `message` always; `trace_id`, `node_name`,
    /// `node_id`, `exception_type` and `metadata` only when present and non-empty.
    pub fn to_payload(&self) -> Value {
        let mut m = Map::new();
        m.insert("code".into(), Value::String(self.code.as_str().to_owned()));
        m.insert("message".into(), Value::String(self.message.clone()));
        let opt = [
            ("trace_id", &self.trace_id),
            ("node_name", &self.node_name),
            ("node_id", &self.node_id),
            ("exception_type", &self.exception_type),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        }
        if !self.metadata.is_empty() {
            m.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        Value::Object(m)
    }

    /// Decodes a payload produced by [`FlowError::to_payload`].
    pub fn from_payload(value: &Value) -> Option<Self> {
        serde_json::from_value(value.clone()).ok()
    }
}

/// A payload that does not decode into a node's input type.
///
/// A node that returns this error (boxed) fails at once with `INVALID_PAYLOAD`: it is
/// never retried, by the node or by the worker. Typed nodes return it for you.
#[derive(Debug, thiserror::Error)]
#[error("payload does not decode into {type_name}: {reason}")]
pub struct InvalidPayload {
    /// The Rust type the payload was meant to decode into.
    pub type_name: &'static str,
    /// Why it did not decode (serde's message; never the payload itself).
    pub reason: String,
}

/// Everything that can go wrong calling into this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two nodes share a name; node names identify nodes in routing, events and metrics.
    #[error("duplicate node name {0:?}: give every node of a flow its own name")]
    DuplicateNodeName(String),
    /// A graph has a cycle through nodes that do not allow one.
    #[error(
        "the flow has a cycle through {0:?}: mark the node with allow_cycle() or break the loop"
    )]
    Cycle(String),
    /// An edge or a routing call names a node the flow does not have.
    #[error("unknown node {0:?}: it is not part of this flow")]
    UnknownNode(String),
    /// `Flow::run` was called outside a tokio runtime.
    #[error("no tokio runtime: call Flow::run from within a tokio runtime")]
    NoRuntime,
    /// The flow was stopped; nothing more will come out of it.
    #[error("the flow is stopped")]
    Stopped,
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// An edge queue is full (only from non-waiting emits).
    #[error("queue of node {0:?} is full")]
    QueueFull(String),

    /// A queue name breaks the naming rule.
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A payload is larger than the backend accepts.
    #[error(
        "payload of {size} bytes exceeds the limit of {limit} bytes: store large data elsewhere and enqueue a reference"
    )]
    PayloadTooLarge {
        /// Serialized size of the payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A job option is out of range.
    #[error("invalid job option {option}: {reason}")]
    InvalidJob {
        /// The option at fault.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The lease is no longer valid: it expired and the job was leased again, or the job
    /// reached another state. The outcome was not recorded; another holder owns the job.
    #[error("lease on job {job_id} is stale: the job was reclaimed or finished elsewhere")]
    LeaseLost {
        /// The job the lease was for.
        job_id: String,
    },
    /// No such job in that queue (it may have expired after its retention time).
    #[error("job {job_id} not found in queue {queue:?}")]
    JobNotFound {
        /// The queue searched.
        queue: String,
        /// The job asked for.
        job_id: String,
    },
    /// The job is in a state that does not allow the operation.
    #[error("job {job_id} is {state}, cannot {operation}")]
    InvalidState {
        /// The job.
        job_id: String,
        /// Its current state.
        state: String,
        /// What was asked.
        operation: &'static str,
    },
    /// The backend could not be reached; retry with backoff.
    #[error("queue backend unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The backend answered with an error.
    #[error("queue backend error: {0}")]
    Backend(#[source] BoxError),
    /// A stored record could not be decoded.
    #[error("corrupt job record {job_id}: {reason}")]
    Corrupt {
        /// The record's job id.
        job_id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether retrying the same call later may succeed (backend outages).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn codes_round_trip_as_strings() {
        for code in [
            FlowErrorCode::NodeTimeout,
            FlowErrorCode::NodeException,
            FlowErrorCode::TraceCancelled,
            FlowErrorCode::DeadlineExceeded,
            FlowErrorCode::JobTimeout,
            FlowErrorCode::InvalidPayload,
            FlowErrorCode::UnexpectedError,
            FlowErrorCode::Custom("MY_CODE".into()),
        ] {
            let v = serde_json::to_value(&code).expect("encodes");
            assert_eq!(v, json!(code.as_str()));
            let back: FlowErrorCode = serde_json::from_value(v).expect("decodes");
            assert_eq!(back, code);
        }
    }

    #[test]
    fn payload_has_penguiflow_shape() {
        let e = FlowError::new(FlowErrorCode::NodeTimeout, "Node 'a' timed out after 1.00s")
            .with_trace("t")
            .with_node("a", "id1")
            .with_meta("attempt", 2);
        assert_eq!(
            e.to_payload(),
            json!({"code": "NODE_TIMEOUT", "message": "Node 'a' timed out after 1.00s",
                   "trace_id": "t", "node_name": "a", "node_id": "id1",
                   "metadata": {"attempt": 2}})
        );
        assert_eq!(FlowError::from_payload(&e.to_payload()), Some(e));
    }
}
