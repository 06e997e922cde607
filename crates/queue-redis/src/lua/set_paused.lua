-- set_paused: pauses (ARGV[1] = '1') or resumes ('0') a queue; resuming wakes waiters.
if ARGV[1] == '1' then
  redis.call('HSET', K_META, 'paused', '1')
else
  redis.call('HDEL', K_META, 'paused')
  signal()
end
return 1
