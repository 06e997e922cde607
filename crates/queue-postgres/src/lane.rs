//! The hot path's connections: [`Lane`], a small stack of connections checked out of
//! the sqlx pool and kept.
//!
//! sqlx's pool pings every connection when it is returned (a `Sync` round trip, run in
//! a background task). On a small machine, where client and server share the CPUs,
//! that doubles the server's work per statement. The lane keeps connections checked
//! out and hands them from one statement to the next without the ping.
//!
//! The lane never holds more than its size ([`lane_size`]: the pool minus a quarter, at
//! least one connection), counting the connections running a statement and the ones it
//! keeps, so the rest of the pool is always free for [`crate::PgQueue::pool`] and
//! [`crate::PgQueue::enqueue_in_tx`] callers. A statement that finds the lane full
//! waits for a lane connection (up to the pool's acquire timeout), never for a caller's.
//!
//! Kept connections follow the pool's `idle_timeout` and `max_lifetime`: one left
//! unused in the lane for longer than `idle_timeout` is closed, and every connection
//! goes back to the pool after a quarter of `max_lifetime` in the lane, where the pool
//! closes it once it is older than `max_lifetime` (the pool knows its age; the lane
//! does not). A background task sweeps the kept connections, so this holds while the
//! queue is idle too.
//!
//! A connection whose statement failed at the connection level (I/O error, server
//! shutdown, terminated backend), or whose future was dropped mid-statement, is closed
//! instead of reused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many of a pool's `max_connections` stay free for callers of
/// [`crate::PgQueue::pool`]: a quarter, at least one.
pub(crate) fn reserved_for_callers(max_connections: u32) -> u32 {
    (max_connections / 4).max(1)
}

/// How many connections of a pool of `max_connections` the lane may hold at once: all
/// but [`reserved_for_callers`], at least one (the builder refuses pools where that
/// would leave callers nothing).
pub(crate) fn lane_size(max_connections: u32) -> usize {
    let size = max_connections.saturating_sub(reserved_for_callers(max_connections));
    usize::try_from(size).unwrap_or(usize::MAX).max(1)
}

/// A kept connection gives the pool a chance to check its age after this fraction of
/// `max_lifetime` in the lane.
const LIFETIME_CHECKS: u32 = 4;
/// Shortest interval between two sweeps of the kept connections.
const MIN_SWEEP: Duration = Duration::from_millis(5);

/// When kept connections are closed or handed back, from the pool's settings.
#[derive(Clone, Copy, Debug)]
struct Policy {
    /// Longest time a kept connection stays unused before it is closed.
    idle_timeout: Option<Duration>,
    /// Longest time a connection stays in the lane before it goes back to the pool.
    turn: Option<Duration>,
}

/// What to do with a kept connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Idle too long: close it.
    Close,
    /// In the lane for a turn: back to the pool, which checks its age.
    HandBack,
}

impl Policy {
    fn of(pool: &PgPool) -> Self {
        let options = pool.options();
        Self {
            idle_timeout: options.get_idle_timeout(),
            turn: options
                .get_max_lifetime()
                .map(|lifetime| lifetime / LIFETIME_CHECKS),
        }
    }

    fn verdict(self, kept: &Kept, now: Instant) -> Verdict {
        if self
            .idle_timeout
            .is_some_and(|t| now.saturating_duration_since(kept.idle_since) > t)
        {
            Verdict::Close
        } else if self.turn_over(kept.taken_at, now) {
            Verdict::HandBack
        } else {
            Verdict::Keep
        }
    }

    fn turn_over(self, taken_at: Instant, now: Instant) -> bool {
        self.turn
            .is_some_and(|turn| now.saturating_duration_since(taken_at) >= turn)
    }

    /// How often the sweeper looks, or `None` when nothing ever expires.
    fn sweep_period(self) -> Option<Duration> {
        let shortest = match (self.idle_timeout, self.turn) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some((shortest / 2).max(MIN_SWEEP))
    }
}

/// A connection kept between statements.
#[derive(Debug)]
struct Kept {
    conn: PoolConnection<Postgres>,
    /// When the lane took it from the pool.
    taken_at: Instant,
    /// When its last statement ended.
    idle_since: Instant,
}

