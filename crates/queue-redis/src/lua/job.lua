-- job: reads one job. Read-only. Needs lib.
-- ARGV: id.
-- Returns {now, {field, value, ...}} (an empty list when there is no such record). A
-- ready job still in the body hash (see the prelude) is returned as the fields its own
-- record will have.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local fields = redis.call('HGETALL', JOB .. ARGV[1])
if #fields == 0 then
  -- pcall: a body key of another type holds no job.
  local body = redis.pcall('HGET', BASE .. ':body', ARGV[1])
  if type(body) == 'string' then
    body = lib().body_record(body)
    fields = { 'state', 'ready', 'job', body }
  end
end
return { now, fields }
