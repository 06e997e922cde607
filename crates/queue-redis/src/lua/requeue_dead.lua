-- requeue_dead: puts dead jobs back to ready with attempts reset, oldest first. Needs
-- lib.
-- ARGV: 'one', id; or 'batch', batch size, bound ('' on the first call).
-- Mode one returns 'ok', 'not_found' or the job's state. Mode batch requeues up to
-- `batch` dead letters that died before `bound` (the dead-letter sequence when the first
-- call ran, so jobs dying again meanwhile are not requeued in a loop) and returns
-- {count, bound}; call again with the bound while count equals the batch size.
local L = lib()
local now = L.now()
local K_META = BASE .. ':meta'
local K_DEAD = BASE .. ':dead'
local K_DEDUPE = BASE .. ':dedupe'

local function revive(jk, id)
  redis.call('ZREM', K_DEAD, id)
  -- A new life: no lease of the old one can be sent again (token 0 matches no lease).
  redis.call('HSET', jk, 'attempts', '0', 'lease_expiries', '0', 'cancel_requested', '0',
    'run_at_ms', now, 'token', '0')
  redis.call('HDEL', jk, 'finished_at_ms', 'result', 'held', 'held_expiries')
  -- Take the dedupe key back unless another live job holds it now.
  local f = redis.call('HMGET', jk, 'dedupe_key', 'priority', 'job')
  local key = f[1]
  if key then
    local holder = redis.call('HGET', K_DEDUPE, key)
    local state = holder and redis.call('HGET', JOB .. holder, 'state')
    if not holder or holder == id or
        not (state == 'ready' or state == 'scheduled' or state == 'running') then
      redis.call('HSET', K_DEDUPE, key, id)
    end
  end
  L.enter_ready(jk, id, redis.call('HINCRBY', K_META, 'seq', '1'), L.job_numbers(f[3], f[2]) or 0,
    now)
end

if ARGV[1] == 'one' then
  local id = ARGV[2]
  local jk = JOB .. id
  local state = redis.call('HGET', jk, 'state')
  if not state then
    -- A ready job of a batch enqueue has no record of its own yet (see the prelude).
    if redis.pcall('HEXISTS', BASE .. ':body', id) == 1 then
      return 'ready'
    end
    return 'not_found'
  end
  if state ~= 'dead' then
    return state
  end
  revive(jk, id)
  L.wake_waiters(now)
  return 'ok'
end
local bound = ARGV[3]
if bound == '' then
  bound = redis.call('HGET', K_META, 'seq') or '0'
end
local ids = redis.call('ZRANGEBYSCORE', K_DEAD, '-inf', bound, 'LIMIT', '0', ARGV[2])
for _, id in ipairs(ids) do
  revive(JOB .. id, id)
end
if #ids > 0 then
  L.wake_waiters(now)
end
return { #ids, bound }
