//! [`RedisQueue`]: the [`JobQueue`] on Redis and Redis Cluster.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool::managed::{PoolError, TimeoutType, Timeouts};
use flow_core::queue::{
    CODE_CORRUPT_JOB, CancelOutcome, DeadLetter, Failure, Heartbeat, InFlight, InFlightGuard,
    JobId, JobInfo, JobQueue, JobState, Lease, LeasedJob, NewJob, QueueOptions, QueueStats,
    ReapReport, validate_queue_name,
};
use redis::{Script, Value};
use serde_json::Value as Json;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::RedisConfig;
use crate::conn::{self, Pool, Pooled};
use crate::error::{Describe, Error, breaks_connection};
use crate::reply::{self, OwnedReply, Record, Reply};
use crate::scripts::{Call, SCRIPTS};

/// Longest wait a fetch honours (about a year), whatever the caller passes.
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest single blocking wait; a fetch waiting longer looks again in between, so a
/// wake-up token lost to a dropped fetch delays nobody for long.
const MAX_BLOCK: Duration = Duration::from_secs(5);
/// How long a fetch that found nothing stays registered as waiting beyond its block, at
/// least (the script registers for `wait + 5 s` and renews when less than half the margin
/// is left), less half a second of safety.
const REGISTERED_FOR: Duration = Duration::from_millis(2_000);
/// How long an idle fetch waits for a free blocking connection before polling instead.
const WAIT_CONN_PATIENCE: Duration = Duration::from_millis(50);
/// Most jobs one fetch leases.
const MAX_FETCH: usize = 1000;
/// Longest duration used in arithmetic (about 31,700 years), so times stay exact in the
/// doubles Lua computes with (below 2^53).
const MAX_MS: u128 = 1_000_000_000_000_000;
/// Jobs per enqueue script call.
const ENQUEUE_CHUNK: usize = 500;
/// Payload bytes per enqueue script call (a chunk is cut at whichever limit comes first).
const ENQUEUE_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Attempts of a transaction refused while queueing (see [`RedisQueue::transaction`]).
const TX_ATTEMPTS: u32 = 5;
/// How long the jobs an `enqueue_many` call stages on a cluster (see
/// [`RedisQueue::enqueue_staged`]) are kept if the call never stores or deletes them.
const STAGED_TTL: Duration = Duration::from_secs(3600);
/// Leases per complete script call.
const COMPLETE_CHUNK: usize = 500;
/// Dead letters requeued or purged per script call.
const DEAD_BATCH: usize = 500;

/// A [`JobQueue`] on Redis (standalone) or Redis Cluster.
///
/// Every key of a queue carries the hash tag `{<prefix>:<queue>}`, so a queue lives in
/// one cluster slot, and every step that touches more than one key is one Lua script
/// (see `docs/redis.md` for the key layout and the scripts). Times (lease deadlines,
/// due times, retention) come from the Redis server's clock, so workers on machines
/// with skewed clocks agree on them. Cheap to clone: clones share the connection pools.
///
/// ```no_run
/// use flow_core::queue::{JobQueue, NewJob, QueueOptions};
/// use queue_redis::RedisQueue;
/// use serde_json::json;
/// use std::time::Duration;
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let q = RedisQueue::connect("redis://127.0.0.1:6379", QueueOptions::default()).await?;
/// let id = q.enqueue(NewJob::new("emails", json!({"to": "a@example.com"}))).await?;
/// let jobs = q.fetch("emails", 10, Duration::from_secs(30), Duration::from_secs(1)).await?;
/// q.complete(&jobs[0].lease, json!("sent")).await?;
/// assert_eq!(q.job("emails", id).await?.and_then(|j| j.result), Some(json!("sent")));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisQueue {
    /// Connections for scripts and commands.
    pool: Pool,
    /// Connections for blocking waits (`BLPOP` on a queue's signal list), kept apart so a
    /// waiting fetch never holds up anyone's commands.
    wait_pool: Pool,
    /// Shared by clones (a fetch clones the queue into its task).
    prefix: Arc<str>,
    opts: QueueOptions,
    describe: Arc<Describe>,
    cluster: bool,
    /// Queues whose last look (by any fetch of this process) found nothing, by base key:
    /// a fetch may skip its first look at them (see [`Quiet`]).
    quiet: Arc<Mutex<HashMap<String, Quiet>>>,
    /// Fetches, and hand-backs of fetches whose caller went away, still running (see
    /// [`Delivery`]).
    in_flight: Arc<InFlight>,
}

