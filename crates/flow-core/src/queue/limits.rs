//! Size limits of a stored job, the same on every backend.
//!
//! At enqueue, [`NewJob::validate`] refuses a job whose payload is over the queue's
//! `max_payload_bytes` ([`Error::PayloadTooLarge`]) or any other field over its limit
//! below ([`Error::InvalidJob`] naming the field). What a job's attempts write is
//! bounded instead of refused, so an outcome is never lost for its size: a result over
//! [`MAX_RESULT_BYTES`] is stored as a [`truncated_marker`], and a failure's message and
//! details are cut down by [`Failure::bounded`]. Backends bound what they store
//! themselves; the worker bounds before it sends. So a stored job takes at most its
//! payload plus [`MAX_RECORD_OVERHEAD_BYTES`], far below anything a backend refuses
//! (PostgreSQL's `jsonb` and Redis strings take hundreds of megabytes).
//!
//! ```
//! use flow_core::queue::{bound_result, Failure, MAX_FAILURE_MESSAGE_BYTES, MAX_RESULT_BYTES};
//! use serde_json::json;
//!
//! let big = json!("x".repeat(MAX_RESULT_BYTES));
//! assert_eq!(
//!     bound_result(big),
//!     json!({"truncated": true, "original_bytes": MAX_RESULT_BYTES + 2, "limit_bytes": MAX_RESULT_BYTES})
//! );
//! let failure = Failure::new("NODE_EXCEPTION", "é".repeat(MAX_FAILURE_MESSAGE_BYTES)).bounded();
//! assert!(failure.message.len() <= MAX_FAILURE_MESSAGE_BYTES);
//! assert!(failure.message.ends_with("[truncated: 32768 bytes in all]"));
//! ```

use std::io;

use serde::Serialize;
use serde_json::Value;

use super::{Failure, NewJob, validate_queue_name};
use crate::error::Error;

/// Longest tenant, in bytes (UTF-8).
pub const MAX_TENANT_BYTES: usize = 256;
/// Longest dedupe key, in bytes (UTF-8). Far below PostgreSQL's index entry limit.
pub const MAX_DEDUPE_KEY_BYTES: usize = 512;
/// Most headers one job carries.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest header value, in bytes (W3C `baggage` may take 8,192).
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// Largest sum of the names and values of one job's headers, in bytes.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;
/// Largest result kept, as serialized JSON; a larger one is stored as a
/// [`truncated_marker`].
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Longest failure code kept, in bytes; a longer one is cut.
pub const MAX_FAILURE_CODE_BYTES: usize = 128;
/// Longest failure message kept, in bytes; a longer one is cut and ends with a
/// `[truncated: N bytes in all]` note.
pub const MAX_FAILURE_MESSAGE_BYTES: usize = 16 * 1024;
/// Largest failure details kept, as serialized JSON: longer strings inside are cut like
/// messages, and details still over it are stored as a [`truncated_marker`].
pub const MAX_FAILURE_DETAILS_BYTES: usize = 64 * 1024;
/// Longest queue name, in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 128;
/// Most jobs one `enqueue_many` call takes. The call is all or nothing, so the backend
/// holds all of it at once (one transaction, one `MULTI`): a bound keeps one call from
/// blocking a Redis server for long or growing one PostgreSQL transaction without end.
/// Split larger sets into several calls.
pub const MAX_JOBS_PER_CALL: usize = 100_000;

/// Refuses an `enqueue_many` of more than [`MAX_JOBS_PER_CALL`] jobs, naming the input.
pub fn check_batch_len(n: usize) -> Result<(), crate::Error> {
    if n > MAX_JOBS_PER_CALL {
        return Err(crate::Error::InvalidJob {
            option: "jobs",
            reason: format!(
                "{n} jobs in one enqueue_many call; at most {MAX_JOBS_PER_CALL}: split them into several calls"
            ),
        });
    }
    Ok(())
}
/// Everything a stored job may hold besides its payload: queue name, tenant, dedupe
/// key, headers, result and failure at their limits (the fixed-size fields, such as
/// ids, times and counters, come on top: a few hundred bytes).
pub const MAX_RECORD_OVERHEAD_BYTES: usize = MAX_QUEUE_NAME_BYTES
    + MAX_TENANT_BYTES
    + MAX_DEDUPE_KEY_BYTES
    + MAX_HEADERS_BYTES
    + MAX_RESULT_BYTES
    + MAX_FAILURE_CODE_BYTES
    + MAX_FAILURE_MESSAGE_BYTES
    + MAX_FAILURE_DETAILS_BYTES;

