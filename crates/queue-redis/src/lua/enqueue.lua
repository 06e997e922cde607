-- enqueue: stores jobs of one queue, in order; purges expired results when some may be
-- due. Needs lib.
-- ARGV: count, mode, retention_ms, then per job: id, the job field without its creation
--       time (',<priority>,<max_retries>,<JSON [tenant, headers, payload]>'), priority,
--       and unless mode is '2', the due time and dedupe_key ('' = none). The due time is
--       '' (now), '<run_at_ms>' (an instant), '+<delay_ms>' (a delay from the server's
--       clock now) or '<run_at_ms>+<delay_ms>' (the later of the two).
--       mode '2': no job has a dedupe key or a due time (3 values per job); '1': no job
--       has a dedupe key (5 values); '0': any job may (5 values).
-- Returns the number of jobs when every job was stored under its own id, else the id of
-- each job: its own, or the live job holding its dedupe key.
-- Idempotent: a job whose id already exists is left alone, so a retried call after a
-- lost reply stores nothing twice. Ids are new UUIDs made by the caller for this call,
-- so without dedupe keys the first run of a call stores every job in order: if neither
-- the first nor the last id is stored, none is, and the per-job existence checks are
-- skipped.
-- A batch (more than one job) stores its jobs that are ready now and have no dedupe key
-- without a key or an index entry per job (see the prelude): their records go to the
-- body hash in one HSET, and each run of them of one priority becomes one list of ids
-- (one RPUSH) with one member in ready and one in batch_since. A fetch pops them from
-- the list and writes each leased job's own record.
-- Staged: ARGV 'staged', <call id> stores the jobs a client staged under
-- BASE .. ':staged:' .. <call id> (a list holding count, mode, retention_ms and the
-- values per job, as above, of the jobs of one `enqueue_many` call for this queue; see
-- RedisQueue::enqueue_many), all at once. The list is left for the client to delete, so
-- a retried call stores nothing twice. Returns -1 when the list is gone (expired): then
-- nothing was stored.
local K_META = BASE .. ':meta'
local K_BODY = BASE .. ':body'
local A = ARGV
if ARGV[1] == 'staged' then
  A = redis.call('LRANGE', BASE .. ':staged:' .. ARGV[2], '0', '-1')
  if #A < 3 then
    return -1
  end
end
local count = tonumber(A[1])
local w = A[2] == '2' and 3 or 5
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local now_s = string.format('%d', now)
local meta = redis.call('HMGET', K_META, 'wait_until', 'finished_head')
local seq = redis.call('HINCRBY', K_META, 'seq', A[1]) - count
local batch = count > 1
if batch then
  -- A body key of another type (written by hand): every job gets a record of its own.
  local kind = redis.call('TYPE', K_BODY).ok
  batch = kind == 'none' or kind == 'hash'
end
-- The first and the last id: a retried call whose first job is already gone (finished
-- and purged) is still recognised by its last.
local last = 4 + (count - 1) * w
local checked = A[2] == '0' or redis.call('EXISTS', JOB .. A[4]) == 1 or
  (batch and redis.call('HEXISTS', K_BODY, A[4]) == 1) or
  (count > 1 and (redis.call('EXISTS', JOB .. A[last]) == 1 or
    (batch and redis.call('HEXISTS', K_BODY, A[last]) == 1)))
local out = nil
if checked then
  out = {}
