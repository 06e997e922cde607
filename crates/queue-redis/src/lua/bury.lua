-- bury: dead-letters a leased job whose record the client could not decode (bad JSON),
-- with CORRUPT_JOB. Fenced like every lease operation.
-- ARGV: id, token, reason, dead_letter_limit.
-- Returns 1, or 0 when the lease is stale.
local id = ARGV[1]
local jk = jkey(id)
if not fenced(jk, ARGV[2]) then
  return 0
end
bury(jk, id, ARGV[3], now_ms(), tonumber(ARGV[4]))
return 1
