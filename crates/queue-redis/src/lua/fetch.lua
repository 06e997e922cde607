-- fetch: promotes due scheduled jobs, purges expired results, then leases up to `max`
-- ready jobs in priority order (FIFO within a priority), all in one atomic step. When it
-- leases nothing and the caller will wait, registers the caller as waiting (see
-- lib.wake). Needs lib.
-- ARGV: max, lease_ms, retention_ms, dead_letter_limit, wait_ms (how long the caller
--       will block if nothing is leased; 0 = it will not).
-- Returns {paused, next_due_in_ms (-1 = none), n_corrupt, n_orphans, first_token,
--          lease_expires_ms, corrupt ids..., orphan ids..., then one array per leased
--          job: {id, attempt, job field}, or for a record written before the job field
--          existed {id, attempt, false, payload, tenant, priority, max_retries, headers,
--          created_at_ms}}. The k-th leased job (from 0) has token first_token + k.
-- The job field is returned as stored, unchecked: the client decodes it and
-- dead-letters a record it cannot decode with `bury`.
local K_META = BASE .. ':meta'
local K_READY = BASE .. ':ready'
local K_SCHED = BASE .. ':scheduled'
local K_BODY = BASE .. ':body'
local K_BATCHES = BASE .. ':batches'
local max = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local meta = redis.call('HMGET', K_META, 'paused', 'finished_head', 'wait_until', 'batch_heal')
local head = redis.call('ZRANGE', K_SCHED, '0', '0', 'WITHSCORES')
local L = nil
if head[2] and tonumber(head[2]) <= now then
  L = lib()
  local _
  _, head = L.promote(now, tonumber(ARGV[4]))
end
if now - ARGV[3] >= (tonumber(meta[2]) or 0) then
  L = L or lib()
  L.purge(now, tonumber(ARGV[3]))
