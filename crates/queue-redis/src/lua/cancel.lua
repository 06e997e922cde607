-- cancel: cancels a ready or scheduled job, or asks a running one to cancel; purges
-- expired results when some may be due. Needs lib.
-- ARGV: id, retention_ms.
-- Returns 'cancelled', 'requested', 'finished' or 'not_found'.
local L = lib()
local id = ARGV[1]
local retention = tonumber(ARGV[2])
local jk = JOB .. id
local now = L.now()
L.purge_due(now, retention, redis.call('HGET', BASE .. ':meta', 'finished_head'))
local f = redis.call('HMGET', jk, 'state', 'finished_at_ms', 'dedupe_key')
if not f[1] then
  -- A ready job of a batch enqueue: give it its own record first (see the prelude), and
  -- take its id out of its batch's list.
  local K_BODY = BASE .. ':body'
  -- pcall: a body key of another type holds no job.
  local body = redis.pcall('HGET', K_BODY, id)
  if type(body) == 'string' then
    local job, b, seq = L.body_record(body)
    if seq then
      -- The layout before batch lists, with a ready member of its own, which unindex
      -- (below) removes.
      redis.call('HSET', jk, 'job', job, 'seq', seq, 'state', 'ready')
      redis.call('HDEL', K_BODY, id)
      L.legacy_left(b)
    else
      redis.call('HSET', jk, 'job', job, 'state', 'ready')
      redis.call('HDEL', K_BODY, id)
      redis.pcall('LREM', BASE .. ':batch:' .. b, '1', id)
      redis.pcall('HINCRBY', BASE .. ':meta', 'batched', '-1')
    end
    f[1] = 'ready'
  end
end
local state = f[1]
if not state then
  return 'not_found'
end
if (state == 'completed' or state == 'cancelled') and (tonumber(f[2]) or 0) + retention <= now then
  return 'not_found'
end
if state == 'ready' or state == 'scheduled' then
  L.unindex(jk, id)
  L.finish(jk, id, 'cancelled', now, f[3], 'error', L.failure('CANCELLED', 'cancelled before it ran'))
  return 'cancelled'
elseif state == 'running' then
  redis.call('HSET', jk, 'cancel_requested', '1')
  return 'requested'
end
return 'finished'
