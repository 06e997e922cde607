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
local K_RUNNING = BASE .. ':running'
local K_BODY = BASE .. ':body'
local max = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local meta = redis.call('HMGET', K_META, 'paused', 'finished_head', 'wait_until', 'batched')
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
-- Jobs taken out of the body hash (meta.batched counts the jobs waiting there).
local unbatched = 0
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
    -- The ready line in order: a member is one job (<seq><id>) or a batch
    -- (<seq of its next id>#<b>, see enqueue), whose ids are popped from its list as far
    -- as room is left; a batch with ids left goes back, at the seq of its next id.
    local room = tonumber(want)
    local order = {}
    local from = {}
    local listed = {}
    local lseq = {}
    local back = {}
    for i = 1, #popped, 2 do
      local m = popped[i]
      if room == 0 then
        back[#back + 1] = popped[i + 1]
        back[#back + 1] = m
      elseif string.byte(m, 17) == 35 then
        local first = tonumber(string.sub(m, 1, 16)) or 0
        local b = string.sub(m, 18)
        local lk = BASE .. ':batch:' .. b
        -- pcall: a list key of the wrong type must not stop the fetch after the ZPOPMIN
        -- above (a script is not rolled back); its batch is dropped.
        local left = redis.pcall('LLEN', lk)
        local got = nil
        if type(left) == 'number' and left > 0 then
          got = redis.call('LPOP', lk, string.format('%d', room))
        end
        if got then
          -- Sequence numbers by place in the list (cancelled jobs keep theirs).
          for k, id in ipairs(got) do
            listed[#listed + 1] = id
            lseq[#listed] = first + k - 1
            order[#order + 1] = id
            from[#order] = #listed
          end
          room = room - #got
        end
        if got and left > #got then
          back[#back + 1] = popped[i + 1]
          back[#back + 1] = string.format('%016d', first + #got) .. '#' .. b
        else
          redis.call('ZREM', BASE .. ':batch_since', b)
        end
      else
        order[#order + 1] = string.sub(m, 17)
        room = room - 1
      end
    end
    if #back > 0 then
      redis.call('ZADD', K_READY, unpack(back))
    end
    if room > 0 and #popped / 2 < tonumber(want) then
      exhausted = true
    end
    -- Records of batch jobs wait in the body hash (pcall, like every read of a record).
    local bodies = {}
    local lost = false
    if #listed > 0 then
      bodies = redis.pcall('HMGET', K_BODY, unpack(listed))
      if bodies.err then
        bodies = {}
        lost = true
      end
    end
    local aged = {}
    local moved = {}
    local take = {}
    for i, id in ipairs(order) do
      local jk = JOB .. id
      local pos = from[i]
      local f = nil
      if pos then
        local body = bodies[pos]
        if body then
          moved[#moved + 1] = id
          -- Never leased: attempt 1, and its record is written with the lease below.
          f = { 'ready', false, body, seq = string.format('%016d', lseq[pos]) }
        elseif lost then
          orphans[#orphans + 1] = id
        end
        -- Else it was cancelled while it waited: its record moved to its own key.
      else
        aged[#aged + 1] = id
        f = redis.pcall('HMGET', jk, 'state', 'attempts', 'job')
      end
      if not f then
        -- Nothing to run.
      elseif f.err then
        -- Not a hash.
        L = L or lib()
        L.quarantine(jk, id, now, tonumber(ARGV[4]))
        corrupt[#corrupt + 1] = id
      elseif f[1] == 'ready' then
        if f[2] and not tonumber(f[2]) then
          L = L or lib()
          L.bury(jk, id, 'attempts is not a number', now, tonumber(ARGV[4]))
          corrupt[#corrupt + 1] = id
        else
          f[1] = id
          if not f[3] and not f.seq then
            -- Written before the job field existed: its fields one by one.
            local old = redis.call('HMGET', jk, 'payload', 'tenant', 'priority', 'max_retries',
              'headers', 'created_at_ms')
            for k = 1, 6 do
              f[3 + k] = old[k]
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
      unbatched = unbatched + #moved
    end
    want = max - taken
  end
  if #running > 0 then
    redis.call('ZADD', K_RUNNING, unpack(running))
  end
  if exhausted and (meta[4] or unbatched > 0) then
    -- The ready line is empty, so no job should wait in a batch. A record still in body
    -- lost its batch to a damaged key: it gets a record of its own and a place at the
    -- end of the line. The batch count starts afresh.
    local stray = redis.pcall('HGETALL', K_BODY)
    if type(stray) == 'table' and #stray > 0 then
      L = L or lib()
      local seq = redis.call('HINCRBY', K_META, 'seq', string.format('%d', #stray / 2))
      local members = {}
      local ages = {}
      for i = #stray - 1, 1, -2 do
        local id = stray[i]
        local member = string.format('%016d', seq) .. id
        seq = seq - 1
        if redis.call('EXISTS', JOB .. id) == 0 then
          redis.call('HSET', JOB .. id, 'job', stray[i + 1], 'state', 'ready', 'seq',
            string.sub(member, 1, 16))
          members[#members + 1] = string.format('%d', L.job_numbers(stray[i + 1]) or 0)
          members[#members + 1] = member
          ages[#ages + 1] = now
          ages[#ages + 1] = id
        end
      end
      redis.call('DEL', K_BODY)
      if #members > 0 then
        redis.call('ZADD', K_READY, unpack(members))
        redis.call('ZADD', BASE .. ':ready_since', unpack(ages))
      end
    end
    redis.call('HDEL', K_META, 'batched')
    redis.call('DEL', BASE .. ':batch_since')
  elseif unbatched > 0 then
    redis.pcall('HINCRBY', K_META, 'batched', string.format('%d', -unbatched))
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
