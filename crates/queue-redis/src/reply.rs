//! Decoding script replies and stored job records.

use std::collections::{BTreeMap, HashMap};

use flow_core::queue::{DeadLetter, Failure, JobId, JobInfo, JobState};
use redis::Value;
use serde_json::Value as Json;

use crate::error::Error;

/// Reads the values of a script's array reply one by one.
pub(crate) struct Reply<'a> {
    items: &'a [Value],
    pos: usize,
    script: &'static str,
}

impl<'a> Reply<'a> {
    /// The items of an array reply.
    pub(crate) fn new(value: &'a Value, script: &'static str) -> Result<Self, Error> {
        match value {
            Value::Array(items) | Value::Set(items) => Ok(Self {
                items,
                pos: 0,
                script,
            }),
            other => Err(Error::Reply {
                script,
                reason: format!("expected an array, got {}", kind(other)),
            }),
        }
    }

    /// Values not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.items.len().saturating_sub(self.pos)
    }

    /// The next value, whatever it is.
    pub(crate) fn value(&mut self) -> Result<&'a Value, Error> {
        let v = self.items.get(self.pos).ok_or_else(|| Error::Reply {
            script: self.script,
            reason: format!("the reply ended after {} values", self.items.len()),
        })?;
        self.pos += 1;
        Ok(v)
    }

    /// The next value as an integer.
    pub(crate) fn int(&mut self) -> Result<i64, Error> {
        let script = self.script;
        let v = self.value()?;
        as_i64(v).ok_or_else(|| Error::Reply {
            script,
            reason: format!("expected an integer, got {}", kind(v)),
        })
    }

    /// The next value as text.
    pub(crate) fn string(&mut self) -> Result<String, Error> {
        let script = self.script;
        let v = self.value()?;
        as_string(v).ok_or_else(|| Error::Reply {
            script,
            reason: format!("expected text, got {}", kind(v)),
        })
    }

    /// The next value as bytes; `None` for a missing field (Lua `false`, a nil reply).
    pub(crate) fn bytes(&mut self) -> Result<Option<Vec<u8>>, Error> {
        Ok(as_bytes(self.value()?))
    }
}

/// Reads the values of a script's array reply one by one, taking them out of the reply
/// (no copies of the bytes).
pub(crate) struct OwnedReply {
    items: std::vec::IntoIter<Value>,
    script: &'static str,
}

impl OwnedReply {
    /// The items of an array reply.
    pub(crate) fn new(value: Value, script: &'static str) -> Result<Self, Error> {
        match value {
            Value::Array(items) | Value::Set(items) => Ok(Self {
                items: items.into_iter(),
                script,
            }),
            other => Err(Error::Reply {
                script,
                reason: format!("expected an array, got {}", kind(&other)),
            }),
        }
    }

    /// Values not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.items.len()
    }

    fn value(&mut self) -> Result<Value, Error> {
        self.items.next().ok_or_else(|| Error::Reply {
            script: self.script,
            reason: "the reply ended too early".into(),
        })
    }

    /// The next value as an integer.
    pub(crate) fn int(&mut self) -> Result<i64, Error> {
        let v = self.value()?;
        as_i64(&v).ok_or_else(|| Error::Reply {
            script: self.script,
            reason: format!("expected an integer, got {}", kind(&v)),
        })
    }

    /// The next value as text.
    pub(crate) fn string(&mut self) -> Result<String, Error> {
        let v = self.value()?;
        match v {
            Value::BulkString(b) => String::from_utf8(b).map_err(|_| Error::Reply {
                script: self.script,
                reason: "expected text, got bytes that are not UTF-8".into(),
            }),
            other => as_string(&other).ok_or_else(|| Error::Reply {
                script: self.script,
                reason: format!("expected text, got {}", kind(&other)),
            }),
        }
    }

    /// The next value as an array, read the same way.
    pub(crate) fn array(&mut self) -> Result<OwnedReply, Error> {
        let v = self.value()?;
        OwnedReply::new(v, self.script)
    }

    /// The next value as bytes; `None` for a missing field (Lua `false`, a nil reply).
    pub(crate) fn bytes(&mut self) -> Result<Option<Vec<u8>>, Error> {
        Ok(match self.value()? {
            Value::BulkString(b) => Some(b),
            other => as_bytes(&other),
        })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => "text",
        Value::Array(_) | Value::Set(_) => "an array",
        Value::ServerError(_) => "an error",
        _ => "another type",
    }
}

