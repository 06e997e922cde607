-- complete: records results and ends leases, each lease fenced on its own. Needs lib.
-- ARGV: count, then per item: id, token, result JSON.
-- Returns one value per item: 1 recorded (or recorded before by the same lease: a
-- replay), 0 stale lease.
local t = redis.call('TIME')
local now_s = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local out = {}
local ids = {}
local finished = {}
local L = nil
for o = 2, 1 + tonumber(ARGV[1]) * 3, 3 do
  local id = ARGV[o]
  local jk = JOB .. id
  local f = redis.call('HMGET', jk, 'state', 'token', 'dedupe_key')
  -- Tokens are written with string.format('%d') (older versions: '%.17g', the same
  -- digits for integers), so the texts compare equal exactly when the numbers do.
  if f[1] == 'running' and f[2] == ARGV[o + 1] then
    if f[3] then
      L = L or lib()
      L.release_dedupe(id, f[3])
    end
    redis.call('HSET', jk, 'state', 'completed', 'finished_at_ms', now_s, 'result', ARGV[o + 2])
    ids[#ids + 1] = id
    finished[#finished + 1] = now_s
    finished[#finished + 1] = id
    out[#out + 1] = 1
  elseif f[1] == 'completed' and f[2] == ARGV[o + 1] and ARGV[o + 1] ~= '0' then
    -- A replay (the reply to the first call was lost): recorded already, by this lease
    -- (the reaper zeroes the token of a lease it takes back).
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #ids > 0 then
  redis.call('ZREM', BASE .. ':running', unpack(ids))
  redis.call('ZADD', BASE .. ':completed', unpack(finished))
end
return out
