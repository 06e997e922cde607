-- fetch: promotes due scheduled jobs, purges expired results, then leases up to `max`
-- ready jobs in priority order (FIFO within a priority), all in one atomic step.
-- ARGV: max, lease_ms, retention_ms, dead_letter_limit.
-- Returns {paused, next_due_in_ms (-1 = none), n_corrupt, n_orphans, corrupt ids...,
--          orphan ids..., then 10 values per leased job: id, payload, tenant, priority,
--          attempt, max_retries, headers, created_at_ms, token, lease_expires_ms}.
local max = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local now = now_ms()
promote(now, limit)
purge(now, retention)
local paused = redis.call('HGET', K_META, 'paused') == '1'
local jobs = {}
local corrupt = {}
local orphans = {}
local taken = 0
local FIELDS = { 'priority', 'attempts', 'max_retries', 'created_at_ms', 'payload', 'tenant', 'state', 'headers' }
if not paused then
  while taken < max do
    local popped = redis.call('ZPOPMIN', K_READY, max - taken)
    if #popped == 0 then
      break
    end
    for i = 1, #popped, 2 do
      local id = string.sub(popped[i], 17)
      redis.call('ZREM', K_AGE, id)
      local jk = jkey(id)
      local f = load(jk, id, now, limit, FIELDS)
      if not f then
        corrupt[#corrupt + 1] = id
      elseif f[7] == 'ready' then
        local bad = bad_fields({ 'priority', 'attempts', 'max_retries', 'created_at_ms', 'payload', 'tenant' }, f, 4)
        if bad then
          bury(jk, id, bad, now, limit)
          corrupt[#corrupt + 1] = id
        else
          local attempt = tonumber(f[2]) + 1
          local token = redis.call('HINCRBY', K_META, 'token', 1)
          local expires = now + lease
          redis.call('HSET', jk, 'state', 'running', 'attempts', attempt, 'token', token,
            'lease_expires_ms', expires)
          redis.call('ZADD', K_RUNNING, expires, id)
          local n = #jobs
          jobs[n + 1] = id
          jobs[n + 2] = f[5]
          jobs[n + 3] = f[6]
          jobs[n + 4] = f[1]
          jobs[n + 5] = attempt
          jobs[n + 6] = f[3]
          jobs[n + 7] = f[8] or '{}'
          jobs[n + 8] = f[4]
          jobs[n + 9] = token
          jobs[n + 10] = expires
          taken = taken + 1
        end
      elseif not f[7] then
        if redis.call('EXISTS', jk) == 1 then
          bury(jk, id, 'state is missing', now, limit)
          corrupt[#corrupt + 1] = id
        else
          -- An index entry whose record is gone: nothing left to run or to keep.
          orphans[#orphans + 1] = id
        end
      end
      -- Any other state: a stale index entry; the job lives in another index.
    end
  end
  -- Pass the baton: more work is ready, so wake another waiting fetcher.
  if redis.call('ZCARD', K_READY) > 0 then
    signal()
  end
end
local next_due = -1
local head = redis.call('ZRANGE', K_SCHED, 0, 0, 'WITHSCORES')
if head[1] then
  next_due = math.max(0, tonumber(head[2]) - now)
end
local out = { paused and 1 or 0, next_due, #corrupt, #orphans }
for _, id in ipairs(corrupt) do
  out[#out + 1] = id
end
for _, id in ipairs(orphans) do
  out[#out + 1] = id
end
for _, v in ipairs(jobs) do
  out[#out + 1] = v
end
return out