/// Bytes of a string or integer reply; `None` for nil.
pub(crate) fn as_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

/// Text of a string or integer reply (UTF-8 only).
pub(crate) fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// An integer reply, or a string holding an integer.
pub(crate) fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.trim().parse().ok()),
    }
}

/// The fields of a stored job record (from `HGETALL`), with their raw values.
pub(crate) struct Record(HashMap<String, Vec<u8>>);

impl Record {
    /// Reads a flat `field, value, field, value...` array (or a RESP3 map).
    pub(crate) fn from_value(v: &Value, script: &'static str) -> Result<Self, Error> {
        let mut map = HashMap::new();
        match v {
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    if let (Some(k), Some(v)) = (as_string(k), as_bytes(v)) {
                        map.insert(k, v);
                    }
                }
            }
            other => {
                let mut reply = Reply::new(other, script)?;
                while reply.remaining() >= 2 {
                    let k = reply.string()?;
                    if let Some(v) = reply.bytes()? {
                        map.insert(k, v);
                    }
                }
            }
        }
        Ok(Self(map))
    }

    /// Whether the record has no field at all (it does not exist).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn text(&self, field: &'static str) -> Result<Option<&str>, String> {
        match self.0.get(field) {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(Some)
                .map_err(|_| format!("{field} is not UTF-8")),
        }
    }

    fn opt_number<T: std::str::FromStr>(&self, field: &'static str) -> Result<Option<T>, String> {
        match self.text(field)? {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("{field} is not a valid number")),
        }
    }

    fn opt_json<T: serde::de::DeserializeOwned>(
        &self,
        field: &'static str,
    ) -> Result<Option<T>, String> {
        match self.0.get(field) {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(raw)
                .map(Some)
                .map_err(|e| format!("{field} is not valid JSON: {e}")),
        }
    }

    /// The state field, if readable.
    pub(crate) fn state(&self) -> Option<JobState> {
        self.text("state").ok().flatten().and_then(parse_state)
    }

    /// The immutable part of the job: its `job` field, or the fields of a record written
    /// before that field existed.
    fn packed(&self) -> Result<Packed, String> {
        match self.0.get("job") {
            Some(raw) => decode_job(raw),
            None => decode_legacy(
                [
                    "payload",
                    "tenant",
                    "priority",
                    "max_retries",
                    "headers",
                    "created_at_ms",
                ]
                .map(|f| self.0.get(f).map(Vec::as_slice)),
            ),
        }
    }

    /// Decodes the whole record. `Err` names what is wrong (never the content).
    pub(crate) fn info(&self, queue: &str, id: JobId) -> Result<JobInfo, String> {
        let state = self
            .state()
            .ok_or_else(|| "state is missing or unknown".to_owned())?;
        let packed = self.packed()?;
        Ok(JobInfo {
            id,
            queue: queue.to_owned(),
            state,
            // Absent until the first fetch.
            attempts: self.opt_number("attempts")?.unwrap_or(0),
            max_retries: packed.max_retries,
            priority: packed.priority,
            tenant: packed.tenant,
            payload: packed.payload,
            result: self.opt_json("result")?,
            error: self.opt_json("error")?,
            created_at_ms: packed.created_at_ms,
            // Absent for a job that was ready at once: it ran from its creation.
            run_at_ms: self
                .opt_number("run_at_ms")?
                .unwrap_or(packed.created_at_ms),
            finished_at_ms: self.opt_number("finished_at_ms")?,
            lease_expiries: self.opt_number("lease_expiries")?.unwrap_or(0),
            cancel_requested: self.text("cancel_requested")? == Some("1"),
            dedupe_key: self.text("dedupe_key")?.map(str::to_owned),
            headers: packed.headers,
        })
    }

    /// Decodes what can be decoded, for records in the dead-letter set (where corrupt
    /// records go): unreadable numbers become 0, an unreadable job is kept as text.
    pub(crate) fn info_lenient(&self, queue: &str, id: JobId) -> JobInfo {
        let number = |field| self.opt_number::<i64>(field).ok().flatten().unwrap_or(0);
        let small = |field| u32::try_from(number(field).max(0)).unwrap_or(u32::MAX);
        let packed = self.packed().unwrap_or_else(|_| match self.0.get("job") {
            Some(raw) => lenient_packed(raw),
            None => Packed {
                created_at_ms: number("created_at_ms"),
                priority: i32::try_from(number("priority")).unwrap_or(0),
                max_retries: small("max_retries"),
                tenant: self
                    .text("tenant")
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_owned(),
                headers: self
                    .opt_json::<BTreeMap<String, String>>("headers")
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
                payload: lenient_json(self.0.get("payload").map(Vec::as_slice)),
            },
        });
        JobInfo {
            id,
            queue: queue.to_owned(),
            state: self.state().unwrap_or(JobState::Dead),
            attempts: small("attempts"),
            max_retries: packed.max_retries,
            priority: packed.priority,
            tenant: packed.tenant,
            payload: packed.payload,
            result: self.opt_json("result").ok().flatten(),
            error: self.opt_json("error").ok().flatten(),
            created_at_ms: packed.created_at_ms,
            run_at_ms: self
                .opt_number("run_at_ms")
                .ok()
                .flatten()
                .unwrap_or(packed.created_at_ms),
            finished_at_ms: self.opt_number("finished_at_ms").ok().flatten(),
            lease_expiries: small("lease_expiries"),
            cancel_requested: self.text("cancel_requested").ok().flatten() == Some("1"),
            dedupe_key: self.text("dedupe_key").ok().flatten().map(str::to_owned),
            headers: packed.headers,
        }
    }
}