/// Counts the bytes written to it.
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The size of `value` serialized as compact JSON, without building the text.
pub fn json_size(value: &impl Serialize) -> Result<usize, serde_json::Error> {
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value)?;
    Ok(counter.0)
}

/// What is stored instead of a value of `original_bytes` over its limit of
/// `limit_bytes`: `{"truncated": true, "original_bytes": N, "limit_bytes": L}`.
pub fn truncated_marker(original_bytes: usize, limit_bytes: usize) -> Value {
    serde_json::json!({
        "truncated": true,
        "original_bytes": original_bytes,
        "limit_bytes": limit_bytes,
    })
}

/// A job's result as it is stored: `value` itself when its JSON takes at most
/// [`MAX_RESULT_BYTES`], else a [`truncated_marker`].
pub fn bound_result(value: Value) -> Value {
    match json_size(&value) {
        Ok(size) if size <= MAX_RESULT_BYTES => value,
        Ok(size) => truncated_marker(size, MAX_RESULT_BYTES),
        // Serializing a `Value` does not fail; should it, keep nothing of it.
        Err(_) => truncated_marker(0, MAX_RESULT_BYTES),
    }
}

/// Like [`bound_result`], for a result already serialized: `json` itself when it takes
/// at most [`MAX_RESULT_BYTES`], else the marker's JSON.
pub fn bound_result_json(json: String) -> String {
    if json.len() <= MAX_RESULT_BYTES {
        json
    } else {
        truncated_marker(json.len(), MAX_RESULT_BYTES).to_string()
    }
}

/// Cuts `text` to at most `limit` bytes on a character boundary. With `note`, the cut
/// text ends with ` … [truncated: N bytes in all]` (within the limit).
fn truncate_text(mut text: String, limit: usize, note: bool) -> String {
    if text.len() <= limit {
        return text;
    }
    let suffix = if note {
        format!(" … [truncated: {} bytes in all]", text.len())
    } else {
        String::new()
    };
    let mut keep = limit.saturating_sub(suffix.len());
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    text.truncate(keep);
    text.push_str(&suffix);
    text
}

/// Cuts every string in `value` longer than `limit` bytes (see [`truncate_text`]).
fn truncate_strings(value: Value, limit: usize) -> Value {
    match value {
        Value::String(s) => Value::String(truncate_text(s, limit, true)),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| truncate_strings(v, limit))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (truncate_text(k, limit, true), truncate_strings(v, limit)))
                .collect(),
        ),
        other => other,
    }
}

/// Details as they are stored (see [`MAX_FAILURE_DETAILS_BYTES`]).
fn bound_details(details: Value) -> Value {
    let size = match json_size(&details) {
        Ok(size) if size <= MAX_FAILURE_DETAILS_BYTES => return details,
        Ok(size) => size,
        Err(_) => return truncated_marker(0, MAX_FAILURE_DETAILS_BYTES),
    };
    let cut = truncate_strings(details, MAX_FAILURE_MESSAGE_BYTES);
    match json_size(&cut) {
        Ok(n) if n <= MAX_FAILURE_DETAILS_BYTES => cut,
        _ => truncated_marker(size, MAX_FAILURE_DETAILS_BYTES),
    }
}

impl Failure {
    /// The failure as it is stored: the code cut to [`MAX_FAILURE_CODE_BYTES`], the
    /// message to [`MAX_FAILURE_MESSAGE_BYTES`] (on a character boundary, ending with a
    /// `[truncated: N bytes in all]` note), and details over
    /// [`MAX_FAILURE_DETAILS_BYTES`] cut down (long strings inside cut like the message,
    /// else replaced by a [`truncated_marker`]). A failure within the limits is
    /// returned unchanged.
    pub fn bounded(self) -> Self {
        Self {
            code: truncate_text(self.code, MAX_FAILURE_CODE_BYTES, false),
            message: truncate_text(self.message, MAX_FAILURE_MESSAGE_BYTES, true),
            details: self.details.map(bound_details),
        }
    }
}

