-- job: reads one job. Read-only.
-- ARGV: id.
-- Returns {now, {field, value, ...}} (an empty list when there is no such record).
local t = redis.call('TIME')
return { t[1] * 1000 + math.floor(t[2] / 1000), redis.call('HGETALL', JOB .. ARGV[1]) }
