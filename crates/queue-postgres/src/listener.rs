//! Wake-ups: one LISTEN connection per queue handle, waking the fetchers waiting on a
//! queue when a NOTIFY names it.
//!
//! Enqueue, retry, release, reap, requeue and resume send `pg_notify(channel, queue)` in
//! the same statement as their change, so the notification is delivered when (and only
//! if) the change commits. The listener task turns each into a wake-up of that queue's
//! [`Notify`]. When the LISTEN connection is lost, every waiter is woken (it re-checks
//! and falls back to polling) and the task reconnects with backoff; once listening
//! again, it wakes every waiter once more, since notifications sent in between were lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;

/// What one queue handle keeps per queue name: the wake-up handle of its waiting
/// fetches, and when a fetch last promoted due scheduled jobs.
#[derive(Debug, Default)]
pub(crate) struct QueueSlot {
    /// Woken by NOTIFY and by this process's own changes.
    pub(crate) notify: Notify,
    /// Milliseconds (on the handle's monotonic clock) of the last full fetch, the one
    /// that also looks at due scheduled jobs.
    pub(crate) full_fetch_at_ms: AtomicU64,
}

/// The per-queue wake-up handles of one queue handle, and whether LISTEN is working.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    by_queue: Mutex<HashMap<String, Arc<QueueSlot>>>,
    listening: AtomicBool,
}

impl Waiters {
    /// The slot of `queue`, created on first use.
    pub(crate) fn get(&self, queue: &str) -> Arc<QueueSlot> {
        let mut map = self.by_queue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get(queue) {
            return n.clone();
        }
        let n = Arc::new(QueueSlot::default());
        map.insert(queue.to_owned(), n.clone());
        n
    }

    /// Wakes the fetchers waiting on `queue` in this process.
    pub(crate) fn wake(&self, queue: &str) {
        let n = self
            .by_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .cloned();
        if let Some(n) = n {
            n.notify.notify_waiters();
        }
    }

    /// Wakes every waiting fetcher of this handle.
    pub(crate) fn wake_all(&self) {
        let all: Vec<Arc<QueueSlot>> = self
            .by_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for n in all {
            n.notify.notify_waiters();
        }
    }

    /// Whether the LISTEN connection is up (waiters then need not poll).
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn set_listening(&self, up: bool) {
        let was = self.listening.swap(up, Ordering::AcqRel);
        if was != up {
            // Up: notifications may have been missed meanwhile. Down: waiters must
            // switch to polling. Either way, have every waiter look again.
            self.wake_all();
        }
    }
}

/// Runs the LISTEN loop until the task is aborted (when the queue handle is dropped).
pub(crate) async fn run(options: PgConnectOptions, channel: String, waiters: Arc<Waiters>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match listen(&options, &channel).await {
            Ok(mut listener) => {
                waiters.set_listening(true);
                backoff = Duration::from_millis(50);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => waiters.wake(notification.payload()),
                        // The connection was lost and re-established: notifications sent
                        // in between are gone, so every waiter looks again.
                        Ok(None) => waiters.wake_all(),
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; fetches poll until it is back");
                            break;
                        }
                    }
                }
                waiters.set_listening(false);
            }
            Err(e) => {
                waiters.set_listening(false);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "cannot LISTEN for wake-ups; fetches poll until it works");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Opens a dedicated connection (outside the queue's pool) and LISTENs on `channel`.
async fn listen(options: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}
