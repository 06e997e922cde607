//! # queue-postgres
//!
//! A [`JobQueue`] on PostgreSQL: [`PgQueue`].
//!
//! * One `jobs` table with partial indexes per state, so fetching, reaping, stats and the
//!   dead-letter listing stay fast with millions of finished rows present; a retention
//!   pruner deletes completed and cancelled jobs after
//!   [`QueueOptions::result_retention`], and dead letters beyond
//!   [`QueueOptions::dead_letter_limit`] are dropped oldest first (and counted).
//! * [`JobQueue::fetch`] leases up to N jobs in one statement (`FOR UPDATE SKIP LOCKED`),
//!   due scheduled jobs included; every outcome (complete, retry, fail, release, cancel,
//!   heartbeat) checks the fencing token in the same `UPDATE`.
//! * Waiting fetches are woken through LISTEN/NOTIFY (notifications are sent in the
//!   statement that makes work available, so they fire on commit), with a polling
//!   fallback; [`PgQueueBuilder::poll_only`] for PgBouncer in transaction mode.
//! * [`PgQueue::enqueue_in_tx`] enqueues inside the caller's transaction: the job exists
//!   if and only if that transaction commits.
//! * The schema ships as sqlx migrations embedded in the crate, applied by
//!   [`PgQueue::migrate`] (idempotent, serialised by an advisory lock).
//!
//! ```no_run
//! use flow_core::queue::{JobQueue, NewJob, QueueOptions};
//! use queue_postgres::PgQueue;
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let queue = PgQueue::connect("postgres://app@localhost/app", QueueOptions::default()).await?;
//! queue.migrate().await?;
//! let id = queue.enqueue(NewJob::new("emails", json!({"to": "a@example.com"}))).await?;
//! let jobs = queue.fetch("emails", 16, Duration::from_secs(30), Duration::from_secs(5)).await?;
//! for job in &jobs {
//!     queue.complete(&job.lease, json!("sent")).await?;
//! }
//! # let _ = id; Ok(()) }
//! ```
//!
//! See `docs/postgres.md` for the schema, the statements and operations.

mod batch;
mod config;
mod error;
mod lane;
mod listener;
mod sql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use flow_core::queue::{
    CODE_CORRUPT_JOB, CancelOutcome, DeadLetter, Failure, Heartbeat, InFlight, InFlightGuard,
    JobId, JobInfo, JobQueue, JobState, Lease, LeasedJob, NewJob, QueueOptions, QueueStats,
    ReapReport, validate_queue_name,
};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Connection, PgPool, Postgres, Row, Transaction};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

pub use config::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_APPLICATION_NAME, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POLL_INTERVAL, DEFAULT_SCHEMA, MIN_MAX_CONNECTIONS, PgQueueBuilder,
    validate_schema_name,
};
pub use error::{DriverError, Error, redact_url};

use config::{Settings, check_max_connections};
pub(crate) use error::is_transient_sqlx;
use lane::{Lane, OnLane};
use listener::Waiters;
use sql::Statements;

/// Largest number of jobs one fetch leases.
pub const MAX_FETCH: usize = 10_000;
/// Jobs inserted per statement by `enqueue_many` (larger batches run in one transaction).
pub const ENQUEUE_CHUNK: usize = 5_000;
/// Longest duration honoured for leases, delays and retention (about 100 years); longer
/// ones are clamped so deadlines never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Longest time a busy queue goes without a full fetch (one that also leases and
/// promotes due scheduled jobs); in between, fetches take ready jobs only.
const PROMOTE_EVERY_MS: u64 = 50;
/// Rows deleted per statement by the retention pruner.
const PRUNE_BATCH: i64 = 5_000;
/// Most prune batches one `reap` runs (bounded work per call).
const PRUNE_BATCHES_PER_REAP: usize = 20;
/// Expired leases reclaimed per statement by `reap`.
const REAP_BATCH: i64 = 1_000;
/// Longest wait a fetch honours (about a year).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_DURATION).as_millis()).unwrap_or(i64::MAX)
}

/// A [`JobQueue`] on PostgreSQL.
///
/// Cheap to clone (clones share the pool, the LISTEN connection and the wake-ups).
/// Build one with [`PgQueue::connect`], [`PgQueue::builder`] or [`PgQueue::from_pool`],
/// then call [`PgQueue::migrate`] once (or run `penguiflow-worker migrate`).
#[derive(Clone)]
pub struct PgQueue {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// Connections kept between statements of the hot path.
    lane: Lane,
    settings: Settings,
    sql: Statements,
    /// NOTIFY channel: `<schema>_jobs`.
    channel: String,
    waiters: Arc<Waiters>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Single completions waiting for the next batch statement.
    completions: batch::Completions,
    /// Origin of the handle's monotonic millisecond clock.
    epoch: std::time::Instant,
    /// Fetches, and hand-backs of dropped fetches, still running (see [`Delivery`]).
    in_flight: Arc<InFlight>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.abort();
        }
    }
}

impl fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgQueue")
            .field("settings", &self.inner.settings)
            .field("channel", &self.inner.channel)
            .field("listening", &self.inner.waiters.listening())
            .finish()
    }
}

/// A validated job, serialised once, ready to insert.
#[derive(Debug)]
struct Prepared {
    id: Uuid,
    queue: String,
    payload: String,
    tenant: String,
    priority: i32,
    /// Not before this instant (the producer's clock).
    run_at_ms: Option<i64>,
    /// Not before this long after the database stores it (the database clock).
    delay_ms: Option<i64>,
    max_retries: i64,
    dedupe_key: Option<String>,
    headers: String,
}

/// The answer of a fetch task on its way to the caller. Dropped before the caller took
/// the round out of it, it hands the leased jobs back in a task of its own.
struct Delivery {
    round: Option<Round>,
    inner: Arc<Inner>,
    queue: String,
    /// Counts this fetch for `flush` until its jobs were taken or handed back.
    in_flight: Option<InFlightGuard>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let Some(round) = self.round.take().filter(|r| !r.jobs.is_empty()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(queue = %self.queue, jobs = round.jobs.len(),
                "fetch dropped outside a runtime; its jobs return when their leases expire");
            return;
        };
        let inner = Arc::clone(&self.inner);
        let queue = std::mem::take(&mut self.queue);
        // Still counted, so `flush` (called by a worker before it exits) waits for it.
        let in_flight = self.in_flight.take();
        runtime.spawn(async move {
            let _in_flight = in_flight;
            let n = round.jobs.len();
            let leases: Vec<Lease> = round.jobs.into_iter().map(|j| j.lease).collect();
            match inner.release_many(&leases).await {
                Ok(_) => {
                    tracing::debug!(queue = %queue, jobs = n, "fetch dropped: handed its jobs back");
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, jobs = n, error = %e,
                        "fetch dropped and its jobs could not be handed back; they return when their leases expire");
                }
            }
        });
    }
}

/// What one fetch round produced.
#[derive(Debug, Default)]
struct Round {
    jobs: Vec<LeasedJob>,
    /// Rows that could not be decoded and were dead-lettered.
    corrupt: usize,
    /// When a full fetch leased nothing: whether the queue is paused, and in how many
    /// milliseconds its next scheduled job is due (if it has one).
    idle: Option<(bool, Option<i64>)>,
}

impl PgQueue {
    /// Connects to `url` with the default settings (schema [`DEFAULT_SCHEMA`],
    /// LISTEN/NOTIFY wake-ups) and the given limits. Call [`PgQueue::migrate`] before
    /// first use on a new database.
    pub async fn connect(url: &str, opts: QueueOptions) -> Result<Self, Error> {
        PgQueueBuilder::new(url).queue_options(opts).connect().await
    }

