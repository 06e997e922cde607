-- mark_started: records that held jobs (leased by fetch beyond its `start`) have started,
-- so from now on their lease expiring counts as an attempt and an expiry. Fenced per job:
-- a stale token or a job no longer running is left alone.
-- ARGV: count, then per job: id, token.
-- Returns the number of jobs marked.
local n = 0
for o = 2, 1 + tonumber(ARGV[1]) * 2, 2 do
  local jk = JOB .. ARGV[o]
  local f = redis.call('HMGET', jk, 'state', 'token')
  if f[1] == 'running' and f[2] == ARGV[o + 1] then
    redis.call('HDEL', jk, 'held')
    n = n + 1
  end
end
return n
