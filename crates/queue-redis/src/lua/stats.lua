-- stats: counts of one queue in a constant number of O(1) / O(log n) commands.
-- Read-only: due scheduled jobs count as ready (and their due time as their ready time),
-- results past their retention are not counted, even before a purge removed them.
-- ARGV: retention_ms.
-- Returns {ready, scheduled, running, completed, dead, paused, dead_dropped, oldest_ready_age_ms}.
local K_SCHED = BASE .. ':scheduled'
local retention = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZCOUNT', K_SCHED, '-inf', now)
-- A batch is one member of ready; meta.batched counts the jobs waiting in batches.
local meta = redis.call('HMGET', BASE .. ':meta', 'paused', 'dead_dropped', 'batched')
-- pcall: batch_since only feeds stats, and one of the wrong type must not hide the rest.
local batches = redis.pcall('ZCARD', BASE .. ':batch_since')
if type(batches) ~= 'number' then
  batches = 0
end
-- Batches of the layout before batch lists have a ready member per job: theirs are not
-- batch members.
local legacy = redis.pcall('HLEN', BASE .. ':batches')
if type(legacy) == 'number' then
  batches = batches - legacy
end
local ready = math.max(0, redis.call('ZCARD', BASE .. ':ready') - batches +
  (tonumber(meta[3]) or 0)) + due
local scheduled = redis.call('ZCARD', K_SCHED) - due
local running = redis.call('ZCARD', BASE .. ':running')
local completed = redis.call('ZCOUNT', BASE .. ':completed', string.format('(%d', now - retention), '+inf')
local dead = redis.call('ZCARD', BASE .. ':dead')
local oldest = nil
local first = redis.call('ZRANGE', BASE .. ':ready_since', '0', '0', 'WITHSCORES')
if first[2] then
  oldest = tonumber(first[2])
end
-- Jobs waiting in batches are ready since their batch was stored.
local batch = redis.pcall('ZRANGE', BASE .. ':batch_since', '0', '0', 'WITHSCORES')
if batch[2] and (not oldest or tonumber(batch[2]) < oldest) then
  oldest = tonumber(batch[2])
end
local head = redis.call('ZRANGE', K_SCHED, '0', '0', 'WITHSCORES')
if head[2] and tonumber(head[2]) <= now and (not oldest or tonumber(head[2]) < oldest) then
  oldest = tonumber(head[2])
end
local age = 0
if oldest and ready > 0 then
  age = math.max(0, now - oldest)
end
return { ready, scheduled, running, completed, dead, meta[1] == '1' and 1 or 0,
  tonumber(meta[2]) or 0, age }
