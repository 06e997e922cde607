//! Behaviour of the flow engine that users rely on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flow_core::testkit::{Recorder, assert_node_sequence, run_one, simulate_error};
use flow_core::{
    BoxError, Context, Error, EventKind, FlowError, FlowErrorCode, Headers, Message, Node,
    NodePolicy, Outcome, create,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

fn msg(payload: serde_json::Value) -> Message {
    Message::new(payload, Headers::new("tenant-a"))
}

fn fast_retries(n: u32) -> NodePolicy {
    NodePolicy::default().max_retries(n).backoff(
        Duration::from_millis(5),
        2.0,
        Some(Duration::from_millis(20)),
    )
}

fn echo(name: &str) -> Node {
    Node::new(name, |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m))
    })
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn retry_then_succeed_emits_ordered_events() {
    let (f, sim) = simulate_error(2);
    let node = Node::new("flaky", f).with_policy(fast_retries(2));
    let flow = create([node.to(&[])]).build().expect("builds");
    let run = run_one(flow, msg(json!({"x": 1})), T).await.expect("runs");
    assert_eq!(
        run.message().map(|m| m.payload.clone()),
        Some(json!({"x": 1}))
    );
    assert_eq!(sim.attempts(), 3);
    let seq: Vec<(&str, u32)> = run
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.attempt))
        .collect();
    assert_eq!(
        seq,
        [
            ("node_start", 0),
            ("node_error", 0),
            ("node_retry", 1),
            ("node_start", 1),
            ("node_error", 1),
            ("node_retry", 2),
            ("node_start", 2),
            ("node_success", 2),
        ]
    );
    let retry = &run.events[2];
    assert!(retry.extra["sleep_s"].as_f64().expect("sleep_s") > 0.0);
    assert!(retry.latency_ms.is_none());
    assert_node_sequence(&run, &["flaky"]);
}

#[tokio::test]
async fn retries_exhausted_give_node_exception_with_attempt_count() {
    let (f, sim) = simulate_error(100);
    let node = Node::new("always", f).with_policy(fast_retries(3));
    let flow = create([node.to(&[])]).build().expect("builds");
    let run = run_one(flow, msg(json!(1)), T).await.expect("runs");
    let err = run.error().expect("fails");
    assert_eq!(err.code, FlowErrorCode::NodeException);
    assert_eq!(err.metadata["attempt"], json!(3));
    assert_eq!(err.node_name.as_deref(), Some("always"));
    assert_eq!(err.trace_id.as_deref(), Some(run.trace_id.as_str()));
    assert!(
        err.message.contains("simulated failure 4"),
        "{}",
        err.message
    );
    assert_eq!(sim.attempts(), 4);
    let last = run.events.last().expect("events");
    assert_eq!(last.kind, EventKind::NodeFailed);
    assert_eq!(
        last.error_payload().expect("payload")["code"],
        "NODE_EXCEPTION"
    );
}

#[tokio::test]
async fn timeout_gives_node_timeout() {
    let slow = Node::new("slow", |m: Message, _c: Context| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, BoxError>(Some(m))
    })
    .with_policy(
        NodePolicy::default()
            .timeout(Duration::from_millis(50))
            .max_retries(1)
            .backoff(Duration::from_millis(1), 1.0, None),
    );
    let flow = create([slow.to(&[])]).build().expect("builds");
    let started = Instant::now();
    let run = run_one(flow, msg(json!(1)), T).await.expect("runs");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = run.error().expect("fails");
    assert_eq!(err.code, FlowErrorCode::NodeTimeout);
    assert!(
        err.message.contains("timed out after 0.05s"),
        "{}",
        err.message
    );
    assert_eq!(err.metadata["timeout_s"], json!(0.05));
    assert_eq!(
        run.event_types(),
        [
            "node_start",
            "node_timeout",
            "node_retry",
            "node_start",
            "node_timeout",
            "node_failed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_trace_mid_node_leaves_others_running() {
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let (s2, d2) = (started.clone(), dropped.clone());
    let work = Node::new("work", move |m: Message, _c: Context| {
        let (s2, d2) = (s2.clone(), d2.clone());
        async move {
            if m.payload == json!("slow") {
                let _g = DropFlag(d2);
                s2.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, BoxError>(Some(m))
        }
    });
    let rec = Recorder::new();
    let flow = create([work.to(&[])])
        .middleware(rec.clone())
        .build()
        .expect("builds");
    let h = flow.run().expect("runs");
    let a = msg(json!("slow"));
    let b = msg(json!("fast"));
    let (ta, tb) = (a.trace_id.clone(), b.trace_id.clone());
    h.emit(a).await.expect("emit a");
    h.emit(b).await.expect("emit b");
    tokio::time::timeout(T, started.notified())
        .await
        .expect("slow node started");
    assert!(h.cancel(&ta).await);
    match h.fetch_trace(&ta, Some(T)).await.expect("outcome a") {
        Outcome::Error(e) => assert_eq!(e.code, FlowErrorCode::TraceCancelled),
        other => panic!("expected TRACE_CANCELLED, got {other:?}"),
    }
    assert!(
        dropped.load(Ordering::SeqCst),
        "the node's future was dropped"
    );
    match h.fetch_trace(&tb, Some(T)).await.expect("outcome b") {
        Outcome::Message(m) => assert_eq!(m.payload, json!("fast")),
        other => panic!("expected b's message, got {other:?}"),
    }
    let kinds: Vec<EventKind> = rec.events_for(&ta).iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::NodeStart,
            EventKind::TraceCancelStart,
            EventKind::NodeTraceCancelled,
            EventKind::TraceCancelFinish
        ]
    );
    assert!(!h.cancel(&ta).await, "a finished trace is not active");
    h.stop().await;
}

