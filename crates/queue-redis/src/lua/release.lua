-- release: hands a job back untouched (shutdown): ready again in its old place in line,
-- this attempt not counted. A job asked to cancel is cancelled instead. Needs lib.
-- ARGV: id, token.
-- Returns 1 (also for a replay of this outcome), or 0 when the lease is stale. A held
-- job (see fetch) stops being held.
local id = ARGV[1]
local jk = JOB .. id
local f = redis.call('HMGET', jk, 'state', 'token', 'cancel_requested', 'dedupe_key',
  'attempts', 'seq', 'priority', 'job')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then
  -- A replay (the reply to the first call was lost): this lease already recorded this
  -- outcome. The reaper zeroes the token of a lease it takes back, so only the lease's
  -- own holder can have left its token on a job in that state.
  if f[2] == ARGV[2] and ARGV[2] ~= '0' and (f[1] == 'ready' or f[1] == 'cancelled') then
    return 1
  end
  return 0
end
local L = lib()
local now = L.now()
redis.call('ZREM', BASE .. ':running', id)
if f[3] == '1' then
  L.cancel_handed_back(jk, id, now, f[4], 'it was handed back and will not run again')
  return 1
end
redis.call('HSET', jk, 'attempts', math.max(0, (tonumber(f[5]) or 1) - 1))
redis.call('HDEL', jk, 'held')
L.enter_ready(jk, id, f[6] or redis.call('HINCRBY', BASE .. ':meta', 'seq', '1'),
  L.job_numbers(f[8], f[7]) or 0, now)
L.wake_waiters(now)
return 1