/// The answer of a fetch round on its way to the caller. Dropped before the caller took
/// the jobs out of it (the caller's future was dropped while the script ran, or between
/// the answer arriving and being read), it hands the leased jobs back: ready again in
/// their place, the attempt not counted.
struct Delivery {
    round: Option<FetchRound>,
    queue: RedisQueue,
    /// Counts this fetch for `flush` until its jobs were taken or handed back.
    in_flight: Option<InFlightGuard>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let Some(round) = self.round.take().filter(|r| !r.jobs.is_empty()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                jobs = round.jobs.len(),
                "fetch dropped outside a runtime; its jobs return when their leases expire"
            );
            return;
        };
        let queue = self.queue.clone();
        let in_flight = self.in_flight.take();
        runtime.spawn(async move {
            let _in_flight = in_flight;
            let n = round.jobs.len();
            let mut failed = 0;
            for job in &round.jobs {
                // A transient error is tried again a few times: a job not handed back
                // waits for its lease to expire.
                let mut tries = 0;
                loop {
                    match queue.release(&job.lease).await {
                        Ok(()) | Err(flow_core::Error::LeaseLost { .. }) => break,
                        Err(e) if e.is_transient() && tries < 3 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(50 << tries)).await;
                        }
                        Err(e) => {
                            failed += 1;
                            tracing::warn!(queue = %job.queue, job_id = %job.id, error = %e,
                                "a dropped fetch's job could not be handed back; it returns when its lease expires");
                            break;
                        }
                    }
                }
            }
            tracing::debug!(jobs = n, failed, "fetch dropped: handed its jobs back");
        });
    }
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("target", &self.describe.target)
            .field("key_prefix", &self.prefix)
            .field("cluster", &self.cluster)
            .field("options", &self.opts)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// Connects to the server or cluster at `url` (see [`RedisConfig::from_url`]) with
    /// the default settings and `opts`, and checks that it answers.
    pub async fn connect(url: &str, opts: QueueOptions) -> Result<Self, Error> {
        Self::with_config(RedisConfig::from_url(url)?.queue_options(opts)).await
    }

    /// Connects to the Redis Cluster of which `urls` are nodes (see
    /// [`RedisConfig::cluster`]) with the default settings and `opts`.
    pub async fn connect_cluster<I, S>(urls: I, opts: QueueOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_config(RedisConfig::cluster(urls)?.queue_options(opts)).await
    }

    /// Connects with a full configuration: builds the pools, then loads the scripts,
    /// which also checks that the server answers and accepts our credentials.
    pub async fn with_config(config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        let describe = Describe {
            target: config.redacted(),
            secrets: config.secrets(),
        };
        let queue = Self {
            pool: conn::pool(&config, config.pool_size, &describe)?,
            wait_pool: conn::pool(&config, config.wait_pool_size, &describe)?,
            prefix: Arc::from(config.key_prefix.as_str()),
            opts: config.queue_options.clone(),
            cluster: config.is_cluster(),
            describe: Arc::new(describe),
            quiet: Arc::default(),
            in_flight: Arc::default(),
        };
        queue.load_scripts().await?;
        Ok(queue)
    }

    /// The queue options in use.
    pub fn options(&self) -> &QueueOptions {
        &self.opts
    }

    /// The key prefix: keys of queue `q` start with `{<prefix>:q}`.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether this queue talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Loads every script (`SCRIPT LOAD`, on every primary of a cluster).
    async fn load_scripts(&self) -> Result<(), Error> {
        let mut conn = self.conn().await?;
        for script in SCRIPTS.all() {
            if let Err(e) = script.prepare_invoke().load_async(&mut *conn).await {
                if breaks_connection(&e) {
                    conn.broken = true;
                }
                return Err(self.describe.redis(&e));
            }
        }
        Ok(())
    }

    /// `{<prefix>:<queue>}`: the hash tag every key of the queue starts with.
    fn base(&self, queue: &str) -> String {
        format!("{{{}:{}}}", self.prefix, queue)
    }

    async fn conn(&self) -> Result<Pooled, Error> {
        self.pool.get().await.map_err(|e| self.describe.pool(e))
    }

    /// Runs a script call on a pooled connection, with no timeout around it: a script the
    /// server may have run is never abandoned by us. After `NOSCRIPT` (a restarted,
    /// flushed or failed-over server) it loads the script and sends the call again.
    async fn invoke(&self, call: &Call) -> Result<Value, Error> {
        let mut conn = self.conn().await?;
        let mut result = call.cmd.query_async::<Value>(&mut *conn).await;
        if let Err(e) = &result
            && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        {
            result = match call.script.load_async(&mut *conn).await {
                Ok(_) => call.cmd.query_async::<Value>(&mut *conn).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(value) => Ok(value),
            Err(e) => {
                if breaks_connection(&e) {
                    conn.broken = true;
                }
                Err(self.describe.redis(&e))
            }
        }
    }

    fn retention_ms(&self) -> i64 {
        ms(self.opts.result_retention).max(1)
    }

    fn dead_limit(&self) -> usize {
        self.opts.dead_letter_limit
    }

    /// Runs a fenced lease script whose reply is 1 (done) or 0 (stale lease).
    async fn settle(
        &self,
        script: &'static Script,
        name: &'static str,
        lease: &Lease,
        args: &[String],
    ) -> Result<(), flow_core::Error> {
        validate_queue_name(&lease.queue)?;
        let mut invocation = Call::new(script, &self.base(&lease.queue));
        invocation
            .arg(lease.job_id.to_string())
            .arg(lease.token.to_string());
        for arg in args {
            invocation.arg(arg);
        }
        let value = self.invoke(&invocation).await?;
        match reply::as_i64(&value) {
            Some(1) => Ok(()),
            Some(0) => Err(lease_lost(lease)),
            _ => Err(Error::Reply {
                script: name,
                reason: "expected 0 or 1".into(),
            }
            .into()),
        }
    }

    /// Encodes jobs of one queue into enqueue script calls of up to [`ENQUEUE_CHUNK`] jobs
    /// or [`ENQUEUE_CHUNK_BYTES`] of encoded jobs each, with a new id per job.
    fn enqueue_calls(
        &self,
        queue: &str,
        jobs: &[&NewJob],
    ) -> Result<Vec<EnqueueCall>, flow_core::Error> {
        let base = self.base(queue);
        let retention = self.retention_ms();
        let mut calls = Vec::new();
        let mut start = 0;
        while start < jobs.len() {
            let mut invocation = Call::new(&SCRIPTS.enqueue, &base);
            let mut end = start;
            let mut bytes = 0;
            let mut plain = true;
            let mut immediate = true;
            let mut chunk_ids = Vec::new();
            let mut encoded = Vec::new();
            while end < jobs.len() && end - start < ENQUEUE_CHUNK {
                let job = jobs[end];
                let packed = encode(job)?;
                if end > start && bytes + packed.len() > ENQUEUE_CHUNK_BYTES {
                    break;
                }
                bytes += packed.len();
                plain &= job.dedupe_key.is_none();
                immediate &= job.run_at_ms.is_none() && job.delay_ms.is_none();
                chunk_ids.push(new_job_id());
                encoded.push(packed);
                end += 1;
            }
            // Mode 2: no dedupe key and no due time, so three values per job (see
            // enqueue.lua).
            let lean = plain && immediate;
            invocation
                .arg(encoded.len())
                .arg(match (plain, lean) {
                    (_, true) => "2",
                    (true, false) => "1",
                    (false, false) => "0",
                })
                .arg(retention);
            let mut id_text = Uuid::encode_buffer();
            for ((job, id), packed) in jobs[start..end].iter().zip(&chunk_ids).zip(&encoded) {
                invocation
                    .arg(&*id.hyphenated().encode_lower(&mut id_text))
                    .arg(packed)
                    .arg(job.priority);
                if lean {
                    continue;
                }
                invocation.arg(due_arg(job));
                invocation.arg(job.dedupe_key.as_deref().unwrap_or_default());
            }
            calls.push(EnqueueCall {
                call: invocation,
                ids: chunk_ids,
            });
            start = end;
        }
        Ok(calls)
    }

    /// Runs commands as one `MULTI`/`EXEC` transaction on one connection; on a cluster
    /// they must all name keys of one slot, `key`'s. The server runs them one after the
    /// other with nothing in between once `EXEC` arrives, and none of them when the
    /// connection fails before: a call cut off mid-way changes nothing. Returns each
    /// command's reply.
    ///
    /// Two refusals mean that nothing ran, and the transaction is sent again:
    /// * a command refused while queueing (`MOVED` or `ASK` from a node that does not
    ///   serve the slot, which a cluster client can pick for a moment after a reconnect or
    ///   a slot move; `TRYAGAIN`, `CLUSTERDOWN`) aborts the whole transaction: up to
    ///   [`TX_ATTEMPTS`] times, after a command on `key` that lets the client find the
    ///   slot's node again and a short pause;
    /// * `NOSCRIPT` for a call of `script` (after a restart, flush or failover): every
    ///   script call in it is of that one script, and nothing runs between them, so none
    ///   ran; the script is loaded and the transaction sent once more.
    async fn transaction(
        &self,
        key: &str,
        script: Option<&'static Script>,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<Value>, Error> {
        let n = cmds.len();
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        pipe.cmd("EXEC");
        // Every reply comes back as a value, errors included, to be looked at here.
        pipe.ignore_errors();
        let mut loaded = false;
        let mut attempt = 1;
        loop {
            let mut conn = self.conn().await?;
            let replies = match pipe.query_async::<Vec<Value>>(&mut *conn).await {
                Ok(replies) => replies,
                Err(e) => {
                    if breaks_connection(&e) {
                        conn.broken = true;
                    }
                    return Err(self.describe.redis(&e));
                }
            };
            // MULTI's OK, a QUEUED (or the refusal) per command, then EXEC's reply.
            let mut replies = replies.into_iter().skip(1);
            let refused = replies
                .by_ref()
                .take(n)
                .find_map(|queued| queued.extract_error().err());
            let exec = replies.next();
            if let Some(e) = refused {
                if attempt < TX_ATTEMPTS && refused_for_now(&e) {
                    attempt += 1;
                    // A plain command on the slot's key follows any redirection and lets
                    // the client learn the slot's node before the next attempt.
                    let _ = redis::cmd("EXISTS")
                        .arg(key)
                        .query_async::<Value>(&mut *conn)
                        .await;
                    drop(conn);
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                    continue;
                }
                return Err(self.describe.redis(&e));
            }
            // Each command's reply is looked at on its own (extract_error on the whole
            // array would stop at the first error).
            let results = match exec {
                Some(Value::Array(results)) if results.len() == n => results,
                Some(Value::ServerError(e)) => return Err(self.describe.redis(&e.into())),
                other => {
                    return Err(Error::Reply {
                        script: "enqueue",
                        reason: format!("EXEC answered {other:?} to a transaction of {n} commands"),
                    });
                }
            };
            let mut out = Vec::with_capacity(n);
            let mut missing_script = false;
            for result in results {
                match result.extract_error() {
                    Ok(value) => out.push(value),
                    Err(e)
                        if !loaded
                            && script.is_some()
                            && e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        missing_script = true;
                        break;
                    }
                    Err(e) => return Err(self.describe.redis(&e)),
                }
            }
            let Some(script) = script.filter(|_| missing_script) else {
                return Ok(out);
            };
            loaded = true;
            if let Err(e) = script.prepare_invoke().load_async(&mut *conn).await {
                if breaks_connection(&e) {
                    conn.broken = true;
                }
                return Err(self.describe.redis(&e));
            }
        }
    }

    /// Stores the jobs of several queues of a Redis Cluster (several slots, which no
    /// transaction spans) in two steps. First each queue's jobs are staged in its own slot
    /// (`{<prefix>:<queue>}:staged:<call id>`, a list that expires after [`STAGED_TTL`]),
    /// one transaction per queue, where no fetch, count or read sees them. Only when every
    /// queue is staged does one short enqueue script per queue store its staged jobs at
    /// once. A failure while staging stores nothing; a failure in the second step (after
    /// the cluster client's own retries) leaves the queues done before it stored, and the
    /// error says which.
    async fn enqueue_staged(
        &self,
        groups: &[(&str, Vec<&NewJob>)],
    ) -> Result<Vec<Vec<JobId>>, flow_core::Error> {
        let call_id = Uuid::new_v4().simple().to_string();
        let retention = self.retention_ms().to_string();
        let staged_key = |queue: &str| format!("{}:staged:{call_id}", self.base(queue));
        let mut all_ids: Vec<Vec<Uuid>> = Vec::with_capacity(groups.len());
        let mut staged: Vec<&str> = Vec::with_capacity(groups.len());
        for (queue, jobs) in groups {
            let key = staged_key(queue);
            let plain = jobs.iter().all(|j| j.dedupe_key.is_none());
            let mut del = redis::cmd("DEL");
            del.arg(&key);
            let mut cmds = vec![del];
            let mut push = redis::cmd("RPUSH");
            push.arg(&key)
                .arg(jobs.len())
                .arg(if plain { "1" } else { "0" })
                .arg(&retention);
            let mut bytes = 0;
            let mut ids = Vec::with_capacity(jobs.len());
            let mut id_text = Uuid::encode_buffer();
            for job in jobs {
                let packed = encode(job)?;
                if bytes > 0 && bytes + packed.len() > ENQUEUE_CHUNK_BYTES {
                    cmds.push(std::mem::replace(&mut push, redis::cmd("RPUSH")));
                    push.arg(&key);
                    bytes = 0;
                }
                bytes += packed.len();
                let id = new_job_id();
                push.arg(&*id.hyphenated().encode_lower(&mut id_text))
                    .arg(packed)
                    .arg(job.priority)
                    .arg(due_arg(job))
                    .arg(job.dedupe_key.as_deref().unwrap_or_default());
                ids.push(id);
            }
            cmds.push(push);
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(&key).arg(ms(STAGED_TTL));
            cmds.push(expire);
            staged.push(queue);
            if let Err(e) = self.transaction(&key, None, cmds).await {
                self.drop_staged(&staged, &call_id).await;
                return Err(e.into());
            }
            all_ids.push(ids);
        }
        let mut out = Vec::with_capacity(groups.len());
        for (i, (queue, _)) in groups.iter().enumerate() {
            let mut invocation = Call::new(&SCRIPTS.enqueue, &self.base(queue));
            invocation.arg("staged").arg(&call_id);
            let stored = match self.invoke(&invocation).await {
                Ok(value) if reply::as_i64(&value) == Some(-1) => Err(Error::Reply {
                    script: "enqueue",
                    reason: format!(
                        "the jobs staged for queue {queue:?} expired before they could be stored"
                    ),
                }),
                Ok(value) => enqueue_reply(&value, &all_ids[i]),
                Err(e) => Err(e),
            };
            match stored {
                Ok(ids) => out.push(ids),
                Err(e) => {
                    self.drop_staged(&staged, &call_id).await;
                    let context = format!(
                        "enqueue_many stored the jobs of queue(s) {:?}, those of {queue:?} may \
                         or may not be stored, those of {:?} were not",
                        &staged[..i],
                        &staged[i + 1..]
                    );
                    return Err(with_context(e, &context).into());
                }
            }
        }
        self.drop_staged(&staged, &call_id).await;
        Ok(out)
    }

    /// Deletes the staged lists of `queues` for `call_id`, best effort (they expire
    /// anyway).
    async fn drop_staged(&self, queues: &[&str], call_id: &str) {
        for queue in queues {
            let mut del = redis::cmd("DEL");
            del.arg(format!("{}:staged:{call_id}", self.base(queue)));
            if let Ok(mut conn) = self.conn().await
                && let Err(e) = del.query_async::<Value>(&mut *conn).await
                && breaks_connection(&e)
            {
                conn.broken = true;
            }
        }
    }

    /// [`RedisQueue::fetch_once`] in a task of its own, so that dropping the caller's
    /// future cannot strand the jobs the script leased: if nobody is left to take them,
    /// they are handed back (see [`Delivery`]).
    async fn fetch_round(
        &self,
        queue: &str,
        base: &str,
        max: usize,
        start: usize,
        lease_ms: i64,
        wait: Duration,
    ) -> Result<FetchRound, flow_core::Error> {
        let this = self.clone();
        let (queue, base) = (queue.to_owned(), base.to_owned());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let in_flight = self.in_flight.begin();
        tokio::spawn(async move {
            let result = this
                .fetch_once(&queue, &base, max, start, lease_ms, wait)
                .await;
            // Unsent, or sent but never read: dropping the delivery hands the jobs back.
            let _ = tx.send(result.map(|round| Delivery {
                round: Some(round),
                queue: this,
                in_flight: Some(in_flight),
            }));
        });
        match rx.await {
            Ok(result) => result.map(|mut delivery| delivery.round.take().unwrap_or_default()),
            Err(_) => Err(Error::Reply {
                script: "fetch",
                reason: "the fetch task ended without an answer".into(),
            }
            .into()),
        }
    }

    /// One round of fetching: promote, purge, lease. Never waits. `wait` is how long the
    /// caller will block for a wake-up if nothing is leased (zero: it will not); the
    /// script then registers it as a waiter.
    async fn fetch_once(
        &self,
        queue: &str,
        base: &str,
        max: usize,
        start: usize,
        lease_ms: i64,
        wait: Duration,
    ) -> Result<FetchRound, flow_core::Error> {
        let mut invocation = Call::new(&SCRIPTS.fetch, base);
        invocation
            .arg(max)
            .arg(lease_ms)
            .arg(self.retention_ms())
            .arg(self.dead_limit())
            .arg(ms(wait))
            // Fencing tokens: a random base per call (the script adds each job's place),
            // never a stored counter that a crash could rewind.
            .arg(fastrand::u64(1..(1u64 << 52)))
            .arg(start.min(max));
        let value = self.invoke(&invocation).await?;
        let mut reply = OwnedReply::new(value, "fetch")?;
        let paused = reply.int()? == 1;
        let next_due = reply.int()?;
        let corrupt = usize::try_from(reply.int()?).unwrap_or(0);
        let orphans = usize::try_from(reply.int()?).unwrap_or(0);
        let first_token = u64::try_from(reply.int()?).unwrap_or(0);
        let expires_at_ms = reply.int()?;
        for _ in 0..corrupt {
            let id = reply.string()?;
            tracing::warn!(queue, job_id = %id, code = CODE_CORRUPT_JOB,
                "a stored job record could not be decoded; it was moved to the dead-letter set");
        }
        for _ in 0..orphans {
            let id = reply.string()?;
            tracing::warn!(queue, job_id = %id,
                "the ready index named a job whose record does not exist; the entry was dropped");
        }
        // From here on the jobs are leased to us: every one decoded goes back to the
        // caller (or is handed back by `Delivery`), whatever fails after it.
        let mut jobs = Vec::with_capacity(reply.remaining());
        let mut undecodable = Vec::new();
        let mut token = first_token;
        while reply.remaining() > 0 {
            let raw = match reply
                .array()
                .and_then(|fields| RawLeased::read(fields, token, expires_at_ms))
            {
                Ok(raw) => raw,
                Err(e) => {
                    // The rest of the answer cannot be read: those jobs come back when
                    // their leases expire.
                    tracing::error!(queue, error = %e,
                        "a fetch answer could not be read to its end; the jobs not read come back when their leases expire");
                    break;
                }
            };
            token += 1;
            match raw.decode(queue) {
                Ok(job) => jobs.push(job),
                Err(bad) => undecodable.push(bad),
            }
        }
        let buried = corrupt + orphans + undecodable.len();
        for (reason, id, token) in undecodable {
            if let Err(e) = self.bury(queue, &id, token, &reason).await {
                tracing::warn!(queue, job_id = %id, error = %e,
                    "could not dead-letter an undecodable job; it comes back when its lease expires");
            }
        }
        Ok(FetchRound {
            jobs,
            paused,
            buried,
            next_due: u64::try_from(next_due).ok().map(Duration::from_millis),
        })
    }

    /// Dead-letters a job we leased but cannot decode, with [`CODE_CORRUPT_JOB`].
    async fn bury(
        &self,
        queue: &str,
        id: &str,
        token: u64,
        reason: &str,
    ) -> Result<(), flow_core::Error> {
        let mut invocation = Call::new(&SCRIPTS.bury, &self.base(queue));
        invocation
            .arg(id)
            .arg(token.to_string())
            .arg(reason)
            .arg(self.dead_limit());
        self.invoke(&invocation).await?;
        tracing::warn!(queue, job_id = %id, code = CODE_CORRUPT_JOB, reason,
            "a stored job record could not be decoded; it was moved to the dead-letter set");
        Ok(())
    }

    /// Blocks on the queue's signal list for up to `block`, on a connection of the wait
    /// pool. Dropping this future mid-wait detaches that connection from the pool (it
    /// closes) so a `BLPOP` still pending on the server never delays its next user; the
    /// most a dropped wait can lose is one wake-up token, never a job.
    async fn wait_for_signal(&self, base: &str, block: Duration) -> Result<Woke, Error> {
        let started = Instant::now();
        // Wait briefly for a free slot, but let a new connection take the time it needs
        // to be made (a slow or TLS link can need more than the patience).
        let timeouts = Timeouts {
            wait: Some(block.min(WAIT_CONN_PATIENCE)),
            create: None,
            recycle: None,
        };
        let conn = match self.wait_pool.timeout_get(&timeouts).await {
            Ok(conn) => conn,
            // Every blocking connection is in use: poll instead.
            Err(PoolError::Timeout(TimeoutType::Wait)) => return Ok(Woke::NoConnection),
            Err(e) => return Err(self.describe.pool(e)),
        };
        let remaining = block.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Ok(Woke::NoConnection);
        }
        let mut guard = DetachOnDrop(Some(conn));
        // BLPOP takes seconds with decimals; 0 would mean "forever".
        let seconds = format!("{:.3}", remaining.as_secs_f64().max(0.001));
        let key = format!("{base}:signal");
        let result = match guard.0.as_mut() {
            Some(conn) => {
                redis::cmd("BLPOP")
                    .arg(&key)
                    .arg(&seconds)
                    .query_async::<Value>(&mut **conn)
                    .await
            }
            None => return Ok(Woke::NoConnection),
        };
        // The reply arrived: the connection is in a clean state and goes back to the pool.
        let mut conn = guard.0.take();
        match result {
            Ok(Value::Nil) => Ok(Woke::TimedOut),
            Ok(_) => Ok(Woke::Signal),
            Err(e) => {
                if let Some(conn) = conn.as_mut()
                    && breaks_connection(&e)
                {
                    conn.broken = true;
                }
                Err(self.describe.redis(&e))
            }
        }
    }
}

