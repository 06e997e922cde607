-- enqueue: stores jobs of one queue, in order; purges expired results when some may be
-- due. Needs lib.
-- ARGV: count, plain ('1' when no job has a dedupe key), retention_ms, then per job 5
--       values: id, the job field without its creation time (',<priority>,<max_retries>,
--       <JSON [tenant, headers, payload]>'), priority, run_at_ms ('' = now), dedupe_key
--       ('' = none).
-- Returns the number of jobs when every job was stored under its own id, else the id of
-- each job: its own, or the live job holding its dedupe key.
-- Idempotent: a job whose id already exists is left alone, so a retried call after a
-- lost reply stores nothing twice. Ids are new UUIDs made by the caller for this call,
-- so without dedupe keys the first run of a call stores every job in order: if the
-- first id is not stored, none is, and the per-job existence checks are skipped.
-- A batch (more than one job) stores its jobs that are ready now and have no dedupe key
-- in the queue's body hash (see the prelude), all in one HSET: a key per job costs a
-- redis.call per job. Their fetch writes their own record. Their ready time is kept once
-- for the batch (batch_since, batches), not per job in ready_since.
local K_META = BASE .. ':meta'
local K_BODY = BASE .. ':body'
local count = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local now_s = string.format('%d', now)
local meta = redis.call('HMGET', K_META, 'wait_until', 'finished_head')
local seq = redis.call('HINCRBY', K_META, 'seq', ARGV[1]) - count
local batch = count > 1
local K_BATCHES = BASE .. ':batches'
local checked = ARGV[2] ~= '1' or redis.call('EXISTS', JOB .. ARGV[4]) == 1 or
  (batch and redis.pcall('HEXISTS', K_BODY, ARGV[4]) == 1)
local out = nil
if checked then
  out = {}
end
local ready = {}
local ages = {}
local bodies = {}
-- The batch's name: the sequence number of its first job, 16 digits.
local batch_id = batch and string.format('%016d', seq + 1)
local first_due = nil
local first_due_id = nil
local L = nil
for o = 4, 3 + count * 5, 5 do
  local id = ARGV[o]
  local dedupe = ARGV[o + 4]
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
    if redis.call('EXISTS', JOB .. id) == 1 or (batch and redis.pcall('HEXISTS', K_BODY, id) == 1) then
      holder = id
    end
  end
  if holder then
    out[#out + 1] = holder
  else
    local member = string.format('%016d', seq)
    local run_at = ARGV[o + 3]
    local due = run_at ~= '' and tonumber(run_at) > now
    if dedupe == '' and not due then
      if batch then
        bodies[#bodies + 1] = id
        bodies[#bodies + 1] = member .. batch_id .. now_s .. ARGV[o + 1]
      else
        redis.call('HSET', JOB .. id, 'job', now_s .. ARGV[o + 1], 'state', 'ready', 'seq', member)
      end
    else
      local fields = { 'job', now_s .. ARGV[o + 1], 'seq', member }
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
      ready[#ready + 1] = ARGV[o + 2]
      ready[#ready + 1] = member .. id
      if not (batch and dedupe == '') then
        ages[#ages + 1] = now_s
        ages[#ages + 1] = id
      end
    end
    if out then
      out[#out + 1] = id
    end
  end
end
if #bodies > 0 then
  -- pcall: the jobs of this call written before (scheduled, with a dedupe key) must not
  -- be left without their index entries by a body key of the wrong type.
  local stored = redis.pcall('HSET', K_BODY, unpack(bodies))
  if type(stored) == 'table' and stored.err then
    -- Not a hash: each job gets a record of its own, as a single enqueue's.
    for i = 1, #bodies, 2 do
      local v = bodies[i + 1]
      redis.call('HSET', JOB .. bodies[i], 'job', string.sub(v, 33), 'state', 'ready',
        'seq', string.sub(v, 1, 16))
      ages[#ages + 1] = now_s
      ages[#ages + 1] = bodies[i]
    end
  else
    redis.pcall('HSET', K_BATCHES, batch_id, string.format('%d', #bodies / 2))
    redis.pcall('ZADD', BASE .. ':batch_since', now_s, batch_id)
  end
end
if #ready > 0 then
  redis.call('ZADD', BASE .. ':ready', unpack(ready))
end
if #ages > 0 then
  redis.call('ZADD', BASE .. ':ready_since', unpack(ages))
end
-- Wake a waiting fetcher for new ready jobs, or when a job is now the first one due (so
-- waiters shorten their wait).
if (tonumber(meta[1]) or 0) > now and (#ready > 0 or
    (first_due and redis.call('ZRANGE', BASE .. ':scheduled', '0', '0')[1] == first_due_id)) then
  -- lib.wake, inline: building lib costs more than the wake itself, on the path of an
  -- idle worker's latency.
  redis.call('LPUSH', BASE .. ':signal', '1')
  redis.call('LTRIM', BASE .. ':signal', '0', '15')
end
if now - ARGV[3] >= (tonumber(meta[2]) or 0) then
  L = L or lib()
  L.purge(now, tonumber(ARGV[3]))
end
if out then
  return out
end
return count