/// What can be read of a job field that does not decode: the numbers that parse (else
/// 0), and the whole field as the payload (a JSON string), for whoever inspects it.
fn lenient_packed(raw: &[u8]) -> Packed {
    let mut parts = raw.splitn(4, |&b| b == b',');
    let mut number = || {
        parts
            .next()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let created_at_ms = number();
    let priority = i32::try_from(number()).unwrap_or(0);
    let max_retries = u32::try_from(number().max(0)).unwrap_or(u32::MAX);
    Packed {
        created_at_ms,
        priority,
        max_retries,
        tenant: String::new(),
        headers: BTreeMap::new(),
        payload: Json::String(String::from_utf8_lossy(raw).into_owned()),
    }
}

/// JSON if it parses, else the raw text as a JSON string, else null.
pub(crate) fn lenient_json(raw: Option<&[u8]>) -> Json {
    match raw {
        None => Json::Null,
        Some(raw) => serde_json::from_slice(raw)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(raw).into_owned())),
    }
}

/// The immutable part of a job, as the `job` field of its record stores it:
/// `<created_at_ms>,<priority>,<max_retries>,<JSON [tenant, headers, payload]>`. One field
/// instead of six keeps the hot paths short: every field costs in every `HSET`, `HMGET`
/// and reply that touches it. The numbers come first, so scripts can read priority and
/// max_retries with a pattern; the creation time is the server's, prepended by the
/// enqueue script to the rest, which the client encodes ([`encode_job`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Packed {
    pub(crate) created_at_ms: i64,
    pub(crate) priority: i32,
    pub(crate) max_retries: u32,
    pub(crate) tenant: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) payload: Json,
}

/// Appends the client's part of a job field: `,<priority>,<max_retries>,<JSON>`.
pub(crate) fn encode_job(
    out: &mut Vec<u8>,
    priority: i32,
    max_retries: u32,
    tenant: &str,
    headers: &BTreeMap<String, String>,
    payload: &Json,
) -> Result<(), serde_json::Error> {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, ",{priority},{max_retries},");
    serde_json::to_writer(&mut *out, &(tenant, headers, payload))
}