/// What the last look at a queue that found nothing tells a later fetch of this process.
///
/// A look that leases nothing registers the fetcher as waiting (`meta.wait_until`) in the
/// same script, and from then on every change that makes a job ready pushes a wake-up
/// token until the registration runs out. So until then, and until the next scheduled job
/// is due, a fetch learns nothing new by looking again: a token in the signal list says
/// something changed, no token says nothing did. A fetch of an idle queue therefore blocks
/// on the signal list first and looks only when a token comes, at the next due time, or 5
/// seconds after the last look (the same bound on a token lost to a dropped fetch as
/// within one long fetch). An idle worker pool then sends one `BLPOP` per fetch and one
/// script every 5 seconds, instead of a script and a `BLPOP` per fetch.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    /// When the look was sent.
    looked_at: Instant,
    /// Until when the registration surely holds.
    registered_until: Instant,
    /// When the first scheduled job is due, if any.
    next_due_at: Option<Instant>,
}

impl RedisQueue {
    fn set_quiet(&self, base: &str, quiet: Option<Quiet>) {
        let mut map = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        match quiet {
            Some(q) => {
                map.insert(base.to_owned(), q);
            }
            None => {
                map.remove(base);
            }
        }
    }

    /// Blocks for a wake-up before the first look when the last look at the queue found
    /// nothing and nothing can have changed unannounced since (see [`Quiet`]). `Some` is
    /// the answer of the fetch (nothing, at its deadline); `None` means: look now.
    async fn wait_quietly(
        &self,
        base: &str,
        deadline: Instant,
    ) -> Result<Option<Vec<LeasedJob>>, Error> {
        let quiet = {
            let map = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(base) {
                Some(q) => *q,
                None => return Ok(None),
            }
        };
        let mut look_at = (quiet.looked_at + MAX_BLOCK).min(quiet.registered_until);
        if let Some(due) = quiet.next_due_at {
            look_at = look_at.min(due);
        }
        let now = Instant::now();
        if now >= look_at || now >= deadline {
            return Ok(None);
        }
        let until = deadline.min(look_at);
        match self.wait_for_signal(base, until - now).await? {
            Woke::TimedOut if until == deadline => Ok(Some(Vec::new())),
            Woke::Signal => {
                self.set_quiet(base, None);
                Ok(None)
            }
            Woke::TimedOut | Woke::NoConnection => Ok(None),
        }
    }
}

