-- release: hands a job back untouched (shutdown): ready again in its old place in line,
-- this attempt not counted. A job asked to cancel is cancelled instead.
-- ARGV: id, token, retention_ms.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return 0
end
local now = now_ms()
redis.call('ZREM', K_RUNNING, id)
if redis.call('HGET', jk, 'cancel_requested') == '1' then
  cancel_handed_back(jk, id, now, tonumber(ARGV[3]), 'it was handed back and will not run again')
  return 1
end
local f = redis.call('HMGET', jk, 'attempts', 'seq', 'priority')
redis.call('HSET', jk, 'attempts', math.max(0, (tonumber(f[1]) or 1) - 1))
enter_ready(jk, id, tonumber(f[2]) or next_seq(), tonumber(f[3]) or 0, now)
signal()
return 1
