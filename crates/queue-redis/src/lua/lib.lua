-- The helpers of the rare paths (dead letters, corrupt records, cancellation,
-- promotion, purging, wake-ups), built on first use: `local L = lib()`. Building costs
-- a closure per helper, which the hot paths only pay when they need one.
local function lib()
  local K_META = BASE .. ':meta'
  local K_READY = BASE .. ':ready'
  local K_AGE = BASE .. ':ready_since'
  local K_SCHED = BASE .. ':scheduled'
  local K_RUNNING = BASE .. ':running'
  local K_COMPLETED = BASE .. ':completed'
  local K_CANCELLED = BASE .. ':cancelled'
  local K_DEAD = BASE .. ':dead'
  local K_DEDUPE = BASE .. ':dedupe'
  local K_SIGNAL = BASE .. ':signal'
  local K_BODY = BASE .. ':body'
  local K_BATCH_SINCE = BASE .. ':batch_since'

  local PROMOTE_BATCH = '1000'
  local PURGE_BATCH = 200
  local HEAL_BATCH = '1000'

  local L = {}

  function L.now()
    local t = redis.call('TIME')
    return t[1] * 1000 + math.floor(t[2] / 1000)
  end

  -- Wakes one waiting fetcher (BLPOP on the signal list), but only while one may be
  -- waiting: a fetch that found nothing registers itself in meta.wait_until before it
  -- blocks, atomically with finding nothing (see fetch.lua), so no wake-up is skipped
  -- while anyone waits. At most 16 tokens are kept.
  function L.wake(now, wait_until)
    if (tonumber(wait_until) or 0) > now then
      redis.call('LPUSH', K_SIGNAL, '1')
      redis.call('LTRIM', K_SIGNAL, '0', '15')
    end
  end

  -- wake() for scripts that have not read meta.
  function L.wake_waiters(now)
    L.wake(now, redis.call('HGET', K_META, 'wait_until'))
  end

  function L.failure(code, message)
    return cjson.encode({ code = code, message = message })
  end

  -- Frees the dedupe key `key` (read from the job's record; false/nil = none) of a job
  -- leaving the live states, if it still holds it.
  function L.release_dedupe(id, key)
    if key and redis.call('HGET', K_DEDUPE, key) == id then
      redis.call('HDEL', K_DEDUPE, key)
    end
  end

  -- Completed or cancelled (already out of ready, scheduled and running), with one more
  -- field (`result` or `error`) written in the same HSET. Kept for the retention time,
  -- then deleted by purge().
  function L.finish(jk, id, state, now, dedupe_key, field, value)
    L.release_dedupe(id, dedupe_key)
    redis.call('HSET', jk, 'state', state, 'finished_at_ms', now, field, value)
    if state == 'completed' then
      redis.call('ZADD', K_COMPLETED, now, id)
    else
      redis.call('ZADD', K_CANCELLED, now, id)
    end
  end

  -- Ends a running job's lease after a cancel request: state cancelled.
  function L.cancel_handed_back(jk, id, now, dedupe_key, how)
    L.finish(jk, id, 'cancelled', now, dedupe_key, 'error', L.failure('CANCELLED',
      'cancel was requested while it was running; ' .. how))
  end

  -- Priority and max_retries of a job, as numbers (nil when missing or not numbers),
  -- from its `job` field, or from the fields of a record written before `job` existed.
  function L.job_numbers(job, priority, max_retries)
    if priority then
      return tonumber(priority), max_retries and tonumber(max_retries)
    end
    if not job then
      return nil, nil
    end
    local p, m = string.match(job, '^[^,]*,([^,]*),([^,]*),')
    return tonumber(p), tonumber(m)
  end

  function L.ready_member(seq, id)
    return string.format('%016d', tonumber(seq) or 0) .. id
  end

  -- Moves a job (already out of ready, scheduled and running) to the dead-letter set
  -- and drops the oldest dead letters beyond `limit`, counting them.
  function L.kill(jk, id, failure_json, now, limit)
    L.release_dedupe(id, redis.call('HGET', jk, 'dedupe_key'))
    redis.call('HSET', jk, 'state', 'dead', 'error', failure_json, 'finished_at_ms', now)
    -- Records written by versions that gave finished jobs a TTL keep none once dead.
    redis.call('PERSIST', jk)
    redis.call('ZADD', K_DEAD, redis.call('HINCRBY', K_META, 'seq', '1'), id)
    local over = redis.call('ZCARD', K_DEAD) - limit
    if over > 0 then
      local victims = redis.call('ZRANGE', K_DEAD, 0, over - 1)
      for _, victim in ipairs(victims) do
        redis.call('DEL', JOB .. victim)
      end
      redis.call('ZREMRANGEBYRANK', K_DEAD, 0, over - 1)
      redis.call('HINCRBY', K_META, 'dead_dropped', #victims)
    end
  end

  -- Takes a job out of every live index it may be in.
  function L.unindex(jk, id)
    local seq = redis.call('HGET', jk, 'seq')
    if seq then
      redis.call('ZREM', K_READY, L.ready_member(seq, id))
    end
    redis.call('ZREM', K_AGE, id)
    redis.call('ZREM', K_SCHED, id)
    redis.call('ZREM', K_RUNNING, id)
  end

  -- Dead-letters a stored record that cannot be decoded, with CORRUPT_JOB.
  function L.bury(jk, id, reason, now, limit)
    L.unindex(jk, id)
    L.kill(jk, id, L.failure('CORRUPT_JOB',
      'the stored job record cannot be decoded (' .. reason ..
      '); it was moved to the dead-letter set instead of being run'), now, limit)
  end

  -- Names of the fields in `names` whose values in `values` are missing or not numbers
  -- (for the first `numeric` of them checked as numbers), joined for a message.
  function L.bad_fields(names, values, numeric)
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

  -- A job key holding something other than a hash: keeps the original value aside for
  -- inspection and dead-letters a stub in its place.
  function L.quarantine(jk, id, now, limit)
    local kind = redis.call('TYPE', jk)
    kind = type(kind) == 'table' and kind.ok or tostring(kind)
    local aside = BASE .. ':corrupt:' .. id
    redis.call('RENAME', jk, aside)
    redis.call('HSET', jk, 'job', string.format('%d,0,0,["",{},null]', now))
    L.unindex(jk, id)
    L.kill(jk, id, L.failure('CORRUPT_JOB', 'the stored job record is a ' .. kind ..
      ', not a hash; its value was kept at key ' .. aside ..
      ' and the job was moved to the dead-letter set'), now, limit)
  end

  -- HMGET that survives a key of the wrong type: the values, or nil when the key held
  -- something other than a hash (it is quarantined).
  function L.load(jk, id, now, limit, fields)
    local values = redis.pcall('HMGET', jk, unpack(fields))
    if values.err then
      L.quarantine(jk, id, now, limit)
      return nil
    end
    return values
  end

  function L.enter_ready(jk, id, seq, priority, since)
    local member = L.ready_member(seq, id)
    redis.call('HSET', jk, 'state', 'ready', 'seq', string.sub(member, 1, 16))
    redis.call('ZADD', K_READY, priority, member)
    redis.call('ZADD', K_AGE, since, id)
  end

  -- Schedules a job for `run_at` with a new place in line; wakes a waiter when it is now
  -- the first one due, so waiting fetchers shorten their wait.
  function L.enter_scheduled(jk, id, run_at, now)
    redis.call('HSET', jk, 'state', 'scheduled', 'run_at_ms', run_at,
      'seq', string.format('%016d', redis.call('HINCRBY', K_META, 'seq', '1')))
    redis.call('ZADD', K_SCHED, run_at, id)
    if redis.call('ZRANGE', K_SCHED, '0', '0')[1] == id then
      L.wake_waiters(now)
    end
  end

  -- Moves due scheduled jobs to ready, in due order, at most PROMOTE_BATCH per call.
  -- Returns how many became ready and the new first scheduled job (ZRANGE 0 0
  -- WITHSCORES).
  function L.promote(now, limit)
    local due = redis.call('ZRANGEBYSCORE', K_SCHED, '-inf', now, 'WITHSCORES', 'LIMIT', '0', PROMOTE_BATCH)
    local n = 0
    if #due > 0 then
      -- Exactly the members just read: the lowest scores come first.
      redis.call('ZREMRANGEBYRANK', K_SCHED, '0', #due / 2 - 1)
      local ready = {}
      local ages = {}
      for i = 1, #due, 2 do
        local id = due[i]
        local run_at = due[i + 1]
        local jk = JOB .. id
        local f = L.load(jk, id, now, limit, { 'job', 'seq', 'state', 'priority' })
        if not f then
          -- quarantined
        elseif f[3] == 'scheduled' then
          local priority = L.job_numbers(f[1], f[4])
          local bad = L.bad_fields({ 'priority', 'seq' }, { priority, f[2] }, 2)
          if bad then
            L.bury(jk, id, bad, now, limit)
          else
            local member = L.ready_member(f[2], id)
            redis.call('HSET', jk, 'state', 'ready')
            ready[#ready + 1] = string.format('%d', priority)
            ready[#ready + 1] = member
            -- Ready since its due time, even if nobody looked until later.
            ages[#ages + 1] = run_at
            ages[#ages + 1] = id
            n = n + 1
          end
        elseif not f[3] and redis.call('EXISTS', jk) == 1 then
          L.bury(jk, id, 'state is missing', now, limit)
        end
      end
      if n > 0 then
        redis.call('ZADD', K_READY, unpack(ready))
        redis.call('ZADD', K_AGE, unpack(ages))
      end
    end
    return n, redis.call('ZRANGE', K_SCHED, '0', '0', 'WITHSCORES')
  end

  -- Deletes completed and cancelled jobs that finished more than `retention` ago, at
  -- most PURGE_BATCH per set per call. Records in meta.finished_head the oldest finish
  -- time left (or now when none is left: anything finished later is newer), which is
  -- how the scripts know without looking when the next purge can find anything.
  function L.purge(now, retention)
    local cutoff = now - retention
    local first = nil
    for _, zset in ipairs({ K_COMPLETED, K_CANCELLED }) do
      local old = redis.call('ZRANGEBYSCORE', zset, '-inf', cutoff, 'LIMIT', '0', PURGE_BATCH)
      if #old > 0 then
        local keys = {}
        for i, id in ipairs(old) do
          keys[i] = JOB .. id
        end
        redis.call('DEL', unpack(keys))
        redis.call('ZREMRANGEBYRANK', zset, '0', #old - 1)
      end
      local h = redis.call('ZRANGE', zset, '0', '0', 'WITHSCORES')
      if h[2] and (not first or tonumber(h[2]) < first) then
        first = tonumber(h[2])
      end
    end
    redis.call('HSET', K_META, 'finished_head', first or now)
  end

  -- A body record, <b:016d><job field>, or from the layout before batch lists
  -- <seq:016d><batch:016d><job field> (its first comma comes after 40 characters, the
  -- other's at about 30): its job field, its batch, and for the older layout its seq.
  -- The fetch's hot path reads the first kind inline.
  function L.body_record(body)
    if (string.find(body, ',', 1, true) or 0) > 40 then
      return string.sub(body, 33), string.sub(body, 17, 32), string.sub(body, 1, 16)
    end
    return string.sub(body, 17), string.sub(body, 1, 16), nil
  end

  -- A job of batch `b` of the layout before batch lists left body: lowers the batch's
  -- count, and drops its entries at zero, as that layout did.
  function L.legacy_left(b)
    local left = redis.pcall('HINCRBY', BASE .. ':batches', b, '-1')
    if type(left) ~= 'number' or left <= 0 then
      redis.pcall('HDEL', BASE .. ':batches', b)
      redis.pcall('ZREM', K_BATCH_SINCE, b)
    end
  end

  -- Once the ready line is empty no job should wait in the body hash: a record left
  -- there lost its batch to a damaged key (or was stored by the layout before batch
  -- lists). Gives up to HEAL_BATCH of them a hash of their own
  -- and a place at the end of the line, oldest first, and wakes a fetcher for them;
  -- once body is empty, resets the batch count and ready times. Returns how many jobs
  -- went back in line.
  function L.heal_batches(now)
    local found = {}
    local cursor = '0'
    repeat
      local scan = redis.pcall('HSCAN', K_BODY, cursor, 'COUNT', HEAL_BATCH)
      if scan.err then
        break
      end
      cursor = scan[1]
      found = scan[2]
    until #found > 0 or cursor == '0'
    local strays = {}
    local counted = 0
    for i = 1, #found, 2 do
      local job, _, seq = L.body_record(found[i + 1])
      if not seq then
        -- Counted in meta.batched (the older layout's records are not).
        counted = counted + 1
      end
      strays[#strays + 1] = { id = found[i], job = job, n = #strays + 1,
        at = tonumber(string.match(job, '^(%d+),')) or 0 }
    end
    table.sort(strays, function(x, y)
      if x.at ~= y.at then
        return x.at < y.at
      end
      return x.n < y.n
    end)
    local members = {}
    local ages = {}
    if #strays > 0 then
      local seq = redis.call('HINCRBY', K_META, 'seq', string.format('%d', #strays)) - #strays
      local ids = {}
      for _, stray in ipairs(strays) do
        seq = seq + 1
        ids[#ids + 1] = stray.id
        local jk = JOB .. stray.id
        if redis.call('EXISTS', jk) == 0 then
          local member = string.format('%016d', seq)
          redis.call('HSET', jk, 'job', stray.job, 'state', 'ready', 'seq', member)
          members[#members + 1] = string.format('%d', L.job_numbers(stray.job) or 0)
          members[#members + 1] = member .. stray.id
          ages[#ages + 1] = now
          ages[#ages + 1] = stray.id
        end
      end
      redis.call('HDEL', K_BODY, unpack(ids))
      if #members > 0 then
        redis.call('ZADD', K_READY, unpack(members))
        redis.call('ZADD', K_AGE, unpack(ages))
        redis.call('LPUSH', K_SIGNAL, '1')
        redis.call('LTRIM', K_SIGNAL, '0', '15')
      end
    end
    if redis.pcall('EXISTS', K_BODY) == 0 or #strays == 0 then
      redis.call('HDEL', K_META, 'batched', 'batch_heal')
      redis.call('DEL', K_BATCH_SINCE, BASE .. ':batches')
    elseif counted > 0 then
      redis.pcall('HINCRBY', K_META, 'batched', string.format('%d', -counted))
    end
    return #members / 2
  end

  -- purge() when meta.finished_head (`head`) says a result may be past its retention.
  function L.purge_due(now, retention, head)
    if now - retention >= (tonumber(head) or 0) then
      L.purge(now, retention)
    end
  end

  return L
end
