//! Background work a backend must finish before its process exits, for
//! [`JobQueue::flush`](super::JobQueue::flush).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts a backend's background tasks that must not be cut short, such as a fetch
/// whose caller may go away and the hand-back of its jobs. A task takes a
/// [`InFlightGuard`] with [`InFlight::begin`] *before* it is spawned and drops it when
/// done (dropping also happens when the task panics or is cancelled), and
/// [`JobQueue::flush`](super::JobQueue::flush) waits with [`InFlight::idle`].
///
/// ```
/// use std::sync::Arc;
/// use flow_core::queue::InFlight;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let work = Arc::new(InFlight::default());
/// let guard = work.begin();
/// let task = tokio::spawn(async move {
///     // ... hand jobs back ...
///     drop(guard);
/// });
/// work.idle().await; // returns once the task dropped its guard
/// assert_eq!(work.running(), 0);
/// # task.await.unwrap();
/// # }
/// ```
#[derive(Debug, Default)]
pub struct InFlight {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    /// Counts one task until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(Arc::clone(self))
    }

    /// Tasks counted now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no task is counted.
    pub async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One task counted by an [`InFlight`]; dropping it ends the count.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
