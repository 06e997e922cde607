-- complete: records results and ends leases, each lease fenced on its own.
-- ARGV: retention_ms, count, then per item: id, token, result JSON.
-- Returns one value per item: 1 recorded, 0 stale lease.
local retention = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 0, count - 1 do
  local o = 2 + i * 3
  local id = ARGV[o + 1]
  local jk = jkey(id)
  if fenced(jk, ARGV[o + 2]) then
    redis.call('ZREM', K_RUNNING, id)
    redis.call('HSET', jk, 'result', ARGV[o + 3])
    finish(jk, id, 'completed', now, retention)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