/// How a wait for a wake-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woke {
    /// A token was popped.
    Signal,
    /// The blocking wait ran its full time.
    TimedOut,
    /// No blocking connection was free (or no time was left): nothing was waited for.
    NoConnection,
}

/// Detaches a pooled connection when dropped while still holding it (a wait that was
/// cancelled mid-way), so it is closed instead of reused.
struct DetachOnDrop(Option<Pooled>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Pooled::take(conn));
        }
    }
}

/// What one fetch round found.
#[derive(Default)]
struct FetchRound {
    jobs: Vec<LeasedJob>,
    paused: bool,
    /// Records dead-lettered or dropped as corrupt in this round.
    buried: usize,
    /// Time until the next scheduled job is due.
    next_due: Option<Duration>,
}

/// A leased job as the fetch script returns it, before decoding.
struct RawLeased {
    id: String,
    attempt: i64,
    /// The job field, or the fields of a record written before it existed.
    job: Result<Vec<u8>, [Option<Vec<u8>>; 6]>,
    token: u64,
    expires_at_ms: i64,
}

impl RawLeased {
    /// Reads `{id, attempt, job}` or `{id, attempt, nil, payload, tenant, priority,
    /// max_retries, headers, created_at_ms}`.
    fn read(mut entry: OwnedReply, token: u64, expires_at_ms: i64) -> Result<Self, Error> {
        let id = entry.string()?;
        let attempt = entry.int()?;
        let job = match entry.bytes()? {
            Some(job) => Ok(job),
            None => {
                let mut legacy: [Option<Vec<u8>>; 6] = Default::default();
                for field in &mut legacy {
                    if entry.remaining() > 0 {
                        *field = entry.bytes()?;
                    }
                }
                Err(legacy)
            }
        };
        Ok(Self {
            id,
            attempt,
            job,
            token,
            expires_at_ms,
        })
    }

