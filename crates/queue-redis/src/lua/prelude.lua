-- Shared prelude of every queue-redis script (prepended at compile time).
--
-- KEYS[1] is the queue's base key, `{<prefix>:<queue>}`. Every key of the queue starts
-- with it, so the whole queue lives in one Redis Cluster slot; the scripts derive the
-- other names from it. Times come from the server clock (TIME), never from callers,
-- so workers with skewed clocks agree on lease deadlines.

if redis.replicate_commands then
  redis.replicate_commands()
end

local BASE = KEYS[1]
local K_META = BASE .. ':meta'            -- HASH: seq, token, paused, dead_dropped
local K_READY = BASE .. ':ready'          -- ZSET: score priority, member <seq:016d><id>
local K_AGE = BASE .. ':ready_since'      -- ZSET: score ready_since_ms, member id
local K_SCHED = BASE .. ':scheduled'      -- ZSET: score run_at_ms, member id
local K_RUNNING = BASE .. ':running'      -- ZSET: score lease_expires_ms, member id
local K_COMPLETED = BASE .. ':completed'  -- ZSET: score finished_at_ms, member id
local K_CANCELLED = BASE .. ':cancelled'  -- ZSET: score finished_at_ms, member id
local K_DEAD = BASE .. ':dead'            -- ZSET: score dead-letter sequence, member id
local K_DEDUPE = BASE .. ':dedupe'        -- HASH: dedupe key -> id of the job holding it
local K_SIGNAL = BASE .. ':signal'        -- LIST: wake-up tokens for waiting fetchers

local SIGNAL_CAP = 16
local PROMOTE_BATCH = 1000
local PURGE_BATCH = 200

local CODE_CANCELLED = 'CANCELLED'
local CODE_CORRUPT_JOB = 'CORRUPT_JOB'
local CODE_LEASE_EXPIRED = 'LEASE_EXPIRED'
local CODE_LEASE_EXPIRED_TOO_OFTEN = 'LEASE_EXPIRED_TOO_OFTEN'

local function jkey(id)
  return BASE .. ':job:' .. id
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ready_member(seq, id)
  return string.format('%016d', seq) .. id
end

local function next_seq()
  return redis.call('HINCRBY', K_META, 'seq', 1)
end

local function failure(code, message)
  return cjson.encode({ code = code, message = message })
end

-- Wakes one waiting fetcher (BLPOP on the signal list). Tokens are capped, so a queue
-- nobody waits on keeps at most SIGNAL_CAP of them.
local function signal()
  redis.call('LPUSH', K_SIGNAL, '1')
  redis.call('LTRIM', K_SIGNAL, 0, SIGNAL_CAP - 1)
end

local function is_live(state)
  return state == 'ready' or state == 'scheduled' or state == 'running'
end

-- Frees the dedupe key of a job leaving the live states, if it still holds it.
local function release_dedupe(jk, id)
  local key = redis.call('HGET', jk, 'dedupe_key')
  if key and redis.call('HGET', K_DEDUPE, key) == id then
    redis.call('HDEL', K_DEDUPE, key)
  end
end

local function enter_ready(jk, id, seq, priority, since)
  redis.call('HSET', jk, 'state', 'ready', 'seq', seq, 'ready_since_ms', since)
  redis.call('ZADD', K_READY, priority, ready_member(seq, id))
  redis.call('ZADD', K_AGE, since, id)
end

-- Schedules a job for `run_at`; wakes a waiter when it is now the first one due, so
-- waiting fetchers shorten their wait.
local function enter_scheduled(jk, id, run_at)
  redis.call('HSET', jk, 'state', 'scheduled', 'run_at_ms', run_at, 'seq', next_seq())
  redis.call('ZADD', K_SCHED, run_at, id)
  local head = redis.call('ZRANGE', K_SCHED, 0, 0)
  if head[1] == id then
    signal()
  end
end

-- Completed or cancelled: kept for the retention time, then purged (PEXPIRE is the
-- safety net when no script purges in time).
local function finish(jk, id, state, now, retention)
  release_dedupe(jk, id)
  redis.call('HSET', jk, 'state', state, 'finished_at_ms', now)
  if state == 'completed' then
    redis.call('ZADD', K_COMPLETED, now, id)
  else
    redis.call('ZADD', K_CANCELLED, now, id)
  end
  redis.call('PEXPIRE', jk, math.max(1, retention))
end

