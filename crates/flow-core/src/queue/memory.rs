//! The in-memory backend (being written).
use super::QueueOptions;

/// An in-memory [`JobQueue`](super::JobQueue).
#[derive(Debug, Default)]
pub struct MemoryQueue {
    _opts: QueueOptions,
}