    /// Decodes the job; `Err` says what is wrong with the record (never its content),
    /// with the id and token to bury it with.
    fn decode(self, queue: &str) -> Result<LeasedJob, (String, String, u64)> {
        let decoded = match &self.job {
            Ok(raw) => reply::decode_job(raw),
            Err(legacy) => reply::decode_legacy(legacy.each_ref().map(Option::as_deref)),
        };
        let checked = decoded.and_then(|packed| {
            let id = self
                .id
                .parse::<JobId>()
                .map_err(|_| "the job id is not a UUID".to_owned())?;
            let attempt = u32::try_from(self.attempt)
                .map_err(|_| "attempts is not a valid number".to_owned())?;
            Ok((id, attempt, packed))
        });
        match checked {
            Ok((id, attempt, packed)) => Ok(LeasedJob {
                id,
                queue: queue.to_owned(),
                payload: packed.payload,
                tenant: packed.tenant,
                priority: packed.priority,
                attempt,
                max_retries: packed.max_retries,
                headers: packed.headers,
                enqueued_at_ms: packed.created_at_ms,
                lease: Lease {
                    job_id: id,
                    queue: queue.to_owned(),
                    token: self.token,
                    expires_at_ms: self.expires_at_ms,
                },
            }),
            Err(reason) => Err((reason, self.id, self.token)),
        }
    }
}

/// A new job id: a UUIDv7 (the time in milliseconds, then 74 random bits) whose random
/// bits come from a per-thread generator seeded at random, rather than from a system
/// call per id as `Uuid::now_v7` makes them. Enqueue relies on ids being new (see the
/// enqueue script); 74 random bits within one millisecond make a collision as unlikely
/// as with `now_v7`.
fn new_job_id() -> Uuid {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random = fastrand::u128(..).to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid()
}

/// One enqueue script call of jobs of one queue, and the ids it gives them.
struct EnqueueCall {
    call: Call,
    ids: Vec<Uuid>,
}

/// The `job` field of a job without its creation time (see `reply::encode_job`).
fn encode(job: &NewJob) -> Result<Vec<u8>, flow_core::Error> {
    let mut packed = Vec::with_capacity(64);
    reply::encode_job(
        &mut packed,
        job.priority,
        job.max_retries,
        &job.tenant,
        &job.headers,
        &job.payload,
    )
    .map_err(|e| flow_core::Error::InvalidJob {
        option: "payload",
        reason: e.to_string(),
    })?;
    Ok(packed)
}

/// The ids an enqueue script call answered for the jobs it was given `ids` for: the
/// count when every job was stored under its own id, else the id per job (its own, or
/// the live holder of its dedupe key).
fn enqueue_reply(value: &Value, ids: &[Uuid]) -> Result<Vec<JobId>, Error> {
    if let Some(n) = reply::as_i64(value) {
        if usize::try_from(n).ok() != Some(ids.len()) {
            return Err(Error::Reply {
                script: "enqueue",
                reason: format!("stored {n} of {} jobs", ids.len()),
            });
        }
        return Ok(ids.to_vec());
    }
    let mut reply = Reply::new(value, "enqueue")?;
    let mut out = Vec::with_capacity(ids.len());
    for _ in 0..ids.len() {
        let id = reply.string()?;
        out.push(id.parse().map_err(|_| Error::Reply {
            script: "enqueue",
            reason: format!("{id:?} is not a job id"),
        })?);
    }
    Ok(out)
}

/// Whether a command was refused while queueing for a reason that passes (the node does
/// not serve the slot right now, the cluster is down or busy moving keys).
fn refused_for_now(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, ClusterDown, Moved, TryAgain};
    matches!(
        e.kind(),
        redis::ErrorKind::Server(Moved | Ask | TryAgain | ClusterDown)
    )
}

/// `e` with `context` appended to its message (its kind kept).
fn with_context(e: Error, context: &str) -> Error {
    match e {
        Error::Unavailable { target, message } => Error::Unavailable {
            target,
            message: format!("{message}; {context}"),
        },
        Error::Redis { target, message } => Error::Redis {
            target,
            message: format!("{message}; {context}"),
        },
        Error::Reply { script, reason } => Error::Reply {
            script,
            reason: format!("{reason}; {context}"),
        },
        other => other,
    }
}

/// The due time of a job as the enqueue script reads it: `''` (now), `<run_at_ms>`,
/// `+<delay_ms>` or `<run_at_ms>+<delay_ms>`. A delay goes as a delay, so the script adds
/// it to the server's clock, not ours; it is capped at [`MAX_MS`].
fn due_arg(job: &NewJob) -> String {
    match (job.run_at_ms, job.delay_ms) {
        (None, None) => String::new(),
        (Some(at), None) => at.to_string(),
        (at, Some(delay)) => {
            let delay = u128::from(delay).min(MAX_MS);
            match at {
                Some(at) => format!("{at}+{delay}"),
                None => format!("+{delay}"),
            }
        }
    }
}

/// Milliseconds of `d`, capped at [`MAX_MS`].
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis().min(MAX_MS)).unwrap_or(i64::MAX)
}

fn lease_lost(lease: &Lease) -> flow_core::Error {
    flow_core::Error::LeaseLost {
        job_id: lease.job_id.to_string(),
    }
}

fn not_found(queue: &str, id: JobId) -> flow_core::Error {
    flow_core::Error::JobNotFound {
        queue: queue.to_owned(),
        job_id: id.to_string(),
    }
}

/// Serialises a failure as stored: bounded ([`Failure::bounded`]).
fn failure_json(failure: &Failure) -> Result<String, flow_core::Error> {
    serde_json::to_string(&failure.clone().bounded()).map_err(|e| flow_core::Error::InvalidJob {
        option: "failure",
        reason: e.to_string(),
    })
}

fn json_text(value: &Json, option: &'static str) -> Result<String, flow_core::Error> {
    serde_json::to_string(value).map_err(|e| flow_core::Error::InvalidJob {
        option,
        reason: e.to_string(),
    })
}

