-- fail: ends a lease and moves the job to the dead-letter set.
-- ARGV: id, token, failure JSON, dead_letter_limit.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return 0
end
redis.call('ZREM', K_RUNNING, id)
kill(jk, id, ARGV[3], now_ms(), tonumber(ARGV[4]))
return 1
