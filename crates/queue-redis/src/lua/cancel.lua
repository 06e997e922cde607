-- cancel: cancels a ready or scheduled job, or asks a running one to cancel.
-- ARGV: id, retention_ms.
-- Returns 'cancelled', 'requested', 'finished' or 'not_found'.
local id = ARGV[1]
local retention = tonumber(ARGV[2])
local jk = jkey(id)
local f = redis.call('HMGET', jk, 'state', 'finished_at_ms', 'seq')
local state = f[1]
if not state then
  return 'not_found'
end
local now = now_ms()
if (state == 'completed' or state == 'cancelled') and (tonumber(f[2]) or 0) + retention <= now then
  return 'not_found'
end
if state == 'ready' or state == 'scheduled' then
  unindex(jk, id)
  redis.call('HSET', jk, 'error', failure(CODE_CANCELLED, 'cancelled before it ran'))
  finish(jk, id, 'cancelled', now, retention)
  return 'cancelled'
elseif state == 'running' then
  redis.call('HSET', jk, 'cancel_requested', 1)
  return 'requested'
end
return 'finished'