#[tokio::test]
async fn expired_deadline_skips_the_node() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let node = Node::new("never", move |m: Message, _c: Context| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Some(m)) }
    });
    let flow = create([node.to(&[])]).build().expect("builds");
    let mut m = msg(json!(1));
    m.deadline_s = Some(flow_core::message::now_epoch_s() - 1.0);
    let run = run_one(flow, m, T).await.expect("runs");
    assert_eq!(
        run.error().expect("fails").code,
        FlowErrorCode::DeadlineExceeded
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(run.event_types(), ["deadline_skip"]);
}

#[tokio::test]
async fn deadline_is_checked_again_before_a_retry() {
    let (f, sim) = simulate_error(100);
    let node = Node::new("flaky", f).with_policy(NodePolicy::default().max_retries(5).backoff(
        Duration::from_millis(300),
        1.0,
        None,
    ));
    let flow = create([node.to(&[])]).build().expect("builds");
    let m = msg(json!(1)).with_deadline_in(Duration::from_millis(100));
    let run = run_one(flow, m, T).await.expect("runs");
    assert_eq!(
        run.error().expect("fails").code,
        FlowErrorCode::DeadlineExceeded
    );
    assert_eq!(sim.attempts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_waits_while_a_bounded_queue_is_full() {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(Notify::new());
    let (g2, s2) = (gate.clone(), started.clone());
    let blocker = Node::new("blocker", move |m: Message, _c: Context| {
        let (g2, s2) = (g2.clone(), s2.clone());
        async move {
            s2.notify_one();
            g2.acquire()
                .await
                .map_err(|e| Box::new(e) as BoxError)?
                .forget();
            Ok::<_, BoxError>(Some(m))
        }
    });
    let flow = create([blocker.to(&[])])
        .queue_maxsize(1)
        .build()
        .expect("builds");
    let h = flow.run().expect("runs");
    h.emit(msg(json!(1))).await.expect("first");
    tokio::time::timeout(T, started.notified())
        .await
        .expect("node took the first");
    h.emit(msg(json!(2)))
        .await
        .expect("second fits in the queue");
    let third = msg(json!(3));
    let h2 = h.clone();
    let pending = tokio::spawn(async move { h2.emit(third).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pending.is_finished(),
        "emit must wait while the queue is full"
    );
    assert!(matches!(
        h.try_emit(msg(json!(4))),
        Err(Error::QueueFull(_))
    ));
    gate.add_permits(10);
    tokio::time::timeout(T, pending)
        .await
        .expect("emit completes once there is room")
        .expect("task")
        .expect("emit ok");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cancels_in_flight_work_and_returns() {
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Notify::new());
    let (d2, s2) = (dropped.clone(), started.clone());
    let node = Node::new("long", move |m: Message, _c: Context| {
        let (d2, s2) = (d2.clone(), s2.clone());
        async move {
            let _g = DropFlag(d2);
            s2.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, BoxError>(Some(m))
        }
    });
    let rec = Recorder::new();
    let flow = create([node.to(&[])])
        .middleware(rec.clone())
        .build()
        .expect("builds");
    let h = flow.run().expect("runs");
    h.emit(msg(json!(1))).await.expect("emit");
    tokio::time::timeout(T, started.notified())
        .await
        .expect("started");
    let h2 = h.clone();
    let waiter = tokio::spawn(async move { h2.fetch(None).await });
    let t0 = Instant::now();
    tokio::time::timeout(T, h.stop())
        .await
        .expect("stop returns");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        dropped.load(Ordering::SeqCst),
        "in-flight attempt was dropped"
    );
    let r = tokio::time::timeout(T, waiter)
        .await
        .expect("waiter woke")
        .expect("task");
    assert!(matches!(r, Err(Error::Stopped)), "{r:?}");
    assert!(matches!(h.emit(msg(json!(2))).await, Err(Error::Stopped)));
    let cancelled = rec
        .events()
        .iter()
        .filter(|e| e.kind == EventKind::NodeCancelled)
        .count();
    assert_eq!(cancelled, 1);
    h.stop().await; // idempotent
}

#[tokio::test]
async fn fan_out_gives_each_branch_its_copy() {
    let a = echo("a");
    let b = Node::new("b", |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m.with_payload(json!("from b"))))
    });
    let c = Node::new("c", |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m.with_payload(json!("from c"))))
    });
    let flow = create([a.to(&[&b, &c]), b.to(&[]), c.to(&[])])
        .build()
        .expect("builds");
    let h = flow.run().expect("runs");
    h.emit(msg(json!("in"))).await.expect("emit");
    let mut got = Vec::new();
    for _ in 0..2 {
        match h.fetch(Some(T)).await.expect("output") {
            Outcome::Message(m) => got.push(m.payload),
            other => panic!("{other:?}"),
        }
    }
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, [json!("from b"), json!("from c")]);
    h.stop().await;
}