fn too_long(what: &str, len: usize, limit: usize) -> String {
    format!("{what} is {len} bytes; the limit is {limit} bytes")
}

impl NewJob {
    /// Checks every field but the payload: the queue name, and the tenant, dedupe key
    /// and headers against their limits ([`MAX_TENANT_BYTES`], [`MAX_DEDUPE_KEY_BYTES`],
    /// [`MAX_HEADERS`], [`MAX_HEADER_NAME_BYTES`], [`MAX_HEADER_VALUE_BYTES`],
    /// [`MAX_HEADERS_BYTES`]). [`NewJob::validate`] calls it after checking the payload;
    /// a backend that serializes the payload itself checks its size and calls this.
    ///
    /// ```
    /// use flow_core::{Error, queue::{NewJob, MAX_TENANT_BYTES}};
    /// use serde_json::json;
    ///
    /// let at_limit = NewJob::new("q", json!(1)).tenant("t".repeat(MAX_TENANT_BYTES));
    /// assert!(at_limit.validate_fields().is_ok());
    /// let over = NewJob::new("q", json!(1)).tenant("t".repeat(MAX_TENANT_BYTES + 1));
    /// assert!(matches!(over.validate_fields(), Err(Error::InvalidJob { option: "tenant", .. })));
    /// ```
    pub fn validate_fields(&self) -> Result<(), Error> {
        validate_queue_name(&self.queue)?;
        let invalid = |option: &'static str, reason: String| Error::InvalidJob { option, reason };
        if self.tenant.is_empty() {
            return Err(invalid("tenant", "must not be empty".into()));
        }
        if self.tenant.len() > MAX_TENANT_BYTES {
            return Err(invalid(
                "tenant",
                too_long("it", self.tenant.len(), MAX_TENANT_BYTES),
            ));
        }
        if let Some(key) = &self.dedupe_key {
            if key.is_empty() {
                return Err(invalid("dedupe_key", "must not be empty when given".into()));
            }
            if key.len() > MAX_DEDUPE_KEY_BYTES {
                return Err(invalid(
                    "dedupe_key",
                    too_long("it", key.len(), MAX_DEDUPE_KEY_BYTES),
                ));
            }
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(invalid(
                "headers",
                format!(
                    "there are {} headers; the limit is {MAX_HEADERS}",
                    self.headers.len()
                ),
            ));
        }
        let mut total = 0;
        for (name, value) in &self.headers {
            if name.len() > MAX_HEADER_NAME_BYTES {
                let shown = truncate_text(name.clone(), 32, false);
                return Err(invalid(
                    "headers",
                    too_long(
                        &format!("the name {shown:?}…"),
                        name.len(),
                        MAX_HEADER_NAME_BYTES,
                    ),
                ));
            }
            if value.len() > MAX_HEADER_VALUE_BYTES {
                return Err(invalid(
                    "headers",
                    too_long(
                        &format!("the value of {name:?}"),
                        value.len(),
                        MAX_HEADER_VALUE_BYTES,
                    ),
                ));
            }
            total += name.len() + value.len();
        }
        if total > MAX_HEADERS_BYTES {
            return Err(invalid(
                "headers",
                too_long(
                    "the sum of their names and values",
                    total,
                    MAX_HEADERS_BYTES,
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_are_counted_without_building_the_text() {
        let v = json!({"a": [1, "é", null], "b": {"c": true}});
        assert_eq!(json_size(&v).ok(), Some(v.to_string().len()));
    }

    #[test]
    fn results_at_the_limit_are_kept_and_over_it_replaced() {
        let at = json!("x".repeat(MAX_RESULT_BYTES - 2));
        assert_eq!(bound_result(at.clone()), at);
        let over = json!("x".repeat(MAX_RESULT_BYTES - 1));
        assert_eq!(
            bound_result(over.clone()),
            truncated_marker(MAX_RESULT_BYTES + 1, MAX_RESULT_BYTES)
        );
        assert_eq!(bound_result_json(at.to_string()), at.to_string());
        assert_eq!(
            bound_result_json(over.to_string()),
            truncated_marker(MAX_RESULT_BYTES + 1, MAX_RESULT_BYTES).to_string()
        );
    }

    #[test]
    fn messages_are_cut_on_a_char_boundary_with_a_note() {
        let small = Failure::new("CODE", "short");
        assert_eq!(small.clone().bounded(), small);
        // Three-byte characters: the cut must not split one.
        let long = "€".repeat(MAX_FAILURE_MESSAGE_BYTES);
        let cut = Failure::new("CODE", long.clone()).bounded();
        assert!(
            cut.message.len() <= MAX_FAILURE_MESSAGE_BYTES,
            "{}",
            cut.message.len()
        );
        assert!(cut.message.len() > MAX_FAILURE_MESSAGE_BYTES - 64);
        assert!(
            cut.message
                .ends_with(&format!(" … [truncated: {} bytes in all]", long.len()))
        );
        assert!(long.starts_with(cut.message.split(' ').next().unwrap_or("")));
        let code = Failure::new("C".repeat(1000), "m").bounded();
        assert_eq!(code.code.len(), MAX_FAILURE_CODE_BYTES);
    }

    #[test]
    fn details_keep_their_shape_when_cutting_strings_suffices() {
        let message = "m".repeat(5 * 1024 * 1024);
        let details = json!({"code": "NODE_EXCEPTION", "message": message, "node_name": "n"});
        let bounded = Failure {
            code: "NODE_EXCEPTION".into(),
            message,
            details: Some(details),
        }
        .bounded();
        let details = bounded.details.expect("details");
        assert_eq!(details["code"], "NODE_EXCEPTION");
        assert_eq!(details["node_name"], "n");
        let kept = details["message"].as_str().expect("message");
        assert!(kept.len() <= MAX_FAILURE_MESSAGE_BYTES);
        assert!(kept.ends_with("[truncated: 5242880 bytes in all]"));
        // Many strings, each under the cut: the whole is replaced.
        let many: Vec<String> = (0..100).map(|_| "y".repeat(1000)).collect();
        let size = json_size(&many).unwrap_or(0);
        let bounded = Failure {
            code: "X".into(),
            message: "m".into(),
            details: Some(json!(many)),
        }
        .bounded();
        assert_eq!(
            bounded.details,
            Some(truncated_marker(size, MAX_FAILURE_DETAILS_BYTES))
        );
    }

    #[test]
    fn every_field_is_checked_at_its_limit() {
        let base = || NewJob::new("q", json!(1));
        let option_of = |job: NewJob| match job.validate_fields() {
            Ok(()) => None,
            Err(Error::InvalidJob { option, .. }) => Some(option),
            Err(other) => panic!("unexpected {other}"),
        };
        assert_eq!(option_of(base().tenant("t".repeat(MAX_TENANT_BYTES))), None);
        assert_eq!(
            option_of(base().tenant("t".repeat(MAX_TENANT_BYTES + 1))),
            Some("tenant")
        );
        assert_eq!(
            option_of(base().dedupe_key("k".repeat(MAX_DEDUPE_KEY_BYTES))),
            None
        );
        assert_eq!(
            option_of(base().dedupe_key("k".repeat(MAX_DEDUPE_KEY_BYTES + 1))),
            Some("dedupe_key")
        );
        let mut many = base();
        for i in 0..MAX_HEADERS {
            many = many.header(format!("h{i}"), "v");
        }
        assert_eq!(option_of(many.clone()), None);
        assert_eq!(option_of(many.header("one-more", "v")), Some("headers"));
        assert_eq!(
            option_of(base().header("n".repeat(MAX_HEADER_NAME_BYTES), "v")),
            None
        );
        assert_eq!(
            option_of(base().header("n".repeat(MAX_HEADER_NAME_BYTES + 1), "v")),
            Some("headers")
        );
        assert_eq!(
            option_of(base().header("n", "v".repeat(MAX_HEADER_VALUE_BYTES))),
            None
        );
        assert_eq!(
            option_of(base().header("n", "v".repeat(MAX_HEADER_VALUE_BYTES + 1))),
            Some("headers")
        );
        let half = MAX_HEADERS_BYTES / 2 - 1;
        let full = base()
            .header("a", "v".repeat(half))
            .header("b", "v".repeat(half));
        assert_eq!(option_of(full.clone()), None);
        assert_eq!(option_of(full.header("c", "")), Some("headers"));
    }
}