/// Decodes a job field. `Err` says what is wrong with it (never its content).
pub(crate) fn decode_job(raw: &[u8]) -> Result<Packed, String> {
    fn number<T: std::str::FromStr>(part: Option<&[u8]>, name: &str) -> Result<T, String> {
        std::str::from_utf8(part.unwrap_or_default())
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("job: {name} is missing or not a number"))
    }
    let mut parts = raw.splitn(4, |&b| b == b',');
    let created_at_ms = number(parts.next(), "the creation time");
    let priority = number(parts.next(), "the priority");
    let max_retries = number(parts.next(), "max_retries");
    let rest = parts.next().unwrap_or_default();
    let parts = serde_json::from_slice::<(Json, Json, Json)>(rest)
        .map_err(|e| format!("job: [tenant, headers, payload] is not valid JSON: {e}"))
        .and_then(|(tenant, headers, payload)| {
            let Json::String(tenant) = tenant else {
                return Err("job: the tenant is not a string".to_owned());
            };
            let headers = serde_json::from_value::<BTreeMap<String, String>>(headers)
                .map_err(|e| format!("job: the headers are not a JSON object of strings: {e}"))?;
            Ok((tenant, headers, payload))
        });
    match (created_at_ms, priority, max_retries, parts) {
        (Ok(created_at_ms), Ok(priority), Ok(max_retries), Ok((tenant, headers, payload))) => {
            Ok(Packed {
                created_at_ms,
                priority,
                max_retries,
                tenant,
                headers,
                payload,
            })
        }
        (a, b, c, d) => Err([a.err(), b.err(), c.err(), d.err()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")),
    }
}

/// Decodes the fields of a record written before the `job` field existed: payload,
/// tenant, priority, max_retries, headers (absent: none), created_at_ms. `Err` names
/// every field that is wrong.
pub(crate) fn decode_legacy(fields: [Option<&[u8]>; 6]) -> Result<Packed, String> {
    let [payload, tenant, priority, max_retries, headers, created] = fields;
    fn keep<T>(problems: &mut Vec<String>, r: Result<T, String>) -> Option<T> {
        r.map_err(|p| problems.push(p)).ok()
    }
    fn text<'a>(raw: Option<&'a [u8]>, field: &str) -> Result<&'a str, String> {
        std::str::from_utf8(raw.ok_or_else(|| format!("{field} is missing"))?)
            .map_err(|_| format!("{field} is not UTF-8"))
    }
    fn number<T: std::str::FromStr>(raw: Option<&[u8]>, field: &str) -> Result<T, String> {
        text(raw, field)?
            .parse()
            .map_err(|_| format!("{field} is not a valid number"))
    }
    let p = &mut Vec::new();
    let payload = keep(
        p,
        payload
            .ok_or_else(|| "payload is missing".to_owned())
            .and_then(|raw| {
                serde_json::from_slice::<Json>(raw)
                    .map_err(|e| format!("payload is not valid JSON: {e}"))
            }),
    );
    let tenant = keep(p, text(tenant, "tenant").map(str::to_owned));
    let priority = keep(p, number(priority, "priority"));
    let max_retries = keep(p, number(max_retries, "max_retries"));
    let headers = keep(
        p,
        headers.map_or(Ok(BTreeMap::new()), |raw| {
            serde_json::from_slice::<BTreeMap<String, String>>(raw)
                .map_err(|e| format!("headers are not a JSON object of strings: {e}"))
        }),
    );
    let created_at_ms = keep(p, number(created, "created_at_ms"));
    match (
        payload,
        tenant,
        priority,
        max_retries,
        headers,
        created_at_ms,
    ) {
        (
            Some(payload),
            Some(tenant),
            Some(priority),
            Some(max_retries),
            Some(headers),
            Some(created_at_ms),
        ) => Ok(Packed {
            created_at_ms,
            priority,
            max_retries,
            tenant,
            headers,
            payload,
        }),
        _ => Err(p.join(", ")),
    }
}

/// Parses a stored state name.
pub(crate) fn parse_state(s: &str) -> Option<JobState> {
    Some(match s {
        "ready" => JobState::Ready,
        "scheduled" => JobState::Scheduled,
        "running" => JobState::Running,
        "completed" => JobState::Completed,
        "dead" => JobState::Dead,
        "cancelled" => JobState::Cancelled,
        _ => return None,
    })
}