#[async_trait]
impl JobQueue for RedisQueue {
    async fn enqueue(&self, job: NewJob) -> Result<JobId, flow_core::Error> {
        job.validate(self.opts.max_payload_bytes)?;
        let calls = self.enqueue_calls(&job.queue, &[&job])?;
        let Some(one) = calls.first() else {
            return Err(Error::Reply {
                script: "enqueue",
                reason: "no call was made for the job".into(),
            }
            .into());
        };
        let value = self.invoke(&one.call).await?;
        enqueue_reply(&value, &one.ids)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Reply {
                    script: "enqueue",
                    reason: "no id came back".into(),
                }
                .into()
            })
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, flow_core::Error> {
        flow_core::queue::check_batch_len(jobs.len())?;
        for job in &jobs {
            job.validate(self.opts.max_payload_bytes)?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // The jobs of each queue, in input order; ids go back in input order.
        let mut by_queue: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let slot = *index.entry(job.queue.as_str()).or_insert_with(|| {
                by_queue.push((job.queue.as_str(), Vec::new()));
                by_queue.len() - 1
            });
            by_queue[slot].1.push(i);
        }
        let groups: Vec<(&str, Vec<&NewJob>)> = by_queue
            .iter()
            .map(|(queue, positions)| (*queue, positions.iter().map(|&i| &jobs[i]).collect()))
            .collect();
        let stored: Vec<Vec<JobId>> = if self.cluster && groups.len() > 1 {
            // Several slots: staged, then stored queue by queue.
            self.enqueue_staged(&groups).await?
        } else {
            // One queue, or one standalone server: one script call, or one transaction of
            // all of them. All or nothing either way.
            let mut cmds = Vec::new();
            let mut owners: Vec<(usize, Vec<Uuid>)> = Vec::new();
            for (g, (queue, group)) in groups.iter().enumerate() {
                for call in self.enqueue_calls(queue, group)? {
                    cmds.push(call.call);
                    owners.push((g, call.ids));
                }
            }
            let replies = if let [one] = cmds.as_slice() {
                vec![self.invoke(one).await?]
            } else {
                let cmds = cmds.into_iter().map(|call| call.cmd).collect();
                self.transaction(&self.base(groups[0].0), Some(&SCRIPTS.enqueue), cmds)
                    .await?
            };
            let mut stored: Vec<Vec<JobId>> = vec![Vec::new(); groups.len()];
            for ((g, ids), value) in owners.iter().zip(&replies) {
                stored[*g].extend(enqueue_reply(value, ids)?);
            }
            stored
        };
        let mut ids = vec![Uuid::nil(); jobs.len()];
        for ((_, positions), group_ids) in by_queue.iter().zip(stored) {
            if group_ids.len() != positions.len() {
                return Err(Error::Reply {
                    script: "enqueue",
                    reason: format!("{} ids for {} jobs", group_ids.len(), positions.len()),
                }
                .into());
            }
            for (&i, id) in positions.iter().zip(group_ids) {
                ids[i] = id;
            }
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
        let max = max.min(MAX_FETCH);
        let lease_ms = ms(lease);
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let base = self.base(queue);
        // A queue this process just looked at and found empty, while registered as waiting:
        // wait for a wake-up first instead of looking again (see `Quiet`).
        if let Some(jobs) = self.wait_quietly(&base, deadline).await? {
            return Ok(jobs);
        }
        loop {
            // The lease move happens inside this one script, run in a task of its own:
            // dropping this future at any await leaves every job ready, or leased and
            // handed back at once by that task (see `Delivery`), never nowhere.
            let sent_at = Instant::now();
            // Register (when nothing is found) for the longest single block, so that the
            // registration also covers the quiet waits of the next fetches.
            let wait_hint = if deadline > sent_at {
                MAX_BLOCK
            } else {
                Duration::ZERO
            };
            let round = self
                .fetch_round(queue, &base, max, start, lease_ms, wait_hint)
                .await?;
            if !round.jobs.is_empty() {
                self.set_quiet(&base, None);
                return Ok(round.jobs);
            }
            let now = Instant::now();
            if round.buried == 0 && !wait_hint.is_zero() {
                self.set_quiet(
                    &base,
                    Some(Quiet {
                        looked_at: sent_at,
                        registered_until: sent_at + wait_hint + REGISTERED_FOR,
                        next_due_at: round.next_due.map(|due| sent_at + due),
                    }),
                );
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            if round.buried > 0 {
                // Corrupt records were set aside: look again at once.
                continue;
            }
            let until_deadline = deadline - now;
            let mut block = until_deadline.min(MAX_BLOCK);
            if !round.paused
                && let Some(due) = round.next_due
            {
                block = block.min(due.max(Duration::from_millis(1)));
            }
            let woke = self.wait_for_signal(&base, block).await?;
            if woke == Woke::TimedOut && block == until_deadline {
                // No wake-up until the deadline: nothing became ready while we were
                // registered as waiting (and nothing came due before the deadline), so
                // there is no need for a last look; the caller's next fetch looks anyway.
                return Ok(Vec::new());
            }
            if woke == Woke::Signal {
                self.set_quiet(&base, None);
            }
        }
    }

    async fn mark_started(&self, leases: &[Lease]) -> Result<(), flow_core::Error> {
        let mut by_queue: HashMap<&str, Vec<&Lease>> = HashMap::new();
        for lease in leases {
            validate_queue_name(&lease.queue)?;
            by_queue
                .entry(lease.queue.as_str())
                .or_default()
                .push(lease);
        }
        for (queue, leases) in by_queue {
            for chunk in leases.chunks(COMPLETE_CHUNK) {
                let mut invocation = Call::new(&SCRIPTS.mark_started, &self.base(queue));
                invocation.arg(chunk.len());
                for lease in chunk {
                    invocation.arg(lease.job_id.to_string()).arg(lease.token);
                }
                self.invoke(&invocation).await?;
            }
        }
        Ok(())
    }

    async fn flush(&self) {
        self.in_flight.idle().await;
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
    ) -> Result<Heartbeat, flow_core::Error> {
        validate_queue_name(&lease.queue)?;
        let mut invocation = Call::new(&SCRIPTS.heartbeat, &self.base(&lease.queue));
        invocation
            .arg(lease.job_id.to_string())
            .arg(lease.token.to_string())
            .arg(ms(extend));
        let value = self.invoke(&invocation).await?;
        let mut reply = Reply::new(&value, "heartbeat")?;
        if reply.int()? != 1 {
            return Err(lease_lost(lease));
        }
        Ok(Heartbeat {
            expires_at_ms: reply.int()?,
            cancel_requested: reply.int()? == 1,
        })
    }

    async fn complete(&self, lease: &Lease, result: Json) -> Result<(), flow_core::Error> {
        self.complete_many(vec![(lease.clone(), result)])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(Error::Reply {
                    script: "complete",
                    reason: "no answer came back".into(),
                }
                .into())
            })
    }

    async fn complete_many(&self, items: Vec<(Lease, Json)>) -> Vec<Result<(), flow_core::Error>> {
        let mut out: Vec<Option<Result<(), flow_core::Error>>> =
            items.iter().map(|_| None).collect();
        let mut encoded: Vec<String> = Vec::with_capacity(items.len());
        // Group by queue, keeping each item's position.
        let mut by_queue: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (lease, result)) in items.iter().enumerate() {
            let checked = validate_queue_name(&lease.queue)
                .and_then(|()| json_text(result, "result"))
                .map(flow_core::queue::bound_result_json);
            match checked {
                Ok(text) => {
                    by_queue.entry(lease.queue.as_str()).or_default().push(i);
                    encoded.push(text);
                }
                Err(e) => {
                    out[i] = Some(Err(e));
                    encoded.push(String::new());
                }
            }
        }
        for (queue, positions) in by_queue {
            for chunk in positions.chunks(COMPLETE_CHUNK) {
                let mut invocation = Call::new(&SCRIPTS.complete, &self.base(queue));
                invocation.arg(chunk.len());
                let mut id_text = Uuid::encode_buffer();
                for &i in chunk {
                    let lease = &items[i].0;
                    invocation
                        .arg(&*lease.job_id.hyphenated().encode_lower(&mut id_text))
                        .arg(lease.token)
                        .arg(&encoded[i]);
                }
                let answers = match self.invoke(&invocation).await {
                    Ok(value) => Reply::new(&value, "complete").and_then(|mut reply| {
                        chunk
                            .iter()
                            .map(|_| reply.int())
                            .collect::<Result<Vec<_>, _>>()
                    }),
                    Err(e) => Err(e),
                };
                match answers {
                    Ok(answers) => {
                        for (&i, answer) in chunk.iter().zip(answers) {
                            out[i] = Some(if answer == 1 {
                                Ok(())
                            } else {
                                Err(lease_lost(&items[i].0))
                            });
                        }
                    }
                    Err(e) => {
                        for &i in chunk {
                            out[i] = Some(Err(e.duplicate().into()));
                        }
                    }
                }
            }
        }
        out.into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    Err(Error::Reply {
                        script: "complete",
                        reason: "an item got no answer".into(),
                    }
                    .into())
                })
            })
            .collect()
    }

    async fn retry(
        &self,
        lease: &Lease,
        delay: Duration,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        let args = [ms(delay).to_string(), failure_json(&failure)?];
        self.settle(&SCRIPTS.retry, "retry", lease, &args).await
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), flow_core::Error> {
        let args = [failure_json(&failure)?, self.dead_limit().to_string()];
        self.settle(&SCRIPTS.fail, "fail", lease, &args).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), flow_core::Error> {
        self.settle(&SCRIPTS.release, "release", lease, &[]).await
    }

    async fn mark_cancelled(
        &self,
        lease: &Lease,
        failure: Failure,
    ) -> Result<(), flow_core::Error> {
        let args = [failure_json(&failure)?];
        self.settle(&SCRIPTS.mark_cancelled, "mark_cancelled", lease, &args)
            .await
    }

    async fn reap(&self, queue: &str) -> Result<ReapReport, flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.reap, &self.base(queue));
        invocation
            .arg(self.opts.max_lease_expiries)
            .arg(self.retention_ms())
            .arg(self.dead_limit());
        let value = self.invoke(&invocation).await?;
        let mut reply = Reply::new(&value, "reap")?;
        let requeued = usize::try_from(reply.int()?).unwrap_or(0);
        let mut report = ReapReport::default();
        let mut n = 0;
        while reply.remaining() > 0 {
            let raw = reply.string()?;
            let Ok(id) = raw.parse::<JobId>() else {
                continue;
            };
            if n < requeued {
                report.requeued.push(id);
            } else {
                report.dead.push(id);
            }
            n += 1;
        }
        report.requeued.sort_unstable();
        report.dead.sort_unstable();
        Ok(report)
    }

    async fn job(&self, queue: &str, id: JobId) -> Result<Option<JobInfo>, flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.job, &self.base(queue));
        invocation.arg(id.to_string());
        let value = self.invoke(&invocation).await?;
        let mut reply = Reply::new(&value, "job")?;
        let now = reply.int()?;
        let record = Record::from_value(reply.value()?, "job")?;
        if record.is_empty() {
            return Ok(None);
        }
        let mut info = match record.info(queue, id) {
            Ok(info) => info,
            Err(_) if record.state() == Some(JobState::Dead) => record.info_lenient(queue, id),
            Err(reason) => {
                return Err(Error::Corrupt {
                    queue: queue.to_owned(),
                    job_id: id.to_string(),
                    reason,
                }
                .into());
            }
        };
        if matches!(info.state, JobState::Completed | JobState::Cancelled)
            && info
                .finished_at_ms
                .is_some_and(|t| t.saturating_add(self.retention_ms()) <= now)
        {
            return Ok(None);
        }
        if info.state == JobState::Scheduled && info.run_at_ms <= now {
            // Due: it is ready, whether or not a script has moved it yet.
            info.state = JobState::Ready;
        }
        Ok(Some(info))
    }

    async fn cancel(&self, queue: &str, id: JobId) -> Result<CancelOutcome, flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.cancel, &self.base(queue));
        invocation.arg(id.to_string()).arg(self.retention_ms());
        let value = self.invoke(&invocation).await?;
        match reply::as_string(&value).as_deref() {
            Some("cancelled") => Ok(CancelOutcome::Cancelled),
            Some("requested") => Ok(CancelOutcome::Requested),
            Some("finished") => Ok(CancelOutcome::AlreadyFinished),
            Some("not_found") => Err(not_found(queue, id)),
            _ => Err(Error::Reply {
                script: "cancel",
                reason: "unknown outcome".into(),
            }
            .into()),
        }
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.stats, &self.base(queue));
        invocation.arg(self.retention_ms());
        let value = self.invoke(&invocation).await?;
        let mut reply = Reply::new(&value, "stats")?;
        let mut count = || -> Result<u64, Error> { Ok(u64::try_from(reply.int()?).unwrap_or(0)) };
        let ready = count()?;
        let scheduled = count()?;
        let running = count()?;
        let completed = count()?;
        let dead = count()?;
        let paused = count()? == 1;
        let dead_dropped = count()?;
        let age_ms = count()?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready,
            scheduled,
            running,
            completed,
            dead,
            paused,
            oldest_ready_age_s: age_ms as f64 / 1000.0,
            dead_dropped,
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
        let offset = offset.min(i64::MAX as usize / 2);
        let limit = limit.min(i64::MAX as usize / 2);
        let mut invocation = Call::new(&SCRIPTS.dead_letters, &self.base(queue));
        invocation.arg(offset).arg(limit);
        let value = self.invoke(&invocation).await?;
        let mut reply = Reply::new(&value, "dead_letters")?;
        let mut letters = Vec::new();
        while reply.remaining() >= 7 {
            if let Some(letter) = reply::dead_letter(queue, &mut reply)? {
                letters.push(letter);
            }
        }
        Ok(letters)
    }

    async fn requeue_dead(&self, queue: &str, id: JobId) -> Result<(), flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.requeue_dead, &self.base(queue));
        invocation.arg("one").arg(id.to_string());
        let value = self.invoke(&invocation).await?;
        match reply::as_string(&value).as_deref() {
            Some("ok") => Ok(()),
            Some("not_found") => Err(not_found(queue, id)),
            Some(state) => Err(flow_core::Error::InvalidState {
                job_id: id.to_string(),
                state: state.to_owned(),
                operation: "requeue it as a dead letter",
            }),
            None => Err(Error::Reply {
                script: "requeue_dead",
                reason: "expected an outcome".into(),
            }
            .into()),
        }
    }

    async fn requeue_all_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        validate_queue_name(queue)?;
        self.dead_batches(queue, &SCRIPTS.requeue_dead, "requeue_dead", Some("batch"))
            .await
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, flow_core::Error> {
        validate_queue_name(queue)?;
        self.dead_batches(queue, &SCRIPTS.purge_dead, "purge_dead", None)
            .await
    }

    async fn pause(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.set_paused(queue, true).await
    }

    async fn resume(&self, queue: &str) -> Result<(), flow_core::Error> {
        self.set_paused(queue, false).await
    }

    async fn ping(&self) -> Result<(), flow_core::Error> {
        let mut conn = self.conn().await?;
        match redis::cmd("PING").query_async::<()>(&mut *conn).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if breaks_connection(&e) {
                    conn.broken = true;
                }
                Err(self.describe.redis(&e).into())
            }
        }
    }
}

