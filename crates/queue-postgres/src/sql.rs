//! Every statement the backend runs, built once per schema.
//!
//! The schema name (validated by [`crate::validate_schema_name`]: `[a-z0-9_]` only) is
//! the only text interpolated into SQL; every value is a bind parameter.
//!
//! States: 0 ready, 1 scheduled, 2 running, 3 completed, 4 dead, 5 cancelled. States
//! below 3 are live (they hold their dedupe key). Times are epoch milliseconds from the
//! database clock ([`NOW`]), so every worker agrees on lease deadlines.

use std::sync::Arc;

/// Epoch milliseconds at the start of the current statement, from the database clock.
/// `statement_timestamp()` is stable within a statement, so it can bound index scans.
const NOW: &str = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint";

/// A fresh fencing token per row: 53 random bits, never 0 (0 marks a lease the reaper
/// took back). Never a sequence: with asynchronous commits a crash can lose the WAL of
/// the last leases, and a sequence would then hand out their tokens again.
const NEW_TOKEN: &str = "(floor(random() * 9007199254740990) + 1)::int8";

/// The running-state test of fenced statements. Written with a cast on purpose: a plain
/// `state = 2` lets the planner pick the partial index of running jobs (whose
/// statistics lag behind a burst of leases) instead of the primary key, turning a
/// one-row update into a scan of every running job of the queue.
const FENCED: &str = "state::int4 = 2";

/// The columns an enqueue statement writes, in the order of its values.
const INSERT_COLUMNS: &str = "id, queue, state, priority, run_at_ms, ready_since_ms, \
    created_at_ms, max_retries, tenant, payload, headers, dedupe_key, dedupe_held";

/// Largest number of due scheduled jobs one fetch considers (and promotes).
pub(crate) const PROMOTE_LIMIT: i64 = 1000;

/// The statements of one schema, shared by every clone of a queue.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) enqueue: Arc<str>,
    pub(crate) enqueue_one: Arc<str>,
    pub(crate) enqueue_plain_one: Arc<str>,
    pub(crate) dedupe_lookup: Arc<str>,
    pub(crate) copy_in: Arc<str>,
    pub(crate) now_ms: Arc<str>,
    pub(crate) notify_queues: Arc<str>,
    pub(crate) fetch: Arc<str>,
    pub(crate) fetch_ready: Arc<str>,
    pub(crate) heartbeat: Arc<str>,
    pub(crate) complete_many: Arc<str>,
    pub(crate) complete_one: Arc<str>,
    pub(crate) retry: Arc<str>,
    pub(crate) fail: Arc<str>,
    pub(crate) release_many: Arc<str>,
    pub(crate) mark_cancelled: Arc<str>,
    pub(crate) mark_started: Arc<str>,
    pub(crate) replayed: Arc<str>,
    pub(crate) reap: Arc<str>,
    pub(crate) prune: Arc<str>,
    pub(crate) trim_dead: Arc<str>,
    pub(crate) job: Arc<str>,
    pub(crate) cancel: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) requeue_dead: Arc<str>,
    pub(crate) purge_dead: Arc<str>,
    pub(crate) set_paused: Arc<str>,
}

/// `jsonb` failure object with code CANCELLED and the given message (a literal).
fn cancelled(message: &str) -> String {
    format!("jsonb_build_object('code', 'CANCELLED', 'message', '{message}')")
}