impl Kept {
    /// Closes or hands back a connection the policy does not keep.
    fn dispose(mut self, verdict: Verdict) {
        if verdict == Verdict::Close {
            self.conn.close_on_drop();
        }
        // Dropped: closed, or back to the pool (which closes it if too old).
    }
}

type Stack = Mutex<Vec<Kept>>;

/// Connections kept between statements.
#[derive(Debug)]
pub(crate) struct Lane {
    pool: PgPool,
    kept: Arc<Stack>,
    /// One permit per connection the lane may hold (running a statement or kept).
    permits: Semaphore,
    size: usize,
    acquire_timeout: Duration,
    policy: Policy,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    /// Whether the sweeper task runs (cleared when it ends, however it ends).
    sweeping: Arc<AtomicBool>,
}

impl Lane {
    /// A lane over `pool` holding at most [`lane_size`] of its connections.
    pub(crate) fn new(pool: PgPool) -> Self {
        let size = lane_size(pool.options().get_max_connections());
        let policy = Policy::of(&pool);
        let acquire_timeout = pool.options().get_acquire_timeout();
        Self {
            pool,
            kept: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Semaphore::new(size),
            size,
            acquire_timeout,
            policy,
            sweeper: Mutex::new(None),
            sweeping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A connection: a kept one, else one from the pool. Waits for a free place in the
    /// lane first, up to the pool's acquire timeout.
    pub(crate) async fn acquire(&self) -> Result<LaneConn<'_>, sqlx::Error> {
        let permit = match tokio::time::timeout(self.acquire_timeout, self.permits.acquire()).await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        self.ensure_sweeper();
        let now = Instant::now();
        loop {
            let kept = lock(&self.kept).pop();
            let Some(kept) = kept else { break };
            match self.policy.verdict(&kept, now) {
                Verdict::Keep => {
                    return Ok(LaneConn {
                        lane: self,
                        conn: Some(kept.conn),
                        taken_at: kept.taken_at,
                        reusable: false,
                        _permit: permit,
                    });
                }
                verdict => kept.dispose(verdict),
            }
        }
        let conn = self.pool.acquire().await?;
        Ok(LaneConn {
            lane: self,
            conn: Some(conn),
            taken_at: Instant::now(),
            reusable: false,
            _permit: permit,
        })
    }

    /// Starts (or restarts, if its runtime went away) the task that closes or hands
    /// back kept connections while nobody uses the lane.
    fn ensure_sweeper(&self) {
        if self.sweeping.load(Ordering::Acquire) {
            return;
        }
        let Some(period) = self.policy.sweep_period() else {
            return;
        };
        let mut slot = lock(&self.sweeper);
        if self.sweeping.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.sweeping.store(true, Ordering::Release);
        let running = Running(self.sweeping.clone());
        let kept = Arc::downgrade(&self.kept);
        let policy = self.policy;
        *slot = Some(runtime.spawn(async move {
            let _running = running;
            sweep(kept, policy, period).await;
        }));
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(handle) = self
            .sweeper
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.abort();
        }
    }
}

/// Clears the sweeper's flag when its task ends, returns or is dropped with its runtime.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every `period`, closes or hands back the kept connections the policy no longer
/// keeps, until the lane is gone.
async fn sweep(kept: Weak<Stack>, policy: Policy, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(stack) = kept.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut stack = lock(&stack);
            let mut i = 0;
            while i < stack.len() {
                let verdict = policy.verdict(&stack[i], now);
                if verdict == Verdict::Keep {
                    i += 1;
                } else {
                    gone.push((stack.remove(i), verdict));
                }
            }
        }
        // Closed or handed back outside the lock.
        for (kept, verdict) in gone {
            kept.dispose(verdict);
        }
    }
}

/// A connection borrowed from a [`Lane`]. Goes back to the lane when dropped after a
/// [`LaneConn::settle`] that found it healthy; otherwise it is closed.
#[derive(Debug)]
pub(crate) struct LaneConn<'a> {
    lane: &'a Lane,
    conn: Option<PoolConnection<Postgres>>,
    /// When the lane took it from the pool.
    taken_at: Instant,
    reusable: bool,
    /// The lane's place this connection takes; freed after the connection went back.
    _permit: SemaphorePermit<'a>,
}

