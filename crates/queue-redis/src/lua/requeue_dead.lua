-- requeue_dead: puts dead jobs back to ready with attempts reset, oldest first.
-- ARGV: 'one', id; or 'batch', batch size, bound ('' on the first call).
-- Mode one returns 'ok', 'not_found' or the job's state. Mode batch requeues up to
-- `batch` dead letters that died before `bound` (the dead-letter sequence when the first
-- call ran, so jobs dying again meanwhile are not requeued in a loop) and returns
-- {count, bound}; call again with the bound while count equals the batch size.
local now = now_ms()

local function revive(jk, id)
  redis.call('ZREM', K_DEAD, id)
  redis.call('HSET', jk, 'attempts', 0, 'lease_expiries', 0, 'cancel_requested', 0,
    'run_at_ms', now)
  redis.call('HDEL', jk, 'finished_at_ms', 'result')
  -- Take the dedupe key back unless another live job holds it now.
  local key = redis.call('HGET', jk, 'dedupe_key')
  if key then
    local holder = redis.call('HGET', K_DEDUPE, key)
    if not holder or holder == id or not is_live(redis.call('HGET', jkey(holder), 'state')) then
      redis.call('HSET', K_DEDUPE, key, id)
    end
  end
  enter_ready(jk, id, next_seq(), tonumber(redis.call('HGET', jk, 'priority')) or 0, now)
end

if ARGV[1] == 'one' then
  local id = ARGV[2]
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'finished_at_ms')
  if not f[1] then
    return 'not_found'
  end
  if f[1] ~= 'dead' then
    return f[1]
  end
  revive(jk, id)
  signal()
  return 'ok'
end
local bound = ARGV[3]
if bound == '' then
  bound = redis.call('HGET', K_META, 'seq') or '0'
end
local ids = redis.call('ZRANGEBYSCORE', K_DEAD, '-inf', bound, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  revive(jkey(id), id)
end
if #ids > 0 then
  signal()
end
return { #ids, bound }
