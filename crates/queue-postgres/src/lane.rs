//! The hot path's connections: [`Lane`], a small stack of connections checked out of
//! the sqlx pool and kept.
//!
//! sqlx's pool pings every connection when it is returned (a `Sync` round trip, run in
//! a background task). On a small machine, where client and server share the CPUs,
//! that doubles the server's work per statement. The lane keeps connections checked
//! out and hands them from one statement to the next without the ping, up to a cap
//! (the rest of the pool stays available to [`crate::PgQueue::pool`] users). A
//! connection whose statement failed at the connection level (I/O error, server
//! shutdown, terminated backend), or whose future was dropped mid-statement, is closed
//! instead of reused.

use std::sync::{Mutex, PoisonError};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};

/// Connections kept between statements.
#[derive(Debug)]
pub(crate) struct Lane {
    pool: PgPool,
    idle: Mutex<Vec<PoolConnection<Postgres>>>,
    cap: usize,
}

impl Lane {
    /// A lane over `pool` keeping at most `cap` idle connections.
    pub(crate) fn new(pool: PgPool, cap: usize) -> Self {
        Self {
            pool,
            idle: Mutex::new(Vec::with_capacity(cap)),
            cap: cap.max(1),
        }
    }

    /// A connection: a kept one, else one from the pool.
    pub(crate) async fn acquire(&self) -> Result<LaneConn<'_>, sqlx::Error> {
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(LaneConn {
            lane: self,
            conn: Some(conn),
            reusable: false,
        })
    }
}

/// A connection borrowed from a [`Lane`]. Goes back to the lane when dropped after a
/// [`LaneConn::settle`] that found it healthy; otherwise it is closed.
#[derive(Debug)]
pub(crate) struct LaneConn<'a> {
    lane: &'a Lane,
    conn: Option<PoolConnection<Postgres>>,
    reusable: bool,
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
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.reusable {
            // Unknown state (dropped mid-statement) or broken: close it, no ping.
            conn.close_on_drop();
            return;
        }
        let mut idle = self
            .lane
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.lane.cap {
            idle.push(conn);
        }
        // Beyond the cap: dropped outside the lock, back to the pool.
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