end
local first_due = nil
local first_due_id = nil
local any_ready = false
local L = nil
-- Slices of at most 500 jobs, so that no command gets more arguments than Lua can unpack
-- (a call from a client has at most 500 jobs: one slice; a staged one may have more).
for from = 0, count - 1, 500 do
  local ready = {}
  local ages = {}
  local bodies = {}
  -- Runs of consecutive batch jobs of one priority: {prio = p, b = first seq (16 digits),
  -- ids...}. Anything else between them ends a run, so a run's jobs have consecutive
  -- sequence numbers.
  local runs = {}
  local run = nil
  for o = 4 + from * w, 3 + math.min(count, from + 500) * w, w do
    local id = A[o]
    local run_at = ''
    local dedupe = ''
    if w == 5 then
      run_at = A[o + 3]
      dedupe = A[o + 4]
    end
    seq = seq + 1
    local holder = nil
    if checked then
      if dedupe ~= '' then
        holder = redis.call('HGET', BASE .. ':dedupe', dedupe)
        if holder and holder ~= id then
          local state = redis.call('HGET', JOB .. holder, 'state')
          if not (state == 'ready' or state == 'scheduled' or state == 'running') then
            holder = nil
          end
        end
      end
      if redis.call('EXISTS', JOB .. id) == 1 or (batch and redis.call('HEXISTS', K_BODY, id) == 1) then
        holder = id
      end
    end
    if holder then
      out[#out + 1] = holder
      run = nil
    else
      local due = false
      if run_at ~= '' then
        local plus = string.find(run_at, '+', 1, true)
        if plus then
          -- A delay counts from this server's clock, never the producer's.
          local at = now + tonumber(string.sub(run_at, plus + 1))
          local instant = tonumber(string.sub(run_at, 1, plus - 1))
          if instant and instant > at then
            at = instant
          end
          run_at = string.format('%d', at)
        end
        due = tonumber(run_at) > now
      end
      if batch and dedupe == '' and not due then
        local prio = A[o + 2]
        if not run or run.prio ~= prio then
          run = { prio = prio, b = string.format('%016d', seq) }
          runs[#runs + 1] = run
        end
        run[#run + 1] = id
        bodies[#bodies + 1] = id
        bodies[#bodies + 1] = run.b .. now_s .. A[o + 1]
      else
        run = nil
        local member = string.format('%016d', seq)
        if dedupe == '' and not due then
          redis.call('HSET', JOB .. id, 'job', now_s .. A[o + 1], 'state', 'ready', 'seq', member)
        else
          local fields = { 'job', now_s .. A[o + 1], 'seq', member }
          if dedupe ~= '' then
            fields[#fields + 1] = 'dedupe_key'
            fields[#fields + 1] = dedupe
            redis.call('HSET', BASE .. ':dedupe', dedupe, id)
          end
          fields[#fields + 1] = 'state'
          if due then
            fields[#fields + 1] = 'scheduled'
            fields[#fields + 1] = 'run_at_ms'
            fields[#fields + 1] = run_at
          else
            fields[#fields + 1] = 'ready'
          end
          redis.call('HSET', JOB .. id, unpack(fields))
        end
        if due then
          redis.call('ZADD', BASE .. ':scheduled', run_at, id)
          if not first_due or tonumber(run_at) < first_due then
            first_due = tonumber(run_at)
            first_due_id = id
          end
        else
          ready[#ready + 1] = A[o + 2]
          ready[#ready + 1] = member .. id
          ages[#ages + 1] = now_s
          ages[#ages + 1] = id
        end
      end
      if out then
        out[#out + 1] = id
      end
    end
  end
  local since = {}
  if #bodies > 0 then
    redis.call('HSET', K_BODY, unpack(bodies))
    for _, r in ipairs(runs) do
      -- pcall here and below: a key of the wrong type must not stop the script after the
      -- writes above (a script is not rolled back). A batch whose list cannot be written
      -- waits in body until the line runs dry (see lib.heal_batches).
      redis.pcall('RPUSH', BASE .. ':batch:' .. r.b, unpack(r))
      ready[#ready + 1] = r.prio
      ready[#ready + 1] = r.b .. '#' .. r.b
      since[#since + 1] = now_s
      since[#since + 1] = r.b
    end
  end
  if #ready > 0 then
    any_ready = true
    redis.call('ZADD', BASE .. ':ready', unpack(ready))
  end
  if #ages > 0 then
    redis.call('ZADD', BASE .. ':ready_since', unpack(ages))
  end
  if #since > 0 then
    -- For stats only.
    redis.pcall('ZADD', BASE .. ':batch_since', unpack(since))
    redis.pcall('HINCRBY', K_META, 'batched', string.format('%d', #bodies / 2))
  end
end
-- Wake a waiting fetcher for new ready jobs, or when a job is now the first one due (so
-- waiters shorten their wait).
if (tonumber(meta[1]) or 0) > now and (any_ready or
    (first_due and redis.call('ZRANGE', BASE .. ':scheduled', '0', '0')[1] == first_due_id)) then
  -- lib.wake, inline: building lib costs more than the wake itself, on the path of an
  -- idle worker's latency.
  redis.call('LPUSH', BASE .. ':signal', '1')
  redis.call('LTRIM', BASE .. ':signal', '0', '15')
end
if now - A[3] >= (tonumber(meta[2]) or 0) then
  L = L or lib()
  L.purge(now, tonumber(A[3]))
end
if out then
  return out
end
return count
