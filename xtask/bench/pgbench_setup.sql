-- Setup for the same-box PostgreSQL ceiling: a plain queue table with a partial index
-- on what is ready, pre-filled with jobs whose payload is {"n": i}.
DROP TABLE IF EXISTS pgbench_jobs;
CREATE TABLE pgbench_jobs (
    id      bigserial PRIMARY KEY,
    state   smallint NOT NULL DEFAULT 0,  -- 0 ready, 1 done
    payload jsonb    NOT NULL
);
CREATE INDEX pgbench_jobs_ready ON pgbench_jobs (id) WHERE state = 0;
INSERT INTO pgbench_jobs (payload)
SELECT jsonb_build_object('n', i) FROM generate_series(1, :rows) AS i;
VACUUM ANALYZE pgbench_jobs;
