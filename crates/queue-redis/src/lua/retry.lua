-- retry: ends a lease and schedules another attempt after delay_ms (ready at once when
-- 0), recording why this one failed. A job asked to cancel is cancelled instead. Needs
-- lib.
-- ARGV: id, token, delay_ms, failure JSON.
-- Returns 1 (also for a replay of this outcome), or 0 when the lease is stale.
local id = ARGV[1]
local jk = JOB .. id
local f = redis.call('HMGET', jk, 'state', 'token', 'cancel_requested', 'dedupe_key', 'priority',
  'job')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then
  -- A replay (the reply to the first call was lost): this lease already recorded this
  -- outcome. The reaper zeroes the token of a lease it takes back, so only the lease's
  -- own holder can have left its token on a job in that state.
  if f[2] == ARGV[2] and ARGV[2] ~= '0' and (f[1] == 'scheduled' or f[1] == 'ready' or f[1] == 'cancelled') then
    return 1
  end
  return 0
end
local L = lib()
local now = L.now()
redis.call('ZREM', BASE .. ':running', id)
if f[3] == '1' then
  L.cancel_handed_back(jk, id, now, f[4], 'it was not retried')
  return 1
end
redis.call('HSET', jk, 'error', ARGV[4])
redis.call('HDEL', jk, 'held')
local run_at = now + tonumber(ARGV[3])
if run_at > now then
  L.enter_scheduled(jk, id, run_at, now)
else
  redis.call('HSET', jk, 'run_at_ms', now)
  L.enter_ready(jk, id, redis.call('HINCRBY', BASE .. ':meta', 'seq', '1'),
    L.job_numbers(f[6], f[5]) or 0, now)
  L.wake_waiters(now)
end
return 1
