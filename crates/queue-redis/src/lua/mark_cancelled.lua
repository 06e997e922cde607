-- mark_cancelled: records that a running job was cancelled on request.
-- ARGV: id, token, failure JSON, retention_ms.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return 0
end
redis.call('ZREM', K_RUNNING, id)
redis.call('HSET', jk, 'error', ARGV[3])
finish(jk, id, 'cancelled', now_ms(), tonumber(ARGV[4]))
return 1