-- Moves a job (already out of ready, scheduled and running) to the dead-letter set and
-- drops the oldest dead letters beyond `limit`, counting them.
local function kill(jk, id, failure_json, now, limit)
  release_dedupe(jk, id)
  redis.call('HSET', jk, 'state', 'dead', 'error', failure_json, 'finished_at_ms', now)
  redis.call('PERSIST', jk)
  redis.call('ZADD', K_DEAD, next_seq(), id)
  local over = redis.call('ZCARD', K_DEAD) - limit
  if over > 0 then
    local victims = redis.call('ZRANGE', K_DEAD, 0, over - 1)
    for _, victim in ipairs(victims) do
      redis.call('DEL', jkey(victim))
    end
    redis.call('ZREMRANGEBYRANK', K_DEAD, 0, over - 1)
    redis.call('HINCRBY', K_META, 'dead_dropped', #victims)
  end
end

-- Takes a job out of every live index it may be in.
local function unindex(jk, id)
  local f = redis.call('HMGET', jk, 'seq')
  if f[1] then
    redis.call('ZREM', K_READY, ready_member(tonumber(f[1]) or 0, id))
  end
  redis.call('ZREM', K_AGE, id)
  redis.call('ZREM', K_SCHED, id)
  redis.call('ZREM', K_RUNNING, id)
end

-- Dead-letters a stored record that cannot be decoded, with CORRUPT_JOB.
local function bury(jk, id, reason, now, limit)
  unindex(jk, id)
  kill(jk, id, failure(CODE_CORRUPT_JOB,
    'the stored job record cannot be decoded (' .. reason ..
    '); it was moved to the dead-letter set instead of being run'), now, limit)
end

-- Names of the fields in `names` whose values in `values` are missing or not numbers
-- (for the first `numeric` of them checked as numbers), joined for a message.
local function bad_fields(names, values, numeric)
  local bad = {}
  for i, name in ipairs(names) do
    local v = values[i]
    if not v then
      bad[#bad + 1] = name .. ' is missing'
    elseif i <= numeric and not tonumber(v) then
      bad[#bad + 1] = name .. ' is not a number'
    end
  end
  if #bad == 0 then
    return nil
  end
  return table.concat(bad, ', ')
end

-- HMGET that survives a key of the wrong type: returns the values, or nil when the key
-- holds something other than a hash (after quarantining it, see below).
local function load(jk, id, now, limit, fields)
  local values = redis.pcall('HMGET', jk, unpack(fields))
  if type(values) == 'table' and values.err then
    -- Not a hash: keep the original value aside for inspection and dead-letter a stub.
    local kind = redis.call('TYPE', jk)
    kind = type(kind) == 'table' and kind.ok or tostring(kind)
    local aside = BASE .. ':corrupt:' .. id
    redis.call('RENAME', jk, aside)
    redis.call('HSET', jk, 'payload', 'null', 'tenant', '', 'priority', 0, 'attempts', 0,
      'max_retries', 0, 'created_at_ms', now, 'run_at_ms', now, 'lease_expiries', 0,
      'cancel_requested', 0, 'headers', '{}')
    unindex(jk, id)
    kill(jk, id, failure(CODE_CORRUPT_JOB, 'the stored job record is a ' .. kind ..
      ', not a hash; its value was kept at key ' .. aside .. ' and the job was moved to the dead-letter set'),
      now, limit)
    return nil
  end
  return values
end

-- Moves due scheduled jobs to ready, in due order, at most PROMOTE_BATCH per call.
-- Returns how many became ready.
local function promote(now, limit)
  local due = redis.call('ZRANGEBYSCORE', K_SCHED, '-inf', now, 'WITHSCORES', 'LIMIT', 0, PROMOTE_BATCH)
  local n = 0
  for i = 1, #due, 2 do
    local id = due[i]
    local run_at = tonumber(due[i + 1])
    redis.call('ZREM', K_SCHED, id)
    local jk = jkey(id)
    local f = load(jk, id, now, limit, { 'priority', 'seq', 'state' })
    if not f then
      -- quarantined
    elseif f[3] == 'scheduled' then
      local bad = bad_fields({ 'priority', 'seq' }, f, 2)
      if bad then
        bury(jk, id, bad, now, limit)
      else
        -- Ready since its due time, even if nobody looked until later.
        enter_ready(jk, id, tonumber(f[2]), tonumber(f[1]), run_at)
        n = n + 1
      end
    elseif not f[3] and redis.call('EXISTS', jk) == 1 then
      bury(jk, id, 'state is missing', now, limit)
    end
  end
  return n
end

-- Forgets completed and cancelled jobs older than the retention time, bounded per call.
local function purge(now, retention)
  local cutoff = now - retention
  for _, zset in ipairs({ K_COMPLETED, K_CANCELLED }) do
    local old = redis.call('ZRANGEBYSCORE', zset, '-inf', cutoff, 'LIMIT', 0, PURGE_BATCH)
    for _, id in ipairs(old) do
      redis.call('DEL', jkey(id))
      redis.call('ZREM', zset, id)
    end
  end
end

-- Whether `id` holds a lease with `token` right now.
local function fenced(jk, token)
  local f = redis.call('HMGET', jk, 'state', 'token')
  return f[1] == 'running' and tonumber(f[2]) == tonumber(token)
end

-- Ends a running job's lease after a cancel request: state cancelled.
local function cancel_handed_back(jk, id, now, retention, how)
  redis.call('HSET', jk, 'error', failure(CODE_CANCELLED,
    'cancel was requested while it was running; ' .. how))
  finish(jk, id, 'cancelled', now, retention)
end

