-- heartbeat: extends a lease to now + extend_ms.
-- ARGV: id, token, extend_ms.
-- Returns {1, lease_expires_ms, cancel_requested} or {0} when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return { 0 }
end
local expires = now_ms() + tonumber(ARGV[3])
redis.call('HSET', jk, 'lease_expires_ms', expires)
redis.call('ZADD', K_RUNNING, expires, id)
local cancel = redis.call('HGET', jk, 'cancel_requested') == '1' and 1 or 0
return { 1, expires, cancel }