    /// A builder for every setting: schema, pool size, poll-only mode, ...
    pub fn builder(url: impl Into<String>) -> PgQueueBuilder {
        PgQueueBuilder::new(url)
    }

    /// A queue on an existing pool, with schema [`DEFAULT_SCHEMA`] and LISTEN/NOTIFY
    /// wake-ups. Use [`PgQueueBuilder::build_with_pool`] for other settings.
    ///
    /// Fails with [`Error::Config`] when the pool has fewer than
    /// [`MIN_MAX_CONNECTIONS`] connections.
    pub fn from_pool(pool: PgPool, opts: QueueOptions) -> Result<Self, Error> {
        check_max_connections(pool.options().get_max_connections())?;
        let options = pool.connect_options();
        let target = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Ok(Self::with_settings(
            pool,
            Settings {
                schema: DEFAULT_SCHEMA.to_owned(),
                listen: true,
                poll_interval: DEFAULT_POLL_INTERVAL,
                async_leases: false,
                opts,
                target,
            },
        ))
    }

    pub(crate) fn with_settings(pool: PgPool, settings: Settings) -> Self {
        let sql = Statements::new(&settings.schema, settings.async_leases);
        let channel = format!("{}_jobs", settings.schema);
        // The queue's statements use at most three quarters of the pool; the rest (at
        // least one connection) stays free for `pool()` users.
        let lane = Lane::new(pool.clone());
        Self {
            inner: Arc::new(Inner {
                pool,
                lane,
                sql,
                channel,
                settings,
                waiters: Arc::new(Waiters::default()),
                listener: Mutex::new(None),
                completions: batch::Completions::default(),
                epoch: std::time::Instant::now(),
                in_flight: Arc::default(),
            }),
        }
    }

