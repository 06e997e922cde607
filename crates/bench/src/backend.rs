//! Connecting to the backend under test, and reading its own command counters.

use std::sync::Arc;

use flow_core::queue::{JobQueue, MemoryQueue, QueueOptions};

/// The queue under test, and a way to count the commands it receives.
pub(crate) struct Backend {
    pub(crate) queue: Arc<dyn JobQueue>,
    kind: String,
}

impl Backend {
    pub(crate) async fn connect(kind: &str, url: Option<&str>) -> Result<Self, String> {
        let opts = QueueOptions::default();
        let queue: Arc<dyn JobQueue> = match kind {
            "memory" => Arc::new(MemoryQueue::with_options(opts)),
            other => {
                let _ = url;
                return Err(format!("unknown backend {other:?}"));
            }
        };
        Ok(Self {
            queue,
            kind: kind.to_owned(),
        })
    }

    /// The backend's count of commands (Redis) or transactions (PostgreSQL) so far, when
    /// it keeps one.
    pub(crate) async fn command_count(&self) -> Result<Option<u64>, String> {
        let _ = &self.kind;
        Ok(None)
    }
}
