//! The flow engine: a graph of [`Node`]s joined by bounded queues, run as one task per
//! node, driven through a [`FlowHandle`].
//!
//! ```
//! use flow_core::{create, BoxError, Context, Headers, Message, Node, Outcome};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flow_core::Error> {
//! let double = Node::new("double", |msg: Message, _ctx: Context| async move {
//!     let n = msg.payload["n"].as_i64().unwrap_or(0);
//!     Ok::<_, BoxError>(Some(msg.with_payload(json!({"n": n * 2}))))
//! });
//! let flow = create([double.to(&[])]).build()?;
//! let handle = flow.run()?;
//! let outcome = handle
//!     .call(Message::new(json!({"n": 21}), Headers::new("acme")), Duration::from_secs(1))
//!     .await?;
//! match outcome {
//!     Outcome::Message(m) => assert_eq!(m.payload, json!({"n": 42})),
//!     other => panic!("unexpected {other:?}"),
//! }
//! handle.stop().await;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{BoxError, Error, FlowError, FlowErrorCode, InvalidPayload};
use crate::event::{EventKind, FlowEvent, Middleware};
use crate::message::{Message, now_epoch_s};
use crate::node::Node;

/// Default capacity of every edge queue, as in PenguiFlow.
pub const DEFAULT_QUEUE_MAXSIZE: usize = 64;
/// How many finished traces' terminal outcomes a flow remembers for late `fetch_trace`s.
pub const DEFAULT_ENDED_RETENTION: usize = 1024;

const OPEN_SEA: &str = "OpenSea";
const ROOKERY: &str = "Rookery";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked while holding it; the data is
    // plain bookkeeping that stays consistent between statements, so keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Edges from one node to its successors, made by [`Node::to`].
#[derive(Debug, Clone)]
pub struct Edge {
    pub(crate) from: Node,
    pub(crate) to: Vec<Node>,
}

/// Starts building a flow from its edges, as PenguiFlow's `create(...)`.
pub fn create(edges: impl IntoIterator<Item = Edge>) -> FlowBuilder {
    FlowBuilder {
        edges: edges.into_iter().collect(),
        queue_maxsize: DEFAULT_QUEUE_MAXSIZE,
        allow_cycles: false,
        emit_errors_to_rookery: false,
        middlewares: Vec::new(),
        ended_retention: DEFAULT_ENDED_RETENTION,
    }
}

/// Configures a flow before [`FlowBuilder::build`].
pub struct FlowBuilder {
    edges: Vec<Edge>,
    queue_maxsize: usize,
    allow_cycles: bool,
    emit_errors_to_rookery: bool,
    middlewares: Vec<Arc<dyn Middleware>>,
    ended_retention: usize,
}

impl fmt::Debug for FlowBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowBuilder")
            .field("edges", &self.edges.len())
            .field("queue_maxsize", &self.queue_maxsize)
            .field("allow_cycles", &self.allow_cycles)
            .field("emit_errors_to_rookery", &self.emit_errors_to_rookery)
            .finish()
    }
}

impl FlowBuilder {
    /// Capacity of each node's input queue; 0 means unbounded. Default 64.
    pub fn queue_maxsize(mut self, n: usize) -> Self {
        self.queue_maxsize = n;
        self
    }
    /// Skips the cycle check entirely.
    pub fn allow_cycles(mut self, yes: bool) -> Self {
        self.allow_cycles = yes;
        self
    }
    /// Sends terminal node failures out of the flow as [`Outcome::Error`], so plain
    /// [`FlowHandle::fetch`] sees them. Trace-scoped fetches see them either way.
    pub fn emit_errors_to_rookery(mut self, yes: bool) -> Self {
        self.emit_errors_to_rookery = yes;
        self
    }
    /// Adds a middleware; middlewares get events in the order they were added.
    pub fn middleware(mut self, m: Arc<dyn Middleware>) -> Self {
        self.middlewares.push(m);
        self
    }
    /// How many ended traces' outcomes to remember for late trace-scoped fetches.
    pub fn ended_retention(mut self, n: usize) -> Self {
        self.ended_retention = n.max(1);
        self
    }

