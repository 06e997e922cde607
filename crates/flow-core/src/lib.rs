//! # flow-core
//!
//! The heart of PenguiFlow workers in Rust:
//!
//! * [`Message`], [`Headers`], [`FlowError`] and [`FlowEvent`]: PenguiFlow's data model,
//!   with the same JSON field names.
//! * The flow engine: async [`Node`]s with a [`NodePolicy`] (timeout, retries, backoff),
//!   wired into a graph with bounded queues, fan-out and routing; run it with
//!   [`Flow::run`] and talk to it through a [`FlowHandle`].
//! * [`testkit`]: run one message through a flow and look at the result and the events.
//! * [`queue`]: the [`JobQueue`](queue::JobQueue) contract every backend implements and
//!   the in-memory backend, [`MemoryQueue`](queue::MemoryQueue).
//! * [`redact`]: the one set of rules that masks passwords in connection URLs, in error
//!   messages and in log lines, for every crate.
//!
//! flow-core knows no backend and no worker pool: those live in other crates.

pub mod error;
pub mod message;
pub mod queue;
pub mod redact;

pub use error::{BoxError, Error, FlowError, FlowErrorCode, InvalidPayload};
pub use message::{Headers, Message};
pub mod event;
pub mod flow;
pub mod node;
pub mod testkit;

pub use event::{EventKind, FlowEvent, Middleware};
pub use flow::{Context, Edge, Flow, FlowBuilder, FlowHandle, Outcome, create};
pub use node::{Node, NodeFn, NodePolicy, NodeResult};