#[tokio::test]
async fn routing_through_the_context_picks_a_successor() {
    let router = Node::new("router", |m: Message, ctx: Context| async move {
        let to = if m.payload["kind"] == "x" { "x" } else { "y" };
        ctx.emit_to(m, &[to]).await?;
        Ok::<_, BoxError>(None)
    });
    let x = Node::new("x", |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m.with_payload(json!("went x"))))
    });
    let y = Node::new("y", |m: Message, _c: Context| async move {
        Ok::<_, BoxError>(Some(m.with_payload(json!("went y"))))
    });
    let flow = create([router.to(&[&x, &y]), x.to(&[]), y.to(&[])])
        .build()
        .expect("builds");
    let run = run_one(flow, msg(json!({"kind": "y"})), T)
        .await
        .expect("runs");
    assert_eq!(run.message().expect("msg").payload, json!("went y"));
    assert_node_sequence(&run, &["router", "y"]);
}

#[tokio::test]
async fn routing_to_an_unknown_node_fails_the_attempt() {
    let router = Node::new("router", |m: Message, ctx: Context| async move {
        ctx.emit_to(m, &["nowhere"]).await?;
        Ok::<_, BoxError>(None)
    });
    let sink = echo("sink");
    let flow = create([router.to(&[&sink]), sink.to(&[])])
        .build()
        .expect("builds");
    let run = run_one(flow, msg(json!(1)), T).await.expect("runs");
    let e = run.error().expect("fails");
    assert_eq!(e.code, FlowErrorCode::NodeException);
    assert!(e.message.contains("nowhere"), "{}", e.message);
}

#[derive(Deserialize)]
struct In {
    n: i64,
}
#[derive(Serialize)]
struct Out {
    square: i64,
}

#[tokio::test]
async fn typed_nodes_decode_encode_and_reject_bad_payloads_without_retry() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let square = Node::typed("square", move |i: In, _c: Context| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Out { square: i.n * i.n }) }
    })
    .with_policy(fast_retries(3));
    let flow = create([square.to(&[])]).build().expect("builds");
    let ok = run_one(flow, msg(json!({"n": 7})), T).await.expect("runs");
    assert_eq!(ok.message().expect("msg").payload, json!({"square": 49}));

    let flow = create([square.to(&[])]).build().expect("builds");
    let bad = run_one(flow, msg(json!({"n": "seven"})), T)
        .await
        .expect("runs");
    let e = bad.error().expect("fails");
    assert_eq!(e.code, FlowErrorCode::InvalidPayload);
    assert_eq!(e.exception_type.as_deref(), Some("InvalidPayload"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the function never ran for the bad payload"
    );
    assert_eq!(
        bad.event_types(),
        ["node_start", "node_error", "node_failed"]
    );
}

#[tokio::test]
async fn a_panicking_node_fails_its_trace_with_unexpected_error() {
    let boom = Node::new("boom", |m: Message, _c: Context| async move {
        if m.payload == json!(1) {
            panic!("kaboom");
        }
        Ok::<_, BoxError>(None)
    })
    .with_policy(fast_retries(2));
    let flow = create([boom.to(&[])]).build().expect("builds");
    let run = run_one(flow, msg(json!(1)), T).await.expect("runs");
    let e = run.error().expect("fails");
    assert_eq!(e.code, FlowErrorCode::UnexpectedError);
    assert!(e.message.contains("kaboom"));
    assert_eq!(
        run.event_types(),
        ["node_start", "node_error", "node_failed"]
    );
}

