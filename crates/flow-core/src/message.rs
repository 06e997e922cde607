//! The message envelope that travels through a flow: [`Message`] and [`Headers`].
//!
//! Field names on the wire match PenguiFlow's (`payload`, `headers`, `trace_id`, `ts`,
//! `deadline_s`, `meta`), so a message serialised by a Python producer decodes here and
//! the other way round.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Routing and scheduling headers of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers {
    /// The tenant the message belongs to. Required, as in PenguiFlow.
    pub tenant: String,
    /// An optional topic, free for the application to use.
    #[serde(default)]
    pub topic: Option<String>,
    /// Priority hint; lower runs first when the message becomes a job.
    #[serde(default)]
    pub priority: i32,
}

impl Headers {
    /// Headers for `tenant`, with no topic and priority 0.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            topic: None,
            priority: 0,
        }
    }
}

/// The envelope every node receives and returns.
///
/// ```
/// use flow_core::{Headers, Message};
/// use serde_json::json;
///
/// let msg = Message::new(json!({"topic": "rust"}), Headers::new("acme"));
/// assert_eq!(msg.trace_id.len(), 32);
/// let next = msg.with_payload(json!("done"));
/// assert_eq!(next.trace_id, msg.trace_id); // the envelope is kept
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The application data.
    pub payload: Value,
    /// Tenant, topic and priority.
    pub headers: Headers,
    /// The trace this message belongs to: 32 lowercase hex characters by default.
    #[serde(default = "new_trace_id")]
    pub trace_id: String,
    /// Creation time, in seconds since the Unix epoch.
    #[serde(default = "now_epoch_s")]
    pub ts: f64,
    /// Absolute deadline, in seconds since the Unix epoch (not a duration).
    #[serde(default)]
    pub deadline_s: Option<f64>,
    /// Trace-local metadata. Put dependencies in closures, not here.
    #[serde(default)]
    pub meta: Map<String, Value>,
}

impl Message {
    /// A message with a fresh trace id, created now, without deadline or metadata.
    pub fn new(payload: Value, headers: Headers) -> Self {
        Self {
            payload,
            headers,
            trace_id: new_trace_id(),
            ts: now_epoch_s(),
            deadline_s: None,
            meta: Map::new(),
        }
    }

    /// Replaces the trace id.
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = trace_id.into();
        self
    }

    /// Sets the absolute deadline to now plus `within`.
    pub fn with_deadline_in(mut self, within: Duration) -> Self {
        self.deadline_s = Some(now_epoch_s() + within.as_secs_f64());
        self
    }

    /// A copy of this envelope (headers, trace, deadline, metadata) carrying `payload`.
    pub fn with_payload(&self, payload: Value) -> Self {
        Self {
            payload,
            headers: self.headers.clone(),
            trace_id: self.trace_id.clone(),
            ts: self.ts,
            deadline_s: self.deadline_s,
            meta: self.meta.clone(),
        }
    }

    /// Whether the deadline has passed (strictly), as PenguiFlow checks it.
    pub fn deadline_expired(&self) -> bool {
        self.deadline_s.is_some_and(|d| now_epoch_s() > d)
    }
}

/// A fresh trace id: 32 lowercase hex characters (128 random bits).
///
/// The bits come from a per-thread generator seeded once, not from the operating system
/// on every call: ids only need to be unique, and a system call per id showed up in
/// profiles of short jobs.
pub fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// The current time in seconds since the Unix epoch.
pub fn now_epoch_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_with_penguiflow_field_names() {
        let raw = json!({
            "payload": {"q": 1},
            "headers": {"tenant": "t1", "topic": null, "priority": 2},
            "trace_id": "abc",
            "ts": 1.5,
            "deadline_s": 10.0,
            "meta": {"k": "v"}
        });
        let msg: Message = serde_json::from_value(raw.clone()).expect("decodes");
        assert_eq!(msg.headers.priority, 2);
        assert_eq!(msg.deadline_s, Some(10.0));
        assert_eq!(serde_json::to_value(&msg).expect("encodes"), raw);
    }

    #[test]
    fn missing_optional_fields_get_defaults() {
        let msg: Message =
            serde_json::from_value(json!({"payload": 1, "headers": {"tenant": "t"}}))
                .expect("decodes");
        assert_eq!(msg.trace_id.len(), 32);
        assert!(msg.deadline_s.is_none());
        assert!(!msg.deadline_expired());
    }
}
