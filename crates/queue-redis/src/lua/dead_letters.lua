-- dead_letters: a page of the dead-letter set, newest first. Read-only.
-- ARGV: offset, limit (> 0).
-- Returns 6 values per letter: id, error, attempts, finished_at_ms, payload, tenant
-- (false for a missing field).
local offset = tonumber(ARGV[1])
local ids = redis.call('ZREVRANGE', BASE .. ':dead', offset, offset + tonumber(ARGV[2]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', JOB .. id, 'error', 'attempts', 'finished_at_ms', 'payload', 'tenant')
  out[#out + 1] = id
  for i = 1, 5 do
    out[#out + 1] = f[i]
  end
end
return out
