-- job: reads one job. Read-only.
-- ARGV: id.
-- Returns {now, {field, value, ...}} (an empty list when there is no such record).
return { now_ms(), redis.call('HGETALL', jkey(ARGV[1])) }