    /// Checks the graph (unique names, no unwanted cycles) and builds the flow.
    pub fn build(self) -> Result<Flow, Error> {
        let mut nodes: Vec<Node> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut add = |n: &Node, nodes: &mut Vec<Node>| -> Result<usize, Error> {
            if let Some(&i) = index.get(n.name()) {
                if nodes[i].id() != n.id() {
                    return Err(Error::DuplicateNodeName(n.name().to_owned()));
                }
                return Ok(i);
            }
            nodes.push(n.clone());
            index.insert(n.name().to_owned(), nodes.len() - 1);
            Ok(nodes.len() - 1)
        };
        let mut succ: Vec<Vec<usize>> = Vec::new();
        for e in &self.edges {
            let from = add(&e.from, &mut nodes)?;
            succ.resize(nodes.len(), Vec::new());
            for t in &e.to {
                let to = add(t, &mut nodes)?;
                succ.resize(nodes.len(), Vec::new());
                if !succ[from].contains(&to) {
                    succ[from].push(to);
                }
            }
        }
        if nodes.is_empty() {
            return Err(Error::UnknownNode("<empty flow: no nodes>".into()));
        }
        // Self-loops are allowed only on allow_cycle nodes.
        if !self.allow_cycles {
            for (i, s) in succ.iter().enumerate() {
                if s.contains(&i) && !nodes[i].inner.allow_cycle {
                    return Err(Error::Cycle(nodes[i].name().to_owned()));
                }
            }
            // Kahn's algorithm on the graph without self-loops.
            let mut indeg = vec![0usize; nodes.len()];
            for (i, s) in succ.iter().enumerate() {
                for &t in s {
                    if t != i {
                        indeg[t] += 1;
                    }
                }
            }
            let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
            let mut seen = 0;
            while let Some(i) = ready.pop() {
                seen += 1;
                for &t in &succ[i] {
                    if t != i {
                        indeg[t] -= 1;
                        if indeg[t] == 0 {
                            ready.push(t);
                        }
                    }
                }
            }
            if seen != nodes.len() {
                let culprit = (0..nodes.len()).find(|&i| indeg[i] > 0).unwrap_or(0);
                return Err(Error::Cycle(nodes[culprit].name().to_owned()));
            }
        }
        let mut has_parent = vec![false; nodes.len()];
        for (i, s) in succ.iter().enumerate() {
            for &t in s {
                if t != i {
                    has_parent[t] = true;
                }
            }
        }
        let ingress: Vec<usize> = (0..nodes.len()).filter(|&i| !has_parent[i]).collect();
        if ingress.is_empty() {
            return Err(Error::Cycle(
                "every node has a parent, so nothing can receive emitted messages".into(),
            ));
        }
        let slots = nodes
            .into_iter()
            .enumerate()
            .map(|(i, node)| {
                let egress = succ[i].iter().all(|&t| t == i);
                NodeSlot {
                    node,
                    succ: succ[i].clone(),
                    egress,
                    inbox: EdgeQueue::new(self.queue_maxsize),
                }
            })
            .collect();
        Ok(Flow {
            slots,
            index,
            ingress,
            queue_maxsize: self.queue_maxsize,
            emit_errors: self.emit_errors_to_rookery,
            middlewares: self.middlewares,
            ended_retention: self.ended_retention,
        })
    }
}

/// A built flow, not yet running. [`Flow::run`] consumes it: a flow runs once.
pub struct Flow {
    slots: Vec<NodeSlot>,
    index: HashMap<String, usize>,
    ingress: Vec<usize>,
    queue_maxsize: usize,
    emit_errors: bool,
    middlewares: Vec<Arc<dyn Middleware>>,
    ended_retention: usize,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("nodes", &self.node_names())
            .field("queue_maxsize", &self.queue_maxsize)
            .finish()
    }
}

impl Flow {
    /// Adds a middleware (after those given to the builder).
    pub fn add_middleware(&mut self, m: Arc<dyn Middleware>) {
        self.middlewares.push(m);
    }

    /// The node names, in the order they were first seen in the edges.
    pub fn node_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.node.name()).collect()
    }

    /// Starts one task per node on the current tokio runtime.
    pub fn run(self) -> Result<FlowHandle, Error> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let shared = Arc::new(Shared {
            slots: self.slots,
            index: self.index,
            ingress: self.ingress,
            queue_maxsize: self.queue_maxsize,
            emit_errors: self.emit_errors,
            middlewares: self.middlewares,
            traces: Mutex::new(HashMap::new()),
            rookery: Mutex::new(Rookery::default()),
            rookery_changed: Notify::new(),
            stopped: CancellationToken::new(),
            stopping: AtomicBool::new(false),
            ended_retention: self.ended_retention,
        });
        let tasks = (0..shared.slots.len())
            .map(|i| rt.spawn(node_worker(Arc::clone(&shared), i)))
            .collect();
        Ok(FlowHandle {
            inner: Arc::new(HandleInner {
                shared,
                tasks: Mutex::new(tasks),
            }),
        })
    }
}

/// What comes out of a flow for one trace.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// An egress node's output.
    Message(Message),
    /// The trace failed: a node's terminal error, a deadline (`DEADLINE_EXCEEDED`) or a
    /// cancellation (`TRACE_CANCELLED`, trace-scoped fetches only).
    Error(FlowError),
    /// The trace finished without output (an egress node returned `None`).
    NoOutput,
}

