-- fail: ends a lease and moves the job to the dead-letter set. Needs lib.
-- ARGV: id, token, failure JSON, dead_letter_limit.
-- Returns 1 (also for a replay of this outcome), or 0 when the lease is stale.
local id = ARGV[1]
local jk = JOB .. id
local f = redis.call('HMGET', jk, 'state', 'token')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then
  -- A replay (the reply to the first call was lost): this lease already recorded this
  -- outcome. The reaper zeroes the token of a lease it takes back, so only the lease's
  -- own holder can have left its token on a job in that state.
  if f[2] == ARGV[2] and ARGV[2] ~= '0' and (f[1] == 'dead') then
    return 1
  end
  return 0
end
local L = lib()
redis.call('ZREM', BASE .. ':running', id)
L.kill(jk, id, ARGV[3], L.now(), tonumber(ARGV[4]))
return 1
