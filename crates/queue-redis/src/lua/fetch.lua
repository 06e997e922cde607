-- fetch: promotes due scheduled jobs, purges expired results, then leases up to `max`
-- ready jobs in priority order (FIFO within a priority), all in one atomic step. When it
-- leases nothing and the caller will wait, registers the caller as waiting (see
-- lib.wake). Needs lib.
-- ARGV: max, lease_ms, retention_ms, dead_letter_limit, wait_ms (how long the caller
--       will block if nothing is leased; 0 = it will not), token_base (a random number
--       below 2^52 the caller drew for this call), start (how many of the leased jobs,
--       in order, start now; the rest are held: the caller keeps them waiting for a free
--       slot, and the reaper hands a held job back uncharged, see reap and mark_started).
-- Returns {paused, next_due_in_ms (-1 = none), n_corrupt, n_orphans, first_token,
--          lease_expires_ms, corrupt ids..., orphan ids..., then one array per leased
--          job: {id, attempt, job field}, or for a record written before the job field
--          existed {id, attempt, false, payload, tenant, priority, max_retries, headers,
--          created_at_ms}}. The k-th leased job (from 0) has token first_token + k.
-- Tokens are never a stored counter, which a crash that loses writes could rewind and
-- hand out again: they come from the caller's random base.
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
-- Jobs taken out of the body hash (meta.batched counts the jobs waiting there), and
-- whether any was stored by the layout before batch lists.
local unbatched = 0
local legacy = false
if not paused then
  local running = {}
  local expires_s = string.format('%d', expires)
  -- The first look pops one member: a batch at the head usually fills the request by
  -- itself, and the members popped beyond it would only go back.
  local pop = '1'
  while taken < max do
    local popped = redis.call('ZPOPMIN', K_READY, pop)
    if #popped == 0 then
      exhausted = true
      break
    end
    -- The ready line in order: a member is one job (<seq><id>) or a batch
    -- (<seq of its next id>#<b>, see enqueue), whose ids are taken from its list as far
    -- as room is left; a batch with ids left goes back, at the seq of its next id.
    local room = max - taken
    local order = {}
    local from = {}
    local listed = {}
    local lseq = {}
    local back = {}
    local batch_last = false
    for i = 1, #popped, 2 do
      local m = popped[i]
      if room == 0 then
        back[#back + 1] = popped[i + 1]
        back[#back + 1] = m
      elseif string.byte(m, 17) == 35 then
        batch_last = true
        local first = tonumber(string.sub(m, 1, 16)) or 0
        local b = string.sub(m, 18)
        local lk = BASE .. ':batch:' .. b
        -- pcall: a list key of the wrong type must not stop the fetch after the ZPOPMIN
        -- above (a script is not rolled back). It is set aside for inspection; its jobs
        -- wait in body until the line runs dry (see lib.heal_batches).
        local got = redis.pcall('LRANGE', lk, '0', string.format('%d', room))
        if got.err then
          redis.call('RENAME', lk, BASE .. ':corrupt:batch:' .. b)
          got = {}
        end
        local n = math.min(#got, room)
        -- Sequence numbers by place in the list. A cancel takes its id out, so the ids
        -- after it get one less than they were given: still inside the batch's range,
        -- so a job handed back still goes back before the rest of its batch.
        for k = 1, n do
          listed[#listed + 1] = got[k]
          lseq[#listed] = first + k - 1
          order[#order + 1] = got[k]
          from[#order] = #listed
        end
        room = room - n
        if #got > n then
          redis.call('LTRIM', lk, string.format('%d', n), '-1')
          back[#back + 1] = popped[i + 1]
          back[#back + 1] = string.format('%016d', first + n) .. '#' .. b
        else
          redis.call('DEL', lk)
          redis.pcall('ZREM', BASE .. ':batch_since', b)
        end
      else
        batch_last = false
        order[#order + 1] = string.sub(m, 17)
        room = room - 1
      end
    end
    if #back > 0 then
      redis.call('ZADD', K_READY, unpack(back))
    end
    if room > 0 and #popped / 2 < tonumber(pop) then
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
          -- Never leased: attempt 1, and its record (<b><job field>) is written with the
          -- lease below.
          f = { 'ready', false, string.sub(body, 17), seq = string.format('%016d', lseq[pos]) }
        elseif lost then
          orphans[#orphans + 1] = id
        end
        -- Else its record is gone from body (a damaged key): nothing to run.
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
          -- A job of a batch enqueue of the layout before batch lists: its record waits
          -- in body as <seq><batch><job field>, under a ready member of its own.
          local body = redis.pcall('HGET', K_BODY, id)
          local job, b, seq = nil, nil, nil
          if type(body) == 'string' then
            L = L or lib()
            job, b, seq = L.body_record(body)
          end
          if seq then
            legacy = true
            redis.call('HDEL', K_BODY, id)
            L.legacy_left(b)
            take[#take + 1] = { id, false, job, seq = seq }
          else
            -- An index entry whose record is gone: nothing left to run or to keep.
            orphans[#orphans + 1] = id
          end
        end
      end
      -- Any other state: a stale index entry; the job lives in another index.
    end
    if #take > 0 then
      -- The tokens of all the jobs this call leases are consecutive from the base.
      local token = tonumber(ARGV[6]) + taken - 1
      if first_token == 0 then
        first_token = token + 1
      end
      local start = tonumber(ARGV[7]) - taken
      for k, f in ipairs(take) do
        local id = f[1]
        local attempt = (tonumber(f[2]) or 0) + 1
        local held = k > start
        token = token + 1
        -- string.format('%d') is far cheaper than the printf('%.17g') a number costs.
        if f.seq then
          local fields = { 'job', f[3], 'seq', f.seq, 'state', 'running', 'attempts', '1',
            'token', string.format('%d', token) }
          if held then
            fields[#fields + 1] = 'held'
            fields[#fields + 1] = '1'
          end
          -- pcall: a key of another type under its id (written by hand) is set aside,
          -- so the job still runs and the script never stops half-way.
          local stored = redis.pcall('HSET', JOB .. id, unpack(fields))
          if type(stored) == 'table' and stored.err then
            redis.call('RENAME', JOB .. id, BASE .. ':corrupt:' .. id)
            redis.call('HSET', JOB .. id, unpack(fields))
          end
        else
          if held then
            redis.call('HSET', JOB .. id, 'state', 'running', 'attempts',
              string.format('%d', attempt), 'token', string.format('%d', token), 'held', '1')
          else
            -- Every path that puts a job back in line deletes `held` (release, retry,
            -- reap, requeue_dead), so a started job has none to clear.
            redis.call('HSET', JOB .. id, 'state', 'running', 'attempts',
              string.format('%d', attempt), 'token', string.format('%d', token))
          end
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
    -- Next, one member again after a batch, else as many as room is left.
    pop = batch_last and '1' or string.format('%d', max - taken)
  end
  if #running > 0 then
    redis.call('ZADD', K_RUNNING, unpack(running))
  end
  if unbatched > 0 then
    redis.pcall('HINCRBY', K_META, 'batched', string.format('%d', -unbatched))
  end
  if exhausted and (meta[4] or unbatched > 0 or legacy) then
    -- The line is empty, so no job should wait in body.
    L = L or lib()
    L.heal_batches(now)
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
