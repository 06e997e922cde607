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
  -- A ready job of a batch enqueue: give it its own record first (see the prelude).
  local K_BODY = BASE .. ':body'
  local body = redis.call('HGET', K_BODY, id)
  if body then
    redis.call('HDEL', K_BODY, id)
    local seq = string.sub(body, 1, 16)
    local b = string.sub(body, 17, 32)
    local counted = false
    if #b == 16 and string.find(seq, '^%d+$') and string.find(b, '^%d+$') then
      redis.call('HSET', jk, 'job', string.sub(body, 33), 'seq', seq, 'state', 'ready')
      local left = redis.pcall('HINCRBY', BASE .. ':batches', b, '-1')
      if type(left) == 'number' then
        counted = true
        if left <= 0 then
          redis.call('HDEL', BASE .. ':batches', b)
          redis.call('ZREM', BASE .. ':batch_since', b)
        end
      end
    else
      -- Unreadable: kept whole for inspection. Its ready entry cannot be named, so it
      -- stays until a fetch meets it and skips it (the job is no longer ready).
      redis.call('HSET', jk, 'job', body, 'state', 'ready')
    end
    if not counted then
      -- The next fetch that empties the ready line drops the batch entries.
      redis.call('HSET', BASE .. ':meta', 'batch_heal', '1')
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
