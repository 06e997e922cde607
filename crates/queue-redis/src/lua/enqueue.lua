-- enqueue: stores jobs of one queue, in order.
-- ARGV: count, then per job 8 values: id, payload, tenant, priority, max_retries,
--       run_at_ms ('' = now), dedupe_key ('' = none), headers (JSON object).
-- Returns the id of each job: its own, or the live job holding its dedupe key.
-- Idempotent: a job whose id already exists is left alone, so a retried call after a
-- lost reply stores nothing twice.
local count = tonumber(ARGV[1])
local now = now_ms()
local out = {}
local woke = false
for i = 0, count - 1 do
  local o = 1 + i * 8
  local id = ARGV[o + 1]
  local dedupe = ARGV[o + 7]
  local jk = jkey(id)
  local holder = nil
  if dedupe ~= '' then
    holder = redis.call('HGET', K_DEDUPE, dedupe)
    if holder and holder ~= id and not is_live(redis.call('HGET', jkey(holder), 'state')) then
      holder = nil
    end
  end
  if redis.call('EXISTS', jk) == 1 then
    out[#out + 1] = id
  elseif holder then
    out[#out + 1] = holder
  else
    local run_at = now
    if ARGV[o + 6] ~= '' then
      run_at = tonumber(ARGV[o + 6])
    end
    local priority = tonumber(ARGV[o + 4])
    redis.call('HSET', jk,
      'payload', ARGV[o + 2],
      'tenant', ARGV[o + 3],
      'priority', priority,
      'max_retries', ARGV[o + 5],
      'attempts', 0,
      'lease_expiries', 0,
      'cancel_requested', 0,
      'token', 0,
      'created_at_ms', now,
      'run_at_ms', run_at,
      'headers', ARGV[o + 8])
    if dedupe ~= '' then
      redis.call('HSET', jk, 'dedupe_key', dedupe)
      redis.call('HSET', K_DEDUPE, dedupe, id)
    end
    if run_at > now then
      enter_scheduled(jk, id, run_at)
    else
      enter_ready(jk, id, next_seq(), priority, now)
      woke = true
    end
    out[#out + 1] = id
  end
end
if woke then
  signal()
end
return out
