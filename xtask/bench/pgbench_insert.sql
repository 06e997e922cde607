-- Same-box ceiling for enqueuing one job at a time: one INSERT of a ready job per
-- transaction, one client (run after pgbench_setup.sql). Each commit waits for its WAL
-- flush, as an acknowledged enqueue must.
INSERT INTO pgbench_jobs (payload) VALUES ('{"n": 1}');
