//! Nodes: async functions with a [`NodePolicy`], and typed nodes that decode and encode
//! their payloads with serde.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{BoxError, InvalidPayload};
use crate::flow::{Context, Edge};
use crate::message::Message;

/// How a node runs: per-attempt timeout, retries and exponential backoff.
///
/// Total attempts are `max_retries + 1`. The delay before retry `n` (1-based) is
/// `backoff_base * backoff_mult^(n-1)`, capped by `max_backoff`.
///
/// ```
/// use flow_core::NodePolicy;
/// use std::time::Duration;
///
/// let p = NodePolicy::default()
///     .timeout(Duration::from_secs(30))
///     .max_retries(3)
///     .backoff(Duration::from_millis(100), 2.0, Some(Duration::from_millis(300)));
/// assert_eq!(p.backoff_delay(1), Duration::from_millis(100));
/// assert_eq!(p.backoff_delay(2), Duration::from_millis(200));
/// assert_eq!(p.backoff_delay(3), Duration::from_millis(300)); // capped
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct NodePolicy {
    /// Bound on each attempt (a fresh timer per attempt); `None` = unbounded.
    pub timeout: Option<Duration>,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before the first retry.
    pub backoff_base: Duration,
    /// Factor applied to the delay for each further retry.
    pub backoff_mult: f64,
    /// Largest delay.
    pub max_backoff: Option<Duration>,
}

impl Default for NodePolicy {
    /// No timeout, no retries, base 500 ms, factor 2, no cap: PenguiFlow's defaults.
    fn default() -> Self {
        Self {
            timeout: None,
            max_retries: 0,
            backoff_base: Duration::from_millis(500),
            backoff_mult: 2.0,
            max_backoff: None,
        }
    }
}

impl NodePolicy {
    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Sets the number of retries.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// Sets base delay, multiplier and cap of the backoff.
    pub fn backoff(mut self, base: Duration, mult: f64, cap: Option<Duration>) -> Self {
        self.backoff_base = base;
        self.backoff_mult = mult;
        self.max_backoff = cap;
        self
    }
    /// The delay before retry number `retry` (1 for the first retry).
    pub fn backoff_delay(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(64) as i32;
        let secs = self.backoff_base.as_secs_f64() * self.backoff_mult.max(0.0).powi(exp);
        let capped = match self.max_backoff {
            Some(cap) => secs.min(cap.as_secs_f64()),
            None => secs,
        };
        Duration::try_from_secs_f64(capped).unwrap_or(Duration::MAX)
    }
}

/// What a node function returns: `Some(message)` goes to every successor (or out of the
/// flow for an egress node), `None` emits nothing.
pub type NodeResult = Result<Option<Message>, BoxError>;

/// An async node function. Implemented for every
/// `Fn(Message, Context) -> impl Future<Output = NodeResult>`.
pub trait NodeFn: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, msg: Message, ctx: Context) -> BoxFuture<'static, NodeResult>;
}

impl<F, Fut> NodeFn for F
where
    F: Fn(Message, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = NodeResult> + Send + 'static,
{
    fn call(&self, msg: Message, ctx: Context) -> BoxFuture<'static, NodeResult> {
        Box::pin(self(msg, ctx))
    }
}

pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) id: String,
    pub(crate) policy: NodePolicy,
    pub(crate) allow_cycle: bool,
    pub(crate) func: Arc<dyn NodeFn>,
}

/// A named step of a flow. Cheap to clone; clones are the same node.
///
/// ```
/// use flow_core::{BoxError, Context, Message, Node};
///
/// let upper = Node::new("upper", |msg: Message, _ctx: Context| async move {
///     let text = msg.payload.as_str().unwrap_or_default().to_uppercase();
///     Ok::<_, BoxError>(Some(msg.with_payload(text.into())))
/// });
/// assert_eq!(upper.name(), "upper");
/// ```
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("id", &self.inner.id)
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl Node {
    /// A node named `name` running `func`, with the default policy.
    pub fn new(name: impl Into<String>, func: impl NodeFn) -> Self {
        Self {
            inner: Arc::new(NodeInner {
                name: name.into(),
                id: crate::message::new_trace_id(),
                policy: NodePolicy::default(),
                allow_cycle: false,
                func: Arc::new(func),
            }),
        }
    }

    /// A node whose function takes the payload decoded into `I` and returns an `O` that
    /// becomes the payload of the outgoing message (the envelope is kept).
    ///
    /// A payload that does not decode fails the node at once with `INVALID_PAYLOAD` (no
    /// retry): this is PenguiFlow's ModelRegistry validation, done by serde.
    ///
    /// ```
    /// use flow_core::{BoxError, Context, Node};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Deserialize)]
    /// struct Req { n: u64 }
    /// #[derive(Serialize)]
    /// struct Resp { double: u64 }
    ///
    /// let double = Node::typed("double", |req: Req, _ctx: Context| async move {
    ///     Ok::<_, BoxError>(Resp { double: req.n * 2 })
    /// });
    /// # let _ = double;
    /// ```
    pub fn typed<I, O, F, Fut>(name: impl Into<String>, func: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, BoxError>> + Send + 'static,
    {
        let func = Arc::new(func);
        Self::new(name, move |msg: Message, ctx: Context| {
            let func = Arc::clone(&func);
            async move {
                let input: I = serde_json::from_value(msg.payload.clone()).map_err(|e| {
                    Box::new(InvalidPayload {
                        type_name: std::any::type_name::<I>(),
                        reason: e.to_string(),
                    }) as BoxError
                })?;
                let out = func(input, ctx).await?;
                let payload = serde_json::to_value(out)?;
                Ok(Some(msg.with_payload(payload)))
            }
        })
    }

    /// Replaces the policy.
    pub fn with_policy(self, policy: NodePolicy) -> Self {
        self.rebuild(|inner| inner.policy = policy)
    }

    /// Allows an edge from this node to itself.
    pub fn allow_cycle(self) -> Self {
        self.rebuild(|inner| inner.allow_cycle = true)
    }

    fn rebuild(self, f: impl FnOnce(&mut NodeInner)) -> Self {
        let mut inner = NodeInner {
            name: self.inner.name.clone(),
            id: self.inner.id.clone(),
            policy: self.inner.policy.clone(),
            allow_cycle: self.inner.allow_cycle,
            func: Arc::clone(&self.inner.func),
        };
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The node's name (unique within a flow).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's id: random per node.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The node's policy.
    pub fn policy(&self) -> &NodePolicy {
        &self.inner.policy
    }

    /// Edges from this node to `successors`; an empty slice marks an egress node.
    pub fn to(&self, successors: &[&Node]) -> Edge {
        Edge {
            from: self.clone(),
            to: successors.iter().map(|n| (*n).clone()).collect(),
        }
    }
}