impl RedisQueue {
    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), flow_core::Error> {
        validate_queue_name(queue)?;
        let mut invocation = Call::new(&SCRIPTS.set_paused, &self.base(queue));
        invocation.arg(if paused { "1" } else { "0" });
        self.invoke(&invocation).await?;
        Ok(())
    }

    /// Requeues or purges the dead letters present when the first call ran, in batches
    /// of [`DEAD_BATCH`]; returns how many.
    async fn dead_batches(
        &self,
        queue: &str,
        script: &'static Script,
        name: &'static str,
        mode: Option<&str>,
    ) -> Result<u64, flow_core::Error> {
        let base = self.base(queue);
        let mut bound = String::new();
        let mut total = 0u64;
        loop {
            let mut invocation = Call::new(script, &base);
            if let Some(mode) = mode {
                invocation.arg(mode);
            }
            invocation.arg(DEAD_BATCH).arg(&bound);
            let value = self.invoke(&invocation).await?;
            let mut reply = Reply::new(&value, name)?;
            let count = u64::try_from(reply.int()?).unwrap_or(0);
            bound = reply.string()?;
            total += count;
            if count < DEAD_BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use test_support::redis::RedisServer;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    #[test]
    fn job_ids_are_distinct_v7_uuids_in_time_order() {
        let first = new_job_id();
        let ids: std::collections::HashSet<Uuid> = (0..100_000).map(|_| new_job_id()).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        std::thread::sleep(Duration::from_millis(2));
        assert!(new_job_id() > first, "the time comes first");
    }

    /// The enqueue script run twice with the same arguments (a call retried after its
    /// reply was lost) stores every job once and answers the same ids.
    #[test]
    fn a_retried_enqueue_call_stores_nothing_twice() {
        let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
        runtime().block_on(async {
            let q = RedisQueue::connect(&server.url(), QueueOptions::default())
                .await
                .expect("connect");
            let base = q.base("retried");
            let ids: Vec<String> = (0..3).map(|_| Uuid::now_v7().to_string()).collect();
            for plain in ["1", "0"] {
                let mut call = Call::new(&SCRIPTS.enqueue, &base);
                call.arg(ids.len()).arg(plain).arg(q.retention_ms());
                for (i, id) in ids.iter().enumerate() {
                    let dedupe = if plain == "1" {
                        String::new()
                    } else {
                        format!("d{i}")
                    };
                    let mut packed = Vec::new();
                    reply::encode_job(&mut packed, 0, 3, "t", &Default::default(), &json!(i))
                        .expect("encode");
                    call.arg(id).arg(packed).arg(0).arg("").arg(dedupe);
                }
                let first = q.invoke(&call).await.expect("first run");
                let second = q.invoke(&call).await.expect("second run");
                if plain == "1" {
                    assert_eq!(reply::as_i64(&first), Some(3), "all stored: {first:?}");
                }
                // The retry finds every id stored and answers it.
                let mut reply = Reply::new(&second, "enqueue").expect("ids");
                for id in &ids {
                    assert_eq!(&reply.string().expect("id"), id);
                }
            }
            let stats = q.stats("retried").await.expect("stats");
            assert_eq!(stats.ready, 3, "{stats:?}");

            // A batch (three values per job) whose first job already ran and was purged
            // when the retry comes: the last id still tells the call apart, so only the
            // purged job itself, which nothing can tell apart any more, is stored again.
            let ids: Vec<String> = (0..3).map(|_| Uuid::now_v7().to_string()).collect();
            let mut call = Call::new(&SCRIPTS.enqueue, &q.base("purged"));
            call.arg(ids.len()).arg("2").arg(q.retention_ms());
            for (i, id) in ids.iter().enumerate() {
                let mut packed = Vec::new();
                reply::encode_job(&mut packed, 0, 3, "t", &Default::default(), &json!(i))
                    .expect("encode");
                call.arg(id).arg(packed).arg(0);
            }
            let first = q.invoke(&call).await.expect("first run");
            assert_eq!(reply::as_i64(&first), Some(3), "all stored: {first:?}");
            let jobs = q
                .fetch("purged", 1, Duration::from_secs(30), Duration::ZERO)
                .await
                .expect("fetch");
            assert_eq!(jobs[0].id.to_string(), ids[0]);
            q.complete(&jobs[0].lease, json!(null))
                .await
                .expect("complete");
            server
                .command(&["DEL", &format!("{{pf:purged}}:job:{}", ids[0])])
                .expect("DEL");
            let second = q.invoke(&call).await.expect("second run");
            let mut reply = Reply::new(&second, "enqueue").expect("ids");
            for id in &ids {
                assert_eq!(&reply.string().expect("id"), id);
            }
            let stats = q.stats("purged").await.expect("stats");
            assert_eq!(stats.ready, 3, "{stats:?}");
            let jobs = q
                .fetch("purged", 10, Duration::from_secs(30), Duration::ZERO)
                .await
                .expect("fetch");
            let mut leased: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
            leased.sort();
            let mut want = ids.clone();
            want.sort();
            assert_eq!(leased, want, "each job once");
        });
    }

    /// Jobs staged for a cluster call are stored by one enqueue call in "staged" mode: a
    /// retry of that call (its reply lost) stores nothing twice and answers the same ids,
    /// with a dedupe key held by a live job answered by its holder; the staged list is
    /// left for the client, and once it is gone the call answers -1 and stores nothing.
    #[test]
    fn a_staged_call_stores_its_jobs_once() {
        let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
        runtime().block_on(async {
            let q = RedisQueue::connect(&server.url(), QueueOptions::default())
                .await
                .expect("connect");
            let holder = q
                .enqueue(NewJob::new("staged", json!("first")).dedupe_key("k"))
                .await
                .expect("enqueue");
            let jobs = [
                NewJob::new("staged", json!(0)),
                NewJob::new("staged", json!(1)).dedupe_key("k"),
                NewJob::new("staged", json!(2)).delay(Duration::from_secs(60)),
            ];
            let ids: Vec<Uuid> = jobs.iter().map(|_| new_job_id()).collect();
            let key = format!("{}:staged:call", q.base("staged"));
            let mut push = redis::cmd("RPUSH");
            push.arg(&key)
                .arg(jobs.len())
                .arg("0")
                .arg(q.retention_ms());
            for (job, id) in jobs.iter().zip(&ids) {
                push.arg(id.to_string())
                    .arg(encode(job).expect("encode"))
                    .arg(job.priority)
                    .arg(due_arg(job))
                    .arg(job.dedupe_key.as_deref().unwrap_or_default());
            }
            let mut conn = q.conn().await.expect("conn");
            push.query_async::<Value>(&mut *conn).await.expect("RPUSH");
            drop(conn);
            let mut call = Call::new(&SCRIPTS.enqueue, &q.base("staged"));
            call.arg("staged").arg("call");
            let want = vec![ids[0], holder, ids[2]];
            for run in ["first", "retried"] {
                let value = q.invoke(&call).await.expect("staged call");
                assert_eq!(enqueue_reply(&value, &ids).expect("ids"), want, "{run} run");
            }
            let stats = q.stats("staged").await.expect("stats");
            assert_eq!((stats.ready, stats.scheduled), (2, 1), "{stats:?}");
            q.drop_staged(&["staged"], "call").await;
            let gone = q.invoke(&call).await.expect("staged call");
            assert_eq!(reply::as_i64(&gone), Some(-1), "{gone:?}");
            let stats = q.stats("staged").await.expect("stats");
            assert_eq!(
                (stats.ready, stats.scheduled),
                (2, 1),
                "nothing more stored"
            );
        });
    }
}