/// One dead letter from the 7 values the `dead_letters` script returns per letter.
pub(crate) fn dead_letter(queue: &str, reply: &mut Reply<'_>) -> Result<Option<DeadLetter>, Error> {
    let id = reply.string()?;
    let error = reply.bytes()?;
    let attempts = reply.bytes()?;
    let failed_at = reply.bytes()?;
    let job = reply.bytes()?;
    let payload = reply.bytes()?;
    let tenant = reply.bytes()?;
    let Ok(id) = id.parse::<JobId>() else {
        return Ok(None);
    };
    let number = |raw: Option<Vec<u8>>| {
        raw.and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let error = error
        .and_then(|raw| serde_json::from_slice::<Failure>(&raw).ok())
        .unwrap_or_else(|| Failure::new("UNKNOWN", "no failure was recorded"));
    let (payload, tenant) = match job {
        Some(raw) => {
            let packed = decode_job(&raw).unwrap_or_else(|_| lenient_packed(&raw));
            (packed.payload, packed.tenant)
        }
        // Written before the job field existed.
        None => (
            lenient_json(payload.as_deref()),
            tenant
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        ),
    };
    Ok(Some(DeadLetter {
        id,
        queue: queue.to_owned(),
        error,
        attempts: u32::try_from(number(attempts).max(0)).unwrap_or(u32::MAX),
        failed_at_ms: number(failed_at),
        payload,
        tenant,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pairs: &[(&str, &str)]) -> Record {
        Record(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn a_full_record_decodes_and_a_broken_one_names_the_field() {
        let id = uuid::Uuid::now_v7();
        let good = [
            ("state", "ready"),
            ("attempts", "0"),
            ("max_retries", "3"),
            ("priority", "-2"),
            ("tenant", "acme"),
            ("payload", r#"{"a":1}"#),
            ("created_at_ms", "5"),
            ("run_at_ms", "5"),
            ("headers", r#"{"traceparent":"x"}"#),
        ];
        let info = record(&good).info("q", id).expect("decodes");
        assert_eq!(info.priority, -2);
        assert_eq!(
            info.headers.get("traceparent").map(String::as_str),
            Some("x")
        );

        let mut bad = good.to_vec();
        bad[5] = ("payload", "{not json");
        let err = record(&bad).info("q", id).expect_err("bad payload");
        assert!(err.starts_with("payload is not valid JSON"), "{err}");
        assert!(
            !err.contains("not json"),
            "the content is never echoed: {err}"
        );
        let lenient = record(&bad).info_lenient("q", id);
        assert_eq!(lenient.payload, Json::String("{not json".into()));

        let missing: Vec<_> = good
            .iter()
            .copied()
            .filter(|(k, _)| *k != "tenant")
            .collect();
        assert_eq!(
            record(&missing).info("q", id).expect_err("no tenant"),
            "tenant is missing"
        );
    }

    #[test]
    fn a_job_field_round_trips_and_a_broken_one_says_what_is_wrong() {
        let headers: BTreeMap<String, String> = [("traceparent".to_owned(), "x".to_owned())]
            .into_iter()
            .collect();
        let payload = serde_json::json!({"n": 1, "text": "a,b"});
        let mut raw = b"1700000000123".to_vec();
        encode_job(&mut raw, -7, 4, "acme,inc", &headers, &payload).expect("encode");
        let packed = decode_job(&raw).expect("decode");
        assert_eq!(
            packed,
            Packed {
                created_at_ms: 1_700_000_000_123,
                priority: -7,
                max_retries: 4,
                tenant: "acme,inc".into(),
                headers,
                payload,
            }
        );
        for (broken, says) in [
            (
                &b"x,0,3,[\"t\",{},1]"[..],
                "the creation time is missing or not a number",
            ),
            (
                b"1,0,-3,[\"t\",{},1]",
                "max_retries is missing or not a number",
            ),
            (b"1,0,3,[\"t\",{},{secret", "is not valid JSON"),
            (b"1,0,3,[7,{},1]", "the tenant is not a string"),
            (
                b"1,0,3,[\"t\",{\"a\":1},1]",
                "the headers are not a JSON object of strings",
            ),
            (b"", "the creation time is missing or not a number"),
        ] {
            let err = decode_job(broken).expect_err("broken");
            assert!(err.contains(says), "{err}");
            assert!(
                !err.contains("secret"),
                "the content is never echoed: {err}"
            );
        }
        // What the dead-letter set shows of a job field that does not decode.
        let lenient = lenient_packed(b"1,2,3,[\"t\",{},{secret");
        assert_eq!((lenient.created_at_ms, lenient.priority), (1, 2));
        assert_eq!(
            lenient.payload,
            Json::String("1,2,3,[\"t\",{},{secret".into())
        );
    }
}