impl LaneConn<'_> {
    /// The connection, to run statements on. Call [`LaneConn::settle`] afterwards.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.reusable = false;
        match self.conn.as_mut() {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken out in drop"),
        }
    }

    /// Records how the last statement ended: the connection is reused unless it
    /// failed at the connection level.
    pub(crate) fn settle<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.reusable = match result {
            Ok(_) => true,
            Err(e) => survives(e),
        };
    }

    /// Like [`LaneConn::settle`], for a sequence of statements that ended with `result`.
    pub(crate) fn settle_op<T>(&mut self, result: &Result<T, crate::Error>) {
        self.reusable = match result {
            Ok(_) => true,
            Err(crate::Error::Sql { source, .. }) => survives(source),
            // Validation errors happen before any statement.
            Err(crate::Error::Queue(_)) => true,
            Err(_) => false,
        };
    }
}

impl Drop for LaneConn<'_> {
    fn drop(&mut self) {
        // Runs before the permit is released, so a statement waiting for a place in
        // the lane finds this connection kept.
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.reusable {
            // Unknown state (dropped mid-statement) or broken: close it, no ping.
            conn.close_on_drop();
            return;
        }
        let now = Instant::now();
        if self.lane.policy.turn_over(self.taken_at, now) {
            // Back to the pool, which closes it if it is older than max_lifetime.
            return;
        }
        let mut kept = lock(&self.lane.kept);
        if kept.len() < self.lane.size {
            kept.push(Kept {
                conn,
                taken_at: self.taken_at,
                idle_since: now,
            });
        }
        // Beyond the size (cannot happen while permits bound it): dropped outside the
        // lock, back to the pool.
    }
}

/// Whether a connection is still usable after a statement failed with `e`: errors the
/// server reported for the statement itself leave the session intact; I/O, protocol
/// and TLS errors, and server-side connection errors (class 08, shutdowns) do not.
fn survives(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => !db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => false,
        _ => true,
    }
}

/// Runs a query on a lane connection: `query.fetch_all_on(&lane)` and friends.
pub(crate) trait OnLane {
    /// Every row.
    async fn fetch_all_on(self, lane: &Lane) -> Result<Vec<PgRow>, sqlx::Error>;
    /// The row, if any.
    async fn fetch_optional_on(self, lane: &Lane) -> Result<Option<PgRow>, sqlx::Error>;
    /// Exactly one row.
    async fn fetch_one_on(self, lane: &Lane) -> Result<PgRow, sqlx::Error>;
}

impl OnLane for Query<'_, Postgres, PgArguments> {
    async fn fetch_all_on(self, lane: &Lane) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut conn = lane.acquire().await?;
        let result = self.fetch_all(conn.conn()).await;
        conn.settle(&result);
        result
    }

    async fn fetch_optional_on(self, lane: &Lane) -> Result<Option<PgRow>, sqlx::Error> {
        let mut conn = lane.acquire().await?;
        let result = self.fetch_optional(conn.conn()).await;
        conn.settle(&result);
        result
    }

    async fn fetch_one_on(self, lane: &Lane) -> Result<PgRow, sqlx::Error> {
        let mut conn = lane.acquire().await?;
        let result = self.fetch_one(conn.conn()).await;
        conn.settle(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_leaves_callers_a_quarter_of_the_pool_and_at_least_one() {
        let sizes: Vec<(u32, u32, usize)> = [2, 3, 4, 7, 8, 10, 100]
            .into_iter()
            .map(|max| (max, reserved_for_callers(max), lane_size(max)))
            .collect();
        assert_eq!(
            sizes,
            [
                (2, 1, 1),
                (3, 1, 2),
                (4, 1, 3),
                (7, 1, 6),
                (8, 2, 6),
                (10, 2, 8),
                (100, 25, 75)
            ]
        );
    }

    #[test]
    fn sweeps_follow_the_shorter_limit() {
        let policy = Policy {
            idle_timeout: Some(Duration::from_secs(600)),
            turn: Some(Duration::from_secs(1800) / LIFETIME_CHECKS),
        };
        assert_eq!(policy.sweep_period(), Some(Duration::from_secs(225)));
        let never = Policy {
            idle_timeout: None,
            turn: None,
        };
        assert_eq!(never.sweep_period(), None);
        let tiny = Policy {
            idle_timeout: Some(Duration::from_millis(1)),
            turn: None,
        };
        assert_eq!(tiny.sweep_period(), Some(MIN_SWEEP));
    }
}
