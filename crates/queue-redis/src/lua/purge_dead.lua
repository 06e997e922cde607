-- purge_dead: deletes up to `batch` dead letters, oldest first, that died before
-- `bound` (the dead-letter sequence when the first call ran).
-- ARGV: batch, bound ('' on the first call).
-- Returns {count, bound}; call again with the bound while count equals the batch size.
local K_DEAD = BASE .. ':dead'
local bound = ARGV[2]
if bound == '' then
  bound = redis.call('HGET', BASE .. ':meta', 'seq') or '0'
end
local ids = redis.call('ZRANGEBYSCORE', K_DEAD, '-inf', bound, 'LIMIT', '0', ARGV[1])
for _, id in ipairs(ids) do
  redis.call('DEL', JOB .. id)
  redis.call('ZREM', K_DEAD, id)
end
return { #ids, bound }
