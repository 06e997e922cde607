//! Natural batching of single completions.
//!
//! Workers complete jobs one by one, many at a time. Instead of one statement (and one
//! commit) per job, [`Completions`] collects the completions that arrive while a
//! batch statement is in flight and sends them together in the next one: at low load
//! a completion goes out at once (a batch of one), under load batches grow by
//! themselves, with no timer and no added latency. Each job is still fenced on its own
//! and gets its own answer.

use std::sync::{Mutex, PoisonError};

use flow_core::queue::Lease;
use serde_json::Value;
use tokio::sync::oneshot;

/// Largest batch one statement carries.
pub(crate) const MAX_BATCH: usize = 256;

/// One waiting completion.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) lease: Lease,
    pub(crate) result: Value,
    pub(crate) reply: oneshot::Sender<Result<(), flow_core::Error>>,
}

/// Completions waiting for the next batch statement.
#[derive(Debug, Default)]
pub(crate) struct Completions {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Pending>,
    /// A flusher task is running (it takes everything pending before it stops).
    flushing: bool,
}

impl Completions {
    /// Queues a completion; returns `true` when the caller must start a flusher.
    pub(crate) fn push(&self, item: Pending) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.pending.push(item);
        !std::mem::replace(&mut state.flushing, true)
    }

    /// The next batch, or `None` (and the flusher must stop) when nothing is pending.
    pub(crate) fn take(&self) -> Option<Vec<Pending>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.pending.is_empty() {
            state.flushing = false;
            return None;
        }
        let n = state.pending.len().min(MAX_BATCH);
        Some(state.pending.drain(..n).collect())
    }

    /// Called when a flusher ends abnormally (panic, runtime shutdown): lets the next
    /// completion start a new one.
    pub(crate) fn abandon(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flushing = false;
    }
}

/// Resets the flushing flag if a flusher stops without draining (see
/// [`Completions::abandon`]).
#[derive(Debug)]
pub(crate) struct FlushGuard<'a> {
    pub(crate) completions: &'a Completions,
    pub(crate) finished: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.completions.abandon();
        }
    }
}
