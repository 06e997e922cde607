-- PenguiFlow job queue schema, version 1.
--
-- Applied by `PgQueue::migrate()` on a dedicated connection whose search_path is the
-- configured schema (default "penguiflow"), so every name here is unqualified on purpose.
-- Times are milliseconds since the Unix epoch, taken from the database clock.

-- FIFO order within a priority, and dead-letter order (taken again when a job dies).
CREATE SEQUENCE job_seq;
-- Fencing tokens: a new value every time a job is leased.
CREATE SEQUENCE lease_token;

CREATE TABLE jobs (
    id                  uuid     PRIMARY KEY,
    seq                 bigint   NOT NULL DEFAULT nextval('job_seq'),
    run_at_ms           bigint   NOT NULL DEFAULT (extract(epoch FROM statement_timestamp()) * 1000)::bigint,
    ready_since_ms      bigint   NOT NULL DEFAULT (extract(epoch FROM statement_timestamp()) * 1000)::bigint,
    created_at_ms       bigint   NOT NULL DEFAULT (extract(epoch FROM statement_timestamp()) * 1000)::bigint,
    finished_at_ms      bigint,
    max_retries         bigint   NOT NULL CHECK (max_retries >= 0),
    token               bigint   NOT NULL DEFAULT 0,
    lease_expires_at_ms bigint,
    priority            integer  NOT NULL,
    attempts            integer  NOT NULL DEFAULT 0,
    lease_expiries      integer  NOT NULL DEFAULT 0,
    state               smallint NOT NULL CHECK (state BETWEEN 0 AND 5),
    cancel_requested    boolean  NOT NULL DEFAULT false,
    dedupe_held         boolean  NOT NULL DEFAULT false,
    queue               text     NOT NULL,
    tenant              text     NOT NULL,
    dedupe_key          text,
    payload             jsonb    NOT NULL,
    headers             jsonb    NOT NULL DEFAULT '{}',
    result              jsonb,
    error               jsonb
) WITH (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

COMMENT ON TABLE jobs IS 'PenguiFlow jobs of every queue, live and finished (finished ones are pruned after the retention time).';
COMMENT ON COLUMN jobs.state IS '0 ready, 1 scheduled, 2 running, 3 completed, 4 dead, 5 cancelled';
COMMENT ON COLUMN jobs.seq IS 'place in line within a priority (ready), or order of death (dead)';
COMMENT ON COLUMN jobs.token IS 'fencing token of the current or last lease';
COMMENT ON COLUMN jobs.dedupe_held IS 'whether this job holds its dedupe key (a requeued dead job may not)';

-- Each partial index holds only the rows of one state, so fetch, reap, stats and the
-- dead-letter listing cost the same with or without millions of finished rows.
CREATE INDEX jobs_ready ON jobs (queue, priority, seq) WHERE state = 0;
CREATE INDEX jobs_scheduled ON jobs (queue, run_at_ms) WHERE state = 1;
CREATE INDEX jobs_running ON jobs (queue, lease_expires_at_ms) WHERE state = 2;
CREATE INDEX jobs_dead ON jobs (queue, seq) WHERE state = 4;
CREATE INDEX jobs_finished ON jobs (queue, finished_at_ms) WHERE state IN (3, 5);
CREATE UNIQUE INDEX jobs_dedupe ON jobs (queue, dedupe_key) WHERE dedupe_held AND state < 3;

-- Per-queue flags and counters that are not derived from rows.
CREATE TABLE queues (
    queue        text    PRIMARY KEY,
    paused       boolean NOT NULL DEFAULT false,
    dead_dropped bigint  NOT NULL DEFAULT 0
);

COMMENT ON TABLE queues IS 'paused flag and dead letters dropped beyond the limit, per queue';

-- Completed jobs still kept, per queue, striped over 16 slots (one per backend pid modulo
-- 16) so concurrent completions do not queue up on one hot row. Incremented by complete,
-- decremented by the retention pruner; stats sum the slots.
CREATE TABLE completed_counts (
    queue     text     NOT NULL,
    slot      smallint NOT NULL,
    completed bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, slot)
);

COMMENT ON TABLE completed_counts IS 'completed jobs kept per queue, striped over slots; stats sum the slots';
