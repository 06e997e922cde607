-- heartbeat: extends a lease to now + extend_ms. Only a running job heartbeats, so a held
-- job (see fetch) stops being held: its worker started it.
-- ARGV: id, token, extend_ms.
-- Returns {1, lease_expires_ms, cancel_requested} or {0} when the lease is stale.
local id = ARGV[1]
local f = redis.call('HMGET', JOB .. id, 'state', 'token', 'cancel_requested', 'held')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then
  return { 0 }
end
local t = redis.call('TIME')
local expires = t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[3]
redis.call('ZADD', BASE .. ':running', string.format('%d', expires), id)
if f[4] == '1' then
  redis.call('HDEL', JOB .. id, 'held')
end
return { 1, expires, f[3] == '1' and 1 or 0 }