#[tokio::test]
async fn a_node_returning_a_flow_error_keeps_its_code_and_is_not_retried() {
    let n = Node::new("picky", |_m: Message, _c: Context| async move {
        Err::<Option<Message>, BoxError>(Box::new(FlowError::new(
            FlowErrorCode::Custom("QUOTA".into()),
            "over quota",
        )))
    })
    .with_policy(fast_retries(3));
    let flow = create([n.to(&[])]).build().expect("builds");
    let run = run_one(flow, msg(json!(1)), T).await.expect("runs");
    let e = run.error().expect("fails");
    assert_eq!(e.code.as_str(), "QUOTA");
    assert_eq!(e.node_name.as_deref(), Some("picky"));
    assert_eq!(
        run.event_types(),
        ["node_start", "node_error", "node_failed"]
    );
}

#[tokio::test]
async fn errors_reach_plain_fetch_only_with_emit_errors_to_rookery() {
    let (f, _) = simulate_error(100);
    let n = Node::new("bad", f);
    let h = create([n.to(&[])])
        .emit_errors_to_rookery(true)
        .build()
        .expect("builds")
        .run()
        .expect("runs");
    h.emit(msg(json!(1))).await.expect("emit");
    assert!(matches!(h.fetch(Some(T)).await, Ok(Outcome::Error(_))));
    h.stop().await;

    let (f, _) = simulate_error(100);
    let n = Node::new("bad", f);
    let h = create([n.to(&[])])
        .build()
        .expect("builds")
        .run()
        .expect("runs");
    let m = msg(json!(1));
    let t = m.trace_id.clone();
    h.emit(m).await.expect("emit");
    assert!(matches!(
        h.fetch(Some(Duration::from_millis(200))).await,
        Err(Error::Timeout(_))
    ));
    // A trace-scoped fetch never hangs on a failed trace, whatever the flag says.
    match h.fetch_trace(&t, Some(T)).await.expect("outcome") {
        Outcome::Error(e) => assert_eq!(e.code, FlowErrorCode::NodeException),
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn an_egress_node_returning_nothing_ends_with_no_output() {
    let n = Node::new("sink", |_m: Message, _c: Context| async move {
        Ok::<_, BoxError>(None)
    });
    let run = run_one(
        create([n.to(&[])]).build().expect("builds"),
        msg(json!(1)),
        T,
    )
    .await
    .expect("runs");
    assert_eq!(run.outcome, Outcome::NoOutput);
}

#[tokio::test]
async fn call_times_out_and_cancels_the_trace() {
    let n = Node::new("slow", |m: Message, _c: Context| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, BoxError>(Some(m))
    });
    let h = create([n.to(&[])])
        .build()
        .expect("builds")
        .run()
        .expect("runs");
    let r = h.call(msg(json!(1)), Duration::from_millis(100)).await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.active_traces(), 0, "the timed-out trace was cancelled");
    h.stop().await;
}

#[test]
fn graph_errors_are_caught_at_build() {
    let a = echo("a");
    let b = echo("b");
    let a2 = echo("a");
    assert!(matches!(
        create([a.to(&[&a2])]).build(),
        Err(Error::DuplicateNodeName(n)) if n == "a"
    ));
    assert!(matches!(
        create([a.to(&[&b]), b.to(&[&a])]).build(),
        Err(Error::Cycle(_))
    ));
    assert!(matches!(
        create([a.to(&[&a])]).build(),
        Err(Error::Cycle(_))
    ));
    let looping = echo("loop").allow_cycle();
    assert!(create([looping.to(&[&looping])]).build().is_ok());
    assert!(
        create([a.to(&[&b]), b.to(&[&a])])
            .allow_cycles(true)
            .build()
            .is_err(),
        "no ingress"
    );
}

#[test]
fn backoff_grows_exponentially_up_to_the_cap() {
    let p = NodePolicy::default().backoff(
        Duration::from_millis(100),
        3.0,
        Some(Duration::from_secs(1)),
    );
    assert_eq!(p.backoff_delay(1), Duration::from_millis(100));
    assert_eq!(p.backoff_delay(2), Duration::from_millis(300));
    assert_eq!(p.backoff_delay(3), Duration::from_millis(900));
    assert_eq!(p.backoff_delay(4), Duration::from_secs(1));
    assert_eq!(p.backoff_delay(1000), Duration::from_secs(1));
}

#[tokio::test]
async fn many_traces_run_concurrently_through_a_pipeline() {
    let a = echo("a");
    let b = Node::new("b", |m: Message, _c: Context| async move {
        let n = m.payload.as_i64().unwrap_or(0);
        Ok::<_, BoxError>(Some(m.with_payload(json!(n + 1))))
    });
    let h = create([a.to(&[&b]), b.to(&[])])
        .queue_maxsize(4)
        .build()
        .expect("builds")
        .run()
        .expect("runs");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move { h.call(msg(json!(i)), T).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("task").expect("call") {
            Outcome::Message(m) => assert_eq!(m.payload, json!(i as i64 + 1)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.active_traces(), 0);
    h.stop().await;
}
