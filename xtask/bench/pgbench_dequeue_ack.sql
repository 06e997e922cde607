-- The same-box PostgreSQL ceiling: dequeue one job with FOR UPDATE SKIP LOCKED and
-- acknowledge it, one job per transaction, as a single-job queue would.
BEGIN;
SELECT id AS job_id FROM pgbench_jobs WHERE state = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED \gset
UPDATE pgbench_jobs SET state = 1 WHERE id = :job_id;
COMMIT;
