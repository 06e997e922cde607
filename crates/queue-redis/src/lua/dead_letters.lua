-- dead_letters: a page of the dead-letter set, newest first. Read-only.
-- ARGV: offset, limit (> 0).
-- Returns 7 values per letter: id, error, attempts, finished_at_ms, job, payload, tenant
-- (false for a missing field; payload and tenant are fields of records written before
-- the job field existed).
local offset = tonumber(ARGV[1])
local ids = redis.call('ZREVRANGE', BASE .. ':dead', offset, offset + tonumber(ARGV[2]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', JOB .. id, 'error', 'attempts', 'finished_at_ms', 'job', 'payload',
    'tenant')
  out[#out + 1] = id
  for i = 1, 6 do
    out[#out + 1] = f[i]
  end
end
return out
