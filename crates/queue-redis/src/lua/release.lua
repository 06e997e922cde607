-- release: hands a job back untouched (shutdown): ready again in its old place in line,
-- this attempt not counted. A job asked to cancel is cancelled instead. Needs lib.
-- ARGV: id, token.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = JOB .. id
local f = redis.call('HMGET', jk, 'state', 'token', 'cancel_requested', 'dedupe_key',
  'attempts', 'seq', 'priority', 'job')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then
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
L.enter_ready(jk, id, f[6] or redis.call('HINCRBY', BASE .. ':meta', 'seq', '1'),
  L.job_numbers(f[8], f[7]) or 0, now)
L.wake_waiters(now)
return 1
