-- set_paused: pauses (ARGV[1] = '1') or resumes ('0') a queue; resuming wakes waiters.
-- Needs lib.
if ARGV[1] == '1' then
  redis.call('HSET', BASE .. ':meta', 'paused', '1')
else
  redis.call('HDEL', BASE .. ':meta', 'paused')
  local L = lib()
  L.wake_waiters(L.now())
end
return 1