struct NodeSlot {
    node: Node,
    succ: Vec<usize>,
    egress: bool,
    inbox: EdgeQueue,
}

struct EdgeQueue {
    q: Mutex<VecDeque<Message>>,
    cap: usize,
    not_empty: Notify,
    not_full: Notify,
}

impl EdgeQueue {
    fn new(cap: usize) -> Self {
        Self {
            q: Mutex::new(VecDeque::new()),
            cap,
            not_empty: Notify::new(),
            not_full: Notify::new(),
        }
    }

    fn len(&self) -> usize {
        lock(&self.q).len()
    }

    #[allow(clippy::result_large_err)] // the message is handed back to retry, not an error
    fn try_push(&self, msg: Message) -> Result<(), Message> {
        let mut q = lock(&self.q);
        if self.cap == 0 || q.len() < self.cap {
            q.push_back(msg);
            drop(q);
            self.not_empty.notify_waiters();
            Ok(())
        } else {
            Err(msg)
        }
    }

    /// Waits for room, then appends.
    async fn push(&self, mut msg: Message) {
        loop {
            let notified = self.not_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_push(msg) {
                Ok(()) => return,
                Err(m) => msg = m,
            }
            notified.await;
        }
    }

    async fn pop(&self) -> Message {
        loop {
            let notified = self.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(m) = lock(&self.q).pop_front() {
                self.not_full.notify_waiters();
                return m;
            }
            notified.await;
        }
    }

    fn remove_trace(&self, trace: &str) -> usize {
        let mut q = lock(&self.q);
        let before = q.len();
        q.retain(|m| m.trace_id != trace);
        let removed = before - q.len();
        drop(q);
        if removed > 0 {
            self.not_full.notify_waiters();
        }
        removed
    }

    fn clear(&self) {
        lock(&self.q).clear();
        self.not_full.notify_waiters();
    }
}

struct TraceState {
    pending: usize,
    inflight: usize,
    cancelled: bool,
    token: CancellationToken,
    produced: bool,
    failure: Option<FlowError>,
}

impl TraceState {
    fn new() -> Self {
        Self {
            pending: 0,
            inflight: 0,
            cancelled: false,
            token: CancellationToken::new(),
            produced: false,
            failure: None,
        }
    }
}

#[derive(Default)]
struct Rookery {
    items: VecDeque<(String, Outcome)>,
    ended: HashMap<String, Outcome>,
    ended_order: VecDeque<String>,
    closed: HashSet<String>,
}

struct Shared {
    slots: Vec<NodeSlot>,
    index: HashMap<String, usize>,
    ingress: Vec<usize>,
    queue_maxsize: usize,
    emit_errors: bool,
    middlewares: Vec<Arc<dyn Middleware>>,
    traces: Mutex<HashMap<String, TraceState>>,
    rookery: Mutex<Rookery>,
    rookery_changed: Notify,
    stopped: CancellationToken,
    stopping: AtomicBool,
    ended_retention: usize,
}

