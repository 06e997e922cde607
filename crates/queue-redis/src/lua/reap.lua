-- reap: reclaims expired leases (at most 1000 per call): a held job (leased but never
-- started, see fetch) back to ready uncharged; others back to ready in their old
-- place with the attempt counted, or to the dead-letter set when the attempts are spent
-- (LEASE_EXPIRED) or the lease expired too often (LEASE_EXPIRED_TOO_OFTEN). Also moves
-- due scheduled jobs to ready and purges expired results, so that happens even when no
-- worker fetches from the queue. Needs lib.
-- ARGV: max_lease_expiries, retention_ms, dead_letter_limit.
-- Returns {n_requeued, requeued ids..., dead ids...}.
local L = lib()
local max_expiries = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local now = L.now()
local requeued = {}
local dead = {}
local K_RUNNING = BASE .. ':running'
local expired = redis.call('ZRANGEBYSCORE', K_RUNNING, '-inf', now, 'LIMIT', '0', '1000')
local FIELDS = { 'attempts', 'max_retries', 'lease_expiries', 'priority', 'seq', 'state',
  'cancel_requested', 'dedupe_key', 'job', 'held', 'held_expiries' }
for _, id in ipairs(expired) do
  redis.call('ZREM', K_RUNNING, id)
  local jk = JOB .. id
  local f = L.load(jk, id, now, limit, FIELDS)
  if f and f[6] == 'running' then
    -- lease_expiries is absent until the first expiry; priority and max_retries are in
    -- the job field (or fields of their own in records written before it existed).
    f[3] = f[3] or '0'
    f[4], f[2] = L.job_numbers(f[9], f[4], f[2])
    local bad = L.bad_fields({ 'attempts', 'max_retries', 'lease_expiries', 'priority', 'seq' }, f, 5)
    if bad then
      redis.call('HSET', jk, 'token', '0')
      L.bury(jk, id, bad, now, limit)
      dead[#dead + 1] = id
    else
      local attempts = tonumber(f[1])
      local max_retries = tonumber(f[2])
      local expiries = tonumber(f[3]) + 1
      -- Held expiries: how often the job's worker died while the job was held. A job
      -- that starts from a worker's prefetch and kills it before the start was reported
      -- looks held; past max_expiries such deaths it is charged like any other, so a
      -- job that keeps killing its workers is still dead-lettered.
      local held_expiries = (tonumber(f[11]) or 0) + 1
      if f[10] == '1' and f[7] ~= '1' and held_expiries <= max_expiries then
        -- Held by a worker that never started it (see fetch): back in its old place,
        -- the attempt taken back, no expiry counted. The token is zeroed so nothing sent
        -- with the old lease passes, not even as a replay.
        redis.call('HSET', jk, 'attempts', string.format('%d', math.max(0, attempts - 1)),
          'token', '0', 'held_expiries', string.format('%d', held_expiries))
        redis.call('HDEL', jk, 'held')
        L.enter_ready(jk, id, f[5], tonumber(f[4]), now)
        requeued[#requeued + 1] = id
      else
        redis.call('HSET', jk, 'lease_expiries', expiries, 'token', '0')
        if f[10] then
          redis.call('HDEL', jk, 'held')
        end
        if f[7] == '1' then
          L.cancel_handed_back(jk, id, now, f[8], 'its lease expired and it will not run again')
        elseif expiries >= max_expiries then
          L.kill(jk, id, L.failure('LEASE_EXPIRED_TOO_OFTEN', string.format(
            'the lease expired %d times (limit %d): the job keeps losing its worker, so it ' ..
            'was dead-lettered instead of retried', expiries, max_expiries)), now, limit)
          dead[#dead + 1] = id
        elseif attempts > max_retries then
          L.kill(jk, id, L.failure('LEASE_EXPIRED', string.format(
            'the lease expired during attempt %d of %d and no attempts are left',
            attempts, max_retries + 1)), now, limit)
          dead[#dead + 1] = id
        else
          redis.call('HSET', jk, 'error', L.failure('LEASE_EXPIRED', string.format(
            'the lease expired during attempt %d (its worker stopped heartbeating); the job ' ..
            'was put back to ready', attempts)))
          -- Back in its old place: it already waited its turn once.
          L.enter_ready(jk, id, f[5], tonumber(f[4]), now)
          requeued[#requeued + 1] = id
        end
      end
    end
  elseif f and not f[6] and redis.call('EXISTS', jk) == 1 then
    L.bury(jk, id, 'state is missing', now, limit)
    dead[#dead + 1] = id
  end
end
local promoted = L.promote(now, limit)
L.purge_due(now, retention, redis.call('HGET', BASE .. ':meta', 'finished_head'))
if #requeued > 0 or promoted > 0 then
  L.wake_waiters(now)
end
local out = { #requeued }
for _, id in ipairs(requeued) do
  out[#out + 1] = id
end
for _, id in ipairs(dead) do
  out[#out + 1] = id
end
return out