end
local paused = meta[1] == '1'
local waiting = (tonumber(meta[3]) or 0) > now
local jobs = {}
local corrupt = {}
local orphans = {}
local taken = 0
local first_token = 0
local expires = now + ARGV[2]
local exhausted = false
local heal = meta[4] == '1'
if not paused then
  local running = {}
  local expires_s = string.format('%d', expires)
  local want = ARGV[1]
  while taken < max do
    local popped = redis.call('ZPOPMIN', K_READY, want)
    if #popped == 0 then
      exhausted = true
      break
    end
    local ids = {}
    for i = 1, #popped, 2 do
      ids[#ids + 1] = string.sub(popped[i], 17)
    end
    if #popped / 2 < tonumber(want) then
      exhausted = true
    end
    -- Jobs of a batch enqueue keep their record in the body hash until leased, and their
    -- ready time in their batch's entry instead of ready_since.
    -- pcall, like every read of a record: a body key of the wrong type must not stop
    -- the fetch after the ZPOPMIN above (a script is not rolled back).
    local bodies = redis.pcall('HMGET', K_BODY, unpack(ids))
    if bodies.err then
      bodies = {}
      heal = true
    end
    local aged = {}
    local moved = {}
    local left_batch = {}
    local take = {}
    for i, id in ipairs(ids) do
      local jk = JOB .. id
      local body = bodies[i]
      local f
      if body then
        moved[#moved + 1] = id
        local seq = string.sub(body, 1, 16)
        local b = string.sub(body, 17, 32)
        if #b == 16 and string.find(seq, '^%d+$') and string.find(b, '^%d+$') then
          left_batch[b] = (left_batch[b] or 0) + 1
          -- Never leased: attempt 1, and its record is written with the lease below.
          f = { 'ready', false, string.sub(body, 33), seq = seq }
        else
          -- Its batch's count can no longer be kept: clean the batch entries up once the
          -- queue runs dry (see below).
          heal = true
          redis.call('HSET', jk, 'job', body, 'state', 'ready')
          f = { 'ready', unreadable = true }
        end
      else
        aged[#aged + 1] = id
        f = redis.pcall('HMGET', jk, 'state', 'attempts', 'job')
      end
      if f.err then
        -- Not a hash.
        L = L or lib()
        L.quarantine(jk, id, now, tonumber(ARGV[4]))
        corrupt[#corrupt + 1] = id
      elseif f[1] == 'ready' then
        if f.unreadable then
          L = L or lib()
          L.bury(jk, id, 'its batch record does not start with its sequence and batch numbers',
            now, tonumber(ARGV[4]))
          corrupt[#corrupt + 1] = id
        elseif f[2] and not tonumber(f[2]) then
          L = L or lib()
          L.bury(jk, id, 'attempts is not a number', now, tonumber(ARGV[4]))
          corrupt[#corrupt + 1] = id
        else
          f[1] = id
          if f.seq then
            -- From the body hash: the record is written whole with the lease.
          elseif not f[3] then
            -- Written before the job field existed: its fields one by one.
            local old = redis.call('HMGET', jk, 'payload', 'tenant', 'priority', 'max_retries',
              'headers', 'created_at_ms')
            for i = 1, 6 do
              f[3 + i] = old[i]
            end
          end
          take[#take + 1] = f
        end
      elseif not f[1] then
        if redis.call('EXISTS', jk) == 1 then
          L = L or lib()
          L.bury(jk, id, 'state is missing', now, tonumber(ARGV[4]))
          corrupt[#corrupt + 1] = id
        else
          -- An index entry whose record is gone: nothing left to run or to keep.
          orphans[#orphans + 1] = id
        end
      end
      -- Any other state: a stale index entry; the job lives in another index.
    end
    if #take > 0 then
      -- One counter step for the jobs of this round: the tokens of all the jobs this
      -- call leases are consecutive (the script runs alone).
      local token = redis.call('HINCRBY', K_META, 'token', #take) - #take
      if first_token == 0 then
        first_token = token + 1
      end
      for _, f in ipairs(take) do
        local id = f[1]
        local attempt = (tonumber(f[2]) or 0) + 1
        token = token + 1
        -- string.format('%d') is far cheaper than the printf('%.17g') a number costs.
        if f.seq then
          redis.call('HSET', JOB .. id, 'job', f[3], 'seq', f.seq, 'state', 'running',
            'attempts', '1', 'token', string.format('%d', token))
        else
          redis.call('HSET', JOB .. id, 'state', 'running', 'attempts',
            string.format('%d', attempt), 'token', string.format('%d', token))
        end
        running[#running + 1] = expires_s
        running[#running + 1] = id
        f[2] = attempt
        jobs[#jobs + 1] = f
      end
      taken = taken + #take
    end
    if #aged > 0 then
      redis.call('ZREM', BASE .. ':ready_since', unpack(aged))
    end
    if #moved > 0 then
      redis.call('HDEL', K_BODY, unpack(moved))
      for b, n in pairs(left_batch) do
        local left = redis.pcall('HINCRBY', K_BATCHES, b, string.format('%d', -n))
        if type(left) ~= 'number' then
          -- batches is of the wrong type or holds a non-number: rebuilt from nothing
          -- once the ready line runs dry.
          heal = true
        elseif left <= 0 then
          redis.pcall('HDEL', K_BATCHES, b)
          redis.pcall('ZREM', BASE .. ':batch_since', b)
        end
      end
    end
    want = max - taken
  end
  if #running > 0 then
    redis.call('ZADD', BASE .. ':running', unpack(running))
  end
  -- A batch record that could not be read left its batch's count too high. Once the
  -- ready line is empty, no batch has a job left: drop every batch entry.
  if heal and exhausted then
    redis.call('DEL', K_BATCHES, BASE .. ':batch_since')
    redis.call('HDEL', K_META, 'batch_heal')
  elseif heal and meta[4] ~= '1' then
    redis.call('HSET', K_META, 'batch_heal', '1')
  end
  -- Pass the baton: more work is ready, so wake another waiting fetcher.
  if waiting and redis.call('ZCARD', K_READY) > 0 then
    L = L or lib()
    L.wake(now, meta[3])
  end
end
if taken == 0 and ARGV[5] ~= '0' then
  -- Register as waiting until well after our wait ends (a little longer than needed
  -- only costs wake-ups nobody takes); rewritten only when less than half the margin
  -- is left.
  local horizon = now + ARGV[5] + 5000
  if (tonumber(meta[3]) or 0) < horizon - 2500 then
    redis.call('HSET', K_META, 'wait_until', string.format('%d', horizon))
  end
end
local next_due = -1
if head[2] then
  next_due = math.max(0, tonumber(head[2]) - now)
end
local out = { paused and 1 or 0, next_due, #corrupt, #orphans, first_token, expires }
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