    /// The connection pool (to run your own transactions, e.g. for
    /// [`PgQueue::enqueue_in_tx`]).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.inner.settings.schema
    }

    /// The NOTIFY channel wake-ups travel on: `<schema>_jobs`, payload the queue name.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The limits and retention times in force.
    pub fn options(&self) -> &QueueOptions {
        &self.inner.settings.opts
    }

    /// Whether the LISTEN connection is up (false in poll-only mode, before the first
    /// fetch, and while it reconnects).
    pub fn is_listening(&self) -> bool {
        self.inner.waiters.listening()
    }

    /// Creates the schema and applies the embedded migrations that are not applied yet.
    ///
    /// Idempotent, and safe to run from several processes at once: sqlx's migrator takes
    /// a PostgreSQL advisory lock (keyed by the database name) for the whole run, on a
    /// dedicated connection that is closed afterwards (so the lock never outlives it).
    /// The migrations table is `<schema>._sqlx_migrations`. Behind PgBouncer in
    /// transaction mode, migrate through a direct connection (advisory locks and
    /// `SET search_path` are session state).
    pub async fn migrate(&self) -> Result<(), Error> {
        let schema = self.inner.settings.schema.clone();
        // A one-connection pool of its own, whose session has search_path = schema (the
        // migrations use unqualified names). Closing it ends the session, which releases
        // the advisory lock even when a migration failed half-way.
        let options = (*self.inner.pool.connect_options())
            .clone()
            .options([("search_path", schema.as_str())]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| config::connect_error(&self.inner.settings.target, &e, None))?;
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.dangerous_set_table_name(format!("\"{schema}\"._sqlx_migrations"));
        migrator.create_schema(format!("\"{schema}\""));
        let result = migrator.run(&pool).await.map_err(Error::Migrate);
        pool.close().await;
        result
    }

    /// Enqueues a job inside the caller's transaction: it exists (and its wake-up is
    /// sent) if and only if `tx` commits. Dedupe keys apply as for [`JobQueue::enqueue`].
    pub async fn enqueue_in_tx(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        job: NewJob,
    ) -> Result<JobId, Error> {
        let ids = self.enqueue_many_in_tx(tx, vec![job]).await?;
        ids.into_iter().next().ok_or_else(|| {
            Error::Queue(flow_core::Error::Backend(
                "enqueue returned no id".to_owned().into(),
            ))
        })
    }

    /// Enqueues several jobs inside the caller's transaction (all or nothing, like
    /// [`JobQueue::enqueue_many`]); they exist if and only if `tx` commits.
    pub async fn enqueue_many_in_tx(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<JobId>, Error> {
        let prepared = self.prepare_all(jobs)?;
        let mut ids = Vec::with_capacity(prepared.len());
        for chunk in prepared.chunks(ENQUEUE_CHUNK) {
            ids.extend(self.inner.insert_chunk(&mut *tx, chunk).await?);
        }
        Ok(ids)
    }

    /// Deletes every completed and cancelled job of `queue` older than the retention
    /// time, in batches; returns how many. [`JobQueue::reap`] runs a bounded amount of
    /// this on every call.
    pub async fn prune(&self, queue: &str) -> Result<u64, Error> {
        validate_queue_name(queue)?;
        let mut total = 0;
        loop {
            let n = self.inner.prune_batch(queue).await?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    fn prepare_all(&self, jobs: Vec<NewJob>) -> Result<Vec<Prepared>, Error> {
        flow_core::queue::check_batch_len(jobs.len()).map_err(Error::Queue)?;
        let limit = self.inner.settings.opts.max_payload_bytes;
        jobs.into_iter()
            .map(|job| prepare(job, limit).map_err(Error::Queue))
            .collect()
    }

    /// Starts (or restarts, if its runtime went away) the LISTEN task.
    fn ensure_listener(&self) {
        if !self.inner.settings.listen {
            return;
        }
        let mut slot = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let options = (*self.inner.pool.connect_options()).clone();
        let channel = self.inner.channel.clone();
        let waiters = self.inner.waiters.clone();
        *slot = Some(runtime.spawn(listener::run(options, channel, waiters)));
    }

    /// One fetch statement, run in its own task so that dropping the caller's future
    /// cannot strand the jobs it leased: if nobody is left to receive them (the caller
    /// gave up before the answer, or between the answer arriving and being read), they
    /// are handed back (ready again, attempt not counted). See [`Delivery`].
    async fn lease_round(
        &self,
        queue: &str,
        max: i64,
        start: i64,
        lease_ms: i64,
    ) -> Result<Round, Error> {
        let inner = self.inner.clone();
        let queue = queue.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let in_flight = inner.in_flight.begin();
        tokio::spawn(async move {
            let result = inner.lease_round(&queue, max, start, lease_ms).await;
            // Unsent, or sent but never read: dropping the delivery hands the jobs back.
            let _ = tx.send(result.map(|round| Delivery {
                round: Some(round),
                inner,
                queue,
                in_flight: Some(in_flight),
            }));
        });
        match rx.await {
            Ok(result) => result.map(|mut delivery| delivery.round.take().unwrap_or_default()),
            Err(_) => Err(Error::Queue(flow_core::Error::Backend(
                "the fetch task ended without an answer".to_owned().into(),
            ))),
        }
    }
}

impl Inner {
    fn q(
        &self,
        sql: &Arc<str>,
    ) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(AssertSqlSafe(sql.clone()))
    }

    fn retention_ms(&self) -> i64 {
        ms(self.settings.opts.result_retention)
    }

    /// Inserts prepared jobs on `conn`, resolving dedupe keys; ids in input order.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        jobs: &[Prepared],
    ) -> Result<Vec<JobId>, Error> {
        let n = jobs.len();
        let mut ids: Vec<Option<JobId>> = vec![None; n];
        // Within the batch, a repeated (queue, key) maps to its first job.
        let mut first: HashMap<(&str, &str), usize> = HashMap::new();
        let mut alias: Vec<(usize, usize)> = Vec::new();
        let mut pending: Vec<usize> = Vec::with_capacity(n);
        for (i, job) in jobs.iter().enumerate() {
            if let Some(key) = job.dedupe_key.as_deref() {
                match first.get(&(job.queue.as_str(), key)) {
                    Some(&f) => {
                        alias.push((i, f));
                        continue;
                    }
                    None => {
                        first.insert((job.queue.as_str(), key), i);
                    }
                }
            }
            pending.push(i);
        }
        for _ in 0..5 {
            if pending.is_empty() {
                break;
            }
            let batch: Vec<&Prepared> = pending.iter().map(|&i| &jobs[i]).collect();
            let rows = if let [one] = batch.as_slice() {
                let sql = if one.dedupe_key.is_none() {
                    &self.sql.enqueue_plain_one
                } else {
                    &self.sql.enqueue_one
                };
                self.q(sql)
                    .bind(one.id)
                    .bind(one.queue.as_str())
                    .bind(one.payload.as_str())
                    .bind(one.tenant.as_str())
                    .bind(one.priority)
                    .bind(one.run_at_ms)
                    .bind(one.max_retries)
                    .bind(one.dedupe_key.as_deref())
                    .bind(one.headers.as_str())
                    .bind(&self.channel)
                    .bind(one.delay_ms)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(Error::sql("enqueue"))?
            } else {
                self.q(&self.sql.enqueue)
                    .bind(batch.iter().map(|j| j.id).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.queue.as_str()).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.payload.as_str()).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.tenant.as_str()).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.priority).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.run_at_ms).collect::<Vec<_>>())
                    .bind(batch.iter().map(|j| j.max_retries).collect::<Vec<_>>())
                    .bind(
                        batch
                            .iter()
                            .map(|j| j.dedupe_key.as_deref())
                            .collect::<Vec<_>>(),
                    )
                    .bind(batch.iter().map(|j| j.headers.as_str()).collect::<Vec<_>>())
                    .bind(&self.channel)
                    .bind(batch.iter().map(|j| j.delay_ms).collect::<Vec<_>>())
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(Error::sql("enqueue"))?
            };
            let inserted: HashSet<Uuid> = rows
                .iter()
                .map(|r| r.try_get::<Uuid, _>(0))
                .collect::<Result<_, _>>()
                .map_err(Error::sql("enqueue"))?;
            let mut conflicted = Vec::new();
            for &i in &pending {
                if inserted.contains(&jobs[i].id) {
                    ids[i] = Some(jobs[i].id);
                } else {
                    conflicted.push(i);
                }
            }
            if conflicted.is_empty() {
                pending.clear();
                break;
            }
            // Skipped: a live job holds the key. Find it; if it finished meanwhile, the
            // key is free and the next round inserts.
            let rows = self
                .q(&self.sql.dedupe_lookup)
                .bind(
                    conflicted
                        .iter()
                        .map(|&i| jobs[i].queue.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    conflicted
                        .iter()
                        .map(|&i| jobs[i].dedupe_key.as_deref().unwrap_or(""))
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *conn)
                .await
                .map_err(Error::sql("enqueue"))?;
            let mut holders: HashMap<(String, String), Uuid> = HashMap::new();
            for row in &rows {
                let read = || -> Result<(String, String, Uuid), sqlx::Error> {
                    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
                };
                let (queue, key, id) = read().map_err(Error::sql("enqueue"))?;
                holders.insert((queue, key), id);
            }
            pending = conflicted
                .into_iter()
                .filter(|&i| {
                    let key = (
                        jobs[i].queue.clone(),
                        jobs[i].dedupe_key.clone().unwrap_or_default(),
                    );
                    match holders.get(&key) {
                        Some(&holder) => {
                            ids[i] = Some(holder);
                            false
                        }
                        None => true,
                    }
                })
                .collect();
        }
        if !pending.is_empty() {
            return Err(Error::Queue(flow_core::Error::Backend(
                "a dedupe key kept changing hands during enqueue; try again"
                    .to_owned()
                    .into(),
            )));
        }
        for (i, f) in alias {
            ids[i] = ids[f];
        }
        ids.into_iter()
            .map(|id| {
                id.ok_or_else(|| {
                    Error::Queue(flow_core::Error::Backend(
                        "enqueue lost track of a job id".to_owned().into(),
                    ))
                })
            })
            .collect()
    }

    /// Inserts many chunks in one transaction on `conn`.
    async fn insert_in_tx(
        &self,
        conn: &mut PgConnection,
        jobs: &[Prepared],
    ) -> Result<Vec<JobId>, Error> {
        let mut tx = conn.begin().await.map_err(Error::sql("enqueue"))?;
        let mut ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            ids.extend(self.insert_chunk(&mut tx, chunk).await?);
        }
        tx.commit().await.map_err(Error::sql("enqueue"))?;
        Ok(ids)
    }

    /// Inserts one chunk inside a transaction: by COPY when it qualifies, else by the
    /// `INSERT ... SELECT FROM unnest(...)` statement.
    async fn insert_chunk(
        &self,
        conn: &mut PgConnection,
        jobs: &[Prepared],
    ) -> Result<Vec<JobId>, Error> {
        if !copy_eligible(jobs) {
            return self.insert(conn, jobs).await;
        }
        let now_ms: i64 = self
            .q(&self.sql.now_ms)
            .fetch_one(&mut *conn)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(Error::sql("enqueue"))?;
        let mut rows = String::with_capacity(jobs.iter().map(|j| j.payload.len() + 128).sum());
        for job in jobs {
            copy_row(&mut rows, job, now_ms);
        }
        let mut copy = conn
            .copy_in_raw(&self.sql.copy_in)
            .await
            .map_err(Error::sql("enqueue"))?;
        copy.send(rows.into_bytes())
            .await
            .map_err(Error::sql("enqueue"))?;
        let stored = copy.finish().await.map_err(Error::sql("enqueue"))?;
        if stored != jobs.len() as u64 {
            return Err(Error::Queue(flow_core::Error::Backend(
                format!("COPY stored {stored} of {} jobs", jobs.len()).into(),
            )));
        }
        let queues: HashSet<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
        self.q(&self.sql.notify_queues)
            .bind(&self.channel)
            .bind(queues.into_iter().collect::<Vec<_>>())
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::sql("enqueue"))?;
        Ok(jobs.iter().map(|j| j.id).collect())
    }

    /// Leases up to `max` jobs. While the queue keeps a backlog, most rounds take the
    /// fast path (ready jobs only); a full round, which also leases and promotes due
    /// scheduled jobs, runs at least every [`PROMOTE_EVERY_MS`] and whenever the fast
    /// path comes back empty.
    async fn lease_round(
        &self,
        queue: &str,
        max: i64,
        start: i64,
        lease_ms: i64,
    ) -> Result<Round, Error> {
        let slot = self.waiters.get(queue);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last_full = slot.full_fetch_at_ms.load(Ordering::Relaxed);
        let mut rows = Vec::new();
        if last_full != 0 && now.saturating_sub(last_full) < PROMOTE_EVERY_MS {
            rows = self
                .q(&self.sql.fetch_ready)
                .bind(queue)
                .bind(max)
                .bind(lease_ms)
                .bind(start)
                .fetch_all_on(&self.lane)
                .await
                .map_err(Error::sql("fetch"))?;
        }
        // A short fast round that found something leaves the rest to the next fetch,
        // which comes right after; an empty one looks at the due scheduled jobs too.
        if rows.is_empty() {
            let more = self
                .q(&self.sql.fetch)
                .bind(queue)
                .bind(max)
                .bind(lease_ms)
                .bind(start)
                .fetch_all_on(&self.lane)
                .await
                .map_err(Error::sql("fetch"))?;
            slot.full_fetch_at_ms.store(now.max(1), Ordering::Relaxed);
            rows.extend(more);
        }
        let mut jobs = Vec::with_capacity(rows.len());
        let mut corrupt = Vec::new();
        let mut idle = None;
        for row in &rows {
            // The full statement's "nothing leased" row: a NULL id.
            if let Ok(None) = row.try_get::<Option<Uuid>, _>(0) {
                let paused: Option<bool> = row.try_get(12).map_err(Error::sql("fetch"))?;
                let due_in: Option<i64> = row.try_get(13).map_err(Error::sql("fetch"))?;
                idle = Some((paused.unwrap_or(false), due_in));
                continue;
            }
            match decode_leased(row) {
                Ok(job) => jobs.push(job),
                Err(bad) => corrupt.push(bad),
            }
        }
        jobs.sort_by_key(|(job, seq): &(LeasedJob, i64)| (job.priority, *seq));
        let n_corrupt = corrupt.len();
        for bad in corrupt {
            self.dead_letter_corrupt(bad).await;
        }
        Ok(Round {
            jobs: jobs.into_iter().map(|(job, _)| job).collect(),
            corrupt: n_corrupt,
            idle,
        })
    }

    /// Moves a leased row that cannot be decoded to the dead-letter set.
    async fn dead_letter_corrupt(&self, bad: CorruptRow) {
        let CorruptRow { lease, reason } = bad;
        tracing::warn!(job_id = %lease.job_id, queue = %lease.queue, reason = %reason,
            "stored job cannot be decoded; dead-lettering it");
        let failure = Failure::new(
            CODE_CORRUPT_JOB,
            format!(
                "the stored job cannot be decoded ({reason}); it was dead-lettered instead of run"
            ),
        );
        match self.fail(&lease, &failure).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(job_id = %lease.job_id, error = %e,
                "could not dead-letter a corrupt job; it comes back when its lease expires"),
        }
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<(), Error> {
        let token = fenced_token(lease)?;
        let row = self
            .q(&self.sql.fail)
            .bind(lease.job_id)
            .bind(token)
            .bind(&lease.queue)
            .bind(failure_json(failure))
            .fetch_optional_on(&self.lane)
            .await
            .map_err(Error::sql("fail"))?;
        // A replay (this lease dead-lettered the job already) still trims: the first
        // call may have stopped before its trim.
        if row.is_none() && !self.replayed_one(lease, token, &[4]).await? {
            return Err(lease_lost(lease));
        }
        self.trim_dead(&lease.queue).await
    }

    /// Drops the oldest dead letters beyond the limit.
    async fn trim_dead(&self, queue: &str) -> Result<(), Error> {
        let limit = i64::try_from(self.settings.opts.dead_letter_limit).unwrap_or(i64::MAX);
        let dropped: i64 = self
            .q(&self.sql.trim_dead)
            .bind(queue)
            .bind(limit)
            .fetch_one_on(&self.lane)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(Error::sql("trim dead letters"))?;
        if dropped > 0 {
            tracing::info!(queue = %queue, dropped, "dead-letter set full: dropped the oldest");
        }
        Ok(())
    }

    /// Hands leases back (ready, attempt not counted); returns the ids that matched.
    async fn release_many(&self, leases: &[Lease]) -> Result<HashSet<Uuid>, Error> {
        let mut ids = Vec::with_capacity(leases.len());
        let mut tokens = Vec::with_capacity(leases.len());
        let mut queues = Vec::with_capacity(leases.len());
        for lease in leases {
            if let Ok(token) = i64::try_from(lease.token) {
                ids.push(lease.job_id);
                tokens.push(token);
                queues.push(lease.queue.as_str());
            }
        }
        let rows = self
            .q(&self.sql.release_many)
            .bind(ids)
            .bind(tokens)
            .bind(&queues)
            .bind(&self.channel)
            .fetch_all_on(&self.lane)
            .await
            .map_err(Error::sql("release"))?;
        let matched = rows
            .iter()
            .map(|r| r.try_get::<Uuid, _>(0))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(Error::sql("release"))?;
        let woken: HashSet<&str> = queues.into_iter().collect();
        for queue in woken {
            self.waiters.wake(queue);
        }
        Ok(matched)
    }

    async fn prune_batch(&self, queue: &str) -> Result<u64, Error> {
        let n: i64 = self
            .q(&self.sql.prune)
            .bind(queue)
            .bind(self.retention_ms())
            .bind(PRUNE_BATCH)
            .fetch_one_on(&self.lane)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(Error::sql("prune"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Completes items (already checked); returns the ids that matched their lease.
    async fn complete_batch(
        &self,
        ids: Vec<Uuid>,
        tokens: Vec<i64>,
        queues: Vec<&str>,
        results: Vec<String>,
    ) -> Result<HashSet<Uuid>, Error> {
        let rows = if let ([id], [token], [queue], [result]) =
            (&ids[..], &tokens[..], &queues[..], &results[..])
        {
            self.q(&self.sql.complete_one)
                .bind(*id)
                .bind(*token)
                .bind(*queue)
                .bind(result.as_str())
                .fetch_all_on(&self.lane)
                .await
        } else {
            self.q(&self.sql.complete_many)
                .bind(&ids)
                .bind(&tokens)
                .bind(&queues)
                .bind(&results)
                .fetch_all_on(&self.lane)
                .await
        }
        .map_err(Error::sql("complete"))?;
        let mut done = rows
            .iter()
            .map(|r| r.try_get::<Uuid, _>(0))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(Error::sql("complete"))?;
        if done.len() < ids.len() {
            let mut rest = (Vec::new(), Vec::new(), Vec::new());
            for ((id, token), queue) in ids.iter().zip(&tokens).zip(&queues) {
                if !done.contains(id) {
                    rest.0.push(*id);
                    rest.1.push(*token);
                    rest.2.push(*queue);
                }
            }
            done.extend(self.replayed(rest.0, rest.1, rest.2, &[3]).await?);
        }
        Ok(done)
    }

    /// Of the given leases, those whose job is in one of `states` and still carries the
    /// lease's token: the outcome was recorded by this lease already (a call sent again
    /// after its reply was lost). Only asked after a statement matched fewer rows than
    /// it was given, so the hot path pays nothing for it.
    async fn replayed(
        &self,
        ids: Vec<Uuid>,
        tokens: Vec<i64>,
        queues: Vec<&str>,
        states: &[i32],
    ) -> Result<HashSet<Uuid>, Error> {
        let rows = self
            .q(&self.sql.replayed)
            .bind(&ids)
            .bind(&tokens)
            .bind(&queues)
            .bind(states)
            .fetch_all_on(&self.lane)
            .await
            .map_err(Error::sql("replay check"))?;
        rows.iter()
            .map(|r| r.try_get::<Uuid, _>(0))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(Error::sql("replay check"))
    }

    /// Whether `lease` already recorded an outcome that left its job in one of `states`.
    async fn replayed_one(&self, lease: &Lease, token: i64, states: &[i32]) -> Result<bool, Error> {
        let found = self
            .replayed(
                vec![lease.job_id],
                vec![token],
                vec![lease.queue.as_str()],
                states,
            )
            .await?;
        Ok(found.contains(&lease.job_id))
    }
}

/// A leased row that could not be decoded.
#[derive(Debug)]
struct CorruptRow {
    lease: Lease,
    reason: String,
}

/// Decodes one row of the fetch statement into a leased job and its place in line.
fn decode_leased(row: &PgRow) -> Result<(LeasedJob, i64), CorruptRow> {
    // Columns: id, queue, payload, tenant, priority, attempts, max_retries, headers,
    // created_at_ms, token, lease_expires_at_ms, seq.
    let id: Uuid = row.try_get(0).unwrap_or_default();
    let queue: String = row.try_get(1).unwrap_or_default();
    let token: i64 = row.try_get(9).unwrap_or(-1);
    let expires_at_ms: i64 = row.try_get(10).unwrap_or(0);
    let lease = Lease {
        job_id: id,
        queue: queue.clone(),
        token: u64::try_from(token).unwrap_or(0),
        expires_at_ms,
    };
    let corrupt = |reason: String| CorruptRow {
        lease: lease.clone(),
        reason,
    };
    let payload = json_column(row, 2, "payload").map_err(corrupt)?;
    let headers = headers_column(row, 7).map_err(corrupt)?;
    let tenant: String = column(row, 3, "tenant").map_err(corrupt)?;
    let priority: i32 = column(row, 4, "priority").map_err(corrupt)?;
    let attempts = count_column(row, 5, "attempts").map_err(corrupt)?;
    let max_retries = count_column_i64(row, 6, "max_retries").map_err(corrupt)?;
    let created_at_ms: i64 = column(row, 8, "created_at_ms").map_err(corrupt)?;
    let seq: i64 = column(row, 11, "seq").map_err(corrupt)?;
    Ok((
        LeasedJob {
            id,
            queue,
            payload,
            tenant,
            priority,
            attempt: attempts,
            max_retries,
            headers,
            enqueued_at_ms: created_at_ms,
            lease: lease.clone(),
        },
        seq,
    ))
}

fn column<'r, T>(row: &'r PgRow, i: usize, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(i).map_err(|e| format!("column {name}: {e}"))
}

fn count_column(row: &PgRow, i: usize, name: &str) -> Result<u32, String> {
    let v: i32 = column(row, i, name)?;
    u32::try_from(v).map_err(|_| format!("column {name}: negative value {v}"))
}

fn count_column_i64(row: &PgRow, i: usize, name: &str) -> Result<u32, String> {
    let v: i64 = column(row, i, name)?;
    u32::try_from(v).map_err(|_| format!("column {name}: value {v} out of range"))
}

/// A JSON column selected as text.
fn json_column(row: &PgRow, i: usize, name: &str) -> Result<Value, String> {
    let text: &str = column(row, i, name)?;
    serde_json::from_str(text).map_err(|e| format!("column {name} is not valid JSON for us: {e}"))
}

fn opt_json_column(row: &PgRow, i: usize, name: &str) -> Result<Option<Value>, String> {
    let text: Option<&str> = column(row, i, name)?;
    text.map(|t| {
        serde_json::from_str(t).map_err(|e| format!("column {name} is not valid JSON for us: {e}"))
    })
    .transpose()
}

fn headers_column(row: &PgRow, i: usize) -> Result<BTreeMap<String, String>, String> {
    let text: &str = column(row, i, "headers")?;
    serde_json::from_str(text)
        .map_err(|e| format!("column headers is not an object of strings: {e}"))
}

/// Reads a full job row (the `job` statement). Strict unless the job is dead, where
/// undecodable payloads and headers are shown as their stored text (a corrupt job is
/// dead-lettered and must stay inspectable).
fn decode_info(row: &PgRow) -> Result<JobInfo, Error> {
    let id: Uuid = row.try_get(0).map_err(Error::sql("job"))?;
    let corrupt = |reason: String| Error::Corrupt {
        job_id: id.to_string(),
        reason,
    };
    let state_code: i16 = column(row, 2, "state").map_err(corrupt)?;
    let state = state_of(state_code).map_err(corrupt)?;
    let lenient = state == JobState::Dead;
    let payload = match json_column(row, 7, "payload") {
        Ok(v) => v,
        Err(_) if lenient => raw_text(row, 7),
        Err(e) => return Err(corrupt(e)),
    };
    let headers = match headers_column(row, 16) {
        Ok(h) => h,
        Err(_) if lenient => BTreeMap::new(),
        Err(e) => return Err(corrupt(e)),
    };
    let result = opt_json_column(row, 8, "result").map_err(corrupt)?;
    let error = failure_column(row, 9).map_err(corrupt)?;
    Ok(JobInfo {
        id,
        queue: column(row, 1, "queue").map_err(corrupt)?,
        state,
        attempts: count_column(row, 3, "attempts").map_err(corrupt)?,
        max_retries: count_column_i64(row, 4, "max_retries").map_err(corrupt)?,
        priority: column(row, 5, "priority").map_err(corrupt)?,
        tenant: column(row, 6, "tenant").map_err(corrupt)?,
        payload,
        result,
        error,
        created_at_ms: column(row, 10, "created_at_ms").map_err(corrupt)?,
        run_at_ms: column(row, 11, "run_at_ms").map_err(corrupt)?,
        finished_at_ms: column(row, 12, "finished_at_ms").map_err(corrupt)?,
        lease_expiries: count_column(row, 13, "lease_expiries").map_err(corrupt)?,
        cancel_requested: column(row, 14, "cancel_requested").map_err(corrupt)?,
        dedupe_key: column(row, 15, "dedupe_key").map_err(corrupt)?,
        headers,
    })
}

/// The stored text of a JSON column, as a JSON string (for inspecting corrupt rows).
fn raw_text(row: &PgRow, i: usize) -> Value {
    row.try_get::<Option<String>, _>(i)
        .ok()
        .flatten()
        .map_or(Value::Null, Value::String)
}

/// The `error` column: a failure; text that is not one is kept as its message.
fn failure_column(row: &PgRow, i: usize) -> Result<Option<Failure>, String> {
    let text: Option<&str> = column(row, i, "error")?;
    Ok(text
        .map(|t| serde_json::from_str::<Failure>(t).unwrap_or_else(|_| Failure::new("UNKNOWN", t))))
}

fn state_of(code: i16) -> Result<JobState, String> {
    Ok(match code {
        0 => JobState::Ready,
        1 => JobState::Scheduled,
        2 => JobState::Running,
        3 => JobState::Completed,
        4 => JobState::Dead,
        5 => JobState::Cancelled,
        other => return Err(format!("unknown state {other}")),
    })
}

/// Validates a job like [`NewJob::validate`] and serialises it once.
fn prepare(job: NewJob, max_payload_bytes: usize) -> Result<Prepared, flow_core::Error> {
    validate_queue_name(&job.queue)?;
    let payload =
        serde_json::to_string(&job.payload).map_err(|e| flow_core::Error::InvalidJob {
            option: "payload",
            reason: e.to_string(),
        })?;
    if payload.len() > max_payload_bytes {
        return Err(flow_core::Error::PayloadTooLarge {
            size: payload.len(),
            limit: max_payload_bytes,
        });
    }
    if payload.contains("u0000") && has_nul(&job.payload) {
        return Err(flow_core::Error::InvalidJob {
            option: "payload",
            reason: "contains a NUL character (\\u0000), which PostgreSQL cannot store".into(),
        });
    }
    // Tenant, dedupe key and headers: the limits every backend applies.
    job.validate_fields()?;
    let nul_in = |s: &str| s.contains('\0');
    if nul_in(&job.tenant)
        || job.dedupe_key.as_deref().is_some_and(nul_in)
        || job.headers.iter().any(|(k, v)| nul_in(k) || nul_in(v))
    {
        return Err(flow_core::Error::InvalidJob {
            option: "tenant, dedupe_key or headers",
            reason: "contain a NUL character, which PostgreSQL cannot store".into(),
        });
    }
    let headers =
        serde_json::to_string(&job.headers).map_err(|e| flow_core::Error::InvalidJob {
            option: "headers",
            reason: e.to_string(),
        })?;
    Ok(Prepared {
        id: Uuid::now_v7(),
        queue: job.queue,
        payload,
        tenant: job.tenant,
        priority: job.priority,
        run_at_ms: job.run_at_ms,
        delay_ms: job.delay_ms.map(|d| ms(Duration::from_millis(d))),
        max_retries: i64::from(job.max_retries),
        dedupe_key: job.dedupe_key,
        headers,
    })
}

/// Smallest batch worth a COPY (below it, one INSERT statement is quicker).
const COPY_MIN: usize = 32;

/// Whether a batch can go in by COPY: large enough, no dedupe keys.
fn copy_eligible(jobs: &[Prepared]) -> bool {
    jobs.len() >= COPY_MIN && jobs.iter().all(|j| j.dedupe_key.is_none())
}

/// Appends one COPY text-format row: id, queue, state (0 ready, 1 scheduled when due
/// after `now_ms`), priority, max_retries, tenant, payload, headers, then the due time
/// (`now_ms` when none), and `now_ms` as ready_since and created_at. `now_ms` is the
/// database clock, so a delay counts from it.
fn copy_row(out: &mut String, job: &Prepared, now_ms: i64) {
    use std::fmt::Write as _;
    let delayed = job.delay_ms.map(|d| now_ms.saturating_add(d));
    let run_at = match (job.run_at_ms, delayed) {
        (Some(at), Some(after)) => at.max(after),
        (at, after) => at.or(after).unwrap_or(now_ms),
    };
    let state = u8::from(run_at > now_ms);
    let _ = write!(
        out,
        "{}\t{}\t{state}\t{}\t{}\t",
        job.id, job.queue, job.priority, job.max_retries
    );
    copy_escape(out, &job.tenant);
    out.push('\t');
    copy_escape(out, &job.payload);
    out.push('\t');
    copy_escape(out, &job.headers);
    let _ = writeln!(out, "\t{run_at}\t{now_ms}\t{now_ms}");
}

/// Escapes text for COPY's text format (backslash, tab, newline, carriage return).
fn copy_escape(out: &mut String, text: &str) {
    if !text
        .bytes()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Whether a JSON value holds a NUL character in a string or key.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Replaces NUL characters (which `jsonb` cannot store) by U+FFFD.
fn strip_nul(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace('\0', "\u{fffd}")),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nul).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{fffd}"), strip_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Serialises a value for a `jsonb` column (NUL characters stored as U+FFFD).
fn json_text(v: &Value) -> String {
    let text = v.to_string();
    if text.contains("u0000") && has_nul(v) {
        strip_nul(v.clone()).to_string()
    } else {
        text
    }
}

/// Serialises a failure as stored: bounded ([`Failure::bounded`]), for a `jsonb` column.
fn failure_json(failure: &Failure) -> String {
    let failure = &failure.clone().bounded();
    match serde_json::to_value(failure) {
        Ok(v) => json_text(&v),
        Err(_) => json_text(&serde_json::json!({"code": failure.code, "message": failure.message})),
    }
}

fn lease_lost(lease: &Lease) -> Error {
    Error::Queue(flow_core::Error::LeaseLost {
        job_id: lease.job_id.to_string(),
    })
}

fn not_found(queue: &str, id: JobId) -> flow_core::Error {
    flow_core::Error::JobNotFound {
        queue: queue.to_owned(),
        job_id: id.to_string(),
    }
}

/// Checks the lease's queue name and converts its token (a token that does not fit
/// the column was never handed out: the lease is forged or stale).
fn fenced_token(lease: &Lease) -> Result<i64, Error> {
    validate_queue_name(&lease.queue)?;
    i64::try_from(lease.token).map_err(|_| lease_lost(lease))
}

/// One error shared by every item of a failed batch.
#[derive(Debug)]
struct Shared(Arc<Error>);

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

fn shared_error(e: &Arc<Error>) -> flow_core::Error {
    if e.is_transient() {
        flow_core::Error::Unavailable(Box::new(Shared(e.clone())))
    } else {
        flow_core::Error::Backend(Box::new(Shared(e.clone())))
    }
}

#[async_trait]
impl JobQueue for PgQueue {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, flow_core::Error> {
        let mut ids = self.enqueue_many(vec![job]).await?;
        ids.pop()
            .ok_or_else(|| flow_core::Error::Backend("enqueue returned no id".to_owned().into()))
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, flow_core::Error> {
        let prepared = self.prepare_all(jobs)?;
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let mut conn = inner.lane.acquire().await.map_err(Error::sql("enqueue"))?;
        let one_statement = prepared.len() == 1
            || (prepared.len() <= ENQUEUE_CHUNK
                && !copy_eligible(&prepared)
                && prepared.iter().all(|p| p.dedupe_key.is_none()));
        let result = if one_statement {
            // One statement stores every job or none (dedupe keys may take more rounds,
            // and only a single job is safe outside a transaction then).
            inner.insert(conn.conn(), &prepared).await
        } else {
            // All or nothing: several jobs may take several statements (dedupe rounds,
            // chunks), which share one transaction.
            inner.insert_in_tx(conn.conn(), &prepared).await
        };
        conn.settle_op(&result);
        drop(conn);
        let ids = result?;
        let queues: HashSet<&str> = prepared.iter().map(|p| p.queue.as_str()).collect();
        for queue in queues {
            inner.waiters.wake(queue);
        }
        Ok(ids)
    }

    async fn fetch(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, flow_core::Error> {
        self.fetch_held(queue, max, max, lease, wait).await
    }

    async fn fetch_held(
        &self,
        queue: &str,
        max: usize,
        start: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, flow_core::Error> {
        validate_queue_name(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let start = i64::try_from(start.min(max)).unwrap_or(i64::MAX);
        let max = i64::try_from(max.min(MAX_FETCH)).unwrap_or(1);
        let lease_ms = ms(lease);
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        self.ensure_listener();
        let slot = self.inner.waiters.get(queue);
        loop {
            // Register for wake-ups before looking, so a notification that arrives
            // between the look and the wait is not missed.
            let notified = slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let round = self.lease_round(queue, max, start, lease_ms).await?;
            if !round.jobs.is_empty() {
                return Ok(round.jobs);
            }
            if round.corrupt > 0 {
                // Only undecodable rows came out (now dead-lettered): look again at once.
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let (paused, due_in_ms) = round.idle.unwrap_or((false, None));
            let mut wake_at = deadline;
            if !paused && let Some(due) = due_in_ms {
                // Due now but held by another fetcher: look again shortly.
                let due = Duration::from_millis(due.clamp(5, i64::MAX).unsigned_abs());
                wake_at = wake_at.min(now + due);
            }
            if !self.inner.waiters.listening() {
                wake_at = wake_at.min(now + self.inner.settings.poll_interval);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn mark_started(&self, leases: &[Lease]) -> Result<(), flow_core::Error> {
        let mut ids = Vec::with_capacity(leases.len());
        let mut tokens = Vec::with_capacity(leases.len());
        let mut queues = Vec::with_capacity(leases.len());
        for lease in leases {
            tokens.push(fenced_token(lease)?);
            ids.push(lease.job_id);
            queues.push(lease.queue.as_str());
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.inner
            .q(&self.inner.sql.mark_started)
            .bind(&ids)
            .bind(&tokens)
            .bind(&queues)
            .fetch_all_on(&self.inner.lane)
            .await
            .map_err(Error::sql("mark_started"))?;
        Ok(())
    }

    async fn flush(&self) {
        self.inner.in_flight.idle().await;
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
    ) -> Result<Heartbeat, flow_core::Error> {
        let token = fenced_token(lease)?;
        let row = self
            .inner
            .q(&self.inner.sql.heartbeat)
            .bind(lease.job_id)
            .bind(token)
            .bind(&lease.queue)
            .bind(ms(extend))
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("heartbeat"))?;
        let Some(row) = row else {
            return Err(lease_lost(lease).into());
        };
        let (expires_at_ms, cancel_requested): (i64, bool) =
            (|| Ok::<_, sqlx::Error>((row.try_get(0)?, row.try_get(1)?)))()
                .map_err(Error::sql("heartbeat"))?;
        Ok(Heartbeat {
            expires_at_ms,
            cancel_requested,
        })
    }

    /// Completions arriving while a batch statement is in flight go out together in
    /// the next one (see the `batch` module); each is fenced and answered on its own.
    async fn complete(&self, lease: &Lease, result: Value) -> Result<(), flow_core::Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = self.inner.completions.push(batch::Pending {
            lease: lease.clone(),
            result,
            reply,
        });
        if start {
            let queue = self.clone();
            tokio::spawn(async move { queue.flush_completions().await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(flow_core::Error::Backend(
                "the completion batch was abandoned before it answered"
                    .to_owned()
                    .into(),
            ))
        })
    }

    async fn complete_many(&self, items: Vec<(Lease, Value)>) -> Vec<Result<(), flow_core::Error>> {
        let mut answers: Vec<Option<Result<(), flow_core::Error>>> =
            Vec::with_capacity(items.len());
        let mut ids = Vec::new();
        let mut tokens = Vec::new();
        let mut queues = Vec::new();
        let mut results = Vec::new();
        let mut seen = HashSet::new();
        for (lease, value) in &items {
            let checked = fenced_token(lease);
            match checked {
                Err(e) => answers.push(Some(Err(e.into()))),
                // The same lease twice in one batch: only the first may record.
                Ok(_) if !seen.insert(lease.job_id) => {
                    answers.push(Some(Err(lease_lost(lease).into())));
                }
                Ok(token) => {
                    ids.push(lease.job_id);
                    tokens.push(token);
                    queues.push(lease.queue.as_str());
                    results.push(flow_core::queue::bound_result_json(json_text(value)));
                    answers.push(None);
                }
            }
        }
        // One statement per chunk of at most `batch::MAX_BATCH` items; each item's
        // answer comes from its chunk.
        let mut outcomes: HashMap<Uuid, Result<bool, Arc<Error>>> =
            HashMap::with_capacity(ids.len());
        let mut start = 0;
        while start < ids.len() {
            let end = (start + batch::MAX_BATCH).min(ids.len());
            let outcome = self
                .inner
                .complete_batch(
                    ids[start..end].to_vec(),
                    tokens[start..end].to_vec(),
                    queues[start..end].to_vec(),
                    results[start..end].to_vec(),
                )
                .await
                .map_err(Arc::new);
            for id in &ids[start..end] {
                let answer = match &outcome {
                    Ok(matched) => Ok(matched.contains(id)),
                    Err(e) => Err(e.clone()),
                };
                outcomes.insert(*id, answer);
            }
            start = end;
        }
        items
            .iter()
            .zip(answers)
            .map(|((lease, _), answer)| match answer {
                Some(given) => given,
                None => match outcomes.get(&lease.job_id) {
                    Some(Ok(true)) => Ok(()),
                    Some(Ok(false)) | None => Err(lease_lost(lease).into()),
                    Some(Err(e)) => Err(shared_error(e)),
                },
            })
            .collect()
    }

    async fn retry(
        &self,
        lease: &Lease,
        delay: Duration,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        let token = fenced_token(lease)?;
        let row = self
            .inner
            .q(&self.inner.sql.retry)
            .bind(lease.job_id)
            .bind(token)
            .bind(&lease.queue)
            .bind(ms(delay))
            .bind(failure_json(&failure))
            .bind(&self.inner.channel)
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("retry"))?;
        let Some(row) = row else {
            if self.inner.replayed_one(lease, token, &[0, 1, 5]).await? {
                return Ok(());
            }
            return Err(lease_lost(lease).into());
        };
        let state: i16 = row.try_get(0).map_err(Error::sql("retry"))?;
        if state < 2 {
            self.inner.waiters.wake(&lease.queue);
        }
        Ok(())
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), flow_core::Error> {
        Ok(self.inner.fail(lease, &failure).await?)
    }

    async fn release(&self, lease: &Lease) -> Result<(), flow_core::Error> {
        let token = fenced_token(lease)?;
        let matched = self.inner.release_many(std::slice::from_ref(lease)).await?;
        if matched.contains(&lease.job_id) || self.inner.replayed_one(lease, token, &[0, 5]).await?
        {
            Ok(())
        } else {
            Err(lease_lost(lease).into())
        }
    }

    async fn mark_cancelled(
        &self,
        lease: &Lease,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        let token = fenced_token(lease)?;
        let row = self
            .inner
            .q(&self.inner.sql.mark_cancelled)
            .bind(lease.job_id)
            .bind(token)
            .bind(&lease.queue)
            .bind(failure_json(&failure))
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("mark_cancelled"))?;
        match row {
            Some(_) => Ok(()),
            None if self.inner.replayed_one(lease, token, &[5]).await? => Ok(()),
            None => Err(lease_lost(lease).into()),
        }
    }

    async fn reap(&self, queue: &str) -> Result<ReapReport, flow_core::Error> {
        validate_queue_name(queue)?;
        let inner = &self.inner;
        let max_expiries =
            i32::try_from(inner.settings.opts.max_lease_expiries).unwrap_or(i32::MAX);
        let mut report = ReapReport::default();
        loop {
            let rows = inner
                .q(&inner.sql.reap)
                .bind(queue)
                .bind(max_expiries)
                .bind(REAP_BATCH)
                .bind(&inner.channel)
                .fetch_all_on(&inner.lane)
                .await
                .map_err(Error::sql("reap"))?;
            for row in &rows {
                let (id, state): (Uuid, i16) =
                    (|| Ok::<_, sqlx::Error>((row.try_get(0)?, row.try_get(1)?)))()
                        .map_err(Error::sql("reap"))?;
                match state {
                    0 => report.requeued.push(id),
                    4 => report.dead.push(id),
                    _ => {}
                }
            }
            if rows.len() < REAP_BATCH as usize {
                break;
            }
        }
        if !report.dead.is_empty() {
            inner.trim_dead(queue).await?;
        }
        if !report.requeued.is_empty() {
            inner.waiters.wake(queue);
            tracing::debug!(queue = %queue, requeued = report.requeued.len(), "reclaimed expired leases");
        }
        for _ in 0..PRUNE_BATCHES_PER_REAP {
            if inner.prune_batch(queue).await? < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(report)
    }

    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, flow_core::Error> {
        validate_queue_name(queue)?;
        let row = self
            .inner
            .q(&self.inner.sql.job)
            .bind(id)
            .bind(queue)
            .bind(self.inner.retention_ms())
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("job"))?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(decode_info(&row)?)),
        }
    }

    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, flow_core::Error> {
        validate_queue_name(queue)?;
        let row = self
            .inner
            .q(&self.inner.sql.cancel)
            .bind(id)
            .bind(queue)
            .bind(self.inner.retention_ms())
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("cancel"))?;
        let Some(row) = row else {
            return Err(not_found(queue, id));
        };
        let state: i16 = row.try_get(0).map_err(Error::sql("cancel"))?;
        Ok(match state {
            0 | 1 => CancelOutcome::Cancelled,
            2 => CancelOutcome::Requested,
            _ => CancelOutcome::AlreadyFinished,
        })
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, flow_core::Error> {
        validate_queue_name(queue)?;
        let inner = &self.inner;
        inner.prune_batch(queue).await?;
        let row = inner
            .q(&inner.sql.stats)
            .bind(queue)
            .fetch_one_on(&inner.lane)
            .await
            .map_err(Error::sql("stats"))?;
        let get = |i: usize| -> Result<i64, flow_core::Error> {
            Ok(row.try_get::<i64, _>(i).map_err(Error::sql("stats"))?)
        };
        let count = |i: usize| get(i).map(|v| u64::try_from(v).unwrap_or(0));
        let paused: bool = row.try_get(5).map_err(Error::sql("stats"))?;
        let oldest: Option<i64> = row.try_get(7).map_err(Error::sql("stats"))?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready: count(0)?,
            scheduled: count(1)?,
            running: count(2)?,
            completed: count(3)?,
            dead: count(4)?,
            paused,
            oldest_ready_age_s: oldest.map_or(0.0, |age| age.max(0) as f64 / 1000.0),
            dead_dropped: count(6)?,
        })
    }

    async fn dead_letters(
        &self,
        queue: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, flow_core::Error> {
        validate_queue_name(queue)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .inner
            .q(&self.inner.sql.dead_letters)
            .bind(queue)
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all_on(&self.inner.lane)
            .await
            .map_err(Error::sql("dead_letters"))?;
        rows.iter()
            .map(|row| {
                let id: Uuid = row.try_get(0).map_err(Error::sql("dead_letters"))?;
                let corrupt = |reason: String| Error::Corrupt {
                    job_id: id.to_string(),
                    reason,
                };
                Ok(DeadLetter {
                    id,
                    queue: column(row, 1, "queue").map_err(corrupt)?,
                    error: failure_column(row, 2)
                        .map_err(corrupt)?
                        .unwrap_or_else(|| Failure::new("UNKNOWN", "no failure was recorded")),
                    attempts: count_column(row, 3, "attempts").map_err(corrupt)?,
                    failed_at_ms: column::<Option<i64>>(row, 4, "finished_at_ms")
                        .map_err(corrupt)?
                        .unwrap_or(0),
                    payload: json_column(row, 5, "payload").unwrap_or_else(|_| raw_text(row, 5)),
                    tenant: column(row, 6, "tenant").map_err(corrupt)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
            .map_err(Into::into)
    }

    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), flow_core::Error> {
        validate_queue_name(queue)?;
        let n = self.requeue(queue, Some(id)).await?;
        if n > 0 {
            return Ok(());
        }
        match self.job(queue, id).await? {
            None => Err(not_found(queue, id)),
            Some(info) => Err(flow_core::Error::InvalidState {
                job_id: id.to_string(),
                state: info.state.as_str().to_owned(),
                operation: "requeue it as a dead letter",
            }),
        }
    }

    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        validate_queue_name(queue)?;
        Ok(self.requeue(queue, None).await?)
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        validate_queue_name(queue)?;
        let n: i64 = self
            .inner
            .q(&self.inner.sql.purge_dead)
            .bind(queue)
            .fetch_one_on(&self.inner.lane)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(Error::sql("purge_dead"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn pause(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.set_paused(queue, true).await
    }

    async fn resume(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.set_paused(queue, false).await?;
        self.inner.waiters.wake(queue);
        Ok(())
    }

    async fn ping(&self) -> Result<(), flow_core::Error> {
        sqlx::query("SELECT 1")
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql("ping"))?;
        Ok(())
    }
}

impl PgQueue {
    /// Sends pending single completions in batches until none is left.
    async fn flush_completions(&self) {
        let mut guard = batch::FlushGuard {
            completions: &self.inner.completions,
            finished: false,
        };
        while let Some(batch) = self.inner.completions.take() {
            let mut replies = Vec::with_capacity(batch.len());
            let items = batch
                .into_iter()
                .map(|p| {
                    replies.push(p.reply);
                    (p.lease, p.result)
                })
                .collect();
            let results = self.complete_many(items).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        guard.finished = true;
    }

    /// Revives one dead job (`Some(id)`) or all of a queue's; returns how many. Retries
    /// when a concurrent enqueue took a dedupe key at the same moment.
    async fn requeue(&self, queue: &str, id: Option<JobId>) -> Result<u64, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .inner
                .q(&self.inner.sql.requeue_dead)
                .bind(id)
                .bind(queue)
                .bind(&self.inner.channel)
                .fetch_one_on(&self.inner.lane)
                .await
                .and_then(|r| r.try_get::<i64, _>(0));
            match result {
                Ok(n) => {
                    if n > 0 {
                        self.inner.waiters.wake(queue);
                    }
                    return Ok(u64::try_from(n).unwrap_or(0));
                }
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() && attempt < 5 => {}
                Err(e) => return Err(Error::sql("requeue_dead")(e)),
            }
        }
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), flow_core::Error> {
        validate_queue_name(queue)?;
        self.inner
            .q(&self.inner.sql.set_paused)
            .bind(queue)
            .bind(paused)
            .bind(&self.inner.channel)
            .fetch_optional_on(&self.inner.lane)
            .await
            .map_err(Error::sql(if paused { "pause" } else { "resume" }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prepare_validates_like_newjob() {
        let ok = prepare(NewJob::new("q", json!({"n": 1})), 1024).expect("valid");
        assert_eq!(ok.payload, r#"{"n":1}"#);
        assert_eq!(ok.headers, "{}");
        assert!(matches!(
            prepare(NewJob::new("bad name", json!(1)), 1024),
            Err(flow_core::Error::InvalidQueueName { .. })
        ));
        assert!(matches!(
            prepare(NewJob::new("q", json!("x".repeat(100))), 64),
            Err(flow_core::Error::PayloadTooLarge {
                size: 102,
                limit: 64
            })
        ));
        assert!(matches!(
            prepare(NewJob::new("q", json!(1)).tenant(""), 64),
            Err(flow_core::Error::InvalidJob {
                option: "tenant",
                ..
            })
        ));
        assert!(matches!(
            prepare(NewJob::new("q", json!({"a": "x\u{0}y"})), 64),
            Err(flow_core::Error::InvalidJob {
                option: "payload",
                ..
            })
        ));
        // An escaped backslash followed by u0000 is not a NUL.
        assert!(prepare(NewJob::new("q", json!({"a": "\\u0000"})), 64).is_ok());
    }

    #[test]
    fn nul_characters_are_replaced_in_results() {
        assert_eq!(json_text(&json!({"a": "x\u{0}"})), "{\"a\":\"x\u{fffd}\"}");
        assert_eq!(json_text(&json!({"a": 1})), "{\"a\":1}");
    }

    #[test]
    fn copy_rows_are_escaped() {
        let job = prepare(
            NewJob::new("q", json!({"a": "tab\there\\ \n"})).tenant("t\\x"),
            1024,
        )
        .expect("valid");
        let mut row = String::new();
        copy_row(&mut row, &job, 1_700_000_000_000);
        let fields: Vec<&str> = row.trim_end_matches('\n').split('\t').collect();
        assert_eq!(fields.len(), 11, "{row}");
        assert_eq!(fields[8..], ["1700000000000"; 3]);
        assert_eq!(fields[5], "t\\\\x");
        assert_eq!(fields[6], r#"{"a":"tab\\there\\\\ \\n"}"#);
        assert!(!row[..row.len() - 1].contains('\n'));
    }

    #[test]
    fn copy_rows_take_delays_from_the_database_clock() {
        let now = 1_700_000_000_000;
        let row_of = |job: NewJob| {
            let mut row = String::new();
            copy_row(&mut row, &prepare(job, 1024).expect("valid"), now);
            let fields: Vec<String> = row
                .trim_end_matches('\n')
                .split('\t')
                .map(str::to_owned)
                .collect();
            (fields[2].clone(), fields[8].clone())
        };
        let delayed = NewJob::new("q", json!(1)).delay(Duration::from_secs(30));
        assert_eq!(
            row_of(delayed),
            ("1".to_owned(), (now + 30_000).to_string())
        );
        let past = NewJob::new("q", json!(1)).run_at_ms(now - 5);
        assert_eq!(row_of(past), ("0".to_owned(), (now - 5).to_string()));
        let mut both = NewJob::new("q", json!(1)).run_at_ms(now - 60_000);
        both.delay_ms = Some(1_000);
        assert_eq!(row_of(both), ("1".to_owned(), (now + 1_000).to_string()));
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ms(Duration::MAX), ms(MAX_DURATION));
    }
}
