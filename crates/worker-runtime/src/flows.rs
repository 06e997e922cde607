//! Built-in flows of the `penguiflow-worker` command, for smoke tests and operations.
//!
//! * `echo`: returns its payload.
//! * `exercise`: its payload is an object that directs it:
//!   `{"sleep_ms": 100}` sleeps first; `{"fail_times": k}` fails the first `k` attempts
//!   with `NODE_EXCEPTION`; `{"fail": true}` always fails with `NODE_EXCEPTION`;
//!   `{"panic": true}` panics (`UNEXPECTED_ERROR`); `{"hang": true}` sleeps past any
//!   timeout (`JOB_TIMEOUT`). Other keys are carried along. A payload that is not such an
//!   object is `INVALID_PAYLOAD`. On success it returns
//!   `{"ok": true, "attempt": n, "payload": <the payload>}`.
//!
//! Test hook: when the environment variable `PENGUIFLOW_EXECUTION_LOG` names a file,
//! `exercise` appends one line `<job_id> <attempt>` to it at the start of every
//! execution, outside the queue, so a fault-injection harness (`cargo xtask chaos`) can
//! count how often each job really ran.

use std::time::Duration;

use flow_core::{BoxError, Context, Flow, InvalidPayload, Message, Node, create};
use serde::Deserialize;
use serde_json::{Value, json};

/// Names of the built-in flows.
pub const BUILTIN_FLOWS: &[&str] = &["echo", "exercise"];

/// The built-in flow called `name`, if there is one.
pub fn builtin(name: &str) -> Option<fn() -> Result<Flow, flow_core::Error>> {
    match name {
        "echo" => Some(echo_flow),
        "exercise" => Some(exercise_flow),
        _ => None,
    }
}

/// One node, `echo`, that returns its input.
pub fn echo_flow() -> Result<Flow, flow_core::Error> {
    let echo = Node::new("echo", |msg: Message, _ctx: Context| async move {
        Ok::<_, BoxError>(Some(msg))
    });
    create([echo.to(&[])]).build()
}

#[derive(Debug, Deserialize)]
struct Directions {
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail_times: u32,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    hang: bool,
}

/// How long `hang` sleeps: longer than any sensible job timeout.
const HANG: Duration = Duration::from_secs(7 * 24 * 3600);

/// One node, `exercise`, that does what its payload says (see the module docs).
pub fn exercise_flow() -> Result<Flow, flow_core::Error> {
    let node = Node::new("exercise", |msg: Message, _ctx: Context| async move {
        let attempt = msg.meta.get("attempt").and_then(Value::as_u64).unwrap_or(1);
        record_execution(&msg, attempt);
        if !msg.payload.is_object() {
            return Err(Box::new(InvalidPayload {
                type_name: "exercise directions (a JSON object)",
                reason: format!("got {}", kind_of(&msg.payload)),
            }) as BoxError);
        }
        let d: Directions = serde_json::from_value(msg.payload.clone()).map_err(|e| {
            Box::new(InvalidPayload {
                type_name: "exercise directions",
                reason: e.to_string(),
            }) as BoxError
        })?;
        if d.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(d.sleep_ms)).await;
        }
        if d.hang {
            tokio::time::sleep(HANG).await;
        }
        if d.panic {
            panic!("exercise flow directed to panic");
        }
        if d.fail {
            return Err(format!("exercise flow directed to fail (attempt {attempt})").into());
        }
        if attempt <= u64::from(d.fail_times) {
            return Err(format!(
                "exercise flow directed to fail the first {} attempt(s) (attempt {attempt})",
                d.fail_times
            )
            .into());
        }
        let out = json!({"ok": true, "attempt": attempt, "payload": msg.payload});
        Ok(Some(msg.with_payload(out)))
    });
    create([node.to(&[])]).build()
}

/// Environment variable naming the execution log of the `exercise` flow.
pub const EXECUTION_LOG_ENV: &str = "PENGUIFLOW_EXECUTION_LOG";

fn record_execution(msg: &Message, attempt: u64) {
    use std::io::Write;
    let Some(path) = std::env::var_os(EXECUTION_LOG_ENV) else {
        return;
    };
    let job = msg
        .meta
        .get("job_id")
        .and_then(Value::as_str)
        .unwrap_or(msg.trace_id.as_str());
    // One short line per write with O_APPEND: concurrent writers never interleave.
    let line = format!("{job} {attempt}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot append to the execution log");
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flow_core::testkit::run_one;
    use flow_core::{FlowErrorCode, Headers};

    fn msg(payload: Value, attempt: u64) -> Message {
        let mut m = Message::new(payload, Headers::new("t"));
        m.meta.insert("attempt".into(), json!(attempt));
        m
    }

    async fn code(payload: Value, attempt: u64) -> Option<FlowErrorCode> {
        let flow = exercise_flow().expect("builds");
        let run = run_one(flow, msg(payload, attempt), Duration::from_secs(2))
            .await
            .expect("runs");
        run.error().map(|e| e.code.clone())
    }

    #[tokio::test]
    async fn exercise_follows_its_directions() {
        assert_eq!(code(json!({}), 1).await, None);
        assert_eq!(code(json!({"n": 3}), 1).await, None);
        assert_eq!(
            code(json!({"fail_times": 2}), 2).await,
            Some(FlowErrorCode::NodeException)
        );
        assert_eq!(code(json!({"fail_times": 2}), 3).await, None);
        assert_eq!(
            code(json!({"fail": true}), 9).await,
            Some(FlowErrorCode::NodeException)
        );
        assert_eq!(
            code(json!({"panic": true}), 1).await,
            Some(FlowErrorCode::UnexpectedError)
        );
        for bad in [
            json!("text"),
            json!([1]),
            json!(3),
            json!(null),
            json!({"sleep_ms": "x"}),
        ] {
            assert_eq!(
                code(bad.clone(), 1).await,
                Some(FlowErrorCode::InvalidPayload),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn echo_returns_its_payload() {
        let run = run_one(
            echo_flow().expect("builds"),
            msg(json!({"a": 1}), 1),
            Duration::from_secs(1),
        )
        .await
        .expect("runs");
        assert_eq!(run.message().expect("message").payload, json!({"a": 1}));
    }

    #[test]
    fn builtins_are_listed() {
        for name in BUILTIN_FLOWS {
            assert!(builtin(name).is_some());
        }
        assert!(builtin("nope").is_none());
    }
}
