-- retry: ends a lease and schedules another attempt after delay_ms (ready at once when
-- 0), recording why this one failed. A job asked to cancel is cancelled instead.
-- ARGV: id, token, delay_ms, failure JSON, retention_ms.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return 0
end
local now = now_ms()
redis.call('ZREM', K_RUNNING, id)
if redis.call('HGET', jk, 'cancel_requested') == '1' then
  cancel_handed_back(jk, id, now, tonumber(ARGV[5]), 'it was not retried')
  return 1
end
redis.call('HSET', jk, 'error', ARGV[4])
local run_at = now + tonumber(ARGV[3])
if run_at > now then
  enter_scheduled(jk, id, run_at)
else
  redis.call('HSET', jk, 'run_at_ms', now)
  enter_ready(jk, id, next_seq(), tonumber(redis.call('HGET', jk, 'priority')) or 0, now)
  signal()
end
return 1