struct HandleInner {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        self.shared.stopped.cancel();
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// A running flow. Cheap to clone; when the last clone is dropped the flow stops.
#[derive(Clone)]
pub struct FlowHandle {
    inner: Arc<HandleInner>,
}

impl fmt::Debug for FlowHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowHandle")
            .field("nodes", &self.inner.shared.slots.len())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

enum Attempt {
    Ok,
    Err(BoxError),
    Timeout(Duration),
    Panic(String),
    Cancelled,
}

impl FlowHandle {
    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Whether [`FlowHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.shared().stopped.is_cancelled()
    }

    /// Puts `msg` on the input queue of every ingress node, waiting while a queue is full.
    pub async fn emit(&self, msg: Message) -> Result<(), Error> {
        let s = self.shared();
        if s.stopped.is_cancelled() {
            return Err(Error::Stopped);
        }
        let targets = s.ingress.clone();
        let stopped = s.stopped.clone();
        tokio::select! {
            biased;
            _ = stopped.cancelled() => Err(Error::Stopped),
            r = s.send_to(&targets, msg) => r,
        }
    }

    /// Like [`FlowHandle::emit`] but never waits: [`Error::QueueFull`] when an ingress
    /// queue is full (earlier ingress nodes may already have the message).
    pub fn try_emit(&self, msg: Message) -> Result<(), Error> {
        let s = self.shared();
        if s.stopped.is_cancelled() {
            return Err(Error::Stopped);
        }
        for &i in &s.ingress {
            s.trace_enter(&msg.trace_id);
            if s.slots[i].inbox.try_push(msg.clone()).is_err() {
                s.trace_leave_silently(&msg.trace_id);
                return Err(Error::QueueFull(s.slots[i].node.name().to_owned()));
            }
        }
        Ok(())
    }

    /// The first output of any trace, waiting up to `timeout` (forever when `None`).
    pub async fn fetch(&self, timeout: Option<Duration>) -> Result<Outcome, Error> {
        self.wait_rookery(timeout, |r| r.items.pop_front().map(|(_, o)| o))
            .await
    }

    /// The first output of `trace_id`; once the trace has ended without output, its
    /// terminal outcome ([`Outcome::Error`] for a failure even when
    /// `emit_errors_to_rookery` is off, `TRACE_CANCELLED`, or [`Outcome::NoOutput`]).
    /// Later outputs of the same trace are dropped. Waits up to `timeout`.
    pub async fn fetch_trace(
        &self,
        trace_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Outcome, Error> {
        let s = Arc::clone(self.shared());
        let trace = trace_id.to_owned();
        self.wait_rookery(timeout, move |r| {
            if let Some(pos) = r.items.iter().position(|(t, _)| *t == trace) {
                let (_, o) = r.items.remove(pos)?;
                let before = r.items.len();
                r.items.retain(|(t, _)| *t != trace);
                if r.items.len() != before {
                    tracing::debug!(trace_id = %trace, dropped = before - r.items.len(),
                        "dropped further outputs of a fetched trace");
                }
                if lock(&s.traces).contains_key(&trace) {
                    r.closed.insert(trace.clone());
                }
                return Some(o);
            }
            if let Some(o) = r.ended.remove(&trace) {
                r.ended_order.retain(|t| *t != trace);
                return Some(o);
            }
            None
        })
        .await
    }

    async fn wait_rookery(
        &self,
        timeout: Option<Duration>,
        mut take: impl FnMut(&mut Rookery) -> Option<Outcome>,
    ) -> Result<Outcome, Error> {
        let s = self.shared();
        let deadline = timeout.map(|t| (tokio::time::Instant::now() + t, t));
        loop {
            let notified = s.rookery_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if s.stopped.is_cancelled() {
                return Err(Error::Stopped);
            }
            if let Some(o) = take(&mut lock(&s.rookery)) {
                return Ok(o);
            }
            match deadline {
                Some((at, t)) => tokio::select! {
                    _ = notified => {}
                    _ = s.stopped.cancelled() => return Err(Error::Stopped),
                    _ = tokio::time::sleep_until(at) => return Err(Error::Timeout(t)),
                },
                None => tokio::select! {
                    _ = notified => {}
                    _ = s.stopped.cancelled() => return Err(Error::Stopped),
                },
            }
        }
    }

    /// Emits `msg` and waits for its trace's outcome, all within `timeout`. On timeout the
    /// trace is cancelled and [`Error::Timeout`] returned.
    pub async fn call(&self, msg: Message, timeout: Duration) -> Result<Outcome, Error> {
        let trace = msg.trace_id.clone();
        let start = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, self.emit(msg)).await {
            Ok(r) => r?,
            Err(_) => {
                self.cancel(&trace).await;
                return Err(Error::Timeout(timeout));
            }
        }
        let left = timeout.saturating_sub(start.elapsed());
        match self.fetch_trace(&trace, Some(left)).await {
            Err(Error::Timeout(_)) => {
                self.cancel(&trace).await;
                Err(Error::Timeout(timeout))
            }
            other => other,
        }
    }

    /// Cancels a trace: drops its queued messages, cancels its running attempts (their
    /// futures are dropped at their next await) and makes a trace-scoped fetch of it
    /// return `TRACE_CANCELLED`. Returns false when the trace is not active.
    pub async fn cancel(&self, trace_id: &str) -> bool {
        let s = self.shared();
        let (first, pending, token) = {
            let mut traces = lock(&s.traces);
            let Some(st) = traces.get_mut(trace_id) else {
                return false;
            };
            let first = !st.cancelled;
            st.cancelled = true;
            st.produced = false;
            (first, st.pending, st.token.clone())
        };
        // `trace_cancel_start` goes out before running attempts see the cancellation, so
        // it always precedes their `node_trace_cancelled`, as in PenguiFlow.
        if first {
            s.event(
                EventKind::TraceCancelStart,
                None,
                Some(trace_id),
                0,
                None,
                extra([("pending", json!(pending))]),
            )
            .await;
        }
        token.cancel();
        lock(&s.rookery).items.retain(|(t, _)| t != trace_id);
        let removed: usize = s
            .slots
            .iter()
            .map(|slot| slot.inbox.remove_trace(trace_id))
            .sum();
        for _ in 0..removed {
            s.finalize(trace_id).await;
        }
        true
    }

    /// Stops the flow: every node task is cancelled (its running attempt dropped), queued
    /// messages are discarded, and callers waiting in `emit` or `fetch` get
    /// [`Error::Stopped`]. Fires one `node_cancelled` per node. Idempotent.
    pub async fn stop(&self) {
        let s = self.shared();
        if s.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        s.stopped.cancel();
        let tasks: Vec<_> = lock(&self.inner.tasks).drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        for i in 0..s.slots.len() {
            s.event(EventKind::NodeCancelled, Some(i), None, 0, None, Map::new())
                .await;
        }
        for (_, st) in lock(&s.traces).drain() {
            st.token.cancel();
        }
        for slot in &s.slots {
            slot.inbox.clear();
        }
        *lock(&s.rookery) = Rookery::default();
        s.rookery_changed.notify_waiters();
    }

    /// Number of traces with messages queued or in process.
    pub fn active_traces(&self) -> usize {
        lock(&self.shared().traces).len()
    }
}

fn extra<const N: usize>(items: [(&str, Value); N]) -> Map<String, Value> {
    items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

async fn node_worker(shared: Arc<Shared>, idx: usize) {
    loop {
        let msg = shared.slots[idx].inbox.pop().await;
        shared.process(idx, msg).await;
    }
}

impl Shared {
    fn trace_enter(&self, trace: &str) {
        lock(&self.traces)
            .entry(trace.to_owned())
            .or_insert_with(TraceState::new)
            .pending += 1;
    }

    /// Undoes a `trace_enter` whose message never got queued.
    fn trace_leave_silently(&self, trace: &str) {
        let mut traces = lock(&self.traces);
        if let Some(st) = traces.get_mut(trace) {
            st.pending = st.pending.saturating_sub(1);
            if st.pending == 0 {
                traces.remove(trace);
            }
        }
    }

    async fn send_to(&self, targets: &[usize], msg: Message) -> Result<(), Error> {
        for &t in targets {
            self.trace_enter(&msg.trace_id);
            self.slots[t].inbox.push(msg.clone()).await;
        }
        Ok(())
    }

    fn trace_token(&self, trace: &str) -> CancellationToken {
        lock(&self.traces)
            .entry(trace.to_owned())
            .or_insert_with(TraceState::new)
            .token
            .clone()
    }

    fn adjust_inflight(&self, trace: &str, up: bool) {
        if let Some(st) = lock(&self.traces).get_mut(trace) {
            if up {
                st.inflight += 1;
            } else {
                st.inflight = st.inflight.saturating_sub(1);
            }
        }
    }

    /// One message of `trace` is done with.
    async fn finalize(&self, trace: &str) {
        let ended = {
            let mut traces = lock(&self.traces);
            match traces.get_mut(trace) {
                Some(st) => {
                    st.pending = st.pending.saturating_sub(1);
                    if st.pending == 0 {
                        traces.remove(trace)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        let Some(st) = ended else { return };
        {
            let mut r = lock(&self.rookery);
            r.closed.remove(trace);
            if !st.produced {
                let outcome = if st.cancelled {
                    Outcome::Error(
                        FlowError::new(FlowErrorCode::TraceCancelled, "trace was cancelled")
                            .with_trace(trace),
                    )
                } else if let Some(f) = st.failure {
                    Outcome::Error(f)
                } else {
                    Outcome::NoOutput
                };
                if r.ended.insert(trace.to_owned(), outcome).is_none() {
                    r.ended_order.push_back(trace.to_owned());
                }
                while r.ended_order.len() > self.ended_retention {
                    if let Some(old) = r.ended_order.pop_front() {
                        r.ended.remove(&old);
                    }
                }
            }
        }
        self.rookery_changed.notify_waiters();
        if st.cancelled {
            self.event_with(
                EventKind::TraceCancelFinish,
                None,
                Some(trace),
                0,
                None,
                Map::new(),
                Some((0, 0, true)),
            )
            .await;
        }
    }

    fn push_outcome(&self, trace: &str, outcome: Outcome) {
        if let Some(st) = lock(&self.traces).get_mut(trace) {
            if st.cancelled {
                return;
            }
            st.produced = true;
        }
        {
            let mut r = lock(&self.rookery);
            if r.closed.contains(trace) {
                tracing::debug!(trace_id = %trace, "dropped output of an already fetched trace");
                return;
            }
            r.items.push_back((trace.to_owned(), outcome));
        }
        self.rookery_changed.notify_waiters();
    }

    fn record_failure(&self, trace: &str, fe: FlowError) {
        if self.emit_errors {
            self.push_outcome(trace, Outcome::Error(fe));
        } else if let Some(st) = lock(&self.traces).get_mut(trace) {
            st.failure.get_or_insert(fe);
        }
    }

    async fn event(
        &self,
        kind: EventKind,
        node: Option<usize>,
        trace: Option<&str>,
        attempt: u32,
        latency_ms: Option<f64>,
        extra: Map<String, Value>,
    ) {
        self.event_with(kind, node, trace, attempt, latency_ms, extra, None)
            .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn event_with(
        &self,
        kind: EventKind,
        node: Option<usize>,
        trace: Option<&str>,
        attempt: u32,
        latency_ms: Option<f64>,
        extra: Map<String, Value>,
        trace_snapshot: Option<(usize, usize, bool)>,
    ) {
        let (node_name, node_id, depth_in, depth_out, outgoing) = match node {
            Some(i) => {
                let slot = &self.slots[i];
                let out: usize = slot.succ.iter().map(|&t| self.slots[t].inbox.len()).sum();
                (
                    slot.node.name().to_owned(),
                    slot.node.id().to_owned(),
                    slot.inbox.len(),
                    out,
                    slot.succ.len() + usize::from(slot.egress),
                )
            }
            None => {
                let n = if kind == EventKind::TraceCancelFinish {
                    ROOKERY
                } else {
                    OPEN_SEA
                };
                (n.to_owned(), n.to_owned(), 0, 0, 0)
            }
        };
        let (pending, inflight, cancelled) = match (trace_snapshot, trace) {
            (Some((p, i, c)), _) => (Some(p), i, c),
            (None, Some(t)) => match lock(&self.traces).get(t) {
                Some(st) => (Some(st.pending), st.inflight, st.cancelled),
                None => (Some(0), 0, false),
            },
            (None, None) => (None, 0, false),
        };
        let ev = FlowEvent {
            kind,
            ts: now_epoch_s(),
            node_name,
            node_id,
            trace_id: trace.map(str::to_owned),
            attempt,
            latency_ms,
            queue_depth_in: depth_in,
            queue_depth_out: depth_out,
            outgoing_edges: outgoing,
            queue_maxsize: self.queue_maxsize,
            trace_pending: pending,
            trace_inflight: inflight,
            trace_cancelled: cancelled,
            extra,
        };
        log_event(&ev);
        for m in &self.middlewares {
            if AssertUnwindSafe(m.on_event(&ev))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(
                    event_type = kind.as_str(),
                    "middleware panicked; event skipped for it"
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn node_error(
        &self,
        idx: usize,
        trace: &str,
        code: FlowErrorCode,
        message: String,
        exception_type: &str,
        attempt: u32,
        latency_ms: f64,
    ) -> FlowError {
        let node = &self.slots[idx].node;
        let mut fe = FlowError::new(code, message)
            .with_trace(trace)
            .with_node(node.name(), node.id())
            .with_meta("attempt", attempt)
            .with_meta("latency_ms", latency_ms);
        fe.exception_type = Some(exception_type.to_owned());
        fe
    }

    async fn deadline_skip(&self, idx: usize, msg: &Message) {
        let trace = msg.trace_id.as_str();
        self.event(
            EventKind::DeadlineSkip,
            Some(idx),
            Some(trace),
            0,
            None,
            extra([("deadline_s", json!(msg.deadline_s))]),
        )
        .await;
        let node = &self.slots[idx].node;
        let fe = FlowError::new(
            FlowErrorCode::DeadlineExceeded,
            format!("Deadline exceeded before node '{}' ran", node.name()),
        )
        .with_trace(trace)
        .with_node(node.name(), node.id())
        .with_meta("deadline_s", json!(msg.deadline_s));
        self.push_outcome(trace, Outcome::Error(fe));
    }

    async fn process(self: &Arc<Self>, idx: usize, msg: Message) {
        let trace = msg.trace_id.clone();
        if msg.deadline_expired() {
            self.deadline_skip(idx, &msg).await;
            self.finalize(&trace).await;
            return;
        }
        let token = self.trace_token(&trace);
        if token.is_cancelled() {
            self.event(
                EventKind::TraceCancelDrop,
                Some(idx),
                Some(&trace),
                0,
                None,
                Map::new(),
            )
            .await;
            self.finalize(&trace).await;
            return;
        }
        let node = self.slots[idx].node.clone();
        let policy = node.policy().clone();
        let mut attempt: u32 = 0;
        loop {
            if token.is_cancelled() {
                self.event(
                    EventKind::NodeTraceCancelled,
                    Some(idx),
                    Some(&trace),
                    attempt,
                    None,
                    Map::new(),
                )
                .await;
                self.finalize(&trace).await;
                return;
            }
            self.event(
                EventKind::NodeStart,
                Some(idx),
                Some(&trace),
                attempt,
                Some(0.0),
                Map::new(),
            )
            .await;
            self.adjust_inflight(&trace, true);
            let started = Instant::now();
            let ctx = Context {
                shared: Arc::clone(self),
                node: idx,
                trace_id: trace.clone(),
                cancel: token.clone(),
                held: Arc::new(Mutex::new(Vec::new())),
            };
            let result = self.invoke(&node, msg.clone(), ctx.clone(), &token).await;
            self.adjust_inflight(&trace, false);
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            let (code, message, exc_type, exception) = match result {
                Attempt::Ok => {
                    self.event(
                        EventKind::NodeSuccess,
                        Some(idx),
                        Some(&trace),
                        attempt,
                        Some(latency_ms),
                        Map::new(),
                    )
                    .await;
                    let held: Vec<Message> = std::mem::take(&mut *lock(&ctx.held));
                    for m in held {
                        let t = m.trace_id.clone();
                        self.push_outcome(&t, Outcome::Message(m));
                    }
                    self.finalize(&trace).await;
                    return;
                }
                Attempt::Cancelled => {
                    self.event(
                        EventKind::NodeTraceCancelled,
                        Some(idx),
                        Some(&trace),
                        attempt,
                        None,
                        Map::new(),
                    )
                    .await;
                    self.finalize(&trace).await;
                    return;
                }
                Attempt::Panic(p) => {
                    let fe = self.node_error(
                        idx,
                        &trace,
                        FlowErrorCode::UnexpectedError,
                        format!("Node '{}' panicked: {p}", node.name()),
                        "Panic",
                        attempt,
                        latency_ms,
                    );
                    self.fail_at_once(idx, &trace, attempt, latency_ms, format!("panic: {p}"), fe)
                        .await;
                    return;
                }
                Attempt::Timeout(t) => (
                    FlowErrorCode::NodeTimeout,
                    format!(
                        "Node '{}' timed out after {:.2}s",
                        node.name(),
                        t.as_secs_f64()
                    ),
                    "TimeoutError".to_owned(),
                    format!("TimeoutError: attempt exceeded {:.2}s", t.as_secs_f64()),
                ),
                Attempt::Err(e) => {
                    let exception = format!("{e}");
                    // Errors that no retry can fix fail the node at once.
                    let terminal = if let Some(ip) = e.downcast_ref::<InvalidPayload>() {
                        Some(self.node_error(
                            idx,
                            &trace,
                            FlowErrorCode::InvalidPayload,
                            format!("Node '{}' got an invalid payload: {ip}", node.name()),
                            "InvalidPayload",
                            attempt,
                            latency_ms,
                        ))
                    } else if let Some(own) = e.downcast_ref::<FlowError>() {
                        let mut fe = own.clone();
                        fe.trace_id.get_or_insert_with(|| trace.clone());
                        fe.node_name.get_or_insert_with(|| node.name().to_owned());
                        fe.node_id.get_or_insert_with(|| node.id().to_owned());
                        fe.metadata.entry("attempt").or_insert(json!(attempt));
                        Some(fe)
                    } else {
                        None
                    };
                    if let Some(fe) = terminal {
                        self.fail_at_once(idx, &trace, attempt, latency_ms, exception, fe)
                            .await;
                        return;
                    }
                    (
                        FlowErrorCode::NodeException,
                        format!("Node '{}' raised Error: {exception}", node.name()),
                        "Error".to_owned(),
                        exception,
                    )
                }
            };
            let kind = if code == FlowErrorCode::NodeTimeout {
                EventKind::NodeTimeout
            } else {
                EventKind::NodeError
            };
            self.event(
                kind,
                Some(idx),
                Some(&trace),
                attempt,
                Some(latency_ms),
                extra([("exception", json!(exception))]),
            )
            .await;
            if attempt >= policy.max_retries {
                let mut fe = self.node_error(
                    idx,
                    &trace,
                    code.clone(),
                    message,
                    &exc_type,
                    attempt,
                    latency_ms,
                );
                match (&code, policy.timeout) {
                    (FlowErrorCode::NodeTimeout, Some(t)) => {
                        fe.metadata
                            .insert("timeout_s".into(), json!(t.as_secs_f64()));
                    }
                    _ => {
                        fe.metadata
                            .insert("exception_repr".into(), json!(exception));
                    }
                }
                self.fail_node(idx, &trace, attempt, latency_ms, exception, fe)
                    .await;
                return;
            }
            attempt += 1;
            let delay = policy.backoff_delay(attempt);
            self.event(
                EventKind::NodeRetry,
                Some(idx),
                Some(&trace),
                attempt,
                None,
                extra([
                    ("sleep_s", json!(delay.as_secs_f64())),
                    ("exception", json!(exception)),
                ]),
            )
            .await;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = token.cancelled() => {}
            }
            if !token.is_cancelled() && msg.deadline_expired() {
                self.deadline_skip(idx, &msg).await;
                self.finalize(&trace).await;
                return;
            }
        }
    }

    /// A failure no retry can fix: `node_error`, then `node_failed`.
    async fn fail_at_once(
        &self,
        idx: usize,
        trace: &str,
        attempt: u32,
        latency_ms: f64,
        exception: String,
        fe: FlowError,
    ) {
        self.event(
            EventKind::NodeError,
            Some(idx),
            Some(trace),
            attempt,
            Some(latency_ms),
            extra([("exception", json!(exception))]),
        )
        .await;
        self.fail_node(idx, trace, attempt, latency_ms, exception, fe)
            .await;
    }

    async fn fail_node(
        &self,
        idx: usize,
        trace: &str,
        attempt: u32,
        latency_ms: f64,
        exception: String,
        fe: FlowError,
    ) {
        self.event(
            EventKind::NodeFailed,
            Some(idx),
            Some(trace),
            attempt,
            Some(latency_ms),
            extra([
                ("exception", json!(exception)),
                ("flow_error", fe.to_payload()),
            ]),
        )
        .await;
        self.record_failure(trace, fe);
        self.finalize(trace).await;
    }

    async fn invoke(
        &self,
        node: &Node,
        msg: Message,
        ctx: Context,
        token: &CancellationToken,
    ) -> Attempt {
        let timeout = node.policy().timeout;
        let work = async {
            let fut = AssertUnwindSafe(node.inner.func.call(msg, ctx.clone())).catch_unwind();
            let r = match timeout {
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => return Attempt::Timeout(t),
                },
                None => fut.await,
            };
            match r {
                Err(panic) => Attempt::Panic(panic_text(&panic)),
                Ok(Err(e)) => Attempt::Err(e),
                Ok(Ok(None)) => Attempt::Ok,
                Ok(Ok(Some(out))) => match ctx.emit(out).await {
                    Ok(()) => Attempt::Ok,
                    Err(e) => Attempt::Err(Box::new(e)),
                },
            }
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => Attempt::Cancelled,
            a = work => a,
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

fn log_event(ev: &FlowEvent) {
    let node = ev.node_name.as_str();
    let trace = ev.trace_id.as_deref().unwrap_or("");
    let event_type = ev.kind.as_str();
    let attempt = ev.attempt;
    let latency = ev.latency_ms.unwrap_or(0.0);
    let exception = ev
        .extra
        .get("exception")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    macro_rules! emit {
        ($lvl:ident) => {
            tracing::$lvl!(target: "penguiflow::flow", event_type, node_name = node, trace_id = trace,
                attempt, latency_ms = latency,
                exception,
                "{event_type}")
        };
    }
    match ev.kind.level() {
        tracing::Level::ERROR => emit!(error),
        tracing::Level::WARN => emit!(warn),
        tracing::Level::INFO => emit!(info),
        tracing::Level::DEBUG => emit!(debug),
        _ => emit!(trace),
    }
}

/// What a node function gets besides its message: its place in the flow, the trace's
/// cancellation, and routing.
#[derive(Clone)]
pub struct Context {
    shared: Arc<Shared>,
    node: usize,
    trace_id: String,
    cancel: CancellationToken,
    held: Arc<Mutex<Vec<Message>>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.node_name())
            .field("trace_id", &self.trace_id)
            .finish()
    }
}

impl Context {
    /// The running node's name.
    pub fn node_name(&self) -> &str {
        self.shared.slots[self.node].node.name()
    }

    /// The trace of the message being processed.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// Cancelled when the trace is cancelled or the flow stops; check it in long loops.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The names of this node's successors.
    pub fn successors(&self) -> Vec<&str> {
        self.shared.slots[self.node]
            .succ
            .iter()
            .map(|&i| self.shared.slots[i].node.name())
            .collect()
    }

    /// Sends `msg` to every successor (out of the flow, for an egress node), waiting
    /// while a queue is full. Outputs of an egress node leave the flow when the attempt
    /// succeeds, after its `node_success` event.
    pub async fn emit(&self, msg: Message) -> Result<(), Error> {
        let slot = &self.shared.slots[self.node];
        if slot.egress {
            lock(&self.held).push(msg.clone());
        }
        let targets: Vec<usize> = slot.succ.clone();
        self.shared.send_to(&targets, msg).await
    }

    /// Sends `msg` to the named successors only (routing). A name that is not a
    /// successor of this node is [`Error::UnknownNode`], which fails the attempt.
    pub async fn emit_to(&self, msg: Message, targets: &[&str]) -> Result<(), Error> {
        let slot = &self.shared.slots[self.node];
        let mut idx = Vec::with_capacity(targets.len());
        for name in targets {
            match self.shared.index.get(*name) {
                Some(&i) if slot.succ.contains(&i) => idx.push(i),
                _ => return Err(Error::UnknownNode((*name).to_owned())),
            }
        }
        self.shared.send_to(&idx, msg).await
    }
}
