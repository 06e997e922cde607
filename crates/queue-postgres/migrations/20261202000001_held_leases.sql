-- Held leases and random fencing tokens.
--
-- A worker that prefetches leases jobs it starts later: those are "held" until it says
-- they started. A held job whose lease expires (its worker died while the job only
-- waited in it) goes back to ready uncharged: attempt taken back, no lease expiry.
ALTER TABLE jobs ADD COLUMN held boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN jobs.held IS
    'leased but not started yet (prefetched by its worker); an expiry does not charge it';
-- How often the job's worker died while the job was held. A job that starts from a
-- prefetch and kills its worker before the start is reported looks held: past the lease
-- expiry limit such deaths are charged, so it is still dead-lettered.
ALTER TABLE jobs ADD COLUMN held_expiries integer NOT NULL DEFAULT 0;

-- Fencing tokens are now random per lease (a sequence rewinds with lost WAL after a
-- crash with asynchronous commits, and would hand out a token an old holder still has).
-- 0 means "taken back by the reaper": no lease carries it.
COMMENT ON COLUMN jobs.token IS
    'fencing token of the current or last lease: random per lease; 0 after the reaper took it back';
