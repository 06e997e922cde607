-- reap: reclaims expired leases (at most 1000 per call): back to ready in their old
-- place with the attempt counted, or to the dead-letter set when the attempts are spent
-- (LEASE_EXPIRED) or the lease expired too often (LEASE_EXPIRED_TOO_OFTEN). Also moves
-- due scheduled jobs to ready and purges expired results, so that happens even when no
-- worker fetches from the queue.
-- ARGV: max_lease_expiries, retention_ms, dead_letter_limit.
-- Returns {n_requeued, requeued ids..., dead ids...}.
local max_expiries = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local now = now_ms()
local requeued = {}
local dead = {}
local expired = redis.call('ZRANGEBYSCORE', K_RUNNING, '-inf', now, 'LIMIT', 0, 1000)
local FIELDS = { 'attempts', 'max_retries', 'lease_expiries', 'priority', 'seq', 'state', 'cancel_requested' }
for _, id in ipairs(expired) do
  redis.call('ZREM', K_RUNNING, id)
  local jk = jkey(id)
  local f = load(jk, id, now, limit, FIELDS)
  if f and f[6] == 'running' then
    local bad = bad_fields({ 'attempts', 'max_retries', 'lease_expiries', 'priority', 'seq' }, f, 5)
    if bad then
      bury(jk, id, bad, now, limit)
      dead[#dead + 1] = id
    else
      local attempts = tonumber(f[1])
      local max_retries = tonumber(f[2])
      local expiries = tonumber(f[3]) + 1
      redis.call('HSET', jk, 'lease_expiries', expiries)
      if f[7] == '1' then
        cancel_handed_back(jk, id, now, retention, 'its lease expired and it will not run again')
      elseif expiries >= max_expiries then
        kill(jk, id, failure(CODE_LEASE_EXPIRED_TOO_OFTEN, string.format(
          'the lease expired %d times (limit %d): the job keeps losing its worker, so it ' ..
          'was dead-lettered instead of retried', expiries, max_expiries)), now, limit)
        dead[#dead + 1] = id
      elseif attempts > max_retries then
        kill(jk, id, failure(CODE_LEASE_EXPIRED, string.format(
          'the lease expired during attempt %d of %d and no attempts are left',
          attempts, max_retries + 1)), now, limit)
        dead[#dead + 1] = id
      else
        redis.call('HSET', jk, 'error', failure(CODE_LEASE_EXPIRED, string.format(
          'the lease expired during attempt %d (its worker stopped heartbeating); the job ' ..
          'was put back to ready', attempts)))
        -- Back in its old place: it already waited its turn once.
        enter_ready(jk, id, tonumber(f[5]), tonumber(f[4]), now)
        requeued[#requeued + 1] = id
      end
    end
  elseif f and not f[6] and redis.call('EXISTS', jk) == 1 then
    bury(jk, id, 'state is missing', now, limit)
    dead[#dead + 1] = id
  end
end
local promoted = promote(now, limit)
purge(now, retention)
if #requeued > 0 or promoted > 0 then
  signal()
end
local out = { #requeued }
for _, id in ipairs(requeued) do
  out[#out + 1] = id
end
for _, id in ipairs(dead) do
  out[#out + 1] = id
end
return out