impl Statements {
    /// Builds the statements for tables in `schema` (already validated).
    /// With `async_leases`, the statements that grant or extend leases commit without
    /// waiting for the WAL flush (see [`crate::PgQueueBuilder::async_commit_leases`]).
    pub(crate) fn new(schema: &str, async_leases: bool) -> Self {
        let s = format!("\"{schema}\"");
        let now = NOW;
        // Evaluated once (an InitPlan) before the statement's implicit transaction
        // commits; `set_config(..., true)` lasts until that commit.
        let lease_commit = if async_leases {
            "AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
        } else {
            ""
        };
        let build = |text: String| -> Arc<str> { Arc::from(text) };
        let cancel_not_retried =
            cancelled("cancel was requested while it was running; it was not retried");
        let cancel_handed_back = cancelled(
            "cancel was requested while it was running; it was handed back and will not run again",
        );
        let cancel_expired = cancelled(
            "cancel was requested while it was running; its lease expired and it will not run again",
        );

        // $1 ids, $2 queues, $3 payloads (json text), $4 tenants, $5 priorities,
        // $6 run_at_ms (an instant; NULL = none), $7 max_retries, $8 dedupe keys,
        // $9 headers (json text), $10 notification channel, $11 delay_ms (NULL = none).
        // A job is due at the later of run_at_ms and the database clock plus delay_ms
        // (`greatest` skips NULLs; both NULL = now): a delay is measured by the database,
        // never by the producer's clock. Returns the ids inserted; a job whose dedupe
        // key is held by a live job is skipped (the caller looks the holder up).
        // The statement reads its jobs from `input`: ten arrays unnested for a batch, or
        // the same columns as scalar parameters for one job (no arrays to encode).
        let enqueue_from = |input: &str| {
            let due = format!("greatest(run_at_ms, {now} + delay_ms)");
            format!(
                "WITH input AS ({input}),
                ins AS (
                    INSERT INTO {s}.jobs ({INSERT_COLUMNS})
                    SELECT id, queue,
                           CASE WHEN {due} > {now} THEN 1 ELSE 0 END,
                           priority, coalesce({due}, {now}), {now}, {now}, max_retries,
                           tenant, payload::jsonb, headers::jsonb, dedupe_key,
                           dedupe_key IS NOT NULL
                    FROM input
                    ORDER BY ord
                    ON CONFLICT (queue, dedupe_key) WHERE dedupe_held AND state < 3 DO NOTHING
                    RETURNING id, queue
                ),
                notified AS MATERIALIZED (
                    SELECT count(pg_notify($10, q)) AS n FROM (SELECT DISTINCT queue AS q FROM ins) d
                )
                SELECT ins.id FROM ins CROSS JOIN notified"
            )
        };
        let enqueue = enqueue_from(
            "SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                 $5::int4[], $6::int8[], $7::int8[], $8::text[], $9::text[],
                                 $11::int8[])
                WITH ORDINALITY
                AS t(id, queue, payload, tenant, priority, run_at_ms, max_retries,
                     dedupe_key, headers, delay_ms, ord)",
        );
        // One job without a dedupe key: a plain INSERT. No ON CONFLICT (whose speculative
        // insertion costs ~15 % of the statement, and only a dedupe key can conflict)
        // and no CTE around the input (pgbench, one job per transaction, on one server:
        // `enqueue_one` 4.7k/s, a statement of this shape with literal values 6.0-6.9k/s).
        let enqueue_plain_one = format!(
            "WITH ins AS (
                INSERT INTO {s}.jobs ({INSERT_COLUMNS})
                VALUES ($1::uuid, $2::text,
                        CASE WHEN greatest($6::int8, {now} + $11::int8) > {now} THEN 1 ELSE 0 END,
                        $5::int4, coalesce(greatest($6::int8, {now} + $11::int8), {now}), {now},
                        {now}, $7::int8, $4::text,
                        $3::text::jsonb, $9::text::jsonb, $8::text, false)
                RETURNING id, queue
            )
            SELECT ins.id, pg_notify($10, ins.queue) FROM ins"
        );
        let enqueue_one = enqueue_from(
            "SELECT $1::uuid AS id, $2::text AS queue, $3::text AS payload, $4::text AS tenant,
                    $5::int4 AS priority, $6::int8 AS run_at_ms, $7::int8 AS max_retries,
                    $8::text AS dedupe_key, $9::text AS headers, $11::int8 AS delay_ms,
                    1 AS ord",
        );

        // Bulk path for jobs without dedupe keys: COPY text rows of these columns; seq
        // comes from its column default, the times (and the due time of a delayed job)
        // from `now_ms` read once per chunk (the database clock; per-row defaults cost
        // ~2 µs a row in numeric arithmetic).
        let copy_in = format!(
            "COPY {s}.jobs (id, queue, state, priority, max_retries, tenant, payload, headers, \
             run_at_ms, ready_since_ms, created_at_ms) FROM STDIN"
        );
        let now_ms = format!("SELECT {now}");
        // $1 channel, $2 queues: wake-ups after a COPY, in the same transaction.
        let notify_queues =
            "SELECT count(pg_notify($1, q)) FROM unnest($2::text[]) AS q".to_owned();

        // $1 queues, $2 dedupe keys: the live holders of those keys.
        let dedupe_lookup = format!(
            "SELECT j.queue, j.dedupe_key, j.id
             FROM {s}.jobs j
             JOIN unnest($1::text[], $2::text[]) AS k(queue, dedupe_key)
               ON j.queue = k.queue AND j.dedupe_key = k.dedupe_key
             WHERE j.dedupe_held AND j.state < 3"
        );

        // $1 queue, $2 max, $3 lease ms, $4 start: the first $4 leased jobs (in line
        // order) start now, the rest are held (see `mark_started` and `reap`). Leases up
        // to $2 jobs among the ready ones and the due scheduled ones, in (priority, seq)
        // order, in one statement; due jobs
        // not leased are promoted to ready. Rows other fetchers hold are skipped. When
        // nothing was leased, one row with a NULL id tells whether the queue is paused
        // and in how many ms its next scheduled job is due (for the wait that follows).
        let fetch = format!(
            "WITH paused AS MATERIALIZED (
                SELECT coalesce(bool_or(paused), false) AS p FROM {s}.queues WHERE queue = $1
            ),
            due AS MATERIALIZED (
                SELECT id, priority, seq FROM {s}.jobs
                WHERE queue = $1 AND state = 1 AND run_at_ms <= {now}
                  AND NOT (SELECT p FROM paused)
                ORDER BY run_at_ms
                LIMIT {PROMOTE_LIMIT}
                FOR UPDATE SKIP LOCKED
            ),
            ready AS MATERIALIZED (
                SELECT id, priority, seq FROM {s}.jobs
                WHERE queue = $1 AND state = 0 AND NOT (SELECT p FROM paused)
                ORDER BY priority, seq
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            pick AS MATERIALIZED (
                SELECT id, row_number() OVER (ORDER BY priority, seq) AS rn
                FROM (SELECT * FROM ready UNION ALL SELECT * FROM due) c
                ORDER BY priority, seq
                LIMIT $2
            ),
            promote AS (
                UPDATE {s}.jobs j SET state = 0, ready_since_ms = j.run_at_ms
                WHERE j.id = ANY(ARRAY(
                    SELECT d.id FROM due d WHERE NOT EXISTS (SELECT 1 FROM pick p WHERE p.id = d.id)
                ))
            ),
            leased AS (
                UPDATE {s}.jobs j
                SET state = 2,
                    attempts = j.attempts + 1,
                    token = {NEW_TOKEN},
                    held = j.id = ANY(ARRAY(SELECT id FROM pick WHERE rn > $4)),
                    lease_expires_at_ms = {now} + $3
                WHERE j.id = ANY(ARRAY(SELECT id FROM pick)) {lease_commit}
                RETURNING j.id, j.queue, j.payload::text AS payload, j.tenant, j.priority,
                          j.attempts, j.max_retries, j.headers::text AS headers,
                          j.created_at_ms, j.token, j.lease_expires_at_ms, j.seq
            )
            SELECT *, NULL::boolean, NULL::bigint FROM leased
            UNION ALL
            SELECT NULL::uuid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   (SELECT p FROM paused),
                   (SELECT min(run_at_ms) FROM {s}.jobs WHERE queue = $1 AND state = 1) - {now}
            WHERE NOT EXISTS (SELECT 1 FROM leased)"
        );

        // $1 queue, $2 max, $3 lease ms, $4 start. The fast path of `fetch`: ready jobs
        // only. Used while the queue keeps a backlog, between full fetches (see
        // `PROMOTE_EVERY`).
        let fetch_ready = format!(
            "WITH pick AS MATERIALIZED (
                SELECT id, priority, seq FROM {s}.jobs
                WHERE queue = $1 AND state = 0
                  AND NOT EXISTS (SELECT 1 FROM {s}.queues WHERE queue = $1 AND paused)
                ORDER BY priority, seq
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            later AS MATERIALIZED (
                SELECT id FROM pick ORDER BY priority, seq OFFSET $4
            )
            UPDATE {s}.jobs j
            SET state = 2,
                attempts = j.attempts + 1,
                token = {NEW_TOKEN},
                held = j.id = ANY(ARRAY(SELECT id FROM later)),
                lease_expires_at_ms = {now} + $3
            WHERE j.id = ANY(ARRAY(SELECT id FROM pick)) {lease_commit}
            RETURNING j.id, j.queue, j.payload::text, j.tenant, j.priority, j.attempts,
                      j.max_retries, j.headers::text, j.created_at_ms, j.token,
                      j.lease_expires_at_ms, j.seq"
        );

        // $1 id, $2 token, $3 queue, $4 extend ms.
        let heartbeat = format!(
            "UPDATE {s}.jobs SET lease_expires_at_ms = {now} + $4, held = false
             WHERE id = $1 AND token = $2 AND queue = $3 AND {FENCED} {lease_commit}
             RETURNING lease_expires_at_ms, cancel_requested"
        );

        // $1 ids, $2 tokens, $3 queues, $4 results (json text). Each item is fenced on
        // its own; returns the ids that were completed. Bumps the completed counter slot
        // of this backend (pid modulo 16), in queue order so lock order is stable.
        let complete_many = format!(
            "WITH input AS (
                SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[])
                    AS t(id, token, queue, result)
            ),
            done AS (
                UPDATE {s}.jobs j
                SET state = 3, result = i.result::jsonb, finished_at_ms = {now},
                    lease_expires_at_ms = NULL
                FROM input i
                WHERE j.id = ANY($1::uuid[])
                  AND j.id = i.id AND j.token = i.token AND j.queue = i.queue AND j.{FENCED}
                RETURNING j.id, j.queue
            ),
            counted AS (
                INSERT INTO {s}.completed_counts AS c (queue, slot, completed)
                SELECT queue, (pg_backend_pid() % 16)::smallint, count(*)
                FROM done GROUP BY queue ORDER BY queue
                ON CONFLICT (queue, slot) DO UPDATE SET completed = c.completed + EXCLUDED.completed
            )
            SELECT id FROM done"
        );

        // $1 id, $2 token, $3 queue, $4 result (json text): `complete_many` for one item,
        // without the arrays and the join (about a third cheaper).
        let complete_one = format!(
            "WITH done AS (
                UPDATE {s}.jobs
                SET state = 3, result = $4::jsonb, finished_at_ms = {now},
                    lease_expires_at_ms = NULL
                WHERE id = $1 AND token = $2 AND queue = $3 AND {FENCED}
                RETURNING id, queue
            ),
            counted AS (
                INSERT INTO {s}.completed_counts AS c (queue, slot, completed)
                SELECT queue, (pg_backend_pid() % 16)::smallint, 1 FROM done
                ON CONFLICT (queue, slot) DO UPDATE SET completed = c.completed + EXCLUDED.completed
            )
            SELECT id FROM done"
        );

        // $1 id, $2 token, $3 queue, $4 delay ms, $5 failure (json text), $6 channel.
        // Returns the new state (5 when a cancel was requested meanwhile).
        let retry = format!(
            "WITH upd AS (
                UPDATE {s}.jobs j SET
                    state = CASE WHEN j.cancel_requested THEN 5 WHEN $4 > 0 THEN 1 ELSE 0 END,
                    held = false,
                    error = CASE WHEN j.cancel_requested THEN {cancel_not_retried}
                                 ELSE $5::jsonb END,
                    finished_at_ms = CASE WHEN j.cancel_requested THEN {now} END,
                    run_at_ms = CASE WHEN j.cancel_requested THEN j.run_at_ms ELSE {now} + $4 END,
                    ready_since_ms = {now},
                    seq = CASE WHEN j.cancel_requested THEN j.seq
                               ELSE nextval('{s}.job_seq') END,
                    lease_expires_at_ms = NULL
                WHERE j.id = $1 AND j.token = $2 AND j.queue = $3 AND j.{FENCED}
                RETURNING j.state, j.queue
            ),
            notified AS MATERIALIZED (
                SELECT count(pg_notify($6, q)) AS n
                FROM (SELECT DISTINCT queue AS q FROM upd WHERE state < 2) d
            )
            SELECT upd.state FROM upd CROSS JOIN notified"
        );

        // $1 id, $2 token, $3 queue, $4 failure (json text).
        let fail = format!(
            "UPDATE {s}.jobs SET state = 4, error = $4::jsonb, finished_at_ms = {now},
                 seq = nextval('{s}.job_seq'), lease_expires_at_ms = NULL
             WHERE id = $1 AND token = $2 AND queue = $3 AND {FENCED}
             RETURNING id"
        );

        // $1 ids, $2 tokens, $3 queues, $4 channel. Hands jobs back ready, in their old
        // place, without counting the attempt (or cancels them when a cancel was asked).
        let release_many = format!(
            "WITH input AS (
                SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[]) AS t(id, token, queue)
            ),
            upd AS (
                UPDATE {s}.jobs j SET
                    state = CASE WHEN j.cancel_requested THEN 5 ELSE 0 END,
                    attempts = CASE WHEN j.cancel_requested THEN j.attempts
                                    ELSE greatest(j.attempts - 1, 0) END,
                    error = CASE WHEN j.cancel_requested THEN {cancel_handed_back} ELSE j.error END,
                    finished_at_ms = CASE WHEN j.cancel_requested THEN {now} END,
                    ready_since_ms = {now},
                    held = false,
                    lease_expires_at_ms = NULL
                FROM input i
                WHERE j.id = ANY($1::uuid[])
                  AND j.id = i.id AND j.token = i.token AND j.queue = i.queue AND j.{FENCED}
                RETURNING j.id, j.state, j.queue
            ),
            notified AS MATERIALIZED (
                SELECT count(pg_notify($4, q)) AS n
                FROM (SELECT DISTINCT queue AS q FROM upd WHERE state = 0) d
            )
            SELECT upd.id FROM upd CROSS JOIN notified"
        );

        // $1 id, $2 token, $3 queue, $4 failure (json text).
        let mark_cancelled = format!(
            "UPDATE {s}.jobs SET state = 5, error = $4::jsonb, finished_at_ms = {now},
                 lease_expires_at_ms = NULL
             WHERE id = $1 AND token = $2 AND queue = $3 AND {FENCED}
             RETURNING id"
        );

        // $1 ids, $2 tokens, $3 queues. Held jobs whose worker started them: their lease
        // counts from now on. Fenced per item; stale items are left alone.
        let mark_started = format!(
            "UPDATE {s}.jobs j SET held = false
             FROM unnest($1::uuid[], $2::int8[], $3::text[]) AS i(id, token, queue)
             WHERE j.id = ANY($1::uuid[])
               AND j.id = i.id AND j.token = i.token AND j.queue = i.queue
               AND j.held AND j.{FENCED} {lease_commit}"
        );

        // $1 ids, $2 tokens, $3 queues, $4 states. The items whose job is in one of the
        // states and still carries the item's token: an outcome sent again after its
        // reply was lost (the reaper zeroes the token of a lease it takes back, so only
        // the lease's holder can have left it on a job in such a state).
        let replayed = format!(
            "SELECT j.id FROM {s}.jobs j
             JOIN unnest($1::uuid[], $2::int8[], $3::text[]) AS i(id, token, queue)
               ON j.id = i.id AND j.token = i.token AND j.queue = i.queue
             WHERE j.id = ANY($1::uuid[]) AND i.token <> 0 AND j.state::int4 = ANY($4::int4[])"
        );

        // $1 queue, $2 max lease expiries, $3 batch size, $4 channel. Reclaims expired
        // leases: a held job (never started) back to ready in its place, uncharged (the
        // attempt taken back, no expiry counted); others back to ready in their old place,
        // or dead (no attempts left, or expired too often), or cancelled (a cancel was
        // asked). Every reclaimed lease's token becomes 0. Returns (id, new state).
        // A held job's worker died while it only waited there: uncharged, up to $2 such
        // deaths (`held_expiries`). A job that starts from a worker's prefetch and kills
        // it before the start was reported looks held; past that it is charged like any
        // other, so a job that keeps killing its workers is still dead-lettered.
        let held = "(j.held AND NOT j.cancel_requested AND j.held_expiries < $2)";
        let reap = format!(
            "WITH expired AS MATERIALIZED (
                SELECT id FROM {s}.jobs
                WHERE queue = $1 AND state = 2 AND lease_expires_at_ms <= {now}
                ORDER BY lease_expires_at_ms
                LIMIT $3
                FOR UPDATE SKIP LOCKED
            ),
            upd AS (
                UPDATE {s}.jobs j SET
                    lease_expiries = CASE WHEN {held} THEN j.lease_expiries
                                          ELSE j.lease_expiries + 1 END,
                    attempts = CASE WHEN {held} THEN greatest(j.attempts - 1, 0)
                                    ELSE j.attempts END,
                    held_expiries = CASE WHEN {held} THEN j.held_expiries + 1
                                         ELSE j.held_expiries END,
                    held = false,
                    token = 0,
                    state = CASE
                        WHEN {held} THEN 0
                        WHEN j.cancel_requested THEN 5
                        WHEN j.lease_expiries + 1 >= $2 THEN 4
                        WHEN j.attempts > j.max_retries THEN 4
                        ELSE 0 END,
                    error = CASE
                        WHEN {held} THEN j.error
                        WHEN j.cancel_requested THEN {cancel_expired}
                        WHEN j.lease_expiries + 1 >= $2 THEN jsonb_build_object(
                            'code', 'LEASE_EXPIRED_TOO_OFTEN',
                            'message', format('the lease expired %s times (limit %s): the job keeps '
                                || 'losing its worker, so it was dead-lettered instead of retried',
                                j.lease_expiries + 1, $2))
                        WHEN j.attempts > j.max_retries THEN jsonb_build_object(
                            'code', 'LEASE_EXPIRED',
                            'message', format('the lease expired during attempt %s of %s and no '
                                || 'attempts are left', j.attempts, j.max_retries + 1))
                        ELSE jsonb_build_object(
                            'code', 'LEASE_EXPIRED',
                            'message', format('the lease expired during attempt %s (its worker '
                                || 'stopped heartbeating); the job was put back to ready',
                                j.attempts))
                        END,
                    finished_at_ms = CASE
                        WHEN {held} THEN NULL
                        WHEN j.cancel_requested OR j.lease_expiries + 1 >= $2
                             OR j.attempts > j.max_retries THEN {now} END,
                    seq = CASE
                        WHEN NOT {held} AND NOT j.cancel_requested
                             AND (j.lease_expiries + 1 >= $2 OR j.attempts > j.max_retries)
                        THEN nextval('{s}.job_seq') ELSE j.seq END,
                    ready_since_ms = {now},
                    lease_expires_at_ms = NULL
                WHERE j.id = ANY(ARRAY(SELECT id FROM expired))
                RETURNING j.id, j.state, j.queue
            ),
            notified AS MATERIALIZED (
                SELECT count(pg_notify($4, q)) AS n
                FROM (SELECT DISTINCT queue AS q FROM upd WHERE state = 0) d
            )
            SELECT upd.id, upd.state FROM upd CROSS JOIN notified ORDER BY upd.id"
        );

        // $1 queue, $2 retention ms, $3 batch size. Deletes completed and cancelled jobs
        // older than the retention time, oldest first; keeps the completed count right.
        let prune = format!(
            "WITH victims AS MATERIALIZED (
                SELECT id FROM {s}.jobs
                WHERE queue = $1 AND state IN (3, 5) AND finished_at_ms <= {now} - $2
                ORDER BY finished_at_ms
                LIMIT $3
                FOR UPDATE SKIP LOCKED
            ),
            del AS (
                DELETE FROM {s}.jobs j WHERE j.id = ANY(ARRAY(SELECT id FROM victims))
                RETURNING j.state
            ),
            counted AS (
                INSERT INTO {s}.completed_counts AS c (queue, slot, completed)
                SELECT $1, (pg_backend_pid() % 16)::smallint, -count(*)
                FROM del WHERE state = 3 HAVING count(*) > 0
                ON CONFLICT (queue, slot) DO UPDATE SET completed = c.completed + EXCLUDED.completed
            )
            SELECT count(*) FROM del"
        );

        // $1 queue, $2 limit. Drops the oldest dead letters beyond the limit and counts
        // them in queues.dead_dropped.
        let trim_dead = format!(
            "WITH del AS (
                DELETE FROM {s}.jobs j
                WHERE j.id = ANY(ARRAY(
                    SELECT id FROM {s}.jobs WHERE queue = $1 AND state = 4
                    ORDER BY seq DESC OFFSET $2
                )) AND j.state = 4
                RETURNING 1
            ),
            counted AS (
                INSERT INTO {s}.queues AS q (queue, dead_dropped)
                SELECT $1, count(*) FROM del HAVING count(*) > 0
                ON CONFLICT (queue) DO UPDATE SET dead_dropped = q.dead_dropped + EXCLUDED.dead_dropped
            )
            SELECT count(*) FROM del"
        );

        // $1 id, $2 queue, $3 retention ms. A due scheduled job reads as ready.
        let job = format!(
            "SELECT id, queue,
                    (CASE WHEN state = 1 AND run_at_ms <= {now} THEN 0 ELSE state END)::smallint,
                    attempts, max_retries, priority, tenant, payload::text, result::text,
                    error::text, created_at_ms, run_at_ms, finished_at_ms, lease_expiries,
                    cancel_requested, dedupe_key, headers::text
             FROM {s}.jobs
             WHERE id = $1 AND queue = $2
               AND NOT (state IN (3, 5) AND finished_at_ms <= {now} - $3)"
        );

        // $1 id, $2 queue, $3 retention ms. Returns the state before the call.
        let cancel_before_run = cancelled("cancelled before it ran");
        let cancel = format!(
            "WITH target AS MATERIALIZED (
                SELECT id, state FROM {s}.jobs
                WHERE id = $1 AND queue = $2
                  AND NOT (state IN (3, 5) AND finished_at_ms <= {now} - $3)
                FOR UPDATE
            ),
            cancelled AS (
                UPDATE {s}.jobs j SET state = 5, error = {cancel_before_run},
                    finished_at_ms = {now}
                FROM target t WHERE j.id = t.id AND t.state IN (0, 1)
            ),
            requested AS (
                UPDATE {s}.jobs j SET cancel_requested = true
                FROM target t WHERE j.id = t.id AND t.state = 2
            )
            SELECT state FROM target"
        );

        // $1 queue. Counts come from the partial indexes (only live and dead rows, never
        // the finished ones) and the completed counter slots; due scheduled jobs count as
        // ready. The ready rows are read once for their count and oldest age.
        let stats = format!(
            "WITH ready AS MATERIALIZED (
                SELECT count(*) AS n, min(ready_since_ms) AS oldest
                FROM {s}.jobs WHERE queue = $1 AND state = 0
            ),
            due AS MATERIALIZED (
                SELECT count(*) AS n, min(run_at_ms) AS oldest
                FROM {s}.jobs WHERE queue = $1 AND state = 1 AND run_at_ms <= {now}
            )
            SELECT
                (SELECT n FROM ready) + (SELECT n FROM due),
                (SELECT count(*) FROM {s}.jobs WHERE queue = $1 AND state = 1 AND run_at_ms > {now}),
                (SELECT count(*) FROM {s}.jobs WHERE queue = $1 AND state = 2),
                (SELECT coalesce(sum(completed), 0)::bigint FROM {s}.completed_counts WHERE queue = $1),
                (SELECT count(*) FROM {s}.jobs WHERE queue = $1 AND state = 4),
                (SELECT coalesce(bool_or(paused), false) FROM {s}.queues WHERE queue = $1),
                (SELECT coalesce(sum(dead_dropped), 0)::bigint FROM {s}.queues WHERE queue = $1),
                {now} - least((SELECT oldest FROM ready), (SELECT oldest FROM due))"
        );

        // $1 queue, $2 offset, $3 limit. Newest first.
        let dead_letters = format!(
            "SELECT id, queue, error::text, attempts, finished_at_ms, payload::text, tenant
             FROM {s}.jobs WHERE queue = $1 AND state = 4
             ORDER BY seq DESC OFFSET $2 LIMIT $3"
        );

        // $1 id (NULL: every dead job of the queue), $2 queue, $3 channel. Brings dead
        // jobs back to ready, oldest first, each with a new place in line and its
        // attempts reset; a job takes its dedupe key back only when no live job holds it
        // (and only the oldest of several revived jobs sharing one). Returns how many.
        let requeue_dead = format!(
            "WITH picked AS MATERIALIZED (
                SELECT id, seq, dedupe_key FROM {s}.jobs
                WHERE queue = $2 AND state = 4 AND ($1::uuid IS NULL OR id = $1)
                FOR UPDATE
            ),
            numbered AS MATERIALIZED (
                SELECT id, seq, dedupe_key,
                       row_number() OVER (PARTITION BY dedupe_key ORDER BY seq) AS nth
                FROM picked
            ),
            sequenced AS MATERIALIZED (
                SELECT id, dedupe_key, nth, nextval('{s}.job_seq') AS new_seq
                FROM (SELECT * FROM numbered ORDER BY seq) o
            ),
            upd AS (
                UPDATE {s}.jobs j SET
                    state = 0, attempts = 0, lease_expiries = 0, cancel_requested = false,
                    token = 0, held = false, held_expiries = 0,
                    finished_at_ms = NULL, result = NULL, run_at_ms = {now},
                    ready_since_ms = {now}, seq = n.new_seq,
                    dedupe_held = n.dedupe_key IS NOT NULL AND n.nth = 1 AND NOT EXISTS (
                        SELECT 1 FROM {s}.jobs o
                        WHERE o.queue = j.queue AND o.dedupe_key = n.dedupe_key
                          AND o.dedupe_held AND o.state < 3 AND o.id <> j.id)
                FROM sequenced n
                WHERE j.id = n.id AND j.state = 4
                RETURNING j.id
            ),
            notified AS MATERIALIZED (
                SELECT count(pg_notify($3, $2)) AS n FROM (SELECT 1 FROM upd LIMIT 1) d
            )
            SELECT count(*) FROM upd CROSS JOIN notified"
        );

        // $1 queue.
        let purge_dead = format!(
            "WITH del AS (DELETE FROM {s}.jobs WHERE queue = $1 AND state = 4 RETURNING 1)
             SELECT count(*) FROM del"
        );

        // $1 queue, $2 paused, $3 channel (notified on resume).
        let set_paused = format!(
            "WITH up AS (
                INSERT INTO {s}.queues AS q (queue, paused) VALUES ($1, $2)
                ON CONFLICT (queue) DO UPDATE SET paused = EXCLUDED.paused
                RETURNING q.paused
            )
            SELECT CASE WHEN NOT up.paused THEN (SELECT count(pg_notify($3, $1))) ELSE 0 END
            FROM up"
        );

        Self {
            enqueue: build(enqueue),
            enqueue_one: build(enqueue_one),
            enqueue_plain_one: build(enqueue_plain_one),
            dedupe_lookup: build(dedupe_lookup),
            copy_in: build(copy_in),
            now_ms: build(now_ms),
            notify_queues: build(notify_queues),
            fetch: build(fetch),
            fetch_ready: build(fetch_ready),
            heartbeat: build(heartbeat),
            complete_many: build(complete_many),
            complete_one: build(complete_one),
            retry: build(retry),
            fail: build(fail),
            release_many: build(release_many),
            mark_cancelled: build(mark_cancelled),
            mark_started: build(mark_started),
            replayed: build(replayed),
            reap: build(reap),
            prune: build(prune),
            trim_dead: build(trim_dead),
            job: build(job),
            cancel: build(cancel),
            stats: build(stats),
            dead_letters: build(dead_letters),
            requeue_dead: build(requeue_dead),
            purge_dead: build(purge_dead),
            set_paused: build(set_paused),
        }
    }
}
